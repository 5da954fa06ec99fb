"""Interrupts: SIGINT/SIGTERM stop the work, and a tally of what the run did makes the one line it exits with.

A signal cancels the work (cli.run_async) and sets `stopping()`, so nothing new starts; only POP
commits already running are waited for (deploy.py), at most GRACE seconds, or until a second signal.
Signals are process-wide, so the state here is too: the CLI resets it for each command.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

GRACE = 30.0  # seconds a POP commit already running is waited for after a signal (then it is cut)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as a shell reports it


class Interrupted(BaseException):  # like KeyboardInterrupt: not an error, so not a CertmgrError
    """Raised in the CLI once the work a signal let finish is done (or was cut); carries the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Tally:
    """What this run did, recorded by the steps as it happens (so a cut run can still say it)."""

    renewed: dict[str, int | None] = field(default_factory=dict)  # name → version made live
    not_renewed: list[str] = field(default_factory=list)  # interrupted before their renewal started
    renew_cut: list[str] = field(default_factory=list)  # renewal under way when the run was cancelled
    deploy_follows: bool = False  # the command deploys what it renews
    renew_command: str = "certmgr renew"  # how to start the renewals a signal stopped
    planned: dict[str, list[str]] = field(default_factory=dict)  # cert → hosts this run meant to deploy to
    done: dict[str, dict[str, str]] = field(default_factory=dict)  # cert → host → outcome status
    committing: set[tuple[str, str]] = field(default_factory=set)  # (cert, host) with a commit under way
    # The command that finishes this one's work when that is not `certmgr deploy` of what is left (rollback,
    # revoke: a deploy would undo a rollback, and never revokes); `finish_due`: its work is unfinished even when
    # every deploy it made is done (a revocation at the CA still to come).
    finish: str | None = None
    finish_due: bool = False

    def plan(self, cert: str, hosts: list[str]) -> None:
        have = self.planned.setdefault(cert, [])
        have.extend(h for h in hosts if h not in have)

    def outcome(self, cert: str, host: str, status: str) -> None:
        self.done.setdefault(cert, {})[host] = status
        self.committing.discard((cert, host))


@dataclass
class StopState:
    signum: int | None = None
    count: int = 0
    tally: Tally = field(default_factory=Tally)


_STATE = StopState()


def reset() -> StopState:
    """Forget earlier signals and tallies (the CLI calls this as each command starts)."""
    global _STATE
    _STATE = StopState()
    return _STATE


def state() -> StopState:
    return _STATE


def tally() -> Tally:
    return _STATE.tally


def note(signum: int) -> int:
    """Record a signal; returns how many have arrived."""
    if _STATE.signum is None:
        _STATE.signum = signum
    _STATE.count += 1
    return _STATE.count


def stopping() -> bool:
    """True once a signal asked to stop: start nothing new."""
    return _STATE.signum is not None


def exit_code(signum: int) -> int:
    return EXIT_CODES.get(signal.Signals(signum), 128 + int(signum))


MANY = 3  # more certificates than this to report: one clause for all of them, not one each


@dataclass
class _Row:
    cert: str
    ok: list[str]
    failed: list[str]
    cut: list[str]
    left: list[str]  # not started
    rolled: list[str] = field(default_factory=list)  # switched, not served, switched back: the old one serves

    @property
    def total(self) -> int:
        return len(self.ok) + len(self.failed) + len(self.cut) + len(self.left) + len(self.rolled)

    @property
    def unfinished(self) -> bool:
        return bool(self.failed or self.cut or self.left or self.rolled or not self.total)


def _few(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", +{len(names) - limit} more" if len(names) > limit else "")


def _rows(t: Tally) -> list[_Row]:
    rows = []
    for cert in dict.fromkeys([*t.renewed, *t.planned]):
        hosts = t.planned.get(cert)
        if hosts is None:
            if t.deploy_follows:
                rows.append(_Row(cert=cert, ok=[], failed=[], cut=[], left=[]))  # renewed; its deploy never began
            continue
        done = t.done.get(cert, {})
        ok = [h for h in hosts if done.get(h) in ("deployed", "skipped")]
        rolled = [h for h in hosts if done.get(h) == "rolled back"]
        failed = [h for h in hosts if h in done and done[h] not in ("deployed", "skipped", "held", "rolled back")]
        cut = [h for h in hosts if (cert, h) in t.committing]
        left = [h for h in hosts if h not in ok + failed + cut + rolled]
        rows.append(_Row(cert=cert, ok=ok, failed=failed, cut=cut, left=left, rolled=rolled))
    return rows


def _row_text(r: _Row) -> str:
    if not r.total:
        return f"{r.cert} deployed to no POP (not started)"
    text = f"{r.cert} deployed to {len(r.ok)}/{r.total} POPs" + (f" ({_few(r.ok)})" if r.ok else "")
    text += f"; failed on {len(r.failed)} ({_few(r.failed)})" if r.failed else ""
    text += f"; rolled back on {len(r.rolled)} ({_few(r.rolled)}: not served, the old version serves)" if r.rolled \
        else ""
    them = "them" if len(r.cut) > 1 else "it"
    text += f"; cut short on {len(r.cut)} ({_few(r.cut)}: the next deploy settles {them})" if r.cut else ""
    text += f"; not started: {len(r.left)} POP{'s' if len(r.left) != 1 else ''} ({_few(r.left)})" if r.left else ""
    return text


def _rows_text(rows: list[_Row]) -> str:
    ok, failed, cut, left, rolled = (sum(len(getattr(r, k)) for r in rows)
                                     for k in ("ok", "failed", "cut", "left", "rolled"))
    text = f"deployed {ok}/{ok + failed + cut + left + rolled} (certificate, POP) pairs of {len(rows)} certificates"
    text += f"; failed {failed}" if failed else ""
    text += f"; rolled back {rolled}" if rolled else ""
    text += f"; cut short {cut} (the next deploy settles them)" if cut else ""
    text += f"; not started {left}" if left else ""
    never = [r.cert for r in rows if not r.total]
    return text + (f"; not deployed at all: {_few(never)}" if never else "")


def summary(st: StopState, *, finish: str | None = None) -> str:
    """The one line a signalled run exits with: what was done, what was not, and how to finish.

    `finish` is the command that finishes the work (default: `certmgr renew`/`certmgr deploy` of what is left).
    """
    t = st.tally
    name = signal.Signals(st.signum).name if st.signum is not None else "signal"
    head = f"certmgr: interrupted by {name}" + (" (again: stopped at once)" if st.count > 1 else "")
    parts: list[str] = []
    if t.renewed:
        parts.append("renewed " + _few([f"{n} (v{v})" if v is not None else n for n, v in t.renewed.items()]))
    if t.renew_cut:
        parts.append(f"renewal cut short: {_few(t.renew_cut)} (order abandoned, challenge records removed)")
    if t.not_renewed:
        parts.append(f"renewal not started: {_few(t.not_renewed)}")
    rows = _rows(t)
    parts.extend([_rows_text(rows)] if len(rows) > MANY else [_row_text(r) for r in rows])
    if not parts:
        parts.append("nothing renewed or deployed")
    line = f"{head}: {'; '.join(parts)}"
    unfinished = [r.cert for r in rows if r.unfinished]
    redo = t.not_renewed + t.renew_cut
    finish = finish or t.finish
    if not unfinished and not redo and not (finish and t.finish_due):
        return line
    deploy = "certmgr deploy " + (" ".join(unfinished) if len(unfinished) <= MANY else "--all")
    commands = [finish] if finish else (
        ([f"{t.renew_command} {' '.join(redo)}"] if redo else []) + ([deploy] if unfinished else []))
    return line + " — run " + " then ".join(f"`{c}`" for c in commands) + " to finish"
