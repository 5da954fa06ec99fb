"""Propagation check: ask every authoritative nameserver directly until all serve the expected TXT values.

Bounded polling (first look at once, then every `interval` seconds) under an overall deadline; never a
fixed sleep. On time-out the error names the servers that lag and what they are missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from certmgr.errors import PropagationTimeout
from certmgr.log import event

if TYPE_CHECKING:
    from certmgr.dns import TXTRecord

log = logging.getLogger(__name__)

# (address, port, fqdn) → the TXT strings served, or None when the server did not answer usefully
QueryTXT = Callable[[str, int, str], Awaitable[frozenset[str] | None]]


async def query_txt(address: str, port: int, fqdn: str, *, timeout: float = 2.0) -> frozenset[str] | None:
    """The TXT values `address:port` serves for `fqdn` (empty when none), None when it does not answer."""
    q = dns.message.make_query(dns.name.from_text(fqdn), dns.rdatatype.TXT)
    q.flags &= ~dns.flags.RD  # an authoritative server answers from its own data
    try:
        async with asyncio.timeout(timeout):
            resp, _ = await dns.asyncquery.udp_with_fallback(q, address, timeout=timeout, port=port)
    except (TimeoutError, OSError, dns.exception.DNSException):
        return None
    if resp.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return None
    values: set[str] = set()
    for rrset in resp.answer:
        if rrset.rdtype == dns.rdatatype.TXT:
            for rd in rrset:
                values.add(b"".join(rd.strings).decode("ascii", "replace"))
    return frozenset(values)


def _show(server: tuple[str, int]) -> str:
    addr, port = server
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def expected_values(records: Sequence[TXTRecord]) -> dict[str, frozenset[str]]:
    """Every value each challenge name must serve (one name may carry several: a wildcard and its base)."""
    expected: dict[str, frozenset[str]] = {}
    for r in records:
        expected[r.fqdn] = expected.get(r.fqdn, frozenset()) | {r.value}
    return expected


async def wait_served(zone: str, servers: Sequence[tuple[str, int]], expected: Mapping[str, frozenset[str]], *,
                      timeout: float, interval: float = 1.0, query: QueryTXT | None = None,
                      clock: Callable[[], float] | None = None) -> float:
    """Poll `servers` until each serves every value in `expected` (fqdn → values); returns seconds waited.

    Raises PropagationTimeout naming the lagging servers when `timeout` passes first.
    """
    if not servers:
        raise PropagationTimeout(f"dns propagation {zone}: no authoritative nameservers known (challenge not answered)",
                                 hint="set nameservers = [...] for this zone's [dns.*] provider")
    ask = query or query_txt
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    start = now()
    deadline = start + timeout
    pending = {s: dict(expected) for s in servers}
    missing: dict[tuple[str, int], str] = {}
    while True:
        async def check(server: tuple[str, int]) -> None:
            left = pending[server]
            for fqdn, values in list(left.items()):
                served = await ask(server[0], server[1], fqdn)
                if served is None:
                    missing[server] = "no answer"
                    return
                if values <= served:
                    del left[fqdn]
                else:
                    missing[server] = f"{fqdn} lacks {len(values - served)} of {len(values)} value(s)"
                    return
            missing.pop(server, None)

        async with asyncio.TaskGroup() as tg:
            for server in [s for s, left in pending.items() if left]:
                tg.create_task(check(server))
        lagging = [s for s, left in pending.items() if left]
        if not lagging:
            waited = now() - start
            event(log, logging.DEBUG, "propagated", zone=zone, servers=len(servers), waited=f"{waited:.2f}")
            return waited
        remaining = deadline - now()
        if remaining <= 0:
            names = tuple(_show(s) for s in lagging)
            detail = "; ".join(f"{_show(s)}: {missing.get(s, 'not yet')}" for s in lagging)
            raise PropagationTimeout(
                f"dns propagation {zone}: {len(lagging)} of {len(servers)} nameserver(s) still lag after "
                f"{timeout:g}s — {detail} (challenge not answered)",
                lagging=names,
                hint="check zone transfers (NOTIFY/IXFR) to those servers, or raise propagation_timeout")
        await asyncio.sleep(min(interval, remaining))
