"""Unit tests for certmgr.fsutil: final modes from creation on, atomic replace, temp sweeping."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from certmgr import fsutil


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("wanted", [0o600, 0o644, 0o640])
def test_atomic_write_gives_exact_mode_whatever_the_umask(tmp_path: Path, strict_umask: None, wanted: int) -> None:
    """atomic_write creates the file with exactly the requested mode, neither widened nor narrowed by the umask."""
    target = tmp_path / "f"
    fsutil.atomic_write(target, b"data", wanted)
    assert target.read_bytes() == b"data"
    assert mode(target) == wanted


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    """atomic_write replaces existing content in place and leaves nothing but the target in the directory."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    fsutil.atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_failure_keeps_old_content_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the rename fails, the old file is untouched and the temporary is removed."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_create_file_never_follows_an_existing_symlink(tmp_path: Path) -> None:
    """create_file refuses a path that exists, even as a symlink, so it cannot be tricked into writing elsewhere."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(FileExistsError):
        fsutil.create_file(tmp_path / "link", b"evil")
    assert victim.read_bytes() == b"keep"


def test_atomic_symlink_replaces_existing_link(tmp_path: Path) -> None:
    """atomic_symlink repoints an existing link in place and leaves no temporary behind."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "live"
    fsutil.atomic_symlink("a", link)
    fsutil.atomic_symlink("b", link)
    assert os.readlink(link) == "b"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "live"]


def test_atomic_symlink_refuses_a_real_directory(tmp_path: Path) -> None:
    """atomic_symlink cannot replace a real directory (rename(2) forbids it) and cleans up its temporary."""
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "cert.pem").write_bytes(b"x")
    with pytest.raises(IsADirectoryError):
        fsutil.atomic_symlink("elsewhere", tmp_path / "live")
    assert os.listdir(tmp_path) == ["live"]


def test_exchange_swaps_a_directory_and_a_symlink(tmp_path: Path) -> None:
    """exchange swaps a non-empty directory with a symlink in one step where the kernel supports it."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to("target")
    if not fsutil.exchange(tmp_path / "link", tmp_path / "dir"):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here")
    assert os.readlink(tmp_path / "dir") == "target"
    assert (tmp_path / "link" / "f").read_bytes() == b"x"


def test_make_dir_sets_exact_mode_and_reports_creation(tmp_path: Path, strict_umask: None) -> None:
    """make_dir creates with the exact mode, returns False for an existing directory and refuses a file."""
    assert fsutil.make_dir(tmp_path / "d", 0o755) is True
    assert mode(tmp_path / "d") == 0o755
    assert fsutil.make_dir(tmp_path / "d", 0o700) is False
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsutil.make_dir(tmp_path / "f", 0o700)


def test_remove_temps_removes_only_temporaries(tmp_path: Path) -> None:
    """remove_temps deletes hidden '.tmp-' files, dirs and links, and nothing else."""
    (tmp_path / ".tmp-3-abcd").mkdir()
    (tmp_path / ".tmp-3-abcd" / "privkey.pem").write_bytes(b"x")
    (tmp_path / fsutil.temp_name("state.json")).write_bytes(b"{}")
    (tmp_path / fsutil.temp_name("example.com")).symlink_to("nowhere")
    for keep in ("3", "state.json", "tmp-not-hidden", ".hidden"):
        (tmp_path / keep).write_bytes(b"")
    assert len(fsutil.remove_temps(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == [".hidden", "3", "state.json", "tmp-not-hidden"]


def test_remove_temps_spares_fresh_temporaries_when_asked(tmp_path: Path) -> None:
    """With older_than, a temporary younger than the limit (a live writer's) is left alone."""
    fresh = tmp_path / fsutil.temp_name("a")
    old = tmp_path / fsutil.temp_name("b")
    fresh.write_bytes(b"")
    old.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert fsutil.remove_temps(tmp_path, older_than=60) == [old.name]
    assert fresh.exists()
