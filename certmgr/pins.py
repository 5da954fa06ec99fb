"""Rollback pins and the record of what certmgr revoked, both in the store's state/.

A pin (`state/pin/<name>.json`) says an operator rolled the certificate back to version N on purpose:
`run` keeps version N live and deployed and says so; an explicit `renew NAME` or `deploy NAME`, or a
renewal that can wait no longer (plan.decide), clears it. `state/revoked/<name>.json` lists the serials
certmgr revoked at the CA, so that no rollback ever makes one live again. `state/revoking/<name>.json` is a
revocation asked for and not finished (a replacement, its deploy or the CA's answer still to come): it outlives
a killed `certmgr revoke`, so that the rerun revokes the leaked versions, not the replacement that is live by then.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from certmgr.errors import CertmgrError, StoreError
from certmgr.log import event
from certmgr.store_api import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")


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


_MALFORMED = (KeyError, TypeError, ValueError, OverflowError, AttributeError)


def _document(store: StateStore, name: str, path: str, build: Callable[[dict[str, Any]], T], *, what: str,
              hint: str) -> T | None:
    """The state document at `path` built by `build`; None when absent or empty; one `build` cannot understand
    (a missing key, a wrong type or value) is a StoreError naming the file and `what` it should be."""
    data = store.load_json(path, default=None)
    if not data:
        return None
    try:
        return build(data)
    except _MALFORMED as exc:
        raise StoreError(f"store {name}: {path} is not {what} ({exc!r})", hint=hint) from exc


def _utc(value: Any) -> dt.datetime:
    """An ISO 8601 time from a state document; one written without an offset is UTC."""
    at = dt.datetime.fromisoformat(str(value))
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)


def load_pin(store: StateStore, name: str) -> Pin | None:
    """The pin of `name`, None when it is not pinned. A pin file that cannot be understood is a StoreError."""
    def build(data: dict[str, Any]) -> Pin:
        frm = data.get("rolled_back_from")
        return Pin(version=int(data["version"]), serial=str(data["serial"]),
                   rolled_back_from=int(frm) if frm is not None else None, at=_utc(data["at"]))

    return _document(store, name, _pin_path(name), build, what="a pin",
                     hint=f"`certmgr deploy {name}` clears it, or move the file aside")


# (certificate, pinned version, live version) already logged as an ignored pin by this process
_IGNORED: set[tuple[str, int, int | None]] = set()


def holding_pin(store: StateStore, name: str) -> Pin | None:
    """The pin of `name` if it holds the live version; a pin on another version (a rollback killed between
    saving its pin and switching live) holds nothing and is logged, at WARNING, once per command that reads it
    (a run reads a pin several times: planning, renewing, its report)."""
    pin = load_pin(store, name)
    if pin is None:
        return None
    live = store.live_version(name)
    if live != pin.version:
        if (name, pin.version, live) not in _IGNORED:
            _IGNORED.add((name, pin.version, live))
            event(log, logging.WARNING, "pin ignored: not the live version", cert=name, pinned=pin.version,
                  live=live, hint=f"a rollback that did not finish; `certmgr rollback {name} --to {pin.version}` "
                                  f"or `certmgr deploy {name}`")
        return None
    return pin


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


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingRevocation:
    """`certmgr revoke` was asked to revoke `versions` (`serials`) for `reason` at `at` and has not finished."""

    reason: str
    versions: tuple[int, ...]
    serials: tuple[str, ...]
    now_first: bool
    at: dt.datetime
    # the leaked public key (SPKI DER, hex; "" unknown) and each version's leaf certificate (PEM; "" unknown): a
    # version issued later with that key (reuse_key) is revoked too, and a version pruned from the store meanwhile
    # can still be revoked from its recorded certificate
    spki: str = ""
    leaves: tuple[str, ...] = ()

    def note(self, name: str, revoked: Collection[str] = ()) -> str:
        """One line for `run` and `status`: what is still valid at the CA that should not be (`revoked`: the
        serials certmgr has revoked), and the command that finishes it."""
        left = [f"version {v} (serial {s})" for v, s in zip(self.versions, self.serials, strict=True)
                if s not in revoked]
        state = (f"{', '.join(left)} still valid at the CA" if left else
                 "revoked at the CA, the replacement not yet confirmed on every host")
        return (f"revocation of {name} not finished ({self.reason}, asked {self.at:%Y-%m-%d %H:%M}Z): {state}; "
                f"`certmgr revoke {name} --reason {self.reason}` finishes it")

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "versions": list(self.versions), "serials": list(self.serials),
                "now_first": self.now_first, "at": self.at.isoformat(), "spki": self.spki, "leaves": list(self.leaves)}

    def leaf(self, version: int) -> str:
        """The recorded leaf certificate (PEM) of `version`, "" when not recorded."""
        i = self.versions.index(version)
        return self.leaves[i] if i < len(self.leaves) else ""


def _revoking_path(name: str) -> str:
    return f"state/revoking/{name}.json"


def load_pending(store: StateStore, name: str) -> PendingRevocation | None:
    """The unfinished revocation of `name`, None if there is none; an unreadable record is a StoreError."""
    def build(data: dict[str, Any]) -> PendingRevocation:
        versions = tuple(int(v) for v in data["versions"])
        serials = tuple(str(s) for s in data["serials"])
        leaves = tuple(str(c) for c in data.get("leaves") or ())
        spki = str(data.get("spki") or "")
        bytes.fromhex(spki)  # ValueError unless hex
        if len(versions) != len(serials) or not versions or len(leaves) not in (0, len(versions)):
            raise ValueError("versions, serials and leaves do not pair up")
        return PendingRevocation(reason=str(data["reason"]), versions=versions, serials=serials,
                                 now_first=bool(data.get("now_first", False)), at=_utc(data["at"]),
                                 spki=spki, leaves=leaves)

    return _document(store, name, _revoking_path(name), build, what="a pending revocation",
                     hint=f"see the audit log's 'revoke requested' line for {name}; move the file aside and "
                          f"rerun `certmgr revoke {name} --version N`")


def pending_note(store: StateStore, name: str) -> str | None:
    """The note for `name`'s unfinished revocation, None if there is none; an unreadable record (or record of
    revoked serials) says so. Never raises: status, run, metrics and check call it for every certificate."""
    try:
        pending = load_pending(store, name)
        return pending.note(name, load_revoked(store, name)) if pending is not None else None
    except Exception as exc:  # whatever a damaged document raises is reported, not raised
        return f"revocation record of {name} unreadable: {exc}"


def save_pending(store: StateStore, name: str, pending: PendingRevocation) -> None:
    store.save_json(_revoking_path(name), pending.to_json())


def clear_pending(store: StateStore, name: str) -> None:
    store.save_json(_revoking_path(name), {})


def live_revoked(store: StateStore, name: str, serial: str | None) -> str | None:
    """The reason certmgr revoked `serial` (the live certificate's), None if it did not (or cannot tell)."""
    if serial is None:
        return None
    try:
        entry = load_revoked(store, name).get(serial)
    except CertmgrError as exc:
        event(log, logging.WARNING, "revocation record unreadable, ignored", cert=name, error=str(exc))
        return None
    return str(entry.get("reason") or "revoked") if entry is not None else None


def revocation_pending(store: StateStore, name: str) -> bool:
    """Whether a revocation of `name` is asked for and unfinished; an unreadable record counts as one."""
    try:
        return load_pending(store, name) is not None
    except CertmgrError:
        return True
