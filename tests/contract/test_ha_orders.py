"""Pending ACME orders (certmgr/orders.py) and the DNS journal in both stores: kept whole, keys never in clear in
the database, a record that cannot be trusted abandoned, two controllers' journal writes merged."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from acme import messages

from certmgr import keys, orders
from certmgr.dns import TXTRecord
from certmgr.dns.journal import JOURNAL_PATH, Journal
from certmgr.errors import StoreError
from certmgr.inventory import Certificate
from certmgr.pgstore import PgStore
from certmgr.store import Store
from lab.pg import PgServer
from tests.contract.conftest import FIXED, open_pg, owner_conn

NAME = "media.hachyderm.test"
KEY = keys.generate("ecdsa-p256")


def pending(url: str | None = "https://ca.test/my-order/1", **kw: Any) -> orders.PendingOrder:
    base: dict[str, Any] = {"cert": NAME, "account": "pebble-0123456789", "account_uri": "https://ca.test/my-account/1",
                            "names": (NAME, "files.hachyderm.test"), "key_type": "ecdsa-p256",
                            "privkey": keys.to_pem(KEY), "csr": keys.csr(KEY, (NAME,)), "created": FIXED, "url": url}
    return orders.PendingOrder(**(base | kw))


def cert(**kw: Any) -> Certificate:
    return Certificate(name=NAME, domains=kw.pop("domains", (NAME, "files.hachyderm.test")),
                       key_type=kw.pop("key_type", "ecdsa-p256"), ca="pebble", dns="lab", hosts=(), **kw)


def test_a_pending_order_reads_back_whole_and_its_key_is_never_in_clear_in_the_database(store: Any,
                                                                                        tmp_path: Path) -> None:
    """A saved pending order reads back equal in both stores; the directory keeps it 0600, the database sealed."""
    order = pending()
    orders.save(store, order)
    assert orders.load(store, NAME) == order
    assert orders.load(store, "other.hachyderm.test") is None
    if isinstance(store, Store):
        path = store.root / orders.order_path(NAME)
        key = path.with_name("privkey.pem")
        assert path.stat().st_mode & 0o777 == 0o600 and key.stat().st_mode & 0o777 == 0o600
        assert "PRIVATE KEY" not in path.read_text() and key.read_bytes() == keys.to_pem(KEY)
        assert path.parent.stat().st_mode & 0o777 == 0o700
    else:
        raw = store.load_json(orders.order_path(NAME))
        assert "PRIVATE KEY" not in json.dumps(raw) and "privkey" not in raw and raw["privkey_sealed"]
    orders.settle(store, NAME)
    assert orders.load(store, NAME) is None
    assert [e for e in store.read_audit() if e["action"] == "order abandoned"] == []
    if isinstance(store, Store):
        assert not (store.root / orders.ORDERS_DIR / NAME).exists(), "the key file goes with the record"


def test_abandoning_audits_the_reason_and_forgets_the_record(store: Any) -> None:
    """settle(abandoned=…) writes one `order abandoned` audit row with the reason and removes the record."""
    orders.save(store, pending())
    orders.settle(store, NAME, abandoned="the CA marked it invalid (x)")
    [row] = [e for e in store.read_audit() if e["action"] == "order abandoned"]
    assert (row["object"], row["reason"], row["message"]) == (
        NAME, "the CA marked it invalid (x)", "order abandoned: the CA marked it invalid (x)")
    assert orders.load(store, NAME) is None


def test_a_sealed_key_moved_to_another_certificate_does_not_open(fresh_schema: PgServer) -> None:
    """A pending order's sealed key copied under another name reads as unreadable (bound to its certificate)."""
    with open_pg(fresh_schema) as s:
        orders.save(s, pending())
        raw = s.load_json(orders.order_path(NAME))
        other = "files.hachyderm.test"
        s.save_json(orders.order_path(other), raw | {"cert": other})
        with pytest.raises(StoreError, match=r"^store state/orders/files\.hachyderm\.test/order\.json: the pending order "
                                             r"record is unreadable \(StoreError: "):
            orders.load(s, other)


def test_a_directory_record_copied_into_the_database_is_refused(fresh_schema: PgServer, tmp_path: Path) -> None:
    """A directory store's record copied into the database by hand (no sealed key) reads as unreadable there."""
    d = Store.open(tmp_path / "state")
    orders.save(d, pending())
    with open_pg(fresh_schema) as s:
        s.save_json(orders.order_path(NAME), d.load_json(orders.order_path(NAME)))
        with pytest.raises(StoreError, match="no sealed key in a database record"):
            orders.load(s, NAME)


@pytest.mark.parametrize(("order", "crt", "new_key", "reason"), [
    (pending(), cert(), False, None),
    (pending(account="other-ffffffffff"), cert(), False, "placed by another ACME account (https://ca.test/my-account/1)"),
    (pending(account_uri="https://ca.test/my-account/9"), cert(), False,
     "placed by another ACME account (https://ca.test/my-account/9)"),
    (pending(), cert(domains=(NAME,)), False,
     "the certificate's names changed (the order is for media.hachyderm.test, files.hachyderm.test)"),
    (pending(), cert(key_type="rsa-2048"), False, "the key type changed (ecdsa-p256 → rsa-2048)"),
    (pending(), cert(), True, "a new key was asked for"),
    (pending(url=None), cert(), False, "no order URL recorded (the CA's answer to new-order never arrived)"),
])
def test_why_a_recorded_order_is_not_resumed(order: orders.PendingOrder, crt: Certificate, new_key: bool,
                                             reason: str | None) -> None:
    """A recorded order is carried on only for the same account, names and key type, with a URL and no --new-key."""
    assert orders.why_not_resume(order, crt, account="pebble-0123456789", account_uri="https://ca.test/my-account/1",
                                 new_key=new_key) == reason


def _order(status: str, expires: dt.datetime | None = None, detail: str | None = None) -> messages.Order:
    body: dict[str, Any] = {"status": status, "identifiers": [], "authorizations": []}
    if expires is not None:
        body["expires"] = expires.isoformat()
    if detail is not None:
        body["error"] = {"type": "urn:ietf:params:acme:error:unauthorized", "detail": detail}
    return messages.Order.from_json(body)


@pytest.mark.parametrize(("body", "reason"), [
    (_order("pending", FIXED + dt.timedelta(hours=1)), None),
    (_order("ready"), None),
    (_order("processing"), None),
    (_order("valid", FIXED - dt.timedelta(hours=1)), "expired at 2026-11-27 01:00Z"),
    (_order("invalid", detail="challenge failed"), "the CA marked it invalid (challenge failed)"),
    (_order("invalid"), "the CA marked it invalid (no detail)"),
    (_order("pending", FIXED), "expired at 2026-11-27 02:00Z"),
])
def test_which_orders_the_ca_can_no_longer_finish(body: messages.Order, reason: str | None) -> None:
    """RFC 8555 §7.1.6: an invalid or expired order is abandoned; pending, ready, processing and valid are resumed."""
    assert orders.why_dead(body, FIXED) == reason


def _rec(value: str) -> TXTRecord:
    return TXTRecord(fqdn=f"_acme-challenge.{NAME}", zone="hachyderm.test", value=value, domain=NAME)


def test_two_runs_journaling_at_once_lose_neither_record(store: Any) -> None:
    """Two journals loaded before either writes (two controllers): each save keeps the other's entries; a drop
    removes only what that run saw removed."""
    a = Journal.load(store, clock=lambda: FIXED)
    b = Journal.load(store, clock=lambda: FIXED)
    a.written("lab", "a.test", [_rec("va")])
    b.written("lab", "b.test", [_rec("vb")])
    assert sorted(e["value"] for e in store.load_json(JOURNAL_PATH)) == ["va", "vb"]
    a.drop([_rec("va").key])
    assert [e["value"] for e in store.load_json(JOURNAL_PATH)] == ["vb"]
    b.drop([_rec("vb").key])
    assert store.load_json(JOURNAL_PATH) == []


def test_the_journal_lives_in_the_database_with_the_postgres_store(fresh_schema: PgServer) -> None:
    """With PgStore the DNS journal is a row of certmgr_json (what a new holder reads), not a file."""
    with open_pg(fresh_schema) as s:
        assert isinstance(s, PgStore)
        Journal.load(s, clock=lambda: FIXED).written("lab", NAME, [_rec("v1")])
    with owner_conn(fresh_schema) as conn:
        row = conn.execute("SELECT body FROM certmgr_json WHERE path = %s", (JOURNAL_PATH,)).fetchone()
    assert row is not None and [e["value"] for e in row[0]] == ["v1"]
