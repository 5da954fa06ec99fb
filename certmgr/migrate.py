"""`certmgr store migrate`: copy a whole store between the state directory and PostgreSQL, either way.

Idempotent (what is already there with the same hash is left alone; a different one stops it),
version numbers kept, verified by hash after copying, and the source marked so it is not used
by mistake (certmgr.storeopen refuses a marked store). See docs/ha.md, "Migrating".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certmgr import orders
from certmgr.errors import StoreError
from certmgr.fsutil import atomic_write
from certmgr.material import CertMaterial
from certmgr.pgstore import PgStore
from certmgr.store import KEY_MODE, Store
from certmgr.storeopen import DB_MARK, DIR_MARK, moved_mark

ACTOR = "certmgr store migrate"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateReport:
    names: int
    versions_copied: int
    versions_present: int
    documents_copied: int
    accounts_copied: int
    audit_rows_copied: int
    verified_versions: int
    orders_copied: int = 0  # pending ACME orders, their keys unsealed from the source and sealed for the target
    orders_present: int = 0
    orders_unreadable: int = 0  # records the source itself could not open: not copied (ordered anew, as there)


def _digest(m: CertMaterial) -> str:
    return hashlib.sha256(m.cert + b"\0" + m.chain + b"\0" + m.privkey).hexdigest()


def _label(store: Store | PgStore) -> str:
    return str(store.root) if isinstance(store, Store) else store.where


def _json_paths(store: Store | PgStore) -> list[str]:
    """Every state document but pending orders (certmgr.orders): their key is sealed for one store only (or
    a 0600 file beside the record), so they are copied through `_copy_orders`, never as documents."""
    return [p for p in _all_json_paths(store) if not p.startswith(f"{orders.ORDERS_DIR}/")]


def _order_names(store: Store | PgStore) -> list[str]:
    """The certificates with a pending order record (state/orders/NAME/order.json)."""
    head, tail = f"{orders.ORDERS_DIR}/", "/order.json"
    return sorted(p[len(head):-len(tail)] for p in _all_json_paths(store)
                  if p.startswith(head) and p.endswith(tail) and "/" not in p[len(head):-len(tail)])


def _copy_orders(src: Store | PgStore, dst: Store | PgStore) -> tuple[int, int, int]:
    """Every pending order: opened with the source's key (or read from its 0600 file), written for the target
    (sealed with the target's key, or its own 0600 file), URL, CSR and creation time kept — so the next run
    on the target resumes it instead of ordering anew. A record the source cannot open is not copied (a run
    on the source would abandon it too); one the target holds differently stops the migration.
    Returns (copied, present, unreadable)."""
    copied = present = unreadable = 0
    for name in _order_names(src):
        try:
            order = orders.load(src, name)
        except StoreError:
            unreadable += 1
            continue
        if order is None:
            continue
        try:
            there = orders.load(dst, name)
        except StoreError:
            there = None  # unreadable at the target: the source's readable record replaces it
        if there == order:
            present += 1
            continue
        if there is not None:
            raise StoreError(f"store migrate {orders.order_path(name)}: a different pending order is already in "
                             f"{_label(dst)} (nothing overwritten)",
                             hint="the destination was used on its own since; let one side's run finish or "
                                  "abandon its order, then migrate again")
        orders.save(dst, order)
        copied += 1
    return copied, present, unreadable


def _all_json_paths(store: Store | PgStore) -> list[str]:
    if isinstance(store, PgStore):
        return [p for p in store.json_paths() if p != DB_MARK]
    out = []
    for top in ("state", "accounts"):
        base = store.root / top
        for path in sorted(base.rglob("*.json")) if base.is_dir() else []:
            rel = path.relative_to(store.root).as_posix()
            if not any(part.startswith(".") for part in rel.split("/")):
                out.append(rel)
    return out


def _account_ids(store: Store | PgStore) -> list[str]:
    if isinstance(store, PgStore):
        return store.account_ids()
    base = store.root / "accounts"
    return sorted(p.parent.name for p in base.glob("*/key.pem")) if base.is_dir() else []


def _canon(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, ensure_ascii=False)


def _append_audit(store: Store | PgStore, entries: list[dict[str, Any]]) -> None:
    if isinstance(store, PgStore):
        store.append_audit_entries(entries)
        return
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode()
    fd = os.open(store.root / "audit.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, KEY_MODE)
    try:
        os.write(fd, lines)
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_version(store: Store | PgStore, name: str, version: int, material: CertMaterial) -> None:
    if isinstance(store, PgStore):
        store.put_version(name, version, material)
    else:
        store.write_version(name, version, material)  # the directory store's own writer, number kept
        store.audit("copy_version", name, to=version, sha256=material.info().sha256)


def migrate(src: Store | PgStore, dst: Store | PgStore, *, now: dt.datetime) -> MigrateReport:
    """Copy everything from `src` to `dst` under both run locks, verify, mark `src` moved, unmark `dst`."""
    copied = present = docs = accounts = 0
    with src.lock(ACTOR), dst.lock(ACTOR):
        names = src.names()
        for name in names:
            have = set(dst.versions(name))
            for v in src.versions(name):
                material = src.read(name, v)
                if v in have:
                    if _digest(dst.read(name, v)) != _digest(material):
                        raise StoreError(f"store migrate {name}: version {v} differs between {_label(src)} and "
                                         f"{_label(dst)} (nothing overwritten)",
                                         hint="the destination was used on its own since; compare both and "
                                              "decide which holds the truth before migrating")
                    present += 1
                else:
                    _put_version(dst, name, v, material)
                    copied += 1
            live = src.live_version(name)
            if live is not None and dst.live_version(name) != live:
                dst.activate(name, live)
        for path in _json_paths(src):
            doc = src.load_json(path)
            if dst.load_json(path) != doc:
                dst.save_json(path, doc)
                docs += 1
        for ca_id in _account_ids(src):
            key = src.load_account_key(ca_id)
            there = dst.load_account_key(ca_id)
            if key is not None and there is None:
                dst.save_account_key(ca_id, key)
                accounts += 1
            elif key is not None and there != key:
                raise StoreError(f"store migrate accounts/{ca_id}: a different account key is already in "
                                 f"{_label(dst)} (kept; nothing overwritten)")
        orders_copied, orders_present, orders_unreadable = _copy_orders(src, dst)
        seen = {_canon(e) for e in dst.read_audit()}
        new_rows = [e for e in src.read_audit() if _canon(e) not in seen]
        _append_audit(dst, new_rows)
        verified = _verify(src, dst, names)
        _mark(src, to=_label(dst), now=now)
        _unmark(dst)
        dst.audit("store migrate", _label(dst), frm=_label(src), to=_label(dst), versions_copied=copied,
                  versions_present=present, verified_versions=verified, orders_copied=orders_copied,
                  orders_unreadable=orders_unreadable)
    return MigrateReport(names=len(names), versions_copied=copied, versions_present=present, documents_copied=docs,
                         accounts_copied=accounts, audit_rows_copied=len(new_rows), verified_versions=verified,
                         orders_copied=orders_copied, orders_present=orders_present,
                         orders_unreadable=orders_unreadable)


def _verify(src: Store | PgStore, dst: Store | PgStore, names: list[str]) -> int:
    """Every version's hash, every live pointer, document and account key read back from `dst` equals `src`'s."""
    count = 0
    for name in names:
        for v in src.versions(name):
            if _digest(src.read(name, v)) != _digest(dst.read(name, v)):
                raise StoreError(f"store migrate {name}: version {v} does not read back the same from "
                                 f"{_label(dst)} (source left unmarked, still in use)")
            count += 1
        if src.live_version(name) != dst.live_version(name):
            raise StoreError(f"store migrate {name}: live version differs after copying (source left unmarked)")
    for path in _json_paths(src):
        if src.load_json(path) != dst.load_json(path):
            raise StoreError(f"store migrate {path}: does not read back the same (source left unmarked)")
    for ca_id in _account_ids(src):
        if src.load_account_key(ca_id) != dst.load_account_key(ca_id):
            raise StoreError(f"store migrate accounts/{ca_id}: key does not read back the same (source left unmarked)")
    for name in _order_names(src):
        try:
            order = orders.load(src, name)
        except StoreError:
            continue  # not copied (counted unreadable)
        if order is not None and orders.load(dst, name) != order:
            raise StoreError(f"store migrate {orders.order_path(name)}: pending order does not read back the same "
                             "(source left unmarked)")
    return count


def _mark(store: Store | PgStore, *, to: str, now: dt.datetime) -> None:
    mark = moved_mark(to, now)
    if isinstance(store, PgStore):
        store.save_json(DB_MARK, mark)
    else:
        atomic_write(store.root / DIR_MARK, json.dumps(mark).encode() + b"\n", KEY_MODE)


def _unmark(store: Store | PgStore) -> None:
    if isinstance(store, PgStore):
        store.remove_json(DB_MARK)
    else:
        Path(store.root / DIR_MARK).unlink(missing_ok=True)
