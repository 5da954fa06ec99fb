"""Pure renewal decisions: renew now, later, or overdue — and why — from inventory, live certificate, state and `now`.

No I/O, no clock: `now` is passed in. `RenewState` is what `renew` persists per certificate in
`state/renew/<name>.json`; `decide` turns it into a `Decision` that renew, scan and status can show.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from certmgr.inventory import Certificate
from certmgr.material import CertInfo

# Retries after consecutive failures (certmagic's explicit table, coarser): ~1 min, 10 min, 100 min,
# then daily, so that a broken certificate never hammers the CA from a timer.
BACKOFF = (dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100), dt.timedelta(days=1))

# A failed renewal is retried well inside what is left: the table's delay is capped at this fraction
# of the time that remained at the failure (2 days left → retried within ~5 h, not after a day; a
# 40-second lab certificate with 20 s left → within 2 s). An expired certificate uses its lifetime.
BACKOFF_CAP = 0.1
# Renewal times are spread so that certificates issued together do not renew together forever: each
# certificate renews up to this fraction of its renewal window early, by `RenewState.spread` (drawn
# once per issued certificate, kept in its state). The ARI window, when the CA offers one, wins.
SPREAD = 0.2

SHORT_LIVED = dt.timedelta(days=10)
# How long past its renewal time a certificate may go unrenewed before it is "overdue": one daily
# timer period, but never more than a quarter of the time that was left at the renewal time.
OVERDUE_GRACE = dt.timedelta(hours=24)


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewState:
    """Per-certificate renewal memory across runs (failures, backoff, ARI window)."""

    failures: int = 0
    last_attempt: dt.datetime | None = None
    last_failure: dt.datetime | None = None
    last_error: str | None = None
    retry_after: dt.datetime | None = None  # the CA's Retry-After (429, ARI) for new orders
    last_success: dt.datetime | None = None
    # RFC 9773 (ARI): the CA's suggested window for the certificate with serial `ari_serial`
    ari_serial: str | None = None
    ari_start: dt.datetime | None = None
    ari_end: dt.datetime | None = None
    ari_renew_at: dt.datetime | None = None  # random point in the window, chosen once and kept
    ari_next_fetch: dt.datetime | None = None  # Retry-After of the renewalInfo response
    ari_explanation: str | None = None
    spread: float | None = None  # 0..1: how far into the early margin (SPREAD) this certificate renews

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RenewState:
        if not data:
            return cls()
        kwargs: dict[str, Any] = {}
        for name in cls.__slots__:
            if name not in data or data[name] is None:
                continue
            value = data[name]
            if name in ("failures",):
                kwargs[name] = int(value)
            elif name == "spread":
                kwargs[name] = min(max(float(value), 0.0), 1.0)
            elif name in ("last_error", "ari_serial", "ari_explanation"):
                kwargs[name] = str(value)
            else:
                parsed = dt.datetime.fromisoformat(str(value))
                kwargs[name] = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        return cls(**kwargs)

    def failed(self, now: dt.datetime, error: str, *, retry_after: dt.datetime | None = None) -> RenewState:
        return replace(self, failures=self.failures + 1, last_attempt=now, last_failure=now, last_error=error,
                       retry_after=retry_after)

    def succeeded(self, now: dt.datetime, *, spread: float | None = None) -> RenewState:
        """After a renewal: failures and the replaced certificate's ARI window forgotten, `spread` for the new one."""
        return replace(self, failures=0, last_attempt=now, last_error=None, retry_after=None, last_success=now,
                       ari_serial=None, ari_start=None, ari_end=None, ari_renew_at=None, ari_next_fetch=None,
                       ari_explanation=None, spread=spread)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Whether to renew now and why; `overdue` means past the renewal time and still not renewed."""

    due: bool  # inside the renewal window (or no usable certificate)
    overdue: bool
    reason: str
    renew_at: dt.datetime | None = None  # when the certificate enters (entered) its renewal window
    overdue_at: dt.datetime | None = None
    not_after: dt.datetime | None = None
    blocked_until: dt.datetime | None = None  # backoff or the CA's Retry-After after failures
    source: str = "lifetime"  # "ari" | "renew_before" | "lifetime" | "missing" | "changed" | "pin" | "revoked"
    notes: tuple[str, ...] = field(default=())

    @property
    def attempt(self) -> bool:
        """Renew in this run without --force: due and not held back by backoff."""
        return self.due and self.blocked_until is None

    def to_json(self) -> dict[str, Any]:
        return {
            "due": self.due, "overdue": self.overdue, "attempt": self.attempt, "reason": self.reason,
            "renew_at": _iso(self.renew_at), "overdue_at": _iso(self.overdue_at), "not_after": _iso(self.not_after),
            "blocked_until": _iso(self.blocked_until), "source": self.source,
        }


def renew_before_seconds(cert: Certificate, lifetime: dt.timedelta) -> tuple[float, str]:
    """Seconds before expiry at which renewal starts, and a label saying where that came from."""
    life = lifetime.total_seconds()
    if cert.renew_before is not None:
        return cert.renew_before.before(life), f"renew_before {cert.renew_before}"
    if lifetime < SHORT_LIVED:
        return life / 2, "1/2 of lifetime (under 10 days)"
    return life / 3, "1/3 of lifetime"


def spread_of(serial: str) -> float:
    """A stable 0..1 value for a certificate serial (its renewal-time spread): pure, same on every run."""
    digest = hashlib.sha256(serial.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 0xFFFFFFFF


def backoff_until(state: RenewState, live: CertInfo | None = None) -> dt.datetime | None:
    """When the next attempt is allowed after `state.failures` consecutive failures (None: now).

    The table's delay is capped at BACKOFF_CAP of what remained of `live` at the failure (of its
    lifetime once expired), so that nothing in the schedule assumes certificates live for days.
    The CA's own Retry-After is honoured uncapped.
    """
    if state.failures <= 0 or state.last_failure is None:
        return None
    delay = BACKOFF[min(state.failures, len(BACKOFF)) - 1]
    if live is not None:
        left = live.not_after - state.last_failure
        cap = (left if left > dt.timedelta(0) else live.lifetime) * BACKOFF_CAP
        delay = min(delay, max(cap, dt.timedelta(seconds=1)))
    until = state.last_failure + delay
    if state.retry_after is not None and state.retry_after > until:
        until = state.retry_after
    return until


def decide(cert: Certificate, live_info: CertInfo | None, state: RenewState, now: dt.datetime, *,
           pinned: int | None = None, release_pin: bool = False, revoked: str | None = None) -> Decision:
    """Renew now / later / overdue, and why. Pure: everything, including `now`, is passed in.

    `pinned`: the live version is rolled-back version N, pinned by `certmgr rollback` (see pin_hold).
    `release_pin`: an operator named the certificate (`renew NAME`): a pinned certificate renews now.
    `revoked`: certmgr revoked the live certificate at the CA (the reason): it renews now, pinned or not
    (`certmgr revoke --now` killed before its replacement was live leaves exactly that).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    blocked = backoff_until(state, live_info)
    if blocked is not None and blocked <= now:
        blocked = None
    fail_note = (f"{state.failures} failed attempt{'s' if state.failures != 1 else ''}, last: {state.last_error}"
                 if state.failures else None)
    notes = (fail_note,) if fail_note else ()

    if live_info is None:
        return Decision(due=True, overdue=state.failures > 0, reason="no certificate yet", blocked_until=blocked,
                        source="missing", notes=notes)
    want = sorted(cert.domains)
    have = sorted(live_info.names)
    not_after = live_info.not_after
    if want != have:
        added = sorted(set(want) - set(have))
        removed = sorted(set(have) - set(want))
        what = "; ".join(p for p in (f"added {', '.join(added)}" if added else "",
                                     f"removed {', '.join(removed)}" if removed else "") if p)
        return Decision(due=True, overdue=now >= not_after, reason=f"names changed ({what})", not_after=not_after,
                        blocked_until=blocked, source="changed", notes=notes)
    if live_info.key_type != cert.key_type and not cert.reuse_key:
        return Decision(due=True, overdue=now >= not_after,
                        reason=f"key type changed ({live_info.key_type} → {cert.key_type})", not_after=not_after,
                        blocked_until=blocked, source="changed", notes=notes)

    if revoked is not None:
        return Decision(due=True, overdue=True, reason=f"the live certificate was revoked by certmgr ({revoked})",
                        not_after=not_after, blocked_until=blocked, source="revoked", notes=notes)
    if pinned is not None:
        return pin_hold(cert, live_info, pinned, now, release=release_pin, blocked=blocked, notes=notes)

    ari_valid = (state.ari_serial == live_info.serial and state.ari_start is not None and state.ari_end is not None)
    if ari_valid:
        assert state.ari_start is not None and state.ari_end is not None
        renew_at = state.ari_renew_at or state.ari_start
        overdue_at = state.ari_end
        source = "ari"
        label = f"CA's renewal window {state.ari_start:%Y-%m-%d %H:%M} – {state.ari_end:%Y-%m-%d %H:%M}Z"
    else:
        before, label = renew_before_seconds(cert, live_info.lifetime)
        if state.spread is not None:  # up to SPREAD of the window earlier, stable for this certificate
            before += before * SPREAD * state.spread
            label += f", spread {state.spread * SPREAD:.0%} early"
        renew_at = not_after - dt.timedelta(seconds=before)
        overdue_at = renew_at + min(OVERDUE_GRACE, (not_after - renew_at) / 4)
        source = "renew_before" if cert.renew_before is not None else "lifetime"

    left = _human(not_after - now)
    if now >= not_after:
        return Decision(due=True, overdue=True, reason=f"expired {_human(now - not_after)} ago", renew_at=renew_at,
                        overdue_at=overdue_at, not_after=not_after, blocked_until=blocked, source=source, notes=notes)
    if now >= renew_at:
        overdue = now >= overdue_at or state.failures > 0
        reason = f"{left} left, inside renewal window ({label})"
        if overdue:
            reason = f"overdue: {left} left, renewal time {renew_at:%Y-%m-%d %H:%M}Z passed ({label})"
        return Decision(due=True, overdue=overdue, reason=reason, renew_at=renew_at, overdue_at=overdue_at,
                        not_after=not_after, blocked_until=blocked, source=source, notes=notes)
    return Decision(due=False, overdue=False, reason=f"{left} left, renews from {renew_at:%Y-%m-%d %H:%M}Z ({label})",
                    renew_at=renew_at, overdue_at=overdue_at, not_after=not_after, blocked_until=None, source=source,
                    notes=notes)


def pin_hold(cert: Certificate, live_info: CertInfo, pinned: int, now: dt.datetime, *, release: bool = False,
             blocked: dt.datetime | None = None, notes: tuple[str, ...] = ()) -> Decision:
    """A rolled-back, pinned version: renewal waits (a renewal would undo the rollback), but never past the
    last third of the renewal period (renew_before, else 1/3 of lifetime), so a pin cannot let it expire.

    When renewal can wait no longer, or an operator names the certificate, renewal is due; its success clears
    the pin. The CA's ARI window belongs to the newer certificate and is not consulted here.
    """
    not_after = live_info.not_after
    before, label = renew_before_seconds(cert, live_info.lifetime)
    hold_until = not_after - dt.timedelta(seconds=before / 3)
    overdue_at = hold_until + min(OVERDUE_GRACE, (not_after - hold_until) / 4)
    left = _human(not_after - now)
    common: dict[str, Any] = {"renew_at": hold_until, "overdue_at": overdue_at, "not_after": not_after,
                              "source": "pin", "notes": notes}
    if now >= not_after:
        return Decision(due=True, overdue=True, reason=f"pinned version {pinned} expired {_human(now - not_after)} "
                        "ago: renewing clears the pin", blocked_until=blocked, **common)
    if release:
        return Decision(due=True, overdue=now >= overdue_at, blocked_until=blocked, reason=f"pinned to rolled-back "
                        f"version {pinned} ({left} left): renewing as asked clears the pin", **common)
    if now >= hold_until:
        return Decision(due=True, overdue=now >= overdue_at, blocked_until=blocked,
                        reason=f"pinned to rolled-back version {pinned}, but only {left} left (the last third of "
                               f"{label} before expiry): renewing clears the pin", **common)
    return Decision(due=False, overdue=False, reason=f"pinned to rolled-back version {pinned} ({left} left): renewal "
                    f"held until {hold_until:%Y-%m-%d %H:%M}Z; `certmgr renew {cert.name}` or "
                    f"`certmgr deploy {cert.name}` clears the pin", **common)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _human(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s >= 2 * 86400:
        return f"{s // 86400}d"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m"
    return f"{max(s, 0)}s"
