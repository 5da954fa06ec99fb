"""Verify by TLS handshake what a POP serves for each name: one handshake per name once it serves the serial."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from certmgr.deploy.plan import serial_of_probe
from certmgr.inventory import Host
from certmgr.probe import Probe, probe
from certmgr.remote import Timeouts

# Handshakes in flight at once to one POP (one semaphore per host transaction): a POP serving
# hundreds of names must not see a verify as a flood.
PER_HOST = 16

Prober = Callable[[str, int, str], Any]  # async (address, port, sni) -> Probe


def probe_with(timeouts: Timeouts) -> Prober:
    async def p(address: str, port: int, sni: str) -> Probe:
        return await probe(address, port, sni, connect_timeout=timeouts.handshake,
                           handshake_timeout=timeouts.handshake)

    return p


async def served(prober: Prober, host: Host, names: Sequence[str],
                 limit: asyncio.Semaphore | None = None) -> dict[str, Probe]:
    """One handshake per name, at most `limit` (default PER_HOST) in flight at once."""
    sem = limit or asyncio.Semaphore(PER_HOST)

    async def one(n: str) -> Probe:
        async with sem:
            p: Probe = await prober(host.address, host.https_port, n)
            return p

    probes = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, probes, strict=True))


async def wait_served(prober: Prober, host: Host, names: Sequence[str], serial: str,
                      *, limit: float, sem: asyncio.Semaphore | None = None) -> tuple[bool, dict[str, Probe]]:
    """Handshake each name until it serves `serial` (once is enough), or `limit` s pass.

    A name that showed the new serial is not asked again: only the new generation of workers can
    serve it, and nginx's master tells the old generation to stop accepting right after it starts
    the new one (so what one handshake sees is what every later one sees, a few ms of old workers'
    queue aside). Names still stale are polled with a growing pause (the master takes a few ms,
    more with hundreds of certificates, to load its new configuration after `reload` returns).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    delay = 0.01
    seen: dict[str, Probe] = {}
    todo = list(dict.fromkeys(names))
    while True:
        began = loop.time()
        seen.update(await served(prober, host, todo, sem))
        todo = [n for n in todo if serial_of_probe(seen[n]) != serial]
        if not todo:
            return True, {n: seen[n] for n in names}
        pause = max(0.0, began + delay - loop.time())
        delay = min(delay * 2, 0.5)
        if loop.time() + pause > deadline:
            return False, {n: seen[n] for n in names}
        await asyncio.sleep(pause)  # bounded polling: a reload takes effect within a few hundred ms
