"""Helper for test_store.py: a fork server whose children write to a store until they are SIGKILLed.

    python store_crash_writer.py MATERIALS_DIR

MATERIALS_DIR holds subdirectories with cert.pem, chain.pem and privkey.pem. Imports are paid
once here; each child is a fork, so a test can kill dozens of writers in well under a second each.
Commands on stdin, one per line, each answered by one line on stdout:

    write ROOT NAME   fork a child that loops lock → add_version → save_state → activate → prune(3)
                      on the store at ROOT → "pid PID" once the child runs
    hold ROOT ACTOR   fork a child that takes ROOT's lock and sleeps → "pid PID" once it holds it
    reap PID          wait for that child → "reaped PID SIGNAL" (0 when it exited by itself)
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from certmgr.material import CertMaterial
from certmgr.store import Store


def load_materials(directory: Path) -> list[CertMaterial]:
    return [
        CertMaterial(
            cert=(d / "cert.pem").read_bytes(),
            chain=(d / "chain.pem").read_bytes(),
            privkey=(d / "privkey.pem").read_bytes(),
        )
        for d in sorted(directory.iterdir())
    ]


def write_forever(root: Path, name: str, materials: list[CertMaterial], ready: int) -> None:
    store = Store.open(root)
    os.write(ready, b"x")
    i = 0
    while True:
        with store.lock("crash-writer"):
            version = store.add_version(name, materials[i % len(materials)])
            store.save_state(name, {"version": version, "iteration": i})
            store.activate(name, version)
            store.prune(name, keep=3)
        i += 1


def hold_forever(root: Path, actor: str, ready: int) -> None:
    store = Store.open(root)
    with store.lock(actor):
        os.write(ready, b"x")
        while True:
            signal.pause()


def spawn(body: object, *args: object) -> int:
    """Fork a child running `body(*args, ready_fd)`; return its pid once it wrote to `ready_fd`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the command loop
        os.close(r)
        try:
            body(*args, w)  # type: ignore[operator]
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    if not got:
        raise RuntimeError(f"child {pid} died before it was ready")
    return pid


def main() -> None:
    materials = load_materials(Path(sys.argv[1]))
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "write":
            reply = f"pid {spawn(write_forever, Path(args[0]), args[1], materials)}"
        elif cmd == "hold":
            reply = f"pid {spawn(hold_forever, Path(args[0]), ' '.join(args[1:]))}"
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            reply = f"reaped {args[0]} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}"
        else:
            reply = f"error unknown command {cmd!r}"
        print(reply, flush=True)


if __name__ == "__main__":
    main()
