"""The one store protocol: what the pipeline asks of a store, whichever engine keeps it.

Two implementations: `certmgr.store.Store` (the state directory, the embedded default) and
`certmgr.pgstore.PgStore` (PostgreSQL, for two controllers; docs/ha.md). tests/contract runs one
suite against both. Directory-only features (certbot import, the `root` path) are not part of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from certmgr.material import CertMaterial

KEY_MODE = 0o600  # the default `mode` of save_json; a database store ignores modes


class StateStore(Protocol):
    """Versioned certificates, the live pointer, JSON state, ACME account keys, the audit log, the run lock.

    Semantics every implementation keeps (pinned by tests/contract/test_store_contract.py):
    versions are numbered 1, 2, … per name and never rewritten; `activate` returns the previous
    live version; writers of versions and live hold `lock()`; `save_account_key` refuses to
    replace unless asked; `audit` refuses private key material; `read_audit` is oldest first.
    """

    # True: lock_cert/lock_pop are real locks across controllers (PostgreSQL), so on-call commands take
    # only those; False (the state directory): lock() is the one lock, the others yield None (no epoch)
    per_name_locks: bool

    def lock(self, actor: str, *, wait: float | None = None) -> AbstractContextManager[None]: ...

    def lock_cert(self, name: str, actor: str, *, wait: float | None = None) -> AbstractContextManager[int | None]: ...

    def lock_pop(self, host: str, actor: str, *, wait: float | None = None) -> AbstractContextManager[int | None]: ...

    @property
    def held(self) -> dict[str, int]: ...  # lock key -> epoch, of the locks this controller holds

    def names(self) -> list[str]: ...

    def versions(self, name: str) -> list[int]: ...

    def live_version(self, name: str) -> int | None: ...

    def read(self, name: str, version: int | None = None) -> CertMaterial: ...

    def add_version(self, name: str, material: CertMaterial) -> int: ...

    def activate(self, name: str, version: int) -> int | None: ...

    def prune(self, name: str, keep: int) -> list[int]: ...

    def load_state(self, name: str) -> dict[str, Any]: ...

    def save_state(self, name: str, state: dict[str, Any]) -> None: ...

    def load_json(self, relpath: str, default: Any = None) -> Any: ...

    def save_json(self, relpath: str, obj: Any, mode: int = KEY_MODE) -> None: ...

    def remove_json(self, relpath: str) -> None: ...

    def list_json(self, reldir: str, prefix: str = "") -> list[Any]: ...

    def load_account_key(self, ca_id: str) -> bytes | None: ...

    def save_account_key(self, ca_id: str, pem: bytes, *, replace: bool = False) -> None: ...

    def audit(self, action: str, obj: str, *, frm: Any = None, to: Any = None, actor: str | None = None,
              **extra: Any) -> None: ...

    def read_audit(self) -> Iterator[dict[str, Any]]: ...


def batched(store: Any, what: str, *, durable: bool = True) -> AbstractContextManager[None]:
    """The store's `batch(what)` (PostgreSQL: the block's writes in one transaction, one durable commit), or
    nothing for a store without one (the directory store: each write is its own atomic rename already).
    `durable` False: its commit need not wait for the disk (PgStore.batch)."""
    batch = getattr(store, "batch", None)
    if not callable(batch):
        return nullcontext()
    cm: AbstractContextManager[None] = batch(what) if durable else batch(what, durable=False)
    return cm
