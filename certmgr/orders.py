"""ACME orders written to the store before acting, and resumed by the next run (this controller's or another's).

Before new-order: the names, the CA account, the new private key (sealed in PgStore; in the directory
store its own 0600 `state/orders/NAME/privkey.pem`) and the CSR. After the CA answers: the order URL.
The record stays until the certificate is stored. A run that finds one fetches the order and carries
it on (`valid`: download; `ready`: finalize with the stored CSR; `pending`/`processing`: the
authorizations), or abandons it with the reason in the audit log and orders anew: at most one extra
issuance per crash or pause (docs/ha.md).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from acme import messages

from certmgr import keys
from certmgr.dns import Provider
from certmgr.dns.journal import CertJournal
from certmgr.errors import ACMEError, CertmgrError, LockLost, StoreError, StoreUnavailable
from certmgr.fsutil import atomic_write
from certmgr.inventory import Certificate, Inventory
from certmgr.issue import ACMEClient, Issued, account_id
from certmgr.log import event
from certmgr.sealing import Sealer
from certmgr.store_api import batched

log = logging.getLogger(__name__)

ORDERS_DIR = "state/orders"
SEAL_TABLE = "orders"


class OrderStore(Protocol):
    def load_json(self, relpath: str, default: Any = None) -> Any: ...

    def save_json(self, relpath: str, obj: Any, mode: int = ...) -> None: ...

    def remove_json(self, relpath: str) -> None: ...

    def audit(self, action: str, obj: str, **kw: Any) -> None: ...


def order_path(name: str) -> str:
    return f"{ORDERS_DIR}/{name}/order.json"


def _key_file(store: OrderStore, name: str) -> Path | None:
    """Where the directory store keeps a pending order's key: its own 0600 `privkey.pem`, as for every version
    (so no other file ever holds a private key); None for a store without a root (the database seals it)."""
    root = getattr(store, "root", None)
    return root / ORDERS_DIR / name / "privkey.pem" if isinstance(root, Path) else None


def _sealer(store: OrderStore) -> Sealer | None:
    """The database store's sealer (keys never in clear in a row); None for the directory store (0600 file)."""
    sealer = getattr(store, "sealer", None)
    return sealer if isinstance(sealer, Sealer) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingOrder:
    """An order this certificate's last run started and did not see through to a stored certificate."""

    cert: str
    account: str  # issue.account_id of the CA account that places it
    account_uri: str | None  # that account's URL at the CA
    names: tuple[str, ...]
    key_type: str
    privkey: bytes = field(repr=False)
    csr: bytes
    created: dt.datetime
    url: str | None = None  # None: new-order was (about to be) sent, the CA's answer never recorded

    @property
    def seq(self) -> int:
        """Binds the sealed key to this record (a key copied to another record does not open)."""
        return int(self.created.timestamp())

    def to_json(self, sealer: Sealer | None) -> dict[str, Any]:
        out: dict[str, Any] = {"cert": self.cert, "account": self.account, "account_uri": self.account_uri,
                               "names": list(self.names), "key_type": self.key_type, "csr": self.csr.decode(),
                               "created": self.created.isoformat(), "url": self.url}
        if sealer is None:
            out["privkey_file"] = "privkey.pem"  # beside the record (save writes it first)
        else:
            key_id, blob = sealer.seal(self.privkey, table=SEAL_TABLE, name=self.cert, version=self.seq)
            out |= {"key_id": key_id, "privkey_sealed": base64.b64encode(blob).decode()}
        return out

    @classmethod
    def from_json(cls, obj: Any, sealer: Sealer | None, *, where: str, key_file: Path | None = None) -> PendingOrder:
        try:
            created = dt.datetime.fromisoformat(obj["created"])
            created = created if created.tzinfo else created.replace(tzinfo=dt.UTC)
            order = cls(cert=str(obj["cert"]), account=str(obj["account"]),
                        account_uri=None if obj.get("account_uri") is None else str(obj["account_uri"]),
                        names=tuple(str(n) for n in obj["names"]), key_type=str(obj["key_type"]), privkey=b"",
                        csr=str(obj["csr"]).encode(), created=created,
                        url=None if obj.get("url") is None else str(obj["url"]))
            if "privkey_sealed" in obj:
                if sealer is None:
                    raise ValueError("a sealed key in the directory store")
                pem = sealer.open(str(obj["key_id"]), base64.b64decode(obj["privkey_sealed"]), table=SEAL_TABLE,
                                  name=order.cert, version=order.seq)
            else:
                if sealer is not None or key_file is None:
                    raise ValueError("no sealed key in a database record")
                pem = key_file.read_bytes()
            keys.from_pem(pem)  # a record whose key does not load is no order to resume
        except (KeyError, TypeError, ValueError, OSError, CertmgrError) as exc:
            raise StoreError(f"store {where}: the pending order record is unreadable ({type(exc).__name__}: {exc})",
                             hint="it is abandoned and the certificate ordered anew") from exc
        return replace(order, privkey=pem)


class Recorder:
    """Saves one new order's record for `issue.ACMEClient.issue` (its `OrderLog`): before new-order, then the URL."""

    def __init__(self, store: OrderStore, cert: Certificate, *, account: str, account_uri: str | None,
                 key: keys.PrivateKey, clock: Callable[[], dt.datetime]) -> None:
        self._store = store
        self._cert = cert
        self._account = account
        self._account_uri = account_uri
        self._key = key
        self._clock = clock
        self.order: PendingOrder | None = None

    def placing(self, csr_pem: bytes) -> None:
        self.order = PendingOrder(cert=self._cert.name, account=self._account, account_uri=self._account_uri,
                                  names=tuple(self._cert.domains), key_type=keys.key_type(self._key),
                                  privkey=keys.to_pem(self._key), csr=csr_pem, created=self._clock())
        save(self._store, self.order)

    def placed(self, url: str) -> None:
        assert self.order is not None, "placed() before placing()"
        self.order = replace(self.order, url=url)
        # Not waited for on the disk (PgStore.batch durable=False), and safe so: another controller sees it at
        # once (only a database crash can lose it, never half of it); the next durable commit — the DNS journal's,
        # before any record is published, or the renewal's — flushes it too; and a lost URL is what a kill
        # between new-order and this save leaves: the next run abandons the record and orders anew.
        with batched(self._store, f"record the order URL of {self._cert.name}", durable=False):
            save(self._store, self.order)


def save(store: OrderStore, order: PendingOrder) -> None:
    sealer = _sealer(store)
    key_file = None if sealer is not None else _key_file(store, order.cert)
    if sealer is None:
        if key_file is None:
            raise StoreError(f"store {order_path(order.cert)}: nowhere to keep the order's private key")
        try:
            key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(key_file, order.privkey, 0o600)
        except OSError as exc:
            raise StoreError(f"store {ORDERS_DIR}/{order.cert}/privkey.pem: cannot write: {exc.strerror} "
                             "(order not placed)") from exc
    store.save_json(order_path(order.cert), order.to_json(sealer))  # mode 0600 (the default)


def load(store: OrderStore, name: str) -> PendingOrder | None:
    """The pending order of `name`, None when there is none; StoreError when its record is unreadable."""
    raw = store.load_json(order_path(name), default=None)
    return None if raw is None else PendingOrder.from_json(raw, _sealer(store), where=order_path(name),
                                                           key_file=_key_file(store, name))


def settle(store: OrderStore, name: str, *, abandoned: str | None = None) -> None:
    """Forget `name`'s pending order: its certificate is stored, or (`abandoned`: why) it is given up, audited."""
    with batched(store, f"settle the order of {name}"):  # the row commits with the removal it records
        if abandoned is not None:
            store.audit("order abandoned", name, reason=abandoned, message=f"order abandoned: {abandoned}")
        store.remove_json(order_path(name))
    if abandoned is not None:
        event(log, logging.WARNING, "order abandoned", cert=name, reason=abandoned)
    key_file = _key_file(store, name)
    if key_file is not None:
        key_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            key_file.parent.rmdir()


def why_not_resume(order: PendingOrder, cert: Certificate, *, account: str, account_uri: str | None,
                   new_key: bool) -> str | None:
    """Why a recorded order cannot be carried on without asking the CA (None: ask it)."""
    if order.account != account or (order.account_uri and account_uri and order.account_uri != account_uri):
        return f"placed by another ACME account ({order.account_uri or order.account})"
    if sorted(order.names) != sorted(cert.domains):
        return f"the certificate's names changed (the order is for {', '.join(order.names)})"
    if order.key_type != cert.key_type:
        return f"the key type changed ({order.key_type} → {cert.key_type})"
    if new_key:
        return "a new key was asked for"
    if order.url is None:
        return "no order URL recorded (the CA's answer to new-order never arrived)"
    return None


def why_dead(body: messages.Order, now: dt.datetime) -> str | None:
    """RFC 8555 §7.1.6: an order that is invalid or past `expires` can never give a certificate (None: alive)."""
    if body.status == messages.STATUS_INVALID:
        err = body.error
        return f"the CA marked it invalid ({err.detail if err is not None and err.detail else 'no detail'})"
    expires = body.expires
    if expires is not None:
        expires = expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)
        if expires <= now:
            return f"expired at {expires.astimezone(dt.UTC):%Y-%m-%d %H:%M}Z"
    if body.status not in (messages.STATUS_PENDING, messages.STATUS_READY, messages.STATUS_PROCESSING,
                           messages.STATUS_VALID):
        return f"unexpected status {body.status.name}"
    return None


async def obtain(store: OrderStore, client: ACMEClient, cert: Certificate, *,
                 make_key: Callable[[], Awaitable[keys.PrivateKey]], new_key: bool, inventory: Inventory,
                 providers: Mapping[str, Provider], replaces: str | None, journal: CertJournal | None,
                 clock: Callable[[], dt.datetime] | None = None) -> Issued:
    """The certificate from `cert`'s pending order when the CA can still give it, else from a new, recorded order.

    The caller stores the certificate and then calls `settle` (the record is kept until then). A failure
    leaves the record: the next run asks the CA again, and abandons it only on the CA's word.
    """
    now = clock or (lambda: dt.datetime.now(dt.UTC))
    account = account_id(client.ca)
    account_uri = client.regr.uri if client.regr is not None else None
    try:
        pending = load(store, cert.name)
    except (StoreUnavailable, LockLost):
        raise  # the database, not the record: nothing is abandoned, nothing ordered
    except StoreError as exc:
        settle(store, cert.name, abandoned=f"record unreadable: {exc}")
        pending = None
    if pending is not None:
        reason = why_not_resume(pending, cert, account=account, account_uri=account_uri, new_key=new_key)
        body: messages.Order | None = None
        if reason is None:
            assert pending.url is not None
            try:
                body = await client.fetch_order(cert, pending.url)
            except ACMEError as exc:
                if exc.retryable:  # the CA is unreachable or failing: keep the record for the next run
                    raise
                reason = f"the CA no longer serves it ({exc.detail or exc})"
            else:
                reason = why_dead(body, now())
        if reason is None and body is not None and pending.url is not None:
            store.audit("order resumed", cert.name, url=pending.url, status=body.status.name,
                        placed=pending.created.isoformat())
            event(log, logging.INFO, "order resumed", cert=cert.name, status=body.status.name, url=pending.url)
            return await client.resume(cert, keys.from_pem(pending.privkey), pending.csr, pending.url, body,
                                       inventory=inventory, providers=providers, journal=journal)
        settle(store, cert.name, abandoned=reason or "unknown")
    key = await make_key()
    recorder = Recorder(store, cert, account=account, account_uri=account_uri, key=key, clock=now)
    return await client.issue(cert, key, inventory=inventory, providers=providers, replaces=replaces,
                              journal=journal, record=recorder)
