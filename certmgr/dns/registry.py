"""DNS provider types: `type = "…"` → the module that owns its schema, builder and optional diagnosis.

A provider module (`certmgr/dns/<type>.py`) exposes `KEYS`, `SECRET_KEYS`, `parse_config(reader, table,
keypath)` and `build(cfg)`, and may expose `diagnose(cfg, zone, *, timeout)`. Modules are imported when
first named, so an inventory that uses only rfc2136 never loads the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, cast

from certmgr.model import DNSProvider, ProviderConfig

if TYPE_CHECKING:  # imported for types only: `inventory` imports this module, and dnspython is slow to import
    from certmgr.dns import Provider
    from certmgr.dns.diagnosis import Finding
    from certmgr.reader import Reader

# what every [dns.*] table may hold whatever its type (the inventory reads these)
COMMON_KEYS = frozenset({"type", "zones", "nameservers", "propagation_timeout"})

_MODULES = {"rfc2136": "certmgr.dns.rfc2136", "powerdns": "certmgr.dns.powerdns", "exec": "certmgr.dns.exec"}
TYPES = tuple(_MODULES)


class ProviderType(Protocol):
    """What a provider module offers the inventory, the renewal and doctor."""

    KEYS: frozenset[str]  # its own keys in [dns.NAME], besides COMMON_KEYS
    SECRET_KEYS: frozenset[str]  # secrets, written as KEY_file / KEY_credential / KEY_env

    def parse_config(self, r: Reader, table: dict[str, Any], keypath: str) -> ProviderConfig | None: ...

    def build(self, cfg: DNSProvider) -> Provider: ...


class Diagnose(Protocol):
    def __call__(self, cfg: DNSProvider, zone: str, *, timeout: float) -> Awaitable[tuple[Finding, ...]]: ...


def provider_type(name: str) -> ProviderType:
    """The module for `type = name` (a KeyError for a type not in TYPES: the inventory refuses those first)."""
    return cast(ProviderType, importlib.import_module(_MODULES[name]))


def first_check(name: str) -> str:
    """The name of the type's first diagnosis ("tsig", "api", "program"): what doctor calls a zone check that
    hung or failed before any finding."""
    return str(getattr(provider_type(name), "FIRST_CHECK", "nameservers"))


def diagnoser(name: str) -> Diagnose | None:
    """The type's optional `diagnose` capability, or None when it has none."""
    return cast("Diagnose | None", getattr(provider_type(name), "diagnose", None))
