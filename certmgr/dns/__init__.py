"""DNS-01 plumbing: the provider contract, challenge records, and finding where a challenge record lives.

A provider is validated when built (secret read, algorithm known) so it never half-works mid-challenge.
`locate` follows `_acme-challenge` CNAMEs against the zones' own authoritative servers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from certmgr.errors import CertmgrError, DNSError
from certmgr.log import event
from certmgr.model import DNSProvider, Inventory

MAX_CNAME_HOPS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class TXTRecord:
    """One challenge value to publish: `fqdn` (absolute, no trailing dot) in `zone`, for identifier `domain`."""

    fqdn: str
    zone: str
    value: str
    domain: str
    # RFC 8555 §8.1/§8.4: the challenge token and key authorization the value is the digest of; only
    # providers that want them (exec in lego's raw mode) read these. Not part of `key`.
    token: str | None = None
    key_authorization: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """(zone, owner name, value): what identifies one challenge value in DNS (names case-folded)."""
        return (self.zone.lower(), self.fqdn.lower(), self.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ZoneUpdate:
    """What became of one UPDATE (one zone's records): applied, certainly not applied, or unknown.

    RFC 2136 §3.7: an UPDATE is applied whole or not at all, so the server's answer covers every record in it.
    """

    zone: str
    records: tuple[TXTRecord, ...]
    # True: the server answered NOERROR. False: it answered with an error, or nothing was sent (no change made).
    # None: no answer (timeout, connection lost): the change may or may not have been made.
    applied: bool | None
    error: DNSError | None = None


def first_error(updates: Sequence[ZoneUpdate]) -> DNSError | None:
    """The error to report for a batch: a server's verdict before a missing answer, else the first."""
    failed = sorted((u for u in updates if u.error is not None), key=lambda u: u.applied is not False)
    return failed[0].error if failed else None


def log_failed_cleanups(log: logging.Logger, provider: str, updates: Sequence[ZoneUpdate]) -> None:
    """A provider's cleanup logs each failed update (a leftover TXT is harmless) and raises nothing."""
    for u in updates:
        if u.error is not None:
            event(log, logging.WARNING, "challenge cleanup failed", provider=provider, zone=u.zone,
                  records=len(u.records), error=str(u.error))


def by_zone(records: Sequence[TXTRecord]) -> dict[str, list[TXTRecord]]:
    """The records grouped by zone, in first-seen order (one update per zone)."""
    out: dict[str, list[TXTRecord]] = {}
    for r in records:
        out.setdefault(r.zone, []).append(r)
    return out


C = TypeVar("C")


def typed_config(cfg: DNSProvider, cls: type[C], type_name: str) -> C:
    """`cfg`'s own config as its type's class; DNSError when `cfg` is of another type."""
    if not isinstance(cfg.config, cls):
        raise DNSError(f"dns provider {cfg.name}: type {cfg.type!r} is not {type_name}")
    return cfg.config


# (action, zone, records) once a server accepted an UPDATE: "dns published" or "dns removed".
DNSChange = Callable[[str, str, Sequence[TXTRecord]], None]


class Provider(Protocol):
    """A DNS-01 provider. Safe to call concurrently from many tasks.

    `present` writes every record and `cleanup` removes exactly the given values (never whole RRsets),
    one UPDATE per zone, every zone's UPDATE run to its end even when another fails; both return one
    `ZoneUpdate` per zone saying what the server did (a zone refused never hides another accepted),
    and never raise for a server's answer or silence (cleanup also logs its failures).
    `wait_propagated` returns once every authoritative nameserver of each zone serves every
    value, or raises PropagationTimeout naming the servers that lag.
    """

    name: str
    on_change: DNSChange | None  # told of every change the server accepted (the audit log)

    async def present(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]: ...

    async def cleanup(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]: ...

    async def wait_propagated(self, records: Sequence[TXTRecord], *, timeout: float | None = None) -> None: ...

    async def cname_target(self, fqdn: str, zone: str) -> str | None: ...


def challenge_name(domain: str) -> str:
    """RFC 8555 §8.4: `_acme-challenge.` + the identifier, the wildcard label removed."""
    return "_acme-challenge." + domain.removeprefix("*.")


def build(cfg: DNSProvider) -> Provider:
    """The provider for an inventory `[dns.*]` entry, validated now (reads its secrets)."""
    from certmgr.dns.registry import TYPES, provider_type

    if cfg.type not in TYPES:
        raise DNSError(f"dns provider {cfg.name}: unknown type {cfg.type!r} (one of {', '.join(TYPES)})")
    return provider_type(cfg.type).build(cfg)


async def locate(inventory: Inventory, providers: Mapping[str, Provider], domain: str,
                 value: str, *, token: str | None = None, key_authorization: str | None = None,
                 prefer: str | None = None) -> tuple[Provider, TXTRecord]:
    """Where the TXT for `domain` must be written: follows `_acme-challenge` CNAMEs (delegated challenge zones).

    Each hop is asked of the authoritative servers of the zone holding the name, never a public resolver.
    `prefer` (the certificate's own provider) wins when two providers list the same zone.
    """
    fqdn = challenge_name(domain)
    seen = [fqdn]
    for _ in range(MAX_CNAME_HOPS):
        owner = inventory.zone_provider(fqdn, prefer)
        if owner is None:
            via = f" (via CNAME from {seen[0]})" if len(seen) > 1 else ""
            raise DNSError(
                f"dns locate {domain}: {fqdn}{via} is in none of the inventory's DNS zones (challenge not attempted)",
                hint="add a [dns.*] provider whose zones include the CNAME target's zone")
        cfg, zone = owner
        prov = providers.get(cfg.name)
        if prov is None:
            raise DNSError(f"dns locate {domain}: provider {cfg.name} was not built (challenge not attempted)")
        target = await prov.cname_target(fqdn, zone)
        if target is None:
            return prov, TXTRecord(fqdn=fqdn, zone=zone, value=value, domain=domain, token=token,
                                   key_authorization=key_authorization)
        if target in seen:
            raise DNSError(f"dns locate {domain}: CNAME loop {' → '.join([*seen, target])} (challenge not attempted)")
        seen.append(target)
        fqdn = target
    raise DNSError(f"dns locate {domain}: more than {MAX_CNAME_HOPS} CNAMEs from {seen[0]} (challenge not attempted)")


async def run_all(coros: Sequence[Coroutine[Any, Any, Any]]) -> None:
    """Run `coros` concurrently; the first CertmgrError propagates as itself (the rest are cancelled).

    TaskGroup wraps failures in an ExceptionGroup; callers and operators want the one error that
    says what went wrong. Anything that is not a CertmgrError is a bug and keeps its group.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            for coro in coros:
                tg.create_task(coro)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if isinstance(e, CertmgrError)), None)
        if first is None or not all(isinstance(e, (CertmgrError, asyncio.CancelledError)) for e in leaves):
            raise
        raise first from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
