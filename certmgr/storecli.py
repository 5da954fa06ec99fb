"""`certmgr store …`: set up the PostgreSQL store and move between it and the state directory (docs/ha.md)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import click

from certmgr.errors import UsageError


@click.group("store")
def store_group() -> None:
    """The shared PostgreSQL store: key, schema, migration (docs/ha.md)."""


@store_group.command("keygen")
@click.argument("key_id")
def keygen(key_id: str) -> None:
    """Print a new sealing key line (KEYID BASE64) for the store key credential; put it FIRST to rotate."""
    from certmgr.sealing import Sealer

    click.echo(Sealer.keygen(key_id), nl=False)


@store_group.command("init")
@click.option("--url", "url", required=True, help="Owner role's URL (password from PGPASSWORD or ~/.pgpass).")
@click.option("--runtime-role", required=True, help="The role certmgr runs as (gets INSERT/SELECT on the audit log).")
def init(url: str, runtime_role: str) -> None:
    """Create the tables, triggers and grants as the owner role (idempotent)."""
    from certmgr.pgstore import connect, install_schema

    with connect(url, password=None, timeout=10, role="init") as conn:
        install_schema(conn, runtime_role=runtime_role)
    click.echo(f"store {url.split('@')[-1]}: schema ready; runtime role {runtime_role}")


def _side(c: Any, where: str, *, source: bool) -> Any:
    from certmgr import storeopen
    from certmgr.store import Store

    if where.startswith(("postgresql://", "postgres://")):
        cfg = storeopen.configured(c.inventory_path)
        if cfg is None:
            raise UsageError(f"store migrate: {where.split('@')[-1]} needs the inventory's [store] "
                             "(password and key_* for the sealing key)", hint="see docs/ha.md, 'Migrating'")
        return storeopen.open_pg(cfg, url=where, check_moved=False)
    path = Path(where)
    if source:
        return Store.open(path, create=False)
    return Store.open(path)


@store_group.command("migrate")
@click.option("--from", "src", required=True, metavar="DIR|URL", help="The store to copy from.")
@click.option("--to", "dst", required=True, metavar="DIR|URL", help="The store to copy to.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def migrate_cmd(c: Any, src: str, dst: str, as_json: bool) -> None:
    """Copy a whole store (versions with numbers, live, state, pending orders, accounts, audit), verify, mark it."""
    from certmgr.migrate import migrate

    is_db = [w.startswith(("postgresql://", "postgres://")) for w in (src, dst)]
    if is_db[0] == is_db[1]:
        raise UsageError("store migrate: give one directory and one postgresql:// URL")
    a = _side(c, src, source=True)
    try:
        b = _side(c, dst, source=False)
        try:
            report = migrate(a, b, now=dt.datetime.now(dt.UTC))
        finally:
            if hasattr(b, "close"):
                b.close()
    finally:
        if hasattr(a, "close"):
            a.close()
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        click.echo(f"store migrate: {report.names} certificates, {report.versions_copied} versions copied, "
                   f"{report.versions_present} already there, {report.verified_versions} verified by hash, "
                   f"{report.documents_copied} documents, {report.accounts_copied} account keys, "
                   f"{report.audit_rows_copied} audit rows, {report.orders_copied} pending orders "
                   f"({report.orders_present} already there, {report.orders_unreadable} unreadable, not copied); "
                   f"{src.split('@')[-1]} is marked moved")
