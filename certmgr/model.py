"""The inventory's types: what domains.toml becomes once validated (frozen, slotted dataclasses).

`certmgr.inventory` parses and validates; every step imports these types from there or from here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from certmgr.errors import InventoryError, SecretError
from certmgr.log import register_secret

# ---------------------------------------------------------------- value types


KEEP_VERSIONS = 3  # the live one, the previous one (the rollback target) and one more

@dataclass(frozen=True, slots=True)
class Threshold:
    """A point before expiry: an absolute number of seconds or a fraction of lifetime."""

    seconds: float | None = None
    fraction: float | None = None
    text: str = ""

    def before(self, lifetime_s: float) -> float:
        """Seconds before not_after at which the threshold is crossed."""
        if self.fraction is not None:
            return lifetime_s * self.fraction
        assert self.seconds is not None
        return self.seconds

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives: a file, a systemd credential, or an environment variable.

    `str()`/`repr()` never show the value; `read()` is the only way to it.
    """

    kind: str  # "file" | "credential" | "env"
    where: str
    key_path: str

    def read(self, env: Mapping[str, str] | None = None) -> str:
        env = os.environ if env is None else env
        if self.kind == "file":
            path = Path(self.where)
        elif self.kind == "credential":
            creds = env.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise SecretError(
                    f"{self.key_path}: systemd credential {self.where!r} requested but "
                    "$CREDENTIALS_DIRECTORY is not set",
                    hint="run under systemd with LoadCredential=, or use a *_file reference",
                )
            path = Path(creds) / self.where
        else:
            value = env.get(self.where)
            if not value:
                raise SecretError(f"{self.key_path}: environment variable {self.where} is not set or empty")
            register_secret(value.strip())  # every secret read is masked in logs, whoever reads it
            return value.strip()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SecretError(f"{self.key_path}: cannot read secret file {path}: {exc.strerror}") from exc
        if not value:
            raise SecretError(f"{self.key_path}: secret file {path} is empty")
        register_secret(value)
        return value

    def describe(self) -> str:
        return f"{self.kind}:{self.where}"

    def shown(self) -> str:
        """How `inventory show` prints it: the reference, never the value."""
        return f"<secret {self.describe()}>"


# ---------------------------------------------------------------- inventory types


@dataclass(frozen=True, slots=True, kw_only=True)
class CA:
    name: str
    directory: str
    contact: tuple[str, ...] = ()
    agree_tos: bool = False
    trust: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: SecretRef | None = None


class ProviderConfig(Protocol):
    """A provider type's own validated settings (built by `certmgr.dns.<type>.parse_config`).

    It declares its secret references (so `inventory check` and redaction need no per-type code) and
    its redacted view (`inventory show`): secrets appear only as their references.
    """

    def secrets(self) -> tuple[SecretRef, ...]: ...

    def shown(self) -> dict[str, object]: ...

    def toml(self) -> tuple[tuple[str, object], ...]:
        """The keys as an inventory writes them (secrets as `KEY_file = "…"` etc.), for generated stubs."""
        ...


def duration_text(seconds: float) -> str:
    """Seconds as an inventory duration (`"30s"`, `"1.5s"`)."""
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class DNSProvider:
    """An inventory `[dns.NAME]`: what every provider type shares, and the type's own `config`."""

    name: str
    type: str
    zones: tuple[str, ...]
    config: ProviderConfig
    # authoritative servers the propagation check asks: "ADDRESS" or "ADDRESS:PORT" ("[v6]:PORT")
    nameservers: tuple[str, ...] = ()
    propagation_timeout: float = 120.0

    def zone_for(self, fqdn: str) -> str | None:
        """The longest of this provider's zones that contains `fqdn`."""
        best = None
        for zone in self.zones:
            if fqdn == zone or fqdn.endswith("." + zone):
                if best is None or len(zone) > len(best):
                    best = zone
        return best


# The default reload: SIGHUP to nginx's master, and only to it — the pid in root's pid file (the path of
# Debian's, Ubuntu's, nginx.org's and RHEL's packages), and only if that process is named nginx (procps
# pkill). `nginx -s reload` (what systemd's ExecReload runs) first parses the whole config and loads every
# certificate in the client, which repeats the test deploy has just run under the POP lock
# (docs/deploy.md, "Reload").
DEFAULT_RELOAD: tuple[str, ...] = ("sudo", "-n", "pkill", "-HUP", "-F", "/run/nginx.pid", "-x", "nginx")
# The default before it, still used on a host whose sudoers allows only it (Host.reload_fallback).
LEGACY_RELOAD: tuple[str, ...] = ("sudo", "-n", "systemctl", "reload", "nginx")


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    name: str
    address: str
    port: int = 22
    https_port: int = 443
    user: str = "certmgr"
    ssh_key_file: Path | None = None
    known_hosts: Path | None = None
    tags: tuple[str, ...] = ()
    cert_root: str = "/etc/letsencrypt"
    test_command: tuple[str, ...] = ()
    reload_command: tuple[str, ...] = ()
    # The argv deploy reloads with when sudo refuses `reload_command` (certmgr/reloadcmd.py). Set only when
    # reload_command is the built-in default (neither [defaults] nor [hosts.X] sets it): the old default,
    # `systemctl reload nginx`, so a POP whose sudoers allows only that keeps deploying after an upgrade.
    # () for an explicit reload_command, which is never second-guessed.
    reload_fallback: tuple[str, ...] = ()
    dump_command: tuple[str, ...] = ("sudo", "-n", "nginx", "-T")  # `certmgr discover`: the effective config
    jump: str | None = None
    privkey_owner: str | None = None  # user name or uid for privkey.pem on the host (None: the deploy user)
    privkey_group: str | None = None  # group name or gid (None: the deploy user's group)

    @property
    def privkey_chown(self) -> str:
        """The `chown` operand for privkey.pem: "owner:group", "owner", ":group", or "" (leave as created)."""
        if self.privkey_owner:
            return self.privkey_owner + (f":{self.privkey_group}" if self.privkey_group else "")
        return f":{self.privkey_group}" if self.privkey_group else ""

    @property
    def canary(self) -> bool:
        return "canary" in self.tags


@dataclass(frozen=True, slots=True, kw_only=True)
class Certificate:
    name: str
    domains: tuple[str, ...]
    dns: str
    hosts: tuple[str, ...]  # resolved host names, tags expanded, in inventory order
    ca: str
    key_type: str = "ecdsa-p256"
    reuse_key: bool = False
    profile: str | None = None
    preferred_chain: str | None = None
    renew_before: Threshold | None = None  # None: 1/3 of lifetime (1/2 under 10 days)
    warn_before: Threshold = field(default_factory=lambda: Threshold(fraction=0.25, text="1/4"))
    critical_before: Threshold = field(default_factory=lambda: Threshold(fraction=0.1, text="1/10"))
    # SNI names the deploy/doctor handshakes use: the POP must serve the certificate under each.
    # The parser fills in the non-wildcard domains when the key is absent; () means "derive a label".
    verify_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Channel:
    name: str
    type: str
    url: SecretRef | None = None
    token: SecretRef | None = None
    homeserver: str | None = None
    room: str | None = None
    min_severity: str = "warning"
    repeat: float = 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """`[store]`: the PostgreSQL store shared by two controllers (certmgr.storecfg parses it; docs/ha.md)."""

    url: str  # never with a password in it
    password: SecretRef | None
    key: SecretRef  # the sealing key file (certmgr.sealing)
    idle_timeout: float = 30.0
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Inventory:
    path: Path
    cas: Mapping[str, CA]
    dns: Mapping[str, DNSProvider]
    hosts: Mapping[str, Host]
    certificates: tuple[Certificate, ...]
    channels: Mapping[str, Channel]
    trust: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()  # valid but risky settings, each naming its key path
    keep_versions: int = KEEP_VERSIONS  # retention: versions kept per certificate, in the store and on each POP
    store: StoreConfig | None = None  # [store]: None is the state directory (the default)

    def certificate(self, name: str) -> Certificate:
        for cert in self.certificates:
            if cert.name == name:
                return cert
        raise InventoryError([f"no certificate named {name!r}{suggest(name, [c.name for c in self.certificates])}"],
                             path=str(self.path))

    def select(self, names: tuple[str, ...] | list[str]) -> tuple[Certificate, ...]:
        """The named certificates (all when none named); unknown names → one InventoryError."""
        if not names:
            return self.certificates
        known = {c.name: c for c in self.certificates}
        problems = [
            f"no certificate named {n!r}{suggest(n, list(known))}" for n in names if n not in known
        ]
        if problems:
            raise InventoryError(problems, path=str(self.path))
        return tuple(known[n] for n in dict.fromkeys(names))

    def zone_provider(self, fqdn: str, prefer: str | None = None) -> tuple[DNSProvider, str] | None:
        """The provider and zone that own `fqdn` (longest zone match across providers).

        When two providers list the same zone, `prefer` (the certificate's `dns`) wins the tie; else the first.
        """
        best: tuple[DNSProvider, str] | None = None
        for prov in self.dns.values():
            zone = prov.zone_for(fqdn)
            if zone and (best is None or len(zone) > len(best[1])
                         or (len(zone) == len(best[1]) and prov.name == prefer)):
                best = (prov, zone)
        return best


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

