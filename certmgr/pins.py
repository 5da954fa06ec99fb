"""Rollback pins and the record of what certmgr revoked, both in the store's state/.

A pin (`state/pin/<name>.json`) says an operator rolled the certificate back to version N on purpose:
`run` keeps version N live and deployed and says so; an explicit `renew NAME` or `deploy NAME`, or a
renewal that can wait no longer (plan.decide), clears it. `state/revoked/<name>.json` lists the serials
certmgr revoked at the CA, so that no rollback ever makes one live again.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from certmgr.errors import CertmgrError, StoreError
from certmgr.log import event
from certmgr.store_api import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pin:
    """The certificate is pinned to rolled-back `version` (`serial`), rolled back from `rolled_back_from`."""

    version: int
    serial: str
    rolled_back_from: int | None
    at: dt.datetime

    def note(self, name: str) -> str:
        """One line for `run`, `status` and chat: pinned to what, since when, and what clears it."""
        since = f"from version {self.rolled_back_from}, " if self.rolled_back_from is not None else ""
        return (f"pinned {name} to rolled-back version {self.version} ({since}{self.at:%Y-%m-%d %H:%M}Z): "
                f"run keeps version {self.version} live and deployed, not the newest; "
                f"`certmgr deploy {name}` or `certmgr renew {name}` clears the pin")

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "serial": self.serial, "rolled_back_from": self.rolled_back_from,
                "at": self.at.isoformat()}


def _pin_path(name: str) -> str:
    return f"state/pin/{name}.json"


def _revoked_path(name: str) -> str:
    return f"state/revoked/{name}.json"


def load_pin(store: StateStore, name: str) -> Pin | None:
    """The pin of `name`, None when it is not pinned. A pin file that cannot be understood is a StoreError."""
    data = store.load_json(_pin_path(name), default=None)
    if not data:
        return None
    try:
        at = dt.datetime.fromisoformat(str(data["at"]))
        frm = data.get("rolled_back_from")
        return Pin(version=int(data["version"]), serial=str(data["serial"]),
                   rolled_back_from=int(frm) if frm is not None else None,
                   at=at if at.tzinfo else at.replace(tzinfo=dt.UTC))
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"store {name}: state/pin/{name}.json is not a pin ({exc!r})",
                         hint=f"`certmgr deploy {name}` clears it, or move the file aside") from exc


def save_pin(store: StateStore, name: str, pin: Pin) -> None:
    store.save_json(_pin_path(name), pin.to_json())


def clear_pin(store: StateStore, name: str, *, why: str) -> Pin | None:
    """Remove the pin of `name` (audited "unpinned", logged); the pin that was cleared, or None."""
    try:
        pin = load_pin(store, name)
    except StoreError:
        pin = Pin(version=0, serial="?", rolled_back_from=None, at=dt.datetime.now(dt.UTC))  # unreadable: drop it
    if pin is None:
        return None
    store.save_json(_pin_path(name), {})
    event(log, logging.WARNING, "pin cleared", cert=name, version=pin.version, why=why)
    try:
        store.audit("unpinned", name, frm=pin.version, why=why,
                    summary=f"{name} is no longer pinned to rolled-back version {pin.version}: {why}")
    except CertmgrError as exc:
        event(log, logging.ERROR, "audit line lost", action="unpinned", cert=name, error=str(exc))
    return pin


def load_revoked(store: StateStore, name: str) -> dict[str, dict[str, Any]]:
    """{serial: {"version", "reason", "at"}} for every certificate of `name` that certmgr revoked."""
    data = store.load_json(_revoked_path(name), default=None) or {}
    serials = data.get("serials") if isinstance(data, dict) else None
    return {str(k): dict(v) for k, v in serials.items() if isinstance(v, dict)} if isinstance(serials, dict) else {}


def record_revoked(store: StateStore, name: str, serial: str, *, version: int | None, reason: str,
                   at: dt.datetime) -> None:
    """Remember that certmgr revoked `serial` (read-modify-write: hold the store lock)."""
    serials = load_revoked(store, name)
    serials[serial] = {"version": version, "reason": reason, "at": at.isoformat()}
    store.save_json(_revoked_path(name), {"serials": serials})
