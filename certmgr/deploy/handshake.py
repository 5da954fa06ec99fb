"""Verify by TLS handshake what a POP serves for each name, until a serial is served steadily."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from certmgr.deploy.plan import serial_of_probe
from certmgr.inventory import Host
from certmgr.probe import Probe, probe
from certmgr.remote import Timeouts

CONFIRM_ROUNDS = 3  # handshake rounds in a row that must all show the new serial
CONFIRM_INTERVAL = 0.1

Prober = Callable[[str, int, str], Any]  # async (address, port, sni) -> Probe


def probe_with(timeouts: Timeouts) -> Prober:
    async def p(address: str, port: int, sni: str) -> Probe:
        return await probe(address, port, sni, connect_timeout=timeouts.handshake,
                           handshake_timeout=timeouts.handshake)

    return p


async def served(prober: Prober, host: Host, names: Sequence[str]) -> dict[str, Probe]:
    probes = await asyncio.gather(*(prober(host.address, host.https_port, n) for n in names))
    return dict(zip(names, probes, strict=True))


async def wait_served(prober: Prober, host: Host, names: Sequence[str], serial: str,
                      *, limit: float) -> tuple[bool, dict[str, Probe]]:
    """Poll handshakes until every name serves `serial` in CONFIRM_ROUNDS rounds in a row, or `limit` s pass.

    One good round is not proof: between `nginx -s reload` returning and the old workers closing
    their listeners, both generations accept, so a lucky handshake can precede stale ones. After
    a good round the confirming rounds start CONFIRM_INTERVAL apart (the first no sooner than
    the good round ended) without waiting for each other: a far POP's handshake takes two round
    trips, which then add no sleep, and the samples stay spread in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    delay = 0.01  # the master takes a few ms to start new workers after `reload` returns

    def new(seen: Mapping[str, Probe]) -> bool:
        return all(serial_of_probe(p) == serial for p in seen.values())

    async def round_at(when: float) -> dict[str, Probe]:
        await asyncio.sleep(max(0.0, when - loop.time()))
        return await served(prober, host, names)

    while True:
        began = loop.time()
        seen = await served(prober, host, names)
        if new(seen):
            first = max(began + CONFIRM_INTERVAL, loop.time())
            if first + (CONFIRM_ROUNDS - 2) * CONFIRM_INTERVAL > deadline:
                return False, seen
            rounds = await asyncio.gather(*(round_at(first + k * CONFIRM_INTERVAL)
                                            for k in range(CONFIRM_ROUNDS - 1)))
            stale = [r for r in rounds if not new(r)]
            if not stale:
                return True, rounds[-1] if rounds else seen
            seen = stale[0]
        pause = max(0.0, began + delay - loop.time())
        delay = min(delay * 2, 0.5)
        if loop.time() + pause > deadline:
            return False, seen
        await asyncio.sleep(pause)  # bounded polling: old workers drain within a few hundred ms
