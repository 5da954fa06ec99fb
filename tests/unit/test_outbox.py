"""The database lost mid-run (certmgr/outbox.py): nothing new started, outcomes spooled 0600, replayed once."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from certmgr import outbox
from certmgr.errors import StoreUnavailable
from certmgr.store import Store

T0 = dt.datetime(2026, 12, 3, 7, 0, tzinfo=dt.UTC)
LOST = "store db:5432/certmgr: audit x: database connection lost: server closed the connection (not written)"


class Flaky:
    """A store that works until `down` is set, then raises StoreUnavailable on every call (as PgStore does)."""

    where = "db:5432/certmgr"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable(LOST)
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def db(tmp_path: Path) -> Flaky:
    return Flaky(Store.open(tmp_path / "db", clock=lambda: T0))


@pytest.fixture(autouse=True)
def _reset() -> None:
    outbox.reset()


def lose(db: Flaky, tmp_path: Path) -> outbox.Spooling:
    s = outbox.Spooling(db, outbox.Outbox(tmp_path / "state" / "spool"), clock=lambda: T0)
    s.audit("renewed", "a.test")  # written: the database is still there
    db.down = True
    s.audit("deployed", "a.test", frm="01", to="02", host="pop1", intent="i1")
    return s


def test_after_the_loss_nothing_new_starts_and_outcomes_are_spooled(db: Flaky, tmp_path: Path) -> None:
    """Once lost: audit rows, deploy results and settled intents are spooled; an order record, a deploy intent or
    any read raises without reaching the database."""
    s = lose(db, tmp_path)
    s.save_json("state/deploy/a.test.json", {"hosts": {"pop1": {"serial": "02", "at": T0.isoformat()}}})
    s.remove_json("state/intents/a.test/pop1.i1.json")
    for call in (lambda: s.save_json("state/orders/a.test.json", {}),
                 lambda: s.save_json("state/intents/a.test/pop2.i2.json", {}),
                 lambda: s.load_json("state/deploy/a.test.json"),
                 lambda: s.add_version("a.test", None)):
        with pytest.raises(StoreUnavailable, match=r"^store db:5432/certmgr: not attempted: the database \(or this controller's lock\) was lost "
                                                      r"earlier in this run$"):
            call()
    files = sorted((tmp_path / "state" / "spool").iterdir())
    assert [json.loads(f.read_text())["kind"] for f in files] == ["audit", "merge", "remove"]
    assert (tmp_path / "state" / "spool").stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert str(outbox.lost_error()) == (
        "store db:5432/certmgr: database lost mid-run: audit x: database connection lost: server closed the "
        "connection (not written) (nothing more written to it: no new order, no new POP transaction; 3 outcome(s) "
        f"spooled to {tmp_path / 'state' / 'spool'}, replayed by the next run that reaches the database)")
    assert outbox.lost_error().exit_code == 69  # type: ignore[union-attr]


def test_no_loss_no_error(db: Flaky, tmp_path: Path) -> None:
    """A run whose database stayed up writes straight through and ends without the lost error."""
    s = outbox.Spooling(db, outbox.Outbox(tmp_path / "spool"))
    s.audit("renewed", "a.test")
    s.save_json("state/deploy/a.test.json", {"hosts": {}})
    assert outbox.lost_error() is None and not (tmp_path / "spool").exists()
    assert [e["action"] for e in db.store.read_audit()] == ["renewed"]


def test_replay_applies_each_record_once_and_a_second_replay_is_a_no_op(db: Flaky, tmp_path: Path) -> None:
    """The next run replays audit rows (with their spool id), merged documents and removals, audits `replayed`,
    empties the spool; replaying the same records again (a crash before the files were deleted) adds nothing."""
    s = lose(db, tmp_path)
    s.save_json("state/deploy/a.test.json", {"hosts": {"pop1": {"serial": "02", "at": "2026-12-03T07:00:00+00:00"}}})
    db.down = False
    db.store.save_json("state/deploy/a.test.json", {"hosts": {"pop2": {"serial": "02", "at": "x"}}})
    spool = tmp_path / "state" / "spool"
    saved = {f.name: f.read_bytes() for f in spool.iterdir()}
    assert outbox.replay(db.store, outbox.Outbox(spool)) == 2
    assert list(spool.iterdir()) == []
    for name, data in saved.items():  # as if the replaying run died before deleting them
        (spool / name).write_bytes(data)
    outbox.replay(db.store, outbox.Outbox(spool))
    rows = list(db.store.read_audit())
    assert [e["action"] for e in rows] == ["renewed", "deployed", "replayed", "replayed"]
    assert rows[1]["host"] == "pop1" and rows[1]["spool_id"] and rows[1]["spooled_at"] == "2026-12-03T07:00:00.000000Z"
    assert db.store.load_json("state/deploy/a.test.json") == {"hosts": {
        "pop1": {"serial": "02", "at": "2026-12-03T07:00:00+00:00"}, "pop2": {"serial": "02", "at": "x"}}}
    assert outbox.replay(db.store, outbox.Outbox(spool)) == 0
    assert [e["action"] for e in db.store.read_audit()].count("replayed") == 2


def test_a_newer_host_outcome_is_not_overwritten_by_a_spooled_older_one() -> None:
    """Replay merges a deploy document host by host and keeps an entry written after the spooled one."""
    stored = {"hosts": {"pop1": {"serial": "03", "at": "2026-12-03T08:00:00+00:00"}}}
    spooled = {"hosts": {"pop1": {"serial": "02", "at": "2026-12-03T07:00:00+00:00"}, "pop2": {"serial": "02"}}}
    assert outbox._merge(stored, spooled) == {"hosts": {"pop1": stored["hosts"]["pop1"], "pop2": {"serial": "02"}}}


def test_a_private_key_is_never_spooled(tmp_path: Path) -> None:
    """The spool refuses a record holding PEM private key material (nothing written)."""
    box = outbox.Outbox(tmp_path / "spool")
    with pytest.raises(ValueError, match=r"^spool: refusing to write private key material$"):
        box.put({"kind": "audit", "id": "1", "at": "t", "extra": {"k": "-----BEGIN PRIVATE KEY-----"}})
    assert box.files() == []


def test_renew_and_notify_state_after_the_loss_are_spooled_and_merged_on_replay(db: Flaky, tmp_path: Path) -> None:
    """After the loss a renewal's failure state and notify state are spooled as merges (scan results are not: the next
    scan writes them); on replay a newer document written meanwhile stands, and replaying twice changes nothing."""
    from certmgr import docmerge

    s = lose(db, tmp_path)
    failed = {"failures": 1, "last_attempt": T0.isoformat(), "last_error": "CA said no"}
    docmerge.merge_json(s, "state/renew/a.test.json", failed, "renew")
    sent = {"severity": "critical", "sent_at": T0.isoformat(), "kind": "problem"}
    docmerge.merge_json(s, "state/notify/a.test.json", {"at": T0.isoformat(), "channels": {"chat": sent}}, "notify")
    with pytest.raises(StoreUnavailable, match=r": not attempted: "):
        docmerge.merge_json(s, "state/scan/a.test.json", {"scanned_at": T0.isoformat()}, "scan")
    records = [json.loads(f.read_text()) for f in sorted((tmp_path / "state" / "spool").iterdir())]
    assert [(r["kind"], r.get("merger")) for r in records] == [("audit", None), ("merge_json", "renew"),
                                                               ("merge_json", "notify")]
    db.down = False
    later = T0 + dt.timedelta(hours=1)
    db.store.save_json("state/renew/a.test.json", {"failures": 0, "last_attempt": later.isoformat()})  # B renewed since
    db.store.save_json("state/notify/a.test.json", {"channels": {"pager": sent}})  # B notified another channel
    assert outbox.replay(db.store, outbox.Outbox(tmp_path / "state" / "spool")) == 3
    assert db.store.load_json("state/renew/a.test.json") == {"failures": 0, "last_attempt": later.isoformat()}
    assert db.store.load_json("state/notify/a.test.json") == {"channels": {"pager": sent, "chat": sent}}
