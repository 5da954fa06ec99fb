"""The installed timer, as systemd sees it (`systemctl show`): loaded, enabled, active, its next run, its files.

Doctor asks systemd rather than reading unit directories or the repository's `systemd/` copy: what
counts is the timer systemd would fire. When systemctl is missing or systemd is not running, it says so.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from certmgr import sanitize
from certmgr.doctor.model import Check, Status
from certmgr.timer import TIMER_UNIT

# argv after "systemctl" → (exit status, stdout, stderr); raises FileNotFoundError when there is no systemctl
Systemctl = Callable[[Sequence[str]], tuple[int, str, str]]
PROPERTIES = ("LoadState", "UnitFileState", "ActiveState", "NeedDaemonReload", "FragmentPath", "DropInPaths",
              "NextElapseUSecRealtime", "TimersCalendar")
NOT_SCHEDULED = "nothing runs certmgr on a schedule"
OTHER_SCHEDULER = "if cron or another scheduler runs certmgr, pass --timer-interval with its interval"


def run_systemctl(args: Sequence[str], *, timeout: float = 10.0) -> tuple[int, str, str]:
    """The real `systemctl` from PATH, never paged, bounded in time."""
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C"}
    try:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return 124, "", f"no answer within {timeout:g}s"
    return proc.returncode, proc.stdout, proc.stderr


@dataclass(frozen=True, slots=True, kw_only=True)
class InstalledTimer:
    """certmgr.timer as loaded by systemd: the unit file and drop-ins it read, and when it fires next."""

    files: tuple[Path, ...]
    next_run: str | None
    calendar: str | None


def installed_timer(systemctl: Systemctl, unit: str = TIMER_UNIT) -> tuple[Check, InstalledTimer | None]:
    """One `installed` check (enabled and active, or why not) and, when systemd has the unit loaded, its files."""
    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="timer", name="installed", subject=unit, status=status, message=message, hint=hint)

    try:
        rc, out, err = systemctl(["show", unit, "--no-pager", "-p", ",".join(PROPERTIES)])
    except FileNotFoundError:
        return result(Status.WARNING, f"systemctl not found: no systemd here, so no {unit}: {NOT_SCHEDULED}",
                      OTHER_SCHEDULER), None
    if rc != 0:
        why = sanitize.flat(err or out or f"exit {rc}", limit=200)
        if "not been booted with systemd" in why or "Failed to connect to bus" in why:
            return result(Status.WARNING, f"systemd is not running here (systemctl: \"{why}\"): cannot see an "
                                          f"installed {unit}", f"run doctor on the machine (or container) where "
                                                               f"systemd runs certmgr; {OTHER_SCHEDULER}"), None
        return result(Status.WARNING, f"`systemctl show {unit}` failed: \"{why}\"", OTHER_SCHEDULER), None
    props = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
    load, enabled, active = props.get("LoadState", ""), props.get("UnitFileState", ""), props.get("ActiveState", "")
    install = (f"install systemd/certmgr.timer and certmgr.service in /etc/systemd/system, then `systemctl "
               f"daemon-reload && systemctl enable --now {unit}`; {OTHER_SCHEDULER}")
    if load == "not-found":
        return result(Status.WARNING, f"{unit} is not installed (systemd: not-found): {NOT_SCHEDULED}", install), None
    if load == "masked":
        return result(Status.FAIL, f"{unit} is masked: it never fires", f"systemctl unmask {unit}, then "
                                                                         f"systemctl enable --now {unit}"), None
    if load != "loaded":
        return result(Status.FAIL, f"{unit} is {load or 'in an unknown load state'}: systemd cannot use it",
                      f"`systemctl status {unit}` says why (a syntax error in the unit?)"), None
    files = tuple(Path(p) for p in [props.get("FragmentPath", ""), *props.get("DropInPaths", "").split()] if p)
    timer = InstalledTimer(files=files, next_run=props.get("NextElapseUSecRealtime") or None,
                           calendar=props.get("TimersCalendar") or None)
    where = str(files[0]) if files else unit
    if enabled != "enabled":
        return result(Status.FAIL, f"{unit} ({where}) is installed but {enabled or 'not enabled'}: it does not "
                                   "start at boot", f"systemctl enable --now {unit}"), timer
    if active != "active":
        return result(Status.FAIL, f"{unit} is enabled but {active or 'not active'}: nothing fires until the next "
                                   "boot", f"systemctl start {unit}"), timer
    if props.get("NeedDaemonReload") == "yes":
        return result(Status.WARNING, f"{unit}'s files changed since systemd read them: it still fires on the old "
                                      "schedule", "systemctl daemon-reload"), timer
    nxt = f"; next run {timer.next_run}" if timer.next_run else ""
    return result(Status.OK, f"enabled and active ({where}){nxt}"), timer
