"""Render a ScanResult: a table sorted by urgency (colour on a TTY), and a node_exporter textfile.

The `--json` schema lives next to the data in `certmgr.scan.result_json`; both are documented in docs/scan.md.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from certmgr.fsutil import atomic_write
from certmgr.scan import SEVERITY_RANK, EndpointResult, ScanResult

_COLOURS = {"ok": "32", "warning": "33", "critical": "31;1", "error": "35;1"}


def _days(r: EndpointResult, now: dt.datetime) -> str:
    d = r.days_left(now)
    return "-" if d is None else f"{d:.1f}"


def table(result: ScanResult, *, colour: bool = False, limit: int | None = None) -> str:
    """One line per endpoint, most urgent first (the result is already sorted), then a summary line."""
    now = result.started
    head = ("SEVERITY", "CERTIFICATE", "NAME", "HOST", "DAYS", "NOT AFTER", "SERIAL", "CHAIN", "PROBLEMS")
    rows: list[tuple[str, ...]] = []
    shown = result.endpoints if limit is None else result.endpoints[:limit]
    for r in shown:  # serials whole, as openssl prints them: grep one against the other
        i = r.info
        problems = "; ".join(r.problems) if r.problems else ""
        rows.append((r.severity, r.endpoint.cert, r.endpoint.name, r.endpoint.host, _days(r, now),
                     f"{i.not_after:%Y-%m-%d %H:%M}" if i else "-", (i.serial if i else "-"),
                     r.chain or "-", problems))
    widths = [max(len(h), *(len(row[k]) for row in rows)) if rows else len(h) for k, h in enumerate(head)]
    widths[-1] = 0  # the last column is free text

    def fmt(row: tuple[str, ...], sev: str | None = None) -> str:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        line = "  ".join(cells).rstrip()
        if colour and sev is not None:
            first = cells[0]
            line = f"\x1b[{_COLOURS[sev]}m{first}\x1b[0m" + line[len(first):]
        return line

    lines = [fmt(head)]
    lines += [fmt(row, row[0]) for row in rows]
    if limit is not None and len(result.endpoints) > limit:
        lines.append(f"… {len(result.endpoints) - limit} more endpoints (use --json for all)")
    counts = {s: 0 for s in SEVERITY_RANK}
    for r in result.endpoints:
        counts[r.severity] += 1
    lines.append("")
    lines.append(f"{len(result.endpoints)} endpoints in {result.elapsed:.2f}s: " +
                 ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" — overall {result.severity.upper()}")
    for c in result.certificates:
        if c.command:
            hosts = sorted({h for hs in c.hosts_by_severity.values() for h in hs})
            lines.append(f"  {c.severity.upper():8} {c.name}: {', '.join(hosts)} → {c.command}")
    return "\n".join(lines)


# ---------------------------------------------------------------- Prometheus


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(r: EndpointResult) -> str:
    e = r.endpoint
    return (f'certificate="{_label(e.cert)}",name="{_label(e.name)}",host="{_label(e.host)}",'
            f'address="{_label(e.address)}",port="{e.port}"')


METRICS = (
    ("certmgr_scan_endpoint_success", "gauge", "1 if the TLS handshake completed and a certificate was read"),
    ("certmgr_scan_endpoint_expiry_timestamp_seconds", "gauge", "notAfter of the served leaf, Unix time"),
    ("certmgr_scan_endpoint_days_left", "gauge", "days until the served leaf expires (negative: expired)"),
    ("certmgr_scan_endpoint_drift", "gauge", "1 if the endpoint serves another leaf than live/ or the other POPs"),
    ("certmgr_scan_endpoint_severity", "gauge", "0 ok, 1 warning, 2 critical, 3 error"),
    ("certmgr_scan_certificate_severity", "gauge", "worst endpoint severity per certificate (0-3)"),
    ("certmgr_scan_endpoints", "gauge", "endpoints scanned, by severity"),
    ("certmgr_scan_duration_seconds", "gauge", "wall time of the last scan"),
    ("certmgr_scan_last_run_timestamp_seconds", "gauge", "when the last scan started, Unix time"),
)


def prometheus_lines(result: ScanResult) -> Iterable[str]:
    """The node_exporter textfile, streamed: HELP/TYPE then samples, one family at a time."""
    now = result.started
    eps = result.endpoints
    families: dict[str, Callable[[], Iterable[str]]] = {
        "certmgr_scan_endpoint_success": lambda: (
            f"{{{_labels(r)}}} {1 if r.info is not None else 0}" for r in eps),
        "certmgr_scan_endpoint_expiry_timestamp_seconds": lambda: (
            f"{{{_labels(r)}}} {int(r.info.not_after.timestamp())}" for r in eps if r.info is not None),
        "certmgr_scan_endpoint_days_left": lambda: (
            f"{{{_labels(r)}}} {r.days_left(now):.3f}" for r in eps if r.info is not None),
        "certmgr_scan_endpoint_drift": lambda: (f"{{{_labels(r)}}} {1 if r.drift else 0}" for r in eps),
        "certmgr_scan_endpoint_severity": lambda: (f"{{{_labels(r)}}} {SEVERITY_RANK[r.severity]}" for r in eps),
        "certmgr_scan_certificate_severity": lambda: (
            f'{{certificate="{_label(c.name)}"}} {SEVERITY_RANK[c.severity]}' for c in result.certificates),
        "certmgr_scan_endpoints": lambda: (
            f'{{severity="{s}"}} {sum(1 for r in eps if r.severity == s)}' for s in SEVERITY_RANK),
        "certmgr_scan_duration_seconds": lambda: (f" {result.elapsed:.3f}",),
        "certmgr_scan_last_run_timestamp_seconds": lambda: (f" {int(result.started.timestamp())}",),
    }
    for name, typ, help_text in METRICS:
        yield f"# HELP {name} {help_text}"
        yield f"# TYPE {name} {typ}"
        for sample in families[name]():
            yield name + sample


def write_prometheus(result: ScanResult, path: Path) -> None:
    """Atomically replace `path` (node_exporter reads `*.prom`; the temp file is hidden and not `.prom`)."""
    data = ("\n".join(prometheus_lines(result)) + "\n").encode()
    atomic_write(path, data, 0o644)


# ---------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on a TTY (stderr), redrawn at most 10 times a second; silent otherwise."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        self.stream.write(f"\rscanning [{'#' * filled}{' ' * (width - filled)}] {done}/{total}")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
