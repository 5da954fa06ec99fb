"""Store checks: the state directory exists, is a store and is writable; with [store], the shared PostgreSQL store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from certmgr.doctor.model import Check, Status, _StoreLike
from certmgr.errors import CertmgrError, StoreError
from certmgr.inventory import Inventory


def check_store(root: Path) -> tuple[Check, Any]:
    """The state directory exists, is a store, and is writable by this user (never created here)."""
    from certmgr.store import Store

    subject = str(root)
    try:
        store = Store.open(root, create=False)
    except StoreError as exc:
        if not root.exists():
            return Check(group="store", name="store", subject=subject, status=Status.WARNING,
                         message="does not exist: no account key and no certificates yet (the first renewal "
                                 "creates it)",
                         hint="if certmgr has run before, --state-dir / CERTMGR_STATE_DIR points at the wrong "
                              "place"), None
        return Check(group="store", name="store", subject=subject, status=Status.FAIL, message=exc.message,
                     hint=exc.hint), None
    if not os.access(root, os.W_OK) or not os.access(root / "state", os.W_OK):
        return Check(group="store", name="store", subject=subject, status=Status.FAIL,
                     message=f"not writable by uid {os.getuid()}: renew and deploy cannot record anything",
                     hint="run doctor as the user the certmgr service runs as"), store
    live = sum(1 for n in store.names() if _live_or_none(store, n) is not None)
    return Check(group="store", name="store", subject=subject, status=Status.OK,
                 message=f"writable; {live} certificate(s) live"), store


def _live_or_none(store: _StoreLike, name: str) -> int | None:
    try:
        return store.live_version(name)
    except CertmgrError:
        return None


def check_ha_store(inv: Inventory) -> tuple[list[Check], Any]:
    """[store]: PostgreSQL reachable, version ≥ 14, a real session (no transaction pooling), then the store opens.

    Returns the checks and the opened store (None if any check failed) for the checks that read it.
    """
    from certmgr import pgdoctor, storeopen

    assert inv.store is not None
    subject = inv.store.url.split("@")[-1]
    checks = [Check(group="store", name=f"postgres-{f.name}", subject=subject,
                    status=Status.FAIL if not f.ok else Status.WARNING if f.warning else Status.OK,
                    message=f.message, hint=f.hint) for f in pgdoctor.check(inv.store)]
    if any(c.status == Status.FAIL for c in checks):
        return checks, None
    try:
        store = storeopen.open_pg(inv.store)
        live = sum(1 for n in store.names() if store.live_version(n) is not None)
    except CertmgrError as exc:
        return [*checks, Check(group="store", name="store", subject=subject, status=Status.FAIL,
                               message=exc.message, hint=exc.hint)], None
    return [*checks, Check(group="store", name="store", subject=subject, status=Status.OK,
                           message=f"schema and store key ok; {live} certificate(s) live")], store
