"""Unit tests for the upload on the commit's stdin (issue 13): commit.sh writes every certificate's files
under the POP lock, and a stream cut anywhere before the controller's `go` switches nothing, leaving no temp."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from certmgr.deploy import COMMIT_SH, FILE_ORDER, sha256sums
from certmgr.deploy.model import parse_commit
from certmgr.deploy.steps import upload_archive
from certmgr.remote import Result, parse_kv, sh_command
from tests.unit.test_deploy import material
from tests.unit.test_deploy_txn import NAMES, multi_root

MATERIAL = {n: material((n,)) for n in NAMES}


def streamed(root: Path, log: Path) -> tuple[list[str], bytes]:
    """commit.sh's arguments for version 2 of each name, its files on stdin (nothing uploaded before)."""
    five: list[list[str]] = []
    for n in NAMES:
        five.append([n, f".tmp-up-tag-2-{n}", "2", sha256sums(MATERIAL[n]), ""])
    data = upload_archive([(n, f".tmp-up-tag-2-{n}", 2, MATERIAL[n].files()) for n in NAMES], mtime=0)
    args = [str(root), *five[0], f"echo test >> {log}", f"echo reload >> {log}", "", "tag", "stamp", "5", "", "",
            str(len(data)), *[a for f in five[1:] for a in f]]
    return args, data


def sh_in(args: list[str], data: bytes, env: dict[str, str] | None = None) -> Result:
    """COMMIT_SH as the remote login shell runs it, `data` on its stdin."""
    proc = subprocess.run(["sh", "-c", sh_command(COMMIT_SH, args)], input=data, capture_output=True, timeout=30,
                          check=False, env=env)
    out = proc.stdout.decode()
    return Result(exit_status=proc.returncode, stdout=out, stderr=proc.stderr.decode(), fields=parse_kv(out))


def temps(root: Path) -> list[str]:
    return [e for n in NAMES for e in os.listdir(root / "archive" / n) if e.startswith(".")]


def test_streamed_commit_stores_every_version_with_its_modes(tmp_path: Path) -> None:
    """The files on stdin, then `go`: each version stored whole (key 0600, others 0644, dir 0755) and swapped."""
    root, log = multi_root(tmp_path), tmp_path / "log"
    args, data = streamed(root, log)
    res = sh_in(args, data + b"go\n")
    c = parse_commit(res)
    assert c.done and res.exit_status == 0 and res.get("received") == "1", res.stdout + res.stderr
    assert log.read_text() == "test\nreload\n"
    for n in NAMES:
        v = root / "archive" / n / "2"
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"
        assert (v / "fullchain.pem").read_bytes() == MATERIAL[n].fullchain
        assert {f: stat.S_IMODE((v / f).stat().st_mode) for f in FILE_ORDER} == {
            "fullchain.pem": 0o644, "privkey.pem": 0o600, "cert.pem": 0o644, "chain.pem": 0o644}
        assert stat.S_IMODE(v.stat().st_mode) == 0o755
    assert temps(root) == []


def member_offsets(data: bytes) -> dict[str, int]:
    """Where each member's header starts in the upload archive."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


@pytest.mark.parametrize("cut", ["mid-first-file", "mid-second-certificate", "at-a-member-boundary", "mid-links",
                                 "before-the-end-blocks", "all-bytes-no-go", "wrong-word"])
def test_a_stream_cut_before_go_switches_nothing_and_leaves_no_temp(tmp_path: Path, cut: str) -> None:
    """A stream that ends (or says anything but `go`) before the controller's word — inside the archive anywhere,
    even exactly between two members: exit 3, every certificate reported not uploaded, no test or reload, live
    untouched, and no temp dir (nor stage dir) left."""
    root, log = multi_root(tmp_path), tmp_path / "log"
    args, data = streamed(root, log)
    at = member_offsets(data)
    b_key = at["archive/b.example/.tmp-up-tag-2-b.example/privkey.pem"]
    link = at["live/.tmp-up-tag-2-a.example/b.example"]
    end = at["live/.tmp-up-tag-2-a.example/c.example"] + 512
    sent = {"mid-first-file": data[:700], "mid-second-certificate": data[: b_key + 600],
            "at-a-member-boundary": data[:b_key], "mid-links": data[: link + 100],
            "before-the-end-blocks": data[:end], "all-bytes-no-go": data, "wrong-word": data + b"stop\n"}[cut]
    res = sh_in(args, sent)
    c = parse_commit(res)
    assert res.exit_status == 3 and not c.done and res.get("stored") is None, res.stdout + res.stderr
    assert {n: (c.certs[n].failed_step, c.certs[n].failed_out, c.certs[n].swapped) for n in NAMES} == {
        n: ("unreceived", "the upload stream ended early", False) for n in NAMES}
    assert not log.exists(), "neither test nor reload ran"
    assert {n: os.readlink(root / "live" / n) for n in NAMES} == {n: f"../archive/{n}/1" for n in NAMES}
    assert temps(root) == [] and sorted(os.listdir(root / "archive" / NAMES[1])) == ["1"]
    assert sorted(os.listdir(root / "live")) == sorted(NAMES)


def test_a_write_that_fails_names_its_certificate_and_removes_every_temp(tmp_path: Path) -> None:
    """`tar` failing to write the second certificate's key (disk full) after writing the rest: that one fails at
    `upload` with tar's words, the others are not uploaded, exit 3, nothing switched, no temp dir (nor the stage
    dir of the new links) left."""
    root, log = multi_root(tmp_path), tmp_path / "log"
    args, data = streamed(root, log)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    real = shutil.which("tar")
    said = "tar: archive/b.example/.tmp-up-tag-2-b.example/privkey.pem: Cannot write: No space left on device"
    (bindir / "tar").write_text(f'#!/bin/sh\n{real} "$@"\necho "{said}" >&2\nexit 2\n')
    (bindir / "tar").chmod(0o755)
    res = sh_in(args, data + b"go\n", env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    c = parse_commit(res)
    assert res.exit_status == 3 and not c.done and res.get("received") is None, res.stdout + res.stderr
    assert (c.certs["b.example"].failed_step, c.certs["b.example"].failed_out) == ("upload", said)
    assert [c.certs[n].failed_step for n in ("a.example", "c.example")] == ["unreceived", "unreceived"]
    assert not log.exists()
    assert {n: os.readlink(root / "live" / n) for n in NAMES} == {n: f"../archive/{n}/1" for n in NAMES}
    assert temps(root) == [] and sorted(os.listdir(root / "live")) == sorted(NAMES)
