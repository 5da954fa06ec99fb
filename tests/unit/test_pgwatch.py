"""certmgr.pgwatch: a statement overdue by its bound has its connection cut, and the loss is known first."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

from certmgr.pgwatch import Watch


def test_the_loss_is_known_before_the_connection_is_seen_to_end() -> None:
    """on_cut runs before the socket is shut down: a thread woken by the cut (the statement's caller) and sending
    again at once finds the loss already known (LockLost, nothing sent), not a dead socket."""
    ours, peer = socket.socketpair()
    seen: list[bool] = []

    def on_cut(why: str) -> None:
        ours.setblocking(False)
        try:
            ours.send(b"x")  # still open for writing: not shut down yet
            seen.append(True)
        except OSError:
            seen.append(False)

    conn = SimpleNamespace(pgconn=SimpleNamespace(socket=ours.fileno()))
    watch = Watch(conn, bound=0.2, where="test", role="data", on_cut=on_cut)  # type: ignore[arg-type]
    try:
        with watch.statement("a write"):
            deadline = time.monotonic() + 5
            while watch.cut is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
        assert watch.cut == "a write unanswered for more than 0.2s (connection cut)"
        assert seen == [True]
        assert peer.recv(16) == b"x" and peer.recv(16) == b""  # and then it was shut down
    finally:
        watch.close()
        ours.close()
        peer.close()
