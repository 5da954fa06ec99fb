"""One host's transaction, step by step: inspect, decide, upload, commit, verify (and roll back).

Every certificate due on the host goes through each step together: one inspect script, one commit
script (swap each `live/<name>` with one rename, ONE test, ONE reload, or all switched back), one
round of handshakes, and one rollback script for just the certificates that did not verify.
Outcomes stay per certificate; `done` collects them as they are decided.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from certmgr import interrupt, popguard
from certmgr import remote as remote_mod
from certmgr.deploy import reload as reload_mod
from certmgr.deploy.fence import Token
from certmgr.deploy.host import Deployer, Job, RemoteSession, all_serve, argv_text
from certmgr.deploy.model import Commit, HostOutcome, Inspection, Status, parse_commit, parse_inspection
from certmgr.deploy.plan import command_label, decide, quote_text, sni_names, verify_failure, version_of_target
from certmgr.deploy.shell import COMMIT_SH, INSPECT_SH
from certmgr.deploy.steps import (
    after_failed_test,
    commit_args,
    read_commit,
    rollback_after_verify,
    undo_unverified,
)
from certmgr.errors import DeployError
from certmgr.inventory import Host
from certmgr.log import event

logger = logging.getLogger(__name__)


class Transaction:
    def __init__(self, d: Deployer, rem: RemoteSession, host: Host, jobs: Sequence[Job],
                 done: dict[str, HostOutcome], *, start: float) -> None:
        self.d, self.rem, self.host, self.jobs, self.done, self.start = d, rem, host, jobs, done, start
        self.loop = d.loop
        self.root = ""
        self.test = self.reload = ""
        self.reload_argv: tuple[str, ...] = ()  # what self.reload runs: reload_command, or its fallback (reload.py)
        self.reload_resolved = False
        self.note: str | None = None  # said on every outcome of this transaction (the reload fallback)
        self.preflight = True  # inspect ran the test before any change (else the commit's retest judges)
        self.fence: Token | None = None  # the POP lock's epoch for commit.sh (None: directory store)

    def finish(self, job: Job, status: Status, **kw: Any) -> None:
        if self.note is not None:
            kw.setdefault("note", self.note)
        self.done[job.name] = self.d.outcome(job, status, start=self.start, **kw)

    def undone(self, jobs: Sequence[Job] | None = None) -> list[Job]:
        return [j for j in (self.jobs if jobs is None else jobs) if j.name not in self.done]

    async def run_shielded(self) -> None:
        """Run; when cancelled (SIGINT/SIGTERM) while the commit runs, let it finish and audit first.

        The commit script runs on the POP whatever happens here; waiting (at most interrupt.GRACE, cut by a
        second cancellation) lets its outcome be audited now rather than settled from its intents next run.
        """
        work = asyncio.ensure_future(self.run_audited())
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # polled: a task group cancels its tasks only once, so the second signal arrives as a count
            deadline = self.loop.time() + interrupt.GRACE
            while (any(j.intent is not None for j in self.jobs) and not work.done()
                   and interrupt.state().count < 2):
                if self.loop.time() >= deadline:
                    break
                await asyncio.wait([work], timeout=0.05)
            if not work.done():
                work.cancel()  # and let it unwind before the connection it uses is closed
                await asyncio.wait([work], timeout=self.d.timeouts.connect)
            if work.done() and not work.cancelled():
                work.exception()  # retrieved: its outcome is in the tally and the audit log already
            raise

    async def run_audited(self) -> None:
        self.start = self.loop.time() - max((j.timings.get("connect", 0.0) for j in self.jobs), default=0.0)
        try:
            await self.run()
        except remote_mod.RemoteTimeout as exc:
            # every certificate still open was part of the script that timed out; their intents stay
            for job in self.undone():
                event(logger, logging.ERROR, "remote script timed out; host left alone", cert=job.name,
                      host=self.host.name)
                self.finish(job, Status.UNKNOWN,
                            hint=f"the script may still be running on {self.host.name} (it holds the POP lock "
                                 "until it ends); the next run inspects the host afresh",
                            error=f"{job.subject}: {exc.message} (state unknown; host left alone for the rest "
                                  "of this run)")
            await self.record(cut=True)
            return
        except (remote_mod.ConnectionLost, DeployError) as exc:
            for job in self.undone():  # a switch may have happened unheard: their intents stay for the next run
                d = job.decision
                old = d.old_serial if d is not None else None
                if isinstance(exc, remote_mod.ConnectionLost) and job.intent is not None:
                    # the commit was under way: the POP's script runs to its end whatever became of us
                    self.finish(job, Status.UNKNOWN, old_serial=old, error=f"{job.subject}: {exc.message} (state "
                                f"unknown: the commit may have run on {self.host.name}; the next deploy settles it)",
                                hint=exc.hint or f"`certmgr deploy {job.name}` inspects {self.host.name} and settles "
                                                 "what happened there")
                else:
                    self.finish(job, Status.FAILED, old_serial=old, hint=exc.hint,
                                error=f"{job.subject}: {exc.message}")
            await self.record(cut=True)
            return
        await self.record(cut=False)

    async def record(self, *, cut: bool) -> None:
        """Each switch's audit row, the intent's removal and the host's deploy state: one store transaction
        for the host (Deployer.record). `cut`: the run stopped early; only jobs whose switch is audited
        (their outcome known) are recorded, the others keep their intents for the next run to settle."""
        jobs = [j for j in self.jobs if j.intent is not None and (j.rows or not cut)]
        if self.d.store is not None and jobs:
            await asyncio.to_thread(self.d.record, jobs, dict(self.done))

    # -- the steps

    async def run(self) -> None:
        host = self.host
        self.root = remote_mod.check_remote_path(host.cert_root)
        for job in self.jobs:
            remote_mod.check_name(job.name)
        self.test = argv_text(host.test_command, "test_command", host)
        self.reload = argv_text(host.reload_command, "reload_command", host)
        self.reload_argv = host.reload_command
        state = await self.inspect()
        if state is None:
            return
        todo = await self.decide(state)
        if not todo:
            return
        if interrupt.stopping():
            for job in todo:
                self.done[job.name] = self.d.not_started(job, start=self.start)
            return
        # the default reload, or the old one where sudo allows only that: asked only when a commit is due, and
        # before the intents are written (a failed question leaves nothing for the next run to settle)
        await self.resolve_reload()
        todo = await self.upload(todo)
        if not todo:
            return
        commit = await self.commit(todo)
        if commit is None:
            return
        if commit.reload_rc not in (None, 0) and self.reload_argv == host.reload_command:
            await reload_mod.forget(self.d, host)  # a kept "allowed" no longer holds: ask on the next deploy
        swapped = [j for j in todo if j.name not in self.done]
        if not commit.done:
            await asyncio.gather(*(after_failed_test(self, job, commit) for job in swapped))
            return
        await self.verify(swapped, commit)

    async def resolve_reload(self) -> None:
        """The reload argv for this host (reload.resolve: the default, or its fallback), asked once per transaction."""
        if self.reload_resolved:
            return
        self.reload_argv, self.note = await reload_mod.resolve(self.d, self.rem, self.host)
        self.reload = argv_text(self.reload_argv, "reload_command", self.host)
        self.reload_resolved = True

    async def inspect(self) -> Inspection | None:
        """One script for every certificate: layouts, versions, live fullchains, and the preflight test."""
        host, names = self.host, [j.name for j in self.jobs]
        t = self.loop.time()
        args = [self.root, names[0], self.test, host.privkey_chown, self.d.lock_wait, "", *names[1:]]
        state = parse_inspection(await self.rem.run_script(INSPECT_SH, args, step="inspect"))
        for job in self.jobs:
            job.timings["inspect"] = self.loop.time() - t
        locked_out = popguard.lock_error(state.raw, host, self.root)
        if locked_out:
            for job in self.jobs:
                self.finish(job, Status.FAILED, error=f"{job.subject}: {locked_out} (nothing changed)",
                            hint=popguard.LOCK_HINT)
            return None
        if state.test_rc is None or any(n not in state.certs for n in names):
            raw = state.raw
            raise remote_mod.RemoteCommandError(
                f"inspect {host.name}: unexpected output (exit {raw.exit_status}): "
                f"{quote_text(raw.stderr or raw.stdout, 300)} (nothing changed)",
                hint="the login shell of the deploy user must be POSIX sh compatible, with coreutils")
        state = await self.d.settle(self.rem, host, self.jobs, state, args)
        for restored in state.restored:
            event(logger, logging.WARNING, "restored certbot's live directory left by an interrupted conversion",
                  cert=restored, host=host.name)
        self.preflight = state.preflight
        if state.test_rc != 0:
            for job in self.jobs:
                d = decide(state.certs[job.name], name=job.name, root=self.root, fullchain=job.material.fullchain,
                           local_version=job.local_version, keyown=host.privkey_chown)
                self.broken_before(job, state.test_rc, state.test_out, old_serial=d.old_serial,
                                   version=d.prev_version)
            return None
        return state

    def broken_before(self, job: Job, rc: int | None, out: str, *, old_serial: str | None,
                      version: int | None, outcome: str = "nothing changed") -> None:
        """The test fails without certmgr's change (the preflight, or the retest after switching back)."""
        host = self.host
        text = out or f"exit status {rc}, no output"
        if text.startswith("sudo:") or rc in (126, 127):
            self.finish(job, Status.FAILED, old_serial=old_serial, version=version,
                        error=f"{job.subject}: {command_label(host.test_command)} cannot run: "
                              f"{quote_text(text)} ({outcome})",
                        hint="check test_command and the deploy user's sudoers lines (docs/deploy.md)")
        else:
            self.finish(job, Status.FAILED, old_serial=old_serial, version=version,
                        error=f"{job.subject}: config was already broken before deploy: {quote_text(text)} "
                              f"({outcome})",
                        hint=f"fix the web server config on {host.name} first; its test command fails "
                             "without certmgr")

    async def decide(self, state: Inspection) -> list[Job]:
        """Per certificate: skip (this version live and served), refuse, or go on to upload."""
        for job in self.jobs:
            job.state = state.certs[job.name]
            job.decision = decide(job.state, name=job.name, root=self.root, fullchain=job.material.fullchain,
                                  local_version=job.local_version, keyown=self.host.privkey_chown)
        maybe = [j for j in self.jobs if j.decision and j.decision.maybe_skip]
        seen = await asyncio.gather(*(self.d.served(self.host, sni_names(j.cert)) for j in maybe))
        unverified: list[Job] = []
        for job, s in zip(maybe, seen, strict=True):
            if all_serve(s, job.info.serial):
                self.skipped(job)
            elif job.unverified is not None:
                unverified.append(job)  # switched by a run that died before verifying, and not served yet
        if unverified:
            await self.verify_settled(unverified)
        for job in self.undone():
            d = job.decision
            assert d is not None
            if d.refused:
                self.finish(job, Status.FAILED, old_serial=d.old_serial, error=f"{job.subject}: {d.refused}",
                            hint=d.hint)
        return self.undone()

    def skipped(self, job: Job) -> None:
        d = job.decision
        assert d is not None
        self.finish(job, Status.SKIPPED, old_serial=d.old_serial, version=d.prev_version,
                    previous_version=d.prev_version)

    async def verify_settled(self, jobs: list[Job]) -> None:
        """The verify a run that died after switching these never finished: the new serial within the verify's
        time (that run's commit may still be running on the POP, its reload to come), else switched back to the
        link that switch replaced (steps.undo_unverified), under an intent of its own (Deployer.intend_back)."""
        waited = await self.d.wait_all(self.host, [(sni_names(j.cert), j.info.serial) for j in jobs])
        back = []
        for job, (ok, seen) in zip(jobs, waited, strict=True):
            if ok:
                self.skipped(job)
            else:
                back.append((job, seen))
        if not back or interrupt.stopping():
            return
        await self.resolve_reload()  # the reload this host takes (its fallback, where sudo allows only that)
        going = {id(j) for j in await self.d.intend_back([j for j, _ in back])}
        if going:
            await undo_unverified(self, [(j, seen) for j, seen in back if id(j) in going])

    async def upload(self, todo: list[Job]) -> list[Job]:
        """Name each new version's temp dir and write the intents; the files go up on the commit's stdin."""
        if interrupt.stopping():
            for job in todo:
                self.done[job.name] = self.d.not_started(job, start=self.start)
            return []
        for job in todo:
            d = job.decision
            assert d is not None
            job.tmp = f".tmp-up-{self.d.tag}-{self.d.upload_token}-{d.version}"  # <prefix><version>: commit.sh
        failed = await self.d.intend_all(todo)
        for job in todo:
            if (exc := failed.get(job.name)) is not None:
                self.finish(job, Status.FAILED, hint=exc.hint, error=f"{job.subject}: {exc.message}")
        return self.undone(todo)

    def tmpdir(self, job: Job) -> str:
        return f"{self.root}/archive/{job.name}/{job.tmp}"

    async def no_space(self, path: str, files: Mapping[str, bytes]) -> str | None:
        """After a failed upload: "no space left on POP:<path> (N KB free)" when that is the cause, else None."""
        try:
            free = await self.rem.run_script(popguard.FREE_SH, [path], step="free space")
        except DeployError as exc:
            logger.info("free space on %s: %s", self.host.name, exc)
            return None
        return popguard.upload_failure(self.host, path, free, {f: (data, 0) for f, data in files.items()})

    async def commit(self, todo: list[Job]) -> Commit | None:
        """ONE commit script for all: store and swap each, one test, one reload (or all switched back)."""
        t = self.loop.time()
        args, data = commit_args(self, todo)
        try:
            res = parse_commit(await self.rem.run_streamed(COMMIT_SH, args, data, step="commit"))
        except remote_mod.StreamCut as exc:  # before the script's `go`: it switched nothing, and removed the upload
            for job in todo:
                d = job.decision
                assert d is not None
                self.finish(job, Status.FAILED, old_serial=d.old_serial, version=d.prev_version,
                            error=f"{job.subject}: {exc.message} during upload (live unchanged)",
                            hint="rerun deploy; a partial upload left behind is a hidden temp dir swept by the "
                                 "next run")
            return None
        for job in todo:
            job.timings["commit"] = self.loop.time() - t
        return await read_commit(self, todo, res)

    async def verify(self, swapped: list[Job], commit: Commit) -> None:
        """Every name of every swapped certificate by handshake; those that fail are rolled back together."""
        t = self.loop.time()
        checks = await self.d.wait_all(self.host, [(sni_names(j.cert), j.info.serial) for j in swapped])
        bad: list[tuple[Job, str]] = []
        for job, (ok, seen) in zip(swapped, checks, strict=True):
            job.timings["verify"] = self.loop.time() - t
            d = job.decision
            assert d is not None
            cc = commit.certs[job.name]
            prev_version = version_of_target(cc.prev, job.name)
            if ok:
                event(logger, logging.INFO, "deployed", cert=job.name, host=self.host.name, version=d.version,
                      serial=job.info.serial, old_serial=d.old_serial)
                await self.d.audit("deployed", job.name, job=job, frm=d.old_serial, to=job.info.serial,
                                   host=self.host.name, version=d.version, previous_version=prev_version,
                                   summary=f"deployed {job.name} to {self.host.name}: serial "
                                           f"{d.old_serial or '-'} → {job.info.serial}")
                self.finish(job, Status.DEPLOYED, old_serial=d.old_serial, version=d.version,
                            previous_version=prev_version, converted=cc.converted is not None)
            else:
                bad.append((job, verify_failure(job.info.serial, seen, self.d.timeouts.verify)))
        if bad:
            await rollback_after_verify(self, bad, commit)
