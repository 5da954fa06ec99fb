"""`certmgr revoke NAME`: after a key leak, replace the certificate with a new key everywhere, then revoke the old.

Order (the default): issue a replacement with a fresh key (never reused, whatever `reuse_key` says), deploy it
to every host through deploy() (test, reload, handshake verify per host), and only when every host serves it
revoke the old certificate(s) at the CA (RFC 8555 §7.6, signed with the account key). `now_first` revokes
first (the key is being abused right now and a short outage is the lesser harm). With reason keyCompromise,
every stored version sharing the leaked key is revoked (reuse_key makes several). Revoked serials are
recorded (certmgr.pins) so that no rollback makes one live again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from certmgr import deploy as deploy_mod
from certmgr import interrupt, pins
from certmgr import notify as notify_mod
from certmgr import renew as renew_mod
from certmgr.errors import ACMEError, CertmgrError, UsageError
from certmgr.inventory import Certificate, Inventory
from certmgr.issue import ACMEClient
from certmgr.log import event
from certmgr.material import public_key_der, serial_text
from certmgr.store_api import StateStore

log = logging.getLogger(__name__)

# RFC 5280 §5.3.1 CRLReason codes an ACME client may ask for (RFC 8555 §7.6; Let's Encrypt takes these four)
REASONS = {"keyCompromise": 1, "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5}


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One stored version to revoke."""

    version: int
    serial: str
    not_after: dt.datetime
    status: str = "pending"  # pending | revoked | already revoked | skipped: … | failed: …
    leaf_pem: str = ""  # the certificate as recorded when the revocation was asked for ("": read it from the store)


@dataclass(frozen=True, slots=True, kw_only=True)
class RevokeResult:
    """What `revoke` did for one certificate, in order."""

    name: str
    reason: str
    now_first: bool
    targets: tuple[Target, ...]
    renewal: renew_mod.RenewOutcome | None = None
    deploys: tuple[deploy_mod.HostOutcome, ...] = ()
    held: str | None = None  # why the old certificate(s) were NOT revoked
    notes: tuple[str, ...] = field(default=())
    elapsed: float = 0.0

    @property
    def revoked(self) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if t.status in ("revoked", "already revoked"))

    @property
    def ok(self) -> bool:
        return (self.held is None and all(o.ok for o in self.deploys)
                and (self.renewal is None or self.renewal.status == "renewed")
                and all(t.status in ("revoked", "already revoked") or t.status.startswith("skipped")
                        for t in self.targets))

    def lines(self) -> list[str]:
        out = list(self.notes)
        if self.renewal is not None:
            out.append(self.renewal.line())
        out += [line for o in self.deploys for line in o.lines()]
        for t in self.targets:
            if t.status.startswith("skipped: "):  # why, after what: not this request's reason, which it did not get
                out.append(f"{'skipped':<16} {self.name} version {t.version} serial {t.serial}: "
                           f"{t.status.removeprefix('skipped: ')}")
            else:
                out.append(f"{t.status:<16} {self.name} version {t.version} serial {t.serial} ({self.reason})")
        if self.held:
            out.append(f"NOT revoked: {self.held}")
        out.append(f"revoke {self.name}: {'done' if self.ok else 'INCOMPLETE'} in {self.elapsed:.1f}s")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "now_first": self.now_first, "ok": self.ok,
                "targets": [{"version": t.version, "serial": t.serial, "status": t.status} for t in self.targets],
                "renewal": self.renewal.to_json() if self.renewal else None,
                "deploys": [o.to_json() for o in self.deploys], "held": self.held, "notes": list(self.notes),
                "elapsed": round(self.elapsed, 3)}


def _serial_value(text: str) -> int | None:
    """A serial's number from its text as openssl, certmgr or a CA's page prints it; None if not hex."""
    try:
        return int(text.strip().replace(":", "").lower().removeprefix("0x") or "0", 16)
    except ValueError:
        return None


def targets(store: StateStore, name: str, *, reason: str, version: int | None, serial: str | None,
            now: dt.datetime, pending: pins.PendingRevocation | None = None) -> tuple[list[Target], list[str], bytes]:
    """The versions to revoke, notes on what was left out, and the leaked public key (SPKI DER).

    `pending`: an unfinished revocation, resumed: its versions, not the live one (which may be its replacement)."""
    versions = store.versions(name)
    if not versions:
        raise UsageError(f"revoke {name}: no stored version (nothing revoked)")
    infos = {}
    for v in versions:
        m = store.read(name, v)
        infos[v] = (m.info(), public_key_der(m.leaf.public_key()))
    if pending is not None:
        return _pending_targets(store, name, pending, infos, now)
    if serial is not None:
        want = _serial_value(serial)  # by value: `0x…`, with colons, any case, leading zeros or not
        found = [v for v, (i, _) in infos.items() if want is not None and _serial_value(i.serial) == want]
        if not found:
            raise UsageError(f"revoke {name} --serial {serial}: no stored version has that serial (nothing revoked)")
        base = found[0]
    elif version is not None:
        if version not in infos:
            raise UsageError(f"revoke {name} --version {version}: no version {version} in the store (versions: "
                             f"{', '.join(map(str, versions))}; nothing revoked)")
        base = version
    else:
        live = store.live_version(name)
        if live is None:
            raise UsageError(f"revoke {name}: nothing live; name one with --version N (nothing revoked)")
        base = live
    spki = infos[base][1]
    chosen = [v for v in versions if infos[v][1] == spki] if reason == "keyCompromise" else [base]
    notes = []
    if len(chosen) > 1:
        notes.append(f"versions {', '.join(map(str, chosen))} share the leaked key: all are revoked")
    return [_target(store, name, v, infos[v][0].serial, infos[v][0].not_after, now) for v in chosen], notes, spki


def _target(store: StateStore, name: str, version: int, serial: str, not_after: dt.datetime, now: dt.datetime,
            leaf_pem: str = "") -> Target:
    """A version to revoke, skipped when certmgr revoked it already or it has expired."""
    done = pins.load_revoked(store, name)
    status = "pending"
    if serial in done:
        was = done[serial]
        status = (f"skipped: already revoked by certmgr on {str(was.get('at', '?'))[:16]} "
                  f"as {was.get('reason') or '?'}")
    elif not_after <= now:
        status = "skipped: expired (a CA no longer revokes it; no client accepts it)"
    return Target(version=version, serial=serial, not_after=not_after, status=status, leaf_pem=leaf_pem)


def _pending_targets(store: StateStore, name: str, pending: pins.PendingRevocation,
                     infos: dict[int, tuple[Any, bytes]], now: dt.datetime) -> tuple[list[Target], list[str], bytes]:
    """The targets of an unfinished revocation as recorded when it was asked for, from the store or, for a version
    pruned since, from its recorded certificate; with keyCompromise also any version issued since with that key."""
    out, notes = [], []
    for v, recorded in zip(pending.versions, pending.serials, strict=True):
        pem = pending.leaf(v)
        leaf = _recorded_leaf(pem)
        if v in infos and infos[v][0].serial == recorded:
            out.append(_target(store, name, v, recorded, infos[v][0].not_after, now))
        elif leaf is not None and serial_text(leaf.serial_number) == recorded:
            out.append(_target(store, name, v, recorded, leaf.not_valid_after_utc, now, leaf_pem=pem))
            notes.append(f"version {v} is no longer in the store: revoked from the certificate recorded with the "
                         "request")
        else:
            out.append(Target(version=v, serial=recorded, not_after=now, status=(
                f"failed: no longer in the store and not recorded with the request: revoke serial {recorded} at the CA "
                f"by hand, then move state/revoking/{name}.json aside")))
    spki = bytes.fromhex(pending.spki) if pending.spki else next(
        (infos[t.version][1] for t in out if t.version in infos and infos[t.version][0].serial == t.serial), b"")
    if pending.reason == "keyCompromise" and spki:
        later = [v for v, (_, key) in sorted(infos.items()) if key == spki and v not in pending.versions]
        out += [_target(store, name, v, infos[v][0].serial, infos[v][0].not_after, now) for v in later]
        if later:
            notes.append(f"version{'s' if len(later) > 1 else ''} {', '.join(map(str, later))} carr"
                         f"{'y' if len(later) > 1 else 'ies'} the leaked key too (issued since with reuse_key): "
                         "revoked as well")
    what = ", ".join(str(v) for v in pending.versions)
    return out, [f"resuming the revocation asked at {pending.at:%Y-%m-%d %H:%M}Z ({pending.reason}): version"
                 f"{'s' if len(pending.versions) > 1 else ''} {what}", *notes], spki


def _recorded_leaf(pem: str) -> x509.Certificate | None:
    """The certificate recorded with a revocation request, None when none was or it does not parse."""
    try:
        return x509.load_pem_x509_certificate(pem.encode()) if pem else None
    except ValueError:
        return None


def _resumable(store: StateStore, name: str, *, reason: str, version: int | None, serial: str | None,
               now: dt.datetime) -> pins.PendingRevocation | None:
    """The unfinished revocation this request resumes; a request for something else is refused until it is done."""
    pending = pins.load_pending(store, name)
    if pending is None:
        return None
    refuse = (f"revoke {name}: the revocation asked at {pending.at:%Y-%m-%d %H:%M}Z (version"
              f"{'s' if len(pending.versions) > 1 else ''} {', '.join(map(str, pending.versions))}, {pending.reason}) "
              f"is not finished; finish it first with `certmgr revoke {name} --reason {pending.reason}` (nothing done)")
    if reason != pending.reason:
        raise UsageError(refuse)
    if version is not None or serial is not None:
        asked, _, _ = targets(store, name, reason=reason, version=version, serial=serial, now=now)
        if sorted(t.version for t in asked) != sorted(pending.versions):
            raise UsageError(refuse)
    return pending


def plan(store: StateStore, cert: Certificate, *, reason: str, version: int | None = None, serial: str | None = None,
         now_first: bool = False, now: dt.datetime) -> list[str]:
    """`revoke --dry-run`: what `revoke` would do, from the store alone (nothing ordered, deployed, revoked or
    recorded). Refuses what `revoke` would refuse (a different request while one is pending)."""
    if reason not in REASONS:
        raise UsageError(f"revoke {cert.name}: --reason {reason!r} is not one of {', '.join(REASONS)}")
    name = cert.name
    pending = _resumable(store, name, reason=reason, version=version, serial=serial, now=now)
    todo, notes, _ = targets(store, name, reason=reason, version=version, serial=serial, now=now, pending=pending)
    now_first = now_first or (pending is not None and pending.now_first)
    live = store.live_version(name)
    replace = any(t.version == live for t in todo)
    hosts = f"{len(cert.hosts)} host{'s' if len(cert.hosts) != 1 else ''} ({', '.join(cert.hosts) or 'none'})"
    out = list(notes)
    if replace:
        then = (f"a replacement with a new key, deployed to {hosts} and verified" if not now_first else
                f"revoke first (--now), then a replacement with a new key, deployed to {hosts} and verified")
    else:
        then = f"version {live} (live) deployed to {hosts} and verified, nothing ordered"
    out.append(f"would do: {then}" + ("; then revoke" if not now_first else ""))
    for t in todo:
        verb = "would revoke" if t.status == "pending" else t.status
        out.append(f"{verb:<16} {name} version {t.version} serial {t.serial} ({reason})")
    out.append(f"revoke {name}: dry run, nothing ordered, deployed, revoked or recorded")
    return out


async def revoke(inv: Inventory, store: StateStore, cert: Certificate, *, reason: str, version: int | None = None,
                 serial: str | None = None, now_first: bool = False, now: dt.datetime, parallel: int = 20,
                 timeouts: Any = None, channels: Sequence[Any] = ()) -> RevokeResult:
    """Replace with a new key, deploy and verify everywhere, then revoke (or revoke first with `now_first`).

    The caller holds the store lock. A replacement that fails, or a host that does not end up serving the
    live version, leaves the old certificate(s) unrevoked (unless `now_first`), and the result says so.
    """
    if reason not in REASONS:
        raise UsageError(f"revoke {cert.name}: --reason {reason!r} is not one of {', '.join(REASONS)}")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    name = cert.name
    # A revocation asked for and not finished (killed, a POP down, the CA failing) is resumed: its versions are
    # revoked, never the replacement that is live by now.
    pending = _resumable(store, name, reason=reason, version=version, serial=serial, now=now)
    todo, notes, spki = targets(store, name, reason=reason, version=version, serial=serial, now=now, pending=pending)
    if pending is not None:
        now_first = now_first or pending.now_first
    else:
        pins.save_pending(store, name, pins.PendingRevocation(
            reason=reason, versions=tuple(t.version for t in todo), serials=tuple(t.serial for t in todo),
            now_first=now_first, at=now, spki=spki.hex(),
            leaves=tuple(store.read(name, t.version).cert.decode() for t in todo)))
    # interrupted from here on, the rerun finishes it (a `certmgr deploy NAME` never revokes)
    interrupt.tally().finish, interrupt.tally().finish_due = f"certmgr revoke {name} --reason {reason}", True
    live = store.live_version(name)
    replace = any(t.version == live for t in todo)  # keyCompromise: the live version too if it shares the key
    store.audit("revoke requested", name, reason=reason, versions=[t.version for t in todo],
                serials=[t.serial for t in todo], now_first=now_first, replace=replace, resumed=pending is not None)
    event(log, logging.WARNING, "revoke requested", cert=name, reason=reason,
          serials=",".join(t.serial for t in todo), now_first=now_first)
    result = RevokeResult(name=name, reason=reason, now_first=now_first, targets=tuple(todo), notes=tuple(notes))

    if now_first:
        result = _with(result, targets=tuple(await _revoke_at_ca(inv, store, cert, todo, reason, now=now)))
    renewal: renew_mod.RenewOutcome | None = None
    if replace:
        [renewal] = await renew_mod.renew(inv, store, [cert], now=now, force=True, new_key=True, release_pins=True)
        result = _with(result, renewal=renewal)
        if renewal.status != "renewed":
            result = _with(result, held=None if now_first else
                           f"the replacement could not be issued ({renewal.error}); the old certificate stays valid "
                           f"and served. Fix the cause, then rerun `certmgr revoke {name} --reason {reason}`")
            return await _finish(result, store, channels, t0, loop)
        new_key = public_key_der(store.read(name).leaf.public_key())
        if new_key == spki:  # renew(new_key=True) makes a fresh key: this is a bug, never revoke into it
            raise CertmgrError(f"revoke {name}: the replacement has the leaked key (nothing revoked)")
    later = max(now, dt.datetime.now(dt.UTC))  # the replacement is valid from about now, not from `now`
    kw: dict[str, Any] = {"timeouts": timeouts} if timeouts is not None else {}
    outcomes = await deploy_mod.deploy(inv, store, [cert], parallel=parallel, now=later, **kw)
    result = _with(result, deploys=tuple(outcomes))
    bad = [o.host for o in outcomes if not o.ok]
    if bad and not now_first:
        them = "it" if len(bad) == 1 else "them"
        held = (f"{', '.join(bad)} do{'es' if len(bad) == 1 else ''} not serve the replacement (see above), so "
                f"revoking now would break {them}; the old certificate stays valid. Fix {them}, then rerun "
                f"`certmgr revoke {name} --reason {reason}` (it revokes the same certificate"
                f"{'s' if len(todo) > 1 else ''}; or add --now to revoke regardless)")
        return await _finish(_with(result, held=held), store, channels, t0, loop)
    if not now_first:
        result = _with(result, targets=tuple(await _revoke_at_ca(inv, store, cert, todo, reason, now=now)))
    elif bad:
        result = _with(result, notes=(*result.notes, f"--now: revoked although {', '.join(bad)} may still serve the "
                                      f"revoked certificate: fix {'it' if len(bad) == 1 else 'them'} now, then rerun "
                                      f"`certmgr revoke {name} --reason {reason}` (it deploys the replacement there "
                                      "and finishes the revocation)"))
    return await _finish(result, store, channels, t0, loop)


def finish_confirmed(store: StateStore, cert: Certificate, served: Sequence[Any]) -> str | None:
    """A pending revocation of `cert` that is done in all but its record — every serial it asked for revoked by
    certmgr, and the live version (not one of them) served by every endpoint of every host of `cert` in `served`
    (a run's scan, EndpointResults) — is finished: its record cleared, audited "revoke done". Returns the line
    that says so, None when there is nothing to finish or it is not done (an unreadable record stays as it is)."""
    name = cert.name
    try:
        pending = pins.load_pending(store, name)
        if pending is None:
            return None
        revoked = pins.load_revoked(store, name)
        live = store.live_version(name)
        material = store.read(name) if live is not None else None
        info = material.info() if material is not None else None
        key = public_key_der(material.leaf.public_key()).hex() if material is not None else ""
    except (CertmgrError, ValueError):
        return None
    if info is None or info.serial in pending.serials or info.serial in revoked:
        return None  # the live certificate is one being revoked
    if pending.spki and key == pending.spki:
        return None  # or carries the leaked key (the rerun of revoke revokes such a version too)
    if not all(s in revoked for s in pending.serials):
        return None
    mine = [r for r in served if r.endpoint.cert == name and r.endpoint.host in cert.hosts]
    if {r.endpoint.host for r in mine} != set(cert.hosts) or not all(
            r.info is not None and r.info.sha256 == info.sha256 for r in mine):
        return None
    pins.clear_pending(store, name)
    line = (f"revocation of {name} finished ({pending.reason}): "
            f"{', '.join(f'version {v}' for v in pending.versions)} revoked at the CA, the replacement (version "
            f"{live}, serial {info.serial}) served on every host")
    store.audit("revoke done", name, reason=pending.reason, revoked=list(pending.serials), by="run",
                summary=line + " (confirmed by the run's scan)")
    event(log, logging.WARNING, "revoke done", cert=name, reason=pending.reason, by="run")
    return line


def _with(result: RevokeResult, **kw: Any) -> RevokeResult:
    from dataclasses import replace

    return replace(result, **kw)


async def _revoke_at_ca(inv: Inventory, store: StateStore, cert: Certificate, todo: Sequence[Target], reason: str, *,
                        now: dt.datetime) -> list[Target]:
    """RFC 8555 §7.6 revokeCert for each pending target with the account that ordered it; recorded and audited."""
    pending = [t for t in todo if t.status == "pending"]
    if not pending:
        return list(todo)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="certmgr-revoke")
    done: dict[int, Target] = {}
    try:
        client = await ACMEClient.open(inv.cas[cert.ca], executor=executor)
        await client.ensure_account(store)
        for t in pending:
            leaf = (x509.load_pem_x509_certificate(t.leaf_pem.encode()) if t.leaf_pem
                    else store.read(cert.name, t.version).leaf)
            step = f"acme revoke {cert.name} version {t.version} (serial {t.serial})"
            try:
                fresh = await client.revoke(leaf, REASONS[reason], step=step)
            except ACMEError as exc:
                done[t.version] = Target(version=t.version, serial=t.serial, not_after=t.not_after,
                                         status=f"failed: {exc.message}")
                store.audit("revoke failed", cert.name, frm=t.serial, version=t.version, reason=reason,
                            error=exc.message)
                continue
            status = "revoked" if fresh else "already revoked"
            pins.record_revoked(store, cert.name, t.serial, version=t.version, reason=reason, at=now)
            store.audit("revoked", cert.name, frm=t.serial, version=t.version, reason=reason, already=not fresh,
                        summary=f"revoked {cert.name} version {t.version} (serial {t.serial}) at the CA: {reason}")
            event(log, logging.WARNING, status, cert=cert.name, serial=t.serial, reason=reason)
            done[t.version] = Target(version=t.version, serial=t.serial, not_after=t.not_after, status=status)
    except CertmgrError as exc:  # no account, CA unreachable: every target still pending is failed
        for t in pending:
            done.setdefault(t.version, Target(version=t.version, serial=t.serial, not_after=t.not_after,
                                              status=f"failed: {exc.message}"))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    return [done.get(t.version, t) for t in todo]


async def _finish(result: RevokeResult, store: StateStore, channels: Sequence[Any], t0: float,
                  loop: asyncio.AbstractEventLoop) -> RevokeResult:
    result = _with(result, elapsed=loop.time() - t0)
    if result.ok:
        pins.clear_pending(store, result.name)
        interrupt.tally().finish_due = False
    store.audit("revoke done" if result.ok else "revoke incomplete", result.name, reason=result.reason,
                revoked=[t.serial for t in result.revoked], held=result.held,
                failed_hosts=[o.host for o in result.deploys if not o.ok], seconds=round(result.elapsed, 3))
    if channels:
        try:
            await notify_mod.send(list(channels), message(result), store=store)
        except CertmgrError as exc:
            event(log, logging.ERROR, "chat message lost", cert=result.name, error=str(exc))
    return result


def message(result: RevokeResult) -> notify_mod.Message:
    """The chat message: which serials are revoked, what replaced them where, or why nothing was revoked."""
    rev = result.revoked
    if result.ok:
        title = f"REVOKED {result.name} ({result.reason}): {len(rev)} certificate{'s' if len(rev) != 1 else ''}"
    else:
        title = f"REVOKE {result.name} INCOMPLETE ({result.reason})"
    lines = [f"{t.status}: version {t.version} serial {t.serial}" for t in result.targets]
    if result.renewal is not None and result.renewal.status == "renewed":
        served = sum(1 for o in result.deploys if o.ok)
        lines.append(f"replacement with a new key: serial {result.renewal.new_serial}, served on {served} of "
                     f"{len(result.deploys)} hosts")
    lines += [o.error or f"{o.host}: {o.status.value}" for o in result.deploys if not o.ok][:5]
    if result.held:
        lines.append(f"NOT revoked: {result.held}")
    lines += list(result.notes)
    return notify_mod.Message(kind="revoke", severity="warning" if result.ok else "critical", title=title,
                              lines=tuple(lines), certificate=result.name,
                              command=None if result.ok else f"certmgr revoke {result.name} --reason {result.reason}")
