"""certmgr.orders.obtain with a scripted CA client: resume, abandon with the reason, or keep the record."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from acme import messages

from certmgr import keys, orders
from certmgr.errors import ACMEError, StoreUnavailable
from certmgr.inventory import CA, Certificate
from certmgr.issue import account_id
from certmgr.store import Store

T0 = dt.datetime(2026, 12, 3, 7, 0, tzinfo=dt.UTC)
CERT = Certificate(name="a.test", domains=("a.test",), dns="lab", hosts=(), ca="lab")
PEBBLE = CA(name="lab", directory="https://ca.test/dir")
KEY = keys.generate("ecdsa-p256")


class Client:
    """The parts of issue.ACMEClient that obtain uses; records what it was asked to do."""

    ca = PEBBLE
    regr = messages.RegistrationResource(body=messages.Registration(), uri="https://ca.test/acct/1")

    def __init__(self, fetched: messages.Order | Exception) -> None:
        self.fetched = fetched
        self.calls: list[str] = []

    async def fetch_order(self, cert: Certificate, uri: str) -> messages.Order:
        self.calls.append(f"fetch {uri}")
        if isinstance(self.fetched, Exception):
            raise self.fetched
        return self.fetched

    async def resume(self, cert: Certificate, key: Any, csr: bytes, uri: str, body: messages.Order,
                     **kw: Any) -> str:
        self.calls.append(f"resume {uri} {body.status.name}")
        return "resumed"

    async def issue(self, cert: Certificate, key: Any, *, record: orders.Recorder, **kw: Any) -> str:
        record.placing(keys.csr(key, cert.domains))
        record.placed("https://ca.test/order/new")
        self.calls.append("issue")
        return "issued"


def obtain(store: Any, client: Client) -> Any:
    async def make_key() -> keys.PrivateKey:
        return KEY

    return asyncio.run(orders.obtain(store, client, CERT, make_key=make_key, new_key=False,  # type: ignore[arg-type]
                                     inventory=None, providers={}, replaces=None, journal=None,  # type: ignore[arg-type]
                                     clock=lambda: T0))


def recorded(store: Store, url: str | None = "https://ca.test/order/1") -> None:
    orders.save(store, orders.PendingOrder(cert=CERT.name, account=account_id(PEBBLE), account_uri=Client.regr.uri,
                                           names=CERT.domains, key_type="ecdsa-p256", privkey=keys.to_pem(KEY),
                                           csr=keys.csr(KEY, CERT.domains), created=T0, url=url))


def body(status: str) -> messages.Order:
    return messages.Order.from_json({"status": status, "identifiers": [], "authorizations": []})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state", clock=lambda: T0)


def actions(store: Store) -> list[tuple[str, str | None]]:
    return [(e["action"], e.get("reason")) for e in store.read_audit()]


def test_no_record_orders_anew_and_records_it_before_and_after(store: Store) -> None:
    """Without a pending order, obtain places a new one whose record (key, CSR, then URL) is in the store."""
    client = Client(body("valid"))
    assert obtain(store, client) == "issued"
    assert client.calls == ["issue"]
    saved = orders.load(store, CERT.name)
    assert saved is not None and saved.url == "https://ca.test/order/new" and saved.privkey == keys.to_pem(KEY)


def test_a_live_order_is_resumed_and_audited(store: Store) -> None:
    """A recorded order the CA still has as `ready` is resumed (audited `order resumed`), nothing new placed."""
    recorded(store)
    client = Client(body("ready"))
    assert obtain(store, client) == "resumed"
    assert client.calls == ["fetch https://ca.test/order/1", "resume https://ca.test/order/1 ready"]
    assert actions(store) == [("order resumed", None)]


@pytest.mark.parametrize(("fetched", "reason"), [
    (body("invalid"), "the CA marked it invalid (no detail)"),
    (ACMEError("acme order a.test: malformed: No order for ID 1 (order not resumed)", detail="No order for ID 1",
               retryable=False), "the CA no longer serves it (No order for ID 1)"),
])
def test_a_dead_order_is_abandoned_with_the_ca_reason_and_ordered_anew(store: Store, fetched: Any,
                                                                       reason: str) -> None:
    """An order the CA calls invalid or no longer serves: `order abandoned` with the reason, one new order."""
    recorded(store)
    client = Client(fetched)
    assert obtain(store, client) == "issued"
    assert actions(store) == [("order abandoned", reason)]
    assert client.calls[-1] == "issue"


def test_the_ca_unreachable_keeps_the_record(store: Store) -> None:
    """A retryable failure fetching the order raises and keeps the record: the next run asks again."""
    recorded(store)
    with pytest.raises(ACMEError):
        obtain(store, Client(ACMEError("acme order a.test: CA unreachable: connection failed (order not resumed)")))
    assert orders.load(store, CERT.name) is not None and actions(store) == []


def test_an_unreadable_record_is_abandoned(store: Store) -> None:
    """A record that does not parse is abandoned (audited with why) and the certificate ordered anew."""
    store.save_json(orders.order_path(CERT.name), {"cert": CERT.name})
    assert obtain(store, Client(body("valid"))) == "issued"
    [(action, reason)] = actions(store)
    assert action == "order abandoned" and reason is not None and reason.startswith(
        "record unreadable: store state/orders/a.test/order.json: the pending order record is unreadable (KeyError: ")


def test_a_lost_database_abandons_nothing_and_orders_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """StoreUnavailable reading the record propagates: no audit, no order (the next run decides)."""
    recorded(store)

    def down(*a: Any, **k: Any) -> Any:
        raise StoreUnavailable("store db: read state/orders/a.test.json: database connection lost (not written)")

    monkeypatch.setattr(store, "load_json", down)
    client = Client(body("valid"))
    with pytest.raises(StoreUnavailable):
        obtain(store, client)
    assert client.calls == [] and actions(store) == []
