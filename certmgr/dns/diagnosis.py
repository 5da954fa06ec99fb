"""What a provider's optional `diagnose()` capability reports, and the provider-independent nameserver check.

Findings are typed here, in `dns/`, so `doctor` turns them into its checks without importing any
provider's internals (and `dns` never imports `doctor`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

OK, WARNING, FAIL = "ok", "warning", "fail"


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One diagnosis of one zone: `name` is the check's name ("tsig", "api", "program", "nameservers")."""

    name: str
    status: str  # OK | WARNING | FAIL
    message: str
    hint: str | None = None
    elapsed: float = 0.0


class Timer:
    """Builds findings that carry the time since the timer was made."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._t0 = time.monotonic()

    def __call__(self, status: str, message: str, hint: str | None = None) -> Finding:
        return Finding(name=self.name, status=status, message=message, hint=hint,
                       elapsed=time.monotonic() - self._t0)


def human(seconds: float) -> str:
    """`86400` → `24h`, `129600` → `1.5d`, `5400` → `1.5h`, `90` → `90s`."""
    if seconds >= 2 * 86400:
        v, u = seconds / 86400, "d"
    elif seconds >= 3600:
        v, u = seconds / 3600, "h"
    elif seconds >= 60:
        v, u = seconds / 60, "m"
    else:
        v, u = seconds, "s"
    return f"{v:.1f}".rstrip("0").rstrip(".") + u


def show(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


async def check_nameservers(zone: str, servers: Sequence[tuple[str, int]], *, timeout: float,
                            propagation_timeout: float, provider: str, started: Timer | None = None) -> Finding:
    """Every server the propagation check waits for answers the zone's SOA authoritatively (unsigned, no RD)."""
    result = started or Timer("nameservers")

    async def soa(addr: str, port: int) -> tuple[str, int | None, str | None]:
        where = show(addr, port)
        q = dns.message.make_query(dns.name.from_text(zone), dns.rdatatype.SOA)
        q.flags &= ~dns.flags.RD
        try:
            async with asyncio.timeout(timeout):
                resp, _ = await dns.asyncquery.udp_with_fallback(q, addr, port=port, timeout=timeout)
        except (TimeoutError, dns.exception.Timeout):
            return where, None, "no answer"
        except (OSError, dns.exception.DNSException) as exc:
            return where, None, type(exc).__name__
        rr = next((r for r in resp.answer if r.rdtype == dns.rdatatype.SOA), None)
        if resp.rcode() != dns.rcode.NOERROR or rr is None:
            return where, None, dns.rcode.to_text(resp.rcode()) if resp.rcode() != dns.rcode.NOERROR else "no SOA"
        if not resp.flags & dns.flags.AA:
            return where, None, "not authoritative"
        return where, int(rr[0].serial), None

    if not servers:
        return result(FAIL, f"no authoritative nameservers known for {zone}: every challenge would fail",
                      f"set nameservers = [...] in [dns.{provider}]")
    answers = await asyncio.gather(*(soa(a, p) for a, p in servers))
    bad = [f"{where}: {err}" for where, _, err in answers if err is not None]
    names = ", ".join(where for where, _, _ in answers)
    if bad:
        return result(FAIL, f"propagation waits for {names}, but {'; '.join(bad)}: every challenge would "
                            f"time out after {human(propagation_timeout)}",
                      f"fix those servers, or list the ones that serve {zone} in nameservers = [...]")
    serials = {serial for _, serial, _ in answers}
    if len(serials) > 1:
        shown = ", ".join(f"{where} {serial}" for where, serial, _ in answers)
        return result(WARNING, f"nameservers disagree on the SOA serial ({shown}): a secondary lags, so "
                               "challenges wait for it",
                      "check zone transfers (NOTIFY, allow-transfer) if this persists")
    return result(OK, f"{len(answers)} nameserver(s) answer authoritatively ({names}), serial "
                      f"{next(iter(serials))}")
