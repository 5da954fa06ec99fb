"""The per-host transaction: every certificate due on a POP in one inspect run, every new version
uploaded, ONE commit under the POP lock (swap each, one test, one reload — or all back), then every
name verified by handshake; certificates that do not verify are rolled back together (one more reload).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from certmgr import intents as intents_mod
from certmgr import interrupt, popguard
from certmgr import remote as remote_mod
from certmgr.deploy import fence, handshake
from certmgr.deploy.model import CertState, HostOutcome, Inspection, Status, parse_inspection, sections
from certmgr.deploy.plan import Decision, serial_of_probe, sha256sums, version_of_target
from certmgr.deploy.shell import INSPECT_SH, PRUNE_SH
from certmgr.errors import CertmgrError, DeployError, LockLost, StoreUnavailable
from certmgr.inventory import Certificate, Host, Inventory
from certmgr.log import event
from certmgr.material import CertInfo, CertMaterial
from certmgr.probe import Probe
from certmgr.remote import Result, Timeouts
from certmgr.store_api import StateStore, batched

logger = logging.getLogger(__name__)

PEM_MODE = 0o644
KEY_MODE = 0o600
DIR_MODE = 0o755


class RemoteSession(Protocol):
    """What deploy needs from a connection (remote.Remote; fakes in unit tests)."""

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result: ...

    async def run_streamed(self, script: str, args: Sequence[str], data: bytes, *, step: str,
                           timeout: float | None = None) -> Result: ...

    async def remove_tree_quietly(self, directory: str) -> None: ...


Connector = Callable[..., AbstractAsyncContextManager[RemoteSession]]


def default_connector(host: Host, *, jump: Host | None, accept_new: bool, timeouts: Timeouts,
                      on_accept: remote_mod.OnAccept | None = None) -> AbstractAsyncContextManager[RemoteSession]:
    return remote_mod.connect(host, jump=jump, accept_new=accept_new, timeouts=timeouts, on_accept=on_accept)


@dataclass(kw_only=True)
class Job:
    """One certificate due on one host, and what the transaction learned about it so far."""

    cert: Certificate
    host: Host
    material: CertMaterial
    info: CertInfo
    local_version: int | None
    timings: dict[str, float] = field(default_factory=dict)
    intent: intents_mod.Intent | None = None  # written before the commit; removed once its outcome is audited
    # its switch's audit row(s), written by Deployer.record in ONE store transaction with the intent's removal
    # and this host's deploy state (issue 18: the row commits with the change it records)
    rows: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    settled: bool = False  # this deploy settled a switch an interrupted run made: retention applies as if deployed
    # that switch, never verified (the run died before its handshakes): (the link it replaced, the serial served
    # before), so that if the new version is not served this deploy switches back there, as that run would have
    unverified: tuple[str, str | None] | None = None
    state: CertState | None = None
    decision: Decision | None = None
    tmp: str = ""  # the upload temp dir's name under archive/<name>/

    @property
    def name(self) -> str:
        return self.cert.name

    @property
    def subject(self) -> str:
        return f"deploy {self.cert.name} → {self.host.name}"


def argv_text(argv: Sequence[str], key: str, host: Host) -> str:
    if not argv:
        raise DeployError(f"deploy {host.name}: {key} is empty", hint=f"set {key} in [defaults] or [hosts.{host.name}]")
    return shlex.join(argv)


class Deployer:
    """Shared by every host task of one deploy run: settings, the store, the outcomes produced so far."""

    def __init__(self, *, inventory: Inventory, store: StateStore, timeouts: Timeouts, accept_new: bool,
                 connector: Connector, prober: handshake.Prober, prune: int | None, now: dt.datetime,
                 keep: int | None = None) -> None:
        self.inventory = inventory
        self.store = store
        self.timeouts = timeouts
        self.accept_new = accept_new
        self.connector = connector
        self.prober = prober
        self.prune = prune
        self.keep = keep  # retention (keep_versions): prune where this run added a version, or more are there
        self.now = now
        self.loop = asyncio.get_running_loop()
        self.tag = popguard.controller_tag(store)  # marks this controller's upload temp dirs on POPs
        self.lock_wait = str(popguard.lock_wait(timeouts.command))
        self.produced: list[HostOutcome] = []  # every outcome so far: what a cancelled deploy still saves
        self.recorded: set[tuple[str, str]] = set()  # (cert, host) whose deploy state Deployer.record saved
        # deploy state documents are read, changed and written by several host threads (record, settle): one at
        # a time in this process (another controller cannot write them: the certificates' locks are ours)
        self.state_lock = threading.Lock()
        self.handshakes: dict[str, asyncio.Semaphore] = {}  # per host: handshake.PER_HOST in flight at most
        # one run's uploads: the same temp dir name on every POP (one random part per run, the version last:
        # commit.sh stores every version by one rename.ul) and so the same archive members, built once
        # (steps.upload_archive); the SHA-256 lines likewise
        self.upload_token = secrets.token_hex(6)
        self.upload_blocks: dict[tuple[str, str, int], bytes] = {}
        self._sums: dict[str, str] = {}

    def sums(self, job: Job) -> str:
        """`sha256sum -c` lines of the job's files, computed once per certificate per run (one material each)."""
        got = self._sums.get(job.name)
        if got is None:
            got = self._sums[job.name] = sha256sums(job.material)
        return got

    # -- audit: one JSON line per change, written in a thread (it fsyncs)

    async def audit(self, action: str, obj: str, *, job: Job | None = None, **kw: Any) -> None:
        """One audit row now — or, for a job's switch (SWITCH_ACTIONS, its intent written), kept on the job for
        `record`, which writes it with the intent's removal and the deploy state in one transaction."""
        if self.store is None:
            return
        if job is not None and job.intent is not None:
            kw.setdefault("intent", job.intent.id)  # a later settle sees this switch is audited
            if action in intents_mod.SWITCH_ACTIONS:
                job.rows.append((action, obj, kw))
                return
        try:
            await asyncio.to_thread(self.store.audit, action, obj, **kw)
        except CertmgrError as exc:
            logger.error("audit: %s", exc)

    def record(self, jobs: Sequence[Job], done: Mapping[str, HostOutcome]) -> None:
        """Blocking (call it in a thread): for a host's committed jobs (their intents written), ONE store
        transaction (`batch`) with each switch's audit row, the host's entries in the deploy state and the
        intents' removal: all or nothing with PostgreSQL; in that order in the directory store (a kill after
        the audit row leaves the intent, which the next deploy drops without a second row). On a store error
        nothing is marked recorded: the intents stay for the next deploy to settle, `deploy` saves the state."""
        store = self.store
        mine = [j for j in jobs if j.intent is not None]
        if store is None or not mine:
            return
        host = mine[0].host.name
        outs = [done[j.name] for j in mine if j.name in done]
        try:
            # not waiting for the disk: the intent, written durably before the commit, covers a record a server
            # crash loses (the next deploy to this host settles it and writes the rows again)
            with self.state_lock, batched(store, f"record the deploy to {host}", durable=False):
                self._record(store, mine, outs, read=True)
        except (StoreUnavailable, LockLost):
            # the database lost (or our lock): the spooling store (certmgr.outbox) keeps each write for the next
            # run instead — rows, host entries (merged on replay), intents removed — as one by one they would be
            try:
                with self.state_lock:
                    self._record(store, mine, outs, read=False)
            except CertmgrError as exc:
                self._unrecorded(mine, host, exc)
                return
        except CertmgrError as exc:
            self._unrecorded(mine, host, exc)
            return
        for job in mine:
            job.rows.clear()
        self.recorded.update((o.cert, o.host) for o in outs)

    def _record(self, store: StateStore, jobs: Sequence[Job], outs: Sequence[HostOutcome], *, read: bool) -> None:
        """Rows, then deploy state, then the intents' removal. `read` False: each host entry written over an empty
        document (what the spool keeps is merged host by host into the stored one on replay)."""
        for job in jobs:
            for action, obj, kw in job.rows:
                store.audit(action, obj, **kw)
        by_cert = {j.name: j.local_version for j in jobs}
        for o in outs:
            path = f"state/deploy/{o.cert}.json"
            state = (store.load_json(path, default={}) or {}) if read else {}
            state_entry(state.setdefault("hosts", {}).setdefault(o.host, {}), o, self.now, by_cert[o.cert])
            store.save_json(path, state)
        for job in jobs:
            assert job.intent is not None
            intents_mod.remove(store, job.intent)

    @staticmethod
    def _unrecorded(jobs: Sequence[Job], host: str, exc: CertmgrError) -> None:
        """The intents stay: the next deploy to this host settles them and writes the rows. One line per row not
        written, shaped like an unwritten audit row's (the soak's `audit-lost` looks for it)."""
        for job in jobs:
            for action, obj, _ in job.rows:
                logger.error("audit: %s: audit %s %s on %s not written (its intent stays for the next deploy)",
                             exc, action, obj, host)
        if not any(job.rows for job in jobs):
            logger.error("deploy %s: recording the outcome: %s (the intents stay for the next deploy)", host, exc)

    async def audit_accepted(self, k: remote_mod.AcceptedKey) -> None:
        await self.audit("host key accepted", k.host, to=k.fingerprint, known_hosts=str(k.known_hosts),
                         summary=f"trusted {k.host}'s host key {k.fingerprint} on first use (--accept-new), "
                                 f"added to {k.known_hosts}")

    async def served(self, host: Host, names: Sequence[str]) -> dict[str, Probe]:
        return await handshake.served(self.prober, host, names, self.bound(host))

    async def wait_served(self, host: Host, names: Sequence[str], serial: str) -> tuple[bool, dict[str, Probe]]:
        return await handshake.wait_served(self.prober, host, names, serial, limit=self.timeouts.verify,
                                           sem=self.bound(host))

    async def wait_all(self, host: Host, wants: Sequence[tuple[Sequence[str], str]]
                       ) -> list[tuple[bool, dict[str, Probe]]]:
        return await handshake.wait_all(self.prober, host, wants, limit=self.timeouts.verify, sem=self.bound(host))

    def bound(self, host: Host) -> asyncio.Semaphore:
        return self.handshakes.setdefault(host.name, asyncio.Semaphore(handshake.PER_HOST))

    # -- outcomes

    def outcome(self, job: Job, status: Status, *, start: float, **kw: Any) -> HostOutcome:
        elapsed = self.loop.time() - start
        interrupt.tally().outcome(job.cert.name, job.host.name, status.value)
        o = HostOutcome(cert=job.cert.name, host=job.host.name, status=status, new_serial=job.info.serial,
                        timings=tuple((k, round(v, 4)) for k, v in job.timings.items()), elapsed=elapsed, **kw)
        self.produced.append(o)
        return o

    def not_started(self, job: Job, *, start: float) -> HostOutcome:
        """The outcome of a job a signal stopped before its commit: nothing on the host was switched."""
        name = job.cert.name
        return self.outcome(job, Status.HELD, start=start, hint=f"run `certmgr deploy {name}` to finish",
                            error=f"deploy {name} → {job.host.name}: not started: interrupted (live unchanged)")

    async def intend_all(self, jobs: Sequence[Job]) -> dict[str, DeployError]:
        """Record durably, before the commit starts, the switch each job's commit may make (settled by a later
        run if we die); one thread hop for the host's transaction. The jobs whose intent could not be written."""
        now = dt.datetime.now(dt.UTC)
        made = []
        for job in jobs:
            d, st = job.decision, job.state
            assert d is not None and st is not None
            target = st.target
            made.append(intents_mod.Intent.new(
                cert=job.cert.name, host=job.host.name, version=d.version, layout=st.layout or "none",
                from_target=target or "",
                back_target=f"../archive/{job.cert.name}/{d.conv}" if d.conv else (target or ""),
                from_serial=d.old_serial, to_serial=job.info.serial, now=now, tmp=job.tmp))
        failed = {} if self.store is None else await asyncio.to_thread(intents_mod.write_all, self.store, made)
        for job, intent in zip(jobs, made, strict=True):
            if job.name not in failed:
                job.intent = intent
                interrupt.tally().committing.add((job.cert.name, job.host.name))
        return {name: DeployError(f"cannot record the deploy intent: {exc.message} (live unchanged)", hint=exc.hint)
                for name, exc in failed.items()}

    async def intend_back(self, jobs: Sequence[Job]) -> list[Job]:
        """Before switching back a settled switch nobody verified (Transaction.decide): the intent of that switch
        back, written durably, so that a controller dying during it leaves it for the next deploy to settle and
        audit. The jobs that may go on: those with a link in certmgr's own spelling to go back to, intent written."""
        if self.store is None:
            return list(jobs)
        now = dt.datetime.now(dt.UTC)
        made: list[tuple[Job, intents_mod.Intent]] = []
        for job in jobs:
            assert job.unverified is not None and job.decision is not None
            back, old_serial = job.unverified
            v = version_of_target(back, job.name)
            if v is None or back != f"../archive/{job.name}/{v}":
                continue  # a link spelled otherwise could not be settled by its target: left to a redeploy
            cur = f"../archive/{job.name}/{job.decision.version}"
            made.append((job, intents_mod.Intent.new(
                cert=job.name, host=job.host.name, version=v, layout="link", from_target=cur, back_target=cur,
                from_serial=job.info.serial, to_serial=old_serial or "", now=now)))
        failed = await asyncio.to_thread(intents_mod.write_all, self.store, [i for _, i in made]) if made else {}
        out = []
        for job, intent in made:
            if job.name not in failed:
                job.intent = intent
                interrupt.tally().committing.add((job.cert.name, job.host.name))
                out.append(job)
        return out

    async def settle(self, rem: RemoteSession, host: Host, jobs: Sequence[Job], state: Inspection,
                     inspect: Sequence[str]) -> Inspection:
        """Settle what interrupted runs left for these certificates on this host, from their live links as inspected.

        Returns the inspection to go on with: a fresh one when an intent was too young to tell "never
        switched" from "its commit is still running there" (intents.recheck_in), else `state`.
        """
        if self.store is None:
            return state
        try:
            store = self.store

            def look() -> dict[str, list[intents_mod.Intent]]:  # every certificate's in one thread hop
                return {job.name: found for job in jobs if (found := intents_mod.pending(store, job.name, host.name))}

            left = await asyncio.to_thread(look)
            if not left:
                return state
            wait = max(intents_mod.recheck_in(its, layout=state.certs[n].layout, target=state.certs[n].target,
                                              versions=set(state.certs[n].versions), now=dt.datetime.now(dt.UTC),
                                              last_commit=state.certs[n].last_commit)
                       for n, its in left.items())
            if wait > 0:
                # young: its commit may still be starting or running on the POP. Look again once the POP
                # lock is free — a running commit holds it until it ends, so what we read then is final.
                await asyncio.sleep(wait)
                again = list(inspect)
                again[5] = "1"
                state = parse_inspection(await rem.run_script(INSPECT_SH, again, step="inspect"))
                if (locked_out := popguard.lock_error(state.raw, host, inspect[0])) is not None:
                    raise DeployError(locked_out, hint=popguard.LOCK_HINT)  # wrapped just below
            by_name = {job.name: job for job in jobs}

            def settle(its: list[intents_mod.Intent], cs: CertState) -> list[tuple[intents_mod.Intent, str]]:
                with self.state_lock:  # it may write the deploy state
                    return intents_mod.settle(store, its, layout=cs.layout, target=cs.target,
                                              versions=set(cs.versions), last_commit=cs.last_commit)

            for n, its in left.items():
                verdicts = await asyncio.to_thread(settle, its, state.certs[n])
                # the interrupted run switched this POP but never pruned it (killed, paused, fenced): we do
                switched = [intent for intent, what in verdicts if what == "deployed"]
                if switched and n in by_name:
                    by_name[n].settled = True
                    last = switched[-1]
                    # a link it replaced (not a certbot conversion, whose copy may have taken another name)
                    if last.back_target and last.layout == "link":
                        by_name[n].unverified = (last.back_target, last.from_serial)
        except CertmgrError as exc:  # switching again before the last switch is audited would lose it
            raise DeployError(f"cannot settle an interrupted deploy: {exc.message} (nothing changed)",
                              hint=exc.hint) from exc
        return state

    async def prune_host(self, rem: RemoteSession, host: Host, jobs: Sequence[Job], keep: int,
                    token: fence.Token | None = None) -> None:
        """Prune these certificates on one POP to their newest `keep` versions: one prune.sh for all, under the
        POP's flock; `token` (the POP lock's epoch, two controllers) fences it like commit.sh: a newer
        controller's epoch on the POP refuses it, nothing removed."""
        if not jobs:
            return
        root = remote_mod.check_remote_path(host.cert_root)
        names = [job.cert.name for job in jobs]
        try:
            res = await rem.run_script(PRUNE_SH, [root, str(keep), self.lock_wait, *fence.args(token), *names],
                                       step="prune")
        except DeployError as exc:
            logger.warning("prune %s on %s: %s", ", ".join(names), host.name, exc)
            return
        fenced = fence.refusal(res, host, token)
        if fenced:
            event(logger, logging.ERROR, "prune refused by the POP's fence", certs=",".join(names), host=host.name,
                  why=fenced)
            for job in jobs:
                await self.audit("fenced", job.cert.name, host=host.name, step="prune",
                                 epoch=token.epoch if token else None,
                                 summary=f"{job.subject}: {fenced} (nothing pruned)")
            return
        locked_out = popguard.lock_error(res, host, root)
        if locked_out:
            logger.warning("prune %s on %s: %s (nothing removed)", ", ".join(names), host.name, locked_out)
            return
        _, per = sections(res)
        for job in jobs:
            said = per.get(job.cert.name, {})
            removed = sorted(int(v) for v in said.get("removed", []) if v.isdigit())  # oldest first, as ever
            if removed:
                kept = said.get("kept_live", [""])[-1]
                await self.audit("pruned", job.cert.name, host=host.name, removed=removed, kept_live=kept, keep=keep)
            for v in said.get("prune_failed", []):
                logger.warning("prune %s on %s: could not remove version %s", job.cert.name, host.name, v)


def state_entry(entry: dict[str, Any], o: HostOutcome, now: dt.datetime, local_version: int | None) -> None:
    """Update one host's entry of `state/deploy/<name>.json` with outcome `o` of the deploy started at `now`."""
    entry.update({"status": o.status.value, "at": now.isoformat(), "error": o.error,
                  "wanted_serial": o.new_serial, "local_version": local_version})
    if o.status == Status.DEPLOYED:
        entry["deployed_at"] = now.isoformat()
    # `serial`: what the POP served at the last handshake that confirmed it (`serial_at`), kept through failures
    if o.status in (Status.DEPLOYED, Status.SKIPPED):
        entry.update({"serial": o.new_serial, "version": o.version, "serial_at": now.isoformat(), "verified": True})
    elif o.status == Status.ROLLED_BACK:
        entry.update({"serial": o.old_serial, "version": o.version, "serial_at": now.isoformat(), "verified": True})


def all_serve(seen: Mapping[str, Probe], serial: str) -> bool:
    return all(serial_of_probe(p) == serial for p in seen.values())

