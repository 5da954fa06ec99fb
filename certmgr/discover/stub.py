"""An inventory stub (domains.toml text) for what a fleet serves today, or for lineages just imported.

The current inventory's CAs, DNS providers, hosts and channels are written back as they are;
`[[certificates]]` come from what was found, grouped as the fleet groups names today. Wherever
a choice had to be made, a `# guess:` comment above it says which and why. The result passes
`certmgr inventory check` (tests prove it); a certificate that could not pass is written commented out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from certmgr.deploy import reload as reload_mod
from certmgr.discover.model import Report, is_dns_name
from certmgr.discover.text import clean
from certmgr.inventory import KEY_TYPES, Host, Inventory, SecretRef, dns_name_problem

_LINEAGE = re.compile(r"[a-z0-9][a-z0-9._-]{0,199}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StubCert:
    """One `[[certificates]]` to write, with the guesses made for it."""

    name: str
    domains: tuple[str, ...]
    hosts: tuple[str, ...]
    key_type: str | None = None
    dns: str | None = None
    guesses: tuple[str, ...] = ()
    disabled: str | None = None  # why it is written commented out


def _v(value: Any) -> str:
    """A TOML value (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):  # an inline table (an exec provider's env)
        return "{ " + ", ".join(f"{k} = {_v(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_v(v) for v in value) + "]"


def _secret(key: str, ref: SecretRef | None) -> list[tuple[str, Any]]:
    return [] if ref is None else [(f"{key}_{ref.kind}", ref.where)]


def _table(header: str, items: Iterable[tuple[str, Any]]) -> str:
    return "\n".join([header, *(f"{k} = {_v(v)}" for k, v in items if v is not None)]) + "\n"


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds}s"


def _reload(h: Host, pids: Mapping[str, str]) -> tuple[list[str] | None, str | None]:
    """reload_command for host `h`'s table, and the `# guess:` for it.

    Left to the default (None) as it was, so deploy's fallback to the old default still protects the host
    (deploy/reload.py); spelled out only when its nginx's `pid` directive names another file than the default's.
    """
    if not h.reload_fallback:
        return list(h.reload_command), None
    pid, default = pids.get(h.name), reload_mod.pid_file(h.reload_command)
    if pid is None or pid == default or not pid.startswith("/") or any(c.isspace() for c in pid):
        return None, None
    argv = [pid if a == default else a for a in h.reload_command]
    return argv, (f"reload_command: nginx on {h.name} writes its pid to {pid} (its `pid` directive), not {default}: "
                  f"the default reload with that file; allow it in sudoers: `{reload_mod.sudoers_line(h.user, argv)}` "
                  "(set here, it has no fallback to `systemctl reload nginx`)")


def render(inv: Inventory, certs: Sequence[StubCert], *, header: Sequence[str] = (),
           pids: Mapping[str, str] | None = None) -> str:
    """The whole stub: the inventory's CAs, DNS, hosts and channels, then `certs`. `pids`: host → the pid file its
    nginx names (discover's `pid` directives), for the reload_command of hosts that leave it to its default."""
    parts = ["".join(f"# {clean(line, 300)}\n" for line in header)]
    default_ca = next(iter({c.ca: None for c in inv.certificates}), None) or next(iter(inv.cas), None)
    parts.append(_table("[defaults]", [("ca", default_ca), ("trust", [str(p) for p in inv.trust] or None)]))
    for n, ca in inv.cas.items():
        parts.append(_table(f"[ca.{n}]", [
            ("directory", ca.directory), ("contact", list(ca.contact)), ("agree_tos", ca.agree_tos),
            ("trust", str(ca.trust) if ca.trust else None), ("eab_kid", ca.eab_kid),
            *_secret("eab_hmac_key", ca.eab_hmac_key)]))
    for n, p in inv.dns.items():
        parts.append(_table(f"[dns.{n}]", [
            ("type", p.type), ("zones", list(p.zones)), *p.config.toml(),  # each provider type writes its own keys
            ("nameservers", list(p.nameservers) or None), ("propagation_timeout", _duration(p.propagation_timeout))]))
    for n, h in inv.hosts.items():
        reload, guess = _reload(h, pids or {})
        parts.append(("" if guess is None else f"# guess: {clean(guess, 500)}\n") + _table(f"[hosts.{n}]", [
            ("address", h.address), ("port", h.port), ("https_port", h.https_port), ("ssh_user", h.user),
            ("ssh_key_file", str(h.ssh_key_file) if h.ssh_key_file else None),
            ("known_hosts", str(h.known_hosts) if h.known_hosts else None), ("tags", list(h.tags)),
            ("cert_root", h.cert_root), ("test_command", list(h.test_command)),
            ("reload_command", reload), ("dump_command", list(h.dump_command)), ("jump", h.jump),
            ("privkey_owner", h.privkey_owner), ("privkey_group", h.privkey_group)]))
    for c in certs:
        lines = [f"# guess: {clean(g, 500)}" for g in c.guesses]
        body = _table("[[certificates]]", [
            ("name", c.name), ("domains", list(c.domains)), ("dns", c.dns), ("hosts", list(c.hosts)),
            ("key_type", c.key_type)])
        if c.disabled:
            lines.append(f"# left out (would not pass `certmgr inventory check`): {clean(c.disabled, 500)}")
            body = "".join(f"# {line}\n" for line in body.splitlines())
        parts.append("\n".join(lines) + ("\n" if lines else "") + body)
    for n, ch in inv.channels.items():
        parts.append(_table(f"[channels.{n}]", [
            ("type", ch.type), *_secret("url", ch.url), *_secret("token", ch.token), ("homeserver", ch.homeserver),
            ("room", ch.room), ("min_severity", ch.min_severity), ("repeat", _duration(ch.repeat))]))
    return "\n".join(parts)


def _lineage_name(domains: Sequence[str], taken: set[str]) -> tuple[str, str | None]:
    first = domains[0]
    base = first[2:] if first.startswith("*.") else first
    guess = None if base == first else f"named {base!r} after the wildcard {first!r}"
    name, i = base, 2
    while name in taken or not _LINEAGE.fullmatch(name):
        name = f"{base}-{i}" if _LINEAGE.fullmatch(f"{base}-{i}") else f"certificate-{len(taken) + 1}"
        i += 1
    if name != base:
        guess = f"named {name!r}: {base!r} is taken or not a valid name"
    return name, guess


def _finish(inv: Inventory, cert: StubCert) -> StubCert:
    """Pick the DNS provider; disable the certificate when a domain is outside every provider's zones."""
    guesses = list(cert.guesses)
    domains: list[str] = []
    provider = None
    for d in cert.domains:
        zp = inv.zone_provider(d.removeprefix("*."))
        if zp is None:
            guesses.append(f"{d} is in none of the DNS providers' zones: left out (add its zone to a [dns.*])")
            continue
        if provider is None:
            provider = zp[0].name
        elif zp[0].name != provider:
            guesses.append(f"{d} is in dns.{zp[0].name}, not dns.{provider}: left out (give it its own certificate)")
            continue
        domains.append(d)
    disabled = None if domains else "no domain is in a DNS provider's zone"
    dns = provider if len(inv.dns) > 1 else None
    return StubCert(name=cert.name, domains=tuple(domains or cert.domains), hosts=cert.hosts,
                    key_type=cert.key_type, dns=dns, guesses=tuple(guesses), disabled=disabled)


def from_report(report: Report, inv: Inventory) -> list[StubCert]:
    """One certificate per distinct served leaf, holding the names it serves, on the hosts that serve it."""
    order = {h: i for i, h in enumerate(inv.hosts)}
    groups: dict[str, dict[str, Any]] = {}
    for b in report.bindings:
        name = b.name.lower().rstrip(".")
        if b.info is None or not is_dns_name(name) or dns_name_problem(name) is not None:
            continue
        g = groups.setdefault(b.info.sha256, {"names": [], "hosts": set(), "info": b.info, "lineage": b.lineage})
        if name not in g["names"]:
            g["names"].append(name)
        g["hosts"].add(b.host)
    # a name served by several certificates goes with the one most hosts serve; the other hosts join it
    ranked = sorted(groups.values(), key=lambda g: (-len(g["hosts"]), g["names"][0]))
    owner: dict[str, int] = {}
    own: list[list[str]] = [[] for _ in ranked]
    extra_hosts: list[set[str]] = [set() for _ in ranked]
    notes: list[list[str]] = [[] for _ in ranked]
    for i, g in enumerate(ranked):
        for n in g["names"]:
            if n not in owner:
                owner[n] = i
                own[i].append(n)
                continue
            j = owner[n]
            hosts = [h for h in g["hosts"] if h not in ranked[j]["hosts"]]
            extra_hosts[j].update(hosts)
            on = ",".join(sorted(g["hosts"], key=lambda h: order.get(h, 0)))
            kept = ranked[j]
            added = ",".join(sorted(hosts, key=lambda h: order.get(h, 0)))
            notes[j].append(f"{n} is served with another certificate (serial {g['info'].serial}) on {on}; "
                            f"kept with the one {len(kept['hosts'])} hosts serve (serial {kept['info'].serial})"
                            + (f", and {added} added to its hosts" if hosts else ""))
    out: list[StubCert] = []
    taken: set[str] = set()
    for i, g in enumerate(ranked):
        names = own[i]
        if not names:
            continue
        guesses = []
        if g["lineage"] and g["lineage"] not in taken:
            name = g["lineage"]
        else:
            name, guess = _lineage_name(names, taken)
            guesses.append(guess or f"certificate named after its first name {names[0]!r} (serial {g['info'].serial})")
        taken.add(name)
        guesses += notes[i]
        kt = g["info"].key_type
        if kt not in KEY_TYPES:
            guesses.append(f"key type {kt} is not one certmgr issues: left to the default")
        hosts = sorted(g["hosts"] | extra_hosts[i], key=lambda h: order.get(h, 0))
        out.append(_finish(inv, StubCert(name=name, domains=tuple(names), hosts=tuple(hosts),
                                         key_type=kt if kt in KEY_TYPES else None, guesses=tuple(guesses))))
    return out


def from_import(lineages: Sequence[tuple[str, Sequence[str], str | None]], inv: Inventory) -> list[StubCert]:
    """One certificate per imported lineage: (name, names on its live leaf, key type)."""
    out = []
    for name, names, kt in lineages:
        guesses = ["certbot does not record where a certificate is served: hosts left empty "
                   "(run `certmgr discover --inventory-stub` to see which POPs serve it)"]
        if kt is not None and kt not in KEY_TYPES:
            guesses.append(f"key type {kt} is not one certmgr issues: left to the default")
            kt = None
        domains = tuple(n for n in names if dns_name_problem(n) is None)
        out.append(_finish(inv, StubCert(name=name, domains=domains or tuple(names), hosts=(), key_type=kt,
                                         guesses=tuple(guesses))))
    return out
