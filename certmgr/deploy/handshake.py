"""Verify by TLS handshake what a POP serves for each name: one good handshake per name, then a few for the POP."""

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
CONFIRM_ROUNDS = 3  # rounds in a row that must all be good: the first of every name, then confirmation
CONFIRM_INTERVAL = 0.1
CONFIRM_SAMPLE = 4  # handshakes per confirmation round, for the whole POP

Prober = Callable[[str, int, str], Any]  # async (address, port, sni) -> Probe


def probe_with(timeouts: Timeouts) -> Prober:
    """deploy's prober: the chain read from the POP's TLS 1.2 first flight (`certmgr.peek`), no cryptography.

    That is as truthful as a full handshake for what verify asks: nginx picks the certificate by SNI
    before its ServerHello, whatever the version, so the Certificate message names the certificate the
    worker that accepted serves for that name. A POP that does not answer a TLS 1.2 ClientHello plainly
    (TLS 1.3 only, an alert) costs one more connection per handshake: `probe` falls back to the full
    handshake by itself, with the same errors.
    """
    async def p(address: str, port: int, sni: str) -> Probe:
        return await probe(address, port, sni, connect_timeout=timeouts.handshake,
                           handshake_timeout=timeouts.handshake, peek=True)

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
    """wait_all for one certificate's names."""
    [res] = await wait_all(prober, host, [(names, serial)], limit=limit, sem=sem)
    return res


async def wait_all(prober: Prober, host: Host, wants: Sequence[tuple[Sequence[str], str]], *, limit: float,
                   sem: asyncio.Semaphore | None = None) -> list[tuple[bool, dict[str, Probe]]]:
    """Every (names, serial) of one POP: each name until it serves its serial, then confirmed for the POP.

    One good handshake per name is not proof: between `nginx -s reload` returning and the old
    workers closing their listeners, both generations accept, so a lucky handshake can precede
    stale ones. But a stale answer comes from an old worker, whatever the name: so once every name
    has served its serial once, CONFIRM_ROUNDS - 1 rounds of at most CONFIRM_SAMPLE handshakes for
    the whole POP (names taken in turn across the certificates), CONFIRM_INTERVAL apart, must all be
    good — not three rounds of every name. A stale answer sends that certificate's names back to
    polling and the confirmation starts again. After a round of several names that found only the old
    generation, each polling round asks one name (in turn) until the new one answers, then every name
    still to see at once. Each want's answer: (ok, the last probe per name).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    sem = sem or asyncio.Semaphore(PER_HOST)
    seen: list[dict[str, Probe]] = [{} for _ in wants]
    todo = [list(dict.fromkeys(names)) for names, _ in wants]
    confirmed: set[int] = set()
    delay = 0.01  # the master takes a few ms (more with hundreds of certificates) to start new workers
    turn = 0

    def result() -> list[tuple[bool, dict[str, Probe]]]:
        return [(i in confirmed, {n: seen[i][n] for n in names if n in seen[i]})
                for i, (names, _) in enumerate(wants)]

    async def round_at(when: float, pick: list[tuple[int, str]]) -> dict[str, Probe]:
        await asyncio.sleep(max(0.0, when - loop.time()))
        return await served(prober, host, [n for _, n in pick], sem)

    scouting = False  # a round of several names found only the old generation: one name per round, in turn
    scout = 0
    while True:
        began = loop.time()
        asked = [(i, n) for i, ns in enumerate(todo) for n in ns]
        if scouting and len(asked) > 1:
            # While the old generation answers every name, one handshake per round tells as much as one
            # per name. Not from the first round: a far POP has long reloaded when it is asked.
            asked = [asked[scout % len(asked)]]
            scout += 1
        got = await served(prober, host, list(dict.fromkeys(n for _, n in asked)), sem) if asked else {}
        for i, n in asked:
            seen[i][n] = got[n]
        fresh = any(serial_of_probe(got[n]) == wants[i][1] for i, n in asked)
        todo = [[n for n in ns if serial_of_probe(seen[i][n]) != wants[i][1]] for i, ns in enumerate(todo)]
        if scouting and fresh:
            scouting = False
            if any(todo):
                continue  # the new generation answers: at once, every name still to see
        elif not fresh and len(asked) > 1:
            scouting = True
        ready = [i for i in range(len(wants)) if not todo[i] and i not in confirmed]
        if ready:
            # confirmation for the certificates whose every name served once: rounds CONFIRM_INTERVAL
            # apart (not waiting for each other), a few handshakes each, names taken in turn
            first = max(began + CONFIRM_INTERVAL, loop.time())
            if first + (CONFIRM_ROUNDS - 2) * CONFIRM_INTERVAL > deadline:
                return result()
            pool = [(i, n) for i in ready for n in dict.fromkeys(wants[i][0])]
            picks = []
            for _ in range(CONFIRM_ROUNDS - 1):
                k = min(CONFIRM_SAMPLE, len(pool))
                picks.append([pool[(turn + j) % len(pool)] for j in range(k)])
                turn += k
            rounds = await asyncio.gather(*(round_at(first + r * CONFIRM_INTERVAL, pick)
                                            for r, pick in enumerate(picks)))
            stale: set[int] = set()
            for pick, answers in zip(picks, rounds, strict=True):
                for i, n in pick:
                    seen[i][n] = answers[n]
                    if serial_of_probe(answers[n]) != wants[i][1]:
                        stale.add(i)
            for i in ready:
                if i in stale:
                    todo[i] = list(dict.fromkeys(wants[i][0]))  # an old worker still answers: poll again
                else:
                    confirmed.add(i)
        if len(confirmed) == len(wants):
            return result()
        pause = max(0.0, began + delay - loop.time())
        delay = min(delay * 2, 0.5)
        if loop.time() + pause > deadline:
            return result()
        await asyncio.sleep(pause)  # bounded polling: old workers drain within a few hundred ms
