"""`run`'s deploys, started as soon as there is something to deploy, beside the renewals.

What some POP lacks of a version already stored is deployed at once; each renewed certificate as soon
as its own renewal ends. One deploy() at a time takes everything queued so far (a group commit): each
host still gets one transaction (one reload) per deploy, canaries first, and never two at once.
Renewals started together end within a second or so of each other: a renewed certificate waits up to
LINGER for the run's other renewals still going, so that they share one transaction per POP.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from certmgr import deploy as deploy_mod
from certmgr import halocks
from certmgr import renew as renew_mod
from certmgr.errors import LockHeld
from certmgr.inventory import Certificate, Inventory
from certmgr.store_api import StateStore

LINGER = 2.0  # seconds a renewed certificate's deploy waits for the run's other renewals still going

OnOutcome = Callable[[deploy_mod.HostOutcome], None]
OnDeploy = Callable[[Sequence[Certificate], Sequence[str]], OnOutcome | None]
OnRenewed = Callable[[Sequence[renew_mod.RenewOutcome]], Awaitable[None]]
Deploy = Callable[..., Awaitable[list[deploy_mod.HostOutcome]]]  # deploy_mod.deploy's signature


@dataclass(frozen=True, slots=True, kw_only=True)
class DeployPlan:
    """Where one certificate goes in this run, and why."""

    cert: str
    hosts: tuple[str, ...]
    reason: str


def merge_outcome(outcomes: dict[tuple[str, str], deploy_mod.HostOutcome], o: deploy_mod.HostOutcome) -> None:
    """One outcome per (certificate, host) in the run's report: the later deploy's, which is what the POP
    now serves — except that a later "skipped" (already serving it) keeps the earlier "deployed" that put it there."""
    key = (o.cert, o.host)
    had = outcomes.get(key)
    if had is not None and had.status == deploy_mod.Status.DEPLOYED and o.status == deploy_mod.Status.SKIPPED:
        return
    outcomes[key] = o


class DeployQueue:
    """Plans queued by the run; `work()` deploys them, one deploy() at a time, each taking all that is queued."""

    def __init__(self, inv: Inventory, store: StateStore, *, now: dt.datetime, parallel: int,
                 on_deploy: OnDeploy | None = None, deploy: Deploy | None = None, linger: float = LINGER) -> None:
        self.inv = inv
        self.store = store
        self.now = now
        self.parallel = parallel
        self.on_deploy = on_deploy
        self._deploy: Deploy = deploy or deploy_mod.deploy
        self._pending: dict[str, DeployPlan] = {}
        self._lingers = True  # every plan pending may wait for renewals still going (none is behind)
        self.linger = linger
        self.renewing = 0  # renewals of the run whose outcome is not known yet
        self._renewed = asyncio.Event()  # set when `renewing` reaches 0
        self._wake = asyncio.Event()
        self._closed = False
        self.plans: list[DeployPlan] = []  # every plan queued, in order (the report's deploy_plan)
        self.outcomes: dict[tuple[str, str], deploy_mod.HostOutcome] = {}

    def add(self, plans: Iterable[DeployPlan], *, linger: bool = False) -> None:
        """Queue `plans`; with `linger` (renewed certificates) their deploy may wait for renewals still going."""
        for p in plans:
            if not p.hosts:
                continue
            self._lingers = self._lingers and linger
            self.plans.append(p)
            had = self._pending.get(p.cert)
            self._pending[p.cert] = p if had is None else replace(
                had, hosts=tuple(dict.fromkeys(had.hosts + p.hosts)), reason=f"{had.reason}; {p.reason}")
        self._wake.set()

    def renewal_ended(self) -> None:
        self.renewing = max(self.renewing - 1, 0)
        if self.renewing == 0:
            self._renewed.set()

    def close(self) -> None:
        """Nothing more will be queued: `work()` returns once the queue is empty."""
        self._closed = True
        self._renewed.set()
        self._wake.set()

    async def work(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(0)  # renewals that end in the same turn of the loop share one transaction
            if self._lingers and self.renewing > 0 and not self._renewed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await self._renewed.wait()
            batch, self._pending, self._lingers = list(self._pending.values()), {}, True
            await self._one(batch)

    async def _one(self, plans: Sequence[DeployPlan]) -> None:
        by_name = {c.name: c for c in self.inv.certificates}
        hosts = sorted({h for p in plans for h in p.hosts})
        targets = [by_name[p.cert] for p in plans]
        listener = self.on_deploy(targets, hosts) if self.on_deploy else None
        outs = await self._deploy(self.inv, self.store, targets, hosts=hosts, parallel=self.parallel, now=self.now,
                                  keep=self.inv.keep_versions, on_outcome=listener)
        for o in outs:
            merge_outcome(self.outcomes, o)

    @property
    def deploys(self) -> tuple[deploy_mod.HostOutcome, ...]:
        return tuple(self.outcomes.values())


@contextlib.contextmanager
def free_locks(store: StateStore, names: Iterable[str]) -> Iterator[tuple[frozenset[str], frozenset[str]]]:
    """Take, without waiting, the certificate locks of `names` for the block: (taken, held by another controller).

    Held here, they are shared by the run's early deploy, the renewals and the deploys of those certificates
    (halocks: a lock this controller holds is used, not taken again, and so never released under a user).
    The directory store has no per-certificate locks: every name is "taken".
    """
    names = sorted(set(names))
    if not halocks.per_name(store):
        yield frozenset(names), frozenset()
        return
    busy: set[str] = set()
    with contextlib.ExitStack() as stack:
        for name in names:
            if halocks.holds(store, "cert", name) is not None:
                continue
            try:
                stack.enter_context(store.lock_cert(name, "certmgr run: deploy"))
            except LockHeld:
                busy.add(name)
        yield frozenset(names) - busy, frozenset(busy)


async def renew_and_deploy(inv: Inventory, store: StateStore, certs: Sequence[Certificate],
                           behind: Sequence[DeployPlan], *, now: dt.datetime, renew_concurrency: int,
                           deploy_parallel: int, on_deploy: OnDeploy | None = None,
                           on_renewed: OnRenewed | None = None, deploy: Deploy | None = None,
                           linger: float = LINGER) -> tuple[tuple[renew_mod.RenewOutcome, ...], DeployQueue]:
    """Renew `certs` while deploying: `behind` (versions already stored that some POP lacks) at once, each
    renewed certificate as soon as its renewal ends. Returns the renewals and the queue (plans, outcomes).

    A certificate whose lock another controller holds is not deployed early: its `behind` plan is queued
    when the renewals end, and that deploy waits for the lock as deploy always does. `on_renewed` is
    called with every renewal outcome once they are all known, while deploys may still run (alerts).
    A renewed certificate's deploy waits up to `linger` seconds for the other renewals still going.
    """
    queue = DeployQueue(inv, store, now=now, parallel=deploy_parallel, on_deploy=on_deploy, deploy=deploy,
                        linger=linger)
    queue.renewing = len(certs)
    by_name = {c.name: c for c in inv.certificates}

    def renewed(o: renew_mod.RenewOutcome) -> None:
        if o.status == "renewed" and by_name[o.name].hosts:
            queue.add([DeployPlan(cert=o.name, hosts=by_name[o.name].hosts, reason="renewed")], linger=True)
        queue.renewal_ended()

    with free_locks(store, [p.cert for p in behind]) as (mine, busy):
        queue.add(p for p in behind if p.cert in mine)

        async def renewing() -> tuple[renew_mod.RenewOutcome, ...]:
            outs = tuple(await renew_mod.renew(inv, store, certs, now=now, concurrency=renew_concurrency,
                                               on_outcome=renewed))
            queue.add(p for p in behind if p.cert in busy)
            queue.close()
            if on_renewed is not None:
                await on_renewed(outs)
            return outs

        try:
            async with asyncio.TaskGroup() as tg:
                renewals = tg.create_task(renewing())
                tg.create_task(queue.work())
        except ExceptionGroup as group:  # one error (the usual case) leaves as itself, as before the overlap
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    return renewals.result(), queue
