"""A client-side bound on every PostgreSQL statement: a connection whose answer is overdue is cut (docs/ha.md).

A route that goes silent (a blackhole: no RST, no FIN; worse, a proxy or NAT on the way that still ACKs)
leaves libpq waiting for an answer until TCP gives up — hours, or never. Keepalives and
`tcp_user_timeout` in the conninfo (`KEEPALIVES`) end a dead TCP path; this watch ends the rest: a
statement outstanding for longer than `bound` seconds has its socket shut down, so the waiting call
fails at once as a lost connection (StoreUnavailable, exit 69; LockLost) and nothing more is sent on it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

logger = logging.getLogger(__name__)


def keepalives(bound: float) -> dict[str, Any]:
    """libpq connection options: TCP keepalives and `tcp_user_timeout` (unacknowledged data), both ending a
    dead path within about `bound` seconds (an answer that never comes on a path that still ACKs is the watch's)."""
    idle = max(1, round(bound / 3))
    return {"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": idle, "keepalives_count": 3,
            "tcp_user_timeout": int(bound * 1000)}


class Watch:
    """Watches one connection: `statement()` marks a call waiting for the server; one overdue by `bound` seconds
    has the connection's socket shut down (`cut` says why) and `on_cut` called (from the watch's thread)."""

    def __init__(self, conn: psycopg.Connection[Any], *, bound: float, where: str, role: str,
                 on_cut: Callable[[str], None] | None = None) -> None:
        self.bound = bound
        self.cut: str | None = None
        self._conn = conn
        self._where = where
        self._on_cut = on_cut
        self._lock = threading.Lock()
        self._depth = 0
        self._since: float | None = None
        self._what = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(min(1.0, bound / 10),), daemon=True,
                                        name=f"certmgr-pg-watch-{role}")
        self._thread.start()

    @contextmanager
    def statement(self, what: str) -> Iterator[None]:
        """The block waits for the server (a statement, a transaction); nested blocks count as the outer one."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._since, self._what = time.monotonic(), what
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._since = None

    def close(self) -> None:
        """Stop watching; before the connection is closed (its socket's number may be reused after)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                since, what = self._since, self._what
                overdue = since is not None and time.monotonic() - since > self.bound and self.cut is None
                if overdue:
                    self.cut = f"{what} unanswered for more than {self.bound:g}s (connection cut)"
                    # the loss is known (on_cut: no more statements) before anyone sees the connection end: a
                    # statement another thread sends right after the cut is refused, not lost on a dead socket
                    if self._on_cut is not None:
                        self._on_cut(self.cut)
                    self._shutdown()  # under the lock: the statement cannot end and its socket be reused meanwhile
            if overdue:
                logger.error("store %s: %s", self._where, self.cut)

    def _shutdown(self) -> None:
        """Shut the socket down (both ways): libpq's wait for an answer sees end-of-file at once."""
        try:
            fd = self._conn.pgconn.socket
            sock = socket.socket(fileno=fd)
        except (psycopg.Error, OSError):  # already closed or broken: nothing is waiting on it
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays libpq's
