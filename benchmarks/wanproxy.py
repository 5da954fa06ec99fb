"""A loopback TCP proxy that adds network distance: every byte waits RTT/2 in each direction.

    .venv/bin/python benchmarks/wanproxy.py --rtt 50 LISTEN=TARGET [LISTEN=TARGET ...]

LISTEN and TARGET are `address:port`. A new connection first waits one RTT (the TCP handshake a
distant server costs), then data flows both ways, each chunk delivered RTT/2 after it was read,
in order; bandwidth is not limited. Prints "ready" once every listener is up; runs until killed.
Used by `benchmarks/deploy.py --rtt` to put the lab's POPs "far away" (real POPs are remote:
what is latency there is CPU time here, where the POPs share the machine with certmgr).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    """Copy src to dst, each chunk written `delay` seconds after it was read; EOF travels the same way."""
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
    ready = asyncio.Event()

    async def reader() -> None:
        try:
            while data := await src.read(65536):
                queue.append((loop.time() + delay, data))
                ready.set()
        except OSError:
            pass
        queue.append((loop.time() + delay, None))
        ready.set()

    async def writer() -> None:
        while True:
            await ready.wait()
            ready.clear()
            while queue:
                due, data = queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                queue.popleft()
                if data is None:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

    task = asyncio.ensure_future(reader())
    try:
        await writer()
    except OSError:
        pass
    finally:
        task.cancel()


_HANDLERS: set[asyncio.Task[None]] = set()  # strong references: a pending handler is never collected


async def _serve(listen: tuple[str, int], target: tuple[str, int], rtt: float) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            _HANDLERS.add(me)
            me.add_done_callback(_HANDLERS.discard)
        await asyncio.sleep(rtt)  # the SYN, SYN-ACK a distant server costs before anything flows
        try:
            ur, uw = await asyncio.open_connection(*target)
        except OSError:
            w.transport.abort()
            return
        try:  # each direction ends at its EOF (or an error, passed on as EOF); a half-close stays open
            await asyncio.gather(_pipe(r, uw, rtt / 2), _pipe(ur, w, rtt / 2))
        finally:
            for x in (w, uw):
                x.close()

    return await asyncio.start_server(handle, *listen, backlog=512)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


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
    try:
        asyncio.run(main_async(args.rtt / 1000, pairs))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
