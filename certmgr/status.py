"""Status: the at-a-glance view for on-call, read from the store (live versions and saved state).

Nothing here touches the network; `certmgr status --scan` runs a scan first and saves it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from certmgr import intents as intents_mod
from certmgr import plan as plan_mod
from certmgr import renew as renew_mod
from certmgr import sanitize
from certmgr.dns import journal as journal_mod
from certmgr.errors import CertmgrError
from certmgr.inventory import Inventory
from certmgr.material import CertInfo
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
    deployed_at: str | None = None  # when live/<name> last switched to a new version there (settled ones too)
    unsettled: bool = False  # an interrupted deploy left an intent the next deploy settles


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

    @property
    def all_current(self) -> bool:
        return bool(self.pops) and all(p.current for p in self.pops)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "domains": list(self.domains), "live_version": self.live_version,
            "serial": self.serial, "not_after": self.not_after.isoformat() if self.not_after else None,
            "days_left": round(self.days_left, 3) if self.days_left is not None else None,
            "renewal": self.decision.to_json(),
            "last_renewal": self.last_success.isoformat() if self.last_success else None,
            "failures": self.failures, "last_error": self.last_error, "scanned_at": self.scanned_at,
            "all_pops_current": self.all_current,
            "pops": [{"host": p.host, "serves": p.serves, "severity": p.severity, "current": p.current,
                      "problems": list(p.problems), "last_deploy": p.last_deploy,
                      "last_deploy_at": p.last_deploy_at, "deployed_at": p.deployed_at,
                      "unsettled": p.unsettled} for p in self.pops],
        }


def gather(inv: Inventory, store: StateStore, *, now: dt.datetime) -> list[CertView]:
    """One view per inventory certificate, from what the store holds."""
    views = []
    for cert in inv.certificates:
        info: CertInfo | None = None
        version = None
        try:
            version = store.live_version(cert.name)
            if version is not None:
                info = store.read(cert.name).info()
        except CertmgrError:
            info = None
        rstate = renew_mod.load_state(store, cert.name)
        decision = plan_mod.decide(cert, info, rstate, now, pinned=renew_mod.pinned_version(store, cert.name))
        scan = store.load_json(f"state/scan/{cert.name}.json", default={}) or {}
        deploy = (store.load_json(f"state/deploy/{cert.name}.json", default={}) or {}).get("hosts", {})
        unsettled = {i.host for i in intents_mod.pending(store, cert.name)}
        per_host: dict[str, list[dict[str, Any]]] = {}
        for ep in scan.get("endpoints", []):
            per_host.setdefault(ep.get("host"), []).append(ep)
        pops = []
        for host in cert.hosts:
            eps = per_host.get(host, [])
            serials = sorted({e.get("serial") or "-" for e in eps})
            sevs = [e.get("severity") for e in eps if e.get("severity")]
            worst = max(sevs, key=lambda s: ("ok", "warning", "critical", "error").index(s)) if sevs else None
            current = None
            if eps and info is not None:
                current = all(e.get("sha256") == info.sha256 for e in eps)
            # Saved scan text is a peer's words (and may predate escaping): inert again, idempotently.
            problems = tuple(dict.fromkeys(sanitize.line(str(p)) for e in eps for p in (e.get("problems") or [])
                                           + ([e["error"]] if e.get("error") else [])))
            d = deploy.get(host, {})
            pops.append(PopView(host=host, serves=", ".join(serials) if eps else None, severity=worst,
                                current=current, problems=problems, last_deploy=d.get("status"),
                                last_deploy_at=d.get("at"), deployed_at=d.get("deployed_at"),
                                unsettled=host in unsettled))
        views.append(CertView(
            name=cert.name, domains=cert.domains, live_version=version, serial=info.serial if info else None,
            not_after=info.not_after if info else None,
            days_left=(info.not_after - now).total_seconds() / 86400 if info else None, decision=decision,
            last_success=rstate.last_success, failures=rstate.failures,
            last_error=sanitize.line(rstate.last_error, limit=None) if rstate.last_error else rstate.last_error,
            scanned_at=scan.get("scanned_at"), pops=tuple(pops)))
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
            if p.unsettled:
                dep += f", INTERRUPTED deploy not settled yet (`certmgr deploy {v.name}` settles it)"
            prob = f" — {'; '.join(p.problems[:2])}" if p.problems else ""
            out.append(f"    {p.host:<20} {mark:<8} {p.severity or '-':<8} serial {p.serves or '-'}{dep}{prob}")
    return out


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
