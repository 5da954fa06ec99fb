"""The tests' blackhole proxy frees its port on close (two tests in one worker use the same port, one after the other)."""

from __future__ import annotations

import socket

from tests.contract.blackhole import Blackhole


def test_a_closed_blackhole_frees_its_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for _ in range(3):  # close() must wake the accept thread: a listener it still blocks on keeps the port bound
        Blackhole(1, port).close()
