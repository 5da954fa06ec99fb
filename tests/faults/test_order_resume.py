"""Two controllers on one PostgreSQL store: A SIGKILLed mid-order, B's run resumes A's order and removes A's TXT.

Issuances are counted at the ACME proxy in front of Pebble (created orders, finalizes answered 200);
challenge records are read from the lab's bind9 by address; state is read from the database.
"""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509

from certmgr import orders
from certmgr.dns.journal import JOURNAL_PATH
from certmgr.pgstore import PgStore, install_schema
from certmgr.store import Store
from certmgr.storeopen import configured, open_pg
from lab import Lab
from lab.pg import OWNER, RUNTIME, TABLES, PgServer, temporary
from tests.conftest import _lab_port_base
from tests.faults.acmeproxy import ERR, ACMEProxy
from tests.faults.conftest import (
    LINEAGES,
    audit,
    certmgr,
    check_pop_files_whole,
    kill9,
    start_certmgr,
    write_inventory,
)
from tests.faults.test_crash import MEDIA, challenge_txt, orders_created

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PG_PORT_OFFSET = 960  # apart from tests/contract's server (900), in case both run in one worker


@pytest.fixture(scope="module")
def ha_pg() -> Iterator[PgServer]:
    """A PostgreSQL of this module's own (lab/pg.py), removed at module end."""
    with temporary(f"certmgr-pg-orders-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-",
                   _lab_port_base() + PG_PORT_OFFSET) as server:
        yield server


@pytest.fixture
def db(ha_pg: PgServer) -> PgServer:
    """The certmgr schema, empty."""
    with psycopg.connect(ha_pg.url(OWNER), password=ha_pg.passwords[OWNER], autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLES} CASCADE")
        install_schema(conn, runtime_role=RUNTIME)
    return ha_pg


def ha_inventory(flab: Lab, proxy: ACMEProxy, pg: PgServer, tmp_path: Path, *, idle_timeout: int = 30) -> Path:
    """The lab's inventory (CA behind the proxy) with [store] on the module's PostgreSQL."""
    inv = write_inventory(flab, proxy, tmp_path / "domains.toml")
    (tmp_path / "pg-password").write_text(pg.passwords[RUNTIME])
    (tmp_path / "store-key").write_text(f"k1 {base64.b64encode(bytes(32)).decode()}\n")
    with inv.open("a") as f:
        f.write(f'\n[store]\nurl = "{pg.url()}"\npassword_file = "{tmp_path / "pg-password"}"\n'
                f'key_file = "{tmp_path / "store-key"}"\nidle_timeout = {idle_timeout}\n')
    return inv


def store_of(inv: Path) -> PgStore:
    cfg = configured(inv)
    assert cfg is not None
    return open_pg(cfg)


def db_audit(inv: Path) -> list[dict[str, Any]]:
    with store_of(inv) as s:
        return list(s.read_audit())


def assert_every_pop_serves_db_live(flab: Lab, inv: Path) -> None:
    """Every POP serves, for every lineage, the live version the database holds."""
    with store_of(inv) as s:
        for name in LINEAGES:
            live = x509.load_pem_x509_certificate(s.read(name).cert).serial_number
            assert {flab.served_serial(pop, name) for pop in flab.pop_names} == {live}, name
            assert orders.load(s, name) is None, f"{name}: the pending order is settled once stored"


def kill_a_at(proxy: ACMEProxy, inv: Path, state: Path, kind: str, *, after: bool) -> None:
    """Controller A runs until MEDIA's `kind` request reaches the proxy, and is SIGKILLed there."""
    rule = proxy.hold(kind, ident=MEDIA, after=after)
    proc = start_certmgr(inv, state, "run", "--no-notify")
    try:
        ACMEProxy.wait_held(rule)
        kill9(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        proxy.release()


@pytest.mark.parametrize(("kind", "after", "status"), [
    ("challenge", True, {"pending", "ready", "valid"}),  # Pebble has the answer: B polls, finalizes, downloads
    ("finalize", True, {"processing", "valid"}),  # Pebble issued: B only downloads
])
def test_b_resumes_the_order_a_was_killed_in(fresh: Lab, proxy: ACMEProxy, db: PgServer, tmp_path: Path,
                                             kind: str, after: bool, status: set[str]) -> None:
    """A killed after the CA acted on MEDIA's challenge answer or finalize: B (another state dir, same database)
    resumes A's order — no second order, no second certificate — and every POP serves the database's live version."""
    inv = ha_inventory(fresh, proxy, db, tmp_path)
    kill_a_at(proxy, inv, tmp_path / "a", kind, after=after)
    with store_of(inv) as s:
        recorded = orders.load(s, MEDIA)
    assert recorded is not None and recorded.url is not None, "A recorded the order and its URL before acting"
    assert orders_created(proxy)[MEDIA] == 1

    b = certmgr(inv, tmp_path / "b", "run", "--no-notify")
    assert b.returncode == 0, b.stdout + b.stderr
    assert orders_created(proxy)[MEDIA] == 1, "B placed no order of its own for MEDIA"
    assert len(proxy.requests("finalize", MEDIA, status=200)) == 1, "one certificate issued for MEDIA, not two"
    assert max(orders_created(proxy).values()) <= 2, "at most one extra order for any certificate"
    rows = db_audit(inv)
    [resumed] = [e for e in rows if e["action"] == "order resumed" and e["object"] == MEDIA]
    assert resumed["url"] == recorded.url and resumed["status"] in status
    assert not [e for e in rows if e["action"] == "order abandoned"]
    assert_every_pop_serves_db_live(fresh, inv)
    check_pop_files_whole(fresh)
    assert challenge_txt(fresh) == {}
    assert not (tmp_path / "a" / "archive").exists() and not (tmp_path / "b" / "archive").exists()


def test_b_removes_the_challenge_records_a_left_in_dns(fresh: Lab, proxy: ACMEProxy, db: PgServer,
                                                       tmp_path: Path) -> None:
    """A killed after its UPDATE wrote MEDIA's TXT (its challenge answer held before Pebble): the journal row in the
    database lists the record, bind9 serves it, and B's run removes it and resumes the order."""
    inv = ha_inventory(fresh, proxy, db, tmp_path)
    kill_a_at(proxy, inv, tmp_path / "a", "challenge", after=False)
    left = challenge_txt(fresh)
    assert f"_acme-challenge.{MEDIA}." in left, "A's record is in DNS after the kill"
    with store_of(inv) as s:
        journaled = {(e["fqdn"], e["value"]) for e in s.load_json(JOURNAL_PATH, default=[])}
    assert {(f"_acme-challenge.{MEDIA}", v) for v in left[f"_acme-challenge.{MEDIA}."]} <= journaled

    b = certmgr(inv, tmp_path / "b", "run", "--no-notify")
    assert b.returncode == 0, b.stdout + b.stderr
    assert challenge_txt(fresh) == {}, "B removed every TXT A left (and its own)"
    rows = db_audit(inv)
    resumed = next(i for i, e in enumerate(rows) if e["action"] == "order resumed" and e["object"] == MEDIA)
    assert any(e["action"] == "dns removed" and f"_acme-challenge.{MEDIA}" in e["names"] for e in rows[:resumed]), \
        "B removed A's record first (from the journal row), before resuming the order"
    with store_of(inv) as s:
        assert s.load_json(JOURNAL_PATH, default=[]) == []
    assert orders_created(proxy)[MEDIA] == 1, "B resumed A's pending order"
    assert_every_pop_serves_db_live(fresh, inv)


def test_an_order_the_ca_no_longer_serves_is_abandoned_and_ordered_once_more(fresh: Lab, proxy: ACMEProxy,
                                                                              tmp_path: Path) -> None:
    """Directory store: the rerun finds the recorded order gone at the CA (404), audits `order abandoned: …` and
    places exactly one new order."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    kill_a_at(proxy, inv, state, "challenge", after=True)
    assert orders_created(proxy)[MEDIA] == 1
    record = state / orders.order_path(MEDIA)
    assert record.stat().st_mode & 0o777 == 0o600
    proxy.fail("order", 404, ERR + "malformed", "No order for ID", ident=MEDIA)
    rerun = certmgr(inv, state, "run", "--no-notify")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    [row] = [e for e in audit(state) if e["action"] == "order abandoned" and e["object"] == MEDIA]
    assert row["message"] == ("order abandoned: the CA no longer serves it (No order for ID)"), row
    assert orders_created(proxy)[MEDIA] == 2, "exactly one extra order"
    assert not record.exists()


def test_a_paused_holders_order_is_finished_by_b_and_the_woken_holder_issues_nothing(
        fresh: Lab, proxy: ACMEProxy, db: PgServer, tmp_path: Path) -> None:
    """A SIGSTOPped just before MEDIA's finalize (idle_timeout 5 s): B waits for the lock the server frees, finishes
    A's order and deploys it; A, continued, is fenced (exit 69, outcomes spooled, no key): one order and one
    certificate for MEDIA in all, one version in the database."""
    inv = ha_inventory(fresh, proxy, db, tmp_path, idle_timeout=5)
    rule = proxy.hold("finalize", ident=MEDIA)
    a = start_certmgr(inv, tmp_path / "a", "run", "--no-notify")
    try:
        ACMEProxy.wait_held(rule)
        os.kill(a.pid, signal.SIGSTOP)
        proxy.remove(rule)  # A's finalize never reached Pebble; A sees its connection closed when it wakes
        b = certmgr(inv, tmp_path / "b", "run", "--no-notify", "--wait-lock", "60")
        assert b.returncode == 0, b.stdout + b.stderr
        os.kill(a.pid, signal.SIGCONT)
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
            a.communicate(timeout=30)
    assert a.returncode == 69, out + err
    # the lock session ended while A was stopped; if a statement of A's was in flight across the pause, A's own
    # watch cuts that connection first on waking (more than idle_timeout unanswered): either way exit 69, nothing more
    assert "certmgr: error: store " in err and (": lock lost mid-run: " in err or ": database lost mid-run: " in err), err
    assert orders_created(proxy)[MEDIA] == 1, "B finished A's order; A placed none after waking"
    assert len(proxy.requests("finalize", MEDIA, status=200)) == 1, "one certificate for MEDIA"
    assert max(orders_created(proxy).values()) <= 2, "at most one extra order for any certificate"
    resumed = [e for e in db_audit(inv) if e["action"] == "order resumed" and e["object"] == MEDIA]
    assert len(resumed) == 1
    with store_of(inv) as s:
        assert s.versions(MEDIA) == [1]
    assert not any("PRIVATE KEY" in f.read_text() for f in (tmp_path / "a").glob("spool/*.json"))
    assert_every_pop_serves_db_live(fresh, inv)


@pytest.mark.parametrize("direction", ["dir-to-pg", "pg-to-dir"])
def test_a_pending_order_survives_store_migrate_and_the_next_run_resumes_it(fresh: Lab, proxy: ACMEProxy,
                                                                             db: PgServer, tmp_path: Path,
                                                                             direction: str) -> None:
    """A killed after MEDIA's challenge answer leaves a pending order; `store migrate` (directory → PostgreSQL, or
    back) opens its key with the source's protection and writes it for the target (sealed in the database, a 0600
    file in the directory), URL and CSR kept; the first run on the target resumes it: one order, one certificate."""
    ha_inv = ha_inventory(fresh, proxy, db, tmp_path)
    dir_inv = write_inventory(fresh, proxy, tmp_path / "domains-dir.toml")
    src_dir, dst_dir = tmp_path / "a", tmp_path / "d"
    url = db.url()
    if direction == "dir-to-pg":
        kill_a_at(proxy, dir_inv, src_dir, "challenge", after=True)
        src = Store.open(src_dir, create=False)
        recorded = orders.load(src, MEDIA)
        args = ("--from", str(src_dir), "--to", url)
    else:
        kill_a_at(proxy, ha_inv, src_dir, "challenge", after=True)
        with store_of(ha_inv) as s:
            recorded = orders.load(s, MEDIA)
        args = ("--from", url, "--to", str(dst_dir))
    assert recorded is not None and recorded.url is not None
    assert orders_created(proxy)[MEDIA] == 1
    moved = certmgr(ha_inv, src_dir, "store", "migrate", *args, "--json")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert json.loads(moved.stdout)["orders_copied"] >= 1

    if direction == "dir-to-pg":
        with store_of(ha_inv) as s:
            assert orders.load(s, MEDIA) == recorded, "the same order, key, CSR and URL, sealed for the database"
            row = s.load_json(orders.order_path(MEDIA))
        assert "privkey_sealed" in row and "PRIVATE KEY" not in json.dumps(row)
        run = certmgr(ha_inv, tmp_path / "b", "run", "--no-notify")
        rows = db_audit(ha_inv)
    else:
        dst = Store.open(dst_dir, create=False)
        assert orders.load(dst, MEDIA) == recorded, "the same order, key, CSR and URL, in the directory store"
        key_file = dst_dir / orders.ORDERS_DIR / MEDIA / "privkey.pem"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert "privkey_sealed" not in (dst_dir / orders.order_path(MEDIA)).read_text()
        run = certmgr(dir_inv, dst_dir, "run", "--no-notify")
        rows = audit(dst_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    assert orders_created(proxy)[MEDIA] == 1, "the run on the target resumed the migrated order, placed none"
    assert len(proxy.requests("finalize", MEDIA, status=200)) == 1, "one certificate issued for MEDIA"
    [resumed] = [e for e in rows if e["action"] == "order resumed" and e["object"] == MEDIA]
    assert resumed["url"] == recorded.url
    assert not [e for e in rows if e["action"] == "order abandoned" and e["object"] == MEDIA]
