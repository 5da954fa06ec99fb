"""Unit tests for the one-archive upload and the batched switches (issue 13 §1): GNU mv renames every staged
link into live/ with one rename(2) each, a switch that fails mid-batch is reported (and switched back) exactly
for its certificate, and the POP extracts from the archive only the members it names itself."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from certmgr.deploy import ROLLBACK_SH
from certmgr.deploy.model import parse_commit, parse_rollback
from certmgr.deploy.steps import upload_archive
from certmgr.errors import DeployError
from certmgr.remote import Result, parse_kv, sh_command
from tests.unit.test_deploy_stream import MATERIAL, sh_in, streamed, temps
from tests.unit.test_deploy_txn import NAMES, multi_root

MV = shutil.which("mv") or "/bin/mv"


def mv_that_first(bindir: Path, action: str) -> dict[str, str]:
    """A PATH whose `mv`, when called with -t (the batch), first runs `action` (sh), then the real mv."""
    bindir.mkdir()
    (bindir / "mv").write_text(f'#!/bin/sh\ncase " $* " in *" -t "*) {action} ;; esac\nexec {MV} "$@"\n')
    (bindir / "mv").chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_mv_t_renames_a_link_over_a_link_to_a_directory_without_entering_it(tmp_path: Path) -> None:
    """`mv -f -t live stage/n` over live/n -> a directory: one renameat(2) onto live/n (relative to live/'s
    descriptor), the old link replaced, nothing moved into the directory it pointed at."""
    (tmp_path / "live").mkdir()
    (tmp_path / "stage").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    os.symlink("../old", tmp_path / "live" / "n")
    os.symlink("../new", tmp_path / "stage" / "n")
    log = tmp_path / "trace"
    subprocess.run(["strace", "-qq", "-e", "trace=rename,renameat,renameat2", "-o", str(log), MV, "-f", "-t",
                    str(tmp_path / "live"), "--", str(tmp_path / "stage" / "n")], check=True)
    done = [line for line in log.read_text().splitlines() if line.rstrip().endswith("= 0")]
    assert len(done) == 1 and done[0].startswith("renameat") and done[0].rstrip().endswith(', "n") = 0'), done
    assert os.readlink(tmp_path / "live" / "n") == "../new"
    assert os.listdir(tmp_path / "old") == [] and os.listdir(tmp_path / "stage") == []


def test_a_switch_that_fails_mid_batch_fails_only_its_certificate(tmp_path: Path) -> None:
    """live/b.example turned into a directory just before the one `mv -t`: b fails at "swap" with mv's own words
    about it and keeps its directory; a and c are switched, tested and reloaded; no stage dir is left."""
    root, log = multi_root(tmp_path), tmp_path / "log"
    args, data = streamed(root, log)
    b = root / "live" / "b.example"
    env = mv_that_first(tmp_path / "bin", f"rm -f {b} && mkdir -p {b}/keep")
    res = sh_in(args, data + b"go\n", env=env)
    c = parse_commit(res)
    assert c.done and res.exit_status == 0, res.stdout + res.stderr
    assert c.certs["b.example"].failed_step == "swap" and not c.certs["b.example"].swapped
    assert "cannot overwrite directory" in c.certs["b.example"].failed_out
    assert str(b) in c.certs["b.example"].failed_out and "a.example" not in c.certs["b.example"].failed_out
    assert b.is_dir() and not b.is_symlink() and os.listdir(b) == ["keep"]
    for n in ("a.example", "c.example"):
        assert c.certs[n].swapped and c.certs[n].prev == f"../archive/{n}/1"
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"
    assert log.read_text() == "test\nreload\n"
    assert sorted(os.listdir(root / "live")) == sorted(NAMES) and temps(root) == []


def test_a_failed_test_switches_back_exactly_the_certificates_switched(tmp_path: Path) -> None:
    """b's switch failed mid-batch, then the test fails: a and c (only) are switched back by the batch, each to
    its version 1, and reported rolled back; b is not in the rollback."""
    root, log = multi_root(tmp_path), tmp_path / "log"
    args, data = streamed(root, log)
    args[6] = f"echo test >> {log}; false"  # the test command
    b = root / "live" / "b.example"
    env = mv_that_first(tmp_path / "bin", f"[ ! -L {b} ] || {{ rm -f {b} && mkdir -p {b}/keep; }}")
    res = sh_in(args, data + b"go\n", env=env)
    c = parse_commit(res)
    assert res.exit_status == 4 and not c.done, res.stdout + res.stderr
    assert {n: c.certs[n].rolled_back for n in NAMES} == {"a.example": True, "b.example": None, "c.example": True}
    assert {n: os.readlink(root / "live" / n) for n in ("a.example", "c.example")} == {
        n: f"../archive/{n}/1" for n in ("a.example", "c.example")}
    assert sorted(os.listdir(root / "live")) == sorted(NAMES)


def test_a_rollback_that_cannot_switch_one_back_says_so_for_that_one(tmp_path: Path) -> None:
    """rollback.sh of three certificates where live/b.example became a directory: b rolled_back=0, a and c back on
    version 1 (rolled_back=1), then one test and one reload; no stage dir left."""
    root = multi_root(tmp_path)
    (root / "archive" / ".certmgr.lock").touch()
    for n in NAMES:
        (root / "archive" / n / "2").mkdir()
        os.unlink(root / "live" / n)
        os.symlink(f"../archive/{n}/2", root / "live" / n)
    b = root / "live" / "b.example"
    env = mv_that_first(tmp_path / "bin", f"rm -f {b} && mkdir -p {b}/keep")
    args = [str(root), NAMES[0], f"../archive/{NAMES[0]}/1", "true", "true", "5", "", ""]
    for n in NAMES[1:]:
        args += [n, f"../archive/{n}/1"]
    proc = subprocess.run(["sh", "-c", sh_command(ROLLBACK_SH, args)], capture_output=True, env=env, check=False)
    out = proc.stdout.decode()
    res = parse_rollback(Result(exit_status=proc.returncode, stdout=out, stderr="", fields=parse_kv(out)))
    assert res.rolled_back == {"a.example": True, "b.example": False, "c.example": True}, out
    assert res.retest_rc == 0 and res.reload_rc == 0
    assert [os.readlink(root / "live" / n) for n in ("a.example", "c.example")] == [
        "../archive/a.example/1", "../archive/c.example/1"]
    assert sorted(os.listdir(root / "live")) == sorted(NAMES)


def hostile(data: bytes, root: Path) -> bytes:
    """The upload archive with members added that the POP never asked for (and must not write)."""
    src = tarfile.open(fileobj=io.BytesIO(data))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def put(name: str, body: bytes = b"evil", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(body) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
        put("../evil-parent")
        put(f"{root}/evil-absolute")
        put("archive/a.example/1/fullchain.pem")  # the version live now
        put("live/a.example", kind=tarfile.SYMTYPE, link="/etc")  # the live link itself
        put("archive/a.example/.tmp-up-tag-2-a.example/../../../evil-dotdot")
        for m in src.getmembers():
            f = src.extractfile(m) if m.isfile() else None
            tar.addfile(m, f)
        put("archive/b.example/.tmp-up-tag-2-b.example/extra.pem")
    return out.getvalue()


def test_members_the_pop_did_not_name_are_never_written(tmp_path: Path) -> None:
    """An archive carrying `..`, absolute, live-link and other members beside the listed ones: only the listed
    files and links are extracted; the commit stores and switches as usual and nothing else changed."""
    root, log = multi_root(tmp_path / "pop"), tmp_path / "log"
    args, data = streamed(root, log)
    bad = hostile(data, tmp_path)
    args[14] = str(len(bad))
    before = (root / "archive" / "a.example" / "1" / "fullchain.pem").read_bytes()
    res = sh_in(args, bad + b"go\n")
    c = parse_commit(res)
    assert c.done and all(c.certs[n].swapped for n in NAMES), res.stdout + res.stderr
    assert (root / "archive" / "a.example" / "1" / "fullchain.pem").read_bytes() == before
    assert os.readlink(root / "live" / "a.example") == "../archive/a.example/2"
    assert sorted(os.listdir(root / "archive" / "b.example" / "2")) == sorted(MATERIAL["b.example"].files())
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path / "evil-parent").exists()


def test_a_link_where_a_file_belongs_is_refused_before_any_chmod(tmp_path: Path) -> None:
    """A listed file that arrives as a symlink (cert.pem -> a file outside): that certificate fails at upload, the
    others are not uploaded, the outside file keeps its mode, no temp dir left."""
    root, log = multi_root(tmp_path / "pop"), tmp_path / "log"
    args, data = streamed(root, log)
    outside = tmp_path / "secret"
    outside.write_text("x")
    outside.chmod(0o600)
    src = tarfile.open(fileobj=io.BytesIO(data))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in src.getmembers():
            if m.name == "archive/c.example/.tmp-up-tag-2-c.example/cert.pem":
                m = tarfile.TarInfo(m.name)
                m.type, m.linkname = tarfile.SYMTYPE, str(outside)
                tar.addfile(m)
                continue
            tar.addfile(m, src.extractfile(m) if m.isfile() else None)
    bad = out.getvalue()
    args[14] = str(len(bad))
    res = sh_in(args, bad + b"go\n")
    c = parse_commit(res)
    assert res.exit_status == 3 and (c.certs["c.example"].failed_step, c.certs["c.example"].failed_out) == (
        "upload", "archive/c.example/.tmp-up-tag-2-c.example/cert.pem is not a regular file"), res.stdout
    assert (outside.stat().st_mode & 0o777) == 0o600
    assert temps(root) == [] and sorted(os.listdir(root / "live")) == sorted(NAMES)


@pytest.mark.parametrize(("name", "tmp", "version"), [
    ("../etc", ".tmp-up-t-2-aa", 2), ("a/b.example", ".tmp-up-t-2-aa", 2), ("A.example", ".tmp-up-t-2-aa", 2),
    ("a.example", "../x", 2), ("a.example", ".tmp-up-t/../x", 2), ("a.example", "/abs", 2),
    ("a.example", ".tmp-up-t-2-aa", -1)])
def test_the_controller_builds_no_archive_from_a_hostile_name(name: str, tmp: str, version: int) -> None:
    """upload_archive refuses a name, temp dir or version that could make a member leave its place."""
    with pytest.raises(DeployError):
        upload_archive([(name, tmp, version, MATERIAL["a.example"].files())], mtime=0)


def _tarfile_archive(uploads: list[tuple[str, str, int, dict[str, bytes]]], mtime: float) -> bytes:
    """What upload_archive built with tarfile.addfile before it built members itself: the reference bytes."""
    import io
    import tarfile

    from certmgr.deploy.plan import FILE_ORDER

    buf = io.BytesIO()
    stage = uploads[0][1]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, tmp, _, files in uploads:
            for f in FILE_ORDER:
                info = tarfile.TarInfo(f"archive/{name}/{tmp}/{f}")
                info.size, info.mode, info.mtime = len(files[f]), 0o600 if f == "privkey.pem" else 0o644, int(mtime)
                tar.addfile(info, io.BytesIO(files[f]))
        for name, _, version, _ in uploads:
            info = tarfile.TarInfo(f"live/{stage}/{name}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, f"../archive/{name}/{version}", 0o777, \
                int(mtime)
            tar.addfile(info)
    return buf.getvalue()


def test_the_upload_archive_is_byte_for_byte_what_tarfile_writes_and_its_blocks_are_built_once() -> None:
    """The members upload_archive builds itself are tarfile's own bytes (a long name — a 200-character
    certificate name — included: GNU's ././@LongLink); with a cache, a second POP's archive reuses each
    certificate's block and differs only in its staged links."""
    long = ".".join(["a" * 60, "b" * 60, "c" * 60, "example"])
    ups = [(n, f".tmp-up-t-{v}-0a1b2c3d4e5f", v, MATERIAL["a.example"].files())
           for n, v in (("a.example", 2), ("b.example", 7), (long, 3))]
    assert upload_archive(ups, mtime=1_700_000_000) == _tarfile_archive(ups, 1_700_000_000)
    cache: dict[tuple[str, str, int], bytes] = {}
    first = upload_archive(ups, mtime=5, cache=cache)
    assert len(cache) == 3 and first == _tarfile_archive(ups, 5)
    blocks = dict(cache)
    assert upload_archive(ups[1:], mtime=5, cache=cache) == _tarfile_archive(ups[1:], 5)  # another POP, 2 of the 3
    assert cache == blocks and all(cache[k] is blocks[k] for k in blocks)  # nothing built again


def test_the_archive_gives_the_private_key_no_bit_for_others_and_the_rest_no_write_for_them() -> None:
    """receive.sh creates each file with the archive's mode less umask 022: the key's own mode must already be
    owner-only (tar opens it O_CREAT with that mode: never readable by others, even briefly)."""
    from certmgr.deploy.plan import FILE_ORDER
    from certmgr.deploy.steps import _MODES

    assert set(_MODES) == set(FILE_ORDER) and _MODES["privkey.pem"] & 0o077 == 0
    data = upload_archive([("a.example", ".tmp-up-t-2-0a1b2c3d4e5f", 2, MATERIAL["a.example"].files())], mtime=0)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        modes = {m.name.rsplit("/", 1)[1]: m.mode for m in tf if m.isfile()}
    assert modes == {"fullchain.pem": 0o644, "privkey.pem": 0o600, "cert.pem": 0o644, "chain.pem": 0o644}


def test_link_line_carries_the_live_link_inspect_read_and_nothing_else() -> None:
    """steps.link_line: `link TARGET` ahead of the sums only for a live link (certbot's directory, no live/<name>,
    or a target a line cannot carry give none: commit.sh then reads the link itself)."""
    import types

    from certmgr.deploy.steps import link_line

    def job(layout: str, target: str | None) -> types.SimpleNamespace:
        return types.SimpleNamespace(state=types.SimpleNamespace(layout=layout, target=target))

    assert link_line(job("link", "../archive/a.example/3")) == "link ../archive/a.example/3\n"
    assert link_line(job("certbot", None)) == "" and link_line(job("none", None)) == ""
    assert link_line(job("link", "")) == "" and link_line(job("link", "../x\nlink ../y")) == ""
    assert link_line(types.SimpleNamespace(state=None)) == ""
