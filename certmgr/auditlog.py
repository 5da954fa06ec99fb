"""Audit log retention: `audit.log` is rotated to `audit.log.1` past a size, so the log stays bounded.

At most two generations are kept (the live file and one rotated), i.e. about 2 × AUDIT_MAX_BYTES
on disk. Rotation is safe against concurrent appenders (their line lands in one of the two files)
and against concurrent rotators (an flock on the file, and an inode check after taking it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

AUDIT_MAX_BYTES = 16 * 1024 * 1024  # ~100 years of a 50-certificate, 20-POP fleet on 6-day certificates
ROTATED_SUFFIX = ".1"


def generations(path: Path) -> list[Path]:
    """The files to read, oldest first: `audit.log.1` (when present), then `audit.log`."""
    rotated = path.with_name(path.name + ROTATED_SUFFIX)
    return [p for p in (rotated, path) if p.exists()] or [path]


def rotate_if_large(path: Path, max_bytes: int = AUDIT_MAX_BYTES) -> bool:
    """Rename `path` to `path.1` (replacing the older generation) once it exceeds `max_bytes`; True if rotated.

    Errors are not raised: the append that follows reports an unwritable log itself.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another process is rotating it right now
        with contextlib.suppress(OSError):
            same = os.fstat(fd).st_ino == path.stat().st_ino
            if same and os.fstat(fd).st_size > max_bytes:
                os.replace(path, path.with_name(path.name + ROTATED_SUFFIX))
                return True
        return False
    finally:
        os.close(fd)
