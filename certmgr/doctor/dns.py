"""DNS checks: the TSIG key is accepted by the primary, every nameserver answers, no challenge TXT left behind."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig

from certmgr import sanitize
from certmgr.doctor.model import Check, Status, Timeouts, _human
from certmgr.errors import CertmgrError
from certmgr.inventory import DNSProvider, normalise_tsig_algorithm


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


async def check_zone(prov: DNSProvider, zone: str, *, timeouts: Timeouts) -> Check:
    """A TSIG-signed SOA query for `zone` to its primary: the key is accepted and the zone served with AA."""
    from certmgr.dns.rfc2136 import RFC2136Provider, badkey_cause, badkey_hint, parse_tsig_secret
    from certmgr.errors import DNSError

    subject = f"dns.{prov.name} {zone}"
    t0 = time.monotonic()

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="dns", name="tsig", subject=subject, status=status, message=message, hint=hint,
                     elapsed=time.monotonic() - t0)

    algorithm = normalise_tsig_algorithm(prov.tsig_algorithm)
    if algorithm is None:
        return result(Status.FAIL, f"TSIG algorithm {prov.tsig_algorithm!r} is refused")
    try:
        key = parse_tsig_secret(prov.tsig_secret.read(), key_name=prov.tsig_key, algorithm=algorithm,
                                where=prov.tsig_secret.key_path)
    except CertmgrError as exc:
        return result(Status.FAIL, f"TSIG key {prov.tsig_key}: {exc.message}", exc.hint)
    try:
        server = await RFC2136Provider(prov, key).primary(zone)
    except DNSError as exc:
        return result(Status.FAIL, exc.message, exc.hint)
    where = f"[{server}]:{prov.port}" if ":" in server else f"{server}:{prov.port}"
    q = dns.message.make_query(dns.name.from_text(zone), dns.rdatatype.SOA)
    q.flags &= ~dns.flags.RD
    q.use_tsig(key.dns_key())
    kname = prov.tsig_key
    try:
        async with asyncio.timeout(timeouts.dns):
            resp = await dns.asyncquery.tcp(q, server, port=prov.port, timeout=timeouts.dns)
    except dns.tsig.PeerBadKey:
        # one diagnosis with the provider's: Knot answers BADKEY for a known key its ACL denies, too
        return result(Status.FAIL, f"TSIG key {kname}: {where} answered {badkey_cause(kname)}",
                      badkey_hint(kname, f"the _acme-challenge names in {zone}"))
    except dns.tsig.PeerBadSignature:
        return result(Status.FAIL, f"TSIG key {kname}: {where} rejected the signature (BADSIG): the secret or "
                                   f"algorithm ({algorithm}) differs from the server's",
                      f"compare {prov.tsig_secret.describe()} with the server's key {kname}")
    except dns.tsig.PeerBadTime:
        return result(Status.FAIL, f"TSIG key {kname}: {where} rejected the time (BADTIME): this machine's clock and "
                                   "the server's differ by more than the allowed fudge",
                      "fix NTP on this machine (or on the DNS server)")
    except dns.tsig.PeerError as exc:
        return result(Status.FAIL, f"TSIG key {kname}: {where} rejected it ({type(exc).__name__})")
    except dns.tsig.BadSignature:
        return result(Status.FAIL, f"TSIG key {kname}: the answer from {where} is not signed with this key",
                      "another server answers on that address?")
    except (TimeoutError, dns.exception.Timeout):
        return result(Status.FAIL, f"{where}: no answer within {timeouts.dns:g}s",
                      f"is the DNS server up and reachable on TCP port {prov.port}?")
    except ConnectionRefusedError:
        return result(Status.FAIL, f"{where}: connection refused", "is the DNS server running?")
    except (OSError, dns.exception.DNSException) as exc:
        return result(Status.FAIL, f"{where}: {type(exc).__name__}: {sanitize.line(str(exc))}")
    rcode = resp.rcode()
    if rcode == dns.rcode.REFUSED:
        return result(Status.FAIL, f"{where} answered REFUSED for {zone} SOA (key {kname}): it does not serve the "
                                   "zone to this client",
                      "check the server is the zone's primary and allows queries from this address")
    if rcode == dns.rcode.NOTAUTH:
        return result(Status.FAIL, f"{where} answered NOTAUTH for {zone}: not authoritative, or key {kname} not "
                                   "accepted", "check server and zones in the inventory")
    if rcode == dns.rcode.NXDOMAIN:
        return result(Status.FAIL, f"key {kname} accepted, but zone {zone} does not exist at {where} (NXDOMAIN)",
                      "check zones = [...] and server: the zone must be served by that primary")
    if rcode != dns.rcode.NOERROR:
        return result(Status.FAIL, f"{where} answered {dns.rcode.to_text(rcode)} for {zone} SOA (key {kname})",
                      "check zones = [...]: is this the zone apex?")
    soa = next((rr for rr in resp.answer if rr.rdtype == dns.rdatatype.SOA
                and rr.name == dns.name.from_text(zone)), None)
    if soa is None:
        return result(Status.FAIL, f"key {kname} accepted, but {where} has no SOA for {zone}: it is not a zone apex",
                      "zones = [...] must list zone apexes")
    if not resp.flags & dns.flags.AA:
        return result(Status.FAIL, f"key {kname} accepted, but {where} is not authoritative for {zone} (no AA)",
                      "set server to the zone's primary")
    return result(Status.OK, f"key {kname} ({algorithm}) accepted by {where}; zone {zone} served authoritatively "
                             f"(SOA serial {soa[0].serial})")


async def check_nameservers(prov: DNSProvider, zone: str, *, timeouts: Timeouts) -> Check:
    """Every server the propagation check waits for answers the zone's SOA authoritatively (unsigned, no RD)."""
    from certmgr.dns.rfc2136 import RFC2136Provider, TSIGKey
    from certmgr.errors import DNSError
    from certmgr.log import Secret

    subject = f"dns.{prov.name} {zone}"
    t0 = time.monotonic()

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="dns", name="nameservers", subject=subject, status=status, message=message, hint=hint,
                     elapsed=time.monotonic() - t0)

    # Finding the nameservers needs no key: a placeholder never signs anything here.
    finder = RFC2136Provider(prov, TSIGKey(name=prov.tsig_key, algorithm="hmac-sha256", secret=Secret("")))
    try:
        servers = await finder.nameservers(zone)
    except DNSError as exc:
        return result(Status.FAIL, f"cannot list the nameservers of {zone}: {exc.message}",
                      f"set nameservers = [...] in [dns.{prov.name}]")

    async def soa(addr: str, port: int) -> tuple[str, int | None, str | None]:
        show = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        q = dns.message.make_query(dns.name.from_text(zone), dns.rdatatype.SOA)
        q.flags &= ~dns.flags.RD
        try:
            async with asyncio.timeout(timeouts.dns):
                resp, _ = await dns.asyncquery.udp_with_fallback(q, addr, port=port, timeout=timeouts.dns)
        except (TimeoutError, dns.exception.Timeout):
            return show, None, "no answer"
        except (OSError, dns.exception.DNSException) as exc:
            return show, None, type(exc).__name__
        rr = next((r for r in resp.answer if r.rdtype == dns.rdatatype.SOA), None)
        if resp.rcode() != dns.rcode.NOERROR or rr is None:
            return show, None, dns.rcode.to_text(resp.rcode()) if resp.rcode() != dns.rcode.NOERROR else "no SOA"
        if not resp.flags & dns.flags.AA:
            return show, None, "not authoritative"
        return show, int(rr[0].serial), None

    answers = await asyncio.gather(*(soa(a, p) for a, p in servers))
    bad = [f"{show}: {err}" for show, _, err in answers if err is not None]
    names = ", ".join(show for show, _, _ in answers)
    if bad:
        return result(Status.FAIL, f"propagation waits for {names}, but {'; '.join(bad)}: every challenge would "
                                   f"time out after {_human(prov.propagation_timeout)}",
                      f"fix those servers, or list the ones that serve {zone} in nameservers = [...]")
    serials = {serial for _, serial, _ in answers}
    if len(serials) > 1:
        shown = ", ".join(f"{show} {serial}" for show, serial, _ in answers)
        return result(Status.WARNING, f"nameservers disagree on the SOA serial ({shown}): a secondary lags, so "
                                      "challenges wait for it",
                      "check zone transfers (NOTIFY, allow-transfer) if this persists")
    return result(Status.OK, f"{len(answers)} nameserver(s) answer authoritatively ({names}), serial "
                             f"{next(iter(serials))}")
