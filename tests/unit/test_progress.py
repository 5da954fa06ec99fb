"""Deploy progress: per-POP lines as they finish, a bar and colour only on a TTY, NO_COLOR, -v timings, -q problems."""

from __future__ import annotations

import datetime as dt
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from certmgr.deploy import HostOutcome, Status
from certmgr.progress import DeployProgress, Style, closing_lines, outcome_line, renew_lines
from tests.helpers import read_pty

EXPIRES = {"media.test": dt.datetime(2027, 3, 1, 9, 30, tzinfo=dt.UTC)}
OUTCOMES = [
    HostOutcome(cert="media.test", host="sally", status=Status.DEPLOYED, new_serial="0B", old_serial="0A", version=7,
                timings=(("connect", 0.21), ("upload", 0.05)), elapsed=0.9),
    HostOutcome(cert="media.test", host="esme", status=Status.SKIPPED, new_serial="0B", version=7, elapsed=0.1),
    HostOutcome(cert="media.test", host="bob", status=Status.ROLLED_BACK, new_serial="0B", old_serial="0A", version=6,
                error="deploy media.test → bob: nginx -t failed: \"boom\" (rolled back to version 6, reloaded)",
                hint="fix nginx on bob", elapsed=1.5),
]
PLAIN = Style(tty=False, colour=False)


def test_plain_lines_label_the_canary_and_hide_timings() -> None:
    """Piped: plain lines, the canary labelled, no timings, the error and hint under a failed POP."""
    lines = [outcome_line(o, PLAIN, canary=o.host == "sally") for o in OUTCOMES]
    assert lines[0] == "deployed    media.test → sally (canary) v7 serial 0A → 0B"
    assert lines[1] == "skipped     media.test → esme v7 serial 0B (already live)"
    assert lines[2] == ("rolled back media.test → bob v6 serial 0A → 0B\n"
                        "            deploy media.test → bob: nginx -t failed: \"boom\" (rolled back to version 6, "
                        "reloaded)\n            hint: fix nginx on bob")


def test_timings_only_with_verbose() -> None:
    """-v adds the elapsed time and the step timings to each line."""
    line = outcome_line(OUTCOMES[0], Style(tty=False, colour=False, verbose=True), canary=False)
    assert line == "deployed    media.test → sally v7 serial 0A → 0B 0.90s [connect 0.21 upload 0.05]"


def test_closing_line_counts_the_pops_that_serve_the_new_serial() -> None:
    """One closing line per certificate: N/N POPs serve SERIAL (expires …)."""
    assert closing_lines(OUTCOMES, EXPIRES) == ["media.test: 2/3 POPs serve 0B (expires 2027-03-01 09:30Z)"]


def test_quiet_prints_only_problems(capsys: pytest.CaptureFixture[str]) -> None:
    """-q: only the POPs that did not end deployed/skipped, then the closing line (none when all are fine)."""
    p = DeployProgress(3, Style(tty=False, colour=False, quiet=True))
    for o in OUTCOMES:
        p(o)
    p.close(EXPIRES)
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("rolled back media.test → bob")
    assert "sally" not in out and "esme" not in out
    assert out.splitlines()[-1] == "media.test: 2/3 POPs serve 0B (expires 2027-03-01 09:30Z)"
    fine = DeployProgress(2, Style(tty=False, colour=False, quiet=True))
    for o in OUTCOMES[:2]:
        fine(o)
    fine.close(EXPIRES)
    assert capsys.readouterr().out == ""


def test_piped_output_has_no_escape_sequences(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a TTY: no bar, no colour, no cursor control; lines in the order the POPs finished."""
    p = DeployProgress(3, Style(tty=False, colour=False), canaries=frozenset({"sally"}))
    for o in OUTCOMES:
        p(o)
    p.close(EXPIRES)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")][:3] == [
        "deployed", "skipped", "rolled"]


SCRIPT = """
import datetime as dt, sys
sys.path.insert(0, {root!r})
from tests.unit.test_progress import OUTCOMES, EXPIRES
from certmgr.progress import DeployProgress, Style
p = DeployProgress(3, Style.detect(sys.stdout, 0), canaries=frozenset({{"sally"}}))
for o in OUTCOMES:
    p(o)
p.close(EXPIRES)
"""


def run_in_pty(env: dict[str, str]) -> str:
    """Run SCRIPT with its stdout on a pseudo-terminal; returns everything written there."""
    root = str(Path(__file__).parents[2])
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=root)], stdout=slave, stderr=subprocess.PIPE,
                            env=env)
    os.close(slave)
    out = read_pty(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    return out.decode()


def test_tty_streams_lines_above_a_bar_in_colour() -> None:
    """On a TTY: a click progress bar counting POPs, the status words coloured, every line and the closing line."""
    env = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"}, "TERM": "xterm"}
    out = run_in_pty(env)
    assert "deploy" in out and "3/3" in out  # the bar, with its position
    assert "\x1b[32m\x1b[1m" in out or "\x1b[32m" in out  # deployed/skipped in green
    assert "\x1b[31m" not in out and "\x1b[33m" in out  # rolled back in yellow
    assert "media.test → sally (canary) v7 serial 0A → 0B" in out
    assert "media.test: 2/3 POPs serve 0B (expires 2027-03-01 09:30Z)" in out


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_is_honoured_on_a_tty(env: dict[str, str]) -> None:
    """NO_COLOR set (or TERM=dumb): on a TTY too, plain lines only, no escape sequence (no colour, no bar)."""
    out = run_in_pty({**{k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}, **env})
    assert "\x1b" not in out and "\r\n" in out and out.replace("\r\n", "\n").count("\r") == 0
    assert "deployed    media.test → sally (canary) v7 serial 0A → 0B\r\n" in out
    assert out.endswith("media.test: 2/3 POPs serve 0B (expires 2027-03-01 09:30Z)\r\n")


def test_renew_lines_quiet_keeps_failures_only() -> None:
    """renew -q prints only failed or overdue certificates, and its count line only then."""
    class Outcome:
        def __init__(self, status: str, overdue: bool = False) -> None:
            self.status, self.overdue, self.hint, self.notes, self.name = status, overdue, "h", (), status

        def line(self) -> str:
            return f"{self.status} line"

    assert renew_lines([Outcome("renewed"), Outcome("not-due")], quiet=True) == []
    assert renew_lines([Outcome("renewed"), Outcome("failed")], quiet=True) == [
        "failed line", "         hint: h", "renew: 1 renewed, 1 failed"]
