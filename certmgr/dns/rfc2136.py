"""RFC 2136 dynamic updates signed with TSIG (RFC 8945), via dnspython's asyncio API.

One UPDATE per zone per batch; cleanup deletes only our own TXT value, never the RRset (apex and `*.apex`
share one `_acme-challenge` name). Updates go to the inventory's `server` or the primary in the zone's SOA.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.update

from certmgr import sanitize
from certmgr.dns import DNSChange, TXTRecord, ZoneUpdate, by_zone, log_failed_cleanups, run_all, typed_config
from certmgr.dns.diagnosis import FAIL, OK, Finding, Timer, check_nameservers
from certmgr.dns.propagation import expected_values, wait_served
from certmgr.errors import CertmgrError, DNSAuthError, DNSClockSkewError, DNSError, SecretError
from certmgr.log import Secret, event
from certmgr.model import DNSProvider, SecretRef
from certmgr.names import dns_name_problem, is_ip, split_server
from certmgr.reader import Reader

log = logging.getLogger(__name__)

CHALLENGE_TTL = 60
UPDATE_TIMEOUT = 10.0
QUERY_TIMEOUT = 3.0

TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
KEYS = frozenset({"server", "port", "tsig_key", "tsig_algorithm"})
SECRET_KEYS = frozenset({"tsig_secret"})
FIRST_CHECK = "tsig"  # the name of diagnose()'s first finding


def normalise_tsig_algorithm(name: str) -> str | None:
    """`HMAC-SHA256`, `hmac-sha256.`, `hmac-sha256.sig-alg.reg.int` → `hmac-sha256`; MD5 → None."""
    n = name.strip().lower().rstrip(".").removesuffix(".sig-alg.reg.int")
    return n if n in TSIG_ALGORITHMS else None


@dataclass(frozen=True, slots=True, kw_only=True)
class RFC2136Config:
    """`[dns.NAME]` with `type = "rfc2136"`: where UPDATEs go and the TSIG key that signs them."""

    tsig_key: str
    tsig_secret: SecretRef
    tsig_algorithm: str = "hmac-sha256"
    server: str | None = None  # None: the SOA MNAME's address
    port: int = 53

    def secrets(self) -> tuple[SecretRef, ...]:
        return (self.tsig_secret,) if self.tsig_secret.where else ()

    def shown(self) -> dict[str, object]:
        return {"server": self.server, "port": self.port, "tsig_key": self.tsig_key,
                "tsig_algorithm": self.tsig_algorithm, "tsig_secret": self.tsig_secret.shown()}

    def toml(self) -> tuple[tuple[str, object], ...]:
        return (("server", self.server), ("port", self.port), ("tsig_key", self.tsig_key),
                ("tsig_algorithm", self.tsig_algorithm),
                (f"tsig_secret_{self.tsig_secret.kind}", self.tsig_secret.where))


def parse_config(r: Reader, t: dict[str, Any], kp: str) -> RFC2136Config:
    """The rfc2136 keys of `[dns.NAME]` (table already checked for unknown keys); problems go to `r`."""
    server = r.get(t, "server", kp, str)
    if server is not None and not is_ip(server):
        r.err(f"{kp}.server", f"{server!r} must be an IP address (certmgr never resolves the primary "
              "through the system resolver)")
    algo_raw = r.get(t, "tsig_algorithm", kp, str, default="hmac-sha256")
    algo = normalise_tsig_algorithm(algo_raw)
    if algo is None:
        if "md5" in algo_raw.lower():
            r.err(f"{kp}.tsig_algorithm", f"{algo_raw!r}: HMAC-MD5 is refused; use hmac-sha256")
        else:
            r.err(f"{kp}.tsig_algorithm", f"{algo_raw!r} is not one of {', '.join(TSIG_ALGORITHMS)}")
    elif algo == "hmac-sha1":
        r.warn(f"{kp}.tsig_algorithm", "hmac-sha1 is deprecated (RFC 8945 §6); generate a hmac-sha256 key")
    tsig_key = r.get(t, "tsig_key", kp, str, required=True)
    if tsig_key is not None and dns_name_problem(tsig_key.rstrip(".") + ".x", wildcard_ok=False):
        r.err(f"{kp}.tsig_key", f"{tsig_key!r} is not a valid key name")
    secret = r.secret(t, "tsig_secret", kp, required=True)
    return RFC2136Config(tsig_key=tsig_key or "", tsig_secret=secret or SecretRef("env", "", f"{kp}.tsig_secret"),
                         tsig_algorithm=algo or "hmac-sha256", server=server, port=r.port(t, "port", kp, 53))


def config_of(cfg: DNSProvider) -> RFC2136Config:
    return typed_config(cfg, RFC2136Config, "rfc2136")


def build(cfg: DNSProvider) -> RFC2136Provider:
    return RFC2136Provider.build(cfg)


_ALGORITHMS = {
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}

_BIND_KEY = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{(?P<body>[^}]*)\}\s*;?', re.IGNORECASE | re.DOTALL)
_BIND_ALG = re.compile(r"algorithm\s+\"?(?P<alg>[A-Za-z0-9.-]+)\"?\s*;", re.IGNORECASE)
_BIND_SECRET = re.compile(r'secret\s+"(?P<secret>[A-Za-z0-9+/=\s]+)"\s*;', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TSIGKey:
    """A TSIG key: name, normalised algorithm, and the secret (never shown)."""

    name: str
    algorithm: str
    secret: Secret = field(repr=False)

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(dns.name.from_text(self.name), base64.b64decode(self.secret.reveal()),
                            _ALGORITHMS[self.algorithm])


def parse_tsig_secret(text: str, *, key_name: str, algorithm: str, where: str) -> TSIGKey:
    """A BIND key file (`key "n" { algorithm …; secret "…"; };`) or a bare base64 secret → TSIGKey.

    The file's key name and algorithm, when present, must agree with the inventory: a mismatch would
    only show up later as BADKEY/BADSIG from the server, far from its cause.
    """
    m = _BIND_KEY.search(text)
    if m:
        file_name = m.group("name").rstrip(".")
        if file_name.lower() != key_name.rstrip(".").lower():
            raise SecretError(f"{where}: the key file defines key {file_name!r} but tsig_key is {key_name!r}")
        alg_m = _BIND_ALG.search(m.group("body"))
        if alg_m:
            file_alg = normalise_tsig_algorithm(alg_m.group("alg"))
            if file_alg is None:
                raise SecretError(f"{where}: the key file's algorithm {alg_m.group('alg')!r} is refused "
                                  "(HMAC-MD5 and unknown algorithms are never used)")
            if file_alg != algorithm:
                raise SecretError(f"{where}: the key file says {file_alg} but tsig_algorithm is {algorithm}",
                                  hint=f'set tsig_algorithm = "{file_alg}" in the inventory')
        sec_m = _BIND_SECRET.search(m.group("body"))
        if not sec_m:
            raise SecretError(f"{where}: the key file has no secret \"…\"; line")
        raw = "".join(sec_m.group("secret").split())
    else:
        raw = "".join(text.split())
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{where}: the TSIG secret is not base64 (nor a BIND key file)") from None
    if len(decoded) < 16:
        raise SecretError(f"{where}: the TSIG secret is only {len(decoded)} bytes (at least 16 expected)")
    return TSIGKey(name=key_name.rstrip("."), algorithm=algorithm, secret=Secret(raw))


def _server(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class RFC2136Provider:
    """DNS-01 through RFC 2136 UPDATEs; validated when built; safe for concurrent use by many orders."""

    def __init__(self, cfg: DNSProvider, key: TSIGKey, *, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.conf = config_of(cfg)
        self._key = key
        self._resolver = resolver
        self._primary: dict[str, str] = {}
        self._nameservers: dict[str, tuple[tuple[str, int], ...]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.on_change: DNSChange | None = None

    def __repr__(self) -> str:
        return f"RFC2136Provider({self.name!r}, zones={self.cfg.zones!r}, key={self._key.name!r})"

    @classmethod
    def build(cls, cfg: DNSProvider) -> RFC2136Provider:
        return cls(cfg, read_key(config_of(cfg)))

    # -- where to send things

    async def _system_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = dns.asyncresolver.Resolver()
        return self._resolver

    async def primary(self, zone: str) -> str:
        """Address of the server that takes updates for `zone`: the inventory's `server`, else the SOA MNAME."""
        if self.conf.server:
            return self.conf.server
        async with self._locks[f"primary:{zone}"]:
            if zone not in self._primary:
                self._primary[zone] = await self._soa_primary(zone)
        return self._primary[zone]

    async def _soa_primary(self, zone: str) -> str:
        """The SOA MNAME's address: asked of the listed `nameservers` (no recursion), else the system resolver.

        With `nameservers` set nothing goes to the machine's resolver unless the MNAME has no
        address in the zone itself (no glue): then, as for NS hosts, the resolver is asked.
        """
        hint = f'set server = "ADDRESS" in [dns.{self.name}]'
        if self.cfg.nameservers:
            problems: list[str] = []
            for ns, port in self.listed_nameservers():
                try:
                    resp = await self._query(ns, zone, dns.rdatatype.SOA, port=port)
                except DNSError as exc:
                    problems.append(str(exc))
                    continue
                soa = [rd for rr in resp.answer if rr.rdtype == dns.rdatatype.SOA for rd in rr]
                if not soa:
                    problems.append(f"{_server(ns, port)} has no SOA for {zone} "
                                    f"({dns.rcode.to_text(resp.rcode())})")
                    continue
                mname = str(soa[0].mname).rstrip(".")
                addrs = await self._addresses(ns, mname, port=port)
                if addrs:
                    return min(addrs, key=lambda a: (":" in a, a))  # IPv4 first: what `server` usually is
                problems.append(f"the SOA primary {mname} has no address")
            raise DNSError(f"dns primary {zone}: cannot find the SOA primary: {'; '.join(problems)} "
                           "(TXT not written)", hint=hint)
        res = await self._system_resolver()
        try:
            async with asyncio.timeout(QUERY_TIMEOUT * 2):
                soa_answer = await res.resolve(zone, "SOA")
                mname = str(soa_answer[0].mname).rstrip(".")
                answer = await res.resolve(mname, "A")
        except (TimeoutError, dns.exception.DNSException) as exc:
            raise DNSError(f"dns primary {zone}: cannot find the SOA primary: {sanitize.line(str(exc))} "
                           "(TXT not written)", hint=hint) from exc
        return str(answer[0])

    async def nameservers(self, zone: str) -> tuple[tuple[str, int], ...]:
        """Every authoritative server of `zone` (inventory `nameservers`, else its NS records), with the port."""
        port = self.conf.port
        if self.cfg.nameservers:
            return self.listed_nameservers()
        async with self._locks[f"ns:{zone}"]:
            if zone not in self._nameservers:
                primary = await self.primary(zone)
                resp = await self._query(primary, zone, dns.rdatatype.NS)
                hosts = sorted({str(rd.target).rstrip(".") for rr in resp.answer if rr.rdtype == dns.rdatatype.NS
                                for rd in rr})
                addrs: set[str] = set()
                for host in hosts:
                    addrs.update(await self._addresses(primary, host))
                if not addrs:
                    addrs.add(primary)
                self._nameservers[zone] = tuple((a, port) for a in sorted(addrs))
        return self._nameservers[zone]

    def listed_nameservers(self) -> tuple[tuple[str, int], ...]:
        """The inventory's `nameservers`, each with its port (this provider's `port` when not written)."""
        out = []
        for ns in self.cfg.nameservers:
            split = split_server(ns, self.conf.port)
            if split is not None:  # the inventory refused anything else
                out.append(split)
        return tuple(out)

    async def _addresses(self, primary: str, host: str, *, port: int | None = None) -> set[str]:
        """A/AAAA of a nameserver host: first from our authoritative primary (in-zone glue), else resolved."""
        out: set[str] = set()
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                resp = await self._query(primary, host, rdtype, port=port)
            except DNSError:
                continue
            out.update(str(rd) for rr in resp.answer if rr.rdtype == rdtype for rd in rr)
        if out:
            return out
        res = await self._system_resolver()
        try:
            async with asyncio.timeout(QUERY_TIMEOUT * 2):
                answer = await res.resolve(host, "A")
            return {str(rd) for rd in answer}
        except (TimeoutError, dns.exception.DNSException):
            event(log, logging.WARNING, "nameserver address not found", provider=self.name, host=host)
            return set()

    async def _query(self, server: str, qname: str, rdtype: dns.rdatatype.RdataType, *,
                     port: int | None = None) -> dns.message.Message:
        q = dns.message.make_query(dns.name.from_text(qname), rdtype)
        q.flags &= ~dns.flags.RD
        port = self.conf.port if port is None else port
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                resp, _ = await dns.asyncquery.udp_with_fallback(q, server, timeout=QUERY_TIMEOUT, port=port)
        except (TimeoutError, OSError, dns.exception.DNSException) as exc:
            raise DNSError(f"dns query {qname} {dns.rdatatype.to_text(rdtype)} @{_server(server, port)}: "
                           f"{type(exc).__name__} {sanitize.line(str(exc))}".rstrip()) from exc
        return resp

    async def cname_target(self, fqdn: str, zone: str) -> str | None:
        """The CNAME target of `fqdn` as its zone's primary serves it, or None when it is no CNAME."""
        primary = await self.primary(zone)
        try:
            resp = await self._query(primary, fqdn, dns.rdatatype.CNAME)
        except DNSError as exc:
            raise DNSError(f"dns locate {fqdn}: {exc} (challenge not attempted)") from exc
        for rr in resp.answer:
            if rr.rdtype == dns.rdatatype.CNAME and rr.name == dns.name.from_text(fqdn):
                return str(rr[0].target).rstrip(".").lower()
        return None

    # -- the Provider contract

    async def present(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        """Add every record's value, one UPDATE per zone (the zones concurrently, each to its end)."""
        return tuple(await asyncio.gather(*(self._update(zone, recs, add=True)
                                            for zone, recs in by_zone(records).items())))

    async def cleanup(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        """Delete exactly our values (never the RRset), zones concurrently; failures are logged, never raised."""
        done = tuple(await asyncio.gather(*(self._update(zone, recs, add=False)
                                            for zone, recs in by_zone(records).items())))
        log_failed_cleanups(log, self.name, done)
        return done

    async def wait_propagated(self, records: Sequence[TXTRecord], *, timeout: float | None = None) -> None:
        limit = self.cfg.propagation_timeout if timeout is None else timeout
        waits = []
        for zone, recs in by_zone(records).items():
            waits.append(wait_served(zone, await self.nameservers(zone), expected_values(recs), timeout=limit))
        await run_all(waits)

    async def _update(self, zone: str, recs: Sequence[TXTRecord], *, add: bool) -> ZoneUpdate:
        """One UPDATE for `recs` (all in `zone`); what the server did, its refusal or silence as the error."""
        records = tuple(recs)

        def failed(applied: bool | None, error: DNSError, cause: BaseException | None = None) -> ZoneUpdate:
            error.__cause__ = cause
            return ZoneUpdate(zone=zone, records=records, applied=applied, error=error)

        try:
            primary = await self.primary(zone)
        except DNSError as exc:  # nothing was sent
            return failed(False, exc)
        where = _server(primary, self.conf.port)
        upd = dns.update.UpdateMessage(dns.name.from_text(zone))
        upd.use_tsig(self._key.dns_key())
        for r in records:
            rdata = f'"{r.value}"'
            if add:
                upd.add(dns.name.from_text(r.fqdn), CHALLENGE_TTL, dns.rdatatype.TXT, rdata)
            else:
                # RFC 2136 §2.5.4: delete an RR from an RRset — only this value, other orders' values stay.
                # A value already gone is no error (NOERROR): the record is confirmed absent either way.
                upd.delete(dns.name.from_text(r.fqdn), dns.rdatatype.TXT, rdata)
        verb = "add" if add else "delete"
        outcome = "(TXT not written)" if add else "(TXT may be left behind)"
        step = f"dns update {zone} @{where}"
        names = ", ".join(sorted({r.fqdn for r in records}))
        # A TSIG error or an rcode is the server's verdict: RFC 2136 §3.7, nothing of the UPDATE was applied.
        try:
            async with asyncio.timeout(UPDATE_TIMEOUT):
                resp = await dns.asyncquery.tcp(upd, primary, timeout=UPDATE_TIMEOUT, port=self.conf.port)
        except dns.tsig.PeerBadKey as exc:
            return failed(False, DNSAuthError(f"{step}: {badkey_cause(self._key.name)} {outcome}",
                                              hint=badkey_hint(self._key.name, names)), exc)
        except dns.tsig.PeerBadSignature as exc:
            return failed(False, DNSAuthError(
                f"{step}: TSIG signature rejected (BADSIG) — wrong secret or algorithm for key {self._key.name!r} "
                f"{outcome}", hint="compare the tsig_secret file with the server's key and tsig_algorithm"), exc)
        except dns.tsig.PeerBadTime as exc:
            return failed(False, DNSClockSkewError(
                f"{step}: TSIG time rejected (BADTIME) {outcome}",
                hint="this machine's clock and the DNS server's differ by more than 5 minutes; fix NTP"), exc)
        except dns.tsig.PeerError as exc:
            return failed(False, DNSAuthError(f"{step}: TSIG rejected ({type(exc).__name__}) {outcome}"), exc)
        except (TimeoutError, dns.exception.Timeout) as exc:
            return failed(None, DNSError(f"{step}: no answer within {UPDATE_TIMEOUT:g}s {outcome}"), exc)
        except ConnectionRefusedError as exc:  # nothing reached the server
            return failed(False, DNSError(f"{step}: connection refused {outcome}",
                                          hint="is the DNS server running?"), exc)
        except (OSError, dns.exception.DNSException) as exc:
            return failed(None, DNSError(f"{step}: {type(exc).__name__}: {sanitize.line(str(exc))} {outcome}"), exc)
        rcode = resp.rcode()
        if rcode == dns.rcode.NOERROR:
            event(log, logging.DEBUG, f"challenge TXT {verb}", provider=self.name, zone=zone, server=where,
                  names=",".join(sorted({r.fqdn for r in records})), values=len(records))
            if self.on_change is not None:
                self.on_change("dns published" if add else "dns removed", zone, records)
            return ZoneUpdate(zone=zone, records=records, applied=True)
        text = dns.rcode.to_text(rcode)
        if rcode == dns.rcode.REFUSED:
            return failed(False, DNSAuthError(f"{step}: REFUSED for {names} {outcome}",
                                              hint=f"the server's update-policy must grant key {self._key.name!r} "
                                                   f"TXT on {names}"))
        if rcode == dns.rcode.NOTAUTH:
            return failed(False, DNSAuthError(
                f"{step}: NOTAUTH (the key is not accepted or the server is not authoritative for {zone}) {outcome}",
                hint="check tsig_key/tsig_secret, that server is the zone's primary, and that its update "
                     f"policy/ACL grants key {self._key.name!r} TXT on {names}"))
        if rcode == dns.rcode.NOTZONE:
            return failed(False, DNSError(f"{step}: NOTZONE — {names} is not inside {zone} {outcome}",
                                          hint="check zones = [...]"))
        return failed(False, DNSError(f"{step}: {text} {outcome}"))


def badkey_cause(key: str) -> str:
    """What a TSIG BADKEY means (RFC 8945 §5.2.1): an unknown key — or, from Knot, a known key its ACL denies."""
    return (f"BADKEY for TSIG key {key!r}: the server does not know this key, or its update policy/ACL "
            "denies it")


def badkey_hint(key: str, names: str) -> str:
    """The next step after BADKEY: both causes, since Knot answers an update its ACL denies with NOTAUTH + BADKEY."""
    return (f"check tsig_key {key!r} against the key names in the server's config; if it is there, the server's "
            f"update policy/ACL (bind update-policy, Knot acl) must allow this key to update TXT on {names}")


def read_key(conf: RFC2136Config) -> TSIGKey:
    """The TSIG key, read and checked against the inventory (key name, algorithm)."""
    algorithm = normalise_tsig_algorithm(conf.tsig_algorithm)
    if algorithm is None:  # the inventory refuses these already; never fall back to MD5 silently
        raise DNSError(f"{conf.tsig_secret.key_path}: TSIG algorithm {conf.tsig_algorithm!r} is refused")
    return parse_tsig_secret(conf.tsig_secret.read(), key_name=conf.tsig_key, algorithm=algorithm,
                             where=conf.tsig_secret.key_path)


# ---------------------------------------------------------------- doctor's capability


async def diagnose(cfg: DNSProvider, zone: str, *, timeout: float) -> tuple[Finding, ...]:
    """The key and the zone (a TSIG-signed SOA query to the primary), then every nameserver propagation waits for."""
    tsig = await _diagnose_tsig(cfg, zone, timeout=timeout)
    started = Timer("nameservers")
    # Finding the nameservers needs no key: a placeholder never signs anything here.
    finder = RFC2136Provider(cfg, TSIGKey(name=config_of(cfg).tsig_key, algorithm="hmac-sha256", secret=Secret("")))
    try:
        servers = await finder.nameservers(zone)
    except DNSError as exc:
        return tsig, started(FAIL, f"cannot list the nameservers of {zone}: {exc.message}",
                             f"set nameservers = [...] in [dns.{cfg.name}]")
    return tsig, await check_nameservers(zone, servers, timeout=timeout, propagation_timeout=cfg.propagation_timeout,
                                         provider=cfg.name, started=started)


async def _diagnose_tsig(cfg: DNSProvider, zone: str, *, timeout: float) -> Finding:
    """A TSIG-signed SOA query for `zone` to its primary: the key is accepted and the zone served with AA."""
    conf = config_of(cfg)
    result = Timer("tsig")
    algorithm = normalise_tsig_algorithm(conf.tsig_algorithm)
    if algorithm is None:
        return result(FAIL, f"TSIG algorithm {conf.tsig_algorithm!r} is refused")
    try:
        key = read_key(conf)
    except CertmgrError as exc:
        return result(FAIL, f"TSIG key {conf.tsig_key}: {exc.message}", exc.hint)
    try:
        server = await RFC2136Provider(cfg, key).primary(zone)
    except DNSError as exc:
        return result(FAIL, exc.message, exc.hint)
    where = _server(server, conf.port)
    q = dns.message.make_query(dns.name.from_text(zone), dns.rdatatype.SOA)
    q.flags &= ~dns.flags.RD
    q.use_tsig(key.dns_key())
    kname = conf.tsig_key
    try:
        async with asyncio.timeout(timeout):
            resp = await dns.asyncquery.tcp(q, server, port=conf.port, timeout=timeout)
    except dns.tsig.PeerBadKey:
        # one diagnosis with the UPDATE's: Knot answers BADKEY for a known key its ACL denies, too
        return result(FAIL, f"TSIG key {kname}: {where} answered {badkey_cause(kname)}",
                      badkey_hint(kname, f"the _acme-challenge names in {zone}"))
    except dns.tsig.PeerBadSignature:
        return result(FAIL, f"TSIG key {kname}: {where} rejected the signature (BADSIG): the secret or "
                            f"algorithm ({algorithm}) differs from the server's",
                      f"compare {conf.tsig_secret.describe()} with the server's key {kname}")
    except dns.tsig.PeerBadTime:
        return result(FAIL, f"TSIG key {kname}: {where} rejected the time (BADTIME): this machine's clock and "
                            "the server's differ by more than the allowed fudge",
                      "fix NTP on this machine (or on the DNS server)")
    except dns.tsig.PeerError as exc:
        return result(FAIL, f"TSIG key {kname}: {where} rejected it ({type(exc).__name__})")
    except dns.tsig.BadSignature:
        return result(FAIL, f"TSIG key {kname}: the answer from {where} is not signed with this key",
                      "another server answers on that address?")
    except (TimeoutError, dns.exception.Timeout):
        return result(FAIL, f"{where}: no answer within {timeout:g}s",
                      f"is the DNS server up and reachable on TCP port {conf.port}?")
    except ConnectionRefusedError:
        return result(FAIL, f"{where}: connection refused", "is the DNS server running?")
    except (OSError, dns.exception.DNSException) as exc:
        return result(FAIL, f"{where}: {type(exc).__name__}: {sanitize.line(str(exc))}")
    rcode = resp.rcode()
    if rcode == dns.rcode.REFUSED:
        return result(FAIL, f"{where} answered REFUSED for {zone} SOA (key {kname}): it does not serve the "
                            "zone to this client",
                      "check the server is the zone's primary and allows queries from this address")
    if rcode == dns.rcode.NOTAUTH:
        return result(FAIL, f"{where} answered NOTAUTH for {zone}: not authoritative, or key {kname} not "
                            "accepted", "check server and zones in the inventory")
    if rcode == dns.rcode.NXDOMAIN:
        return result(FAIL, f"key {kname} accepted, but zone {zone} does not exist at {where} (NXDOMAIN)",
                      "check zones = [...] and server: the zone must be served by that primary")
    if rcode != dns.rcode.NOERROR:
        return result(FAIL, f"{where} answered {dns.rcode.to_text(rcode)} for {zone} SOA (key {kname})",
                      "check zones = [...]: is this the zone apex?")
    soa = next((rr for rr in resp.answer if rr.rdtype == dns.rdatatype.SOA
                and rr.name == dns.name.from_text(zone)), None)
    if soa is None:
        return result(FAIL, f"key {kname} accepted, but {where} has no SOA for {zone}: it is not a zone apex",
                      "zones = [...] must list zone apexes")
    if not resp.flags & dns.flags.AA:
        return result(FAIL, f"key {kname} accepted, but {where} is not authoritative for {zone} (no AA)",
                      "set server to the zone's primary")
    return result(OK, f"key {kname} ({algorithm}) accepted by {where}; zone {zone} served authoritatively "
                      f"(SOA serial {soa[0].serial})")
