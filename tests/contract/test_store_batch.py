"""A renewed certificate is stored in ONE transaction with PostgreSQL (PgStore.batch): one durable commit instead
of five, all or nothing, and never half spooled; the directory store does the same writes one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from certmgr import orders, outbox
from certmgr.errors import StoreError, StoreUnavailable
from certmgr.issue import Issued
from certmgr.material import CertMaterial
from certmgr.pgstore import PgStore
from certmgr.plan import RenewState
from certmgr.renew import record_renewal, state_path
from lab.pg import PgServer
from tests.contract.conftest import FIXED, open_pg
from tests.contract.test_ha_orders import pending

pytestmark = pytest.mark.integration

NAME = "media.hachyderm.test"


def renew_once(store: Any, material: CertMaterial) -> tuple[int, int | None]:
    """A pending order, then the certificate it gave stored as renew does (under the certificate's lock)."""
    orders.save(store, pending())
    with store.lock_cert(NAME, "renew") if store.per_name_locks else store.lock("renew"):
        return record_renewal(store, NAME, Issued(material=material), None, RenewState(), now=FIXED)


def test_a_renewal_is_stored_whole_in_both_stores(store: Any, materials: list[CertMaterial]) -> None:
    """Version, live pointer, settled order, `renewed` row and state: the same in both stores."""
    assert renew_once(store, materials[0]) == (1, None)
    assert store.live_version(NAME) == 1 and orders.load(store, NAME) is None
    assert [e["action"] for e in store.read_audit() if e["object"] == NAME] == ["add_version", "activate", "renewed"]
    assert store.load_json(state_path(NAME))["failures"] == 0


def test_a_renewal_is_one_durable_commit_with_postgres(fresh_schema: PgServer, materials: list[CertMaterial]) -> None:
    """PgStore counts its commits: storing a renewal is 1 (add_version, activate, settle, audit and state were 5)."""
    pgs = open_pg(fresh_schema)
    try:
        orders.save(pgs, pending())
        with pgs.lock_cert(NAME, "renew"):
            before = pgs.commits
            record_renewal(pgs, NAME, Issued(material=materials[0]), None, RenewState(), now=FIXED)
            assert pgs.commits - before == 1
    finally:
        pgs.close()


def test_a_failure_inside_the_batch_stores_nothing(fresh_schema: PgServer, materials: list[CertMaterial],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The last write (the state) failing rolls the version, live pointer, order settlement and `renewed` row back:
    the order is still pending for the next run to resume, and the audit log holds nothing of it."""
    pgs = open_pg(fresh_schema)
    try:
        order = pending()
        orders.save(pgs, order)

        def refuse(relpath: str, obj: Any, mode: int = 0o600) -> None:
            raise StoreError(f"store {pgs.where}: write {relpath}: refused (test)")

        monkeypatch.setattr(pgs, "save_json", refuse)
        with pgs.lock_cert(NAME, "renew"), pytest.raises(StoreError, match=r": refused \(test\)$"):
            record_renewal(pgs, NAME, Issued(material=materials[0]), None, RenewState(), now=FIXED)
        monkeypatch.undo()
        assert pgs.versions(NAME) == [] and pgs.live_version(NAME) is None
        assert orders.load(pgs, NAME) == order
        assert [e["action"] for e in pgs.read_audit()] == []
    finally:
        pgs.close()


def test_a_database_lost_inside_the_batch_spools_nothing_of_it(fresh_schema: PgServer, materials: list[CertMaterial],
                                                               tmp_path: Path) -> None:
    """With the spooling wrapper, the database lost mid-batch (the store's session terminated) ends the renewal with
    StoreUnavailable and marks the store lost, but spools none of the batch's writes: they were never committed."""
    outbox.reset()
    pgs = open_pg(fresh_schema)
    spooling = outbox.Spooling(pgs, outbox.Outbox(tmp_path / "spool"), clock=lambda: FIXED)
    try:
        order = pending()
        orders.save(spooling, order)
        data_pid = pgs._conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        real_audit = PgStore.audit

        def audit_after_the_loss(self: PgStore, *args: Any, **kw: Any) -> None:
            fresh_schema.psql(f"SELECT pg_terminate_backend({data_pid})")
            real_audit(self, *args, **kw)

        with pgs.lock_cert(NAME, "renew"), pytest.raises(StoreUnavailable):
            PgStore.audit = audit_after_the_loss  # type: ignore[method-assign]
            try:
                record_renewal(spooling, NAME, Issued(material=materials[0]), None, RenewState(), now=FIXED)
            finally:
                PgStore.audit = real_audit  # type: ignore[method-assign]
        assert spooling.lost is not None and spooling.spooled == 0
        assert not (tmp_path / "spool").exists() or list((tmp_path / "spool").iterdir()) == []
    finally:
        pgs.close()
        outbox.reset()
    again = open_pg(fresh_schema)
    try:
        assert again.versions(NAME) == [] and orders.load(again, NAME) == order
        assert [e["action"] for e in again.read_audit()] == []
    finally:
        again.close()


def test_batched_on_the_directory_store_writes_at_once(tmp_path: Path) -> None:
    """store_api.batched gives the directory store no transaction: its writes are atomic renames one by one."""
    from certmgr.store import Store
    from certmgr.store_api import batched

    d = Store.open(tmp_path / "state", clock=lambda: FIXED)
    with batched(d, "x"):
        d.save_json("state/x.json", {"a": 1})
    assert d.load_json("state/x.json") == {"a": 1}


def test_a_nested_batch_joins_the_outer_one(fresh_schema: PgServer) -> None:
    """A batch inside a batch (same thread) is the outer transaction: one commit for both."""
    pgs = open_pg(fresh_schema)
    try:
        before = pgs.commits
        with pgs.batch("outer"):
            pgs.save_json("state/a.json", {"a": 1})
            with pgs.batch("inner"):
                pgs.save_json("state/b.json", {"b": 1})
        assert pgs.commits - before == 1
        assert pgs.load_json("state/a.json") == {"a": 1} and pgs.load_json("state/b.json") == {"b": 1}
    finally:
        pgs.close()


def test_a_batch_that_need_not_wait_for_the_disk_commits_whole_and_only_itself_so(fresh_schema: PgServer) -> None:
    """`batch(durable=False)` (a POP's deploy record, which its durable intent covers) commits its writes together
    without waiting for the WAL flush — `synchronous_commit` off in that transaction only, durable again after."""
    with open_pg(fresh_schema) as pgs:
        with pgs.batch("record", durable=False):
            pgs.save_json("state/deploy/a.json", {"hosts": {"h": 1}})
            inside = pgs._conn.execute("SHOW synchronous_commit").fetchone()
        after = pgs._conn.execute("SHOW synchronous_commit").fetchone()
        assert (inside, after) == (("off",), ("on",))
        assert pgs.load_json("state/deploy/a.json") == {"hosts": {"h": 1}}


def test_the_renewal_writes_a_crash_can_only_delay_do_not_wait_for_the_disk(fresh_schema: PgServer) -> None:
    """Issue 18: of one renewal's store writes, three commit without waiting for the WAL flush (PgStore.lazy_commits)
    because a database crash that loses them loses only what is re-derived: the order URL (`placed`: the next run
    abandons the record and orders anew, as after a kill before it), a DNS journal drop (the entries come back and
    are deleted again) and the `dns removed` audit row (written again by that delete). What must be found after a
    crash stays durable: the order record before new-order, the journal entry before the UPDATE, the
    `dns published` row. Each lazy write is seen at once by another controller's connection."""
    from types import SimpleNamespace

    from certmgr.dns import TXTRecord
    from certmgr.dns.journal import Journal
    from certmgr.renew import _Run
    from tests.contract.test_ha_orders import KEY, cert

    rec = TXTRecord(fqdn=f"_acme-challenge.{NAME}", zone="hachyderm.test", value="v" * 43, domain=NAME)
    with open_pg(fresh_schema) as pgs, open_pg(fresh_schema) as other, pgs.lock_cert(NAME, "renew"):
        steps: list[tuple[str, int, int]] = []  # (step, commits, of which lazy)

        def step(what: str, fn: Any) -> None:
            commits, lazy = pgs.commits, pgs.lazy_commits
            fn()
            steps.append((what, pgs.commits - commits, pgs.lazy_commits - lazy))

        recorder = orders.Recorder(pgs, cert(), account="pebble-0123456789", account_uri=None, key=KEY,
                                   clock=lambda: FIXED)
        journal = Journal.load(pgs, clock=lambda: FIXED)
        on_change = _Run._dns_audit(SimpleNamespace(store=pgs), "lab")  # type: ignore[arg-type]
        step("placing", lambda: recorder.placing(b"csr"))
        step("placed", lambda: recorder.placed("https://ca.test/my-order/7"))
        assert (found := orders.load(other, NAME)) is not None and found.url == "https://ca.test/my-order/7"
        step("journaled", lambda: journal.written("lab", NAME, [rec]))
        step("published", lambda: on_change("dns published", "hachyderm.test", [rec]))
        step("removed", lambda: on_change("dns removed", "hachyderm.test", [rec]))
        step("dropped", lambda: journal.drop([rec.key]))
        assert other.load_json("state/dns/journal.json") == []
        assert [e["action"] for e in other.read_audit()] == ["dns published", "dns removed"]
    assert steps == [("placing", 1, 0), ("placed", 1, 1), ("journaled", 1, 0), ("published", 1, 0),
                     ("removed", 1, 1), ("dropped", 1, 1)], steps
    # benchmarks/hastore.py --split: the same transactions by call site, names replaced by *
    assert {k: v for k, v in pgs.calls.items() if not k.startswith("read")} == {
        "durable write state/orders/*/*": 1, "lazy record the order URL of *": 1, "durable write state/dns/*": 1,
        "durable audit dns published *": 1, "lazy audit dns removed *": 1,
        "lazy drop removed challenge records from the DNS journal": 1}, pgs.calls


def test_a_renewal_reads_the_live_version_once_it_holds_the_certificates_lock(
        fresh_schema: PgServer, materials: list[CertMaterial], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: the live version read right after the certificate's lock is taken (halocks.cert_turn's re-check)
    is the one the renewal plans with (renew.live_info): nobody else writes it while the lock is ours. Two reads of
    it per certificate (before waiting, after), not three; one for a renewal that is not forced (it never asks
    whether the version moved while it waited); the material is still read whole."""
    import asyncio

    from certmgr import halocks
    from certmgr.renew import live_info

    with open_pg(fresh_schema) as pgs:
        renew_once(pgs, materials[0])
        reads: list[str] = []
        real = pgs.live_version

        def counted(name: str) -> int | None:
            reads.append(name)
            return real(name)

        monkeypatch.setattr(pgs, "live_version", counted)

        async def planned(recheck: bool) -> tuple[Any, Any]:
            async with halocks.cert_turn(pgs, NAME, "renew", recheck=recheck) as turn:
                return turn, live_info(pgs, NAME, known=turn)

        turn, (material, info) = asyncio.run(planned(True))  # a forced renewal: `moved` is asked for
        assert (turn.live, turn.moved, reads) == (1, False, [NAME, NAME])
        assert material == materials[0] and info is not None
        assert live_info(pgs, NAME) == (material, info) and len(reads) == 3  # without a turn: read as before
        reads.clear()
        turn, (material, info) = asyncio.run(planned(False))  # not forced: the plan reads what the lock guards
        assert (turn.live, turn.moved, reads) == (1, False, [NAME])
