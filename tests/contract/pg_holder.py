"""A controller stand-in for the pause test: take the run lock, say so, wait for a line, then try a write.

argv: URL PASSWORD IDLE_TIMEOUT. Prints `held EPOCH`, reads one line from stdin, tries add_version,
prints `wrote N` or `refused <exception class>: <message>` and exits 0.
"""

from __future__ import annotations

import signal
import sys

from certmgr.errors import StoreError
from certmgr.pgstore import PgStore
from tests.contract.conftest import SEALER, make_material


def main() -> None:
    url, password, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
    material = make_material()
    store = PgStore.open(url, password=password, sealer=SEALER, idle_timeout=idle)
    with store.lock("paused holder"):
        print("held", store.held["run"], flush=True)
        sys.stdin.readline()
        signal.alarm(60)  # a write that hangs (a blackholed connection) ends this process: the test fails, not hangs
        try:
            print("wrote", store.add_version("example.com", material), flush=True)
        except StoreError as exc:
            print(f"refused {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
