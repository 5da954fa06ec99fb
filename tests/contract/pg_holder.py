"""A controller stand-in for the pause test: take the run lock, say so, wait for a line, then try a write.

argv: URL PASSWORD IDLE_TIMEOUT [in-take]. Prints `held EPOCH`, reads one line from stdin, tries add_version,
prints `wrote N` or `refused <exception class>: <message>` and exits 0.

`in-take`: after `held EPOCH`, takes a certificate's lock and stops itself (SIGSTOP) inside that take's
transaction, right after the epoch bump: a pause that catches a take or release running in a worker thread.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from certmgr.errors import StoreError
from certmgr.pgstore import PgStore
from tests.contract.conftest import SEALER, make_material


def stop_inside_the_next_take(store: PgStore) -> None:
    conn = store._locks._conn
    real = conn.execute

    def execute(query: Any, *args: Any, **kwargs: Any) -> Any:
        cur = real(query, *args, **kwargs)
        if "INSERT INTO certmgr_epochs" in str(query):
            print("in-take", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return cur

    conn.execute = execute  # type: ignore[method-assign]
    with store.lock_cert("example.com", "paused holder"):
        pass


def main() -> None:
    url, password, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
    material = make_material()
    store = PgStore.open(url, password=password, sealer=SEALER, idle_timeout=idle)
    with store.lock("paused holder"):
        print("held", store.held["run"], flush=True)
        if sys.argv[4:] == ["in-take"]:
            stop_inside_the_next_take(store)
        sys.stdin.readline()
        signal.alarm(60)  # a write that hangs (a blackholed connection) ends this process: the test fails, not hangs
        try:
            print("wrote", store.add_version("example.com", material), flush=True)
        except StoreError as exc:
            print(f"refused {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
