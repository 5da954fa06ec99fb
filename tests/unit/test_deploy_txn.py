"""Unit tests for the per-host transaction (issue 13): the scripts as shipped files (shellcheck, one
test and one reload for K certificates), the typed records, and the orchestration over a fake host."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from certmgr import remote as remote_mod
from certmgr.deploy import COMMIT_SH, INSPECT_SH, ROLLBACK_SH, Status, deploy, sha256sums
from certmgr.deploy import shell as shell_mod
from certmgr.deploy.model import parse_commit, parse_inspection, parse_rollback
from certmgr.inventory import Certificate, Host, Inventory
from certmgr.remote import Timeouts
from certmgr.store import Store
from tests.unit.test_deploy import (
    _RELOAD,
    _TEST,
    NAME,
    NOW,
    FakeFleet,
    fake_host,
    fleet_inventory,
    linked_root,
    material,
    run_fleet,
    seeded_store,
    sh,
    trusted_ca,
    upload,
)

NAMES = ("a.example", "b.example", "c.example")
SCRIPTS_DIR = Path(shell_mod.__file__).parent / "scripts"


def multi_root(tmp: Path, names: tuple[str, ...] = NAMES) -> Path:
    """A cert root in certmgr's layout with version 1 of each name live."""
    root = linked_root(tmp, 1, names[0])
    for n in names[1:]:
        (root / "archive" / n).mkdir(parents=True)
        upload(root, "1", material(), n)
        os.symlink(f"../archive/{n}/1", root / "live" / n)
    return root


def commit_args(root: Path, names: tuple[str, ...], test: str, reload: str) -> list[str]:
    """Upload version 2 of each name and build commit.sh's arguments for all of them."""
    five: list[list[str]] = []
    for n in names:
        m = material((n,))
        upload(root, f".tmp-up-2-{n}", m, n)
        five.append([n, f".tmp-up-2-{n}", "2", sha256sums(m), ""])
    return [str(root), *five[0], test, reload, "", "tag", "stamp", "5", "", "", *[a for f in five[1:] for a in f]]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (lab/requirements-apt.txt)")
@pytest.mark.parametrize("script", [*shell_mod.SCRIPTS, "keyown.sh"])
def test_shipped_scripts_pass_shellcheck(script: str, tmp_path: Path) -> None:
    """Every script deploy runs on a POP, as composed from its files, is clean under `shellcheck -s sh`."""
    text = shell_mod.compose(script)
    path = tmp_path / script
    path.write_text(text)
    proc = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_script_file_is_shipped_and_used() -> None:
    """Each .sh file in certmgr/deploy/scripts is a composed script or included by one (nothing stale ships)."""
    files = {p.name for p in SCRIPTS_DIR.glob("*.sh")}
    used = set(shell_mod.SCRIPTS) | {"keyown.sh"}
    for s in shell_mod.SCRIPTS:
        for line in shell_mod.read(s).splitlines():
            if line.startswith("# certmgr-include:"):
                used |= set(line.split(":", 1)[1].split())
    assert files == used
    assert "certmgr-include" not in COMMIT_SH and "trap '' HUP PIPE" in COMMIT_SH and "trap '' HUP PIPE" in ROLLBACK_SH


def test_inspect_reports_every_certificate_and_tests_once(tmp_path: Path) -> None:
    """One inspect run answers for every certificate in its own section and runs the test command once."""
    root = multi_root(tmp_path)
    log = tmp_path / "tests.log"
    res = sh(INSPECT_SH, str(root), NAMES[0], f"echo x >> {log}", "", "5", "", *NAMES[1:])
    state = parse_inspection(res)
    assert sorted(state.certs) == sorted(NAMES) and state.test_rc == 0
    for n in NAMES:
        assert state.certs[n].layout == "link" and state.certs[n].target == f"../archive/{n}/1"
        assert state.certs[n].versions == frozenset({1}) and state.certs[n].fullchain is not None
    assert log.read_text() == "x\n"


def test_commit_swaps_all_then_tests_and_reloads_once(tmp_path: Path) -> None:
    """K certificates in one commit: each live link swapped, then exactly one test and one reload."""
    root = multi_root(tmp_path)
    log = tmp_path / "log"
    res = sh(COMMIT_SH, *commit_args(root, NAMES, f"echo test >> {log}", f"echo reload >> {log}"))
    c = parse_commit(res)
    assert c.done and res.exit_status == 0, res.stdout + res.stderr
    assert log.read_text() == "test\nreload\n"
    for n in NAMES:
        assert c.certs[n].swapped and c.certs[n].prev == f"../archive/{n}/1" and c.certs[n].failed_step is None
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"
    assert not [e for n in NAMES for e in os.listdir(root / "archive" / n) if e.startswith(".tmp")]


def test_commit_switches_every_certificate_back_when_the_one_test_fails(tmp_path: Path) -> None:
    """A failing test after the swaps points every live link back, tests again, and never reloads."""
    root = multi_root(tmp_path)
    test = f"[ ! -e {root}/live/b.example/bad ] || {{ echo 'b is bad'; exit 1; }}"
    args = commit_args(root, NAMES, test, f"touch {tmp_path}/reloaded")
    (root / "archive" / "b.example" / ".tmp-up-2-b.example" / "bad").write_text("x")
    res = sh(COMMIT_SH, *args)
    c = parse_commit(res)
    assert res.exit_status == 4 and not c.done
    assert c.test_rc == 1 and c.test_out == "b is bad" and c.retest_rc == 0
    for n in NAMES:
        assert c.certs[n].rolled_back is True
        assert os.readlink(root / "live" / n) == f"../archive/{n}/1"
    assert not (tmp_path / "reloaded").exists()


def test_commit_drops_one_bad_upload_and_commits_the_rest(tmp_path: Path) -> None:
    """An upload that fails its sums is left out (live unchanged); the others are swapped, tested, reloaded once."""
    root = multi_root(tmp_path)
    log = tmp_path / "log"
    args = commit_args(root, NAMES, f"echo test >> {log}", f"echo reload >> {log}")
    (root / "archive" / "a.example" / ".tmp-up-2-a.example" / "chain.pem").write_bytes(b"truncated")
    res = sh(COMMIT_SH, *args)
    c = parse_commit(res)
    assert c.done and c.certs["a.example"].failed_step == "verify" and not c.certs["a.example"].swapped
    assert "chain.pem: FAILED" in c.certs["a.example"].failed_out
    assert os.readlink(root / "live" / "a.example") == "../archive/a.example/1"
    assert [os.readlink(root / "live" / n) for n in NAMES[1:]] == [f"../archive/{n}/2" for n in NAMES[1:]]
    assert log.read_text() == "test\nreload\n"


def test_rollback_switches_several_back_with_one_test_and_one_reload(tmp_path: Path) -> None:
    """rollback.sh takes (name, target) pairs: each link switched back, then one test and one reload."""
    root = multi_root(tmp_path)
    sh(COMMIT_SH, *commit_args(root, NAMES, "true", "true"))
    log = tmp_path / "log"
    res = sh(ROLLBACK_SH, str(root), "a.example", "../archive/a.example/1", f"echo test >> {log}",
             f"echo reload >> {log}", "5", "", "", "c.example", "../archive/c.example/1")
    r = parse_rollback(res)
    assert r.rolled_back == {"a.example": True, "c.example": True} and r.retest_rc == 0 and r.reload_rc == 0
    assert log.read_text() == "test\nreload\n"
    assert os.readlink(root / "live" / "b.example") == "../archive/b.example/2"
    assert os.readlink(root / "live" / "c.example") == "../archive/c.example/1"


def test_typed_records_keep_sections_apart() -> None:
    """Keys after `cert=<name>` belong to that certificate; `cert=` returns to the script's own keys."""
    out = "cert=a\nswapped=1\nprev=../archive/a/1\ncert=b\nfailed_step=verify\ncert=\ntest_rc=0\nreload_rc=0\ndone=1\n"
    c = parse_commit(remote_mod.Result(exit_status=0, stdout=out, stderr="", fields=remote_mod.parse_kv(out)))
    assert c.certs["a"].swapped and c.certs["a"].prev == "../archive/a/1" and c.certs["a"].failed_step is None
    assert c.certs["b"].failed_step == "verify" and not c.certs["b"].swapped
    assert c.test_rc == 0 and c.reload_rc == 0 and c.done and c.retest_rc is None


def counting_host(tmp: Path) -> Host:
    host = fake_host(tmp, "h0")
    return Host(name=host.name, address=host.address, cert_root=host.cert_root,
                test_command=("sh", "-c", 'echo x >> "$1/tests.log"; ' + _TEST, "_", host.cert_root),
                reload_command=("sh", "-c", 'echo x >> "$1/reloads.log"; ' + _RELOAD, "_", host.cert_root))


def test_only_the_certificates_that_do_not_verify_are_rolled_back(tmp_path: Path) -> None:
    """One name not serving its new serial rolls back just that certificate, with one more reload; the rest stay."""
    host = counting_host(tmp_path)
    certs = tuple(Certificate(name=n, domains=(n,), dns="d", hosts=("h0",), ca="c") for n in NAMES)
    inv = Inventory(path=tmp_path / "inv.toml", cas={}, dns={}, hosts={"h0": host}, certificates=certs, channels={},
                    trust=trusted_ca(tmp_path))
    store = Store.open(tmp_path / "state")

    def new_versions() -> None:
        with store.lock("test"):
            for c in certs:
                store.activate(c.name, store.add_version(c.name, material(c.domains)))

    new_versions()
    run = lambda fleet: asyncio.run(deploy(inv, store, certs, now=NOW, connector=fleet.connector,  # noqa: E731
                                           prober=fleet.prober, timeouts=Timeouts(verify=1.0)))
    assert [o.status for o in run(FakeFleet())] == [Status.DEPLOYED] * 3
    root = Path(host.cert_root)
    (root / "served-first").mkdir()
    shutil.copy(root / "served" / "b.example.pem", root / "served-first" / "b.example.pem")  # b's server is stale
    (root / "tests.log").unlink()
    (root / "reloads.log").unlink()
    new_versions()
    outs = {o.cert: o for o in run(FakeFleet(stale=frozenset({"h0"})))}
    assert {n: o.status for n, o in outs.items()} == {"a.example": Status.DEPLOYED, "b.example": Status.ROLLED_BACK,
                                                       "c.example": Status.DEPLOYED}
    assert outs["b.example"].error is not None
    assert outs["b.example"].error.endswith("(rolled back to version 1, reloaded)")
    assert [os.readlink(root / "live" / n) for n in NAMES] == ["../archive/a.example/2", "../archive/b.example/1",
                                                             "../archive/c.example/2"]
    # the commit's test + the rollback's test (issue 17: no preflight on a POP in certmgr's layout; it was 3 with
    # one); the commit's reload + the rollback's reload
    assert (root / "tests.log").read_text().count("x") == 2
    assert (root / "reloads.log").read_text().count("x") == 2
    actions = [(e["action"], e["object"]) for e in store.read_audit() if e["action"] in ("deployed", "rolled back")][-3:]
    assert sorted(actions) == [("deployed", "a.example"), ("deployed", "c.example"), ("rolled back", "b.example")]


def test_commit_checks_and_syncs_k_uploads_with_one_process_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """K certificates cost the POP one sha256sum and two syncs in all (uploads, then the swapped links), not K each."""
    names = tuple(f"n{i}.example" for i in range(8))
    root = multi_root(tmp_path, names)
    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("sha256sum", "sync"):
        real = shutil.which(tool)
        assert real is not None
        (bindir / tool).write_text(f'#!/bin/sh\necho {tool} >> {calls}\nexec {real} "$@"\n')
        (bindir / tool).chmod(0o755)
    args = commit_args(root, names, "true", "true")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    res = sh(COMMIT_SH, *args)
    c = parse_commit(res)
    assert c.done and res.exit_status == 0, res.stdout + res.stderr
    assert calls.read_text().splitlines().count("sha256sum") == 1
    assert calls.read_text().splitlines().count("sync") == 2
    for n in names:
        assert os.readlink(root / "live" / n) == f"../archive/{n}/2"


@pytest.mark.parametrize(("lock", "other", "runs"), [
    (True, "link", False),  # certmgr committed here before, every lineage a link: the commit can undo its swaps
    (False, "link", True),  # no lock file: a POP certmgr never committed to (the commit would create one)
    (True, "certbot", True),  # a lineage in certbot's layout: the commit converts it
    (True, "none", True),  # a lineage not there yet: the commit makes its directories
])
def test_inspect_runs_the_preflight_only_where_the_commit_could_not_undo(tmp_path: Path, lock: bool, other: str,
                                                                          runs: bool) -> None:
    """The preflight test (it loads every certificate) is skipped only on a POP in certmgr's layout it has locked before."""
    root = multi_root(tmp_path, NAMES[:2])
    if lock:
        (root / "archive" / ".certmgr.lock").touch()
    if other == "certbot":
        os.unlink(root / "live" / NAMES[1])
        (root / "live" / NAMES[1]).mkdir()
    elif other == "none":
        os.unlink(root / "live" / NAMES[1])
        shutil.rmtree(root / "archive" / NAMES[1])
    log = tmp_path / "tests.log"
    state = parse_inspection(sh(INSPECT_SH, str(root), NAMES[0], f"echo x >> {log}", "", "5", "", NAMES[1]))
    assert state.test_rc == 0 and state.preflight is runs
    assert log.exists() is runs


def test_a_config_broken_before_a_deploy_without_preflight_is_told_apart_by_the_retest(tmp_path: Path) -> None:
    """No preflight on a POP certmgr manages: the failed test after the swap, the switch back and a failing retest say "already broken", live and served unchanged, no reload."""
    inv = fleet_inventory(tmp_path, 1)
    store, first = seeded_store(tmp_path)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    root = Path(inv.hosts["h0"].cert_root)
    served = (root / "served" / f"{NAME}.pem").read_bytes()
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, material()))
    (root / "broken").write_text("")
    o = run_fleet(inv, store, FakeFleet())["h0"]
    assert o.status == Status.FAILED and o.old_serial == first and o.version == 1
    assert o.error == (f'deploy {NAME} → h0: config was already broken before deploy: "broken" (live unchanged, not '
                       "reloaded; version 2 stored for the next deploy)")
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"
    assert (root / "served" / f"{NAME}.pem").read_bytes() == served
    assert [e for e in store.read_audit() if e["action"] in ("rolled back", "rollback failed")] == []
    (root / "broken").unlink()
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/2"
