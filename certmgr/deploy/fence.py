"""Fencing on the POP (docs/ha.md): the POP lock's epoch and this controller's name go to commit.sh,
which, under the POP's flock, refuses an epoch older than the last it saw (or the same one from
another holder) — so a controller that wakes from a pause cannot switch a POP a newer one handled.

With the directory store there is no epoch: nothing is passed and commit.sh checks nothing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from certmgr.inventory import Host
from certmgr.log import event
from certmgr.remote import Result

if TYPE_CHECKING:
    from certmgr.deploy.host import Job
    from certmgr.deploy.txn import Transaction

logger = logging.getLogger(__name__)

FENCE_FILE = "archive/.certmgr-fence"  # under cert_root: "EPOCH HOLDER", replaced atomically under the flock
TRACE_FILE = "archive/.certmgr-trace"  # lab only: when it exists, commit.sh appends begin/end lines to it
HINT = ("another controller took this POP's lock after this one (this one was paused or cut off from the "
        "database): nothing was switched; the newer controller's run is the one that counts (docs/ha.md)")


def holder_id() -> str:
    """This controller process, as the POP's fence file names it: host/pid (shell-safe characters only)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}/{os.getpid()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    """The POP lock's epoch (the fencing token) and who holds it."""

    epoch: int
    holder: str


def args(token: Token | None) -> list[str]:
    """commit.sh's epoch and holder arguments ("" "": no fencing)."""
    return ["", ""] if token is None else [str(token.epoch), token.holder]


def refusal(res: Result, host: Host, token: Token | None) -> str | None:
    """'fenced: POP saw epoch N from holder X (ours M)' when commit.sh refused our epoch, else None."""
    seen = res.get("fenced")
    if seen is None:
        return None
    epoch, _, holder = seen.partition(" ")
    ours = f"; ours {token.epoch} from {token.holder}" if token is not None else ""
    return f"fenced: {host.name} saw epoch {epoch} from holder {holder or '?'}{ours}"


async def audit_refusal(t: Transaction, todo: Sequence[Job], why: str) -> None:
    """One `fenced` audit row per certificate (a controller that lost its database lock cannot write it:
    Deployer.audit logs that instead), and one log line; nothing was switched."""
    for job in todo:
        event(logger, logging.ERROR, "deploy refused by the POP's fence", cert=job.name, host=t.host.name,
              why=why)
        await t.d.audit("fenced", job.name, job=job, host=t.host.name, epoch=t.fence.epoch if t.fence else None,
                        summary=f"{job.subject}: {why} (live unchanged)")
