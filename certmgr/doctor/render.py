"""Doctor's text output: grouped by area, symbols on a terminal, words when piped."""

from __future__ import annotations

from collections.abc import Iterable

from certmgr.doctor.model import GROUPS, Check, Report, Status

_SYMBOLS = {Status.OK: "✓", Status.WARNING: "!", Status.FAIL: "✗"}
_PLAIN = {Status.OK: "ok  ", Status.WARNING: "WARN", Status.FAIL: "FAIL"}
_TITLES = {"inventory": "Inventory", "store": "Local store", "ca": "ACME CAs", "dns": "DNS (TSIG keys, zones)",
           "host": "Hosts (SSH, cert root, commands)", "nginx": "nginx serves live/", "timer": "Timer"}


def render(report: Report, *, tty: bool = False, colour: bool = False) -> str:
    """The report grouped by area: `✓`/`!`/`✗` on a terminal, `ok`/`WARN`/`FAIL` otherwise; hints indented."""
    colours = {Status.OK: "\x1b[32m", Status.WARNING: "\x1b[33m", Status.FAIL: "\x1b[31m"}
    lines: list[str] = []
    width = max((len(c.name) for c in report.checks), default=0)
    for group in GROUPS:
        items = [c for c in report.checks if c.group == group]
        if not items:
            continue
        lines.append(_TITLES[group])
        for c in items:
            mark = _SYMBOLS[c.status] if tty else _PLAIN[c.status]
            if colour:
                mark = f"{colours[c.status]}{mark}\x1b[0m"
            lines.append(f"  {mark} {c.name:<{width}}  {c.subject}: {c.message}")
            if c.hint and c.status != Status.OK:
                lines.append(f"  {'':{len(_PLAIN[c.status]) if not tty else 1}} {'':<{width}}  hint: {c.hint}")
    n = report.counts()
    lines.append(f"doctor: {n['ok']} ok, {n['warning']} warning{'s' if n['warning'] != 1 else ''}, "
                 f"{n['fail']} failed ({report.elapsed:.1f}s)")
    return "\n".join(lines)


def iter_failures(report: Report) -> Iterable[Check]:
    return (c for c in report.checks if c.status != Status.OK)
