"""The lab's `inventory.toml`, in certmgr's schema (docs/inventory.md), absolute paths throughout."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lab.named import CHALLENGE_KEY, CHALLENGE_ZONE, LAB_KEY, PRIMARY_NS, ZONE
from lab.pop import DEPLOY_USER

if TYPE_CHECKING:
    from lab.lab import Lab


def toml_value(value: Any) -> str:
    """A TOML value for the few types the inventory uses (JSON strings are valid TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(header: str, items: Iterable[tuple[str, Any]]) -> str:
    return "\n".join([header, *(f"{k} = {toml_value(v)}" for k, v in items)]) + "\n"


def pop_tags(index: int) -> list[str]:
    return ["cdn", "canary"] if index == 0 else ["cdn"]  # the canary deploys first


def render(lab: Lab) -> str:
    parts = [
        f"# certmgr lab inventory, written by `python -m lab up` for {lab.dir} (port base {lab.ports.base}).\n",
        _table("[defaults]", [
            ("ca", "pebble"),
            ("ssh_user", DEPLOY_USER),
            ("ssh_key_file", str(lab.ssh_key)),
            ("known_hosts", str(lab.known_hosts)),
            ("https_port", lab.ports.https),
            ("trust", [str(lab.seed_ca), str(lab.pebble.roots)]),
        ]),
        _table("[ca.pebble]", [
            ("directory", lab.pebble.directory),
            ("contact", ["mailto:ops@hachyderm.test"]),
            ("agree_tos", True),
            ("trust", str(lab.https_ca)),
        ]),
    ]
    for table, zone, key in (("lab", ZONE, LAB_KEY), ("challenges", CHALLENGE_ZONE, CHALLENGE_KEY)):
        parts.append(_table(f"[dns.{table}]", [
            ("type", "rfc2136"),
            ("zones", [zone]),
            ("server", PRIMARY_NS),
            ("port", lab.ports.dns),
            ("tsig_key", key),
            ("tsig_algorithm", "hmac-sha256"),
            ("tsig_secret_file", str(lab.dns_dir / f"{key}.key")),
        ]))
    for i, name in enumerate(lab.pop_names):
        p = lab.pop_paths(name)
        parts.append(_table(f"[hosts.{name}]", [
            ("address", p.address),
            ("port", lab.ports.ssh),
            ("https_port", lab.ports.https),
            ("tags", pop_tags(i)),
            ("cert_root", str(p.cert_root)),
            ("test_command", p.test_command),
            ("reload_command", p.reload_command),
            ("dump_command", p.dump_command),
        ]))
    for name, domains in lab.certificates:
        parts.append(_table("[[certificates]]", [
            ("name", name), ("domains", list(domains)), ("dns", "lab"), ("hosts", ["tag:cdn"]),
        ]))
    parts.append(_table("[channels.ops]", [("type", "webhook"), ("url_file", str(lab.webhook_url_file))]))
    return "\n".join(parts)
