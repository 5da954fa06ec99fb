"""Inventory checks: the file loads, the secrets it references can be read, the trust bundles parse."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

from certmgr.doctor.model import Check, Status, _n
from certmgr.errors import CertmgrError, InventoryError
from certmgr.inventory import Inventory


def check_inventory(path: Path) -> tuple[Check, Inventory | None]:
    """Load and validate the inventory; a failure lists every problem (the rest of doctor cannot run)."""
    from certmgr import inventory as inventory_mod

    try:
        inv = inventory_mod.load(path)
    except InventoryError as exc:
        return Check(group="inventory", name="inventory", subject=str(path), status=Status.FAIL,
                     message="; ".join(exc.problems),
                     hint="fix these, then rerun `certmgr doctor` (`certmgr inventory check` lists them too)"), None
    names = sum(len(c.domains) for c in inv.certificates)
    if inv.warnings:  # valid but risky settings, as `inventory check` prints them
        return Check(group="inventory", name="inventory", subject=str(path), status=Status.WARNING,
                     message="; ".join(inv.warnings),
                     hint="docs/inventory.md says why each matters (`certmgr inventory check` lists them too)"), inv
    return Check(group="inventory", name="inventory", subject=str(path), status=Status.OK,
                 message=f"{_n(len(inv.certificates), 'certificate')} ({_n(names, 'name')}), "
                         f"{_n(len(inv.hosts), 'host')}, {_n(len(inv.dns), 'DNS provider')}, {_n(len(inv.cas), 'CA')}, "
                         f"{_n(len(inv.channels), 'channel')}"), inv


def check_secrets(inv: Inventory, env: Mapping[str, str] | None = None) -> list[Check]:
    """Channel and EAB secret references can be read (TSIG secrets are checked with their key)."""
    refs = []
    for ch in inv.channels.values():
        for r in (ch.url, ch.token):
            if r is not None:
                refs.append(r)
    for ca in inv.cas.values():
        if ca.eab_hmac_key is not None:
            refs.append(ca.eab_hmac_key)
    out = []
    for r in refs:
        try:
            r.read(env)
        except CertmgrError as exc:
            out.append(Check(group="inventory", name="secret", subject=r.key_path, status=Status.FAIL,
                             message=exc.message, hint=exc.hint))
            continue
        out.append(Check(group="inventory", name="secret", subject=r.key_path, status=Status.OK,
                         message=f"readable ({r.describe()})"))
    return out


def check_trust(inv: Inventory) -> list[Check]:
    """Every trust bundle the inventory names (for served chains, for each CA's endpoint) holds PEM certificates."""
    paths: dict[Path, str] = {p: "defaults.trust" for p in inv.trust}
    for ca in inv.cas.values():
        if ca.trust is not None:
            paths.setdefault(ca.trust, f"ca.{ca.name}.trust")
    out = []
    for path, key in paths.items():
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except OSError as exc:
            out.append(Check(group="inventory", name="trust", subject=key, status=Status.FAIL,
                             message=f"cannot read {path}: {exc.strerror}", hint=f"fix {key} in the inventory"))
            continue
        except ValueError:
            out.append(Check(group="inventory", name="trust", subject=key, status=Status.FAIL,
                             message=f"{path} holds no PEM certificate", hint=f"fix {key} in the inventory"))
            continue
        out.append(Check(group="inventory", name="trust", subject=key, status=Status.OK,
                         message=f"{path}: {len(certs)} certificate(s)"))
    return out
