"""Status: the at-a-glance view for on-call, read from the store (live versions and saved state).

Nothing here touches the network; `certmgr status --scan` runs a scan first and saves it. What a POP
serves comes from the newer of two records: the last scan, or the last deploy that verified the served
serial by handshake (so a POP shows current right after a verified deploy, without waiting for a scan).
Exit status (`exit_code`): 0 nothing needs a human, 1 warning, 2 needs action now.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from certmgr import intents as intents_mod
from certmgr import pins, sanitize
from certmgr import plan as plan_mod
from certmgr import renew as renew_mod
from certmgr.dns import journal as journal_mod
from certmgr.errors import CertmgrError
from certmgr.inventory import Certificate, Inventory
from certmgr.material import CertInfo, serial_text
from certmgr.store_api import StateStore


@dataclass(frozen=True, slots=True, kw_only=True)
class PopView:
    host: str
    serves: str | None  # serial served (from the last scan), None when unknown
    severity: str | None
    current: bool | None  # serves the local live version
    problems: tuple[str, ...]
    last_deploy: str | None  # status of the last deploy to this host
    last_deploy_at: str | None
    source: str = "scan"  # where `serves`/`current` come from: "scan", "deploy" (verified, newer than the scan)
    deployed_at: str | None = None  # when live/<name> last switched to a new version there (settled ones too)
    unsettled: bool = False  # an interrupted deploy left an intent the next deploy settles
    verified_at: str | None = None  # with source "deploy": when a deploy confirmed `serves` by handshake


@dataclass(frozen=True, slots=True, kw_only=True)
class CertView:
    name: str
    domains: tuple[str, ...]
    live_version: int | None
    serial: str | None
    not_after: dt.datetime | None
    days_left: float | None
    decision: plan_mod.Decision
    last_success: dt.datetime | None
    failures: int
    last_error: str | None
    scanned_at: str | None
    pops: tuple[PopView, ...]
    # past the renewal time plus its grace: the timer had its chances (a failed attempt alone makes plan's
    # `overdue` true, but the next run retries it by itself)
    past_grace: bool = False
    revoking: str | None = None  # an unfinished `certmgr revoke` (pins.PendingRevocation.note)

    @property
    def all_current(self) -> bool:
        return bool(self.pops) and all(p.current for p in self.pops)

    def findings(self) -> list[tuple[int, str]]:
        """What needs a human, as (level, why): 2 needs action now, 1 warning. Due renewals, a backoff not yet
        overdue, a certificate with no local version yet and POPs never scanned are the next run's business (what
        the POPs serve, once scanned, decides)."""
        out: list[tuple[int, str]] = []
        if self.days_left is not None and self.days_left <= 0:
            out.append((2, "expired"))
        elif self.past_grace:
            out.append((2, "renewal overdue"))
        if self.revoking:
            out.append((2, "revocation not finished"))
        for p in self.pops:
            if p.unsettled:
                out.append((2, f"{p.host} deploy interrupted"))
            elif p.current is False:
                out.append((2, f"{p.host} behind"))
            elif p.severity in ("critical", "error"):
                out.append((2, f"{p.host} {p.severity}"))
            elif p.severity == "warning":
                out.append((1, f"{p.host} warning"))
        return out

    @property
    def level(self) -> int:
        return max((lvl for lvl, _ in self.findings()), default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "domains": list(self.domains), "live_version": self.live_version,
            "serial": self.serial, "not_after": self.not_after.isoformat() if self.not_after else None,
            "days_left": round(self.days_left, 3) if self.days_left is not None else None,
            "renewal": self.decision.to_json(),
            "last_renewal": self.last_success.isoformat() if self.last_success else None,
            "failures": self.failures, "last_error": self.last_error, "scanned_at": self.scanned_at,
            "all_pops_current": self.all_current,
            "level": self.level, "needs": [why for _, why in self.findings()],
            "revoking": self.revoking,
            "pops": [{"host": p.host, "serves": p.serves, "severity": p.severity, "current": p.current,
                      "source": p.source, "problems": list(p.problems), "last_deploy": p.last_deploy,
                      "last_deploy_at": p.last_deploy_at, "deployed_at": p.deployed_at,
                      "unsettled": p.unsettled, "verified_at": p.verified_at} for p in self.pops],
        }


def exit_code(views: Sequence[CertView]) -> int:
    """0 nothing needs a human, 1 a warning, 2 something needs action now (overdue, expired, a POP behind or
    critical): the worst certificate wins."""
    return max((v.level for v in views), default=0)


def _serial_key(serial: object) -> int | None:
    """A serial as a number, whatever its text form (older state holds lower-case hex without leading zero)."""
    try:
        return int(str(serial), 16)
    except ValueError:
        return None


def _newer(at: str | None, than: str | None) -> bool:
    """`at` is strictly later than `than` (ISO times; no `than` means nothing to be newer than)."""
    if not at:
        return False
    if not than:
        return True
    try:
        return dt.datetime.fromisoformat(at) > dt.datetime.fromisoformat(than)
    except ValueError:
        return False


# deploy outcomes that confirm by handshake what the POP serves (a rollback: that the old certificate is)
_CONFIRMING = ("deployed", "skipped", "rolled back")


def pop_view(host: str, eps: list[dict[str, Any]], info: CertInfo | None, deployed: dict[str, Any],
             scanned_at: str | None, *, unsettled: bool = False,
             revoked: dict[str, dict[str, Any]] | None = None) -> PopView:
    """One POP (`_pop_view`), and — whatever the live version — a POP serving a serial certmgr revoked is critical:
    clients that check revocation refuse it."""
    view = _pop_view(host, eps, info, deployed, scanned_at, unsettled=unsettled)
    gone = {k: v for s, v in (revoked or {}).items() if (k := _serial_key(s)) is not None}
    hit = [gone[k] for s in (view.serves or "").split(", ") if (k := _serial_key(s)) in gone]
    if not hit:
        return view
    why = f"serves a certificate certmgr revoked ({hit[0].get('reason') or 'revoked'})"
    worse = view.severity == "error"  # ok < warning < critical < error
    return replace(view, severity="error" if worse else "critical", problems=(why, *view.problems))


def _pop_view(host: str, eps: list[dict[str, Any]], info: CertInfo | None, deployed: dict[str, Any],
              scanned_at: str | None, *, unsettled: bool = False) -> PopView:
    """One POP: the last scan's view, unless a later deploy verified what this POP serves.

    The deploy state keeps the serial its last confirming outcome saw (`serial`, at `serial_at`) through later
    failures: an unreachable POP, a failed test. That confirmation, when newer than the scan, is what the POP
    serves — not the older scan's reading. (A state written before `serial_at` was kept dates it by `at` when
    its last outcome confirmed, and is read from the scan otherwise.)
    """
    last, last_at = deployed.get("status"), deployed.get("at")
    switched = deployed.get("deployed_at")
    confirming = last in _CONFIRMING and deployed.get("verified", True) is not False  # not a settled switch
    verified = deployed.get("serial_at") or (last_at if confirming else None)
    if info is not None and deployed.get("serial") and _newer(verified, scanned_at):
        key = _serial_key(deployed["serial"])
        same = key == _serial_key(info.serial)
        shown = serial_text(key) if key is not None else str(deployed["serial"])
        why: tuple[str, ...] = ()
        if not same:
            v = deployed.get("version")
            known = isinstance(v, int) and not isinstance(v, bool)
            why = ("a deploy rolled back: serves the old certificate" + (f" (version {v})" if known else "")
                   if last == "rolled back" else
                   f"serves {f'version {v}' if known else 'another certificate'}, not the live version",)
        return PopView(host=host, serves=shown, severity="ok" if same else "critical", current=same, problems=why,
                       last_deploy=last, last_deploy_at=last_at, source="deploy", deployed_at=switched,
                       unsettled=unsettled, verified_at=verified)
    serials = sorted({e.get("serial") or "-" for e in eps})
    sevs = [e.get("severity") for e in eps if e.get("severity")]
    worst = max(sevs, key=lambda s: ("ok", "warning", "critical", "error").index(s)) if sevs else None
    current = None
    if eps and info is not None:
        current = all(e.get("sha256") == info.sha256 for e in eps)
    # Saved scan text is a peer's words (and may predate escaping): inert again, idempotently.
    problems = tuple(dict.fromkeys(sanitize.line(str(p)) for e in eps for p in (e.get("problems") or [])
                                   + ([e["error"]] if e.get("error") else [])))
    return PopView(host=host, serves=", ".join(serials) if eps else None, severity=worst, current=current,
                   problems=problems, last_deploy=last, last_deploy_at=last_at, deployed_at=switched,
                   unsettled=unsettled)


def gather(inv: Inventory, store: StateStore, *, now: dt.datetime,
           certs: Sequence[Certificate] | None = None) -> list[CertView]:
    """One view per certificate (`certs`, default every one in the inventory), from what the store holds."""
    views = []
    for cert in inv.certificates if certs is None else certs:
        info: CertInfo | None = None
        version = None
        try:
            version = store.live_version(cert.name)
            if version is not None:
                info = store.read(cert.name).info()
        except CertmgrError:
            info = None
        rstate = renew_mod.load_state(store, cert.name)
        decision = plan_mod.decide(cert, info, rstate, now, pinned=renew_mod.pinned_version(store, cert.name),
                                   revoked=renew_mod.revoked_reason(store, cert.name, info))
        scan = store.load_json(f"state/scan/{cert.name}.json", default={}) or {}
        deploy = (store.load_json(f"state/deploy/{cert.name}.json", default={}) or {}).get("hosts", {})
        unsettled = {i.host for i in intents_mod.pending(store, cert.name)}
        per_host: dict[str, list[dict[str, Any]]] = {}
        for ep in scan.get("endpoints", []):
            per_host.setdefault(ep.get("host"), []).append(ep)
        try:
            revoked = pins.load_revoked(store, cert.name)
        except CertmgrError:
            revoked = {}
        pops = [pop_view(host, per_host.get(host, []), info, deploy.get(host, {}), scan.get("scanned_at"),
                         unsettled=host in unsettled, revoked=revoked) for host in cert.hosts]
        views.append(CertView(
            name=cert.name, domains=cert.domains, live_version=version, serial=info.serial if info else None,
            not_after=info.not_after if info else None,
            days_left=(info.not_after - now).total_seconds() / 86400 if info else None, decision=decision,
            last_success=rstate.last_success, failures=rstate.failures,
            last_error=sanitize.line(rstate.last_error, limit=None) if rstate.last_error else rstate.last_error,
            scanned_at=scan.get("scanned_at"), pops=tuple(pops),
            past_grace=decision.overdue_at is not None and now >= decision.overdue_at,
            revoking=pins.pending_note(store, cert.name)))
    return views


def render(views: list[CertView], now: dt.datetime) -> list[str]:
    out = []
    for v in views:
        if v.live_version is None:
            head = f"{v.name}: no local certificate"
        else:
            head = (f"{v.name}: v{v.live_version} serial {v.serial}, expires {v.not_after:%Y-%m-%d %H:%M}Z "
                    f"({v.days_left:.1f} days left)")
        out.append(head)
        d = v.decision
        tag = "OVERDUE" if d.overdue else ("due" if d.due else "not due")
        out.append(f"  renewal: {tag} — {d.reason}")
        if d.blocked_until:
            out.append(f"  backoff: no attempt before {d.blocked_until:%Y-%m-%d %H:%M}Z "
                       f"(after {v.failures} failures; `certmgr renew --force {v.name}` overrides)")
        if v.revoking:
            out.append(f"  {v.revoking}")
        if v.last_error:
            out.append(f"  last error: {v.last_error}")
        if v.last_success:
            out.append(f"  last renewal: {v.last_success:%Y-%m-%d %H:%M}Z")
        out.append(f"  POPs (scanned {_short(v.scanned_at) if v.scanned_at else 'never'}):")
        for p in v.pops:
            mark = {True: "current", False: "BEHIND", None: "unknown"}[p.current]
            dep = f", last deploy {p.last_deploy} {_short(p.last_deploy_at)}" if p.last_deploy else ""
            if p.deployed_at and (p.last_deploy != "deployed" or p.deployed_at != p.last_deploy_at):
                dep += f" (switched {_short(p.deployed_at)})"
            if p.source == "deploy":
                by = "that deploy" if p.verified_at == p.last_deploy_at else f"a deploy {_short(p.verified_at)}"
                dep += f" (verified by {by}" + (", after the last scan)" if v.scanned_at else ")")
            if p.unsettled:
                dep += f", INTERRUPTED deploy not settled yet (`certmgr deploy {v.name}` settles it)"
            prob = f" — {'; '.join(p.problems[:2])}" if p.problems else ""
            out.append(f"    {p.host:<20} {mark:<8} {p.severity or '-':<8} serial {p.serves or '-'}{dep}{prob}")
    return out


def verdict(views: Sequence[CertView]) -> str:
    """The closing line: what needs a human, and the exit status it gives."""
    code = exit_code(views)
    if code == 0:
        return f"status: {len(views)} certificate(s), nothing needs action (exit 0)"
    needs = [f"{v.name}: {why}" for v in views for lvl, why in v.findings() if lvl == code]
    word = "needs action" if code == 2 else "warning"
    return f"status: {word}: {'; '.join(needs)} (exit {code})"


def dns_leftovers(store: StateStore) -> list[journal_mod.Entry]:
    """Challenge TXT values written and not yet confirmed removed (the DNS journal), oldest first."""
    return journal_mod.read(store)


def leftovers_json(entries: list[journal_mod.Entry], now: dt.datetime) -> list[dict[str, Any]]:
    return [{**e.to_json(), "age_seconds": round((now - e.first_written).total_seconds())} for e in entries]


def render_leftovers(entries: list[journal_mod.Entry], now: dt.datetime) -> list[str]:
    """Nothing when the journal is empty; else a heading and one line per record with its age."""
    if not entries:
        return []
    out = [f"DNS: {len(entries)} challenge TXT record(s) left behind, not yet confirmed removed "
           "(the next renew retries them first):"]
    out += [f"  {e.describe(now)}" for e in entries]
    return out


def _short(iso: str | None) -> str:
    """`2026-11-27T10:21:02.132755+00:00` → `2026-11-27 10:21Z` (unparseable text is shown as is)."""
    if not iso:
        return "-"
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return f"{t.astimezone(dt.UTC):%Y-%m-%d %H:%M}Z"
