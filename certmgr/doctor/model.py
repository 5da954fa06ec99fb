"""Doctor's shared types: a check, a report, the timeouts, and the small protocols the checks talk to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from certmgr import remote as remote_mod
from certmgr import sanitize
from certmgr.sshlib import asyncssh

GROUPS = ("inventory", "store", "ca", "dns", "host", "nginx", "timer")


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAIL = "fail"


_RANK = {Status.OK: 0, Status.WARNING: 1, Status.FAIL: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One finding: which check, about what, how it went, in one line, and what to do about it."""

    group: str  # one of GROUPS
    name: str  # e.g. "tsig", "ssh", "write", "test-command", "reload-command", "serves-live", "interval"
    subject: str  # what was checked: a CA, "dns.lab hachyderm.test", a host, "sally media.hachyderm.test"
    status: Status
    message: str
    hint: str | None = None
    elapsed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "subject": self.subject, "status": self.status.value,
                "message": self.message, "hint": self.hint, "elapsed_ms": round(self.elapsed * 1000, 1)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every check of one doctor run, in display order; exit 0 all ok, 1 warnings, 2 failures."""

    checks: tuple[Check, ...]
    elapsed: float = 0.0

    @property
    def status(self) -> Status:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=Status.OK)

    @property
    def exit_code(self) -> int:
        return _RANK[self.status]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for c in self.checks:
            out[c.status.value] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "exit_code": self.exit_code, "counts": self.counts(),
                "elapsed_ms": round(self.elapsed * 1000, 1), "checks": [c.to_json() for c in self.checks]}


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Every wait of a doctor run (seconds); `check` bounds one whole task (a CA, a zone, a host)."""

    check: float = 60.0
    acme_http: float = 10.0
    dns: float = 5.0
    ssh: remote_mod.Timeouts = field(default_factory=lambda: remote_mod.Timeouts(connect=10.0, command=30.0,
                                                                                  upload=15.0))
    handshake: float = 5.0


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class _StoreLike(Protocol):
    root: Path

    def names(self) -> list[str]: ...

    def live_version(self, name: str) -> int | None: ...

    def read(self, name: str, version: int | None = None) -> Any: ...

    def load_json(self, relpath: str, default: Any = None) -> Any: ...

    def load_account_key(self, ca_id: str) -> bytes | None: ...


def _one_line(text: str, limit: int = 300) -> str:
    return sanitize.flat(text, limit=limit)  # a POP's output is foreign text


class _Remote(Protocol):
    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> remote_mod.Result: ...

    async def sftp(self) -> asyncssh.SFTPClient: ...


Connector = Callable[..., Any]  # (host, *, jump, accept_new, timeouts) -> async context manager of _Remote
Prober = Callable[[str, int, str], Awaitable[Any]]


def _label(argv: Sequence[str]) -> str:
    from certmgr.deploy import command_label

    return command_label(argv)
