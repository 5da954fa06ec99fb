"""Deploy progress for a human: one line per POP as it finishes, a bar on a terminal, one closing line per certificate.

On a TTY the lines stream above a click progress bar and the status word is coloured; piped, or with
NO_COLOR set (or TERM=dumb), the same lines are plain text: no bar, no escape sequence at all. Timings
only with -v; with -q only the POPs that did not end deployed/skipped are printed. The closing line
says what is true at the end: `N/N POPs serve SERIAL (expires …)`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import click

from certmgr.deploy import HostOutcome, Status
from certmgr.inventory import Certificate, Inventory
from certmgr.store_api import StateStore

_COLOURS = {Status.DEPLOYED: "green", Status.SKIPPED: "green", Status.ROLLED_BACK: "yellow", Status.HELD: "yellow",
            Status.FAILED: "red", Status.UNREACHABLE: "red", Status.UNKNOWN: "magenta"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Style:
    """How to print: a terminal (bar and colour, unless NO_COLOR or TERM=dumb: then no escape sequence at all),
    and how much (-v timings, -q problems only)."""

    tty: bool
    colour: bool
    verbose: bool = False
    quiet: bool = False

    @classmethod
    def detect(cls, stream: TextIO, verbosity: int, env: Mapping[str, str] | None = None) -> Style:
        env = os.environ if env is None else env
        tty = stream.isatty()
        plain = "NO_COLOR" in env or env.get("TERM") == "dumb"
        return cls(tty=tty, colour=tty and not plain, verbose=verbosity > 0, quiet=verbosity < 0)


def targets(inv: Inventory, certs: Iterable[Certificate], hosts: Iterable[str] | None = None) -> int:
    """How many (certificate, host) outcomes a deploy of `certs` (to `hosts`, default all) will produce."""
    wanted = set(hosts) if hosts else None
    return sum(1 for c in certs for h in c.hosts if wanted is None or h in wanted)


def canaries(inv: Inventory, extra: Iterable[str] = ()) -> frozenset[str]:
    """Hosts deploy treats as canaries: tagged `canary`, or named with --canary."""
    return frozenset(h for h, host in inv.hosts.items() if host.canary) | frozenset(extra)


def outcome_line(o: HostOutcome, style: Style, *, canary: bool) -> str:
    """`deployed    media.hachyderm.test → sally (canary) v7 serial 0A → 0B` (+ timings with -v, + the error)."""
    if o.status == Status.SKIPPED:
        serials = f"serial {o.new_serial} (already live)"
    else:
        serials = f"serial {o.old_serial or '-'} → {o.new_serial}"
    word = f"{o.status.value:<11}"
    if style.colour:
        word = click.style(word, fg=_COLOURS.get(o.status), bold=not o.ok)
    text = (f"{word} {o.cert} → {o.host}{' (canary)' if canary else ''}"
            f"{f' v{o.version}' if o.version is not None else ''} {serials}")
    if style.verbose:
        steps = " ".join(f"{k} {v:.2f}" for k, v in o.timings if v >= 0.005)
        text += f" {o.elapsed:.2f}s" + (f" [{steps}]" if steps else "")
    if o.converted:
        text += " (converted from certbot layout)"
    if o.error:
        text += f"\n            {o.error}"
    if o.hint and not o.ok:
        text += f"\n            hint: {o.hint}"
    return text


def closing_lines(outcomes: Iterable[HostOutcome], expiry: Mapping[str, dt.datetime]) -> list[str]:
    """Per certificate: `NAME: N/N POPs serve SERIAL (expires …)`, counting the POPs that verified it."""
    per_cert: dict[str, list[HostOutcome]] = {}
    for o in outcomes:
        per_cert.setdefault(o.cert, []).append(o)
    lines = []
    for name, outs in per_cert.items():
        serial = next((o.new_serial for o in outs if o.new_serial not in ("", "-")), "-")
        serving = sum(1 for o in outs if o.ok)
        exp = expiry.get(name)
        when = f" (expires {exp:%Y-%m-%d %H:%M}Z)" if exp is not None else ""
        lines.append(f"{name}: {serving}/{len(outs)} POPs serve {serial}{when}")
    return lines


class DeployProgress:
    """The `on_outcome` listener for deploy: prints each POP's line as it finishes, and a bar on a TTY."""

    def __init__(self, total: int, style: Style, *, canaries: frozenset[str] = frozenset(),
                 label: str = "deploy") -> None:
        self.style = style
        self.canaries = canaries
        self.outcomes: list[HostOutcome] = []
        self._bar: Any = None
        if style.tty and style.colour and total > 0 and not style.quiet:  # a bar is escape sequences too
            self._bar = click.progressbar(length=total, label=label, show_pos=True, show_eta=False, width=24)
            self._bar.__enter__()

    def __call__(self, o: HostOutcome) -> None:
        self.outcomes.append(o)
        if not (self.style.quiet and o.ok):
            if self._bar is not None:
                click.echo("\r\x1b[K", nl=False)  # clear the bar's line; it is redrawn below the new line
            click.echo(outcome_line(o, self.style, canary=o.host in self.canaries))
        if self._bar is not None:
            self._bar.update(1)

    def abort(self) -> None:
        """Take the bar down (the command failed before the end); the lines already printed stay."""
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def close(self, expiry: Mapping[str, dt.datetime]) -> None:
        """Remove the bar, then the closing line(s); with -q only when some POP does not serve the new version."""
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            click.echo("\r\x1b[K", nl=False)
            self._bar = None
        if self.style.quiet and all(o.ok for o in self.outcomes):
            return
        for line in closing_lines(self.outcomes, expiry):
            click.echo(line)


def expiry_of(store: StateStore, names: Iterable[str]) -> dict[str, dt.datetime]:
    """The live version's not_after per certificate (what the closing line says), where one can be read."""
    from certmgr.errors import CertmgrError

    out = {}
    for name in names:
        try:
            out[name] = store.read(name).info().not_after
        except (CertmgrError, ValueError, OSError):
            continue
    return out


def start(inv: Inventory, certs: Iterable[Certificate], verbosity: int, *, hosts: Iterable[str] | None = None,
          canary: Iterable[str] = (), stream: TextIO | None = None) -> DeployProgress:
    """A DeployProgress sized for this deploy, styled for stdout (TTY or not), -v and -q."""
    import sys

    certs = list(certs)
    style = Style.detect(stream or sys.stdout, verbosity)
    return DeployProgress(targets(inv, certs, hosts), style, canaries=canaries(inv, canary))


def renew_lines(outcomes: Iterable[Any], *, quiet: bool) -> list[str]:
    """Renew's lines: one per certificate (with -q only failures and overdue ones), then the counts."""
    outcomes = list(outcomes)
    lines: list[str] = []
    for o in outcomes:
        if quiet and o.status != "failed" and not (o.overdue and o.status != "renewed"):
            continue
        lines.append(o.line())
        if o.status == "failed" and o.hint:
            lines.append(f"         hint: {o.hint}")
        lines += [f"         note: {note}" for note in o.notes]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    overdue = sum(1 for o in outcomes if o.overdue and o.status != "renewed")
    if not quiet or lines:
        lines.append("renew: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                     + (f"; {overdue} overdue" if overdue else ""))
    return lines
