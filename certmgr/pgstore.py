"""The PostgreSQL store: the `StateStore` protocol on a database two controllers share (docs/ha.md).

Versions are immutable rows, `live` one row per certificate, private keys sealed (certmgr.sealing),
the audit log append-only (trigger + privileges). Locks are session advisory locks on one dedicated
connection (certmgr.pglocks); every write transaction first checks that the lock it needs is still
this controller's (the fence), so a controller that lost its lock writes nothing.
"""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from certmgr import docmerge
from certmgr.errors import StoreError, StoreUnavailable
from certmgr.material import CertMaterial
from certmgr.pglocks import LockSession
from certmgr.pgwatch import Watch, keepalives
from certmgr.sealing import Sealer
from certmgr.store import (  # one definition of names, paths and audit fields for both stores
    _AUDIT_KEYS,
    _REL_PART,
    _REL_ROOTS,
    PEM_PRIVATE_KEY,
    _check_ca_id,
    _check_version,
    check_name,
    json_default,
)

if TYPE_CHECKING:
    from certmgr.store import Store
    from certmgr.store_api import StateStore

    _directory_store_fits: type[StateStore] = Store  # mypy proves both stores keep one protocol

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WATCH_HINT = ("the run stops (exit 69); what it could not write is spooled and replayed by the next run; "
              "check the route to PostgreSQL (docs/ha.md)")
MIN_SERVER_VERSION = 140000  # idle_session_timeout (frees a paused holder's locks) and CREATE OR REPLACE TRIGGER
CALLS_ENV = "CERTMGR_BENCH_PG_CALLS"  # a file: at exit a process appends its transactions by call site
_SITE_NAME = re.compile(r"[^\s/]+\.[^\s/]+")  # a certificate, zone or file name in a `what`: one site for all
_URL_PASSWORD = re.compile(r"^[a-z]+://[^/@]*:[^/@]*@|[?&]password=", re.IGNORECASE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS certmgr_schema (version int NOT NULL);
CREATE TABLE IF NOT EXISTS certmgr_versions (
    name text NOT NULL, version int NOT NULL CHECK (version > 0),
    cert bytea NOT NULL, chain bytea NOT NULL, privkey bytea NOT NULL, key_id text NOT NULL,
    sha256 text NOT NULL, created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS certmgr_live (
    name text PRIMARY KEY, version int NOT NULL,
    FOREIGN KEY (name, version) REFERENCES certmgr_versions (name, version));
CREATE TABLE IF NOT EXISTS certmgr_json (
    path text PRIMARY KEY, body jsonb NOT NULL, updated timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS certmgr_accounts (
    ca_id text PRIMARY KEY, generation int NOT NULL, key bytea NOT NULL, key_id text NOT NULL);
CREATE TABLE IF NOT EXISTS certmgr_audit (
    id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), entry jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS certmgr_epochs (lock_key text PRIMARY KEY, epoch bigint NOT NULL, holder jsonb);
CREATE OR REPLACE FUNCTION certmgr_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'certmgr: % on % refused (its rows are never changed)', TG_OP, TG_TABLE_NAME; END $$;
CREATE OR REPLACE TRIGGER certmgr_versions_immutable BEFORE UPDATE ON certmgr_versions
    FOR EACH ROW EXECUTE FUNCTION certmgr_refuse();
CREATE OR REPLACE TRIGGER certmgr_audit_append_only BEFORE UPDATE OR DELETE ON certmgr_audit
    FOR EACH ROW EXECUTE FUNCTION certmgr_refuse();
CREATE OR REPLACE TRIGGER certmgr_audit_no_truncate BEFORE TRUNCATE ON certmgr_audit
    FOR EACH STATEMENT EXECUTE FUNCTION certmgr_refuse();
"""

# What the runtime role may do: versions are inserted and pruned, never updated; audit rows only
# inserted and read. The owner role (migrations) owns the tables; the runtime role owns nothing.
GRANTS = (
    "GRANT SELECT ON certmgr_schema TO {role}",
    "GRANT SELECT, INSERT, DELETE ON certmgr_versions TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON certmgr_live, certmgr_json TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON certmgr_accounts, certmgr_epochs TO {role}",
    "GRANT SELECT, INSERT ON certmgr_audit TO {role}",
    "GRANT USAGE ON SEQUENCE certmgr_audit_id_seq TO {role}",
)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _jsonable(obj: Any) -> Any:
    """`obj` as the directory store would write and read it back (datetimes as ISO strings)."""
    return json.loads(json.dumps(obj, default=json_default))


def check_url(url: str) -> str:
    """A store URL without a password in it (the password is a secret reference, never inventory text)."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise StoreError(f"store url {url.split('@')[-1]!r}: not a postgresql:// URL")
    if _URL_PASSWORD.search(url):
        raise StoreError("store url: contains a password",
                         hint="remove it from the URL; give it as [store] password_credential (or _file, _env)")
    return url


def connect(url: str, *, password: str | None, timeout: float, role: str = "store",
            bound: float | None = None) -> psycopg.Connection[Any]:
    """An autocommit connection; StoreUnavailable (exit 69) when the server cannot be reached. `bound`: TCP
    keepalives and tcp_user_timeout end a dead path within about that many seconds (certmgr.pgwatch)."""
    try:
        return psycopg.connect(check_url(url), password=password, connect_timeout=max(1, round(timeout)),
                               autocommit=True, application_name=f"certmgr-{role}",
                               **(keepalives(bound) if bound else {}))
    except psycopg.OperationalError as exc:
        where = url.split("@")[-1]
        raise StoreUnavailable(
            f"store {where}: cannot connect to PostgreSQL: {str(exc).strip().splitlines()[0]} "
            "(nothing done; certmgr never falls back to local state)",
            hint="check the database host and `certmgr doctor`; the other controller carries on if it can reach it",
        ) from exc


def install_schema(conn: psycopg.Connection[Any], *, runtime_role: str) -> None:
    """Create the tables, triggers and the runtime role's grants (idempotent; run as the owner role)."""
    with conn.transaction():
        conn.execute(SCHEMA)
        for grant in GRANTS:
            conn.execute(sql.SQL(grant).format(role=sql.Identifier(runtime_role)))
        if conn.execute("SELECT count(*) FROM certmgr_schema").fetchone() == (0,):
            conn.execute("INSERT INTO certmgr_schema (version) VALUES (%s)", (SCHEMA_VERSION,))


class PgStore:
    """A store in PostgreSQL. Construct with `PgStore.open`; `close()` (or `with`) releases both connections."""

    def __init__(self, conn: psycopg.Connection[Any], locks: LockSession, *, sealer: Sealer, where: str,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self._conn = conn
        self._locks = locks
        # every statement bounded client-side (a blackholed route): cut after the idle timeout, by when the
        # server has freed our locks anyway; the lock session then counts as lost (nothing more is sent)
        self._watch = Watch(conn, bound=locks.idle_timeout, where=where, role="data", on_cut=locks.mark_lost)
        self._sealer = sealer
        self._clock = clock
        self.where = where
        self._mutex = threading.RLock()  # one connection, several threads (scan, deploy): one transaction at a time
        self.commits = 0  # write transactions committed: counted by tests and benchmarks
        self.lazy_commits = 0  # … of which `batch(durable=False)`: not waited for on the WAL flush
        self._batch: psycopg.Cursor[Any] | None = None  # the open `batch()` transaction's cursor …
        self._batch_thread: int | None = None  # … of this thread only (others wait on the mutex)
        self._batch_fenced: set[str | bool] = set()  # fence checks already made in it
        self.calls: Counter[str] = Counter()  # transactions by kind and call site ("durable audit renewed *")
        if os.environ.get(CALLS_ENV):  # the CLI leaves its store to the process's exit: written then
            atexit.register(self._dump_calls, os.environ[CALLS_ENV])

    def __repr__(self) -> str:
        return f"PgStore({self.where!r})"

    @classmethod
    def open(cls, url: str, *, password: str | None, sealer: Sealer, timeout: float = 10.0,
             idle_timeout: float = 30.0, clock: Callable[[], dt.datetime] = _utcnow) -> PgStore:
        """Connect (data + lock connection), check the schema; StoreUnavailable when the server is down."""
        where = url.split("@")[-1]
        conn = connect(url, password=password, timeout=timeout, role="data", bound=idle_timeout)
        try:
            # a paused controller must not keep a transaction (and its row locks) open forever
            conn.execute(f"SET idle_in_transaction_session_timeout = '{int(idle_timeout * 1000)}ms'")
            try:
                row = conn.execute("SELECT version FROM certmgr_schema").fetchone()
            except psycopg.errors.UndefinedTable:
                row = None
            if row is None or row[0] != SCHEMA_VERSION:
                raise StoreError(f"store {where}: no certmgr schema (version {SCHEMA_VERSION}) in this database",
                                 hint="create it once as the owner role: `certmgr store init --url URL` (docs/ha.md)")
            locks = LockSession.open(url, password=password, timeout=timeout, idle_timeout=idle_timeout,
                                     clock=clock, where=where)
        except BaseException:
            conn.close()
            raise
        return cls(conn, locks, sealer=sealer, where=where, clock=clock)

    @property
    def sealer(self) -> Sealer:
        """Seals other private keys kept beside the store's own (certmgr.orders: a pending order's key)."""
        return self._sealer

    def _count(self, kind: str, what: str) -> None:
        self.calls[f"{kind} {_SITE_NAME.sub('*', what)}"] += 1

    def _dump_calls(self, path: str) -> None:
        """Counts and call sites only (names replaced by *), appended to `path`: benchmarks/hastore.py sums them."""
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(self.calls + self._locks.calls) + "\n")

    def close(self) -> None:
        self._locks.close()
        self._watch.close()
        self._conn.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, what: str, fence: str | bool = False) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction. `fence`: a certificate name (its lock or the run lock must still be ours), True
        (whatever locks this controller holds must still be ours), False (no check; several reads that
        must see one snapshot — a single read statement uses `_read`). Inside `batch()` on its thread:
        the batch's transaction (each distinct fence checked once in it). Nothing is sent once this
        controller's lock session is known or presumed lost while it holds a lock (LockSession.precheck)."""
        self._locks.precheck(what)
        if self._batch is not None and self._batch_thread == threading.get_ident():
            with self._db_errors(what):
                if fence is not False and fence not in self._batch_fenced:
                    self._check_fence(self._batch, fence, what)
                    self._batch_fenced.add(fence)
                yield self._batch
            return
        with self._db_errors(what), self._mutex, self._watch.statement(what), self._conn.transaction(), \
                self._conn.cursor() as cur:
            self._check_fence(cur, fence, what)
            yield cur
        self.commits += 1
        self._count("durable", what)

    def _check_fence(self, cur: psycopg.Cursor[Any], fence: str | bool, what: str) -> None:
        if fence is True:
            self._locks.fence_held(cur, what)
        elif isinstance(fence, str):
            self._locks.fence(cur, fence, what)

    @contextmanager
    def batch(self, what: str, *, durable: bool = True) -> Iterator[None]:
        """Every write this thread makes inside the block in ONE transaction: one durable commit instead of
        one per call, and all or nothing (an audit row commits with its change). Fenced writes check their
        lock once, in it (the epoch rows read FOR SHARE until the commit). Nested: joins the outer batch.
        Only for a sequence that lets a store error end it (a caught one would leave the transaction aborted).
        `durable` False: the commit does not wait for its WAL flush (`synchronous_commit = off`: a server crash
        may lose it, never half of it) — for a record something durable already covers (a deploy intent)."""
        if self._batch is not None and self._batch_thread == threading.get_ident():
            yield
            return
        self._locks.precheck(what)  # its BEGIN would wait for good on a blackholed route
        with self._db_errors(what), self._mutex, self._watch.statement(what), self._conn.transaction(), \
                self._conn.cursor() as cur:
            self._batch, self._batch_thread, self._batch_fenced = cur, threading.get_ident(), set()
            try:
                if not durable:
                    cur.execute("SET LOCAL synchronous_commit = off")
                yield
            finally:
                self._batch, self._batch_thread = None, None
        self.commits += 1
        self.lazy_commits += not durable
        self._count("durable" if durable else "lazy", what)

    @contextmanager
    def _read(self, what: str) -> Iterator[psycopg.Cursor[Any]]:
        """One read statement on its own: autocommit runs it in one round trip (no BEGIN and COMMIT, two more
        while every other thread waits for the connection) and it still sees one snapshot; never for writes.
        Not sent either once a held lock is presumed lost: on a blackholed route it would wait for TCP to give up."""
        self._locks.precheck(what, outcome="not read")
        with self._db_errors(what), self._mutex, self._watch.statement(what), self._conn.cursor() as cur:
            yield cur
        self._count("read", what)

    @contextmanager
    def _db_errors(self, what: str) -> Iterator[None]:
        """A lost connection is StoreUnavailable (exit 69, nothing written); any other database error a StoreError."""
        try:
            yield
        except psycopg.OperationalError as exc:
            cause = self._watch.cut or str(exc).strip().splitlines()[0]
            raise StoreUnavailable(f"store {self.where}: {what}: database connection lost: {cause} (not written)",
                                   hint=WATCH_HINT) from exc
        except psycopg.Error as exc:
            raise StoreError(f"store {self.where}: {what}: {str(exc).strip().splitlines()[0]}") from exc

    # ------------------------------------------------------------------ locks

    @contextmanager
    def lock(self, actor: str, *, wait: float | None = None) -> Iterator[None]:
        """The run lock (one holder across every controller); see LockSession.hold."""
        with self._locks.hold("run", None, actor, wait=wait):
            yield

    @property
    def held(self) -> dict[str, int]:
        """The locks this controller holds now and their epochs (fencing tokens)."""
        return self._locks.held()

    per_name_locks = True  # on-call commands take only their certificates' locks (certmgr.halocks)

    def lock_cert(self, name: str, actor: str, *, wait: float | None = None) -> AbstractContextManager[int]:
        """The lock of one certificate (`renew NAME` while another controller's run handles others); its epoch."""
        return self._locks.hold("cert", check_name(name), actor, wait=wait)

    def lock_pop(self, host: str, actor: str, *, wait: float | None = None) -> AbstractContextManager[int]:
        """The lock of one POP's transaction; yields its epoch (the fencing token for the POP side)."""
        return self._locks.hold("pop", host, actor, wait=wait)

    # ------------------------------------------------------------------ versions

    def names(self) -> list[str]:
        with self._read("list names") as cur:
            return [r[0] for r in cur.execute("SELECT DISTINCT name COLLATE \"C\" FROM certmgr_versions ORDER BY 1")]

    def versions(self, name: str) -> list[int]:
        with self._read(f"list versions of {name}") as cur:
            rows = cur.execute("SELECT version FROM certmgr_versions WHERE name = %s ORDER BY version",
                               (check_name(name),))
            return [r[0] for r in rows]

    def live_version(self, name: str) -> int | None:
        with self._read(f"read live {name}") as cur:
            row = cur.execute("SELECT version FROM certmgr_live WHERE name = %s", (check_name(name),)).fetchone()
        return None if row is None else int(row[0])

    def read(self, name: str, version: int | None = None) -> CertMaterial:
        """The material of `version` (the live one when None), read in one statement (never two versions)."""
        check_name(name)
        with self._read(f"read {name}") as cur:
            if version is None:
                row = cur.execute(
                    "SELECT v.version, cert, chain, privkey, key_id FROM certmgr_live l "
                    "JOIN certmgr_versions v USING (name, version) WHERE l.name = %s", (name,)).fetchone()
                if row is None:
                    raise StoreError(f"store {name}: no live version", hint="issue or import the certificate first")
            else:
                row = cur.execute("SELECT version, cert, chain, privkey, key_id FROM certmgr_versions "
                                  "WHERE name = %s AND version = %s", (name, _check_version(version))).fetchone()
                if row is None:
                    raise StoreError(f"store {name}: version {version} does not exist")
        v, cert, chain, sealed, key_id = row
        privkey = self._sealer.open(key_id, bytes(sealed), table="versions", name=name, version=v)
        return CertMaterial(cert=bytes(cert), chain=bytes(chain), privkey=privkey)

    def add_version(self, name: str, material: CertMaterial) -> int:
        """Insert `material` as version max + 1 with its audit row, in one fenced transaction; not made live."""
        check_name(name)
        material.check()
        info = material.info()
        with self._tx(f"add a version of {name}", fence=name) as cur:
            row = cur.execute("SELECT coalesce(max(version), 0) + 1 FROM certmgr_versions WHERE name = %s",
                              (name,)).fetchone()
            version = int(row[0]) if row else 1
            self._insert_version(cur, name, version, material)
            self._audit(cur, "add_version", name, to=version, serial=info.serial, sha256=info.sha256,
                        not_after=info.not_after)
        return version

    def _insert_version(self, cur: psycopg.Cursor[Any], name: str, version: int, material: CertMaterial) -> None:
        key_id, sealed = self._sealer.seal(material.privkey, table="versions", name=name, version=version)
        cur.execute("INSERT INTO certmgr_versions (name, version, cert, chain, privkey, key_id, sha256) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (name, version, material.cert, material.chain, sealed, key_id,
                     hashlib.sha256(material.fullchain).hexdigest()))

    def activate(self, name: str, version: int) -> int | None:
        """Point live at `version` (one row) with its audit row; return the previous one."""
        check_name(name)
        _check_version(version)
        with self._tx(f"activate {name} v{version}", fence=name) as cur:
            if cur.execute("SELECT 1 FROM certmgr_versions WHERE name = %s AND version = %s",
                           (name, version)).fetchone() is None:
                raise StoreError(f"store {name}: cannot activate version {version}: it does not exist "
                                 "(live version unchanged)")
            row = cur.execute("SELECT version FROM certmgr_live WHERE name = %s FOR UPDATE", (name,)).fetchone()
            previous = None if row is None else int(row[0])
            if previous == version:
                return previous
            cur.execute("INSERT INTO certmgr_live (name, version) VALUES (%s, %s) "
                        "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version", (name, version))
            self._audit(cur, "activate", name, frm=previous, to=version)
        return previous

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete all but the `keep` newest versions, never the live one, with the audit row, in one transaction."""
        check_name(name)
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        with self._tx(f"prune {name}", fence=name) as cur:
            versions = [r[0] for r in cur.execute(
                "SELECT version FROM certmgr_versions WHERE name = %s ORDER BY version", (name,))]
            kept = set(versions[-keep:] if keep else [])
            live = cur.execute("SELECT version FROM certmgr_live WHERE name = %s", (name,)).fetchone()
            if live is not None:
                kept.add(int(live[0]))
            doomed = [v for v in versions if v not in kept]
            if doomed:
                cur.execute("DELETE FROM certmgr_versions WHERE name = %s AND version = ANY(%s)", (name, doomed))
                self._audit(cur, "prune", name, removed=doomed, kept=sorted(kept))
        return doomed

    def put_version(self, name: str, version: int, material: CertMaterial) -> None:
        """Insert `material` as exactly `version` (migration keeps numbers), with its audit row; fenced."""
        check_name(name)
        _check_version(version)
        material.check()
        with self._tx(f"copy {name} v{version}", fence=name) as cur:
            self._insert_version(cur, name, version, material)
            self._audit(cur, "copy_version", name, to=version, sha256=material.info().sha256)

    def json_paths(self) -> list[str]:
        """Every JSON document's path (migration)."""
        with self._read("list documents") as cur:
            return [r[0] for r in cur.execute("SELECT path COLLATE \"C\" FROM certmgr_json ORDER BY 1")]

    def account_ids(self) -> list[str]:
        with self._read("list accounts") as cur:
            return [r[0] for r in cur.execute("SELECT ca_id COLLATE \"C\" FROM certmgr_accounts ORDER BY 1")]

    def append_audit_entries(self, entries: list[dict[str, Any]]) -> None:
        """Append whole audit entries as they are (migration from another store), in one transaction."""
        with self._tx("copy audit rows") as cur:
            for entry in entries:
                line = json.dumps(entry, ensure_ascii=False)
                if PEM_PRIVATE_KEY.search(line):
                    raise ValueError("audit: refusing to copy private key material")
                cur.execute("INSERT INTO certmgr_audit (entry) VALUES (%s)", (Jsonb(entry),))

    # ------------------------------------------------------------------ JSON state

    def load_state(self, name: str) -> dict[str, Any]:
        state = self.load_json(f"state/{check_name(name)}.json", default={})
        if not isinstance(state, dict):
            raise StoreError(f"store {name}: state/{name}.json does not hold a JSON object")
        return state

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        self.save_json(f"state/{check_name(name)}.json", state)

    def load_json(self, relpath: str, default: Any = None) -> Any:
        with self._read(f"read {relpath}") as cur:
            row = cur.execute("SELECT body FROM certmgr_json WHERE path = %s", (_check_rel(relpath),)).fetchone()
        return default if row is None else row[0]

    def save_json(self, relpath: str, obj: Any, mode: int = 0o600) -> None:
        """Replace the document at `relpath` (`mode` is a directory-store notion and is ignored)."""
        body = Jsonb(_jsonable(obj))
        with self._tx(f"write {relpath}", fence=True) as cur:
            cur.execute("INSERT INTO certmgr_json (path, body) VALUES (%s, %s) ON CONFLICT (path) "
                        "DO UPDATE SET body = EXCLUDED.body, updated = now()", (_check_rel(relpath), body))

    def merge_json(self, relpath: str, new: Any, merger: str) -> None:
        """Merge `new` into the document at `relpath` (certmgr.docmerge): read, merge and write in one transaction
        under a transaction advisory lock on the path, so two controllers' merges of one document never lose one."""
        path = _check_rel(relpath)
        field = docmerge.NEWER_FIELDS.get(merger)
        if field is not None and isinstance(new, dict) and docmerge.is_time(new.get(field)):
            # the newer document wins whole: one conditional upsert (the row lock orders two writers), no read
            with self._tx(f"write {relpath}", fence=True) as cur:
                cur.execute(
                    "INSERT INTO certmgr_json (path, body) VALUES (%s, %s) ON CONFLICT (path) DO UPDATE "
                    "SET body = EXCLUDED.body, updated = now() WHERE certmgr_json.body IS DISTINCT FROM EXCLUDED.body "
                    "AND (jsonb_typeof(certmgr_json.body -> %s) IS DISTINCT FROM 'string' "
                    "OR (certmgr_json.body ->> %s) !~ %s "
                    "OR (certmgr_json.body ->> %s)::timestamptz <= (EXCLUDED.body ->> %s)::timestamptz)",
                    (path, Jsonb(_jsonable(new)), field, field, docmerge.ISO_RE, field, field))
            return
        with self._tx(f"write {relpath}", fence=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (docmerge.DOC_LOCK_CLASS, path))
            # a statement of its own: in READ COMMITTED it sees what a merge that held the lock committed
            row = cur.execute("SELECT body FROM certmgr_json WHERE path = %s", (path,)).fetchone()
            doc = docmerge.apply(merger, None if row is None else row[0], _jsonable(new))
            if doc is not docmerge.UNCHANGED:
                cur.execute("INSERT INTO certmgr_json (path, body) VALUES (%s, %s) ON CONFLICT (path) "
                            "DO UPDATE SET body = EXCLUDED.body, updated = now()", (path, Jsonb(doc)))

    def remove_json(self, relpath: str) -> None:
        with self._tx(f"remove {relpath}", fence=True) as cur:
            cur.execute("DELETE FROM certmgr_json WHERE path = %s", (_check_rel(relpath),))

    def list_json(self, reldir: str, prefix: str = "") -> list[Any]:
        base = _check_rel(reldir).rstrip("/") + "/"
        with self._read(f"list {reldir}") as cur:
            rows = cur.execute("SELECT path, body FROM certmgr_json WHERE starts_with(path, %s) "
                               "AND path LIKE '%%.json' ORDER BY path COLLATE \"C\"", (base + prefix,))
            # with a prefix, only the documents right under reldir (as the directory store)
            return [r[1] for r in rows if not prefix or "/" not in r[0][len(base):]]

    # ------------------------------------------------------------------ ACME account keys

    def load_account_key(self, ca_id: str) -> bytes | None:
        with self._read(f"read account {ca_id}") as cur:
            row = cur.execute("SELECT generation, key, key_id FROM certmgr_accounts WHERE ca_id = %s",
                              (_check_ca_id(ca_id),)).fetchone()
        if row is None:
            return None
        generation, sealed, key_id = row
        return self._sealer.open(key_id, bytes(sealed), table="accounts", name=ca_id, version=generation)

    def save_account_key(self, ca_id: str, pem: bytes, *, replace: bool = False) -> None:
        """Save the account key sealed; refuses to replace one unless `replace` (shared by every controller)."""
        _check_ca_id(ca_id)
        with self._tx(f"write account {ca_id}", fence=True) as cur:
            row = cur.execute("SELECT generation FROM certmgr_accounts WHERE ca_id = %s FOR UPDATE",
                              (ca_id,)).fetchone()
            if row is not None and not replace:
                raise StoreError(f"store accounts/{ca_id}: an account key already exists (kept)",
                                 hint="every controller shares it; delete its row first only to start a new account")
            generation = 1 if row is None else int(row[0]) + 1
            key_id, sealed = self._sealer.seal(pem, table="accounts", name=ca_id, version=generation)
            cur.execute("INSERT INTO certmgr_accounts (ca_id, generation, key, key_id) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (ca_id) DO UPDATE SET generation = EXCLUDED.generation, key = EXCLUDED.key, "
                        "key_id = EXCLUDED.key_id", (ca_id, generation, sealed, key_id))

    # ------------------------------------------------------------------ audit log

    def audit(self, action: str, obj: str, *, frm: Any = None, to: Any = None, actor: str | None = None,
              **extra: Any) -> None:
        """Insert one audit row (its own transaction; version writes insert theirs in their own)."""
        with self._tx(f"audit {action} {obj}", fence=True) as cur:
            self._audit(cur, action, obj, frm=frm, to=to, actor=actor, **extra)

    def _audit(self, cur: psycopg.Cursor[Any], action: str, obj: str, *, frm: Any = None, to: Any = None,
               actor: str | None = None, **extra: Any) -> None:
        clash = sorted(set(extra) & set(_AUDIT_KEYS))
        if clash:
            raise ValueError(f"audit(): reserved keys {clash}")
        entry = {"time": self._clock().astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "actor": actor if actor is not None else self._locks.actor, "action": action, "object": obj,
                 "from": frm, "to": to, **extra}
        line = json.dumps(entry, default=json_default, ensure_ascii=False)
        if PEM_PRIVATE_KEY.search(line):
            raise ValueError("audit(): refusing to log private key material")
        cur.execute("INSERT INTO certmgr_audit (entry) VALUES (%s)", (Jsonb(json.loads(line)),))

    def read_audit(self) -> Iterator[dict[str, Any]]:
        with self._read("read the audit log") as cur:
            rows = [r[0] for r in cur.execute("SELECT entry FROM certmgr_audit ORDER BY id")]
        yield from (r for r in rows if isinstance(r, dict))


def _check_rel(relpath: str) -> str:
    parts = relpath.split("/")
    if parts[-1] == "" and len(parts) > 2:
        parts = parts[:-1]
    if parts[0] not in _REL_ROOTS or len(parts) < 2 or not all(
            _REL_PART.fullmatch(p) and ".." not in p for p in parts[1:]):
        raise StoreError(f"store: {relpath!r} is not a state path",
                         hint=f"use a relative path under {' or '.join(_REL_ROOTS)}/ without '..' or hidden names")
    return "/".join(parts)
