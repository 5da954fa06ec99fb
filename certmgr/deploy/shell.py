"""The deploy scripts that run on POPs, read from `certmgr/deploy/scripts/*.sh` and composed once.

A script names the shared pieces it needs on a `# certmgr-include: a.sh b.sh` line, which is
replaced by their text. Files, not string constants: `shellcheck -s sh` checks what ships.
"""

from __future__ import annotations

import importlib.resources
import re

_INCLUDE = re.compile(r"^# certmgr-include:(.*)$", re.MULTILINE)


def read(name: str) -> str:
    """The text of one file in scripts/ (read through importlib.resources, so it works from a wheel)."""
    return importlib.resources.files("certmgr").joinpath("deploy", "scripts", name).read_text(encoding="utf-8")


def compose(name: str) -> str:
    """Script `name` with its include line replaced by the included files, in order."""
    text = read(name)

    def expand(m: re.Match[str]) -> str:
        return "".join(read(part) for part in m.group(1).split())

    return _INCLUDE.sub(expand, text, count=1)


SCRIPTS = ("inspect.sh", "commit.sh", "rollback.sh", "prune.sh", "free.sh", "session.sh", "reloadprobe.sh")

INSPECT_SH = compose("inspect.sh")
COMMIT_SH = compose("commit.sh")
ROLLBACK_SH = compose("rollback.sh")
PRUNE_SH = compose("prune.sh")
SESSION_SH = compose("session.sh")  # runs the others in turn over one SSH channel (session.py)
RELOADPROBE_SH = compose("reloadprobe.sh")  # which reload argv a host allows (reload.py)
# Shared with doctor, which tries it on a temp file.
KEYOWN_SH = read("keyown.sh")
