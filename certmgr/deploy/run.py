"""Deploy's entry point: every certificate's hosts, all at once (bounded), canaries first; each host
one transaction (txn.py); per-certificate state saved to `state/deploy/<name>.json`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence

from cryptography import x509

from certmgr import certcheck, halocks, interrupt
from certmgr import remote as remote_mod
from certmgr.deploy import fence, handshake, session
from certmgr.deploy.host import Connector, Deployer, Job, default_connector, state_entry
from certmgr.deploy.model import HostOutcome, Status
from certmgr.deploy.plan import serial_of_pem
from certmgr.deploy.shell import COMMIT_SH, INSPECT_SH, PRUNE_SH, ROLLBACK_SH
from certmgr.deploy.txn import Transaction
from certmgr.errors import CertmgrError, DeployError, UsageError
from certmgr.inventory import Certificate, Host, Inventory
from certmgr.remote import Timeouts
from certmgr.store_api import StateStore

logger = logging.getLogger(__name__)


async def host_task(d: Deployer, host: Host, jobs: Sequence[Job]) -> list[HostOutcome]:
    """One host: one SSH connection, one transaction for all its certificates, then pruning."""
    done: dict[str, HostOutcome] = {}
    start = d.loop.time()
    jump = d.inventory.hosts.get(host.jump) if host.jump else None
    try:
        async with d.connector(host, jump=jump, accept_new=d.accept_new, timeouts=d.timeouts,
                               on_accept=d.audit_accepted) as rem:
            connected = d.loop.time() - start
            for job in jobs:
                job.timings["connect"] = connected
            if interrupt.stopping():
                return [d.not_started(job, start=d.loop.time()) for job in jobs]
            # two controllers: the POP's lock for the transaction, its epoch to commit.sh (deploy/fence.py)
            # inspect, commit, a rollback and the prune below in one SSH channel (session.py)
            pruning = (PRUNE_SH,) if d.prune is not None or d.keep is not None else ()
            async with halocks.pop_held(d.store, host.name, "deploy") as epoch, \
                    session.over(rem, (INSPECT_SH, COMMIT_SH, ROLLBACK_SH, *pruning)) as steps:
                txn = Transaction(d, steps, host, jobs, done, start=start)
                txn.fence = None if epoch is None else fence.Token(epoch=epoch, holder=fence.holder_id())
                await txn.run_shielded()
                if all(o.status != Status.UNKNOWN for o in done.values()):
                    # --prune K: every certificate on this host; retention (keep): only where a version was
                    # added, by this run or by an interrupted one whose switch this run settled (that run never
                    # pruned). Still under the POP's lock: prune.sh is fenced with its epoch like commit.sh.
                    # Also where the POP holds more versions than kept: a run stopped between its commit and its
                    # prune left them, and the next deploy finds that POP current (skipped).
                    deployed = {o.cert for o in done.values() if o.status == Status.DEPLOYED}
                    deployed |= {job.name for job in jobs if job.settled}
                    if d.prune is not None:
                        await d.prune_host(steps, host, jobs, d.prune, txn.fence)
                    elif d.keep is not None:
                        over = max(d.keep, 2)  # prune.sh keeps the live version and the one before it too
                        due = [job for job in jobs if job.name in deployed
                               or (job.state is not None and len(job.state.versions) > over)]
                        await d.prune_host(steps, host, due, d.keep, txn.fence)
    except (remote_mod.Unreachable, DeployError, *halocks.LOCK_ERRORS) as exc:  # POP lock: held, or ours lost
        status = Status.UNREACHABLE if isinstance(exc, remote_mod.Unreachable) else Status.FAILED
        for job in jobs:
            if job.name not in done:
                done[job.name] = d.outcome(job, status, error=f"{job.subject}: {exc.message}", hint=exc.hint,
                                           start=start)
    return [done[job.name] for job in jobs if job.name in done]


@halocks.deploy_locked
async def deploy(
    inventory: Inventory,
    store: StateStore,
    certs: Sequence[Certificate],
    *,
    hosts: Sequence[str] | None = None,
    parallel: int = 20,
    accept_new: bool = False,
    canary: Sequence[str] = (),
    prune: int | None = None,
    keep: int | None = None,
    now: dt.datetime,
    timeouts: Timeouts | None = None,
    connector: Connector | None = None,
    prober: handshake.Prober | None = None,
    on_outcome: Callable[[HostOutcome], None] | None = None,
) -> list[HostOutcome]:
    """Push the store's live version of each of `certs` to its hosts; one outcome per (cert, host).

    `on_outcome` is called with each outcome as soon as it is known (a host's outcomes when its task ends),
    for progress display; it must not raise.

    `hosts` limits the targets (names; unknown ones are a UsageError). Hosts tagged `canary` or
    named in `canary` go first; the rest only when every canary outcome is skipped/deployed
    (else they are HELD). At most `parallel` hosts at once; each host gets one SSH connection
    and one transaction for all its certificates (txn.py): one commit, one test, one reload.
    Expected failures become outcomes; the caller holds the store
    lock. Per-certificate state is saved to `state/deploy/<name>.json`; every change is audited.
    `prune` K prunes every deployed-to certificate on each host to its newest K versions; `keep`
    (retention, the inventory's keep_versions) does the same only where this call deployed a version.
    """
    if parallel < 1:
        raise UsageError(f"deploy: --parallel must be at least 1, not {parallel}")
    if prune is not None and prune < 1:
        raise UsageError(f"deploy: --prune must keep at least 1 version, not {prune}")
    wanted = set(hosts) if hosts else None
    if wanted is not None:
        unknown = sorted(wanted - set(inventory.hosts))
        if unknown:
            raise UsageError(f"deploy: no host named {', '.join(map(repr, unknown))} in the inventory")
    bad_canary = sorted(set(canary) - set(inventory.hosts))
    if bad_canary:
        raise UsageError(f"deploy: canary {', '.join(map(repr, bad_canary))} is not a host in the inventory")

    timeouts = timeouts or Timeouts()
    deployer = Deployer(inventory=inventory, store=store, timeouts=timeouts, accept_new=accept_new,
                        connector=connector or default_connector, prober=prober or handshake.probe_with(timeouts),
                        prune=prune, keep=keep, now=now)
    outcomes: list[HostOutcome] = []
    by_host: dict[str, list[Job]] = {}
    roots: list[tuple[x509.Certificate, ...]] = []  # certcheck's trust anchors, loaded once
    for cert in certs:
        targets = [h for h in cert.hosts if wanted is None or h in wanted]
        if not targets:
            continue
        try:
            material = store.read(cert.name)
            material.check()
            local_version = store.live_version(cert.name)
            if not roots:
                roots.append(certcheck.load_roots(inventory.trust, outcome="nothing changed"))
            # The same checks as before the version was stored (the lifetime bound aside: it was applied then)
            refused = certcheck.problems(material, certcheck.Expected(
                names=cert.domains, roots=roots[0], preferred_issuer=cert.preferred_chain, max_validity=None), now=now)
        except CertmgrError as exc:
            for h in targets:
                outcomes.append(HostOutcome(cert=cert.name, host=h, status=Status.FAILED, new_serial="-",
                                            error=f"deploy {cert.name} → {h}: {exc.message} (nothing changed)",
                                            hint=exc.hint))
            continue
        if refused:
            for h in targets:
                outcomes.append(HostOutcome(
                    cert=cert.name, host=h, status=Status.FAILED, new_serial=serial_of_pem(material.cert) or "-",
                    error=f"deploy {cert.name} → {h}: version {local_version} refused: {'; '.join(refused)} "
                          "(nothing uploaded)", hint=certcheck.DEPLOY_HINT.format(name=cert.name)))
            continue
        info = material.info()
        interrupt.tally().plan(cert.name, targets)
        for h in targets:
            by_host.setdefault(h, []).append(Job(cert=cert, host=inventory.hosts[h], material=material,
                                                  info=info, local_version=local_version))

    def told(outs: list[HostOutcome]) -> list[HostOutcome]:
        if on_outcome is not None:
            for o in outs:
                on_outcome(o)
        return outs

    told(list(outcomes))  # refused or unreadable before any host was touched
    canaries = [h for h in by_host if inventory.hosts[h].canary or h in canary]
    rest = [h for h in by_host if h not in canaries]
    sem = asyncio.Semaphore(parallel)

    async def bounded(h: str) -> list[HostOutcome]:
        async with sem:
            if interrupt.stopping():  # a signal asked to start nothing new
                return told([deployer.not_started(job, start=deployer.loop.time()) for job in by_host[h]])
            return told(await host_task(deployer, inventory.hosts[h], by_host[h]))

    async def wave(names: Sequence[str]) -> list[HostOutcome]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(bounded(h)) for h in names]
        return [o for t in tasks for o in t.result()]

    try:
        first = await wave(canaries) if canaries else []
        outcomes.extend(first)
        bad = [] if interrupt.stopping() else [o for o in first if not o.ok]  # stopped: rest is "not started"
        if not bad:
            outcomes.extend(await wave(rest))
    except asyncio.CancelledError:
        # a signal: keep what finished (commits under way were waited for); intents cover the rest
        with deployer.state_lock:
            _save_state(store, deployer.produced, by_host, now, set(deployer.recorded))
        raise
    if bad:
        why = ", ".join(sorted({o.host for o in bad}))
        for h in rest:
            for job in by_host[h]:
                outcomes.extend(told([HostOutcome(
                    cert=job.cert.name, host=h, status=Status.HELD, new_serial=job.info.serial,
                    error=f"deploy {job.cert.name} → {h}: held: canary {why} did not verify (not touched)",
                    hint="fix the canary, then rerun deploy")]))

    await asyncio.to_thread(_save_state, store, outcomes, by_host, now, deployer.recorded)
    return outcomes


def _save_state(store: StateStore, outcomes: Sequence[HostOutcome], by_host: Mapping[str, list[Job]],
                now: dt.datetime, recorded: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> None:
    """Merge this run's outcomes into `state/deploy/<name>.json` ({"hosts": {host: {...}}}), but those in
    `recorded` (saved already with their switch's audit row: Deployer.record)."""
    if store is None:
        return
    local_versions = {j.cert.name: j.local_version for jobs in by_host.values() for j in jobs}
    per_cert: dict[str, list[HostOutcome]] = {}
    for o in outcomes:
        if (o.cert, o.host) not in recorded:
            per_cert.setdefault(o.cert, []).append(o)
    for name, outs in per_cert.items():
        path = f"state/deploy/{name}.json"
        try:
            state = store.load_json(path, default={}) or {}
        except CertmgrError as exc:
            logger.error("deploy state %s: %s (starting afresh)", name, exc)
            state = {}
        hosts_state = state.setdefault("hosts", {})
        for o in outs:
            state_entry(hosts_state.setdefault(o.host, {}), o, now, local_versions.get(name))
        try:
            store.save_json(path, state)
        except CertmgrError as exc:
            logger.error("deploy state %s: %s", name, exc)
