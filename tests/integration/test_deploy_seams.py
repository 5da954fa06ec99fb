"""Deploy seams on real POPs: two controllers (state dirs) at once, one version number everywhere, a failed reload rolled back and proven.

A 4-POP lab of this module's own (sshd + nginx per POP on loopback), reset to certbot's layout per test.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from certmgr import inventory as inventory_mod
from certmgr.deploy import HostOutcome, Status, deploy
from certmgr.material import CertMaterial
from certmgr.remote import Timeouts
from certmgr.store import Store
from lab import Lab
from tests.conftest import private_lab
from tests.integration.test_deploy_lab import MEDIA, NOW, new_material, served, trusting_ca

pytestmark = pytest.mark.integration

TIMEOUTS = Timeouts(connect=5, command=30, upload=30, verify=5, handshake=3)


@pytest.fixture(scope="module")
def slab() -> Iterator[Lab]:
    with private_lab("seams", pops=4) as lab:
        yield lab


@pytest.fixture()
def fresh(slab: Lab) -> Lab:
    slab.reseed()
    return slab


def seeded_store(lab: Lab, path: Path) -> Store:
    """A store holding each POP's certbot-era seed as version 1 (as after importing certbot's lineages)."""
    s = Store.open(path)
    with s.lock("test"):
        for d in sorted((lab.seed_dir / "certs").iterdir()):
            seed = CertMaterial(cert=(d / "cert.pem").read_bytes(), chain=(d / "chain.pem").read_bytes(),
                                privkey=(d / "privkey.pem").read_bytes())
            s.activate(d.name, s.add_version(d.name, seed))
    return s


def add(store: Store, m: CertMaterial, name: str = MEDIA) -> int:
    """Add `m` as the store's next version and make it live; returns its number."""
    with store.lock("test"):
        v = store.add_version(name, m)
        store.activate(name, v)
    return v


def pop_consistent(lab: Lab, pop: str, name: str = MEDIA) -> tuple[int, str]:
    """(live version number, its serial) after checking the POP: live is a complete version whose key matches, no temporaries."""
    root = lab.pop_paths(pop).cert_root
    target = os.readlink(root / "live" / name)
    assert target.startswith(f"../archive/{name}/"), target
    live = root / "live" / name
    m = CertMaterial(cert=(live / "cert.pem").read_bytes(), chain=(live / "chain.pem").read_bytes(),
                     privkey=(live / "privkey.pem").read_bytes())
    m.check()  # the key matches the certificate
    assert (live / "fullchain.pem").read_bytes() == m.fullchain
    assert not [e for e in os.listdir(root / "archive" / name) if e.startswith(".tmp")], pop
    assert not [e for e in os.listdir(root / "live") if ".tmp-" in e], pop
    return int(target.rsplit("/", 1)[1]), m.info().serial


def test_two_state_dirs_deploying_to_the_same_pops_at_once_end_consistent(fresh: Lab, tmp_path: Path) -> None:
    """Two controllers (two stores with the same new certificate) deploy to all POPs at once, three rounds: no upload is swept under the other, all deploy, every POP ends consistent."""
    a, b = seeded_store(fresh, tmp_path / "a"), seeded_store(fresh, tmp_path / "b")
    inv = trusting_ca(inventory_mod.load(fresh.inventory_path), a)
    cert = inv.certificate(MEDIA)

    async def both() -> tuple[list[HostOutcome], list[HostOutcome]]:
        return await asyncio.gather(deploy(inv, a, [cert], now=NOW, timeouts=TIMEOUTS),
                                    deploy(inv, b, [cert], now=NOW, timeouts=TIMEOUTS))

    for _ in range(3):
        m = new_material(cert.domains)
        assert add(a, m) == add(b, m)
        out_a, out_b = asyncio.run(both())
        for o in out_a + out_b:
            assert o.status in (Status.DEPLOYED, Status.SKIPPED), o.line()
            assert o.version == a.live_version(MEDIA), o.line()
        for pop in fresh.pop_names:
            assert pop_consistent(fresh, pop) == (a.live_version(MEDIA), m.info().serial)
            for sni in cert.domains:
                assert served(fresh, pop, sni) == m.info().serial


def test_store_version_lands_under_its_number_on_every_pop(fresh: Lab, tmp_path: Path) -> None:
    """The store's v3 is v3 on every POP — one that missed v2, one that has v2, one with a hand-made 3/ (set aside, audited)."""
    store = seeded_store(fresh, tmp_path / "state")
    inv = trusting_ca(inventory_mod.load(fresh.inventory_path), store)
    cert = inv.certificate(MEDIA)
    add(store, new_material(cert.domains))
    first = asyncio.run(deploy(inv, store, [cert], hosts=["sally"], now=NOW, timeouts=TIMEOUTS))
    assert [(o.host, o.status, o.version) for o in first] == [("sally", Status.DEPLOYED, 2)]
    esme = fresh.pop_paths("esme").cert_root / "archive" / MEDIA
    (esme / "3").mkdir()
    for f in ("cert", "chain", "fullchain", "privkey"):
        (esme / "3" / f"{f}.pem").write_bytes((esme / f"{f}1.pem").read_bytes())  # an older hand-made 3/
    os.chown(esme / "3", (esme / "cert1.pem").stat().st_uid, (esme / "cert1.pem").stat().st_gid)
    m3 = new_material(cert.domains)
    assert add(store, m3) == 3
    outs = asyncio.run(deploy(inv, store, [cert], now=NOW, timeouts=TIMEOUTS))
    assert {(o.host, o.status, o.version) for o in outs} == {(p, Status.DEPLOYED, 3) for p in fresh.pop_names}
    for pop in fresh.pop_names:
        assert pop_consistent(fresh, pop) == (3, m3.info().serial)
    asides = [e for e in os.listdir(esme) if e.startswith("3.certmgr-aside-")]
    assert asides == [f"3.certmgr-aside-{NOW:%Y%m%dT%H%M%SZ}"]
    assert (esme / asides[0] / "cert.pem").read_bytes() == (esme / "cert1.pem").read_bytes()
    entries = list(store.read_audit())
    assert [(e["host"], e["version"]) for e in entries if e["action"] == "set aside"] == [("esme", 3)]
    assert {e["version"] for e in entries if e["action"] == "deployed" and e["to"] == m3.info().serial} == {3}


def test_failed_reload_is_rolled_back_and_the_old_serial_proven(fresh: Lab, tmp_path: Path) -> None:
    """A reload that loads the new certificate and still fails: switched back, tested, reloaded again; a handshake shows the old serial and the outcome says so."""
    store = seeded_store(fresh, tmp_path / "state")
    inv = trusting_ca(inventory_mod.load(fresh.inventory_path), store)
    cert = inv.certificate(MEDIA)
    p = fresh.pop_paths("sally")
    marker = p.cert_root / "reload-failed-once"
    import dataclasses
    import shlex

    flaky = ("sh", "-c", f"{shlex.join(p.reload_command)} || exit; [ -e {marker} ] && exit 0; touch {marker}; "
                         "echo 'reload: simulated failure after loading' >&2; exit 1")
    inv = dataclasses.replace(inv, hosts={**inv.hosts, "sally": dataclasses.replace(inv.hosts["sally"],
                                                                                    reload_command=flaky)})
    old = served(fresh, "sally", cert.domains[0])
    add(store, new_material(cert.domains))
    [o] = asyncio.run(deploy(inv, store, [cert], hosts=["sally"], now=NOW, timeouts=TIMEOUTS))
    assert marker.exists()  # the first reload ran (and loaded the new files) before failing
    assert o.status == Status.ROLLED_BACK, o.line()
    assert o.error == (f'deploy {MEDIA} → sally: sh failed: "reload: simulated failure after loading" '
                       f"(rolled back to version 1, reloaded again: old serial {old} served)")
    for sni in cert.domains:
        assert served(fresh, "sally", sni) == old
    assert pop_consistent(fresh, "sally") == (1, old)


def test_timed_out_commit_leaves_the_host_alone_and_its_lock_keeps_the_next_run_out(fresh: Lab, tmp_path: Path) -> None:
    """A commit outliving the command timeout: 'unknown' for every certificate in it; while the stranded script runs, another run's commit is locked out; afterwards a run ends consistent."""
    import dataclasses
    import fcntl
    import shlex

    store = seeded_store(fresh, tmp_path / "state")
    inv = trusting_ca(inventory_mod.load(fresh.inventory_path), store)
    certs = [c for c in inv.certificates if "sally" in c.hosts]
    assert len(certs) >= 2
    for c in certs:
        add(store, new_material(c.domains), c.name)
    p = fresh.pop_paths("sally")
    slow = ("sh", "-c", f"sleep 6; {shlex.join(p.reload_command)}")
    slow_inv = dataclasses.replace(inv, hosts={**inv.hosts, "sally": dataclasses.replace(inv.hosts["sally"],
                                                                                         reload_command=slow)})
    short = dataclasses.replace(TIMEOUTS, command=3)
    first = asyncio.run(deploy(slow_inv, store, certs, hosts=["sally"], now=NOW, timeouts=short))
    # issue 13: every certificate due on sally is in its one commit, so all are unknown (was: the first
    # unknown, the others held)
    assert [o.status for o in first] == [Status.UNKNOWN] * len(certs), [o.line() for o in first]
    for o, c in zip(first, certs, strict=True):
        assert o.error == (f"deploy {c.name} → sally: commit sally ({p.address}:{fresh.ports.ssh}): no answer "
                           "within 3s (state unknown; host left alone for the rest of this run)")

    # a newer version, so that the next deploy must commit (the version the stranded script switched to is served
    # once its reload comes: a deploy of that one waits for it, as verify would, and skips)
    add(store, new_material(certs[0].domains), certs[0].name)
    second = asyncio.run(deploy(inv, store, certs[:1], hosts=["sally"], now=NOW, timeouts=short))
    lock = p.cert_root / "archive" / ".certmgr.lock"
    assert second[0].status == Status.FAILED and second[0].error == (
        f"deploy {certs[0].name} → sally: another deploy holds the lock on sally ({lock}) for more than 1s "
        "(live unchanged)"), second[0].line()

    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # returns when the stranded script has ended
    third = asyncio.run(deploy(inv, store, certs, hosts=["sally"], now=NOW, timeouts=TIMEOUTS))
    assert {o.status for o in third} <= {Status.DEPLOYED, Status.SKIPPED}, [o.line() for o in third]
    for c in certs:
        assert pop_consistent(fresh, "sally", c.name) == (store.live_version(c.name), store.read(c.name).info().serial)
