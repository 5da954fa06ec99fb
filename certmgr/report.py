"""Render a ScanResult: a table sorted by urgency (colour on a TTY), and a node_exporter textfile.

The `--json` schema lives next to the data in `certmgr.scan.result_json`; both are documented in docs/scan.md.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TextIO

from certmgr.fsutil import fsync_dir, temp_name
from certmgr.scan import SEVERITY_RANK, EndpointResult, ScanResult

_COLOURS = {"ok": "32", "warning": "33", "critical": "31;1", "error": "35;1"}


def _days(r: EndpointResult, now: dt.datetime) -> str:
    d = r.days_left(now)
    return "-" if d is None else f"{d:.1f}"


def table(result: ScanResult, *, colour: bool = False, limit: int | None = None) -> str:
    """One line per endpoint, most urgent first (the result is already sorted), then a summary line.

    A large scan holds only its most urgent endpoints (ScanResult): the table shows those and
    says how many more `--json` has.
    """
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
    total = result.endpoint_count
    if total > len(shown):
        lines.append(f"… {total - len(shown)} more endpoints (use --json for all)")
    counts = result.severity_counts()
    lines.append("")
    lines.append(f"{total} endpoints in {result.elapsed:.2f}s: " +
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


_ENDPOINT_FAMILIES = tuple(name for name, _, _ in METRICS[:5])


def _endpoint_samples(result: ScanResult) -> dict[str, IO[str]]:
    """The five per-endpoint families' samples, from one pass over the endpoints (a large scan's are
    on disk), each in a buffer that moves to a temporary file beyond 1 MiB."""
    now = result.started
    out: dict[str, IO[str]] = {name: tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+", encoding="utf-8")
           for name in _ENDPOINT_FAMILIES}
    success, expiry, days, drift, severity = (out[n] for n in _ENDPOINT_FAMILIES)
    for r in result.iter_endpoints():
        labels = "{" + _labels(r) + "}"
        success.write(f"{labels} {1 if r.info is not None else 0}\n")
        if r.info is not None:
            expiry.write(f"{labels} {int(r.info.not_after.timestamp())}\n")
            days.write(f"{labels} {r.days_left(now):.3f}\n")
        drift.write(f"{labels} {1 if r.drift else 0}\n")
        severity.write(f"{labels} {SEVERITY_RANK[r.severity]}\n")
    return out


def prometheus_lines(result: ScanResult) -> Iterable[str]:
    """The node_exporter textfile, streamed: HELP/TYPE then samples, one family at a time."""
    counts = result.severity_counts()
    samples = _endpoint_samples(result)
    families: dict[str, Callable[[], Iterable[str]]] = {
        "certmgr_scan_certificate_severity": lambda: (
            f'{{certificate="{_label(c.name)}"}} {SEVERITY_RANK[c.severity]}' for c in result.certificates),
        "certmgr_scan_endpoints": lambda: (
            f'{{severity="{s}"}} {counts[s]}' for s in SEVERITY_RANK),
        "certmgr_scan_duration_seconds": lambda: (f" {result.elapsed:.3f}",),
        "certmgr_scan_last_run_timestamp_seconds": lambda: (f" {int(result.started.timestamp())}",),
    }
    try:
        for name, typ, help_text in METRICS:
            yield f"# HELP {name} {help_text}"
            yield f"# TYPE {name} {typ}"
            if name in samples:
                buf = samples[name]
                buf.seek(0)
                for line in buf:
                    yield name + line[:-1]
            else:
                for sample in families[name]():
                    yield name + sample
    finally:
        for buf in samples.values():
            buf.close()


def write_prometheus(result: ScanResult, path: Path) -> None:
    """Atomically replace `path` (node_exporter reads `*.prom`; the temp file is hidden and not `.prom`).

    Written line by line through a buffer: a scan of 100,000 endpoints is tens of MB of text.
    """
    tmp = path.parent / temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", buffering=1 << 16) as f:
            os.fchmod(fd, 0o644)
            for line in prometheus_lines(result):
                f.write(line + "\n")
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
