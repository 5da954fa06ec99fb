"""Crash-safe file system primitives: files created with their final mode, atomic replace, fsync.

Every helper leaves a path either as it was or wholly replaced, never half-written. Temporary
names start with "." and contain ".tmp-" (see `is_temp_name`) so that a later writer can sweep
what a killed one left behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import time
from pathlib import Path

TEMP_MARK = ".tmp-"

# <linux/fs.h>: renameat2(2) flag swapping two existing paths atomically.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temp_name(base: str) -> str:
    """A fresh hidden temporary name for `base`, recognised by `is_temp_name`."""
    return f".{base}{TEMP_MARK}{secrets.token_hex(6)}"


def is_temp_name(name: str) -> bool:
    """Whether `name` is a temporary left by these helpers (or by a store writer)."""
    return name.startswith(".") and TEMP_MARK in name


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or create in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path, mode: int) -> bool:
    """Create directory `path` with exactly `mode` (umask notwithstanding); False if it already existed.

    The parent is not fsynced here: callers creating several entries fsync it once.
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir() or path.is_symlink():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path)) from None
        return False
    os.chmod(path, mode)  # mkdir(2) applies the umask; we want the exact mode
    return True


def create_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` (which must not exist) with `mode` from the first byte on, write `data`, fsync.

    O_CREAT|O_EXCL never follows or reuses an existing file or symlink, and the file is never
    more permissive than `mode`, not even for an instant (fchmod only lifts the umask's mask).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically: readers see the old file or the new one, whole.

    Temp file in the same directory created with its final mode, written, fsynced, renamed over
    `path`, then the directory fsynced so the rename survives a power loss.
    """
    tmp = path.parent / temp_name(path.name)
    try:
        create_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def atomic_symlink(target: str | Path, link_path: Path) -> None:
    """Point `link_path` at `target` in one rename(2): it never dangles and never is missing.

    Fails with IsADirectoryError when `link_path` is a real directory (rename(2) cannot replace
    one by a symlink; see `exchange`).
    """
    tmp = link_path.parent / temp_name(link_path.name)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link_path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(link_path.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically with renameat2(RENAME_EXCHANGE); False if unsupported.

    Linux >= 3.15 with glibc >= 2.28 on ext4, xfs, btrfs and tmpfs support it; other file systems
    (and other kernels) return False and the caller falls back to two renames.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def remove_temps(directory: Path, *, older_than: float | None = None) -> list[str]:
    """Remove temporaries (`is_temp_name`) left in `directory`; returns the names removed.

    Only call this while no live writer can own them (under the store lock), or pass
    `older_than` seconds so that a writer's fresh temp is left alone.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        if older_than is not None and now - entry.stat(follow_symlinks=False).st_mtime < older_than:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            _unlink_quietly(Path(entry.path))
        removed.append(entry.name)
    return removed


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
