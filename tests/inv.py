"""One inventory builder for the tests: a valid domains.toml from its tables, each one overridable.

`toml(...)` renders `[defaults]`, `[ca.*]`, `[dns.*]`, `[hosts.*]`, `[[certificates]]` and `[channels.*]`
in that order (values through lab.inventory.toml_value); by default one CA and one DNS provider that
are never contacted. `cert()` and `hosts()` build the usual tables. Tests that edit the text
(`.replace(…)`) rely on each table's keys keeping the order given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lab.inventory import toml_value

Table = Mapping[str, Any]

# The least an inventory needs besides hosts and certificates: one CA and one DNS provider, never contacted.
CA_X: dict[str, Table] = {"x": {"directory": "https://127.0.0.1/dir"}}
DNS_X: dict[str, Table] = {"x": {"type": "rfc2136", "zones": ["example.test"], "tsig_key": "k",
                                 "tsig_secret_env": "X"}}
# The lab's CA and DNS provider by name (not contacted by unit tests), the TSIG secret in a file.
LAB_CA: dict[str, Table] = {"pebble": {"directory": "https://127.0.0.1:14000/dir",
                                       "contact": ["mailto:ops@hachyderm.test"], "agree_tos": True}}
LAB_DNS: dict[str, Table] = {"lab": {"type": "rfc2136", "zones": ["hachyderm.test"], "server": "127.0.0.1",
                                     "tsig_key": "certmgr-lab", "tsig_secret_file": "tsig.key"}}


def table(header: str, items: Table) -> str:
    return "\n".join([header, *(f"{k} = {toml_value(v)}" for k, v in items.items())]) + "\n"


def toml(*, defaults: Table | None = None, ca: Mapping[str, Table] = CA_X, dns: Mapping[str, Table] = DNS_X,
         hosts: Mapping[str, Table] | None = None, certificates: Sequence[Table] = (),
         channels: Mapping[str, Table] | None = None, blank: bool = True) -> str:
    """The inventory text; `blank` puts an empty line before every table (else the tables follow at once)."""
    parts = [table("[defaults]", defaults)] if defaults is not None else []
    parts += [table(f"[ca.{name}]", t) for name, t in ca.items()]
    parts += [table(f"[dns.{name}]", t) for name, t in dns.items()]
    parts += [table(f"[hosts.{name}]", t) for name, t in (hosts or {}).items()]
    parts += [table("[[certificates]]", t) for t in certificates]
    parts += [table(f"[channels.{name}]", t) for name, t in (channels or {}).items()]
    sep = "\n" if blank else ""
    return sep + sep.join(parts)


def cert(name: str, *hosts: str, **more: Any) -> dict[str, Any]:
    """A [[certificates]] table: `name`, its `domains` (default: the name alone), `hosts` if any, then `more`."""
    domains = more.pop("domains", [name])
    return {"name": name, "domains": list(domains), **({"hosts": list(hosts)} if hosts else {}), **more}


def hosts(*names: str, address: str = "127.0.0.1", **more: Any) -> dict[str, dict[str, Any]]:
    """[hosts.NAME] tables, all at `address` with the same `more` keys."""
    return {n: {"address": address, **more} for n in names}


def write(path: Path, **tables: Any) -> Path:
    """`toml(**tables)` written to `path`."""
    path.write_text(toml(**tables))
    return path
