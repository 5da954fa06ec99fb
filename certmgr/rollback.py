"""`certmgr rollback NAME`: make an earlier stored version live again, in the store and on the POPs, and pin it.

Built on the public deploy entry point: the store's live link is switched to the chosen version (checked
first: not expired, not revoked by certmgr, key matching, names as the inventory says), the certificate is
pinned (certmgr.pins) so `run` keeps it, and deploy() pushes it — one transaction per host with test,
reload and handshake verify, rolled back on that host when any step fails.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from certmgr import certcheck, interrupt, pins
from certmgr import deploy as deploy_mod
from certmgr import notify as notify_mod
from certmgr.errors import CertificateRefused, CertmgrError, StoreError, UsageError
from certmgr.inventory import Certificate, Inventory
from certmgr.log import event
from certmgr.material import CertMaterial, MaterialError
from certmgr.store_api import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackResult:
    """What `rollback` did (or, dry, would do) for one certificate."""

    name: str
    target: int
    serial: str
    previous: int | None  # the store's live version before
    previous_serial: str | None
    hosts: tuple[str, ...]  # the hosts rolled back now
    others: tuple[str, ...]  # the certificate's other hosts, left for `run` (they follow the pin)
    pinned: bool
    dry_run: bool = False
    deploys: tuple[deploy_mod.HostOutcome, ...] = ()

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.deploys)

    def lines(self) -> list[str]:
        verb = "would roll back" if self.dry_run else "rolled back"
        where = ', '.join(self.hosts) or 'no host'
        if self.previous == self.target:  # finishing an earlier rollback (a POP it could not reach), or a no-op
            head = (f"{'would make' if self.dry_run else 'made'} {self.name} version {self.target} (serial "
                    f"{self.serial}, already the store's live version) live again on {where}")
        else:
            head = (f"{verb} {self.name}: version {self.previous or '-'} (serial {self.previous_serial or '-'}) → "
                    f"version {self.target} (serial {self.serial}) on {where}")
        out = [head + (" (dry run: nothing changed)" if self.dry_run else "")]
        out += [line for o in self.deploys for line in o.lines()]
        bad = [o.host for o in self.deploys if not o.ok]
        if bad:
            out.append(f"NOT rolled back on {', '.join(bad)} (each kept what it served, see above); the store's "
                       f"live version is {self.target}: rerun `certmgr rollback {self.name} --to {self.target}`")
        if self.others:
            out.append(f"not touched now: {', '.join(self.others)}; they still serve what they had until "
                       f"`certmgr rollback {self.name} --to {self.target}` without --hosts, or the next `run`, "
                       f"deploys version {self.target} there")
        if self.pinned:
            out.append(f"{'would pin' if self.dry_run else 'pinned'} {self.name} to version {self.target}: `run` "
                       f"keeps it (renewal held until the last third of its renewal period); `certmgr deploy "
                       f"{self.name}` or `certmgr renew {self.name}` clears the pin")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "serial": self.serial, "previous": self.previous,
                "previous_serial": self.previous_serial, "hosts": list(self.hosts), "others": list(self.others),
                "pinned": self.pinned, "dry_run": self.dry_run, "ok": self.ok,
                "deploys": [o.to_json() for o in self.deploys]}


def select_hosts(inv: Inventory, cert: Certificate, refs: Sequence[str], *, step: str) -> tuple[str, ...]:
    """The certificate's hosts named or tagged (`tag:T`) in `refs`, in its order; all of them when `refs` is empty."""
    if not refs:
        return cert.hosts
    chosen: set[str] = set()
    unknown = []
    for ref in refs:
        matched = ({h.name for h in inv.hosts.values() if ref[4:] in h.tags} if ref.startswith("tag:")
                   else {ref} & set(inv.hosts))
        if not matched:
            unknown.append(ref)
        chosen |= matched
    if unknown:
        raise UsageError(f"{step} --hosts: no host or tag {', '.join(map(repr, unknown))} in the inventory",
                         hint=f"hosts: {', '.join(inv.hosts) or '(none)'}")
    hosts = tuple(h for h in cert.hosts if h in chosen)
    if not hosts:
        raise UsageError(f"{step} --hosts: {', '.join(refs)} holds none of {cert.name}'s hosts "
                         f"({', '.join(cert.hosts) or 'none'})")
    return hosts


def refusals(store: StateStore, inv: Inventory, cert: Certificate, version: int, *, now: dt.datetime,
             roots: Any = None) -> tuple[CertMaterial | None, tuple[str, ...]]:
    """Why `version` of `cert` may not go live again: revoked by certmgr (or asked to be), key mismatch, expired,
    names, chain."""
    try:
        material = store.read(cert.name, version)
    except StoreError as exc:
        return None, (exc.message,)
    found: list[str] = []
    try:
        info = material.info()
    except ValueError as exc:
        return None, (f"its certificate does not parse: {exc}",)
    revoked = pins.load_revoked(store, cert.name).get(info.serial)
    if revoked is not None:
        found.append(f"serial {info.serial} was revoked by certmgr on {str(revoked.get('at', '?'))[:16]} "
                     f"({revoked.get('reason', '?')})")
    try:
        pending = pins.load_pending(store, cert.name)
    except StoreError as exc:  # unreadable: it may name this version; status says what it is
        found.append(f"the record of an unfinished revocation cannot be read ({exc.message})")
        pending = None
    if pending is not None and revoked is None and info.serial in pending.serials:
        found.append(f"its revocation ({pending.reason}) was asked for on {pending.at:%Y-%m-%d %H:%M}Z and is not "
                     f"finished: `certmgr revoke {cert.name} --reason {pending.reason}` finishes it")
    try:
        material.check()
    except MaterialError as exc:
        found.append(f"its private key does not match its certificate ({exc.message})")
    if roots is None:
        roots = certcheck.load_roots(inv.trust, outcome="nothing changed")
    found += [p for p in certcheck.problems(material, certcheck.Expected(
        names=cert.domains, roots=roots, preferred_issuer=cert.preferred_chain, max_validity=None), now=now)
        if not p.startswith("key differs")]
    return material, tuple(found)


def choose(store: StateStore, name: str, to: int | None) -> tuple[int, int | None]:
    """(target version, live version): `to`, else the newest stored version below the live one."""
    versions = store.versions(name)
    live = store.live_version(name)
    if not versions or live is None:
        raise StoreError(f"rollback {name}: nothing live in the store (nothing changed)",
                         hint=f"issue it first: `certmgr renew {name}`")
    if to is not None:
        if to not in versions:
            raise UsageError(f"rollback {name} --to {to}: no version {to} in the store (versions: "
                             f"{', '.join(map(str, versions))}; nothing changed)")
        return to, live
    older = [v for v in versions if v < live]
    if not older:
        raise UsageError(f"rollback {name}: live version {live} is the oldest stored (nothing changed)",
                         hint=f"versions: {', '.join(map(str, versions))}; pick one with --to N")
    return older[-1], live


async def rollback(inv: Inventory, store: StateStore, cert: Certificate, *, to: int | None = None,
                   hosts: Sequence[str] = (), dry_run: bool = False, now: dt.datetime, parallel: int = 20,
                   timeouts: Any = None, connector: Any = None, prober: Any = None,
                   channels: Sequence[Any] = ()) -> RollbackResult:
    """Make version `to` (default: the previous) live in the store and on `hosts` (default: all), pinned.

    Refuses (CertificateRefused, nothing changed) a version that is expired, revoked by certmgr, whose key
    does not match, or whose names or chain certcheck rejects. The caller holds the store lock unless dry.
    """
    name = cert.name
    chosen = select_hosts(inv, cert, hosts, step="rollback")
    target, live = choose(store, name, to)
    material, refused = refusals(store, inv, cert, target, now=now)
    if refused or material is None:
        usable = [v for v in reversed(store.versions(name)) if v != target and v != live
                  and not refusals(store, inv, cert, v, now=now)[1]]
        raise CertificateRefused(
            f"rollback {name}: version {target} refused: {'; '.join(refused)} (nothing changed)", problems=refused,
            hint=(f"usable versions: {', '.join(map(str, usable))} (--to N)" if usable else
                  f"no other stored version may go live; `certmgr renew {name} --force` issues a new one"))
    info = material.info()
    prev_serial = None
    if live is not None:
        try:
            prev_serial = store.read(name, live).info().serial
        except (CertmgrError, ValueError):
            prev_serial = None
    pin_it = target != max(store.versions(name))
    others = tuple(h for h in cert.hosts if h not in chosen)
    result = RollbackResult(name=name, target=target, serial=info.serial, previous=live, previous_serial=prev_serial,
                            hosts=chosen, others=others, pinned=pin_it, dry_run=dry_run)
    if dry_run:
        return result
    # interrupted, this command finishes it (a `certmgr deploy NAME` would clear the pin: the newest version again)
    only = f" --hosts {','.join(chosen)}" if hosts else ""
    interrupt.tally().finish = f"certmgr rollback {name} --to {target}{only}"

    # The pin first: killed between the two, a pin on a version that is not live holds nothing (pins.holding_pin)
    # and the store is as before the rollback; the other way round a rollback would be live without its pin.
    if pin_it:
        pins.save_pin(store, name, pins.Pin(version=target, serial=info.serial, rolled_back_from=live, at=now))
    else:
        pins.clear_pin(store, name, why=f"rollback --to {target}: the newest version is live again")
    store.activate(name, target)  # audited "activate"
    store.audit("rollback", name, frm=live, to=target, serial=info.serial, previous_serial=prev_serial,
                hosts=list(chosen), pinned=pin_it,
                summary=f"rolling back {name} from version {live} to {target} on {', '.join(chosen)}")
    event(log, logging.WARNING, "rolling back", cert=name, frm=live, to=target, hosts=",".join(chosen))
    kw: dict[str, Any] = {k: v for k, v in (("timeouts", timeouts), ("connector", connector),
                                             ("prober", prober)) if v is not None}
    outcomes = await deploy_mod.deploy(inv, store, [cert], hosts=chosen, parallel=parallel, now=now, **kw)
    result = RollbackResult(name=name, target=target, serial=info.serial, previous=live, previous_serial=prev_serial,
                            hosts=chosen, others=others, pinned=pin_it, deploys=tuple(outcomes))
    ok = [o.host for o in outcomes if o.ok]
    bad = [o.host for o in outcomes if not o.ok]
    store.audit("rollback done" if not bad else "rollback incomplete", name, frm=live, to=target, serial=info.serial,
                hosts=ok, failed=bad, summary=f"{name} version {target} (serial {info.serial}) served on "
                f"{len(ok)} of {len(outcomes)} hosts" + (f"; NOT on {', '.join(bad)}" if bad else ""))
    if channels:
        await notify_mod.send(list(channels), message(result), store=store)
    return result


def message(result: RollbackResult) -> notify_mod.Message:
    """The chat message for a rollback: what is served where now, and what clears the pin."""
    bad = [o for o in result.deploys if not o.ok]
    title = (f"ROLLED BACK {result.name} to version {result.target} on {len(result.deploys) - len(bad)} of "
             f"{len(result.deploys)} hosts")
    lines = [f"serial {result.previous_serial or '-'} (version {result.previous or '-'}) → serial {result.serial} "
             f"(version {result.target})"]
    lines += [o.error or f"{o.host}: {o.status.value}" for o in bad[:5]]
    if result.pinned:
        lines.append(f"pinned: `run` keeps version {result.target}; `certmgr deploy {result.name}` clears the pin")
    return notify_mod.Message(kind="rollback", severity="critical" if bad else "warning", title=title,
                              lines=tuple(lines), certificate=result.name, hosts=result.hosts,
                              command=f"certmgr rollback {result.name} --to {result.target}" if bad else None)


def roll_forward(store: StateStore, inv: Inventory, cert: Certificate, *, now: dt.datetime) -> str | None:
    """`deploy NAME` on a pinned certificate: clear the pin and make the newest usable version live again.

    Returns the line to print (None when not pinned). The caller holds the store lock and deploys next.
    """
    pin = pins.load_pin(store, cert.name)
    if pin is None:
        return None
    roots = certcheck.load_roots(inv.trust, outcome="nothing changed")
    newest = next((v for v in reversed(store.versions(cert.name))
                   if not refusals(store, inv, cert, v, now=now, roots=roots)[1]), None)
    live = store.live_version(cert.name)
    if newest is None or newest == live:
        pins.clear_pin(store, cert.name, why="`certmgr deploy` named it; no newer usable version, live kept")
        return f"unpinned {cert.name}: version {live} stays live (no newer usable version)"
    store.activate(cert.name, newest)
    pins.clear_pin(store, cert.name, why=f"`certmgr deploy` named it: version {newest} live again")
    return f"unpinned {cert.name}: version {newest} live again (was pinned to rolled-back version {pin.version})"
