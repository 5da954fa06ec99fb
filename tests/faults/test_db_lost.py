"""PostgreSQL stopped mid-run on the real lab: exit 69, outcomes spooled locally, replayed once by the next run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from certmgr.outbox import SPOOL_DIR
from lab import Lab
from lab.pg import PgServer
from tests.faults.acmeproxy import ERR, ACMEProxy
from tests.faults.conftest import LINEAGES, certmgr, check_pop_files_whole, start_certmgr, wait_for
from tests.faults.test_crash import MEDIA
from tests.faults.test_order_resume import db, db_audit, ha_inventory, ha_pg, store_of  # noqa: F401 - fixtures

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_POPS = 3


def test_database_lost_mid_deploy_spools_outcomes_and_the_next_run_replays_them_once(
        fresh: Lab, proxy: ACMEProxy, db: PgServer, tmp_path: Path) -> None:  # noqa: F811
    """PostgreSQL stopped the moment the first POP switches: the run exits 69 naming the spool, starts nothing new,
    spools what the POP commits already running did (0700/0600, no private key); the next run replays each record
    once before anything else (a third run replays nothing), and the database's deploy rows match what POPs serve."""
    inv = ha_inventory(fresh, proxy, db, tmp_path)
    state = tmp_path / "state"
    links = [fresh.pop_paths(pop).cert_root / "live" / lineage for pop in fresh.pop_names for lineage in LINEAGES]
    proc = start_certmgr(inv, state, "run", "--no-notify")
    try:
        wait_for(lambda: any(p.is_symlink() for p in links) or proc.poll() is not None, 120,
                 "the first POP to switch live/<name>", interval=0.002)
        db.stop("immediate")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 69, out + err
    spool = state / SPOOL_DIR
    files = sorted(spool.glob("*.json"))
    assert files, "the POP commits that were running had their outcomes spooled"
    assert ("database lost mid-run: " in err and f"; {len(files)} outcome(s) spooled to {spool}, replayed by the "
            "next run that reaches the database)" in err), err
    assert "hint: bring PostgreSQL back" in err
    assert spool.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert not any("PRIVATE KEY" in f.read_text() for f in files)
    spooled = [json.loads(f.read_text()) for f in files]
    assert {r["kind"] for r in spooled} <= {"audit", "merge", "remove"}
    assert any(r["kind"] == "audit" and r["action"] == "deployed" for r in spooled), spooled
    check_pop_files_whole(fresh)

    db.start()
    again = certmgr(inv, state, "run", "--no-notify")
    assert again.returncode == 0, again.stdout + again.stderr
    assert list(spool.glob("*.json")) == []
    rows = db_audit(inv)
    [replayed] = [e for e in rows if e["action"] == "replayed"]
    assert replayed["records"] == len(files) and sorted(replayed["ids"]) == sorted(r["id"] for r in spooled)
    first_after = next(i for i, e in enumerate(rows) if e.get("spool_id"))
    assert all(e.get("spool_id") for e in rows[first_after:first_after + sum(r["kind"] == "audit" for r in spooled)]), \
        "the replay comes before anything else the next run writes"
    assert sorted(e["spool_id"] for e in rows if e.get("spool_id")) == sorted(r["id"] for r in spooled
                                                                               if r["kind"] == "audit")
    third = certmgr(inv, state, "run", "--no-notify")
    assert third.returncode == 0, third.stdout + third.stderr
    assert [e["action"] for e in db_audit(inv)].count("replayed") == 1, "a second replay is a no-op"

    with store_of(inv) as s:
        for name in LINEAGES:
            material = s.read(name)
            live = x509.load_pem_x509_certificate(material.cert).serial_number
            hosts = (s.load_json(f"state/deploy/{name}.json") or {})["hosts"]
            for pop in fresh.pop_names:
                assert fresh.served_serial(pop, name) == live, (name, pop)
                assert hosts[pop]["serial"] == material.info().serial, (name, pop, hosts[pop])
        assert s.list_json("state/intents") == [], "every intent settled"
    intents = [e.get("intent") for e in db_audit(inv) if e["action"] == "deployed" and e.get("intent")]
    assert len(intents) == len(set(intents)), "each POP switch audited once"


def test_a_renewal_failing_after_the_loss_keeps_its_backoff_through_the_spool(
        fresh: Lab, proxy: ACMEProxy, db: PgServer, tmp_path: Path) -> None:  # noqa: F811
    """PostgreSQL stopped while MEDIA's finalize is held at the CA, which then refuses it: MEDIA's failure and backoff
    state is spooled (a `renew` merge, never a key) with its `renew failed` row, and no other certificate gets a
    failure state for the loss; the next run replays it once and holds MEDIA back (no order, no finalize for it),
    while the certificates the loss stopped are renewed at once."""
    inv = ha_inventory(fresh, proxy, db, tmp_path)
    state = tmp_path / "state"
    held = proxy.hold("finalize", ident=MEDIA)
    proc = start_certmgr(inv, state, "run", "--no-notify")
    try:
        ACMEProxy.wait_held(held)
        db.stop("immediate")
        proxy.fail("finalize", 403, ERR + "unauthorized", "finalize refused by policy", ident=MEDIA, times=None)
        proxy.release()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 69, out + err
    files = sorted((state / SPOOL_DIR).glob("*.json"))
    spooled = [json.loads(f.read_text()) for f in files]
    assert not any("PRIVATE KEY" in f.read_text() for f in files)
    merges = [r for r in spooled if r["kind"] == "merge_json"]
    assert [(r["path"], r["merger"]) for r in merges] == [(f"state/renew/{MEDIA}.json", "renew")], spooled
    assert merges[0]["body"]["failures"] == 1 and "finalize refused by policy" in merges[0]["body"]["last_error"]
    assert any(r["kind"] == "audit" and r["action"] == "renew failed" and r["object"] == MEDIA for r in spooled)
    finalizes = len(proxy.requests("finalize", MEDIA))
    orders_before = proxy.created("new-order", MEDIA)

    db.start()
    again = certmgr(inv, state, "run", "--no-notify")
    assert list((state / SPOOL_DIR).glob("*.json")) == [], again.stdout + again.stderr
    assert [e["action"] for e in db_audit(inv)].count("replayed") == 1
    with store_of(inv) as s:
        renew_state = s.load_json(f"state/renew/{MEDIA}.json")
        assert renew_state["failures"] == 1 and "finalize refused by policy" in renew_state["last_error"]
        assert s.live_version(MEDIA) is None, "MEDIA is held back by its backoff"
        for name in LINEAGES:
            if name != MEDIA:
                assert s.live_version(name) is not None, (name, again.stdout + again.stderr)
    assert proxy.created("new-order", MEDIA) == orders_before, "no new order for MEDIA during its backoff"
    assert len(proxy.requests("finalize", MEDIA)) == finalizes, "no finalize for MEDIA during its backoff"
