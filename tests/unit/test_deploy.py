"""Unit tests for certmgr.deploy: the remote sh scripts run locally, and the orchestration over a local fake host."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import shutil
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmgr import remote as remote_mod
from certmgr.deploy import (
    COMMIT_SH,
    INSPECT_SH,
    PRUNE_SH,
    ROLLBACK_SH,
    HostOutcome,
    Status,
    certbot_version,
    command_label,
    deploy,
    key_owner_matches,
    next_version,
    sha256sums,
    sni_names,
    version_of_target,
)
from certmgr.deploy import plan as plan_mod
from certmgr.deploy.model import parse_commit
from certmgr.errors import UsageError
from certmgr.inventory import Certificate, Host, Inventory
from certmgr.material import CertMaterial, serial_text
from certmgr.remote import Result, Timeouts, parse_kv, sh_command
from certmgr.scan import Probe
from certmgr.store import Store
from lab import pki

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
NAME = "a.example"
_CA = pki.make_ca("unit test CA", not_before=NOW - dt.timedelta(days=30))


def material(domains: Sequence[str] = (NAME,)) -> CertMaterial:
    """A leaf valid at NOW from the unit test CA (which `trusted_ca` puts in the inventory's trust)."""
    leaf = pki.make_leaf(_CA, list(domains), not_before=NOW - dt.timedelta(hours=1),
                         not_after=NOW + dt.timedelta(days=90))
    return CertMaterial(cert=leaf.cert_pem, chain=_CA.cert_pem, privkey=leaf.key_pem)


def trusted_ca(tmp: Path) -> tuple[Path, ...]:
    """The unit test CA as the inventory's `[defaults] trust`, so deploy's certcheck lets its leaves go out."""
    path = tmp / "unit-test-ca.pem"
    path.write_bytes(_CA.cert_pem)
    return (path,)


def sh(script: str, *args: str) -> Result:
    """Run a deploy script exactly as the remote login shell would: `sh -c "<sh_command>"`."""
    import subprocess

    proc = subprocess.run(["sh", "-c", sh_command(script, args)], capture_output=True, text=True, timeout=30,
                          check=False)
    return Result(exit_status=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, fields=parse_kv(proc.stdout))


def certbot_root(tmp: Path, name: str = NAME, k: int = 1) -> tuple[Path, CertMaterial]:
    """A cert root in certbot's layout: archive/<name>/{kind}K.pem and live/<name>/ of relative links."""
    root = tmp / "le"
    (root / "archive" / name).mkdir(parents=True)
    (root / "live" / name).mkdir(parents=True)
    m = material()
    for kind, data in (("cert", m.cert), ("chain", m.chain), ("fullchain", m.fullchain), ("privkey", m.privkey)):
        (root / "archive" / name / f"{kind}{k}.pem").write_bytes(data)
        os.symlink(f"../../archive/{name}/{kind}{k}.pem", root / "live" / name / f"{kind}.pem")
    return root, m


def upload(root: Path, tmp: str, m: CertMaterial, name: str = NAME) -> None:
    d = root / "archive" / name / tmp
    d.mkdir()
    for fname, data in m.files().items():
        (d / fname).write_bytes(data)
        (d / fname).chmod(0o600 if fname == "privkey.pem" else 0o644)


def linked_root(tmp: Path, versions: int = 1, name: str = NAME) -> Path:
    """A cert root in certmgr's layout with `versions` version dirs, the last one live."""
    root = tmp / "le"
    (root / "live").mkdir(parents=True)
    (root / "archive" / name).mkdir(parents=True)
    for v in range(1, versions + 1):
        upload(root, str(v), material(), name)
    os.symlink(f"../archive/{name}/{versions}", root / "live" / name)
    return root


# ---------------------------------------------------------------------------- the scripts, run locally


def test_inspect_reports_certbot_layout_versions_and_test_result(tmp_path: Path) -> None:
    """INSPECT names the layout, every version number in archive/, the live fullchain's SHA-256 and the test result."""
    root, m = certbot_root(tmp_path, k=3)
    (root / "archive" / NAME / "7").mkdir()
    (root / "archive" / NAME / ".tmp-8-abc").mkdir()
    res = sh(INSPECT_SH, str(root), NAME, "echo 'config ok'; true")
    f = res.fields
    assert f["layout"] == ["certbot"]
    assert f["certbot_fullchain"] == ["fullchain3.pem"] and f["certbot_privkey"] == ["privkey3.pem"]
    assert f["version"] == ["7"] and f["certbot_version"] == ["3"]
    assert base64.b64decode(f["fullchain_b64"][0]) == m.fullchain
    assert f["test_rc"] == ["0"] and "test_out" not in f  # output only travels when it explains a failure
    assert next_version(f) == 8 and certbot_version(f, NAME) == (3, None)


def test_inspect_reports_a_failing_test_with_its_text(tmp_path: Path) -> None:
    """A failing preflight comes back as test_rc and the command's own output."""
    root = linked_root(tmp_path, 2)
    res = sh(INSPECT_SH, str(root), NAME, "echo 'nginx: [emerg] unknown directive' >&2; exit 1")
    assert res.get("layout") == "link" and res.get("target") == f"../archive/{NAME}/2"
    assert res.get("test_rc") == "1"
    assert remote_mod.b64text(res.get("test_out") or "") == "nginx: [emerg] unknown directive"


def test_arguments_are_never_shell_syntax(tmp_path: Path) -> None:
    """Metacharacters in arguments and in configured commands stay literal: no injection through quoting."""
    root = linked_root(tmp_path)
    evil = "$(touch PWNED); `touch PWNED2`; touch PWNED3 #"
    res = sh(INSPECT_SH, str(root), NAME, command_string(["sh", "-c", 'printf "%s" "$1"; exit 1', "_", evil]))
    assert remote_mod.b64text(res.get("test_out") or "") == evil
    assert not list(Path.cwd().glob("PWNED*")) and not list(tmp_path.glob("**/PWNED*"))


def command_string(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


def test_commit_swaps_with_one_link_and_sweeps_temps(tmp_path: Path) -> None:
    """COMMIT checks the sums, renames the upload to N, repoints live/<name> and runs test then reload."""
    root = linked_root(tmp_path, 1)
    (root / "archive" / NAME / ".tmp-9-stale").mkdir()
    m = material()
    upload(root, ".tmp-2-aaaaaaaaaaaa", m)
    log = tmp_path / "log"
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-aaaaaaaaaaaa", "2", sha256sums(m), "",
             f"echo test >> {log}", f"echo reload >> {log}")
    assert res.get("done") == "1", res.stdout + res.stderr
    assert res.get("prev") == f"../archive/{NAME}/1" and res.get("stored") == "2"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/2"
    assert (root / "live" / NAME / "fullchain.pem").read_bytes() == m.fullchain
    assert log.read_text() == "test\nreload\n"
    assert sorted(os.listdir(root / "archive" / NAME)) == ["1", "2"]
    assert not [e for e in os.listdir(root / "live") if e != NAME]


def test_commit_refuses_files_whose_sums_differ(tmp_path: Path) -> None:
    """An upload that does not match its SHA-256 is never stored or made live."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, ".tmp-2-bbbbbbbbbbbb", m)
    (root / "archive" / NAME / ".tmp-2-bbbbbbbbbbbb" / "chain.pem").write_bytes(b"truncated")
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-bbbbbbbbbbbb", "2", sha256sums(m), "", "true", "true")
    assert res.get("failed_step") == "verify" and res.exit_status == 3
    assert "chain.pem: FAILED" in remote_mod.b64text(res.get("failed_out") or "")
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"


def test_commit_rolls_back_with_one_rename_when_the_test_fails(tmp_path: Path) -> None:
    """A test failing after the swap points live/<name> back, tests again, and never reloads."""
    root = linked_root(tmp_path, 1)
    (root / "archive" / NAME / "1" / "marker").write_text("only in version 1")
    m = material()
    upload(root, ".tmp-2-cccccccccccc", m)
    test = f"cat {root}/live/{NAME}/marker >/dev/null 2>&1 || {{ echo 'include marker failed'; exit 1; }}"
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-cccccccccccc", "2", sha256sums(m), "", test,
             f"touch {tmp_path}/reloaded")
    assert res.exit_status == 4
    assert res.get("test_rc") == "1" and remote_mod.b64text(res.get("test_out") or "") == "include marker failed"
    assert res.get("rolled_back") == "1" and res.get("retest_rc") == "0"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"
    assert not (tmp_path / "reloaded").exists()
    assert (root / "archive" / NAME / "2").is_dir()  # kept: the next run uses 3


def test_commit_rolls_back_when_reload_fails(tmp_path: Path) -> None:
    """A failing reload also points live/<name> back and reports the reload's text."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, ".tmp-2-dddddddddddd", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-dddddddddddd", "2", sha256sums(m), "", "true",
             "echo 'reload refused'; exit 1")
    assert res.get("reload_rc") == "1" and res.get("rolled_back") == "1" and res.get("retest_rc") == "0"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"


def test_commit_converts_certbot_layout_once(tmp_path: Path) -> None:
    """certbot's live/<name>/ becomes a symlink; its version K is kept as archive/<name>/K/ for rollback."""
    root, old = certbot_root(tmp_path, k=4)
    m = material()
    upload(root, ".tmp-5-eeeeeeeeeeee", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-5-eeeeeeeeeeee", "5", sha256sums(m), "4", "true", "true")
    assert res.get("done") == "1", res.stdout + res.stderr
    assert res.get("converted") == "4" and res.get("prev") == f"../archive/{NAME}/4"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/5"
    kept = root / "archive" / NAME / "4"
    assert (kept / "fullchain.pem").read_bytes() == old.fullchain and (kept / "privkey.pem").read_bytes() == old.privkey
    assert stat.S_IMODE((kept / "privkey.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((kept / "cert.pem").stat().st_mode) == 0o644
    assert sorted(os.listdir(root / "live")) == [NAME]  # certbot's directory is gone, no backup left


def test_point_replaces_a_leftover_temp_link_instead_of_entering_it(tmp_path: Path) -> None:
    """A temp link left by a dead run with the same PID (a link to an old version) never becomes live."""
    root = linked_root(tmp_path, 3)
    script = ROLLBACK_SH.replace("$$", "4242")  # the dead run's PID is ours
    os.symlink(f"../archive/{NAME}/1", root / "live" / f".{NAME}.tmp-4242-back")
    res = sh(script, str(root), NAME, f"../archive/{NAME}/2", "true", "true")
    assert res.get("rolled_back") == "1", res.stdout + res.stderr
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/2"
    assert not (root / "archive" / NAME / "1" / "2").is_symlink()


def test_commit_reports_a_failed_swap_with_the_tools_own_words(tmp_path: Path) -> None:
    """A link that cannot be staged (here: live/ is gone) fails the swap; the tool's own words (mkdir's, making
    the stage dir under live/) are its failed_out."""
    root = linked_root(tmp_path, 1)
    shutil.rmtree(root / "live")
    m = material()
    upload(root, ".tmp-2-hhhhhhhhhhhh", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-hhhhhhhhhhhh", "2", sha256sums(m), "", "true", "true")
    assert res.get("failed_step") == "swap" and res.exit_status == 3
    assert parse_commit(res).certs[NAME].failed_out.startswith("mkdir: cannot create directory"), res.stdout
    assert not (root / "live").exists() and res.get("swapped") is None


def test_commit_gives_the_key_to_the_configured_owner_and_group(tmp_path: Path) -> None:
    """privkey_owner/privkey_group: the uploaded key is chowned (still 0600) before it is stored; the rest is not."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, ".tmp-2-ffffffffffff", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-ffffffffffff", "2", sha256sums(m), "", "true", "true", "nobody:65534")
    assert res.get("done") == "1", res.stdout + res.stderr
    st = os.stat(root / "archive" / NAME / "2" / "privkey.pem")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)
    assert os.stat(root / "archive" / NAME / "2" / "fullchain.pem").st_uid == os.getuid()
    inspect = sh(INSPECT_SH, str(root), NAME, "", "nobody:65534")
    assert inspect.get("key_owner", "").split(":")[2:] == ["65534", "65534"]


def test_commit_refuses_an_owner_it_cannot_set_and_changes_nothing(tmp_path: Path) -> None:
    """A chown that fails (unknown user here; EPERM for a non-root deploy user) stops before anything is stored."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, ".tmp-2-gggggggggggg", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-gggggggggggg", "2", sha256sums(m), "", "true", "true",
             ":certmgr-no-such-group")
    assert res.get("failed_step") == "chown" and res.exit_status == 3
    assert "certmgr-no-such-group" in remote_mod.b64text(res.get("failed_out") or "")
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"
    assert not (root / "archive" / NAME / "2").exists()


@pytest.mark.parametrize(("want", "seen", "ok"), [
    ("", None, True),
    ("", "x:y:1:2", True),
    ("nobody", "nobody:nogroup:65534:65534", True),
    ("65534", "nobody:nogroup:65534:65534", True),
    (":ssl-cert", "root:ssl-cert:0:108", True),
    (":108", "root:ssl-cert:0:108", True),
    ("root:ssl-cert", "root:root:0:0", False),
    (":ssl-cert", None, False),
    ("root", "garbage", False),
])
def test_key_owner_matches(want: str, seen: str | None, ok: bool) -> None:
    assert key_owner_matches(want, seen) is ok


def test_commit_conversion_rolls_back_to_the_certbot_version(tmp_path: Path) -> None:
    """After a conversion, a failing test restores the copy of certbot's version (same bytes nginx had)."""
    root, old = certbot_root(tmp_path, k=1)
    m = material()
    upload(root, ".tmp-2-ffffffffffff", m)
    test = f"grep -q '{old.cert.decode().splitlines()[1]}' {root}/live/{NAME}/cert.pem"
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-2-ffffffffffff", "2", sha256sums(m), "1", test, "true")
    assert res.get("converted") == "1" and res.get("rolled_back") == "1" and res.get("retest_rc") == "0"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"
    assert (root / "live" / NAME / "cert.pem").read_bytes() == old.cert


def test_rollback_script_points_back_tests_and_reloads(tmp_path: Path) -> None:
    """ROLLBACK (after a failed handshake check) restores the previous target, tests, then reloads."""
    root = linked_root(tmp_path, 2)
    res = sh(ROLLBACK_SH, str(root), NAME, f"../archive/{NAME}/1", "true", "echo reloaded")
    assert res.get("rolled_back") == "1" and res.get("retest_rc") == "0" and res.get("reload_rc") == "0"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"


def test_prune_keeps_the_newest_and_the_live_version(tmp_path: Path) -> None:
    """PRUNE removes version dirs older than the newest K, never the live one nor the one before it, nothing else."""
    root = linked_root(tmp_path, 5)
    os.unlink(root / "live" / NAME)
    os.symlink(f"../archive/{NAME}/3", root / "live" / NAME)
    (root / "archive" / NAME / "fullchain1.pem").write_text("certbot's")
    res = sh(PRUNE_SH, str(root), "2", "5", "", "", NAME)
    assert sorted(res.all("removed")) == ["1"] and res.get("kept_live") == "3"
    assert sorted(os.listdir(root / "archive" / NAME)) == ["2", "3", "4", "5", "fullchain1.pem"]
    os.unlink(root / "live" / NAME)
    os.symlink(f"../archive/{NAME}/2", root / "live" / NAME)  # the one before live (1) is gone already
    res = sh(PRUNE_SH, str(root), "2", "5", "", "", NAME)
    assert sorted(res.all("removed")) == ["3"] and res.get("kept_live") == "2"
    assert sorted(os.listdir(root / "archive" / NAME)) == ["2", "4", "5", "fullchain1.pem"]


# ---------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(("argv", "label"), [
    (["sudo", "-n", "/usr/sbin/nginx", "-p", "/x", "-c", "/x/n.conf", "-t"], "nginx -t"),
    (["sudo", "-n", "/usr/sbin/nginx", "-p", "/x", "-s", "reload"], "nginx -s reload"),
    (["sudo", "-n", "systemctl", "reload", "nginx"], "systemctl reload nginx"),
    (["sudo", "-n", "pkill", "-HUP", "-F", "/run/nginx.pid", "-x", "nginx"], "pkill -HUP nginx"),
    (["/usr/local/bin/check-web"], "check-web"),
])
def test_command_label(argv: list[str], label: str) -> None:
    """Messages name a configured command the way an operator would say it."""
    assert command_label(argv) == label


@pytest.mark.parametrize(("fields", "expected"), [
    ({f"certbot_{k}": [f"{k}2.pem"] for k in ("cert", "chain", "fullchain", "privkey")}, (2, None)),
    ({"certbot_cert": ["cert2.pem"], "certbot_chain": ["chain2.pem"], "certbot_fullchain": ["fullchain3.pem"],
      "certbot_privkey": ["privkey2.pem"]},
     (None, "certbot's live/a.example links disagree (cert→2, chain→2, fullchain→3, privkey→2)")),
    ({"certbot_cert": [""], "certbot_chain": ["chain2.pem"]},
     (None, "live/a.example/cert.pem is not a link to archive/a.example/certK.pem")),
])
def test_certbot_version(fields: dict[str, list[str]], expected: tuple[int | None, str | None]) -> None:
    """certbot's four links must agree on one K before the layout is converted."""
    assert certbot_version(fields, NAME) == expected


@pytest.mark.parametrize(("target", "version"), [
    (f"../archive/{NAME}/12", 12), (f"/etc/letsencrypt/archive/{NAME}/3/", 3), ("../archive/other/1", None),
    ("", None), (None, None), (f"../archive/{NAME}/0", None),
])
def test_version_of_target(target: str | None, version: int | None) -> None:
    """Only a link into this lineage's archive names a version."""
    assert version_of_target(target, NAME) == version


@pytest.mark.parametrize("path", ["relative/x", "/etc/../root", "/etc/le$(id)", "/etc/le;rm", "/a b", "/x//y"])
def test_unsafe_remote_paths_are_refused(path: str) -> None:
    """A cert_root with shell metacharacters, '..' or spaces never reaches a remote command."""
    with pytest.raises(remote_mod.DeployError, match="is not acceptable"):
        remote_mod.check_remote_path(path)


def test_sni_names_replace_a_wildcard_label() -> None:
    """A wildcard is verified with a concrete label under it; duplicates collapse."""
    cert = Certificate(name="w", domains=("*.example.org", "example.org"), dns="d", hosts=(), ca="c")
    assert sni_names(cert) == ("certmgr-verify.example.org", "example.org")


def test_outcome_line_and_json() -> None:
    """The terminal line and the JSON of an outcome carry status, serials, version, timings and error."""
    o = HostOutcome(cert=NAME, host="sally", status=Status.ROLLED_BACK, new_serial="bb", old_serial="aa",
                    version=7, error=f"deploy {NAME} → sally: nginx -t failed: \"x\" (rolled back to version 7)",
                    timings=(("connect", 0.1),), elapsed=0.5)
    assert o.line() == (f"rolled back {NAME} → sally v7 serial aa → bb 0.50s [connect 0.10]\n"
                        f"            deploy {NAME} → sally: nginx -t failed: \"x\" (rolled back to version 7)")
    j = o.to_json()
    assert j["status"] == "rolled back" and j["ok"] is False and j["timings"] == {"connect": 0.1}


# ---------------------------------------------------------------------------- orchestration over a fake host
#
# A "host" is a local directory: the scripts run in a local sh, uploads are local writes, the
# reload command copies each live cert to served/<name>.pem, and the prober reads that file.

_TEST = 'for d in "$1"/live/*; do [ -e "$d" ] || continue; [ -r "$d/fullchain.pem" ] || exit 1; done; [ ! -e "$1/broken" ] || { echo broken; exit 1; }'
_RELOAD = 'mkdir -p "$1/served"; for d in "$1"/live/*; do [ -e "$d" ] || continue; cp -L "$d/cert.pem" "$1/served/${d##*/}.pem"; done'


def fake_host(tmp: Path, name: str, tags: tuple[str, ...] = ()) -> Host:
    root = tmp / name / "le"
    (root / "live").mkdir(parents=True)
    (root / "archive").mkdir()
    return Host(name=name, address=str(root), port=22, tags=tags, cert_root=str(root),
                test_command=("sh", "-c", _TEST, "_", str(root)), reload_command=("sh", "-c", _RELOAD, "_", str(root)))


class LocalSession:
    # what the fake `tar` of a fail_upload host says ($2: the first member it was asked for)
    tar_says = "tar: $2: Cannot write: No space left on device"

    def __init__(self, host: Host, fail_upload: bool = False) -> None:
        self.host = host
        self.fail_upload = fail_upload
        self.stdin: bytes | None = None  # for the next run_script (run_streamed's data)

    async def run_streamed(self, script: str, args: Sequence[str], data: bytes, *, step: str,
                           timeout: float | None = None) -> Result:
        """run_script with `data` and the `go` word on the script's stdin (subclasses hook run_script alone)."""
        self.stdin = data + b"go\n"
        try:
            return await self.run_script(script, args, step=step, timeout=timeout)
        finally:
            self.stdin = None

    async def run_script(self, script: str, args: Sequence[str], *, step: str, timeout: float | None = None) -> Result:
        """The script on this machine; on a disk-full host (fail_upload) its `tar` cannot write the first member."""
        env = None
        if self.fail_upload:
            bin_dir = Path(self.host.cert_root).parent / "full-bin"
            bin_dir.mkdir(exist_ok=True)
            (bin_dir / "tar").write_text('#!/bin/sh\ncat >/dev/null\nwhile [ "$1" != -- ]; do shift; done\n'
                                         f'echo "{self.tar_says}" >&2\nexit 2\n')
            (bin_dir / "tar").chmod(0o755)
            env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        data, self.stdin = self.stdin, None
        proc = await asyncio.create_subprocess_exec("sh", "-c", sh_command(script, args), env=env,
                                                    stdin=asyncio.subprocess.PIPE if data is not None else
                                                    asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(data)
        return Result(exit_status=proc.returncode or 0, stdout=out.decode(), stderr=err.decode(),
                      fields=parse_kv(out.decode()))

    async def remove_tree_quietly(self, directory: str) -> None:
        shutil.rmtree(directory, ignore_errors=True)


class FakeFleet:
    """Connector + prober over local fake hosts, recording concurrency and which hosts were contacted."""

    def __init__(self, *, unreachable: frozenset[str] = frozenset(), fail_upload: frozenset[str] = frozenset(),
                 stale: frozenset[str] = frozenset()) -> None:
        self.unreachable = unreachable
        self.fail_upload = fail_upload
        self.stale = stale  # hosts whose "web server" never picks up a new certificate
        self.contacted: list[str] = []
        self.active = 0
        self.peak = 0

    @asynccontextmanager
    async def connector(self, host: Host, *, jump: Host | None, accept_new: bool, timeouts: Timeouts,
                        on_accept: Any = None) -> AsyncIterator[LocalSession]:
        self.contacted.append(host.name)
        if host.name in self.unreachable:
            raise remote_mod.Unreachable(f"connect {host.name} ({host.address}:22): Connection refused (nothing changed)")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.01)
            yield LocalSession(host, fail_upload=host.name in self.fail_upload)
        finally:
            self.active -= 1

    async def prober(self, address: str, port: int, sni: str) -> Probe:
        root = Path(address)
        path = root / "served" / f"{sni}.pem"
        if root.parent.name in self.stale and (root / "served-first" / f"{sni}.pem").exists():
            path = root / "served-first" / f"{sni}.pem"
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            return Probe(address=address, port=port, sni=sni, error="refused")
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        return Probe(address=address, port=port, sni=sni, chain=(der,))


def fleet_inventory(tmp: Path, n: int, canary: int | None = None) -> Inventory:
    hosts = {f"h{i}": fake_host(tmp, f"h{i}", ("canary",) if i == canary else ()) for i in range(n)}
    cert = Certificate(name=NAME, domains=(NAME,), dns="d", hosts=tuple(hosts), ca="c")
    return Inventory(path=tmp / "inv.toml", cas={}, dns={}, hosts=hosts, certificates=(cert,), channels={},
                     trust=trusted_ca(tmp))


def seeded_store(tmp: Path) -> tuple[Store, str]:
    store = Store.open(tmp / "state")
    m = material()
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, m))
    return store, m.info().serial


def run_fleet(inv: Inventory, store: Store, fleet: FakeFleet, **kw: Any) -> dict[str, HostOutcome]:
    kw.setdefault("timeouts", Timeouts(verify=1.0))
    outs = asyncio.run(deploy(inv, store, inv.certificates, now=NOW, connector=fleet.connector,
                              prober=fleet.prober, **kw))
    return {o.host: o for o in outs}


def test_a_pop_without_gnu_tar_fails_at_upload_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tar that rejects receive.sh's options (BusyBox): the certificate fails at upload with tar's own words,
    live unchanged, and the hint names GNU tar."""
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    monkeypatch.setattr(LocalSession, "tar_says", "tar: unrecognized option '--no-wildcards'")
    o = run_fleet(inv, store, FakeFleet(fail_upload=frozenset({"h0"})))["h0"]
    assert o.status == Status.FAILED and o.error is not None
    assert "tar: unrecognized option '--no-wildcards'" in o.error and o.error.endswith("(live unchanged)"), o.error
    assert o.hint == "the upload is one tar archive: h0 needs GNU tar (package tar; docs/deploy.md)"


def test_fleet_deploys_then_skips_and_bounds_parallelism(tmp_path: Path) -> None:
    """Every fake host is deployed at most `parallel` at a time; a second run skips all of them."""
    inv = fleet_inventory(tmp_path, 6)
    store, serial = seeded_store(tmp_path)
    fleet = FakeFleet()
    outs = run_fleet(inv, store, fleet, parallel=2)
    assert {o.status for o in outs.values()} == {Status.DEPLOYED} and fleet.peak == 2
    assert all(o.new_serial == serial and o.version == 1 and o.old_serial is None for o in outs.values())
    again = run_fleet(inv, store, FakeFleet())
    assert {o.status for o in again.values()} == {Status.SKIPPED}


def test_one_unreachable_or_failing_host_never_stops_the_others(tmp_path: Path) -> None:
    """Unreachable and upload-failing hosts become outcomes; the rest deploy; state records each."""
    inv = fleet_inventory(tmp_path, 4)
    store, _ = seeded_store(tmp_path)
    outs = run_fleet(inv, store, FakeFleet(unreachable=frozenset({"h1"}), fail_upload=frozenset({"h2"})))
    assert outs["h1"].status == Status.UNREACHABLE
    assert outs["h1"].error == f"deploy {NAME} → h1: connect h1 ({inv.hosts['h1'].address}:22): Connection refused (nothing changed)"
    assert outs["h2"].status == Status.FAILED
    assert outs["h2"].error is not None and outs["h2"].error.endswith("No space left on device (live unchanged)")
    assert not os.path.lexists(Path(inv.hosts["h2"].cert_root) / "live" / NAME)
    assert not [e for e in os.listdir(Path(inv.hosts["h2"].cert_root) / "archive" / NAME)]
    assert {outs["h0"].status, outs["h3"].status} == {Status.DEPLOYED}
    state = store.load_json(f"state/deploy/{NAME}.json")["hosts"]
    assert {h: s["status"] for h, s in state.items()} == {"h0": "deployed", "h1": "unreachable", "h2": "failed",
                                                           "h3": "deployed"}


def test_failing_canary_holds_the_rest(tmp_path: Path) -> None:
    """When a canary does not verify, no other host is even contacted."""
    inv = fleet_inventory(tmp_path, 4, canary=2)
    store, _ = seeded_store(tmp_path)
    (Path(inv.hosts["h2"].cert_root) / "broken").write_text("")
    fleet = FakeFleet()
    outs = run_fleet(inv, store, fleet)
    assert fleet.contacted == ["h2"]
    assert outs["h2"].status == Status.FAILED and outs["h2"].error is not None
    assert outs["h2"].error == f'deploy {NAME} → h2: config was already broken before deploy: "broken" (nothing changed)'
    assert {outs[h].status for h in ("h0", "h1", "h3")} == {Status.HELD}


def test_canary_by_name_goes_first(tmp_path: Path) -> None:
    """Hosts named in `canary` are contacted before all others."""
    inv = fleet_inventory(tmp_path, 4)
    store, _ = seeded_store(tmp_path)
    fleet = FakeFleet()
    outs = run_fleet(inv, store, fleet, canary=["h3"], parallel=1)
    assert fleet.contacted[0] == "h3" and {o.status for o in outs.values()} == {Status.DEPLOYED}


def test_new_serial_not_served_rolls_back_and_reloads(tmp_path: Path) -> None:
    """If handshakes never show the new serial, the host is switched back, reloaded, and checked for the old one."""
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    root = Path(inv.hosts["h0"].cert_root)
    (root / "served-first").mkdir()
    shutil.copy(root / "served" / f"{NAME}.pem", root / "served-first" / f"{NAME}.pem")
    first = x509.load_pem_x509_certificate((root / "served" / f"{NAME}.pem").read_bytes())
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, material()))
    o = run_fleet(inv, store, FakeFleet(stale=frozenset({"h0"})))["h0"]
    assert o.status == Status.ROLLED_BACK, o.line()
    assert o.old_serial == serial_text(first.serial_number) and o.version == 1
    assert o.error is not None and "not served after 1s" in o.error and o.error.endswith("(rolled back to version 1, reloaded)")
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"
    assert any(e["action"] == "rolled back" for e in store.read_audit())


def test_unknown_hosts_and_bad_options_are_usage_errors(tmp_path: Path) -> None:
    """--hosts naming no inventory host, --parallel 0 and --prune 0 are refused before any connection."""
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    with pytest.raises(UsageError, match=r"^deploy: no host named 'nope' in the inventory$"):
        run_fleet(inv, store, FakeFleet(), hosts=["nope"])
    with pytest.raises(UsageError, match=r"^deploy: --parallel must be at least 1, not 0$"):
        run_fleet(inv, store, FakeFleet(), parallel=0)
    with pytest.raises(UsageError, match=r"^deploy: --prune must keep at least 1 version, not 0$"):
        run_fleet(inv, store, FakeFleet(), prune=0)


def test_hosts_filter_limits_the_targets(tmp_path: Path) -> None:
    """--hosts deploys only to the named hosts."""
    inv = fleet_inventory(tmp_path, 3)
    store, _ = seeded_store(tmp_path)
    fleet = FakeFleet()
    outs = run_fleet(inv, store, fleet, hosts=["h1"])
    assert list(outs) == ["h1"] and fleet.contacted == ["h1"]


# ---------------------------------------------------------------------------- docs/deploy.md examples

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def doc_blocks(tag: str) -> list[str]:
    """Fenced blocks that follow a `<!-- docs-test: TAG -->` marker in docs/deploy.md."""
    import re

    pattern = rf"<!-- docs-test: {tag} -->\n```[a-z]*\n(.*?)```"
    return re.findall(pattern, DOCS.read_text(), flags=re.S)


@pytest.mark.skipif(not os.path.exists("/usr/sbin/visudo"), reason="needs visudo")
def test_docs_sudoers_lines_parse(tmp_path: Path) -> None:
    """Every sudoers example in docs/deploy.md passes `visudo -c`."""
    import subprocess

    from certmgr.deploy.reload import sudoers_line
    from certmgr.model import DEFAULT_RELOAD

    blocks = doc_blocks("sudoers")
    assert len(blocks) == 2  # the defaults (the SIGHUP reload by pkill), the lab's per-POP form
    # the defaults' block allows exactly the default argv, as doctor's hint spells it
    assert sudoers_line("certmgr", DEFAULT_RELOAD).split("NOPASSWD: ")[1] in blocks[0]
    for i, block in enumerate(blocks):
        path = tmp_path / f"sudoers{i}"
        path.write_text(block)
        res = subprocess.run(["/usr/sbin/visudo", "-cf", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr


def test_docs_manual_certbot_conversion_works(tmp_path: Path) -> None:
    """The by-hand conversion in docs/deploy.md leaves the layout deploy would have made, same bytes."""
    import subprocess

    name = "media.hachyderm.test"
    root, old = certbot_root(tmp_path, name, k=3)
    (block,) = doc_blocks("convert")
    res = subprocess.run(["sh", "-eu", "-c", block], cwd=root, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert os.readlink(root / "live" / name) == f"../archive/{name}/3"
    assert (root / "live" / name / "fullchain.pem").read_bytes() == old.fullchain
    assert stat.S_IMODE((root / "archive" / name / "3" / "privkey.pem").stat().st_mode) == 0o600
    assert sorted(os.listdir(root / "live")) == [name]
    res = sh(INSPECT_SH, str(root), name, "true")
    assert res.get("layout") == "link" and version_of_target(res.get("target"), name) == 3


def test_commit_finishes_when_nobody_reads_its_output(tmp_path: Path) -> None:
    """A client gone mid-COMMIT (closed pipe) cannot strand an untested link: the script still tests and reloads."""
    import subprocess

    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, ".tmp-2-abababababab", m)
    args = (str(root), NAME, ".tmp-2-abababababab", "2", sha256sums(m), "", f"sleep 0.3; touch {tmp_path}/tested",
            f"touch {tmp_path}/reloaded")
    import signal
    import time

    proc = subprocess.Popen(["sh", "-c", sh_command(COMMIT_SH, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 10
    while os.readlink(root / "live" / NAME) != f"../archive/{NAME}/2" and time.monotonic() < deadline:
        time.sleep(0.01)  # swapped, test running: the worst moment to lose the client
    proc.stdout.close()  # the SSH channel is gone: every later write gets EPIPE
    os.killpg(proc.pid, signal.SIGHUP)  # and the session is hung up (the login shell dies of it)
    proc.wait(timeout=10)
    while not (tmp_path / "reloaded").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the detached script finishes on its own
    assert (tmp_path / "tested").exists() and (tmp_path / "reloaded").exists()
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/2"


def test_one_preflight_per_host_for_several_certificates(tmp_path: Path) -> None:
    """Two certificates due on a host are one transaction: one preflight, one test after both swaps, one reload."""
    host = fake_host(tmp_path, "h0")
    counting = ("sh", "-c", 'echo x >> "$1/tests.log"; ' + _TEST, "_", host.cert_root)
    reloading = ("sh", "-c", 'echo x >> "$1/reloads.log"; ' + _RELOAD, "_", host.cert_root)
    host = Host(name=host.name, address=host.address, cert_root=host.cert_root, test_command=counting,
                reload_command=reloading)
    certs = tuple(Certificate(name=n, domains=(n,), dns="d", hosts=("h0",), ca="c") for n in ("a.example", "b.example"))
    inv = Inventory(path=tmp_path / "inv.toml", cas={}, dns={}, hosts={"h0": host}, certificates=certs, channels={},
                    trust=trusted_ca(tmp_path))
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        for c in certs:
            store.activate(c.name, store.add_version(c.name, material(c.domains)))
    fleet = FakeFleet()
    outs = asyncio.run(deploy(inv, store, certs, now=NOW, connector=fleet.connector, prober=fleet.prober,
                              timeouts=Timeouts(verify=1.0)))
    assert [(o.cert, o.status) for o in outs] == [("a.example", Status.DEPLOYED), ("b.example", Status.DEPLOYED)]
    # issue 13: was 3 test runs (a commit per certificate, each with its own test and reload)
    assert (Path(host.cert_root) / "tests.log").read_text().count("x") == 2
    assert (Path(host.cert_root) / "reloads.log").read_text().count("x") == 1
    assert fleet.contacted == ["h0"]  # one connection for both


@pytest.mark.parametrize(("when", "trusted", "domains", "why"), [
    (NOW + dt.timedelta(days=91), True, (NAME,), "expired: notAfter 2027-02-25 12:00Z was 1d ago"),
    (NOW, True, ("b.example",), f"SANs differ: missing {NAME}, extra b.example"),
    (NOW, False, (NAME,), "chain does not verify to a trusted root: the chain ends at CN=unit test CA,O=certmgr lab, "
                          "a root that is not trusted (candidates exhausted: chain construction exceeds max depth)"),
])
def test_a_live_version_that_fails_certcheck_is_uploaded_nowhere(tmp_path: Path, when: dt.datetime, trusted: bool,
                                                                 domains: tuple[str, ...], why: str) -> None:
    """A live version that is expired, for other names, or untrusted is refused before any host is contacted."""
    inv = fleet_inventory(tmp_path, 3)
    if not trusted:
        inv = Inventory(path=inv.path, cas={}, dns={}, hosts=inv.hosts, certificates=inv.certificates, channels={})
    store = Store.open(tmp_path / "state")
    m = material(domains)
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, m))
    fleet = FakeFleet()
    outs = asyncio.run(deploy(inv, store, inv.certificates, now=when, connector=fleet.connector, prober=fleet.prober))
    assert fleet.contacted == []
    assert [(o.host, o.status, o.new_serial) for o in outs] == [(h, Status.FAILED, m.info().serial) for h in inv.hosts]
    for o in outs:
        assert o.error == f"deploy {NAME} → {o.host}: version 1 refused: {why} (nothing uploaded)"
        assert o.hint == f"the store's live version may not be served; renew it (`certmgr renew {NAME} --force`), " \
                         "then deploy; `certmgr status` shows the live version"
    for h in inv.hosts.values():
        assert not os.path.lexists(Path(h.cert_root) / "live" / NAME)


def test_a_verify_cut_during_confirmation_says_the_new_serial_was_served() -> None:
    # Every name answered with the new serial, but the confirmation rounds did not fit before the
    # verify timeout: the report must not claim the serial was "not served".
    new = pki.make_leaf(_CA, ["a.example.test", "b.example.test"], not_before=NOW - dt.timedelta(hours=1))
    old = pki.make_leaf(_CA, ["a.example.test"], not_before=NOW - dt.timedelta(hours=1))
    der_new = new.cert.public_bytes(serialization.Encoding.DER)
    der_old = old.cert.public_bytes(serialization.Encoding.DER)
    serial = serial_text(new.cert.serial_number)
    both = {n: Probe(address="127.0.0.1", port=443, sni=n, chain=(der_new,)) for n in ("a.example.test", "b.example.test")}
    text = plan_mod.verify_failure(serial, both, 10)
    assert text.startswith(f"new serial {serial} served on every name but not confirmed within 10s"), text
    one_stale = dict(both, **{"b.example.test": Probe(address="127.0.0.1", port=443, sni="b.example.test", chain=(der_old,))})
    assert plan_mod.verify_failure(serial, one_stale, 10).startswith(f"new serial {serial} not served after 10s")
    refused = {"a.example.test": Probe(address="127.0.0.1", port=443, sni="a.example.test", error="refused")}
    assert plan_mod.verify_failure(serial, refused, 10) == f"new serial {serial} not served after 10s (a.example.test: refused)"
    assert plan_mod.verify_failure(serial, {}, 10) == f"new serial {serial} not served after 10s (nothing)"
