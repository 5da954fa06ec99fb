"""A loopback TCP proxy that adds network distance: every byte waits RTT/2 in each direction.

    .venv/bin/python benchmarks/wanproxy.py --rtt 50 LISTEN=TARGET [LISTEN=TARGET ...]

LISTEN and TARGET are `address:port`. A new connection first waits one RTT (the TCP handshake a
distant server costs), then data flows both ways, each chunk delivered RTT/2 after it was read,
in order; bandwidth is not limited. Prints "ready" once every listener is up; runs until killed.
Used by `benchmarks/deploy.py --rtt` to put the lab's POPs "far away" (real POPs are remote:
what is latency there is CPU time here, where the POPs share the machine with certmgr).

The proxy's CPU is the lab's, not certmgr's (a real WAN delays for free), so it is kept small:
bare asyncio protocols, no streams or tasks; per direction a queue of (due, chunk) and at most one
timer, which writes every chunk due by then in one `write`. Its process is named `wanproxy`
(prctl), so `ps` and benchmarks/procmeter.py tell it from certmgr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import sys
from collections.abc import Callable

_EOF = b""  # queued after the last chunk of a direction: pass the half-close on
_GONE = None  # queued after the last chunk when the source was lost: close the other side


class _Direction:
    """One way of one connection: chunks read from the source, written to `dst` `delay` seconds later."""

    __slots__ = ("delay", "done", "dst", "loop", "on_done", "queue", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, on_done: Callable[[], None]) -> None:
        self.loop = loop
        self.delay = delay
        self.dst: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.on_done = on_done

    def push(self, data: bytes | None, at: float | None = None) -> None:
        self.queue.append(((self.loop.time() if at is None else at) + self.delay, data))
        if self.timer is None and self.dst is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def start(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Write every chunk due by now (one write), act on an end marker, re-arm for the next chunk."""
        self.timer = None
        dst = self.dst
        assert dst is not None
        now = self.loop.time()
        out: list[bytes] = []
        end: bytes | bool | None = False
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data:
                out.append(data)
            else:
                end = data
                break
        if out and not dst.is_closing():
            dst.write(out[0] if len(out) == 1 else b"".join(out))
        if end is not False:
            self.queue.clear()
            self.done = True
            try:
                if end is _EOF and not dst.is_closing() and dst.can_write_eof():
                    dst.write_eof()
                else:
                    dst.close()
            except OSError:  # the other end is already gone (ENOTCONN at shutdown)
                dst.abort()
            self.on_done()
        elif self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; what it reads goes into `out`."""

    def __init__(self, conn: _Conn, out: _Direction, back: _Direction, *, accepted: bool = False) -> None:
        self.conn = conn
        self.accepted = accepted  # the client's socket (from the listener), not the upstream one
        self.out = out  # data read here, towards the other side
        self.back = back  # data towards this side (paused while this side's buffer is full)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.accepted:
            self.conn.accepted(transport)

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(_EOF)
        return True  # a half-close stays open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.out.done:
            self.out.push(_GONE)
        self.conn.lost(self)

    def pause_writing(self) -> None:  # this side's buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class _Conn:
    """A client's connection: after one RTT the upstream connection, then both directions delayed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int], rtt: float) -> None:
        self.loop = loop
        self.target = target
        self.up = _Direction(loop, rtt / 2, self.maybe_close)  # client -> server
        self.down = _Direction(loop, rtt / 2, self.maybe_close)  # server -> client
        self.client = _Side(self, self.up, self.down, accepted=True)
        self.server: _Side | None = None
        self.open = 2

    def accepted(self, transport: asyncio.Transport) -> None:
        transport.pause_reading()  # nothing flows before the distant server would have answered the SYN
        self.loop.call_later(self.up.delay * 2, self._dial)

    def _dial(self) -> None:
        task = self.loop.create_task(self._connect())
        _DIALS.add(task)
        task.add_done_callback(_DIALS.discard)

    async def _connect(self) -> None:
        client = self.client.transport
        assert client is not None
        if client.is_closing():
            return
        try:
            transport, server = await self.loop.create_connection(
                lambda: _Side(self, self.down, self.up), *self.target)
        except OSError:
            client.abort()
            return
        self.server = server
        server.peer, self.client.peer = self.client, server
        self.up.start(transport)
        self.down.start(client)
        client.resume_reading()

    def lost(self, side: _Side) -> None:
        self.open -= 1
        if self.open == 0 or (side is self.client and self.server is None):
            self.up.cancel()
            self.down.cancel()

    def maybe_close(self) -> None:
        """Both directions ended: close both sockets (a half-closed side is closed once the other end is)."""
        if self.up.done and self.down.done:
            for side in (self.client, self.server):
                if side is not None and side.transport is not None:
                    side.transport.close()


_DIALS: set[asyncio.Task[None]] = set()  # strong references: a pending dial is never collected


async def _serve(listen: tuple[str, int], target: tuple[str, int], rtt: float) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    return await loop.create_server(lambda: _Conn(loop, target, rtt).client, *listen, backlog=512)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _name_process(name: bytes) -> None:
    """prctl(PR_SET_NAME): `ps` and /proc/PID/stat show `name` instead of `python`."""
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass


async def main_async(rtt: float, pairs: list[tuple[tuple[str, int], tuple[str, int]]]) -> None:
    servers = [await _serve(listen, target, rtt) for listen, target in pairs]
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for s in servers:
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", type=float, required=True, help="round-trip time to add, in milliseconds")
    ap.add_argument("pairs", nargs="+", metavar="LISTEN=TARGET")
    args = ap.parse_args()
    pairs = [(_addr(a), _addr(b)) for a, _, b in (p.partition("=") for p in args.pairs)]
    _name_process(b"wanproxy")
    try:
        asyncio.run(main_async(args.rtt / 1000, pairs))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
