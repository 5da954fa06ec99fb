"""Locks across controllers: PostgreSQL session advisory locks on one dedicated connection, with epochs.

The server frees a lock when its session ends — a killed controller, or a paused one whose session
`idle_session_timeout` closed because its heartbeat stopped; no client clocks are compared. Each
acquisition bumps the lock's epoch (row in certmgr_epochs, same transaction), the fencing token; a
write transaction re-reads the epoch FOR SHARE and checks pg_locks, so a holder that lost its lock
writes nothing, and a newer holder's bump waits until such a write is committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from certmgr.errors import LockHeld, LockLost, StoreError
from certmgr.pgwatch import Watch

logger = logging.getLogger(__name__)

# pg_advisory_lock(int4, int4): first key says which kind of lock (certmgr's range), second the object
KINDS = {"run": 0x43D0001, "cert": 0x43D0002, "pop": 0x43D0003}


def lock_key(kind: str, name: str | None) -> str:
    return kind if name is None else f"{kind}:{name}"


class LockSession:
    """The dedicated lock connection of one controller, its heartbeat, and the locks it holds."""

    def __init__(self, conn: psycopg.Connection[Any], *, where: str, idle_timeout: float,
                 clock: Callable[[], dt.datetime]) -> None:
        self._conn = conn
        self._where = where
        self._clock = clock
        self._held: dict[str, int] = {}  # lock key -> epoch
        self.calls: Counter[str] = Counter()  # transactions by kind and lock kind (PgStore.calls)
        # takes and releases run in worker threads (certmgr.halocks): one transaction on the connection at a time
        self._mutex = threading.Lock()
        self._actor: str | None = None
        self._lost: str | None = None
        self._idle = idle_timeout
        self._beat_since: float | None = None  # monotonic time the heartbeat in flight was sent
        # every statement on this connection bounded client-side: cut after idle_timeout without an answer
        self._watch = Watch(conn, bound=idle_timeout, where=where, role="locks",
                            on_cut=lambda why: self.mark_lost(why, prefix="lock session silent"))
        with self._watch.statement("read the lock session's backend"):
            self.backend_pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(idle_timeout / 3,), daemon=True,
                                      name="certmgr-pg-heartbeat")
        self._beat.start()

    @classmethod
    def open(cls, url: str, *, password: str | None, timeout: float, idle_timeout: float,
             clock: Callable[[], dt.datetime], where: str) -> LockSession:
        from certmgr.pgstore import connect  # one place that turns a refused connection into exit 69

        conn = connect(url, password=password, timeout=timeout, role="locks", bound=idle_timeout)
        try:
            # PostgreSQL ≥ 14: the server ends this session when it is idle this long (no heartbeat:
            # the process is stopped or wedged), and with it every advisory lock it holds. Idle inside a
            # transaction too: a take is one (worker threads), and a pause there is not "idle" to the first.
            ms = int(idle_timeout * 1000)
            conn.execute(f"SET idle_session_timeout = '{ms}ms'")
            conn.execute(f"SET idle_in_transaction_session_timeout = '{ms}ms'")
            return cls(conn, where=where, idle_timeout=idle_timeout, clock=clock)
        except BaseException:
            conn.close()
            raise

    def _check_alive(self) -> None:
        """A heartbeat unanswered for the idle timeout (a blackholed connection sends no error): treat it as lost.

        The server ends our session after the same time without traffic, so the lock may already be
        another controller's; only this process's own monotonic clock is used.
        """
        since = self._beat_since
        if since is not None and not self._lost and time.monotonic() - since > self._idle:
            self._lost = f"lock session silent: heartbeat unanswered for more than {self._idle:g}s"
            logger.error("store %s: %s; held locks %s are presumed gone", self._where, self._lost, sorted(self._held))

    @property
    def idle_timeout(self) -> float:
        return self._idle

    def mark_lost(self, why: str, *, prefix: str = "connection to the database silent") -> None:
        """A statement of this controller went unanswered past its bound (certmgr.pgwatch cut it): the held
        locks are presumed gone, and nothing more is sent (`precheck`)."""
        if not self._lost:
            self._lost = f"{prefix}: {why}"
            logger.error("store %s: %s; held locks %s are presumed gone", self._where, self._lost, sorted(self._held))

    @property
    def actor(self) -> str | None:
        return self._actor

    def held(self) -> dict[str, int]:
        return dict(self._held)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=5)
        self._watch.close()
        self._conn.close()  # the server releases whatever is still held

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._beat_since = time.monotonic()
                with self._watch.statement("heartbeat"):
                    self._conn.execute("SELECT 1")
                self._beat_since = None
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    cut = self._watch.cut  # the watch cut it: say why, not libpq's "server closed the connection"
                    self._lost = self._lost or (f"lock session silent: {cut}" if cut else
                                                f"lock session ended: {str(exc).strip().splitlines()[0]}")
                    logger.error("store %s: %s; held locks %s are gone", self._where, self._lost,
                                 sorted(self._held))
                return

    @contextmanager
    def hold(self, kind: str, name: str | None, actor: str, *, wait: float | None = None) -> Iterator[int]:
        """Hold lock (kind, name) for the `with` block, yielding its new epoch; LockHeld if another holds it."""
        key = lock_key(kind, name)
        if key in self._held:
            raise RuntimeError(f"store {self._where}: {key} is already held by this controller (not re-entrant)")
        self._check_alive()
        if self._lost:
            raise LockLost(f"store {self._where}: {self._lost} (nothing more written)",
                           hint="the run stops; the next run (here or on the other controller) takes over")
        deadline = time.monotonic() + wait if wait else None
        args = (KINDS[kind], key)
        while True:
            epoch = self._try(key, args, actor)
            if epoch is not None:
                break
            remaining = deadline - time.monotonic() if deadline is not None else 0.0
            if remaining <= 0:
                raise self._held_by(key, wait)
            time.sleep(min(0.1, remaining))  # advisory locks have no timed wait; bounded by `wait`
        self._held[key] = epoch
        # the first holder's actor names audit rows until nothing is held: holds of one controller may
        # end in any order (a run's certificate and POP locks are taken and released by concurrent tasks)
        self._actor = self._actor or actor
        try:
            yield epoch
        finally:
            del self._held[key]
            if not self._held:
                self._actor = None
            self._release(key, args)

    def _release(self, key: str, args: tuple[int, str]) -> None:
        """Unlock `key`, waiting at most idle_timeout: a silent (blackholed) session would block it for good.

        Nothing is sent once the session is known or presumed lost (its end releases the lock). An unlock
        left waiting marks the session lost, so that a late unlock can never release a later hold of the key.
        """
        self._check_alive()
        if self._lost:
            logger.warning("store %s: %s not released (%s); its session's end releases it", self._where, key,
                           self._lost)
            return
        failed: list[str] = []

        def unlock() -> None:
            try:
                with self._mutex, self._watch.statement(f"release {key}"):
                    self._conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", args)
                self.calls[f"lock release {key.split(':')[0]}"] += 1
            except psycopg.Error as exc:
                failed.append(str(exc).strip().splitlines()[0])

        worker = threading.Thread(target=unlock, daemon=True, name="certmgr-pg-unlock")
        worker.start()
        worker.join(self._idle)
        if worker.is_alive():
            self._lost = self._lost or f"lock session silent: releasing {key} unanswered for {self._idle:g}s"
            logger.error("store %s: %s; held locks %s are presumed gone", self._where, self._lost, sorted(self._held))
        elif failed:
            logger.warning("store %s: could not release %s (%s); its session's end releases it", self._where,
                           key, failed[0])

    def _try(self, key: str, args: tuple[int, str], actor: str) -> int | None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "actor": actor,
                  "started": self._clock().isoformat(timespec="seconds"), "backend": self.backend_pid}
        try:
            with self._mutex, self._watch.statement(f"take {key}"), self._conn.transaction():
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", args).fetchone()
                self.calls[f"lock try {key.split(':')[0]}"] += 1
                if not row or not row[0]:
                    return None
                try:
                    bumped = self._conn.execute(
                        "INSERT INTO certmgr_epochs (lock_key, epoch, holder) VALUES (%s, 1, %s) "
                        "ON CONFLICT (lock_key) DO UPDATE SET epoch = certmgr_epochs.epoch + 1, "
                        "holder = EXCLUDED.holder RETURNING epoch", (key, Jsonb(holder))).fetchone()
                except BaseException:
                    self._conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", args)  # session-level
                    raise
        except psycopg.OperationalError as exc:
            cause = self._watch.cut or str(exc).strip().splitlines()[0]
            raise LockLost(f"store {self._where}: taking {key}: database connection lost: {cause} (nothing done)",
                           hint="the run stops; the next run (here or on the other controller) takes over") from exc
        except psycopg.Error as exc:
            raise StoreError(f"store {self._where}: taking {key}: {str(exc).strip().splitlines()[0]}") from exc
        assert bumped is not None
        return int(bumped[0])

    def _held_by(self, key: str, wait: float | None) -> LockHeld:
        try:
            with self._mutex, self._watch.statement(f"read the holder of {key}"):
                row = self._conn.execute("SELECT holder FROM certmgr_epochs WHERE lock_key = %s", (key,)).fetchone()
            holder = row[0] if row else None
        except psycopg.Error:
            holder = None
        waited = f" (gave up after {wait:g}s)" if wait else ""
        if not isinstance(holder, dict):
            return LockHeld(f"store {self._where}: {key} is held by another controller (holder not recorded){waited}")
        pid = int(holder.get("pid", 0)) or None
        return LockHeld(f"store {self._where}: {key} is held by pid {pid} on {holder.get('host')} "
                        f"({holder.get('actor')}, started {holder.get('started')}){waited}",
                        pid=pid, started=str(holder.get("started")))

    def precheck(self, what: str, *, outcome: str = "not written") -> None:
        """Before a statement is even sent: refuse if a held lock is known (or presumed) lost.

        A blackholed connection would hang on BEGIN (or a read); this refuses without sending anything.
        """
        self._check_alive()
        if self._lost and self._held:
            raise LockLost(f"store {self._where}: {what}: {self._lost} ({outcome})",
                           hint="the run stops; the next run (here or on the other controller) takes over")

    def fence_held(self, cur: psycopg.Cursor[Any], what: str) -> None:
        """Inside a write transaction: if this controller holds any lock, refuse unless all are still ours.

        State documents, account keys and audit rows are written with or without a lock (notify state,
        `audit` from read-only commands); once a lock was taken and lost, nothing more is written.
        """
        self._check_alive()
        held = dict(self._held)  # a snapshot: other tasks of this controller take and release locks meanwhile
        if self._lost and held:
            raise LockLost(f"store {self._where}: {what}: {self._lost} (not written)")
        self._check(cur, sorted(held), what, held)

    def fence(self, cur: psycopg.Cursor[Any], name: str | None, what: str) -> None:
        """Inside a write transaction: refuse unless the run lock or `name`'s lock is still this controller's.

        Still ours = the advisory lock is granted to our lock session (pg_locks) and its epoch is
        the one we got (read FOR SHARE: a newer holder's bump waits for this transaction).
        """
        held = dict(self._held)
        keys = [k for k in ("run", lock_key("cert", name) if name else None) if k and k in held]
        if not keys:
            raise RuntimeError(f"store {self._where}: {what} writes versions or live: hold lock() "
                               f"or lock_cert({name!r})")
        self._check_alive()
        if self._lost:
            raise LockLost(f"store {self._where}: {what}: {self._lost} (not written)")
        self._check(cur, keys, what, held)

    def _check(self, cur: psycopg.Cursor[Any], keys: list[str], what: str, held: dict[str, int]) -> None:
        """Every key in one statement (one round trip, one read of pg_locks however many locks are held),
        its epoch rows locked FOR SHARE; the first key that is not still ours, in `keys` order, refuses."""
        if not keys:
            return
        rows = cur.execute(
            "WITH mine AS MATERIALIZED (SELECT classid::bigint AS c, objid::bigint AS o FROM pg_locks "
            "WHERE locktype = 'advisory' AND pid = %s AND granted) "
            "SELECT e.lock_key, e.epoch, EXISTS (SELECT 1 FROM mine WHERE mine.c = k.c "
            "AND mine.o = (hashtext(k.key)::bigint & 4294967295)) "
            "FROM unnest(%s::text[], %s::bigint[]) AS k(key, c) JOIN certmgr_epochs e ON e.lock_key = k.key "
            "FOR SHARE OF e",
            (self.backend_pid, keys, [KINDS[key.split(":")[0]] for key in keys])).fetchall()
        found = {str(r[0]): (int(r[1]), bool(r[2])) for r in rows}
        for key in keys:
            if self._held.get(key) != held[key]:
                # released (or taken again) by another task of this controller since the snapshot: its
                # unlock is not a loss — releasing deletes the key before pg_advisory_unlock
                continue
            epoch, granted = found.get(key, (0, False))
            if not granted:
                raise LockLost(f"store {self._where}: {what}: this controller no longer holds {key} (not written)",
                               hint="its database session ended (paused or cut off); the next run takes over")
            if epoch != held[key]:
                raise LockLost(f"store {self._where}: {what}: {key} was taken over (epoch {epoch} after ours, "
                               f"{held[key]}) (not written)")
