"""A stand-in `systemctl` for tests on machines where systemd is not PID 1: answers `show UNIT -p …` from JSON.

Written to a directory put first on PATH as an executable `systemctl`; FAKE_SYSTEMCTL names a JSON file
mapping a unit to its properties (absent unit: LoadState=not-found). Anything else exits 1 with systemd's
"not booted" message, as the real one does without systemd.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

SCRIPT = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
units = json.load(open(os.environ["FAKE_SYSTEMCTL"]))
if os.environ.get("FAKE_SYSTEMCTL_DOWN"):
    print("System has not been booted with systemd as init system (PID 1). Can't operate.", file=sys.stderr)
    print("Failed to connect to bus: Host is down", file=sys.stderr)
    sys.exit(1)
if args[:1] == ["show"]:
    unit = args[1]
    props = units.get(unit, {{"LoadState": "not-found", "UnitFileState": "", "ActiveState": "inactive"}})
    wanted = args[args.index("-p") + 1].split(",") if "-p" in args else list(props)
    for key in wanted:
        print(f"{{key}}={{props.get(key, '')}}")
    sys.exit(0)
print("fake systemctl: unsupported: " + " ".join(args), file=sys.stderr)
sys.exit(1)
"""


def install(bindir: Path, units: dict[str, dict[str, str]]) -> dict[str, str]:
    """Write the fake into `bindir` with `units`; returns the environment changes (PATH, FAKE_SYSTEMCTL)."""
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "systemctl"
    exe.write_text(SCRIPT)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    data = bindir / "units.json"
    data.write_text(json.dumps(units))
    return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SYSTEMCTL": str(data)}


def repo_timer(repo_systemd: Path, **over: str) -> dict[str, str]:
    """certmgr.timer installed from the repository's copy with its twice-daily drop-in, enabled and active."""
    return {"LoadState": "loaded", "UnitFileState": "enabled", "ActiveState": "active", "NeedDaemonReload": "no",
            "FragmentPath": str(repo_systemd / "certmgr.timer"),
            "DropInPaths": str(repo_systemd / "certmgr.timer.d" / "twice-daily.conf"),
            "NextElapseUSecRealtime": "Fri 2026-12-04 00:23:11 UTC", "TimersCalendar": "", **over}
