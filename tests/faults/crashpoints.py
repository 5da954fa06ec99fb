"""Run the real certmgr CLI and SIGKILL it at a precise step that no outside observer can catch in time.

    python -m tests.faults.crashpoints STEP -- [certmgr arguments…]

Most crash points are produced from outside (the ACME proxy holds a request, the test watches
the audit log or a file and sends SIGKILL). Two steps last microseconds, so this wrapper arms a
trigger on the system call itself before handing over to `certmgr.cli.main`; certmgr's code runs
unchanged, and the process dies exactly as a power cut or the OOM killer would leave it:

* `privkey-write`  — half-way through writing `archive/<name>/…/privkey.pem` (the bytes written so
  far are on disk, the rest never will be);
* `live-swap`      — a version is renamed into `archive/` but the rename of `live/<name>` onto it has
  not happened yet (between the two renames that make a new version live);
* `audit-renewed`  — `live/<name>` already switched, half-way through appending the `renewed` line to
  audit.log (a torn last line; the renewal state is not saved either);
* `intent-remove`  — a POP's switch is in the audit log, but the deploy intent written before its commit
  is not removed yet (the next run must not audit that switch a second time);
* `after-audit:ACTION` — right after the audit line of ACTION (`renewed`, `revoked`, …) is written whole:
  the step it records is done, whatever follows it is not (`certmgr revoke` killed between its steps).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(step: str) -> None:
    if step in ("privkey-write", "audit-renewed"):
        real_write = os.write

        def torn(target: str, data: Any) -> bool:
            if step == "privkey-write":
                return "/archive/" in target and target.endswith("/privkey.pem")
            return target.endswith("/audit.log") and b'"action": "renewed"' in bytes(data)

        def write(fd: int, data: Any) -> int:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if len(data) > 1 and torn(target, data):
                real_write(fd, bytes(data[: len(data) // 2]))
                _die()
            return real_write(fd, data)

        os.write = write
    elif step == "live-swap":
        real_replace = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            d = os.fspath(dst)
            if os.path.basename(os.path.dirname(d)) == "live" and ".tmp-" in os.path.basename(os.fspath(src)):
                _die()
            real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif step == "intent-remove":
        real_unlink = os.unlink

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if "/state/intents/" in os.fspath(path):
                _die()
            real_unlink(path, *args, **kwargs)

        os.unlink = unlink
    elif step.startswith("after-audit:"):
        real_write = os.write
        mark = f'"action": "{step.removeprefix("after-audit:")}"'.encode()

        def write_then_die(fd: int, data: Any) -> int:
            n = real_write(fd, data)
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.endswith("/audit.log") and mark in bytes(data):
                _die()
            return n

        os.write = write_then_die
    else:
        raise SystemExit(f"crashpoints: unknown step {step!r} (privkey-write, live-swap, audit-renewed, intent-remove, "
                         "after-audit:ACTION)")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python -m tests.faults.crashpoints STEP -- [certmgr arguments…]")
    arm(argv[0])
    from certmgr.cli import main as certmgr_main

    certmgr_main(argv[2:], prog_name="certmgr")


if __name__ == "__main__":
    main(sys.argv[1:])
