"""DNS checks: each provider's own diagnosis (its `diagnose` capability), no challenge TXT left behind."""

from __future__ import annotations

import datetime as dt
from typing import Any

from certmgr.doctor.model import Check, Status, Timeouts
from certmgr.errors import CertmgrError
from certmgr.inventory import DNSProvider


def check_dns_leftovers(store: Any, *, now: dt.datetime) -> Check:
    """The DNS journal is empty: no challenge TXT record certmgr wrote is waiting to be removed (warning if any)."""
    from certmgr.dns import journal as journal_mod

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="dns", name="leftovers", subject=journal_mod.JOURNAL_PATH, status=status, message=message,
                     hint=hint)

    try:
        entries = journal_mod.read(store) if store is not None else []
    except CertmgrError as exc:
        return result(Status.FAIL, exc.message, exc.hint)
    if not entries:
        return result(Status.OK, "no challenge TXT record left behind")
    return result(Status.WARNING, *journal_mod.summary(entries, now))


async def check_provider_zone(prov: DNSProvider, zone: str, *, timeouts: Timeouts) -> list[Check]:
    """The provider's own diagnosis of `zone` (its optional `diagnose` capability), as doctor's checks.

    A type without the capability still gets the provider-independent one: every listed nameserver
    answers the zone's SOA authoritatively.
    """
    from certmgr.dns import diagnosis, registry
    from certmgr.names import split_server

    diagnose = registry.diagnoser(prov.type)
    if diagnose is not None:
        findings = await diagnose(prov, zone, timeout=timeouts.dns)
    else:
        servers = [s for s in (split_server(ns, 53) for ns in prov.nameservers) if s is not None]
        findings = (await diagnosis.check_nameservers(zone, servers, timeout=timeouts.dns,
                                                      propagation_timeout=prov.propagation_timeout,
                                                      provider=prov.name),)
    status = {diagnosis.OK: Status.OK, diagnosis.WARNING: Status.WARNING, diagnosis.FAIL: Status.FAIL}
    return [Check(group="dns", name=f.name, subject=f"dns.{prov.name} {zone}", status=status[f.status],
                  message=f.message, hint=f.hint, elapsed=f.elapsed) for f in findings]
