"""The commit and rollback halves of a host's transaction: script arguments, and reading their
answers into per-certificate outcomes (audited)."""

from __future__ import annotations

import asyncio
import logging
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from certmgr import popguard, sanitize
from certmgr import remote as remote_mod
from certmgr.deploy import fence
from certmgr.deploy import reload as reload_mod
from certmgr.deploy.model import Commit, Status, parse_rollback
from certmgr.deploy.plan import (
    FILE_ORDER,
    command_label,
    quote_text,
    served_text,
    sni_names,
    verify_failure,
    version_of_target,
)
from certmgr.deploy.shell import ROLLBACK_SH
from certmgr.errors import DeployError
from certmgr.log import event

if TYPE_CHECKING:
    from certmgr.deploy.host import Job
    from certmgr.deploy.txn import Transaction
    from certmgr.probe import Probe

logger = logging.getLogger(__name__)

# the upload's temp dir (txn.py): .tmp-up-<controller tag>-<hex per run>-<version>
TMP_NAME = re.compile(r"\.tmp-up-[A-Za-z0-9_.-]{1,200}")

# what a tar that is not GNU tar (BusyBox) or no tar at all says to receive.sh's options
_NOT_GNU_TAR = ("unrecognized option", "invalid option", "not found", "unknown option")

_WHAT = {"unreceived": "not uploaded (the upload of the certificates due here stopped)",
         "verify": "uploaded files do not match their SHA-256", "sync": "fsync failed",
         "rename": "cannot store the version", "convert": "cannot convert certbot's layout",
         "swap": "cannot switch the live link"}


# the mode of each file of a version on a POP: the private key readable by its owner alone from creation
_MODES = {"fullchain.pem": 0o644, "privkey.pem": 0o600, "cert.pem": 0o644, "chain.pem": 0o644}


def upload_archive(uploads: Sequence[tuple[str, str, int, Mapping[str, bytes]]], *, mtime: float,
                   cache: dict[tuple[str, str, int], bytes] | None = None) -> bytes:
    """The upload as ONE tar archive (scripts/receive.sh) of `uploads` (name, temp dir, version, files), built
    from validated names only: each certificate's files as archive/<name>/<tmp>/<file> (owner 0, which the
    POP's tar does not keep; the modes they get there, which it does under umask 022: _MODES), then its new
    live link, staged as live/<first tmp>/<name> ->
    ../archive/<name>/<version>. The bytes tarfile writes (GNU format), member by member.

    `cache`: one run's certificate blocks by (name, temp dir, version): every POP of the run gets the same
    files under the same temp dir name (the run's, per certificate), so each block is built once, not per POP.
    """
    for name, tmp, version, _ in uploads:
        remote_mod.check_name(name)
        if not TMP_NAME.fullmatch(tmp) or ".." in tmp or version < 0:
            raise DeployError(f"deploy {name}: temp dir {tmp!r} or version {version} is not acceptable")
    cache = {} if cache is None else cache
    stage = uploads[0][1]
    parts = []
    for name, tmp, version, files in uploads:
        block = cache.get((name, tmp, version))
        if block is None:
            block = cache[(name, tmp, version)] = b"".join(
                _member(f"archive/{name}/{tmp}/{f}", _MODES[f], mtime, files[f]) for f in FILE_ORDER)
        parts.append(block)
    for name, _, version, _ in uploads:
        parts.append(_member(f"live/{stage}/{name}", 0o777, mtime, link=f"../archive/{name}/{version}"))
    body = b"".join(parts) + tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end of the archive
    return body + tarfile.NUL * (-len(body) % tarfile.RECORDSIZE)


def _member(path: str, mode: int, mtime: float, data: bytes = b"", *, link: str | None = None) -> bytes:
    """One member as tarfile's addfile writes it: its header (GNU: long names as ././@LongLink members),
    then its data padded to a block."""
    info = tarfile.TarInfo(path)
    info.mode, info.mtime = mode, int(mtime)
    if link is None:
        info.size = len(data)
    else:
        info.type, info.linkname = tarfile.SYMTYPE, link
    head = info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
    return head + data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


def link_line(job: Job) -> str:
    """`link TARGET` and a newline: the live link's target as inspect read it, ahead of the job's SHA-256 lines;
    commit.sh takes it as the rollback target, without a `readlink`, where the link still leads to that
    directory (else it reads the link). "" when inspect found no link (or a target a line cannot carry)."""
    st = job.state
    if st is None or st.layout != "link" or not st.target or "\n" in st.target:
        return ""
    return f"link {st.target}\n"


def commit_args(t: Transaction, todo: Sequence[Job]) -> tuple[list[str], bytes]:
    """commit.sh's positional arguments (the first certificate, the common ones, five per further
    certificate) and its stdin: ONE tar archive of every certificate's files and staged live link."""
    def five(job: Job) -> list[str]:
        d = job.decision
        assert d is not None
        return [job.name, job.tmp, str(d.version), link_line(job) + t.d.sums(job), d.conv]

    uploads = []
    for job in todo:
        assert job.decision is not None
        uploads.append((job.name, job.tmp, job.decision.version, job.material.files()))
    data = upload_archive(uploads, mtime=t.d.now.timestamp(), cache=t.d.upload_blocks)
    stamp = t.d.now.strftime("%Y%m%dT%H%M%SZ")
    args = [t.root, *five(todo[0]), t.test, t.reload, t.host.privkey_chown, t.d.tag, stamp, t.d.lock_wait,
            *fence.args(t.fence), str(len(data))]
    for job in todo[1:]:
        args += five(job)
    return args, data


async def read_commit(t: Transaction, todo: Sequence[Job], res: Commit) -> Commit | None:
    """Audit what the commit did per certificate; finish those it could not swap. None: nothing more to do."""
    host, keyown = t.host, t.host.privkey_chown
    fenced = fence.refusal(res.raw, host, t.fence)
    if fenced:
        await fence.audit_refusal(t, todo, fenced)
    locked_out = popguard.lock_error(res.raw, host, t.root) or fenced
    if locked_out:
        for job in todo:
            d = job.decision
            assert d is not None
            await t.rem.remove_tree_quietly(t.tmpdir(job))
            t.finish(job, Status.FAILED, old_serial=d.old_serial, version=d.prev_version,
                     error=f"{job.subject}: {locked_out} (live unchanged)",
                     hint=fence.HINT if fenced else popguard.LOCK_HINT)
        return None
    for job in todo:
        d, cc = job.decision, res.certs.get(job.name)
        assert d is not None
        if cc is None:
            continue
        if cc.aside is not None:
            event(logger, logging.WARNING, "set aside a version directory of other content", cert=job.name,
                  host=host.name, version=d.version, to=cc.aside)
            await t.d.audit("set aside", job.name, job=job, host=host.name, version=d.version,
                            to=f"archive/{job.name}/{cc.aside}",
                            summary=f"archive/{job.name}/{d.version}/ on {host.name} held other content: moved to "
                                    f"archive/{job.name}/{cc.aside}/ so that {d.version} names the store's version")
        if cc.converted is not None:
            await t.d.audit("converted", job.name, job=job, frm="certbot live/ directory",
                            to=f"live/{job.name} symlink", host=host.name, version=int(d.conv),
                            summary=f"converted {job.name} on {host.name} from certbot's layout "
                                    f"(its version {d.conv} kept as archive/{job.name}/{cc.convdir or d.conv}/)")
        step = cc.failed_step
        if step is not None:
            text = cc.failed_out or res.raw.stderr.strip()
            if step in ("verify", "chown", "sync", "aside", "rename"):
                await t.rem.remove_tree_quietly(t.tmpdir(job))
            what, shown = _WHAT.get(step, f"step {step} failed"), quote_text(text)
            if step == "upload":  # receive.sh removed every temp dir it made: nothing to clean
                full = await t.no_space(f"{t.root}/archive/{job.name}", job.material.files())
                # the free space names the cause; else the tool's own words (mkdir, head)
                what, shown = (full, "") if full else (f"upload {host.name}", sanitize.flat(text, limit=300))
            if step == "chown":
                what = f"cannot give privkey.pem to {keyown}"
            elif step == "aside":
                what = f"cannot set aside archive/{job.name}/{d.version}/ (other content)"
            hint = None
            if step == "chown" or (step == "convert" and keyown and ("chown" in text or "chgrp" in text)):
                hint = (f"a deploy user that is not root can only give files to a group it belongs to: check "
                        f"privkey_owner/privkey_group of {host.name}")
            elif step in ("upload", "unreceived") and "tar" in text and any(w in text for w in _NOT_GNU_TAR):
                hint = f"the upload is one tar archive: {host.name} needs GNU tar (package tar; docs/deploy.md)"
            t.finish(job, Status.FAILED, old_serial=d.old_serial, version=d.prev_version,
                     error=f"{job.subject}: {what}{': ' + shown if shown else ''} (live unchanged)", hint=hint)
    odd = [j for j in t.undone(todo) if j.name not in res.certs or not res.certs[j.name].swapped]
    if odd:
        raise remote_mod.RemoteCommandError(
            f"commit {host.name}: unexpected output (exit {res.raw.exit_status}): "
            f"{quote_text(res.raw.stderr or res.raw.stdout, 300)} (state unknown: rerun deploy)")
    return res if t.undone(todo) else None


async def after_failed_test(t: Transaction, job: Job, res: Commit) -> None:
    """The shared test (or reload) failed after the swaps: commit.sh switched every certificate back."""
    host, d, cc = t.host, job.decision, res.certs[job.name]
    assert d is not None
    old_serial, version = d.old_serial, d.version
    prev_version = version_of_target(cc.prev, job.name)
    converted = cc.converted is not None
    reload_failed = res.reload_rc is not None
    if reload_failed:
        step, text = f"{command_label(t.reload_argv)} failed", res.reload_out
    else:
        step, text = f"{command_label(host.test_command)} failed", res.test_out
    retest_ok = res.retest_rc == 0 and cc.rolled_back is True
    if not t.preflight and not reload_failed and cc.rolled_back is True and res.retest_rc != 0:
        # No preflight ran (inspect.sh): switched back without a reload, the test still fails: the
        # config was broken without us. Live and served are as they were; the version stays stored.
        t.broken_before(job, res.retest_rc, res.retest_out, old_serial=old_serial,
                        version=version_of_target(cc.prev, job.name),
                        outcome=f"live unchanged, not reloaded; version {version} stored for the next deploy")
        return
    back = f"version {prev_version}" if prev_version is not None else "the previous version"
    status = Status.FAILED
    if not retest_ok:
        outcome = (f"rollback to {back} done but the test still fails: {quote_text(res.retest_out, 300)}"
                   if cc.rolled_back else f"could NOT switch back to {back}")
    elif not reload_failed:
        outcome = f"rolled back to {back}, not reloaded"  # nginx never loaded the new files
        status = Status.ROLLED_BACK
    else:
        # The failed reload may have loaded the new files all the same: commit.sh switched back,
        # tested and reloaded again; only a handshake shows which certificate is served now.
        again = ("reloaded again" if res.rereload_rc == 0 else
                 f"reload failed again: {quote_text(res.rereload_out, 300)}")
        restored, seen = ((await t.d.wait_served(host, sni_names(job.cert), old_serial))
                          if old_serial is not None else (res.rereload_rc == 0, {}))
        if restored:
            outcome = f"rolled back to {back}, {again}" + (f": old serial {old_serial} served" if old_serial else "")
            status = Status.ROLLED_BACK
        else:
            outcome = f"switched back to {back}, {again}, but {host.name} serves {served_text(seen)}"
    if status == Status.ROLLED_BACK:
        await t.d.audit("rolled back", job.name, job=job, frm=job.info.serial, to=old_serial, host=host.name,
                        version=prev_version, failed_version=version,
                        summary=f"rolled back {job.name} on {host.name} to {back}: {step}")
    else:
        await t.d.audit("rollback failed", job.name, job=job, frm=job.info.serial, to=old_serial, host=host.name,
                        summary=f"{job.subject}: {step}; {outcome}")
    ok = status == Status.ROLLED_BACK
    hint = None if ok else f"log in to {host.name} and repair the web server config now"
    if reload_failed and text.startswith("sudo:"):  # sudo refused the reload argv itself
        hint = (f"sudo on {host.name} refuses the reload: add `{reload_mod.sudoers_line(host.user, t.reload_argv)}` "
                "to sudoers (docs/deploy.md, \"Reload\")" + ("" if ok else f"; then {hint}"))
    t.finish(job, status, old_serial=old_serial, previous_version=prev_version,
             version=prev_version if ok else None, converted=converted,
             error=f"{job.subject}: {step}: {quote_text(text)} ({outcome})", hint=hint)


async def rollback_after_verify(t: Transaction, bad: Sequence[tuple[Job, str]], commit: Commit) -> None:
    """Switch back just the certificates that did not verify: one script, one test, one reload; then
    each old serial is verified by handshake."""
    backs = []
    for job, cause in bad:
        d, cc = job.decision, commit.certs[job.name]
        assert d is not None
        backs.append((job, cause, cc.prev, d.old_serial, cc.converted is not None))
    await switch_back(t, backs)


async def undo_unverified(t: Transaction, jobs: Sequence[tuple[Job, Mapping[str, Probe]]]) -> None:
    """An interrupted run switched these (settled by this deploy) and died before verifying; the new version is not
    served (what the verify saw): switch each back where that run would have on a failed verify — the link it
    replaced — and verify the serial served before, as a verify failure of that run's transaction."""
    backs = []
    for job, seen in jobs:
        assert job.unverified is not None and job.decision is not None
        target, old_serial = job.unverified
        cause = (f"version {job.decision.version}, switched by an interrupted run, is not served: "
                 f"{verify_failure(job.info.serial, seen, t.d.timeouts.verify)}")
        backs.append((job, cause, target, old_serial, False))
    await switch_back(t, backs)


async def switch_back(t: Transaction, backs: Sequence[tuple[Job, str, str, str | None, bool]]) -> None:
    """(job, cause, the link target to switch back to, the serial that must be served then, converted): one
    rollback script for all, one test, one reload; each outcome ROLLED_BACK once its old serial is served."""
    host = t.host
    (first, _, first_back, _, _), *more = backs
    args = [t.root, first.name, first_back, t.test, t.reload, t.d.lock_wait, *fence.args(t.fence)]
    for job, _, back_target, _, _ in more:
        args += [job.name, back_target]
    res = parse_rollback(await t.rem.run_script(ROLLBACK_SH, args, step="rollback"))
    locked_out = popguard.lock_error(res.raw, host, t.root) or fence.refusal(res.raw, host, t.fence)

    async def settle_one(job: Job, cause: str, back_target: str, old_serial: str | None, converted: bool) -> None:
        d = job.decision
        assert d is not None
        prev_version = version_of_target(back_target, job.name)
        back = f"version {prev_version}" if prev_version is not None else "the previous version"
        if locked_out:
            outcome = f"could NOT switch back to {back}: {locked_out}"
        elif not res.rolled_back.get(job.name):
            outcome = f"could NOT switch back to {back}"
        elif res.retest_rc != 0:
            outcome = f"switched back to {back} but the test fails: {quote_text(res.retest_out)}"
        elif res.reload_rc != 0:
            outcome = f"switched back to {back} but reload fails: {quote_text(res.reload_out)}"
        else:
            restored = True
            if old_serial is not None:
                restored, _ = await t.d.wait_served(host, sni_names(job.cert), old_serial)
            if restored:
                await t.d.audit("rolled back", job.name, job=job, frm=job.info.serial, to=old_serial, host=host.name,
                                version=prev_version, failed_version=d.version,
                                summary=f"rolled back {job.name} on {host.name} to {back}: {cause}")
                t.finish(job, Status.ROLLED_BACK, old_serial=old_serial, version=prev_version,
                         previous_version=prev_version, converted=converted,
                         error=f"{job.subject}: {cause} (rolled back to {back}, reloaded)")
                return
            outcome = f"switched back to {back} and reloaded, but serial {old_serial} is not served either"
        await t.d.audit("rollback failed", job.name, job=job, frm=job.info.serial, to=old_serial, host=host.name,
                        summary=f"{job.subject}: {cause}; {outcome}")
        t.finish(job, Status.FAILED, old_serial=old_serial, previous_version=prev_version, converted=converted,
                 error=f"{job.subject}: {cause} ({outcome})", hint=f"log in to {host.name} and check what nginx serves")

    await asyncio.gather(*(settle_one(*b) for b in backs))
