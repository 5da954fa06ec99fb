"""benchmarks/wanproxy.py, which `benchmarks/deploy.py --rtt` puts between certmgr and the lab's POPs: it must add
its round-trip time (no less), pass bytes whole and in order, and pass half-closes and aborts on."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

RTT = 0.08


def _wanproxy() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "wanproxy.py"
    spec = importlib.util.spec_from_file_location("wanproxy", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["wanproxy"] = mod
    spec.loader.exec_module(mod)
    return mod


wanproxy = _wanproxy()
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def proxied(handler: Handler) -> AsyncIterator[tuple[str, int]]:
    """A server running `handler`, and the proxy's address in front of it."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[:2]
    proxy = await wanproxy._serve(("127.0.0.1", 0), target, RTT)
    try:
        yield proxy.sockets[0].getsockname()[:2]
    finally:
        proxy.close()
        server.close()


def test_a_request_and_its_answer_take_two_round_trips_the_connect_and_the_exchange() -> None:
    """The first answer comes no sooner than 2 RTT after connecting (TCP handshake, then the request's round trip),
    a later exchange no sooner than 1 RTT, and not much later either."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            w.write(line)
            await w.drain()
        w.close()

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        async with proxied(echo) as addr:
            t0 = loop.time()
            r, w = await asyncio.open_connection(*addr)
            w.write(b"one\n")
            assert await r.readline() == b"one\n"
            t1 = loop.time()
            w.write(b"two\n")
            assert await r.readline() == b"two\n"
            t2 = loop.time()
            w.close()
            return t1 - t0, t2 - t1

    first, second = asyncio.run(main())
    assert first >= 2 * RTT, first
    assert second >= RTT, second
    assert second < 2 * RTT, second  # one round trip, not two (loose: two busy cores)


def test_bytes_pass_whole_and_in_order_both_ways_and_a_half_close_passes_on() -> None:
    """Four MiB in chunks arrive whole and in order; the client's EOF reaches the server, which still answers after
    it (a half-close stays open), and the server's EOF then reaches the client."""
    blob = bytes(range(256)) * 16384

    async def count(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # to EOF: the client's half-close
        w.write(str(len(data)).encode() + b" " + (b"same" if data == blob else b"different"))
        w.write_eof()
        w.close()

    async def main() -> bytes:
        async with proxied(count) as addr:
            r, w = await asyncio.open_connection(*addr)
            for i in range(0, len(blob), 100_000):
                w.write(blob[i:i + 100_000])
                await w.drain()
            w.write_eof()
            answer = await r.read()
            w.close()
            return answer

    assert asyncio.run(main()) == f"{len(blob)} same".encode()


def test_a_client_that_aborts_closes_the_connection_to_the_server() -> None:
    """A client that resets its connection (as a TLS probe does when done) leaves no connection open upstream:
    the server sees its end."""
    async def main() -> None:
        gone = asyncio.Event()

        async def wait_end(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"hello\n")
            await r.read()
            gone.set()
            w.close()

        async with proxied(wait_end) as addr:
            r, w = await asyncio.open_connection(*addr)
            assert await r.readline() == b"hello\n"
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
            w.transport.abort()
            await asyncio.wait_for(gone.wait(), 5)

    asyncio.run(main())
