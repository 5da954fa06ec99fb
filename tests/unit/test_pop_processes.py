"""What a POP pays per deploy and per discover (issues 13 §1 and 17), counted, never timed: the processes
one run of each POP script starts (strace -f), and the results of the one-pass paths (many certificates
at once: the certbot conversion, the real paths, the key check) against the per-item paths they replace."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmgr.deploy import COMMIT_SH, INSPECT_SH, ROLLBACK_SH, sha256sums
from certmgr.deploy.model import parse_commit, parse_inspection, parse_rollback
from certmgr.deploy.shell import SESSION_SH
from certmgr.deploy.steps import upload_archive
from certmgr.discover import collect
from certmgr.remote import Result, parse_kv, sh_command
from tests.unit.test_deploy import material
from tests.unit.test_deploy_txn import multi_root
from tests.unit.test_discover import _leaf

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (counts processes)")

KINDS = ("cert", "chain", "fullchain", "privkey")


def names(k: int) -> tuple[str, ...]:
    return tuple(f"n{i}.example" for i in range(k))


def traced(argv: list[str], data: bytes = b"",
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], int]:
    """Run argv under `strace -f`; (its result, how many processes it and its descendants were)."""
    with tempfile.TemporaryDirectory() as t:
        log = Path(t) / "trace"
        proc = subprocess.run([shutil.which("strace") or "strace", "-f", "-qq", "-e", "trace=process", "-o", str(log), *argv], input=data,
                              capture_output=True, timeout=60, check=False, env=env)
        pids = {line.split()[0] for line in log.read_text().splitlines() if line.strip()}
    return proc, len(pids)


def as_result(proc: subprocess.CompletedProcess[bytes]) -> Result:
    out = proc.stdout.decode()
    return Result(exit_status=proc.returncode, stdout=out, stderr=proc.stderr.decode(), fields=parse_kv(out))


def certbot_layout(root: Path, ns: tuple[str, ...]) -> None:
    """Turn multi_root's version 1 of each name into certbot's layout: archive/<n>/{kind}1.pem, live/<n>/ links."""
    for n in ns:
        os.unlink(root / "live" / n)
        (root / "live" / n).mkdir()
        for kind in KINDS:
            src = root / "archive" / n / "1" / f"{kind}.pem"
            (root / "archive" / n / f"{kind}1.pem").write_bytes(src.read_bytes())
            os.symlink(f"../../archive/{n}/{kind}1.pem", root / "live" / n / f"{kind}.pem")
        shutil.rmtree(root / "archive" / n / "1")


def streamed_commit(root: Path, ns: tuple[str, ...], *, conv: str = "", test: str = "/bin/true",
                    reload: str = "/bin/true", bad_sum: str = "",
                    tmp: str = ".tmp-up-tag-0a1b2c3d4e5f-",
                    env: dict[str, str] | None = None,
                    seen: dict[str, str] | None = None) -> tuple[Result, int]:
    """One commit.sh of version 2 of every name, its files on stdin (as deploy sends them); (result, processes).
    `bad_sum`: that name's sums announce other bytes (its upload fails verification). Each upload's temp dir is
    `tmp` + its version, as deploy names them (txn.py): one prefix for the run, so stored by one rename.ul.
    Each live link's target goes ahead of its sums (steps.link_line), as inspect read it: now, or `seen`'s."""
    five: list[list[str]] = []
    uploads = []
    for n in ns:
        m = material((n,))
        sums = sha256sums(m) if n != bad_sum else sha256sums(material((n,)))
        live = root / "live" / n
        target = (seen or {}).get(n) or (os.readlink(live) if live.is_symlink() else "")
        five.append([n, f"{tmp}2", "2", (f"link {target}\n" if target else "") + sums, conv])
        uploads.append((n, f"{tmp}2", 2, m.files()))
    data = upload_archive(uploads, mtime=0)
    args = [str(root), *five[0], test, reload, "", "tag", "stamp", "5", "", "", str(len(data)),
            *[a for f in five[1:] for a in f]]
    proc, count = traced(["sh", "-c", sh_command(COMMIT_SH, args)], data + b"go\n", env)
    return as_result(proc), count


# A commit in certmgr's layout pays, per POP: the login shell (and strace's own sh), flock, `head -c` and `tar`
# (the whole upload: every file and every staged live link, their dirs and modes), one sha256sum, one sync of the
# uploads, one `mv -t` for every swap, one sync after the swaps, the test and the reload (each exec'd in its
# command substitution: one process), and one `rm` of the stage dir; no readlink while every live link still
# leads where inspect saw it. The renames that store each version (each lineage its own directory): one
# `mv -T` for one certificate, ONE `rename.ul` (util-linux) for two or more.
ONE_CERT = 14  # was 15 before inspect's reading of the live links stood in for a readlink, 17 before tar made
# the temp dirs and gave the modes (no mkdir, no chmod), 18 before the one-archive upload and the batched swap
# (issue 13 §1, third pass), 23 before
PER_CERT = 0  # was 1 (the store's `mv -T` per certificate), 7 before that: four `head -c`, ln + mv
# certbot's layout converted, per certificate: the store's rename, the rename of the converted copy and the
# swap's two renames (its link comes in the archive); per POP one more mkdir, chmod and sync, and the copies of
# certbot's files: one tar into an archive file, one out of it, one rm (commit.sh copy_all; four `cp` each before).
ONE_CONVERTED = 24  # was 26 before the upload's own mkdir and chmod went, 27 before one tar copied every conversion
PER_CONVERTED = 4  # was 8 (four `cp`), 13 before that
# rollback.sh (certificates that did not verify): per certificate one `ln` (its link staged), then one `mv -t`
# for all, one sync; per POP one mkdir and one rm of the stage dir (one certificate: ln + mv, no stage dir)
ONE_ROLLBACK = 14
PER_ROLLBACK = 1  # was 3: ln, mv and a sync of live/ each


def test_a_commit_of_one_certificate_starts_few_processes(tmp_path: Path) -> None:
    """One certificate in certmgr's layout: stored, swapped, tested and reloaded with at most 14 processes."""
    root = multi_root(tmp_path, names(1))
    res, count = streamed_commit(root, names(1))
    assert parse_commit(res).done, res.stdout + res.stderr
    assert count <= ONE_CERT, count


def test_a_live_link_changed_since_inspect_is_read_again(tmp_path: Path) -> None:
    """The rollback target is inspect's reading only while the link still leads to that directory: one changed
    since (another version made live meanwhile) or leading nowhere is read by readlink — what it points at
    now is what a failed test switches back to, and what the commit reports as `prev`."""
    fresh = multi_root(tmp_path / "fresh", names(2))
    _, trusted = streamed_commit(fresh, names(2), test="/bin/false")
    root = multi_root(tmp_path / "stale", names(2))
    a, b = names(2)
    shutil.copytree(root / "archive" / a / "1", root / "archive" / a / "0")  # the version live when inspect ran
    res, count = streamed_commit(root, names(2), seen={a: f"../archive/{a}/0", b: f"../archive/{b}/9"},
                                 test="/bin/false")
    c = parse_commit(res)
    assert c.certs[a].prev == f"../archive/{a}/1" and c.certs[b].prev == f"../archive/{b}/1", res.stdout
    assert os.readlink(root / "live" / a) == f"../archive/{a}/1"  # the test failed: switched back to it, not to 0
    assert os.readlink(root / "live" / b) == f"../archive/{b}/1"
    assert count > trusted, (count, trusted)


def test_further_certificates_add_no_process(tmp_path: Path) -> None:
    """Ten certificates in one commit cost no process per certificate more than one: no per-certificate
    upload write, rename into the store, link, swap, mkdir, chmod, sync, readlink or subshell."""
    root = multi_root(tmp_path, names(10))
    res, count = streamed_commit(root, names(10))
    c = parse_commit(res)
    assert c.done, res.stdout + res.stderr
    assert all(c.certs[n].prev == f"../archive/{n}/1" for n in names(10))
    assert all(c.certs[n].swapped and c.certs[n].failed_step is None for n in names(10)), res.stdout
    for n in names(10):
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"
        assert sorted(os.listdir(root / "archive" / n)) == ["1", "2"]
        assert sorted(os.listdir(root / "archive" / n / "2")) == sorted(f"{k}.pem" for k in KINDS)
        assert stat.S_IMODE((root / "archive" / n / "2" / "privkey.pem").stat().st_mode) == 0o600
    # + 2: the readlink of 2+ links runs in a subshell; dash writes a here-document larger than a pipe (the
    # 40 sums lines) from a child
    assert count <= ONE_CERT + 9 * PER_CERT + 2, count


@pytest.mark.parametrize("renamer", ["none", "renames-nothing", "renames-one-then-fails"])
def test_the_store_renames_never_trust_rename_ul(tmp_path: Path, renamer: str) -> None:
    """Without util-linux's rename.ul, or with one that says it renamed what it did not (or fails part-way),
    every version is still stored by `mv -T` one by one and swapped: what is on disk decides, not its status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "tar", "sha256sum", "sync", "mv", "rm", "readlink", "mkdir", "chmod", "flock", "head",
                 "base64", "true", "find", "ln", "cat", "cp", "cmp", "stat", "date", "sleep"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if renamer == "renames-nothing":
        (bin_dir / "rename.ul").write_text("#!/bin/sh\nexit 0\n")
    elif renamer == "renames-one-then-fails":
        (bin_dir / "rename.ul").write_text('#!/bin/sh\nshift 4\nmv -T -- "$1" "${1%/*}/2"\nexit 1\n')
    if renamer != "none":
        (bin_dir / "rename.ul").chmod(0o755)
    ns = names(4)
    root = multi_root(tmp_path, ns)
    res, _ = streamed_commit(root, ns, env={"PATH": str(bin_dir)})
    c = parse_commit(res)
    assert c.done, res.stdout + res.stderr
    for n in ns:
        assert c.certs[n].swapped and c.certs[n].failed_step is None, res.stdout
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"
        assert sorted(os.listdir(root / "archive" / n)) == ["1", "2"]


def test_a_converting_commit_prepares_every_copy_at_once(tmp_path: Path) -> None:
    """Converting certbot's layout of ten lineages: at most 8 processes per certificate beyond one's 27."""
    one = tmp_path / "one"
    one.mkdir()
    root = multi_root(one, names(1))
    certbot_layout(root, names(1))
    res, count1 = streamed_commit(root, names(1), conv="1")
    assert parse_commit(res).done and count1 <= ONE_CONVERTED, (count1, res.stdout + res.stderr)
    ten = tmp_path / "ten"
    ten.mkdir()
    root = multi_root(ten, names(10))
    certbot_layout(root, names(10))
    res, count = streamed_commit(root, names(10), conv="1")
    assert parse_commit(res).done, res.stdout + res.stderr
    assert count <= ONE_CONVERTED + 9 * PER_CONVERTED + 1, count  # + 1: the sums' here-document (above)


def test_a_rollback_of_many_certificates_renames_them_all_with_one_mv(tmp_path: Path) -> None:
    """rollback.sh switching ten certificates back: at most one process per certificate beyond one's 14 (its
    staged link), each live/<name> back on its version, no stage dir left."""
    def rollback(k: int) -> tuple[Path, int]:
        ns = names(k)
        root = multi_root(tmp_path / str(k), ns)
        (root / "archive" / ".certmgr.lock").touch()
        for n in ns:
            (root / "archive" / n / "2").mkdir()
            os.unlink(root / "live" / n)
            os.symlink(f"../archive/{n}/2", root / "live" / n)
        args = [str(root), ns[0], f"../archive/{ns[0]}/1", "/bin/true", "/bin/true", "5", "", ""]
        for n in ns[1:]:
            args += [n, f"../archive/{n}/1"]
        proc, count = traced(["sh", "-c", sh_command(ROLLBACK_SH, args)])
        res = parse_rollback(as_result(proc))
        assert res.rolled_back == {n: True for n in ns} and res.reload_rc == 0, proc.stdout
        assert {n: os.readlink(root / "live" / n) for n in ns} == {n: f"../archive/{n}/1" for n in ns}
        assert sorted(os.listdir(root / "live")) == sorted(ns)
        return root, count

    (tmp_path / "1").mkdir()
    (tmp_path / "10").mkdir()
    _, one = rollback(1)
    _, ten = rollback(10)
    assert one <= ONE_ROLLBACK, one
    assert ten <= ONE_ROLLBACK + 9 * PER_ROLLBACK + 2, ten  # + 2: mkdir and rm of the stage dir (2+ links)


INSPECT_ONE = 4  # sh ×2, subshell + readlink; was + one base64 per certificate for every K


@pytest.mark.parametrize("k", [1, 3, 4, 10])
def test_inspect_reads_every_link_and_fullchain_in_a_few_processes(tmp_path: Path, k: int) -> None:
    """Inspecting K certificates in certmgr's layout: one readlink (in a subshell) for every link; the live
    fullchains by one base64 each up to 3, by ONE tar and ONE base64 (in a subshell) from 4 — each one's own bytes."""
    ns = names(k)
    root = multi_root(tmp_path, ns)
    (root / "archive" / ".certmgr.lock").touch()
    proc, count = traced(["sh", "-c", sh_command(INSPECT_SH, [str(root), ns[0], "/bin/true", "", "5", "", *ns[1:]])])
    state = parse_inspection(as_result(proc))
    assert {n: (s.layout, s.target) for n, s in state.certs.items()} == {n: ("link", f"../archive/{n}/1") for n in ns}
    assert {n: s.fullchain for n, s in state.certs.items()} == {
        n: (root / "archive" / n / "1" / "fullchain.pem").read_bytes() for n in ns}
    if k <= 3:
        assert count <= INSPECT_ONE + k, count
        assert "fullchains_tar_b64" not in proc.stdout.decode()
    else:
        assert count <= INSPECT_ONE + 3, count  # subshell, tar, base64: whatever K


def test_inspect_reads_certbot_links_of_many_lineages_exactly(tmp_path: Path) -> None:
    """certbot's four links of each of 20 lineages (one read by one readlink) name each one's own version."""
    ns = names(20)
    root = multi_root(tmp_path, ns)
    certbot_layout(root, ns[::2])
    for n in ns[::2]:  # a different certbot version per lineage: the answer must not be shifted
        for kind in KINDS:
            k = 3 + ns.index(n)
            os.rename(root / "archive" / n / f"{kind}1.pem", root / "archive" / n / f"{kind}{k}.pem")
            os.unlink(root / "live" / n / f"{kind}.pem")
            os.symlink(f"../../archive/{n}/{kind}{k}.pem", root / "live" / n / f"{kind}.pem")
    proc, _ = traced(["sh", "-c", sh_command(INSPECT_SH, [str(root), ns[0], "", "", "5", "", *ns[1:]])])
    res = as_result(proc)
    state = parse_inspection(res)
    for n in ns:
        s = state.certs[n]
        assert s.fullchain == (root / "live" / n / "fullchain.pem").read_bytes()  # through certbot's links too
        if n in ns[::2]:
            k = 3 + ns.index(n)
            assert s.layout == "certbot"
            assert {kind: s.fields[f"certbot_{kind}"] for kind in KINDS} == {
                kind: [f"{kind}{k}.pem"] for kind in KINDS}, (n, res.stdout)
        else:
            assert (s.layout, s.target) == ("link", f"../archive/{n}/1")


def test_fifty_certbot_lineages_are_converted_whole_and_switched_back_exactly(tmp_path: Path) -> None:
    """50 lineages in certbot's layout in one commit: each gets archive/<n>/1/ with certbot's bytes (keys 0600),
    live/<n> -> ../archive/<n>/2, no temp or set-aside dir left; a failing test points each back at its copy."""
    ns = names(50)
    root = multi_root(tmp_path, ns)
    certbot_layout(root, ns)
    before = {n: {k: (root / "archive" / n / f"{k}1.pem").read_bytes() for k in KINDS} for n in ns}
    res, _ = streamed_commit(root, ns, conv="1")
    c = parse_commit(res)
    assert c.done, res.stdout + res.stderr
    for n in ns:
        assert (c.certs[n].converted, c.certs[n].convdir, c.certs[n].prev) == ("1", "1", f"../archive/{n}/1")
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"
        copy = root / "archive" / n / "1"
        assert {k: (copy / f"{k}.pem").read_bytes() for k in KINDS} == before[n]
        assert {k: stat.S_IMODE((copy / f"{k}.pem").stat().st_mode) for k in KINDS} == {
            "cert": 0o644, "chain": 0o644, "fullchain": 0o644, "privkey": 0o600}
        assert stat.S_IMODE(copy.stat().st_mode) == 0o755
        assert [e for e in os.listdir(root / "archive" / n) if e.startswith(".")] == []
    assert [e for e in os.listdir(root / "live") if e.startswith(".")] == []
    # the same again from certbot's layout, with a test that fails: every lineage back on certbot's copy
    again = tmp_path / "again"
    again.mkdir()
    root = multi_root(again, ns)
    certbot_layout(root, ns)
    before = {n: {k: (root / "archive" / n / f"{k}1.pem").read_bytes() for k in KINDS} for n in ns}
    res, _ = streamed_commit(root, ns, conv="1", test="/bin/false")
    c = parse_commit(res)
    assert res.exit_status == 4 and not c.done, res.stdout + res.stderr
    for n in ns:
        assert c.certs[n].rolled_back is True
        assert os.readlink(root / "live" / n) == f"../archive/{n}/1"
        assert (root / "live" / n / "fullchain.pem").read_bytes() == before[n]["fullchain"]


def test_a_conversion_that_fails_for_one_lineage_fails_only_that_one(tmp_path: Path) -> None:
    """certbot's files missing for one lineage of five: that one fails at "convert" (its live dir untouched),
    the others convert and swap, and no temp dir is left."""
    ns = names(5)
    root = multi_root(tmp_path, ns)
    certbot_layout(root, ns)
    os.unlink(root / "archive" / ns[2] / "chain1.pem")
    res, _ = streamed_commit(root, ns, conv="1")
    c = parse_commit(res)
    assert c.done, res.stdout + res.stderr
    assert c.certs[ns[2]].failed_step == "convert" and "chain1.pem" in c.certs[ns[2]].failed_out
    assert (root / "live" / ns[2]).is_dir() and not (root / "live" / ns[2]).is_symlink()
    assert not (root / "archive" / ns[2] / "1").exists()
    for n in ns[:2] + ns[3:]:
        assert c.certs[n].swapped and os.readlink(root / "live" / n) == f"../archive/{n}/2"
    assert [e for n in ns for e in os.listdir(root / "archive" / n) if e.startswith(".tmp")] == []


def test_inspect_removes_certbots_old_directory_left_after_a_finished_conversion(tmp_path: Path) -> None:
    """A commit that died after both renames of a conversion but before its one `rm` of certbot's old directories
    (it waits for the sync of live/): the next inspect removes the litter and reports the link, nothing restored."""
    ns = names(2)
    root = multi_root(tmp_path, ns)
    (root / "archive" / ".certmgr.lock").touch()
    old = root / "live" / f".{ns[0]}.certbot-old"
    old.mkdir()
    os.symlink(f"../../archive/{ns[0]}/cert1.pem", old / "cert.pem")
    proc, _ = traced(["sh", "-c", sh_command(INSPECT_SH, [str(root), ns[0], "", "", "5", "", ns[1]])])
    res = as_result(proc)
    state = parse_inspection(res)
    assert not old.exists() and not old.is_symlink()
    assert state.restored == () and state.certs[ns[0]].target == f"../archive/{ns[0]}/1"


def test_a_lineage_that_fails_verification_leaves_no_prepared_conversion(tmp_path: Path) -> None:
    """Conversions are prepared before the uploads' per-certificate checks: the one whose upload fails its SHA-256
    fails at "verify", keeps certbot's directory, and leaves no temp copy; the others convert."""
    ns = names(3)
    root = multi_root(tmp_path, ns)
    certbot_layout(root, ns)
    res, _ = streamed_commit(root, ns, conv="1", bad_sum=ns[1])
    c = parse_commit(res)
    assert c.done and c.certs[ns[1]].failed_step == "verify", res.stdout + res.stderr
    assert (root / "live" / ns[1]).is_dir() and not (root / "live" / ns[1]).is_symlink()
    # (its upload's own temp dir stays, as always, for this controller's next commit to sweep)
    assert [e for e in os.listdir(root / "archive" / ns[1]) if e.startswith(".tmp-1-conv") or e == "1"] == []
    assert [os.readlink(root / "live" / n) for n in (ns[0], ns[2])] == [f"../archive/{n}/2" for n in (ns[0], ns[2])]


# ---------------------------------------------------------------------------- discover


def _sh(script: str, *args: str) -> tuple[bytes, int]:
    proc, count = traced(["sh", "-c", script, "certmgr", *args])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, count


def _fleet(tmp: Path, k: int) -> tuple[list[str], list[str], list[str]]:
    """k certificate files (each behind a symlink) and their keys; (certificate links, keys, public key PEMs)."""
    certs: list[str] = []
    keys: list[str] = []
    pubs: list[str] = []
    for i in range(k):
        cert, key = _leaf(f"n{i}.example")
        d = tmp / f"v{i}"
        d.mkdir()
        (d / "fullchain.pem").write_bytes(cert)
        (d / "privkey.pem").write_bytes(key)
        (d / "privkey.pem").chmod(0o600)
        link = tmp / f"site{i}.pem"
        link.symlink_to(d / "fullchain.pem")
        certs.append(str(link))
        keys.append(str(d / "privkey.pem"))
        pubs.append(x509.load_pem_x509_certificate(cert).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode().strip())
    return certs, keys, pubs


def test_reading_many_certificate_files_resolves_every_real_path_with_one_readlink(tmp_path: Path) -> None:
    """40 configured certificate files behind symlinks: each one's real path, in order, from a run of at most
    five processes (sh ×2, readlink, awk, base64), not one readlink per file."""
    certs, _, _ = _fleet(tmp_path, 40)
    out, count = _sh(collect.SCRIPT, "65536", "0", str(len(certs)), str(tmp_path / "live"), *certs)
    tokens = out.split(b"\0")
    assert [tokens[i + 1:i + 4] for i in range(0, 4 * 40, 4)] == [[str(i).encode(), b"ok", b""] for i in range(40)]
    start = tokens.index(b"reals")
    assert tokens[start + 1:tokens.index(b"endreals")] == [str(tmp_path / f"v{i}" / "fullchain.pem").encode()
                                                            for i in range(40)]
    assert count <= 5, count


def test_checking_many_keys_that_all_match_is_one_openssl(tmp_path: Path) -> None:
    """30 keys, each with its certificate's path: all "match" from one openssl process (plus the shells)."""
    certs, keys, pubs = _fleet(tmp_path, 30)
    args = [str(len(keys)), *[a for k, p in zip(keys, pubs, strict=True) for a in (k, p)], *certs]
    out, count = _sh(collect.KEY_SCRIPT, *args)
    assert out.split(b"\0") == [f for i in range(30) for f in (b"key", str(i).encode(), b"match")] + [b"done", b""]
    assert count <= 3, count


def test_one_mismatched_key_among_many_is_told_exactly(tmp_path: Path) -> None:
    """30 keys, one of them another certificate's, one missing: the one-process check refuses, every key is
    then checked on its own — the verdicts are exactly those of the per-key check without certificate paths."""
    certs, keys, pubs = _fleet(tmp_path, 30)
    keys[7] = keys[8]
    keys[20] = str(tmp_path / "gone.pem")
    pairs = [a for k, p in zip(keys, pubs, strict=True) for a in (k, p)]
    fast, _ = _sh(collect.KEY_SCRIPT, str(len(keys)), *pairs, *certs)
    slow, _ = _sh(collect.KEY_SCRIPT, str(len(keys)), *pairs)
    verdicts = fast.split(b"\0")[2:-2:3]
    assert fast == slow
    assert verdicts[7] == b"mismatch" and verdicts[20] == b"missing"
    assert {v for i, v in enumerate(verdicts) if i not in (7, 20)} == {b"match"}


# prune.sh, once per POP for every certificate deployed there: the login shell (and strace's sh), flock, one
# readlink of every live link (two with its subshell, for 2+ links), one `mv` per version removed, one `rm` of
# them all. It was one SSH channel per certificate, each with a readlink and two `sort` pipelines.
ONE_PRUNE = 6  # sh, sh, flock, readlink, mv, rm (was 13 per certificate, and an SSH channel each)
PER_PRUNE = 1  # the version's rename


def prune_roots(tmp: Path, ns: tuple[str, ...], versions: int) -> Path:
    """Every name with versions 1 … `versions` in the archive, the newest live."""
    root = multi_root(tmp, ns)
    for n in ns:
        for v in range(2, versions + 1):
            shutil.copytree(root / "archive" / n / "1", root / "archive" / n / str(v))
        os.unlink(root / "live" / n)
        os.symlink(f"../archive/{n}/{versions}", root / "live" / n)
    return root


@pytest.mark.parametrize("k", [1, 5])
def test_one_prune_of_many_certificates_renames_each_old_version_and_removes_them_with_one_rm(tmp_path: Path,
                                                                                               k: int) -> None:
    """Keeping 2 of 3 versions of k certificates: k renames, one readlink and one rm, whatever k; each certificate's
    own section says what went."""
    from certmgr.deploy import PRUNE_SH
    from certmgr.deploy.model import sections

    ns = names(k)
    root = prune_roots(tmp_path, ns, 3)
    proc, count = traced(["sh", "-c", sh_command(PRUNE_SH, [str(root), "2", "5", "", "", *ns])])
    res = as_result(proc)
    assert res.exit_status == 0, res.stderr
    _, per = sections(res)
    assert {n: (per[n].get("removed"), per[n].get("kept_live")) for n in ns} == {n: (["1"], ["3"]) for n in ns}
    assert all(sorted(os.listdir(root / "archive" / n)) == ["2", "3"] for n in ns)
    assert count <= ONE_PRUNE + PER_PRUNE * (k - 1) + (k > 1), count  # readlink's subshell for 2+ links


def test_prune_orders_versions_as_numbers(tmp_path: Path) -> None:
    """Versions 1 … 12, 11 live, keeping 3: 12, 11 and 10 stay (and 10 is the one before live); 1 … 9 go — by number,
    not by text (a text order would keep 9 and drop 10, 11, 12)."""
    from certmgr.deploy import PRUNE_SH
    from certmgr.deploy.model import sections

    root = prune_roots(tmp_path, ("a.example", "b.example"), 12)
    os.unlink(root / "live" / "a.example")
    os.symlink("../archive/a.example/11", root / "live" / "a.example")
    proc, _ = traced(["sh", "-c", sh_command(PRUNE_SH, [str(root), "3", "5", "", "", "a.example", "b.example"])])
    _, per = sections(as_result(proc))
    assert sorted(int(v) for v in per["a.example"]["removed"]) == list(range(1, 10))
    assert per["a.example"]["kept_live"] == ["11"] and per["b.example"]["kept_live"] == ["12"]
    assert sorted(os.listdir(root / "archive" / "a.example"), key=int) == ["10", "11", "12"]
    assert sorted(os.listdir(root / "archive" / "b.example"), key=int) == ["10", "11", "12"]


def test_a_session_step_reads_its_arguments_without_a_process() -> None:
    """session.sh reads a step's arguments with the shell's `read`, line by line: a step costs its subshell only,
    whether its quoted arguments hold newlines (commit's SHA-256 lines) or not — no `head -c` for either."""
    one = shlex.join(["a b", "c"]).encode()
    multi = shlex.join(["a\nb", "c\n", "\nd"]).encode()
    by_line = b"".join(f"{i} 0 -\n".encode() + one + b"\n" for i in (1, 2))
    lines = multi.count(b"\n") + 1
    by_lines = b"".join(f"{i} 0 ={lines}\n".encode() + multi + b"\n" for i in (1, 2))
    counts = []
    for data in (by_line, by_lines):
        proc, count = traced(["sh", "-c", SESSION_SH, "certmgr", "M", 'printf "%s|" "$@"', ":"], data)
        assert proc.returncode == 0, proc
        counts.append(count)
        if data is by_lines:
            assert proc.stdout == b"a\nb|c\n|\nd|\nM=0\n\nM=0\n", proc
    assert counts[0] <= 3 and counts[1] == counts[0], counts  # sh and a subshell per step
