"""doctor asks systemd (`systemctl show`) for the installed, enabled timer instead of reading the repository's copy."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from certmgr.doctor import Status, check_timer
from certmgr.doctor.systemd import installed_timer, run_systemctl
from certmgr.inventory import loads
from certmgr.timer import REPO_SYSTEMD_DIR
from tests import fake_systemctl, inv

INV = loads(inv.toml(certificates=[inv.cert("a", domains=["a.example.test"])]))
NOW = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)


def answering(props: dict[str, str] | None = None, *, rc: int = 0, err: str = "") -> Any:
    def systemctl(args: Sequence[str]) -> tuple[int, str, str]:
        assert list(args[:2]) == ["show", "certmgr.timer"]
        return rc, "".join(f"{k}={v}\n" for k, v in (props or {}).items()), err
    return systemctl


def missing(args: Sequence[str]) -> tuple[int, str, str]:
    raise FileNotFoundError("systemctl")


REPO = fake_systemctl.repo_timer(REPO_SYSTEMD_DIR)
NOT_FOUND = {"LoadState": "not-found", "UnitFileState": "", "ActiveState": "inactive"}
INSTALL = ("install systemd/certmgr.timer and certmgr.service in /etc/systemd/system, then `systemctl daemon-reload "
           "&& systemctl enable --now certmgr.timer`; if cron or another scheduler runs certmgr, pass "
           "--timer-interval with its interval")


@pytest.mark.parametrize(("systemctl", "status", "message", "hint"), [
    (answering(REPO), Status.OK,
     f"enabled and active ({REPO_SYSTEMD_DIR}/certmgr.timer); next run Fri 2026-12-04 00:23:11 UTC", None),
    (answering(NOT_FOUND), Status.WARNING,
     "certmgr.timer is not installed (systemd: not-found): nothing runs certmgr on a schedule", INSTALL),
    (answering({**REPO, "UnitFileState": "disabled", "ActiveState": "inactive"}), Status.FAIL,
     f"certmgr.timer ({REPO_SYSTEMD_DIR}/certmgr.timer) is installed but disabled: it does not start at boot",
     "systemctl enable --now certmgr.timer"),
    (answering({**REPO, "ActiveState": "inactive"}), Status.FAIL,
     "certmgr.timer is enabled but inactive: nothing fires until the next boot", "systemctl start certmgr.timer"),
    (answering({**REPO, "NeedDaemonReload": "yes"}), Status.WARNING,
     "certmgr.timer's files changed since systemd read them: it still fires on the old schedule",
     "systemctl daemon-reload"),
    (answering({**REPO, "LoadState": "masked"}), Status.FAIL, "certmgr.timer is masked: it never fires",
     "systemctl unmask certmgr.timer, then systemctl enable --now certmgr.timer"),
    (answering(rc=1, err="System has not been booted with systemd as init system (PID 1). Can't operate.\n"
                         "Failed to connect to bus: Host is down\n"), Status.WARNING,
     "systemd is not running here (systemctl: \"System has not been booted with systemd as init system (PID 1). "
     "Can't operate. Failed to connect to bus: Host is down\"): cannot see an installed certmgr.timer",
     "run doctor on the machine (or container) where systemd runs certmgr; if cron or another scheduler runs "
     "certmgr, pass --timer-interval with its interval"),
    (missing, Status.WARNING,
     "systemctl not found: no systemd here, so no certmgr.timer: nothing runs certmgr on a schedule",
     "if cron or another scheduler runs certmgr, pass --timer-interval with its interval"),
])
def test_installed_timer_table(systemctl: Any, status: Status, message: str, hint: str | None) -> None:
    """Each state systemd reports for certmgr.timer gives one `installed` finding with its exact words."""
    check, _ = installed_timer(systemctl)
    assert (check.group, check.name, check.subject) == ("timer", "installed", "certmgr.timer")
    assert (check.status, check.message, check.hint) == (status, message, hint)


def test_interval_is_read_from_the_files_systemd_loaded() -> None:
    """The interval comes from the unit and drop-ins systemd names (FragmentPath, DropInPaths), not a fixed place."""
    _, timer = installed_timer(answering(REPO))
    assert timer is not None
    assert timer.files == (REPO_SYSTEMD_DIR / "certmgr.timer", REPO_SYSTEMD_DIR / "certmgr.timer.d" / "twice-daily.conf")
    check = check_timer(INV, None, (), interval=None, timer_files=timer.files, now=NOW)
    assert check.status == Status.OK and check.message.startswith("runs at least every 13h")
    _, none = installed_timer(answering(NOT_FOUND))
    assert none is None
    unknown = check_timer(INV, None, (), interval=None, timer_files=(), now=NOW)
    assert (unknown.status, unknown.message) == (Status.WARNING, "no installed timer to read: its interval is unknown")


def test_real_runner_against_a_fake_systemctl_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_systemctl runs `systemctl` from PATH: a fake one there answers for an enabled timer, or for no systemd."""
    for key, value in fake_systemctl.install(tmp_path / "bin", {"certmgr.timer": REPO}).items():
        monkeypatch.setenv(key, value)
    check, timer = installed_timer(run_systemctl)
    assert check.status == Status.OK and timer is not None and len(timer.files) == 2
    monkeypatch.setenv("FAKE_SYSTEMCTL_DOWN", "1")
    check, timer = installed_timer(run_systemctl)
    assert check.status == Status.WARNING and check.message.startswith("systemd is not running here") and timer is None


def test_no_systemctl_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any systemctl on PATH doctor says so (warning), it does not fall back to the repository's copy."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not any((Path(d) / "systemctl").exists() for d in os.environ["PATH"].split(os.pathsep))
    check, timer = installed_timer(run_systemctl)
    assert check.message.startswith("systemctl not found") and timer is None
