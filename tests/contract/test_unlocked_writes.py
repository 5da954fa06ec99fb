"""Writes made without a lock both controllers share (scan results, notify state) and the renewal state a lost
database leaves to the spool: merged into the stored copy (certmgr.docmerge), so neither controller's write is
lost and an older one arriving late changes nothing — against both stores, and two PostgreSQL connections."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest

from certmgr import docmerge, notify
from lab.pg import PgServer
from tests.contract.conftest import open_pg

pytestmark = pytest.mark.integration

NAME = "media.hachyderm.test"
PATH = f"state/notify/{NAME}.json"
T0 = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.UTC)


def sent(severity: str, at: dt.datetime) -> dict[str, Any]:
    return {"severity": severity, "sent_at": at.isoformat(), "kind": "problem"}


def test_two_controllers_notifying_at_once_keep_both_deliveries(fresh_schema: PgServer) -> None:
    """A and B load the notify state at once; A records its chat alert, B its pager alert: both stand (a plain replace kept only B's)."""
    a, b = open_pg(fresh_schema), open_pg(fresh_schema)
    try:
        seen_a, seen_b = notify.load_state(a, [NAME]), notify.load_state(b, [NAME])
        after_a = {NAME: {"chat": sent("critical", T0)}}
        after_b = {NAME: {"pager": sent("critical", T0)}}
        notify.save_state(a, seen_a, after_a, [NAME], T0)
        notify.save_state(b, seen_b, after_b, [NAME], T0)
        assert a.load_json(PATH) == {"channels": {"chat": sent("critical", T0), "pager": sent("critical", T0)}}
    finally:
        a.close()
        b.close()


def test_a_late_resolve_does_not_undo_the_other_controllers_newer_alert(store: Any) -> None:
    """A decided at T0 that the chat alert is resolved; B sent a new one at T0+1h before A's write landed: B's entry stands; a resolve newer than the stored entry removes it."""
    store.save_json(PATH, {"channels": {"chat": sent("critical", T0 + dt.timedelta(hours=1))}})
    before = {NAME: {"chat": sent("warning", T0 - dt.timedelta(hours=1))}}
    notify.save_state(store, before, {NAME: {}}, [NAME], T0)
    assert store.load_json(PATH) == {"channels": {"chat": sent("critical", T0 + dt.timedelta(hours=1))}}
    notify.save_state(store, before, {NAME: {}}, [NAME], T0 + dt.timedelta(hours=2))
    assert store.load_json(PATH) == {"channels": {}}


def test_a_certificate_whose_notify_state_did_not_change_is_not_written(store: Any) -> None:
    """save_state writes only what this run changed: another controller's document for an untouched certificate is left alone."""
    theirs = {"channels": {"pager": sent("warning", T0)}}
    store.save_json(PATH, theirs)
    notify.save_state(store, {NAME: {}}, {NAME: {}}, [NAME], T0 + dt.timedelta(hours=1))
    assert store.load_json(PATH) == theirs


def test_an_older_scan_finishing_later_keeps_the_newer_result(store: Any) -> None:
    """Scan results merge by scanned_at: B's newer scan stands when A's older one is written after it; a newer one replaces it."""
    path = f"state/scan/{NAME}.json"
    newer = {"scanned_at": (T0 + dt.timedelta(minutes=5)).isoformat(), "severity": "ok"}
    docmerge.merge_json(store, path, newer, "scan")
    docmerge.merge_json(store, path, {"scanned_at": T0.isoformat(), "severity": "critical"}, "scan")
    assert store.load_json(path) == newer
    newest = {"scanned_at": (T0 + dt.timedelta(minutes=9)).isoformat(), "severity": "warning"}
    docmerge.merge_json(store, path, newest, "scan")
    assert store.load_json(path) == newest


def _at_once(stores: list[Any], writes: Any) -> None:
    """Run `writes(i)` for each store in its own thread, all released together; re-raise the first error."""
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait()
            writes(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_merges_from_two_connections_lose_nothing(fresh_schema: PgServer) -> None:
    """Two controllers (two connections, two threads) each merge 25 notify deltas into one document at once: all 50 channels are there (the merge is one transaction under the path's advisory lock)."""
    stores = [open_pg(fresh_schema), open_pg(fresh_schema)]

    def writes(i: int) -> None:
        for k in range(25):
            stores[i].merge_json(PATH, {"at": T0.isoformat(), "channels": {f"c{i}-{k}": sent("warning", T0)}}, "notify")

    try:
        _at_once(stores, writes)
        assert sorted(stores[0].load_json(PATH)["channels"]) == sorted(f"c{i}-{k}" for i in range(2) for k in range(25))
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize(("merger", "stored", "new", "expected"), [
    ("notify", None, {"at": "2026-11-27T02:00:00+00:00", "channels": {"c": {"sent_at": "2026-11-27T02:00:00+00:00"}}},
     {"channels": {"c": {"sent_at": "2026-11-27T02:00:00+00:00"}}}),
    ("notify", {"channels": {"c": {"sent_at": "2026-11-27T03:00:00+00:00"}}},
     {"at": "2026-11-27T02:00:00+00:00", "channels": {"c": None}}, docmerge.UNCHANGED),
    ("notify", {"channels": {"c": {"sent_at": "2026-11-27T01:00:00+00:00"}, "d": {}}},
     {"at": "2026-11-27T02:00:00+00:00", "channels": {"c": None}}, {"channels": {"d": {}}}),
    ("renew", {"last_attempt": "2026-11-27T03:00:00+00:00", "failures": 0},
     {"last_attempt": "2026-11-27T02:00:00+00:00", "failures": 1}, docmerge.UNCHANGED),
    ("renew", {"last_attempt": "2026-11-27T01:00:00+00:00", "failures": 0},
     {"last_attempt": "2026-11-27T02:00:00+00:00", "failures": 1},
     {"last_attempt": "2026-11-27T02:00:00+00:00", "failures": 1}),
    ("scan", None, {"scanned_at": "2026-11-27T02:00:00+00:00"}, {"scanned_at": "2026-11-27T02:00:00+00:00"}),
])
def test_mergers_and_replaying_one_twice_changes_nothing(merger: str, stored: Any, new: Any, expected: Any) -> None:
    """Each merger's answer; merging the same write again into its result leaves it unchanged (a replay is a no-op)."""
    got = docmerge.apply(merger, stored, new)
    assert got == expected
    result = stored if got is docmerge.UNCHANGED else got
    assert docmerge.apply(merger, result, new) is docmerge.UNCHANGED


def test_two_connections_writing_scans_out_of_order_keep_the_newest(fresh_schema: PgServer) -> None:
    """Two controllers write 20 scan results each for one certificate, in shuffled order and at once: the newest scanned_at stands (PgStore's one conditional upsert)."""
    import random

    path = f"state/scan/{NAME}.json"
    stores = [open_pg(fresh_schema), open_pg(fresh_schema)]
    times = [T0 + dt.timedelta(seconds=k) for k in range(40)]

    def writes(i: int) -> None:
        mine = times[i::2]
        random.Random(i).shuffle(mine)
        for t in mine:
            stores[i].merge_json(path, {"scanned_at": t.isoformat(), "by": i}, "scan")

    try:
        _at_once(stores, writes)
        assert stores[0].load_json(path) == {"scanned_at": times[-1].isoformat(), "by": 1}
    finally:
        for s in stores:
            s.close()
