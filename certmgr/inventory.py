"""The inventory: domains.toml → frozen, validated dataclasses (types: certmgr.model; rules: names, reader).

Validation is strict and reports every problem at once, each naming its key path
(`certificates[1].hosts[2]: no host named 'salyl' (did you mean 'sally'?)`).
Nothing here does I/O beyond reading the file; secrets are only *referenced*.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certmgr import sanitize, storecfg
from certmgr.dns import registry as dns_registry
from certmgr.errors import InventoryError
from certmgr.model import (
    CA,
    DEFAULT_RELOAD,
    KEEP_VERSIONS,
    LEGACY_RELOAD,
    Certificate,
    Channel,
    DNSProvider,
    Host,
    Inventory,
    SecretRef,
    Threshold,
)
from certmgr.model import suggest as _suggest
from certmgr.names import dns_name_problem, ip_or_hostname_problem, split_server, url_problem
from certmgr.names import type_name as _tname
from certmgr.reader import Reader as _Reader
from certmgr.reader import parse_duration, parse_threshold

__all__ = [
    "CA",
    "CHANNEL_TYPES",
    "KEY_TYPES",
    "MAX_NAMES",
    "SEVERITIES",
    "Certificate",
    "Channel",
    "DNSProvider",
    "Host",
    "Inventory",
    "SecretRef",
    "Threshold",
    "dns_name_problem",
    "load",
    "loads",
    "parse",
    "parse_duration",
    "parse_threshold",
    "redacted",
    "url_problem",
]

def __getattr__(name: str) -> Any:
    """`TSIG_ALGORITHMS` and `normalise_tsig_algorithm` moved to certmgr.dns.rfc2136; still reachable here
    (imported on first use: the provider modules load only when an inventory names their type)."""
    if name in ("TSIG_ALGORITHMS", "normalise_tsig_algorithm"):
        from certmgr.dns import rfc2136

        return getattr(rfc2136, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
SEVERITIES = ("ok", "warning", "critical", "error")
CHANNEL_TYPES = ("discord", "slack", "matrix", "webhook")
PROFILES_HINT = ("classic", "tlsserver", "shortlived")
MAX_NAMES = 100  # Let's Encrypt's limit on names per certificate; other public CAs are no higher

# ---------------------------------------------------------------- name rules

_LINEAGE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
_TAG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_CHANNEL_SECRET_KEYS = {"url", "token"}


# ---------------------------------------------------------------- loading


def load(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate an inventory file; raises InventoryError listing every problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InventoryError([f"file not found: {p}"], path=str(p)) from None
    except OSError as exc:
        raise InventoryError([f"cannot read {p}: {exc.strerror}"], path=str(p)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))  # a BOM (Windows editors) is not an error
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        # columns count characters, as an editor shows them: the line's bytes before the bad one are valid UTF-8
        col = len(raw[raw.rfind(b"\n", 0, exc.start) + 1:exc.start].decode("utf-8-sig")) + 1
        raise InventoryError([f"line {line}, column {col}: not UTF-8 (byte 0x{raw[exc.start]:02x}); "
                              "save the file as UTF-8"], path=str(p)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError([f"TOML syntax: {exc}"], path=str(p)) from exc
    return parse(data, base=p.parent.resolve(), path=p)


def loads(text: str, *, base: Path | None = None) -> Inventory:
    """Parse inventory text (tests, docs examples)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError([f"TOML syntax: {exc}"], path="<string>") from exc
    return parse(data, base=base or Path.cwd(), path=Path("<string>"))


def parse(data: dict[str, Any], *, base: Path, path: Path) -> Inventory:
    """Validate a parsed TOML document; every problem names its key path, in file order."""
    r = _Reader(base)
    r.table(data, "", {"defaults", "ca", "dns", "hosts", "certificates", "channels", "store"})
    dd = _parse_defaults(r, data)
    cas, default_ca = _parse_cas(r, data, dd)
    providers = _parse_dns(r, data)
    hosts = _parse_hosts(r, data, dd)
    certs = _parse_certificates(r, data, dd, cas=cas, default_ca=default_ca, providers=providers, hosts=hosts)
    channels = _parse_channels(r, data)
    store = storecfg.parse(r, data)
    if "certificates" not in data:
        r.err("certificates", "no certificates defined")
    if r.problems:
        raise InventoryError(r.problems, path=str(path))
    return Inventory(path=path, cas=cas, dns=providers, hosts=hosts, certificates=tuple(certs),
                     channels=channels, trust=dd.trust, warnings=tuple(r.warnings), keep_versions=dd.keep_versions,
                     store=store)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Defaults:
    """`[defaults]`, read once: what hosts and certificates inherit."""

    table: dict[str, Any]
    key_type: str
    renew_before: Threshold | None
    warn_before: Threshold
    critical_before: Threshold
    cert_root: str
    ssh_user: str
    ssh_key_file: str | None
    known_hosts: str | None
    https_port: int
    trust: tuple[Path, ...]
    test_command: tuple[str, ...]
    reload_command: tuple[str, ...]
    dump_command: tuple[str, ...]
    privkey_owner: str | None
    privkey_group: str | None
    keep_versions: int = KEEP_VERSIONS


def _parse_defaults(r: _Reader, data: dict[str, Any]) -> _Defaults:
    d = r.table(data.get("defaults", {}), "defaults",
                {"ca", "key_type", "renew_before", "warn_before", "critical_before", "cert_root", "ssh_user",
                 "ssh_key_file", "known_hosts", "https_port", "trust", "test_command", "reload_command",
                 "dump_command", "privkey_owner", "privkey_group", "keep_versions"})
    keep_versions = r.get(d, "keep_versions", "defaults", int, default=KEEP_VERSIONS)
    if not isinstance(keep_versions, int) or keep_versions < 2:
        r.err("defaults.keep_versions", f"{keep_versions} keeps too few versions: the live one and the previous "
                                        "one (the rollback target) are always kept, so at least 2")
        keep_versions = KEEP_VERSIONS
    key_type = r.choice(d, "key_type", "defaults", KEY_TYPES, "ecdsa-p256") or "ecdsa-p256"
    renew_before = r.threshold(d, "renew_before", "defaults", None)
    warn_before = r.threshold(d, "warn_before", "defaults", Threshold(fraction=0.25, text="1/4"))
    critical_before = r.threshold(d, "critical_before", "defaults", Threshold(fraction=0.1, text="1/10"))
    cert_root = _abs_remote_path(r, d, "cert_root", "defaults", "/etc/letsencrypt")
    ssh_user = _user(r, d, "ssh_user", "defaults", "certmgr")
    ssh_key_s = r.get(d, "ssh_key_file", "defaults", str)
    known_hosts_s = r.get(d, "known_hosts", "defaults", str)
    https_port = r.port(d, "https_port", "defaults", 443)
    trust = tuple(r.path(t) for t in (r.strlist(d, "trust", "defaults") or ()))
    test_cmd = r.argv(d, "test_command", "defaults", ("sudo", "-n", "nginx", "-t"))
    reload_cmd = r.argv(d, "reload_command", "defaults", DEFAULT_RELOAD)
    return _Defaults(table=d, key_type=key_type, renew_before=renew_before,
                     warn_before=warn_before or Threshold(fraction=0.25, text="1/4"),
                     critical_before=critical_before or Threshold(fraction=0.1, text="1/10"), cert_root=cert_root,
                     ssh_user=ssh_user, ssh_key_file=ssh_key_s, known_hosts=known_hosts_s, https_port=https_port,
                     trust=trust, test_command=test_cmd, reload_command=reload_cmd,
                     dump_command=r.argv(d, "dump_command", "defaults", ("sudo", "-n", "nginx", "-T")),
                     privkey_owner=_owner(r, d, "privkey_owner", "defaults", None),
                     privkey_group=_owner(r, d, "privkey_group", "defaults", None), keep_versions=keep_versions)


def _parse_cas(r: _Reader, data: dict[str, Any], dd: _Defaults) -> tuple[dict[str, CA], str | None]:
    """`[ca.*]`, and the default CA (the only one when `[defaults] ca` is not set)."""
    d = dd.table
    cas: dict[str, CA] = {}
    for name, t in _named_tables(r, data, "ca"):
        kp = f"ca.{name}"
        t = r.table(t, kp, {"directory", "contact", "agree_tos", "trust", "eab_kid"}, secrets={"eab_hmac_key"})
        directory = r.get(t, "directory", kp, str, required=True)
        if directory is not None and not directory.startswith("https://"):
            r.err(f"{kp}.directory", f"{directory!r} must be an https:// URL")
        contact = r.strlist(t, "contact", kp) or ()
        for i, c in enumerate(contact):
            if not c.startswith("mailto:") or not re.fullmatch(r"mailto:[^@\s]+@[^@\s]+\.[^@\s]+", c):
                r.err(f"{kp}.contact[{i}]", f"{c!r} must be a mailto: address")
        trust_s = r.get(t, "trust", kp, str)
        eab_kid = r.get(t, "eab_kid", kp, str)
        eab_key = r.secret(t, "eab_hmac_key", kp, required=eab_kid is not None)
        if eab_key is not None and eab_kid is None:
            r.err(f"{kp}.eab_kid", "required when an EAB HMAC key is given")
        cas[name] = CA(name=name, directory=directory or "", contact=contact,
                       agree_tos=bool(r.get(t, "agree_tos", kp, bool, default=False)),
                       trust=r.path(trust_s) if trust_s else None, eab_kid=eab_kid, eab_hmac_key=eab_key)
    default_ca = r.get(d, "ca", "defaults", str)
    if default_ca is not None and default_ca not in cas:
        r.err("defaults.ca", f"no CA named {default_ca!r}{_suggest(default_ca, list(cas))}")
    if default_ca is None and len(cas) == 1:
        default_ca = next(iter(cas))
    return cas, default_ca


def _parse_dns(r: _Reader, data: dict[str, Any]) -> dict[str, DNSProvider]:
    """`[dns.*]`: the keys every type shares here; the type's own keys by its module (certmgr/dns/<type>.py)."""
    providers: dict[str, DNSProvider] = {}
    for name, t in _named_tables(r, data, "dns"):
        kp = f"dns.{name}"
        raw_type = t.get("type")
        mod = dns_registry.provider_type(raw_type) if raw_type in dns_registry.TYPES else None
        # a missing or unknown type: its keys cannot be judged, only the type is reported
        t = r.table(t, kp, set(dns_registry.COMMON_KEYS | mod.KEYS) if mod else set(t),
                    secrets=set(mod.SECRET_KEYS) if mod else set())
        typ = r.choice(t, "type", kp, dns_registry.TYPES, None, required=True)
        if mod is None:
            continue
        zones = r.strlist(t, "zones", kp, required=True, nonempty=True) or ()
        for i, z in enumerate(zones):
            if (p := dns_name_problem(z, wildcard_ok=False)) is not None:
                r.err(f"{kp}.zones[{i}]", p)
        nameservers = r.strlist(t, "nameservers", kp) or ()
        for i, ns in enumerate(nameservers):
            if split_server(ns, 53) is None:
                r.err(f"{kp}.nameservers[{i}]", f"{ns!r} must be an IP address (or ADDRESS:PORT)")
        if not nameservers and getattr(mod, "NEEDS_NAMESERVERS", False) and "nameservers" not in t:
            r.err(f"{kp}.nameservers", f"required for type {typ!r}: the addresses of every authoritative server "
                                       "of the zones (the propagation check asks each)")
        config = mod.parse_config(r, t, kp)
        if config is None:
            continue
        providers[name] = DNSProvider(
            name=name, type=typ or "", zones=zones, config=config, nameservers=nameservers,
            propagation_timeout=r.duration(t, "propagation_timeout", kp, 120.0))
    return providers


def _parse_hosts(r: _Reader, data: dict[str, Any], dd: _Defaults) -> dict[str, Host]:
    ssh_key_s, known_hosts_s, https_port, ssh_user = dd.ssh_key_file, dd.known_hosts, dd.https_port, dd.ssh_user
    cert_root, test_cmd, reload_cmd = dd.cert_root, dd.test_command, dd.reload_command
    hosts: dict[str, Host] = {}
    raw_jumps: dict[str, str] = {}
    for name, t in _named_tables(r, data, "hosts"):
        kp = f"hosts.{name}"
        if not _LINEAGE.fullmatch(name):
            r.err(kp, f"{name!r} is not a valid host name (lower-case letters, digits, '.', '-', '_')")
        t = r.table(t, kp, {"address", "port", "https_port", "user", "ssh_key_file", "known_hosts", "tags",
                            "cert_root", "test_command", "reload_command", "dump_command", "jump",
                            "privkey_owner", "privkey_group", "ssh_user"})
        user_key = "ssh_user"
        if "user" in t:
            if "ssh_user" in t:
                r.err(f"{kp}.user", "give ssh_user only (user is its old name)")
            else:
                user_key = "user"
                r.warn(f"{kp}.user", "deprecated name: rename it to ssh_user (as in [defaults])")
        address = r.get(t, "address", kp, str, required=True)
        if address is not None and (p := ip_or_hostname_problem(address)) is not None:
            r.err(f"{kp}.address", p)
        tags = r.strlist(t, "tags", kp) or ()
        for i, tag in enumerate(tags):
            if not _TAG.fullmatch(tag):
                r.err(f"{kp}.tags[{i}]", f"{tag!r} is not a valid tag (lower-case letters, digits, '-', '_')")
        jump = r.get(t, "jump", kp, str)
        if jump is not None:
            raw_jumps[name] = jump
        key_s = r.get(t, "ssh_key_file", kp, str, default=ssh_key_s)
        kh_s = r.get(t, "known_hosts", kp, str, default=known_hosts_s)
        hosts[name] = Host(
            name=name, address=address or "", port=r.port(t, "port", kp, 22),
            https_port=r.port(t, "https_port", kp, https_port), user=_user(r, t, user_key, kp, ssh_user),
            ssh_key_file=r.path(key_s) if key_s else None, known_hosts=r.path(kh_s) if kh_s else None,
            tags=tags, cert_root=_abs_remote_path(r, t, "cert_root", kp, cert_root),
            test_command=r.argv(t, "test_command", kp, test_cmd),
            reload_command=r.argv(t, "reload_command", kp, reload_cmd),
            reload_fallback=LEGACY_RELOAD if "reload_command" not in t and "reload_command" not in dd.table else (),
            dump_command=r.argv(t, "dump_command", kp, dd.dump_command), jump=jump,
            privkey_owner=_owner(r, t, "privkey_owner", kp, dd.privkey_owner),
            privkey_group=_owner(r, t, "privkey_group", kp, dd.privkey_group))
    for name, jump in raw_jumps.items():
        if jump not in hosts:
            r.err(f"hosts.{name}.jump", f"no host named {jump!r}{_suggest(jump, list(hosts))}")
        elif jump == name:
            r.err(f"hosts.{name}.jump", "a host cannot be its own jump host")
    return hosts


def _parse_certificates(r: _Reader, data: dict[str, Any], dd: _Defaults, *, cas: Mapping[str, CA],
                        default_ca: str | None, providers: Mapping[str, DNSProvider],
                        hosts: Mapping[str, Host]) -> list[Certificate]:
    key_type, renew_before = dd.key_type, dd.renew_before
    warn_before, critical_before = dd.warn_before, dd.critical_before
    all_tags = sorted({tag for h in hosts.values() for tag in h.tags})
    certs: list[Certificate] = []
    raw_certs = data.get("certificates", [])
    if not isinstance(raw_certs, list):
        r.err("certificates", "must be an array of tables ([[certificates]])")
        raw_certs = []
    seen_names: dict[str, int] = {}
    seen_domains: dict[str, str] = {}
    for ci, t in enumerate(raw_certs):
        kp = f"certificates[{ci}]"
        t = r.table(t, kp, {"name", "domains", "dns", "hosts", "ca", "key_type", "reuse_key", "profile",
                            "preferred_chain", "renew_before", "warn_before", "critical_before", "verify_names"})
        if not t:
            continue
        name = r.get(t, "name", kp, str, required=True)
        if name is not None:
            if (p := _lineage_problem(name)) is not None:
                r.err(f"{kp}.name", p)
            elif name in seen_names:
                r.err(f"{kp}.name", f"duplicate certificate name {name!r} (also certificates[{seen_names[name]}])")
            else:
                seen_names[name] = ci
        domains = r.strlist(t, "domains", kp, required=True, nonempty=True) or ()
        if len(domains) > MAX_NAMES:
            r.err(f"{kp}.domains", f"{len(domains)} names; a certificate holds at most {MAX_NAMES} "
                  "(split it into several certificates)")
        local_seen: set[str] = set()
        for i, dn in enumerate(domains):
            if (p := dns_name_problem(dn)) is not None:
                r.err(f"{kp}.domains[{i}]", p)
            elif dn in local_seen:
                r.err(f"{kp}.domains[{i}]", f"{dn!r} is listed twice")
            local_seen.add(dn)
            if name and dn in seen_domains and seen_domains[dn] != name:
                r.err(f"{kp}.domains[{i}]", f"{dn!r} is already on certificate {seen_domains[dn]!r}")
            elif name:
                seen_domains.setdefault(dn, name)
        dns_name = r.get(t, "dns", kp, str)
        if dns_name is None:
            if len(providers) == 1:
                dns_name = next(iter(providers))
            else:
                r.err(f"{kp}.dns",
                      "required: name a [dns.*] provider" if providers else "no [dns.*] provider is defined")
        elif dns_name not in providers:
            r.err(f"{kp}.dns", f"no DNS provider named {dns_name!r}{_suggest(dns_name, list(providers))}")
        ca = r.get(t, "ca", kp, str, default=default_ca)
        if ca is None:
            r.err(f"{kp}.ca", "required: no [defaults] ca and more than one [ca.*]" if cas else "no [ca.*] is defined")
        elif ca not in cas:
            r.err(f"{kp}.ca", f"no CA named {ca!r}{_suggest(ca, list(cas))}")
        targets: list[str] = []
        for i, ref in enumerate(r.strlist(t, "hosts", kp) or ()):
            if ref.startswith("tag:"):
                tag = ref[4:]
                matched = [h.name for h in hosts.values() if tag in h.tags]
                if not matched:
                    r.err(f"{kp}.hosts[{i}]", f"no host has tag {tag!r}{_suggest(tag, all_tags)}")
                targets.extend(matched)
            elif ref in hosts:
                targets.append(ref)
            else:
                r.err(f"{kp}.hosts[{i}]", f"no host named {ref!r}{_suggest(ref, list(hosts))}")
        verify_names = _verify_names(r, t, kp, domains)
        profile = r.get(t, "profile", kp, str)
        if profile is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", profile):
            r.err(f"{kp}.profile", f"{profile!r} is not a valid profile name")
        certs.append(Certificate(
            name=name or f"<certificates[{ci}]>", domains=domains, dns=dns_name or "",
            hosts=tuple(dict.fromkeys(targets)),
            ca=ca or "", key_type=r.choice(t, "key_type", kp, KEY_TYPES, key_type) or key_type,
            reuse_key=bool(r.get(t, "reuse_key", kp, bool, default=False)), profile=profile,
            preferred_chain=r.get(t, "preferred_chain", kp, str),
            renew_before=r.threshold(t, "renew_before", kp, renew_before),
            warn_before=r.threshold(t, "warn_before", kp, warn_before) or warn_before,
            critical_before=r.threshold(t, "critical_before", kp, critical_before) or critical_before,
            verify_names=verify_names,
        ))
    for cert in certs:
        prov = providers.get(cert.dns)
        if prov is None:
            continue
        for i, dn in enumerate(cert.domains):
            if dns_name_problem(dn) is None and prov.zone_for(dn.removeprefix("*.")) is None:
                ci = seen_names.get(cert.name, 0)
                r.err(f"certificates[{ci}].domains[{i}]",
                      f"{dn!r} is in none of dns.{prov.name}'s zones ({', '.join(prov.zones)})")
    return certs


def _verify_names(r: _Reader, t: dict[str, Any], kp: str, domains: tuple[str, ...]) -> tuple[str, ...]:
    """The SNI names a deploy verifies with: `verify_names`, else the certificate's non-wildcard names."""
    given = r.strlist(t, "verify_names", kp, nonempty=True)
    if given is None:  # absent (default ()) gives (); a wrong type was reported
        given = ()
    if "verify_names" not in t:
        plain = tuple(d for d in domains if not d.startswith("*."))
        if not plain and domains:
            r.warn(f"{kp}.verify_names", "not set and every domain is a wildcard: the deploy verifies with "
                   f"{domains[0].replace('*.', 'certmgr-verify.', 1)!r}, which reaches nginx's default server "
                   "unless a server_name matches it; list names the hosts serve")
        return plain
    for i, name in enumerate(given):
        if (p := dns_name_problem(name, wildcard_ok=False)) is not None:
            r.err(f"{kp}.verify_names[{i}]", p)
        elif not any(name == d or (d.startswith("*.") and name.partition(".")[2] == d[2:]) for d in domains):
            r.err(f"{kp}.verify_names[{i}]", f"{name!r} is not covered by the certificate's domains")
    return tuple(dict.fromkeys(given))


def _parse_channels(r: _Reader, data: dict[str, Any]) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    for name, t in _named_tables(r, data, "channels"):
        kp = f"channels.{name}"
        t = r.table(t, kp, {"type", "homeserver", "room", "min_severity", "repeat"}, secrets=_CHANNEL_SECRET_KEYS)
        typ = r.choice(t, "type", kp, CHANNEL_TYPES, None, required=True)
        homeserver = r.get(t, "homeserver", kp, str)
        room = r.get(t, "room", kp, str)
        if typ == "matrix":
            if homeserver is None:
                r.err(f"{kp}.homeserver", "required for a matrix channel")
            elif (p := url_problem(homeserver)) is not None:
                r.err(f"{kp}.homeserver", f"{homeserver!r} {p}")
            if room is None:
                r.err(f"{kp}.room", "required for a matrix channel")
            elif not re.fullmatch(r"[!#][^:\s]+:[^\s]+", room):
                r.err(f"{kp}.room", f"{room!r} is not a Matrix room id (!id:server) or alias (#name:server)")
            url = None
            token = r.secret(t, "token", kp, required=True)
        else:
            url = r.secret(t, "url", kp, required=typ is not None)
            token = None
            for k in ("homeserver", "room"):
                if k in t and typ is not None:
                    r.err(f"{kp}.{k}", f"only used by matrix channels, not {typ}")
        channels[name] = Channel(
            name=name, type=typ or "", url=url, token=token, homeserver=homeserver, room=room,
            min_severity=r.choice(t, "min_severity", kp, SEVERITIES, "warning") or "warning",
            repeat=r.duration(t, "repeat", kp, 86400.0))
    return channels


def _named_tables(r: _Reader, data: dict[str, Any], section: str) -> list[tuple[str, Any]]:
    value = data.get(section, {})
    if not isinstance(value, dict):
        r.err(section, f"must be a table of named entries ([{section}.NAME]), not {_tname(value)}")
        return []
    out = []
    for name, t in value.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
            r.err(f"{section}.{name}", f"{name!r} is not a valid name (lower-case letters, digits, '.', '-', '_')")
            continue
        if not isinstance(t, dict):
            r.err(f"{section}.{name}", f"must be a table, not {_tname(t)}")
            continue
        out.append((name, t))
    return out


def _lineage_problem(name: str) -> str | None:
    if not _LINEAGE.fullmatch(name) or ".." in name:
        shown = sanitize.line(name, limit=None)
        return (f"'{shown}' is not a valid certificate name (lower-case letters, digits, '.', '-', '_'; "
                "it becomes a directory name on every host)")
    return None


def _user(r: _Reader, t: dict[str, Any], key: str, kp: str, default: str) -> str:
    value = r.get(t, key, kp, str)
    if value is None:
        return default
    if not _USER.fullmatch(value):
        r.err(f"{kp}.{key}", f"{value!r} is not a valid user name")
        return default
    return value  # type: ignore[no-any-return]


def _owner(r: _Reader, t: dict[str, Any], key: str, kp: str, default: str | None) -> str | None:
    """A user or group name, or a numeric id, for chown on a host ("" in a host clears the default)."""
    value = r.get(t, key, kp, (str, int))
    if value is None:
        return default
    if isinstance(value, int) and not 0 <= value < 2**32:
        r.err(f"{kp}.{key}", f"{value!r} is not a user/group name or numeric id")
        return default
    text = str(value)
    if text == "":
        return None
    if not (re.fullmatch(r"[0-9]+", text) or _USER.fullmatch(text)):
        r.err(f"{kp}.{key}", f"{text!r} is not a valid name (lower-case letters, digits, '_', '.', '-'; "
                             "at most 32) or numeric id")
        return default
    return text


def _abs_remote_path(r: _Reader, t: dict[str, Any], key: str, kp: str, default: str) -> str:
    value = r.get(t, key, kp, str)
    if value is None:
        return default
    if not value.startswith("/") or not re.fullmatch(r"[A-Za-z0-9_./@+-]+", value) or "/../" in value + "/":
        r.err(f"{kp}.{key}", f"{value!r} must be an absolute path of letters, digits and ._-/@+ (no '..')")
        return default
    return value.rstrip("/") or "/"


# ---------------------------------------------------------------- display


def redacted(inv: Inventory) -> dict[str, Any]:
    """The resolved inventory as plain data, secrets shown only as their references."""

    def ref(s: SecretRef | None) -> str | None:
        return None if s is None else f"<secret {s.describe()}>"

    return {
        "path": str(inv.path),
        "trust": [str(p) for p in inv.trust],
        "ca": {n: {"directory": c.directory, "contact": list(c.contact), "agree_tos": c.agree_tos,
                   "trust": str(c.trust) if c.trust else None, "eab_kid": c.eab_kid,
                   "eab_hmac_key": ref(c.eab_hmac_key)} for n, c in inv.cas.items()},
        "dns": {n: {"type": p.type, "zones": list(p.zones), **p.config.shown(),
                    "nameservers": list(p.nameservers), "propagation_timeout": p.propagation_timeout}
                for n, p in inv.dns.items()},
        "hosts": {n: {"address": h.address, "port": h.port, "https_port": h.https_port, "user": h.user,
                      "tags": list(h.tags), "cert_root": h.cert_root, "test_command": list(h.test_command),
                      "reload_command": list(h.reload_command), "reload_fallback": list(h.reload_fallback),
                      "dump_command": list(h.dump_command),
                      "jump": h.jump,
                      "privkey_owner": h.privkey_owner, "privkey_group": h.privkey_group,
                      "ssh_key_file": str(h.ssh_key_file) if h.ssh_key_file else None,
                      "known_hosts": str(h.known_hosts) if h.known_hosts else None}
                  for n, h in inv.hosts.items()},
        "certificates": [{"name": c.name, "domains": list(c.domains), "dns": c.dns, "hosts": list(c.hosts),
                          "ca": c.ca, "key_type": c.key_type, "reuse_key": c.reuse_key, "profile": c.profile,
                          "preferred_chain": c.preferred_chain,
                          "renew_before": str(c.renew_before) if c.renew_before else "1/3 (1/2 under 10 days)",
                          "warn_before": str(c.warn_before), "critical_before": str(c.critical_before),
                          "verify_names": list(c.verify_names)}
                         for c in inv.certificates],
        "channels": {n: {"type": ch.type, "url": ref(ch.url), "token": ref(ch.token), "homeserver": ch.homeserver,
                         "room": ch.room, "min_severity": ch.min_severity, "repeat": ch.repeat}
                     for n, ch in inv.channels.items()},
    }

