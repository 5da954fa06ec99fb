"""Monitoring-plugin output (Nagios, Icinga, Naemon, Sensu): one status line with perfdata, then details.

Pure: a ScanResult (and the inventory's thresholds) in, a `PluginResult` out. Format per the
Monitoring Plugins development guidelines: `SERVICE STATUS - text | 'label'=value[UOM];warn;crit;min;max`,
exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. The anchor is `check_ssl_cert`, but for a whole fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from certmgr.inventory import SEVERITIES, Inventory
from certmgr.scan import EndpointResult, ScanResult

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
# An endpoint that does not answer TLS is a real outage to the people watching, so CRITICAL; UNKNOWN
# is kept for "could not check at all" (bad inventory, unreadable trust store, nothing to scan).
EXIT_BY_SEVERITY = {"ok": OK, "warning": WARNING, "critical": CRITICAL, "error": CRITICAL}
SHOWN_IN_STATUS = 3  # problems named on the status line; the rest go to the long output
LONG_OUTPUT_MAX = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginResult:
    """What a monitoring plugin prints (status line first, then long output) and its exit status."""

    status: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def clean(text: str) -> str:
    """Foreign text made safe for a plugin line: no `|` (it starts perfdata), no line breaks."""
    return " ".join(text.replace("|", "/").split())


def perf_label(label: str) -> str:
    """A perfdata label, single-quoted; `=` is not allowed in it and `'` is doubled (guidelines §perfdata)."""
    return "'" + label.replace("=", "_").replace("'", "''") + "'"


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def _where(r: EndpointResult) -> str:
    return f"{r.endpoint.name} on {r.endpoint.host}"


def _what(r: EndpointResult) -> str:
    if r.error:
        return f"{_where(r)}: {r.error}"
    return f"{_where(r)}: {'; '.join(r.problems) or r.severity}"


def unknown(message: str) -> PluginResult:
    """UNKNOWN: the check itself could not run (first line of the error only)."""
    lines = [clean(line) for line in message.splitlines() if line.strip()] or ["unknown error"]
    return PluginResult(status=UNKNOWN, lines=(f"CERTMGR UNKNOWN - {lines[0]}", *lines[1:]))


def check(result: ScanResult, inv: Inventory, *, revoking: Sequence[str] = ()) -> PluginResult:
    """The plugin result for one scan: the worst endpoint decides; the soonest expiry is always named.

    `revoking`: notes on unfinished `certmgr revoke`s (pins.pending_note; only when the store is readable):
    each is CRITICAL, first on the status line — a leaked key may still be valid at the CA."""
    eps = list(result.iter_endpoints())  # all of them: `endpoints` holds only the most urgent 1,000 of a large scan
    if not eps and revoking:
        notes = [clean(r) for r in revoking]
        return PluginResult(status=CRITICAL, lines=(f"CERTMGR CRITICAL - {'; '.join(notes)}",
                                                    *(f"CRITICAL: {n}" for n in notes)))
    if not eps:
        return unknown("no endpoints to scan (no certificate has hosts)")
    now = result.started
    status = max([EXIT_BY_SEVERITY[r.severity] for r in eps] + [CRITICAL for _ in revoking])
    counts = {s: sum(1 for r in eps if r.severity == s) for s in SEVERITIES}
    read = [r for r in eps if r.info is not None]
    soonest = min(read, key=lambda r: (r.days_left(now) or 0.0, r.endpoint.name, r.endpoint.host)) if read else None

    bad = [r for r in eps if r.severity != "ok"]  # already most urgent first
    if bad:
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "ok")
        text = f"{parts} of {len(eps)} endpoints: " + "; ".join(clean(_what(r)) for r in bad[:SHOWN_IN_STATUS])
        if len(bad) > SHOWN_IN_STATUS:
            text += f"; +{len(bad) - SHOWN_IN_STATUS} more"
    else:
        text = f"{len(eps)} endpoints ok"
    if soonest is not None and (days := soonest.days_left(now)) is not None:
        text += f", soonest expiry {clean(_where(soonest))} in {days:.0f}d"
    if revoking:
        text = "; ".join(clean(r) for r in revoking) + "; " + text

    perf = [f"{perf_label('endpoints')}={len(eps)};;;0"]
    perf += [f"{perf_label(s)}={counts[s]};;;0;{len(eps)}" for s in SEVERITIES]
    if soonest is not None and soonest.info is not None:
        days_left = soonest.days_left(now) or 0.0
        warn, crit = _thresholds_days(inv, soonest)
        # "N:" is the guidelines' range for "alert when below N"
        perf.append(f"{perf_label('soonest_days')}={_num(days_left)};{_num(warn)}:;{_num(crit)}:;;")
    perf.append(f"{perf_label('time')}={result.elapsed:.3f}s;;;0")

    lines = [f"CERTMGR {STATE_NAMES[status]} - {text} | {' '.join(perf)}"]
    lines += [f"CRITICAL: {clean(r)}" for r in revoking]
    lines += [f"{r.severity.upper()}: {clean(_what(r))}" for r in bad[:LONG_OUTPUT_MAX]]
    if len(bad) > LONG_OUTPUT_MAX:
        lines.append(f"… {len(bad) - LONG_OUTPUT_MAX} more (certmgr scan shows all)")
    return PluginResult(status=status, lines=tuple(lines))


def _thresholds_days(inv: Inventory, r: EndpointResult) -> tuple[float, float]:
    """Warning and critical days for the endpoint's certificate (fractions apply to the served lifetime)."""
    assert r.info is not None
    cert = next((c for c in inv.certificates if c.name == r.endpoint.cert), None)
    if cert is None:
        return 0.0, 0.0
    life = r.info.lifetime.total_seconds()
    return cert.warn_before.before(life) / 86400, cert.critical_before.before(life) / 86400
