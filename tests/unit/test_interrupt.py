"""SIGINT/SIGTERM: the first stops new work and lets what runs finish (bounded), a second cuts it; one summary line."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from certmgr import interrupt
from certmgr.cli import main, run_async

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[interrupt.StopState]:
    yield interrupt.reset()
    interrupt.reset()


def tally(**kw: object) -> interrupt.StopState:
    st = interrupt.reset()
    for k, v in kw.items():
        setattr(st.tally, k, v)
    return st


M, S = "media.example", "static.example"
H = ["sally", "harry", "esme", "fred"]


@pytest.mark.parametrize(("signum", "count", "kw", "finish", "line"), [
    (signal.SIGINT, 1, {}, None, "certmgr: interrupted by SIGINT: nothing renewed or deployed"),
    (signal.SIGINT, 2, {"renewed": {M: 4}, "renew_cut": [S], "deploy_follows": True}, None,
     "certmgr: interrupted by SIGINT (again: stopped at once): renewed media.example (v4); renewal cut short: "
     "static.example (order abandoned, challenge records removed); media.example deployed to no POP (not started)"
     " — run `certmgr renew static.example` then `certmgr deploy media.example` to finish"),
    (signal.SIGTERM, 1, {"planned": {f"c{i}.example": H for i in range(5)},
                         "done": {"c0.example": {h: "deployed" for h in H}, "c1.example": {"sally": "failed"}},
                         "committing": {("c1.example", "harry")}}, None,
     "certmgr: interrupted by SIGTERM: deployed 4/20 (certificate, POP) pairs of 5 certificates; failed 1; cut "
     "short 1 (the next deploy settles them); not started 14 — run `certmgr deploy --all` to finish"),
    (signal.SIGINT, 1, {"renewed": {M: 4}, "deploy_follows": True, "planned": {M: H},
                        "done": {M: {"sally": "deployed", "harry": "deployed", "esme": "held", "fred": "held"}}},
     None, "certmgr: interrupted by SIGINT: renewed media.example (v4); media.example deployed to 2/4 POPs "
           "(sally, harry); not started: 2 POPs (esme, fred) — run `certmgr deploy media.example` to finish"),
    (signal.SIGTERM, 1, {"renewed": {M: 4, S: 2}, "deploy_follows": True}, None,
     "certmgr: interrupted by SIGTERM: renewed media.example (v4), static.example (v2); media.example deployed "
     "to no POP (not started); static.example deployed to no POP (not started) — run `certmgr deploy "
     "media.example static.example` to finish"),
    (signal.SIGTERM, 1, {"renewed": {M: 4}, "not_renewed": [S], "renew_command": "certmgr renew --force"}, None,
     "certmgr: interrupted by SIGTERM: renewed media.example (v4); renewal not started: static.example — run "
     "`certmgr renew --force static.example` to finish"),
    (signal.SIGINT, 2, {"planned": {M: H[:3]}, "done": {M: {"sally": "deployed", "harry": "unreachable"}},
                        "committing": {(M, "esme")}}, None,
     "certmgr: interrupted by SIGINT (again: stopped at once): media.example deployed to 1/3 POPs (sally); "
     "failed on 1 (harry); cut short on 1 (esme: the next deploy settles it) — run `certmgr deploy "
     "media.example` to finish"),
    (signal.SIGTERM, 1, {"planned": {M: H[:1]}, "done": {M: {"sally": "skipped"}}}, "certmgr run",
     "certmgr: interrupted by SIGTERM: media.example deployed to 1/1 POPs (sally)"),
    (signal.SIGTERM, 1, {"planned": {M: H[:2]}, "done": {M: {"sally": "deployed"}}}, "certmgr run",
     "certmgr: interrupted by SIGTERM: media.example deployed to 1/2 POPs (sally); not started: 1 POP (harry) — "
     "run `certmgr run` to finish"),
    # a POP that rolled back (its verify failed as the signal came) is said so, not "failed"
    (signal.SIGINT, 1, {"planned": {M: H[:3]}, "done": {M: {"sally": "deployed", "harry": "rolled back",
                                                            "esme": "unreachable"}}}, None,
     "certmgr: interrupted by SIGINT: media.example deployed to 1/3 POPs (sally); failed on 1 (esme); rolled back "
     "on 1 (harry: not served, the old version serves) — run `certmgr deploy media.example` to finish"),
    # rollback: its own command finishes it (`certmgr deploy` would clear the pin and undo the rollback)
    (signal.SIGINT, 1, {"planned": {M: H}, "done": {M: {"sally": "deployed", "harry": "deployed"}},
                        "finish": f"certmgr rollback {M} --to 4"}, None,
     "certmgr: interrupted by SIGINT: media.example deployed to 2/4 POPs (sally, harry); not started: 2 POPs "
     f"(esme, fred) — run `certmgr rollback {M} --to 4` to finish"),
    # revoke: unfinished while the CA has not revoked, even with every deploy done
    (signal.SIGTERM, 1, {"renewed": {M: 5}, "deploy_follows": True, "planned": {M: H[:1]},
                         "done": {M: {"sally": "deployed"}}, "finish": f"certmgr revoke {M} --reason keyCompromise",
                         "finish_due": True}, None,
     "certmgr: interrupted by SIGTERM: renewed media.example (v5); media.example deployed to 1/1 POPs (sally) — "
     f"run `certmgr revoke {M} --reason keyCompromise` to finish"),
    (signal.SIGTERM, 1, {"planned": {M: H[:1]}, "done": {M: {"sally": "deployed"}},
                         "finish": f"certmgr revoke {M} --reason superseded", "finish_due": False}, None,
     "certmgr: interrupted by SIGTERM: media.example deployed to 1/1 POPs (sally)"),
])
def test_summary_says_what_was_done_and_what_was_not(signum: int, count: int, kw: dict[str, object],
                                                     finish: str | None, line: str) -> None:
    """The one exit line names renewals, per-certificate POP counts, what was not started, and the command to finish."""
    st = tally(**kw)
    st.signum, st.count = signum, count
    assert interrupt.summary(st, finish=finish) == line


def test_exit_codes_are_128_plus_the_signal() -> None:
    """SIGINT exits 130 and SIGTERM 143, as a shell reports a process killed by them."""
    assert (interrupt.exit_code(signal.SIGINT), interrupt.exit_code(signal.SIGTERM)) == (130, 143)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_cancels_the_work_runs_its_cleanup_and_raises_interrupted(sig: signal.Signals) -> None:
    """SIGINT/SIGTERM inside the event loop cancel the work at once (its `finally` runs), then Interrupted is raised."""
    events: list[str] = []

    async def work() -> None:
        try:
            os.kill(os.getpid(), sig)
            await asyncio.sleep(60)
            events.append("finished")
        finally:
            events.append("cleanup")

    with pytest.raises(interrupt.Interrupted) as exc:
        run_async(work())
    assert exc.value.signum == sig and events == ["cleanup"]
    assert interrupt.stopping() and interrupt.state().count == 1


def test_run_async_puts_the_signal_handlers_back() -> None:
    """After run_async the process's SIGINT/SIGTERM handlers are what they were before."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    async def nothing() -> int:
        return 1

    assert run_async(nothing()) == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_outside_the_event_loop_exits_130_without_aborted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt anywhere in a command ends it with exit 130 and the summary line, never click's Aborted!."""
    from certmgr import inventory

    def interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inventory, "load", interrupted)
    result = CliRunner().invoke(main, ["--inventory", str(ROOT / "domains.toml"), "inventory", "check"])
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output
    assert result.output.strip().splitlines() == ["certmgr: interrupted by SIGINT: nothing renewed or deployed"]


_BLOCKED_EXIT = """
import signal, sys, threading
from certmgr import interrupt
from certmgr.cli import base

def main():  # a command interrupted while a worker thread waits on the network (an ACME request, up to 20 s)
    threading.Thread(target=threading.Event().wait, args=(%(hold)s,), name="certmgr-acme_0").start()
    interrupt.note(signal.SIGINT)
    print("summary line", file=sys.stderr)
    sys.exit(130)

base.main = main
base.entry()
"""


@pytest.mark.parametrize("interrupted", [True, False])
def test_the_console_script_does_not_wait_for_a_blocked_worker_after_a_signal(interrupted: bool) -> None:
    """After SIGINT the process ends with its exit code and its output, not when a blocked worker thread gives up;
    without a signal, exit is as Python's own (threads are joined)."""
    import subprocess
    import sys

    code = _BLOCKED_EXIT % {"hold": 60 if interrupted else 0.2}
    if not interrupted:
        code = code.replace("    interrupt.note(signal.SIGINT)\n", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stderr) == (130, "summary line\n")
