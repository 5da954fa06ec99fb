"""`run`'s deploys beside its renewals: what is behind at once, each renewal as it ends, one deploy at a time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from certmgr import inventory, rundeploys
from certmgr import renew as renew_mod
from certmgr.deploy import HostOutcome, Status
from certmgr.errors import LockHeld, StoreError
from certmgr.inventory import Certificate
from certmgr.plan import Decision
from certmgr.renew import RenewOutcome
from certmgr.rundeploys import DeployPlan, DeployQueue

NOW = dt.datetime(2026, 12, 3, 2, 0, tzinfo=dt.UTC)
INV = inventory.load(Path(__file__).parents[2] / "domains.toml")
APEX, MEDIA = "hachyderm.io", "media.hachyderm.io"


def outcome(cert: str, host: str, status: Status) -> HostOutcome:
    return HostOutcome(cert=cert, host=host, status=status, new_serial="01")


def renewal(name: str, status: str) -> RenewOutcome:
    return RenewOutcome(name=name, status=status, decision=Decision(due=True, overdue=False, reason="test"))


class FakeDeploy:
    """deploy()'s seam: records each call's certificates and hosts; `gate` (when set) holds a call until set."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        self.locks_seen: list[list[str]] = []  # the store's held locks as each call started
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def __call__(self, inv: Any, store: Any, certs: Sequence[Certificate], *, hosts: Sequence[str],
                       **_: Any) -> list[HostOutcome]:
        self.calls.append((tuple(c.name for c in certs), tuple(hosts)))
        self.locks_seen.append(sorted(getattr(store, "held", {})))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return [outcome(c.name, h, Status.DEPLOYED) for c in certs for h in c.hosts if h in hosts]


async def started(fake: FakeDeploy) -> bool:
    """Let the loop run until a deploy starts, at most 100 turns (no deadlock when none ever does): whether one did."""
    for _ in range(100):
        if fake.started.is_set():
            break
        await asyncio.sleep(0)
    return fake.started.is_set()


async def release_once_deploying(held: asyncio.Event, fake: FakeDeploy) -> bool:
    """End the held renewal once a deploy has started (or the loop ran 100 turns); whether one had started."""
    ok = await started(fake)
    held.set()
    return ok


def test_one_deploy_at_a_time_each_taking_all_that_was_queued_meanwhile() -> None:
    """A plan queued while a deploy runs waits for it; everything queued meanwhile goes in the next deploy together."""
    async def main() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        fake = FakeDeploy()
        fake.gate = asyncio.Event()
        queue = DeployQueue(INV, None, now=NOW, parallel=5, deploy=fake)  # type: ignore[arg-type]
        worker = asyncio.create_task(queue.work())
        queue.add([DeployPlan(cert=MEDIA, hosts=("sally",), reason="behind")])
        assert await started(fake), "the first plan is deployed at once"
        queue.add([DeployPlan(cert=APEX, hosts=INV.certificates[0].hosts, reason="renewed")])
        queue.add([DeployPlan(cert=MEDIA, hosts=("esme",), reason="renewed")])
        await asyncio.sleep(0)
        assert len(fake.calls) == 1, "no second deploy while the first runs"
        queue.close()
        fake.gate.set()
        await worker
        assert [p.cert for p in queue.plans] == [MEDIA, APEX, MEDIA]
        return fake.calls

    calls = asyncio.run(main())
    assert calls == [((MEDIA,), ("sally",)),
                     ((APEX, MEDIA), ("cdn-frankfurt-1", "cdn-fremont-1", "esme", "fritz", "sally"))]


def test_a_closed_empty_queue_deploys_nothing() -> None:
    """No plan queued: the worker ends when the queue is closed, without calling deploy."""
    async def main() -> list[Any]:
        fake = FakeDeploy()
        queue = DeployQueue(INV, None, now=NOW, parallel=5, deploy=fake)  # type: ignore[arg-type]
        worker = asyncio.create_task(queue.work())
        queue.add([DeployPlan(cert=MEDIA, hosts=(), reason="nowhere")])
        queue.close()
        await worker
        return fake.calls

    assert asyncio.run(main()) == []


@pytest.mark.parametrize(("first", "then", "kept"), [
    (Status.DEPLOYED, Status.SKIPPED, Status.DEPLOYED),  # the later deploy found what the earlier one put there
    (Status.UNREACHABLE, Status.DEPLOYED, Status.DEPLOYED),  # the POP came back: it serves the version now
    (Status.DEPLOYED, Status.ROLLED_BACK, Status.ROLLED_BACK),  # the renewal's version failed there
    (Status.SKIPPED, Status.DEPLOYED, Status.DEPLOYED),
    (Status.DEPLOYED, Status.FAILED, Status.FAILED),
])
def test_the_report_keeps_one_outcome_per_certificate_and_pop(first: Status, then: Status, kept: Status) -> None:
    """Two deploys of one certificate to one POP in a run: the report keeps the later, unless it only skipped."""
    outs: dict[tuple[str, str], HostOutcome] = {}
    rundeploys.merge_outcome(outs, outcome(MEDIA, "sally", first))
    rundeploys.merge_outcome(outs, outcome(APEX, "sally", Status.DEPLOYED))
    rundeploys.merge_outcome(outs, outcome(MEDIA, "sally", then))
    assert [(o.cert, o.status) for o in outs.values()] == [(MEDIA, kept), (APEX, Status.DEPLOYED)]


def fake_renew(monkeypatch: pytest.MonkeyPatch, held: asyncio.Event, outs: Sequence[RenewOutcome],
               error: Exception | None = None) -> None:
    """renew() that waits for `held`, then reports `outs` one by one through on_outcome (or raises `error`)."""
    async def renew(inv: Any, store: Any, certs: Any, *, on_outcome: Any = None, **_: Any) -> list[RenewOutcome]:
        await held.wait()
        if error is not None:
            raise error
        for o in outs:
            on_outcome(o)
            await asyncio.sleep(0)
        return list(outs)

    monkeypatch.setattr(renew_mod, "renew", renew)


def test_behind_is_deployed_while_a_renewal_is_held_and_the_renewal_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a POP lacks is deployed before the held renewal ends; the renewed certificate follows, to all its hosts."""
    async def main() -> tuple[FakeDeploy, tuple[RenewOutcome, ...], DeployQueue]:
        held = asyncio.Event()
        fake_renew(monkeypatch, held, [renewal(MEDIA, "not-due"), renewal(APEX, "renewed")])
        fake = FakeDeploy()

        releaser = asyncio.create_task(release_once_deploying(held, fake))
        renewals, queue = await rundeploys.renew_and_deploy(
            INV, None, INV.certificates, [DeployPlan(cert=MEDIA, hosts=("sally",), reason="behind")],  # type: ignore[arg-type]
            now=NOW, renew_concurrency=2, deploy_parallel=5, deploy=fake)
        assert await releaser, "the deploy of what was behind started while the renewal was held"
        return fake, renewals, queue

    fake, renewals, queue = asyncio.run(main())
    assert fake.calls == [((MEDIA,), ("sally",)), ((APEX,), tuple(sorted(INV.certificates[0].hosts)))]
    assert [o.status for o in renewals] == ["not-due", "renewed"]
    assert sorted((o.cert, o.host) for o in queue.deploys) == sorted(
        [(MEDIA, "sally")] + [(APEX, h) for h in INV.certificates[0].hosts])


def test_renewals_told_once_all_are_known_while_deploys_may_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """on_renewed gets every renewal outcome once, after the last renewal and before the run's deploys are done."""
    async def main() -> list[Any]:
        held = asyncio.Event()
        held.set()
        fake_renew(monkeypatch, held, [renewal(MEDIA, "failed"), renewal(APEX, "not-due")])
        fake = FakeDeploy()
        fake.gate = asyncio.Event()
        told: list[Any] = []

        async def on_renewed(outs: Sequence[RenewOutcome]) -> None:
            told.append(([o.name for o in outs], len(fake.calls), fake.gate is not None and fake.gate.is_set()))
            assert fake.gate is not None
            fake.gate.set()

        await rundeploys.renew_and_deploy(
            INV, None, INV.certificates, [DeployPlan(cert=MEDIA, hosts=("sally",), reason="behind")],  # type: ignore[arg-type]
            now=NOW, renew_concurrency=2, deploy_parallel=5, deploy=fake, on_renewed=on_renewed)
        return told

    assert asyncio.run(main()) == [([MEDIA, APEX], 1, False)]


def test_an_error_in_the_renewals_leaves_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store error raised by the renewals ends the run as that error, not as an exception group."""
    async def main() -> None:
        held = asyncio.Event()
        held.set()
        fake_renew(monkeypatch, held, [], error=StoreError("store /x: write renew state: disk full (not written)"))
        await rundeploys.renew_and_deploy(INV, None, INV.certificates, [], now=NOW,  # type: ignore[arg-type]
                                          renew_concurrency=2, deploy_parallel=5, deploy=FakeDeploy())

    with pytest.raises(StoreError, match=r"^store /x: write renew state: disk full \(not written\)$"):
        asyncio.run(main())


class LockingStore:
    """The per-name lock surface halocks reads: `busy` names are held by another controller."""

    per_name_locks = True

    def __init__(self, busy: set[str]) -> None:
        self.busy = busy
        self.locks: dict[str, int] = {}
        self.log: list[str] = []

    @property
    def held(self) -> dict[str, int]:
        return dict(self.locks)

    @contextlib.contextmanager
    def lock_cert(self, name: str, actor: str, *, wait: float | None = None) -> Iterator[int]:
        if name in self.busy:
            raise LockHeld(f"store /x: cert:{name} is held by another controller")
        self.locks[f"cert:{name}"] = 1
        self.log.append(f"take {name}")
        try:
            yield 1
        finally:
            del self.locks[f"cert:{name}"]
            self.log.append(f"release {name}")


def test_the_run_holds_the_early_deploys_locks_and_defers_one_held_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The early deploy's certificate locks are taken at once and kept to the end; a certificate whose lock another
    controller holds is deployed only after the renewals, by a deploy that waits for its lock as usual."""
    store = LockingStore(busy={APEX})

    async def main() -> FakeDeploy:
        held = asyncio.Event()
        fake_renew(monkeypatch, held, [renewal(MEDIA, "not-due"), renewal(APEX, "not-due")])
        fake = FakeDeploy()

        releaser = asyncio.create_task(release_once_deploying(held, fake))
        await rundeploys.renew_and_deploy(
            INV, store, INV.certificates,  # type: ignore[arg-type]
            [DeployPlan(cert=MEDIA, hosts=("sally",), reason="behind"),
             DeployPlan(cert=APEX, hosts=("fritz",), reason="behind")],
            now=NOW, renew_concurrency=2, deploy_parallel=5, deploy=fake)
        assert await releaser, "the early deploy started while the renewals were held"
        return fake

    fake = asyncio.run(main())
    assert fake.calls == [((MEDIA,), ("sally",)), ((APEX,), ("fritz",))]
    assert fake.locks_seen == [[f"cert:{MEDIA}"], [f"cert:{MEDIA}"]], "kept until the run's last deploy"
    assert store.log == [f"take {MEDIA}", f"release {MEDIA}"]
    assert store.held == {}


@pytest.mark.parametrize(("linger", "calls"), [
    (60.0, [((APEX, MEDIA), ("cdn-frankfurt-1", "cdn-fremont-1", "esme", "fritz", "sally"))]),
    (0.0, [((APEX,), ("cdn-frankfurt-1", "cdn-fremont-1", "esme", "fritz", "sally")),
           ((MEDIA,), ("cdn-frankfurt-1", "cdn-fremont-1", "esme", "sally"))]),
])
def test_renewals_ending_close_together_share_one_deploy(monkeypatch: pytest.MonkeyPatch, linger: float,
                                                         calls: list[Any]) -> None:
    """A renewed certificate waits (up to the linger) for the run's other renewals still going: one deploy for both."""
    async def renew(inv: Any, store: Any, certs: Any, *, on_outcome: Any = None, **_: Any) -> list[RenewOutcome]:
        outs = [renewal(APEX, "renewed"), renewal(MEDIA, "renewed")]
        on_outcome(outs[0])
        await asyncio.sleep(0.01)  # the second renewal ends a little later
        on_outcome(outs[1])
        return outs

    monkeypatch.setattr(renew_mod, "renew", renew)
    fake = FakeDeploy()
    asyncio.run(rundeploys.renew_and_deploy(INV, None, INV.certificates, [], now=NOW,  # type: ignore[arg-type]
                                            renew_concurrency=2, deploy_parallel=5, deploy=fake, linger=linger))
    assert fake.calls == calls


def test_deploy_locks_only_the_certificates_it_has_a_host_for() -> None:
    """deploy() takes the lock of a certificate it goes somewhere with; one without a host (`renew --due` hands deploy
    every renewal), or none of whose hosts is among `hosts=`, is not locked (one durable take less each)."""
    import dataclasses

    from certmgr.deploy import deploy

    store = LockingStore(busy=set())
    apex, media = (next(c for c in INV.certificates if c.name == n) for n in (APEX, MEDIA))
    assert "fritz" in apex.hosts and "fritz" not in media.hosts

    async def connector(*_: Any, **__: Any) -> Any:
        raise AssertionError("no host is reached here")

    outs = asyncio.run(deploy(INV, store, [dataclasses.replace(apex, hosts=())], now=NOW,  # type: ignore[arg-type]
                              connector=connector))
    assert outs == [] and store.log == []
    with pytest.raises(AttributeError, match="read"):  # this fake store has locks only: deploy stops at reading apex
        asyncio.run(deploy(INV, store, [apex, media], hosts=["fritz"], now=NOW, connector=connector))  # type: ignore[arg-type]
    assert store.log == [f"take {APEX}", f"release {APEX}"]
