"""Timer check: the timer's worst-case interval against the shortest-lived certificate."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from certmgr.dns.diagnosis import human as _human  # one duration wording for dns findings and doctor checks
from certmgr.doctor.model import Check, Status, _StoreLike
from certmgr.errors import CertmgrError
from certmgr.inventory import Certificate, Inventory
from certmgr.material import CertInfo
from certmgr.timer import TIMER_UNIT, parse_timer, timer_interval

RUNS_PER_WINDOW = 4  # the timer must fire at least this often inside the shortest renewal window


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifetime:
    """How long one certificate lives, and where that was seen."""

    cert: str
    lifetime: dt.timedelta
    source: str  # "store", "last scan", "served"


def renewal_window(cert: Certificate, lifetime: dt.timedelta) -> float:
    """Seconds before expiry at which renewal starts (plan's rule: renew_before, else 1/3, 1/2 under 10 days)."""
    from certmgr.plan import renew_before_seconds

    return renew_before_seconds(cert, lifetime)[0]


def interval_check(interval: float | None, where: str, lifetimes: Sequence[Lifetime],
                   certs: Mapping[str, Certificate]) -> Check:
    """The timer rule: a run at least every min(1/4 lifetime, 1/4 renewal window) of every known certificate.

    1/4 of the lifetime alone would let a daily timer pass for a 6-day certificate (36 h), which then gets
    only 3 runs in its 3-day renewal window; four chances inside the window is what the rule is for.
    """
    if interval is None:
        return Check(group="timer", name="interval", subject=where, status=Status.FAIL,
                     message="the timer never repeats (no OnCalendar= or OnUnitActiveSec=)",
                     hint="give certmgr.timer an OnCalendar= (see systemd/certmgr.timer)")
    if not lifetimes:
        return Check(group="timer", name="interval", subject=where, status=Status.OK,
                     message=f"runs at least every {_human(interval)}; no certificate lifetime known yet "
                             "(nothing live in the store, no scan, nothing served)")
    worst: tuple[float, Lifetime, float] | None = None
    for lt in lifetimes:
        cert = certs.get(lt.cert)
        life = lt.lifetime.total_seconds()
        window = renewal_window(cert, lt.lifetime) if cert is not None else life / 3
        allowed = min(life, window) / RUNS_PER_WINDOW
        if worst is None or allowed < worst[0]:
            worst = (allowed, lt, min(life, window))
    assert worst is not None
    allowed, lt, window = worst
    what = (f"{lt.cert} lives {_human(lt.lifetime.total_seconds())} ({lt.source}) and renews in its last "
            f"{_human(window)}")
    if interval > allowed:
        return Check(group="timer", name="interval", subject=where, status=Status.FAIL,
                     message=f"interval {_human(interval)} is too long: {what}, which needs a run at least every "
                             f"{_human(allowed)} ({RUNS_PER_WINDOW} chances inside the window)",
                     hint="run certmgr more often: install systemd/certmgr.timer.d/twice-daily.conf (or a shorter "
                          "OnCalendar=) as a drop-in, then `systemctl daemon-reload`")
    return Check(group="timer", name="interval", subject=where, status=Status.OK,
                 message=f"runs at least every {_human(interval)}; {what}, which needs at most {_human(allowed)}")


def check_timer(inv: Inventory, store: _StoreLike | None, served: Sequence[CertInfo], *,
                interval: float | None, timer_files: Sequence[Path], now: dt.datetime) -> Check:
    """The timer's worst-case interval against the shortest-lived certificate (store, last scan, served).

    `timer_files`: the files systemd loaded for the installed timer (see doctor.systemd); `interval`, when
    given (--timer-interval), replaces them.
    """
    if interval is not None:
        where = "--timer-interval"
    elif not timer_files:
        return Check(group="timer", name="interval", subject=TIMER_UNIT, status=Status.WARNING,
                     message="no installed timer to read: its interval is unknown",
                     hint="see the `installed` check above; pass --timer-interval if a different scheduler runs "
                          "certmgr")
    else:
        where = str(timer_files[0]) + (f" + {len(timer_files) - 1} drop-in(s)" if len(timer_files) > 1 else "")
        try:
            spec = parse_timer([(p, p.read_text()) for p in timer_files])
            interval = timer_interval(spec, today=now.date())
        except (OSError, ValueError) as exc:
            return Check(group="timer", name="interval", subject=where, status=Status.FAIL,
                         message=f"cannot read the timer: {exc}", hint="pass --timer-interval to say how often it runs")
    lifetimes = known_lifetimes(inv, store, served)
    return interval_check(interval, where, lifetimes, {c.name: c for c in inv.certificates})


def known_lifetimes(inv: Inventory, store: _StoreLike | None, served: Sequence[CertInfo]) -> list[Lifetime]:
    """Each inventory certificate's lifetime: the store's live version, else the last scan, else what was served."""
    out: list[Lifetime] = []
    for cert in inv.certificates:
        found: Lifetime | None = None
        if store is not None:
            try:
                if store.live_version(cert.name) is not None:
                    info = store.read(cert.name).info()
                    found = Lifetime(cert=cert.name, lifetime=info.lifetime, source="store")
            except (CertmgrError, ValueError):
                found = None
            if found is None:
                try:
                    state = store.load_json(f"state/scan/{cert.name}.json", default=None)
                except CertmgrError:
                    state = None
                lives = []
                for ep in (state or {}).get("endpoints", []) if isinstance(state, dict) else []:
                    try:
                        nb = dt.datetime.fromisoformat(ep["not_before"])
                        na = dt.datetime.fromisoformat(ep["not_after"])
                    except (KeyError, TypeError, ValueError):
                        continue
                    lives.append(na - nb)
                if lives:
                    found = Lifetime(cert=cert.name, lifetime=min(lives), source="last scan")
        if found is None:
            lives = [i.lifetime for i in served if set(cert.domains) & set(i.names)]
            if lives:
                found = Lifetime(cert=cert.name, lifetime=min(lives), source="served")
        if found is not None:
            out.append(found)
    return out
