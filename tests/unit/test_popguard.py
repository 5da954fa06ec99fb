"""Unit tests for the POP-side guards: the POP lock, store version numbers on a POP, the sweep, rollback after a failed reload, free space."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import pytest

from certmgr import popguard
from certmgr.deploy import COMMIT_SH, PRUNE_SH, ROLLBACK_SH, Status, deploy, sha256sums
from certmgr.inventory import Host
from certmgr.remote import RemoteTimeout, Result, Timeouts
from tests.unit.test_deploy import (
    NAME,
    NOW,
    FakeFleet,
    LocalSession,
    certbot_root,
    fleet_inventory,
    linked_root,
    material,
    seeded_store,
    sh,
    upload,
)

TAG = "0123abcd"


def commit(root: Path, tmp: str, ver: str, m: object, conv: str = "", test: str = "true", reload: str = "true",
           lockwait: str = "30") -> Result:
    return sh(COMMIT_SH, str(root), NAME, tmp, ver, sha256sums(m), conv, test, reload, "", TAG,  # type: ignore[arg-type]
              "20261127T120000Z", lockwait)


def test_commit_waits_for_the_pop_lock_and_gives_up_with_nothing_changed(tmp_path: Path) -> None:
    """A script of another controller holding archive/.certmgr.lock keeps COMMIT out: lock_busy, upload kept, live unchanged."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, f".tmp-up-{TAG}-2-aaaa", m)
    with open(root / "archive" / ".certmgr.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = commit(root, f".tmp-up-{TAG}-2-aaaa", "2", m, lockwait="1")
    assert res.exit_status == 5 and res.get("lock_busy") == "1" and res.get("stored") is None
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"
    assert sorted(os.listdir(root / "archive" / NAME)) == [f".tmp-up-{TAG}-2-aaaa", "1"]
    host = Host(name="sally", address="x", cert_root=str(root))
    assert popguard.lock_error(res, host, str(root)) == (
        f"another deploy holds the lock on sally ({root}/archive/.certmgr.lock) for more than 1s")


@pytest.mark.parametrize("script", ["rollback", "prune"])
def test_rollback_and_prune_take_the_pop_lock_too(tmp_path: Path, script: str) -> None:
    """ROLLBACK and PRUNE change the POP, so they wait for the lock like COMMIT and change nothing without it."""
    root = linked_root(tmp_path, 3)
    with open(root / "archive" / ".certmgr.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if script == "rollback":
            res = sh(ROLLBACK_SH, str(root), NAME, f"../archive/{NAME}/1", "true", "true", "1")
        else:
            res = sh(PRUNE_SH, str(root), "1", "1", "", "", NAME)
    assert res.exit_status == 5 and res.get("lock_busy") == "1"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/3"
    assert sorted(os.listdir(root / "archive" / NAME)) == ["1", "2", "3"]


def test_the_lock_is_not_inherited_by_the_reload_command(tmp_path: Path) -> None:
    """A daemon started by the reload command cannot keep the POP lock after the script ends."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, f".tmp-up-{TAG}-2-bbbb", m)
    res = commit(root, f".tmp-up-{TAG}-2-bbbb", "2", m, reload="(sleep 5 >/dev/null 2>&1 &) ; true")
    assert res.get("done") == "1", res.stdout + res.stderr
    with open(root / "archive" / ".certmgr.lock", "a") as probe:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the sleeper held it


def test_commit_sets_aside_a_directory_of_other_content_under_the_store_number(tmp_path: Path) -> None:
    """archive/<name>/2/ holding another certificate is moved to 2.certmgr-aside-<stamp>/ whole; the store's v2 takes the number."""
    root = linked_root(tmp_path, 2)  # 2 is live here, with other content than the store's v2
    other = (root / "archive" / NAME / "2" / "fullchain.pem").read_bytes()
    m = material()
    upload(root, f".tmp-up-{TAG}-2-cccc", m)
    res = commit(root, f".tmp-up-{TAG}-2-cccc", "2", m)
    assert res.get("done") == "1", res.stdout + res.stderr
    aside = "2.certmgr-aside-20261127T120000Z"
    assert res.get("aside") == aside and res.get("prev") == f"../archive/{NAME}/{aside}"
    assert (root / "archive" / NAME / aside / "fullchain.pem").read_bytes() == other
    assert (root / "archive" / NAME / "2" / "fullchain.pem").read_bytes() == m.fullchain
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/2"
    assert sorted(os.listdir(root / "archive" / NAME)) == ["1", "2", aside]


def test_commit_reuses_the_same_certificate_under_its_number(tmp_path: Path) -> None:
    """archive/<name>/N/ already holding these very files (an earlier, rolled-back attempt) is used as it is."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, "2", m)
    upload(root, f".tmp-up-{TAG}-2-dddd", m)
    res = commit(root, f".tmp-up-{TAG}-2-dddd", "2", m)
    assert res.get("done") == "1" and res.get("reused") == "2" and res.get("aside") is None
    assert sorted(os.listdir(root / "archive" / NAME)) == ["1", "2"]
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/2"


def test_certbot_version_with_the_store_number_is_kept_aside(tmp_path: Path) -> None:
    """Converting certbot's K=3 while the store's version is 3: certbot's copy goes aside, rollback returns to it."""
    root, old = certbot_root(tmp_path, k=3)
    m = material()
    upload(root, f".tmp-up-{TAG}-3-eeee", m)
    res = commit(root, f".tmp-up-{TAG}-3-eeee", "3", m, conv="3", test=f"test -e {tmp_path}/ok")
    aside = "3.certmgr-aside-20261127T120000Z"
    assert res.get("convdir") == aside and res.get("rolled_back") == "1"
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/{aside}"
    assert (root / "live" / NAME / "fullchain.pem").read_bytes() == old.fullchain
    assert (root / "archive" / NAME / "3" / "fullchain.pem").read_bytes() == m.fullchain


def test_sweep_spares_another_controllers_fresh_upload(tmp_path: Path) -> None:
    """The sweep removes dead scripts' temporaries, our own earlier uploads and old foreign ones — never a fresh foreign upload."""
    root = linked_root(tmp_path, 1)
    arch = root / "archive" / NAME
    for d in (".tmp-up-ffff0000-2-fresh", ".tmp-up-ffff0000-2-old", f".tmp-up-{TAG}-2-mine", ".tmp-prune-1-77",
              ".tmp-9-legacy"):
        (arch / d).mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(arch / ".tmp-up-ffff0000-2-old", (two_hours_ago, two_hours_ago))
    m = material()
    upload(root, f".tmp-up-{TAG}-2-ffff", m)
    res = commit(root, f".tmp-up-{TAG}-2-ffff", "2", m)
    assert res.get("done") == "1"
    assert sorted(os.listdir(arch)) == [".tmp-up-ffff0000-2-fresh", "1", "2"]


def test_failed_reload_switches_back_tests_and_reloads_again(tmp_path: Path) -> None:
    """A reload that fails (having loaded the new files, maybe) is followed by switch back, test, and a second reload."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, f".tmp-up-{TAG}-2-gggg", m)
    log = tmp_path / "reloads"
    reload = f'readlink {root}/live/{NAME} >> {log}; [ -e {tmp_path}/once ] || {{ touch {tmp_path}/once; exit 1; }}'
    res = commit(root, f".tmp-up-{TAG}-2-gggg", "2", m, reload=reload)
    assert res.get("reload_rc") == "1" and res.get("rolled_back") == "1" and res.get("retest_rc") == "0"
    assert res.get("rereload_rc") == "0" and res.exit_status == 4
    assert log.read_text().splitlines() == [f"../archive/{NAME}/2", f"../archive/{NAME}/1"]
    assert os.readlink(root / "live" / NAME) == f"../archive/{NAME}/1"


HOST = Host(name="sally", address="x", cert_root="/le")
FILES = {"fullchain.pem": (b"x" * 3000, 0o644), "privkey.pem": (b"k" * 300, 0o600)}


@pytest.mark.parametrize(("fields", "message"), [
    ({"dir": ["/le/archive/a"], "free_kb": ["4"], "free_inodes": ["900"]}, "no space left on sally:/le/archive/a (4 KB free)"),
    ({"dir": ["/le/archive/a"], "free_kb": ["9000"], "free_inodes": ["0"]},
     "no space left on sally:/le/archive/a (0 inodes free)"),
    ({"dir": ["/le/archive/a"], "free_kb": ["9000"], "free_inodes": ["900"]}, None),
    ({}, None),
])
def test_upload_failure_names_a_full_disk(fields: dict[str, list[str]], message: str | None) -> None:
    """A failed upload is blamed on space only when free blocks or inodes cannot hold the files."""
    free = Result(exit_status=0, stdout="", stderr="", fields=fields)
    assert popguard.upload_failure(HOST, "/le/archive/a/.tmp-x", free, FILES) == message


def test_free_space_script_reports_the_nearest_existing_directory(tmp_path: Path) -> None:
    """FREE_SH walks up from a path that does not exist (the removed upload dir) and reports df's figures."""
    res = sh(popguard.FREE_SH, str(tmp_path / "gone" / ".tmp-up-x"))
    assert res.get("dir") == str(tmp_path) and (res.get("free_kb") or "").isdigit()
    assert (res.get("free_inodes") or "").isdigit()


class _HangingSession(LocalSession):
    async def run_script(self, script: str, args: list[str], *, step: str,  # type: ignore[override]
                         timeout: float | None = None) -> Result:
        if step == "commit":
            raise RemoteTimeout(f"commit {self.host.name} (x:22): no answer within 60s")
        return await super().run_script(script, args, step=step, timeout=timeout)


def test_a_timed_out_script_leaves_the_host_alone_for_the_rest_of_the_run(tmp_path: Path) -> None:
    """After the host's commit times out, every certificate in it is 'unknown' and the host is left alone."""
    from contextlib import asynccontextmanager
    from dataclasses import replace

    from certmgr.inventory import Certificate
    from certmgr.store import Store

    inv = fleet_inventory(tmp_path, 1)
    certs = tuple(Certificate(name=n, domains=(n,), dns="d", hosts=("h0",), ca="c") for n in ("a.example", "b.example"))
    inv = replace(inv, certificates=certs)
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        for c in certs:
            store.activate(c.name, store.add_version(c.name, material(c.domains)))
    fleet = FakeFleet()

    @asynccontextmanager
    async def connector(host: Host, **kw: object):  # type: ignore[no-untyped-def]
        yield _HangingSession(host)

    outs = asyncio.run(deploy(inv, store, certs, now=NOW, connector=connector, prober=fleet.prober,
                              timeouts=Timeouts(verify=1.0)))
    # issue 13: both certificates are in the host's one commit, so both are unknown (was: a unknown, b held)
    assert [(o.cert, o.status) for o in outs] == [("a.example", Status.UNKNOWN), ("b.example", Status.UNKNOWN)]
    for o in outs:
        assert o.error == (f"deploy {o.cert} → h0: commit h0 (x:22): no answer within 60s (state unknown; host "
                           "left alone for the rest of this run)")
    assert not os.path.lexists(Path(inv.hosts["h0"].cert_root) / "live" / "b.example")
    state = store.load_json("state/deploy/a.example.json")["hosts"]["h0"]
    assert state["status"] == "unknown" and "serial" not in state


def test_store_version_names_the_pop_version(tmp_path: Path) -> None:
    """The store's v3 lands as archive/<name>/3/ on a host whose own history is shorter or different."""
    inv = fleet_inventory(tmp_path, 2)
    store, _ = seeded_store(tmp_path)
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, material()))
        store.activate(NAME, store.add_version(NAME, material()))
    assert store.live_version(NAME) == 3
    root1 = Path(inv.hosts["h1"].cert_root)
    (root1 / "archive" / NAME / "3").mkdir(parents=True)  # a certbot-era or hand-made 3/ with other content
    (root1 / "archive" / NAME / "3" / "fullchain.pem").write_text("old")
    from tests.unit.test_deploy import run_fleet

    outs = run_fleet(inv, store, FakeFleet())
    assert {h: (o.status, o.version) for h, o in outs.items()} == {"h0": (Status.DEPLOYED, 3), "h1": (Status.DEPLOYED, 3)}
    assert sorted(os.listdir(root1 / "archive" / NAME)) == ["3", f"3.certmgr-aside-{NOW:%Y%m%dT%H%M%SZ}"]
    assert any(e["action"] == "set aside" and e["host"] == "h1" and e["version"] == 3 for e in store.read_audit())
