"""The database lost mid-run: what the run still learns is spooled on local disk and replayed to it by the next run.

Once a call to the PostgreSQL store fails with StoreUnavailable or LockLost the store is *lost* for the rest of
the run: nothing that starts a side effect is written (a pending order, a deploy intent: those calls raise, so
no new order is placed and no new POP transaction starts), while the outcomes of work already under way —
audit rows, deploy results, settled intents, a renewal's failure and backoff state, notify state — go to
`<state dir>/spool/` (0700, one 0600 JSON file each, never a private key). The next run that opens the store
replays the spool before anything else, idempotently (audit rows carry their spool id; documents merge), and
audits `replayed`. The command then exits 69 with the count (cli.Group).
(`certmgr.spool` is unrelated: the scan's temporary record runs.)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certmgr import docmerge
from certmgr.errors import LockLost, StoreUnavailable
from certmgr.fsutil import atomic_write
from certmgr.log import event
from certmgr.store import PEM_PRIVATE_KEY, json_default

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
# Outcomes of work already done: kept when the database is gone. Anything else written after the loss raises.
MERGED_PREFIXES = ("state/deploy/",)  # documents merged key by key into the stored one on replay
REMOVED_PREFIXES = ("state/intents/",)  # a settled POP transaction's intent, removed on replay
# certmgr.docmerge documents the next run needs to stay correct: a renewal's failure and backoff (else the
# next run retries at once, without backoff) and what was notified (else it alerts again); merged on replay,
# so a newer write by the other controller since the loss stands. Scan results are not: the next scan
# writes them anew.
SPOOLED_MERGERS = ("renew", "notify")
_lost: list[Spooling] = []  # the stores lost in this process (cli.Group turns one into exit 69)


def reset() -> None:
    _lost.clear()


def lost_error() -> StoreUnavailable | None:
    """The error a command ends with when its store was lost mid-run (exit 69), None when it was not."""
    return _lost[0].error() if _lost else None


class Outbox:
    """`<state dir>/spool/`: one 0600 JSON file per record, named so that sorting replays them in order."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seq = 0  # orders records written within one clock tick

    def files(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def put(self, record: dict[str, Any]) -> Path:
        """Write one record durably (0600 in a 0700 directory); refuses private key material."""
        data = json.dumps(record, default=json_default, ensure_ascii=False, sort_keys=True)
        if PEM_PRIVATE_KEY.search(data):
            raise ValueError("spool: refusing to write private key material")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._seq += 1
        path = self.root / f"{record['at'].replace(':', '')}-{self._seq:06d}-{record['id']}.json"
        atomic_write(path, data.encode() + b"\n", 0o600)
        return path


def _merge(stored: Any, new: Any) -> Any:
    """`new` laid over `stored`, dictionaries merged key by key (replaying twice gives the same document)."""
    if isinstance(stored, dict) and isinstance(new, dict):
        if "at" in new and str(stored.get("at", "")) > str(new["at"]):
            return stored  # a newer outcome (another controller's, since the loss) wins over the spooled one
        return {**stored, **{k: _merge(stored.get(k), v) for k, v in new.items()}}
    return new


def replay(store: Any, outbox: Outbox) -> int:
    """Apply every spooled record to `store` (oldest first), each once, then delete it; audit `replayed`. How many.

    Idempotent: an audit row carries its spool id and is skipped when already there; documents merge; a file
    is deleted only after its record is in the database, so a crash mid-replay only repeats no-ops.
    """
    files = outbox.files()
    if not files:
        return 0
    done = {str(e["spool_id"]) for e in store.read_audit() if e.get("spool_id")}
    ids = []
    for path in files:
        rec = json.loads(path.read_text())
        if rec["kind"] == "audit" and rec["id"] not in done:
            store.audit(rec["action"], rec["object"], frm=rec.get("from"), to=rec.get("to"), actor=rec.get("actor"),
                        spool_id=rec["id"], spooled_at=rec["at"], **rec.get("extra", {}))
        elif rec["kind"] == "merge":
            store.save_json(rec["path"], _merge(store.load_json(rec["path"], default={}) or {}, rec["body"]))
        elif rec["kind"] == "merge_json":
            docmerge.merge_json(store, rec["path"], rec["body"], rec["merger"])
        elif rec["kind"] == "remove":
            store.remove_json(rec["path"])
        ids.append(rec["id"])
    store.audit("replayed", str(outbox.root), records=len(ids), ids=ids,
                summary=f"replayed {len(ids)} outcome(s) spooled while the database was lost")
    for path in files:
        path.unlink()
    event(log, logging.WARNING, "replayed outcomes spooled while the database was lost", records=len(ids),
          spool=str(outbox.root))
    return len(ids)


class Spooling:
    """The PostgreSQL store, which once lost spools outcomes instead of writing them (module docstring)."""

    def __init__(self, store: Any, outbox: Outbox, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self._store = store
        self.outbox = outbox
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.lost: StoreUnavailable | LockLost | None = None
        self.spooled = 0
        self._batch_thread: int | None = None  # the thread inside batch(): its writes are never spooled

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name in ("lock", "lock_cert", "lock_pop"):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check()
            try:
                return attr(*args, **kwargs)
            except (StoreUnavailable, LockLost) as exc:
                self._lose(exc)
                raise

        return guarded

    def __enter__(self) -> Spooling:
        return self

    def __exit__(self, *exc: object) -> None:
        self._store.close()

    def error(self) -> StoreUnavailable:
        where = getattr(self._store, "where", "database")
        cause = str(self.lost).removeprefix(f"store {where}: ")
        what = "lock lost" if isinstance(self.lost, LockLost) else "database lost"
        return StoreUnavailable(
            f"store {where}: {what} mid-run: {cause} (nothing more written to it: no new order, no new "
            f"POP transaction; {self.spooled} outcome(s) spooled to {self.outbox.root}, replayed by the next run "
            "that reaches the database)",
            hint="bring PostgreSQL back (or wait for the other controller); then `certmgr run` replays the spool "
                 "first — docs/runbook.md, \"Database lost mid-run\"")

    def _lose(self, exc: StoreUnavailable | LockLost) -> None:
        if self.lost is None:
            self.lost = exc
            _lost.append(self)
            event(log, logging.ERROR, "database lost mid-run: spooling outcomes, starting nothing new",
                  error=str(exc), spool=str(self.outbox.root))

    def _check(self) -> None:
        if self.lost is not None:
            where = getattr(self._store, "where", "database")
            raise StoreUnavailable(f"store {where}: not attempted: the database (or this controller's lock) was "
                                   "lost earlier in this run")

    def _spool(self, kind: str, **fields: Any) -> None:
        now = self._clock().astimezone(dt.UTC)
        self.outbox.put({"kind": kind, "id": secrets.token_hex(8), "at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                         **fields})
        self.spooled += 1

    def _write(self, call: Callable[[], None], kind: str, **fields: Any) -> None:
        if self._batch_thread == threading.get_ident():
            # inside a batch nothing is spooled: its writes commit together or not at all (a spooled audit row
            # would outlive the change it records, rolled back with the batch)
            self._check()
            try:
                call()
            except (StoreUnavailable, LockLost) as exc:
                self._lose(exc)
                raise
            return
        if self.lost is None:
            try:
                call()
                return
            except (StoreUnavailable, LockLost) as exc:
                self._lose(exc)
        self._spool(kind, **fields)

    def audit(self, action: str, obj: str, *, frm: Any = None, to: Any = None, actor: str | None = None,
              **extra: Any) -> None:
        self._write(lambda: self._store.audit(action, obj, frm=frm, to=to, actor=actor, **extra), "audit",
                    action=action, object=obj, **{"from": frm, "to": to, "actor": actor, "extra": extra})

    def save_json(self, relpath: str, obj: Any, mode: int = 0o600) -> None:
        if not relpath.startswith(MERGED_PREFIXES):
            self.__getattr__("save_json")(relpath, obj, mode)
            return
        self._write(lambda: self._store.save_json(relpath, obj, mode), "merge", path=relpath, body=obj)

    @contextmanager
    def batch(self, what: str, *, durable: bool = True) -> Iterator[None]:
        """The store's batch (one transaction); its commit failing loses the store like any other call."""
        self._check()
        if self._batch_thread == threading.get_ident():
            yield  # nested: the outer batch is the transaction
            return
        self._batch_thread = threading.get_ident()
        try:
            with self._store.batch(what, durable=durable):
                yield
        except (StoreUnavailable, LockLost) as exc:
            self._lose(exc)
            raise
        finally:
            self._batch_thread = None

    def merge_json(self, relpath: str, new: Any, merger: str) -> None:
        if merger not in SPOOLED_MERGERS:
            self._check()
            try:
                docmerge.merge_json(self._store, relpath, new, merger)
            except (StoreUnavailable, LockLost) as exc:
                self._lose(exc)
                raise
            return
        self._write(lambda: docmerge.merge_json(self._store, relpath, new, merger), "merge_json", path=relpath,
                    body=new, merger=merger)

    def remove_json(self, relpath: str) -> None:
        if not relpath.startswith(REMOVED_PREFIXES):
            self.__getattr__("remove_json")(relpath)
            return
        self._write(lambda: self._store.remove_json(relpath), "remove", path=relpath)


def wrap(store: Any, state_dir: Path) -> Spooling:
    """The store for a writing command: replay what an earlier run spooled (before anything else), then guard it."""
    outbox = Outbox(state_dir / SPOOL_DIR)
    replay(store, outbox)
    return Spooling(store, outbox)
