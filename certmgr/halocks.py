"""Which locks a command takes across controllers, and the re-check after taking one (docs/ha.md).

`run` holds the run lock; each certificate's renew or deploy also its certificate lock, and each POP
transaction its POP lock (certmgr.deploy.fence). On-call commands (`renew|deploy|rollback|revoke
NAME`) take only their certificates' locks, so they wait for those certificates alone. A store
without per-name locks (the state directory, `per_name_locks` False) keeps its one lock, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from certmgr.errors import LockHeld, LockLost
from certmgr.log import event
from certmgr.store_api import StateStore

log = logging.getLogger(__name__)

# How long a certificate's or POP's lock is waited for: another controller's renewal and deploy of
# that one certificate (an order, DNS propagation, every POP) ends well within it.
CERT_WAIT = 600.0
POP_WAIT = 600.0
# a lock another controller holds past the wait, or ours lost: one certificate's or host's outcome
LOCK_ERRORS = (LockHeld, LockLost)
POLL = 0.1  # advisory locks have no timed wait: try again this often (on the event loop, never blocking it)

P = ParamSpec("P")
R = TypeVar("R")


def per_name(store: StateStore | None) -> bool:
    return bool(getattr(store, "per_name_locks", False))


def _named(store: StateStore, actor: str) -> str:
    """What another controller's `… is held by` says: a certificate or POP lock taken inside a run says so."""
    return f"certmgr run: {actor}" if "run" in store.held else actor


def holds(store: StateStore, kind: str, name: str) -> int | None:
    """The epoch of lock (kind, name) if this controller holds it already, else None."""
    return store.held.get(f"{kind}:{name}")


@contextmanager
def oncall(store: StateStore, names: Iterable[str], actor: str, *, wait: float = CERT_WAIT) -> Iterator[None]:
    """An on-call command's locks: its certificates' (sorted: two commands never wait for each other in a
    circle), or the directory store's one lock. Blocks up to `wait` for each; LockHeld after that."""
    if not per_name(store):
        with store.lock(actor):
            yield
        return
    with ExitStack() as stack:
        for name in sorted(set(names)):
            try:
                stack.enter_context(store.lock_cert(name, actor))
            except LockHeld as exc:
                _waiting(f"cert:{name}", exc, wait)
                stack.enter_context(store.lock_cert(name, actor, wait=wait))
        yield


@contextmanager
def leftover_owner(store: StateStore, certs: Iterable[str]) -> Iterator[frozenset[str]]:
    """The certificates whose left-behind DNS records this run may remove, their locks held meanwhile.

    A journal entry is written under its certificate's lock, so a certificate locked by another
    controller has an order in flight there: its TXT values are that order's, not leftovers, and are
    skipped. Ours already held, or free (the writer died or finished), are taken. The directory store
    has one lock, held by the caller: every certificate.
    """
    names = sorted(set(certs))
    if not per_name(store):
        yield frozenset(names)
        return
    with ExitStack() as stack:
        mine: set[str] = set()
        for name in names:
            if holds(store, "cert", name) is None:
                try:
                    stack.enter_context(store.lock_cert(name, _named(store, "dns cleanup")))
                except LockHeld as exc:
                    event(log, logging.INFO, "challenge records of an order another controller is running: left to it",
                          certificate=name, holder=exc.message)
                    continue
            mine.add(name)
        yield frozenset(mine)


def _waiting(key: str, exc: LockHeld, wait: float, *, ours: bool = False) -> None:
    """Say who is waited for: another controller (a warning: an operator may want to know), or another task
    of this run (each POP's transaction in turn: routine, said at INFO)."""
    if ours:
        event(log, logging.INFO, "waiting for a lock another task of this run holds", lock=key, wait=f"{wait:g}s")
        return
    event(log, logging.WARNING, "waiting for a lock another controller holds", lock=key, wait=f"{wait:g}s",
          holder=exc.message)


def live_versions(store: StateStore, names: Iterable[str]) -> dict[str, int | None]:
    """What the caller saw before waiting for locks: compared after acquiring (`Turn.moved`)."""
    return {n: store.live_version(n) for n in names}


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    """One certificate's lock is ours. `moved`: its live version changed while we waited (another
    controller renewed it): do not order again."""

    name: str
    epoch: int | None
    moved: bool = False
    # the live version read once the lock was ours (`live_known`): unchanged while we hold it, so the
    # renewal need not read it again (one round trip less per certificate)
    live: int | None = None
    live_known: bool = False


# the locks a task of this process is taking right now (its try runs in a thread), by id(store): another task
# waits for that try's outcome instead of trying the same key at once (LockSession.hold is not re-entrant)
_taking: dict[int, set[str]] = {}


async def _take(store: StateStore, kind: str, name: str, cm_factory: Callable[[], AbstractContextManager[Any]],
                stack: AsyncExitStack, wait: float, *, reentrant: bool) -> Any:
    """Take lock (kind, name) without blocking the event loop: each try (a database transaction with a durable
    commit: the epoch's bump) in a thread, one per POLL until `wait` is spent; its release, at the end of
    `stack`, in a thread too. Held by this controller already: `reentrant` uses it (its epoch, nothing
    taken), else waits for it to be released (POP locks: one transaction per POP at a time)."""
    key = f"{kind}:{name}"
    taking = _taking.setdefault(id(store), set())
    deadline = time.monotonic() + wait
    said = False
    while True:
        busy: LockHeld | None = None
        ours = False
        if key not in taking:
            mine = holds(store, kind, name)
            if mine is not None and reentrant:
                return mine
            if mine is None:
                taking.add(key)  # no await since the checks: no other task of ours tries it meanwhile
                try:
                    return await _enter(cm_factory(), stack)
                except LockHeld as exc:
                    busy = exc
                finally:
                    taking.discard(key)
            else:
                busy, ours = LockHeld(f"{key} is held by another task of this controller"), True
        if time.monotonic() >= deadline:
            raise busy or LockHeld(f"{key} is being taken by another task of this controller "
                                   f"(gave up after {wait:g}s)")
        if busy is not None and not said:
            _waiting(key, busy, wait, ours=ours)
            said = True
        await asyncio.sleep(POLL)


async def _enter(cm: AbstractContextManager[Any], stack: AsyncExitStack) -> Any:
    """Enter `cm` in a thread, its exit pushed on `stack` (in a thread too). Cancelled meanwhile: the try goes
    on in its thread; a lock it took is let go before the cancellation goes on (never left held)."""
    attempt = asyncio.ensure_future(asyncio.to_thread(cm.__enter__))
    try:
        value = await asyncio.shield(attempt)
    except asyncio.CancelledError:
        await asyncio.wait([attempt])
        if not attempt.cancelled() and attempt.exception() is None:
            await asyncio.to_thread(cm.__exit__, None, None, None)
        raise

    async def leave(*exc: object) -> bool:
        await asyncio.to_thread(cm.__exit__, None, None, None)  # hold() has no except: the exception stays ours
        return False

    stack.push_async_exit(leave)
    return value


@asynccontextmanager
async def cert_turn(store: StateStore, name: str, actor: str, *, seen: Mapping[str, int | None] | None = None,
                    wait: float = CERT_WAIT, enabled: bool = True, recheck: bool = True) -> AsyncIterator[Turn]:
    """Hold `name`'s certificate lock (re-entrant: a lock this controller already holds is kept), then re-check.

    `seen`: the live versions the caller read before waiting (an on-call command, before its locks);
    without it, the live version read just before waiting here — unless `recheck` is False: the caller
    does not use `moved` (a renewal that is not forced plans from the live version read under the lock,
    which shows another controller's renewal as well), so that read is saved. A store without per-name
    locks, or `enabled` False (a dry run), takes nothing.
    """
    if not enabled or not per_name(store):
        yield Turn(name=name, epoch=None)
        return
    if seen is not None and name in seen:
        before: int | None = seen[name]
    elif recheck:
        before = store.live_version(name)
    else:
        before = None
    async with AsyncExitStack() as stack:
        epoch = await _take(store, "cert", name, lambda: store.lock_cert(name, _named(store, actor)), stack, wait,
                            reentrant=True)
        now = store.live_version(name)
        moved = (recheck or seen is not None) and now != before
        if moved:
            event(log, logging.INFO, "re-check: renewed meanwhile by another controller; not ordered again",
                  cert=name, seen=before, live=now, epoch=epoch)
        yield Turn(name=name, epoch=epoch, moved=moved, live=now, live_known=True)


@asynccontextmanager
async def certs_held(store: StateStore | None, names: Iterable[str], actor: str,
                     *, wait: float = CERT_WAIT) -> AsyncIterator[None]:
    """Every certificate lock of `names` not held yet, in sorted order, for the block (a deploy)."""
    if store is None or not per_name(store):
        yield
        return
    async with AsyncExitStack() as stack:
        for name in sorted(set(names)):
            await _take(store, "cert", name, lambda n=name: store.lock_cert(n, _named(store, actor)),  # type: ignore[misc]
                        stack, wait, reentrant=True)
        yield


@asynccontextmanager
async def pop_held(store: StateStore | None, host: str, actor: str, *,
                   wait: float = POP_WAIT) -> AsyncIterator[int | None]:
    """`host`'s POP lock for one transaction; its epoch (None: the directory store, no fencing).

    Not re-entrant, unlike certificate locks: a POP lock this controller holds is another of its POP
    transactions there (two deploy() calls in one process). That one is waited for (up to `wait`, on the
    event loop), then the lock is taken anew with a newer epoch: two transactions of one controller never
    run on one POP at once, and none goes on under a lock its taker released.
    """
    if store is None or not per_name(store):
        yield None
        return
    async with AsyncExitStack() as stack:
        yield await _take(store, "pop", host, lambda: store.lock_pop(host, _named(store, actor)), stack, wait,
                          reentrant=False)


def deploy_locked(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap deploy(inventory, store, certs, …): its certificates' locks are held while it runs (and reads live).

    Only those with a host to go to (`hosts=` narrows them): deploy reads and changes nothing of a
    certificate without one (`renew --due` hands it every renewal), so its lock is not taken."""
    @wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store: Any = args[1] if len(args) > 1 else kwargs.get("store")
        certs: Any = args[2] if len(args) > 2 else kwargs.get("certs", ())
        only = set(kwargs.get("hosts") or ())  # type: ignore[call-overload]
        going = [c.name for c in certs if any(not only or h in only for h in c.hosts)]
        async with certs_held(store, going, "deploy"):
            return await fn(*args, **kwargs)

    return wrapper
