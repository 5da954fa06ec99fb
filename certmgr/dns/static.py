"""What providers that change DNS through something other than DNS share: the inventory's nameservers.

An HTTP API or a program cannot say which servers serve the zone, so those types require `nameservers`;
the CNAME lookup and the propagation check ask those servers directly (never a resolver).
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from certmgr import sanitize
from certmgr.dns import TXTRecord, by_zone, run_all
from certmgr.dns.diagnosis import show
from certmgr.dns.propagation import expected_values, wait_served
from certmgr.errors import DNSError
from certmgr.model import DNSProvider
from certmgr.names import split_server

QUERY_TIMEOUT = 3.0


def servers(cfg: DNSProvider) -> tuple[tuple[str, int], ...]:
    """The inventory's nameservers with their ports (53 unless written)."""
    return tuple(s for s in (split_server(ns, 53) for ns in cfg.nameservers) if s is not None)


class StaticNameservers:
    """`cname_target` and `wait_propagated` against the listed nameservers (mixed into a provider)."""

    cfg: DNSProvider

    async def cname_target(self, fqdn: str, zone: str) -> str | None:
        """The CNAME target of `fqdn` as the first listed nameserver that answers serves it, else None."""
        problems = []
        for addr, port in servers(self.cfg):
            q = dns.message.make_query(dns.name.from_text(fqdn), dns.rdatatype.CNAME)
            q.flags &= ~dns.flags.RD
            try:
                resp, _ = await dns.asyncquery.udp_with_fallback(q, addr, port=port, timeout=QUERY_TIMEOUT)
            except (OSError, dns.exception.DNSException) as exc:
                problems.append(f"@{show(addr, port)}: {type(exc).__name__} {sanitize.line(str(exc))}".rstrip())
                continue
            for rr in resp.answer:
                if rr.rdtype == dns.rdatatype.CNAME and rr.name == dns.name.from_text(fqdn):
                    return str(rr[0].target).rstrip(".").lower()
            return None
        raise DNSError(f"dns locate {fqdn}: no nameserver answered ({'; '.join(problems)}) (challenge not attempted)",
                       hint=f"check nameservers = [...] in [dns.{self.cfg.name}]")

    async def wait_propagated(self, records: Sequence[TXTRecord], *, timeout: float | None = None) -> None:
        limit = self.cfg.propagation_timeout if timeout is None else timeout
        waits = []
        for zone, recs in by_zone(records).items():
            waits.append(wait_served(zone, servers(self.cfg), expected_values(recs), timeout=limit))
        await run_all(waits)
