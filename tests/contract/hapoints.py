"""Run the real certmgr CLI and freeze it (SIGSTOP, as a VM pause would) at one step of a POP transaction.

    python -m tests.contract.hapoints pause-before-commit MARKER -- [certmgr arguments…]

`pause-before-commit`: the first POP transaction that reaches its commit writes "HOST EPOCH" to
MARKER, then the process stops itself; after SIGCONT that commit runs with the epoch it had. A step
that lasts microseconds cannot be caught from outside; certmgr's code is unchanged (the method is
wrapped here, in the test's own process image, as tests/faults/crashpoints.py does).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def arm(step: str, marker: Path) -> None:
    if step != "pause-before-commit":
        raise SystemExit(f"hapoints: unknown step {step!r} (pause-before-commit)")
    from certmgr.deploy import txn

    real = txn.Transaction.commit
    paused: list[str] = []

    async def commit(self: Any, todo: Any) -> Any:
        if not paused:
            paused.append(self.host.name)
            epoch = self.fence.epoch if self.fence is not None else ""
            marker.write_text(f"{self.host.name} {epoch}\n")
            os.kill(os.getpid(), signal.SIGSTOP)
        return await real(self, todo)

    txn.Transaction.commit = commit  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: python -m tests.contract.hapoints STEP MARKER -- [certmgr arguments…]")
    arm(argv[0], Path(argv[1]))
    from certmgr.cli import main as certmgr_main

    certmgr_main(argv[3:], prog_name="certmgr")


if __name__ == "__main__":
    main(sys.argv[1:])
