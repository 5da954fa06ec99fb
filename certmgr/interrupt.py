"""Interrupts: SIGINT/SIGTERM stop new work, and a tally of what the run did makes the one line it exits with.

The first signal asks the steps to start nothing new (no new order, no new POP commit) while
commits already running finish; the CLI bounds that wait (GRACE) and a second signal cuts it short.
Signals are process-wide, so the state here is too: the CLI resets it for each command.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

GRACE = 30.0  # seconds commits already running may take after the first signal (then they are cut)
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
    deploy_follows: bool = False  # the command deploys what it renews
    renew_command: str = "certmgr renew"  # how to start the renewals a signal stopped
    planned: dict[str, list[str]] = field(default_factory=dict)  # cert → hosts this run meant to deploy to
    done: dict[str, dict[str, str]] = field(default_factory=dict)  # cert → host → outcome status
    committing: set[tuple[str, str]] = field(default_factory=set)  # (cert, host) with a commit under way

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


def _hosts(hosts: list[str], limit: int = 6) -> str:
    shown = ", ".join(hosts[:limit])
    return shown + (f", +{len(hosts) - limit} more" if len(hosts) > limit else "")


def summary(st: StopState, *, finish: str | None = None) -> str:
    """The one line a signalled run exits with: what was done, what was not, and how to finish.

    `finish` is the command that finishes the work (default: `certmgr deploy` of the unfinished certificates).
    """
    t = st.tally
    name = signal.Signals(st.signum).name if st.signum is not None else "signal"
    head = f"certmgr: interrupted by {name}" + (" (again: stopped at once)" if st.count > 1 else "")
    parts: list[str] = []
    if t.renewed:
        parts.append("renewed " + ", ".join(f"{n} (v{v})" if v is not None else n for n, v in t.renewed.items()))
    if t.not_renewed:
        parts.append(f"renewal not started: {', '.join(t.not_renewed)}")
    unfinished: list[str] = []
    for cert in dict.fromkeys([*t.renewed, *t.planned]):
        hosts = t.planned.get(cert)
        if hosts is None:
            if t.deploy_follows:
                parts.append(f"{cert} deployed to no POP (not started)")
                unfinished.append(cert)
            continue
        done = t.done.get(cert, {})
        ok = [h for h in hosts if done.get(h) in ("deployed", "skipped")]
        failed = [h for h in hosts if h in done and done[h] not in ("deployed", "skipped", "held")]
        cut = [h for h in hosts if (cert, h) in t.committing]
        untouched = [h for h in hosts if h not in ok and h not in failed and h not in cut]
        text = f"{cert} deployed to {len(ok)}/{len(hosts)} POPs" + (f" ({_hosts(ok)})" if ok else "")
        if failed:
            text += f"; failed on {len(failed)} ({_hosts(failed)})"
        if cut:
            text += f"; cut short on {len(cut)} ({_hosts(cut)}: the next deploy settles them)"
        if untouched:
            text += f"; not started: {len(untouched)} POP{'s' if len(untouched) != 1 else ''} ({_hosts(untouched)})"
        parts.append(text)
        if failed or cut or untouched:
            unfinished.append(cert)
    if not parts:
        parts.append("nothing was changed")
    line = f"{head}: {'; '.join(parts)}"
    if not unfinished and not t.not_renewed:
        return line
    commands = [finish] if finish else (
        ([f"{t.renew_command} {' '.join(t.not_renewed)}"] if t.not_renewed else [])
        + ([f"certmgr deploy {' '.join(unfinished)}"] if unfinished else []))
    return line + " — run " + " then ".join(f"`{c}`" for c in commands) + " to finish"
