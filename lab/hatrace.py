"""The lab's observer of POP transactions for the two-controller tests (docs/ha.md).

`enable` creates `archive/.certmgr-trace` on each POP (owned by the deploy user); while it exists,
commit.sh and rollback.sh append `begin|end|fenced holder=H epoch=E pid=P time=T` under the POP's flock. `violations`
reads it back and states the invariants: never two transactions on one POP at once, epochs never
decrease. The fence file (`archive/.certmgr-fence`) is what the POP last accepted.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from lab.pop import DEPLOY_USER, PopPaths

TRACE = "archive/.certmgr-trace"
FENCE = "archive/.certmgr-fence"


@dataclass(frozen=True, slots=True)
class Line:
    word: str  # begin | end | fenced
    holder: str
    epoch: int | None
    pid: int
    time: str


def enable(pops: list[PopPaths]) -> None:
    """Ask every POP for a trace (after a reseed, which recreates cert_root): an empty file the deploy user owns."""
    pw = pwd.getpwnam(DEPLOY_USER)
    for p in pops:
        f = p.cert_root / TRACE
        f.write_text("")
        os.chown(f, pw.pw_uid, pw.pw_gid)
        f.chmod(0o600)


def read(p: PopPaths) -> list[Line]:
    out = []
    for raw in (p.cert_root / TRACE).read_text().splitlines():
        word, *fields = raw.split()
        kv = dict(f.split("=", 1) for f in fields)
        out.append(Line(word=word, holder=kv["holder"], epoch=int(kv["epoch"]) if kv["epoch"] else None,
                        pid=int(kv["pid"]), time=kv["time"]))
    return out


def fence(p: PopPaths) -> tuple[int, str] | None:
    """The POP's fence file: (epoch, holder) it last accepted, or None (never fenced)."""
    f = p.cert_root / FENCE
    if not f.exists():
        return None
    epoch, holder = f.read_text().split()
    return int(epoch), holder


def violations(lines: list[Line]) -> list[str]:
    """What the trace of one POP shows against the invariants (empty: none).

    A transaction is a `begin` followed by its own `end` (same pid) before any other `begin`; the
    epochs of accepted transactions never decrease.
    """
    bad: list[str] = []
    open_: Line | None = None
    last_epoch: int | None = None
    for i, ln in enumerate(lines):
        if ln.word == "begin":
            if open_ is not None:
                bad.append(f"line {i + 1}: begin of pid {ln.pid} while pid {open_.pid} (epoch {open_.epoch}) is open")
            open_ = ln
            if ln.epoch is not None:
                if last_epoch is not None and ln.epoch < last_epoch:
                    bad.append(f"line {i + 1}: epoch {ln.epoch} after {last_epoch}")
                last_epoch = ln.epoch
        elif ln.word == "end":
            if open_ is None or open_.pid != ln.pid:
                bad.append(f"line {i + 1}: end of pid {ln.pid} without its begin")
            open_ = None
    if open_ is not None:
        bad.append(f"pid {open_.pid} (epoch {open_.epoch}) began and never ended")
    return bad


def all_violations(pops: dict[str, PopPaths]) -> dict[str, list[str]]:
    return {name: v for name, p in pops.items() if (v := violations(read(p)))}


def exists(p: PopPaths) -> bool:
    return Path(p.cert_root / TRACE).exists()
