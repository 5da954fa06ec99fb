"""DNS-01 through the PowerDNS Authoritative HTTP API (PATCH of one zone's RRsets, 4.x API).

Only the challenge RRset is touched, and within it only our values: PATCH `REPLACE` replaces a whole
RRset, so the current RRset is read first (`?rrset_name=&rrset_type=`) and the union (or the rest) written,
one write per zone at a time so parallel orders in this process never drop each other's values (and never
write one zone at once: PowerDNS's sqlite backend answers concurrent writes with HTTP 500 "database is
locked"). Changes queued while a write runs go together in the next one (group commit): one PATCH, which
PowerDNS applies whole or not at all. The API key goes in `X-API-Key` only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from certmgr import sanitize
from certmgr.dns import DNSChange, TXTRecord, ZoneUpdate, by_zone, log_failed_cleanups, typed_config
from certmgr.dns.diagnosis import FAIL, OK, Finding, Timer, check_nameservers
from certmgr.dns.static import StaticNameservers, servers
from certmgr.errors import CertmgrError, DNSAuthError, DNSError
from certmgr.log import Secret, event
from certmgr.model import DNSProvider, SecretRef, duration_text
from certmgr.names import url_problem
from certmgr.reader import Reader

log = logging.getLogger(__name__)

KEYS = frozenset({"api_url", "server_id", "timeout"})
SECRET_KEYS = frozenset({"api_key"})
FIRST_CHECK = "api"  # the name of diagnose()'s first finding
NEEDS_NAMESERVERS = True
CHALLENGE_TTL = 60
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True, kw_only=True)
class PowerDNSConfig:
    """`[dns.NAME]` with `type = "powerdns"`: the API's URL, the server id, the key, the time limit per request."""

    api_url: str
    api_key: SecretRef
    server_id: str = "localhost"
    timeout: float = 10.0

    def secrets(self) -> tuple[SecretRef, ...]:
        return (self.api_key,) if self.api_key.where else ()

    def shown(self) -> dict[str, object]:
        return {"api_url": self.api_url, "server_id": self.server_id, "timeout": self.timeout,
                "api_key": self.api_key.shown()}

    def toml(self) -> tuple[tuple[str, object], ...]:
        return (("api_url", self.api_url), ("server_id", self.server_id), ("timeout", duration_text(self.timeout)),
                (f"api_key_{self.api_key.kind}", self.api_key.where))


def parse_config(r: Reader, t: dict[str, Any], kp: str) -> PowerDNSConfig:
    """`api_url` (https://, or http:// to loopback), `server_id`, `timeout`, `api_key_file|_credential|_env`."""
    api_url = r.get(t, "api_url", kp, str, required=True)
    if api_url is not None and (p := url_problem(api_url)) is not None:
        r.err(f"{kp}.api_url", f"{sanitize.quoted(api_url)} {p}")
    server_id = r.get(t, "server_id", kp, str, default="localhost")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", server_id):
        r.err(f"{kp}.server_id", f"{sanitize.quoted(server_id)} is not a server id (letters, digits, '.', '_', '-')")
    key = r.secret(t, "api_key", kp, required=True)
    return PowerDNSConfig(api_url=(api_url or "").rstrip("/"), server_id=server_id,
                          api_key=key or SecretRef("env", "", f"{kp}.api_key"),
                          timeout=r.duration(t, "timeout", kp, 10.0))


def config_of(cfg: DNSProvider) -> PowerDNSConfig:
    return typed_config(cfg, PowerDNSConfig, "powerdns")


def build(cfg: DNSProvider) -> PowerDNSProvider:
    """Validated now: the API key is read (a missing secret fails here, not mid-challenge)."""
    conf = config_of(cfg)
    return PowerDNSProvider(cfg, Secret(conf.api_key.read()))


def txt_value(content: str) -> str:
    """A TXT record's content as PowerDNS shows it (`"ab" "cd"`) → the joined text (`abcd`)."""
    return "".join(m.group(1).replace('\\"', '"').replace("\\\\", "\\") for m in _QUOTED.finditer(content))


def outcome(add: bool, applied: bool | None) -> str:
    """What became of the TXT, for the end of an error message."""
    if applied is None:
        return "(TXT may have been written; it is removed again)" if add else "(TXT may be left behind)"
    return "(TXT not written)" if add else "(TXT may be left behind)"


@dataclass(slots=True, kw_only=True)
class _Op:
    """One present or cleanup waiting for its zone's next write: (applied, error) arrives in `done`."""

    add: bool
    records: tuple[TXTRecord, ...]
    done: asyncio.Future[tuple[bool | None, DNSError | None]]


class _APIFailure(Exception):  # never leaves this module: it becomes a ZoneUpdate or a Finding
    """One API request that failed: `applied` as in ZoneUpdate (False: certainly no change)."""

    def __init__(self, error: DNSError, applied: bool | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.applied = applied


class PowerDNSProvider(StaticNameservers):
    """DNS-01 through the PowerDNS API; safe for concurrent use by many orders in one process."""

    def __init__(self, cfg: DNSProvider, key: Secret) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.conf = config_of(cfg)
        self._key = key
        # Made once: building an SSL context reads the CA bundle (~50 ms of CPU), and every write makes a client.
        self._tls = ssl.create_default_context()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per zone
        self._pending: defaultdict[str, list[_Op]] = defaultdict(list)  # per zone: changes not yet written
        self.on_change: DNSChange | None = None

    def __repr__(self) -> str:
        return f"PowerDNSProvider({self.name!r}, api_url={self.conf.api_url!r})"

    def zone_url(self, zone: str) -> str:
        return (f"{self.conf.api_url}/api/v1/servers/{quote(self.conf.server_id, safe='')}/zones/"
                f"{quote(zone.rstrip('.') + '.', safe='')}")

    def client(self) -> httpx.AsyncClient:
        # trust_env=False: no proxy from the environment ever sees the key
        return httpx.AsyncClient(timeout=self.conf.timeout, trust_env=False, verify=self._tls,
                                 headers={"X-API-Key": self._key.reveal(), "Accept": "application/json"})

    async def request(self, client: httpx.AsyncClient, method: str, zone: str, step: str, *,
                      params: dict[str, str] | None = None, body: object = None) -> httpx.Response:
        """One API call; every failure becomes an _APIFailure saying whether a change may have been made
        (its message has no outcome: the caller adds it, knowing what was asked)."""
        writes = method != "GET"
        try:
            async with asyncio.timeout(self.conf.timeout + 1):
                resp = await client.request(method, self.zone_url(zone), params=params, json=body)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _APIFailure(DNSError(f"{step}: no answer from {self.conf.api_url} within {self.conf.timeout:g}s",
                                    hint="is the PowerDNS API up? (webserver=yes, api=yes)"),
                           None if writes else False) from exc
        except httpx.ConnectError as exc:
            raise _APIFailure(DNSError(f"{step}: cannot connect to {self.conf.api_url}: "
                                    f"{sanitize.line(str(exc) or type(exc).__name__)}",
                                    hint="is pdns_server running with webserver=yes and api=yes?"), False) from exc
        except httpx.HTTPError as exc:
            raise _APIFailure(DNSError(f"{step}: {type(exc).__name__}: {sanitize.line(str(exc))}"),
                           None if writes else False) from exc
        if resp.status_code < 400:
            return resp
        raise _APIFailure(self._refusal(resp, zone, step), None if resp.status_code >= 500 and writes else False)

    def _refusal(self, resp: httpx.Response, zone: str, step: str) -> DNSError:
        code = resp.status_code
        try:
            said = str(resp.json().get("error", ""))
        except (ValueError, AttributeError):
            said = resp.text
        said = sanitize.quoted(said.strip(), limit=200) if said.strip() else ""
        where = f"dns.{self.name}"
        if code in (401, 403):
            return DNSAuthError(f"{step}: the API refused the key (HTTP {code})",
                                hint=f"check api_key in [{where}] against api-key in pdns.conf")
        if code == 404:
            return DNSError(f"{step}: HTTP 404 — no zone {zone} on server {self.conf.server_id!r}",
                            hint=f"check zones = [...], server_id and api_url in [{where}]")
        if code == 422:
            return DNSError(f"{step}: HTTP 422, the API rejected the change{': ' + said if said else ''}",
                            hint="a name outside the zone, or a TXT the server cannot store")
        return DNSError(f"{step}: HTTP {code}{': ' + said if said else ''}",
                        hint="see pdns_server's log" if code >= 500 else None)

    async def present(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        """Add every record's value (other values of the name kept), one PATCH per zone, zones concurrently."""
        return tuple(await asyncio.gather(*(self._zone(zone, recs, add=True)
                                            for zone, recs in by_zone(records).items())))

    async def cleanup(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        """Remove exactly our values (the RRset only when nothing else is left); failures logged, never raised."""
        done = tuple(await asyncio.gather(*(self._zone(zone, recs, add=False)
                                            for zone, recs in by_zone(records).items())))
        log_failed_cleanups(log, self.name, done)
        return done

    async def _zone(self, zone: str, recs: Sequence[TXTRecord], *, add: bool) -> ZoneUpdate:
        """Queue this change for `zone` and wait for the write that carries it.

        Group commit: whoever holds the zone's lock writes every change queued so far in one GET per name
        and one PATCH; changes queued meanwhile go in the next write. PowerDNS applies a PATCH whole, so
        every change in a batch shares its outcome.
        """
        op = _Op(add=add, records=tuple(recs), done=asyncio.get_running_loop().create_future())
        key = zone.lower()
        self._pending[key].append(op)
        async with self._locks[key]:
            if not op.done.done():
                batch, self._pending[key] = self._pending[key], []
                try:
                    await self._write(zone, batch)
                finally:  # cancelled mid-write: the others' changes go back in the queue for the next holder
                    self._pending[key][:0] = [o for o in batch if o is not op and not o.done.done()]
        applied, error = op.done.result()
        if applied and self.on_change is not None:
            self.on_change("dns published" if add else "dns removed", zone, op.records)
        return ZoneUpdate(zone=zone, records=op.records, applied=applied, error=error)

    async def _write(self, zone: str, batch: Sequence[_Op]) -> None:
        """One GET per name and one PATCH for every change in `batch`, applied in the order queued."""
        names = sorted({r.fqdn.lower() for op in batch for r in op.records})
        verb = "present" if all(o.add for o in batch) else "cleanup" if not any(o.add for o in batch) else "update"
        step = f"dns {verb} {zone} via {self.conf.api_url}"
        try:
            async with self.client() as client:
                current = dict(zip(names, await asyncio.gather(*(self._current(client, zone, n, step)
                                                                 for n in names)), strict=True))
                content = {n: list(c) for n, c in current.items()}
                for op in batch:
                    for r in op.records:
                        now = content[r.fqdn.lower()]
                        if op.add and r.value not in map(txt_value, now):
                            now.append(f'"{r.value}"')
                        elif not op.add:
                            now[:] = [c for c in now if txt_value(c) != r.value]
                rrsets = [{"name": n + ".", "type": "TXT", "ttl": CHALLENGE_TTL,
                           "changetype": "REPLACE" if content[n] else "DELETE",
                           "records": [{"content": c, "disabled": False} for c in content[n]]}
                          for n in names if content[n] != current[n]]  # unchanged: already there / already gone
                if rrsets:
                    await self.request(client, "PATCH", zone, step, body={"rrsets": rrsets})
        except _APIFailure as exc:
            for op in batch:
                error = type(exc.error)(f"{exc.error.message} {outcome(op.add, exc.applied)}", hint=exc.error.hint)
                error.__cause__ = exc.__cause__
                op.done.set_result((exc.applied, error))
            return
        event(log, logging.DEBUG, "challenge TXT write", provider=self.name, zone=zone, names=len(names),
              changes=len(batch), rrsets=len(rrsets))
        for op in batch:
            op.done.set_result((True, None))

    async def _current(self, client: httpx.AsyncClient, zone: str, name: str, step: str) -> list[str]:
        """The TXT contents now served at `name` (as PowerDNS stores them), read before a REPLACE."""
        resp = await self.request(client, "GET", zone, step,
                                  params={"rrset_name": name + ".", "rrset_type": "TXT"})
        try:
            rrsets = resp.json().get("rrsets", [])
            return [str(rec["content"]) for rr in rrsets
                    if str(rr.get("name", "")).rstrip(".").lower() == name and rr.get("type") == "TXT"
                    for rec in rr.get("records", [])]
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise _APIFailure(DNSError(f"{step}: the API's answer is not a zone's JSON"), False) from exc


async def diagnose(cfg: DNSProvider, zone: str, *, timeout: float) -> tuple[Finding, ...]:
    """The key is accepted and the zone exists (GET zone, no RRsets); every nameserver answers the zone."""
    result = Timer("api")
    try:
        prov = build(cfg)
    except CertmgrError as exc:
        api = result(FAIL, exc.message, exc.hint)
    else:
        try:
            async with prov.client() as client:
                await prov.request(client, "GET", zone, f"GET zone {zone}", params={"rrsets": "false"})
        except _APIFailure as exc:
            api = result(FAIL, exc.error.message, exc.error.hint)
        else:
            api = result(OK, f"{prov.conf.api_url} accepts the key; server {prov.conf.server_id!r} has zone {zone}")
    return api, await check_nameservers(zone, servers(cfg), timeout=timeout,
                                        propagation_timeout=cfg.propagation_timeout, provider=cfg.name)
