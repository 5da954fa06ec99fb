"""Renew many certificates at once: plan each, issue the due ones concurrently, store, audit, remember failures.

One certificate failing never blocks or corrupts another: each task turns its expected (CertmgrError)
failures into a `RenewOutcome`. The caller holds the store lock; store writes run on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509

from certmgr import certcheck, docmerge, halocks, interrupt, keys, orders, pins
from certmgr import plan as plan_mod
from certmgr.dns import DNSChange, Provider, TXTRecord
from certmgr.dns import build as build_provider
from certmgr.dns.journal import CertJournal, Journal, retry_leftovers
from certmgr.errors import CertificateRefused, CertmgrError, RateLimited, SecretError, StoreError, StoreUnavailable
from certmgr.inventory import CA, Certificate, Inventory
from certmgr.issue import ACMEClient, Issued, Timeouts, ari_cert_id
from certmgr.log import event
from certmgr.material import CertInfo, CertMaterial
from certmgr.plan import Decision, RenewState
from certmgr.store_api import StateStore, batched

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 10
STATE_SECTION = "state/renew"
LEFTOVER_TIMEOUT = 30.0  # each run spends at most this retrying challenge records earlier runs left behind


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewOutcome:
    """What happened to one certificate in one run.

    status: "renewed" | "failed" | "not-due" | "backoff" (held back after failures) | "planned" (--dry-run).
    """

    name: str
    status: str
    decision: Decision
    error: str | None = None
    hint: str | None = None
    retryable: bool = False
    old_serial: str | None = None
    old_not_after: dt.datetime | None = None
    new_serial: str | None = None
    new_not_after: dt.datetime | None = None
    version: int | None = None  # the archive version made live (renewed)
    previous_version: int | None = None
    replaced: bool = False  # the order carried ARI `replaces` and the CA took it
    unpinned: int | None = None  # this renewal cleared a pin on rolled-back version N
    notes: tuple[str, ...] = ()
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def overdue(self) -> bool:
        return self.decision.overdue

    def line(self) -> str:
        """One human line for the summary."""
        flag = " [OVERDUE]" if self.overdue and self.status != "renewed" else ""
        if self.status == "renewed":
            old = (f"serial {self.old_serial} (expires {self.old_not_after:%Y-%m-%d})" if self.old_serial
                   and self.old_not_after else "nothing")
            assert self.new_not_after is not None
            extra = " (replaces)" if self.replaced else ""
            if self.unpinned is not None:
                extra += f"; pin on rolled-back version {self.unpinned} cleared"
            if self.decision.source == "revoked":
                extra += f"; {self.decision.reason}: a new key"
            return (f"renewed  {self.name}: {old} → serial {self.new_serial} (expires {self.new_not_after:%Y-%m-%d})"
                    f" as version {self.version} in {self.elapsed:.1f}s{extra}")
        if self.status == "failed":
            return f"FAILED   {self.name}{flag}: {self.error}"
        if self.status == "backoff":
            until = self.decision.blocked_until
            return (f"backoff  {self.name}{flag}: {self.decision.reason}; after failures, next try "
                    f"{until:%Y-%m-%d %H:%M}Z (--force to try now)" if until else f"backoff  {self.name}")
        if self.status == "planned":
            return f"would renew {self.name}{flag}: {self.decision.reason}"
        return (f"not due  {self.name}: {self.decision.reason} (--force renews now; a POP serving something "
                f"else needs `certmgr deploy {self.name}`)")

    def to_json(self) -> dict[str, Any]:
        def iso(v: dt.datetime | None) -> str | None:
            return v.isoformat() if v else None

        return {
            "name": self.name, "status": self.status, "overdue": self.overdue, "error": self.error, "hint": self.hint,
            "retryable": self.retryable, "old_serial": self.old_serial, "old_not_after": iso(self.old_not_after),
            "new_serial": self.new_serial, "new_not_after": iso(self.new_not_after), "version": self.version,
            "previous_version": self.previous_version, "replaced": self.replaced, "unpinned": self.unpinned,
            "notes": list(self.notes),
            "elapsed": round(self.elapsed, 3), "decision": self.decision.to_json(),
        }


def state_path(name: str) -> str:
    return f"{STATE_SECTION}/{name}.json"


def load_state(store: StateStore, name: str) -> RenewState:
    """The renewal state of `name` (what scan/status need to show backoff and ARI windows)."""
    return RenewState.from_json(store.load_json(state_path(name), default=None))


def live_info(store: StateStore, name: str, *, known: halocks.Turn | None = None) -> tuple[CertMaterial | None,
                                                                                            CertInfo | None]:
    """The live material and its info; `known`: the certificate's lock turn, whose live version is read already."""
    live = known.live if known is not None and known.live_known else store.live_version(name)
    if live is None:
        return None, None
    material = store.read(name)
    return material, material.info()


def pinned_version(store: StateStore, name: str) -> int | None:
    """The rolled-back version `name` is pinned to (certmgr.pins), None when not pinned or unreadable."""
    try:
        pin = pins.holding_pin(store, name)
    except StoreError as exc:
        event(log, logging.WARNING, "pin unreadable, ignored", cert=name, error=str(exc))
        return None
    return pin.version if pin is not None else None


def status(store: StateStore, cert: Certificate, now: dt.datetime) -> Decision:
    """The plan for one certificate from the store alone (no network): for scan/status to show overdue."""
    _, info = live_info(store, cert.name)
    return plan_mod.decide(cert, info, load_state(store, cert.name), now, pinned=pinned_version(store, cert.name),
                           revoked=revoked_reason(store, cert.name, info))


def revoked_reason(store: StateStore, name: str, info: CertInfo | None) -> str | None:
    """Why certmgr revoked the live certificate (plan.decide renews it now), None if it did not."""
    return pins.live_revoked(store, name, info.serial if info is not None else None)


class _Run:
    """Per-run shared resources: one ACME client per CA, one provider per [dns.*], one thread pool."""

    def __init__(self, inventory: Inventory, store: StateStore, *, concurrency: int, timeouts: Timeouts,
                 env: Mapping[str, str] | None) -> None:
        self.inventory = inventory
        self.store = store
        self.timeouts = timeouts
        self.env = env
        # acme is synchronous: each in-flight order holds at most one pool thread while waiting on HTTP
        self.executor = ThreadPoolExecutor(max_workers=max(4, concurrency + 2), thread_name_prefix="certmgr-acme")
        self._clients: dict[str, asyncio.Task[ACMEClient]] = {}
        self._providers: dict[str, Provider] | None = None
        self._provider_errors: dict[str, CertmgrError] = {}
        self.journal: Journal | None = None  # the DNS journal (None: dry run, or unreadable)
        self.roots: tuple[x509.Certificate, ...] | None = None  # certcheck's trust anchors, loaded once

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def client(self, ca: CA) -> ACMEClient:
        """The CA's client, directory fetched once per run (concurrent callers share the one fetch)."""
        task = self._clients.get(ca.name)
        if task is None:
            task = asyncio.ensure_future(ACMEClient.open(ca, executor=self.executor, timeouts=self.timeouts))
            self._clients[ca.name] = task
        return await asyncio.shield(task)

    def providers(self) -> tuple[dict[str, Provider], dict[str, CertmgrError]]:
        """Every [dns.*] provider, built (validated) once; a broken one fails only the certificates using it."""
        if self._providers is None:
            self._providers = {}
            for name, cfg in self.inventory.dns.items():
                try:
                    self._providers[name] = build_provider(cfg)
                except CertmgrError as exc:
                    self._provider_errors[name] = exc
                    continue
                self._providers[name].on_change = self._dns_audit(name)
        return self._providers, self._provider_errors

    def _dns_audit(self, provider: str) -> DNSChange:
        """One audit line per UPDATE the server accepted: what certmgr changed in DNS, zone by zone."""
        store = self.store

        def on_change(action: str, zone: str, records: Sequence[TXTRecord]) -> None:
            # A removal's row is not waited for on the disk (PgStore.batch durable=False): the journal drop that
            # follows it (Journal.drop) commits after it, so a database crash that loses the row also keeps the
            # records journaled, and the next run's delete writes it again. A publication's row stays durable.
            durable = action != "dns removed"
            try:
                with batched(store, f"audit {action} {zone}", durable=durable):
                    store.audit(action, zone, provider=provider, names=sorted({r.fqdn for r in records}),
                                domains=sorted({r.domain for r in records}), values=len(records))
            except CertmgrError as exc:  # an unwritable audit log must not stop a cleanup half-way
                event(log, logging.ERROR, "audit line lost", action=action, zone=zone, error=str(exc))

        return on_change


async def renew(inventory: Inventory, store: StateStore, certs: Sequence[Certificate], *, now: dt.datetime,
                force: bool = False, dry_run: bool = False, concurrency: int = DEFAULT_CONCURRENCY,
                timeouts: Timeouts | None = None, env: Mapping[str, str] | None = None,
                rng: random.Random | None = None, new_key: bool = False,
                release_pins: bool = False, seen: Mapping[str, int | None] | None = None,
                on_outcome: Callable[[RenewOutcome], None] | None = None) -> list[RenewOutcome]:
    """Plan every certificate in `certs`, renew the due ones (all with `force`), at most `concurrency` at once.

    `new_key`: always a fresh private key, whatever `reuse_key` says (revoke after a key leak).
    `release_pins`: the operator named these certificates: a pinned one (certmgr rollback) renews now,
    and its success clears the pin. Unnamed (`run`, `--due`), a pin holds renewal back (plan.pin_hold).

    `seen`: live versions read before the caller waited for certificate locks (halocks.cert_turn).
    `on_outcome` is called with each certificate's outcome as soon as it is known, its certificate lock
    already released (`run` deploys a renewed certificate at once: pipeline.py); it must not raise.

    Returns one outcome per certificate, in the order given. The caller holds `store.lock()` unless
    `dry_run` (which writes nothing). ACME runs in a private thread pool; DNS is native asyncio.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    run = _Run(inventory, store, concurrency=concurrency, timeouts=timeouts or Timeouts(), env=env)
    rng = rng or random.SystemRandom()
    sem = asyncio.Semaphore(concurrency)
    results: dict[str, RenewOutcome] = {}

    async def one(cert: Certificate) -> None:
        started = False
        try:
            async with sem:
                started = True
                try:  # two controllers: this certificate's lock, then the re-check (certmgr.halocks)
                    async with halocks.cert_turn(store, cert.name, "renew", seen=seen, enabled=not dry_run,
                                                 recheck=force) as turn:
                        out = await _one(run, cert, now=now, force=force and not turn.moved, dry_run=dry_run,
                                         rng=rng, new_key=new_key, release_pin=release_pins, turn=turn)
                except halocks.LOCK_ERRORS as exc:  # one certificate's outcome: a task group must not crash
                    out = RenewOutcome(name=cert.name, status="failed", decision=status(store, cert, now),
                                       error=f"renew {cert.name}: {exc.message} (not ordered)", hint=exc.hint,
                                       retryable=True)
                results[cert.name] = out
        except asyncio.CancelledError:  # SIGINT/SIGTERM: an order under way is abandoned, its `finally`s clean up
            if not dry_run:
                tally = interrupt.tally()
                (tally.renew_cut if started else tally.not_renewed).append(cert.name)
            raise
        if out.status == "renewed":
            interrupt.tally().renewed[cert.name] = out.version
        if on_outcome is not None:
            on_outcome(out)

    try:
        if not dry_run:
            await _retry_dns_leftovers(run)
        async with asyncio.TaskGroup() as tg:
            for cert in certs:
                tg.create_task(one(cert))
    finally:
        run.close()
    return [results[c.name] for c in certs]


async def _retry_dns_leftovers(run: _Run) -> None:
    """Before any order: open the DNS journal and retry removing every TXT value earlier runs left (any cert
whose order no other live controller is running: halocks.leftover_owner)."""
    try:
        run.journal = Journal.load(run.store)
    except CertmgrError as exc:  # renewals matter more than the journal: go on, but say it loudly
        event(log, logging.ERROR, "DNS journal unreadable: challenge records are not tracked in this run",
              error=str(exc), hint=exc.hint or "")
        return
    if run.journal.entries():
        providers, _ = run.providers()
        with halocks.leftover_owner(run.store, {e.cert for e in run.journal.entries()}) as ours:
            await retry_leftovers(run.journal, providers, timeout=LEFTOVER_TIMEOUT, only=lambda e: e.cert in ours)


async def _one(run: _Run, cert: Certificate, *, now: dt.datetime, force: bool, dry_run: bool,
               rng: random.Random, new_key: bool = False, release_pin: bool = False,
               turn: halocks.Turn | None = None) -> RenewOutcome:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    store = run.store
    ca = run.inventory.cas[cert.ca]
    material: CertMaterial | None = None
    info: CertInfo | None = None
    state = RenewState()
    pinned = pinned_version(store, cert.name)
    try:
        material, info = live_info(store, cert.name, known=turn)
        state = load_state(store, cert.name)
        state = await _refresh_ari(run, ca, cert, material, info, state, now=now, dry_run=dry_run, rng=rng)
    except CertmgrError as exc:
        decision = plan_mod.decide(cert, info, state, now, pinned=pinned, release_pin=release_pin,
                                   revoked=revoked_reason(store, cert.name, info))
        return RenewOutcome(name=cert.name, status="failed", decision=decision, error=str(exc), hint=exc.hint,
                            retryable=exc.retryable, elapsed=loop.time() - t0)
    decision = plan_mod.decide(cert, info, state, now, pinned=pinned, release_pin=release_pin,
                               revoked=revoked_reason(store, cert.name, info))
    base = RenewOutcome(name=cert.name, status="not-due", decision=decision, old_serial=info.serial if info else None,
                        old_not_after=info.not_after if info else None)
    if not decision.due and not force:
        return base
    if decision.blocked_until is not None and not force:
        return replace(base, status="backoff")
    if dry_run:
        return replace(base, status="planned")

    event(log, logging.INFO, "renewing", cert=cert.name, reason=decision.reason, forced=force and not decision.due)
    try:
        # a revoked live certificate, or one whose revocation is asked for, never hands its key on (reuse_key or
        # not): the revocation may be for keyCompromise, and whatever shares the key would have to go too
        fresh_key = (new_key or revoked_reason(store, cert.name, info) is not None
                     or pins.revocation_pending(store, cert.name))
        result = await _issue_and_store(run, ca, cert, material, info, state, now=now, new_key=fresh_key)
    except SecretError as exc:
        # A secret this process cannot read (a *_credential outside systemd, a missing key file) is
        # this machine's configuration, not the CA's or the DNS server's answer: no backoff, so the
        # timer's run, which has the credentials, is not held back by an on-call attempt.
        event(log, logging.ERROR, "renewal not attempted", cert=cert.name, error=str(exc))
        return replace(base, status="failed", error=str(exc), hint=exc.hint, retryable=True,
                       elapsed=loop.time() - t0)
    except CertmgrError as exc:
        retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
        failed = state.failed(now, str(exc), retry_after=retry_after)
        if isinstance(exc, (*halocks.LOCK_ERRORS, StoreUnavailable)):
            # the database or this controller's lock, not the CA: no backoff (the next run retries at once),
            # and nothing recorded — the database is gone or the certificate another controller's now
            event(log, logging.ERROR, "renewal stopped: store lost", cert=cert.name, error=str(exc))
            return replace(base, status="failed", error=str(exc), hint=exc.hint, retryable=True,
                           elapsed=loop.time() - t0)
        try:
            # merged (newer last_attempt wins) and spooled when the database is lost: the next run keeps the backoff
            docmerge.merge_json(store, state_path(cert.name), failed.to_json(), "renew")
            store.audit("renew failed", cert.name, frm=info.serial if info else None, error=str(exc),
                        failures=failed.failures,
                        retry_after=retry_after.isoformat() if retry_after else None)
        except StoreError as store_exc:
            event(log, logging.ERROR, "cannot record renewal failure", cert=cert.name, error=str(store_exc))
        event(log, logging.ERROR, "renewal failed", cert=cert.name, error=str(exc), failures=failed.failures)
        return replace(base, status="failed", decision=plan_mod.decide(cert, info, failed, now, pinned=pinned,
                                                                       release_pin=release_pin,
                                                                       revoked=revoked_reason(store, cert.name, info)),
                       error=str(exc),
                       hint=exc.hint, retryable=exc.retryable, elapsed=loop.time() - t0)
    if pinned is not None:
        # the new version is live: the rollback it replaces is over (said in the run's chat summary)
        cleared = pins.clear_pin(store, cert.name, why=f"renewed: version {result.version} is live ({decision.reason})")
        result = replace(result, unpinned=cleared.version if cleared else pinned)
    return replace(result, decision=decision, elapsed=loop.time() - t0)


async def _refresh_ari(run: _Run, ca: CA, cert: Certificate, material: CertMaterial | None, info: CertInfo | None,
                       state: RenewState, *, now: dt.datetime, dry_run: bool, rng: random.Random) -> RenewState:
    """RFC 9773: fetch the CA's window when due for a fetch, pick a random time in it once, persist both."""
    if material is None or info is None or now >= info.not_after:
        return state  # RFC 9773 §4.3.3: never ask about an expired certificate
    if state.ari_serial == info.serial and state.ari_next_fetch is not None and now < state.ari_next_fetch:
        return state
    try:
        client = await run.client(ca)
        if not client.has_ari:
            return state
        got = await client.renewal_info(material.leaf, now=now)
    except CertmgrError as exc:
        event(log, logging.WARNING, "renewal info unavailable, using the lifetime rule", cert=cert.name,
              error=str(exc))
        return state
    except ValueError as exc:  # no AKI: ARI cannot name this certificate
        event(log, logging.INFO, "no ARI for this certificate", cert=cert.name, error=str(exc))
        return state
    if got is None:
        return state
    same = state.ari_serial == info.serial and state.ari_start == got.start and state.ari_end == got.end
    renew_at = state.ari_renew_at if same else None
    if renew_at is None:
        span = max((got.end - got.start).total_seconds(), 0.0)
        renew_at = got.start + dt.timedelta(seconds=rng.uniform(0, span))
    new = replace(state, ari_serial=info.serial, ari_start=got.start, ari_end=got.end, ari_renew_at=renew_at,
                  ari_next_fetch=got.retry_after, ari_explanation=got.explanation_url)
    if not dry_run:
        run.store.save_json(state_path(cert.name), new.to_json())
    return new


async def _check_issued(run: _Run, cert: Certificate, material: CertMaterial, *, now: dt.datetime) -> None:
    """Refuse a certificate that is not what was ordered (certcheck): audited, nothing stored, the caller backs off."""
    loop = asyncio.get_running_loop()
    if run.roots is None:
        run.roots = await loop.run_in_executor(run.executor, functools.partial(
            certcheck.load_roots, run.inventory.trust, outcome="nothing stored"))
    expected = certcheck.Expected(names=cert.domains, roots=run.roots, preferred_issuer=cert.preferred_chain)
    try:
        await loop.run_in_executor(run.executor, functools.partial(
            certcheck.check, material, expected, now=now, step=f"renew {cert.name}: issued certificate refused",
            outcome="nothing stored"))
    except CertificateRefused as exc:
        serial: str | None = None
        sha256: str | None = None
        try:
            refused = material.info()
            serial, sha256 = refused.serial, refused.sha256
        except ValueError:
            pass  # unparseable: the problems say so
        try:
            run.store.audit("certificate refused", cert.name, serial=serial, sha256=sha256,
                            problems=list(exc.problems))
        except StoreError as store_exc:  # the refusal itself must still be what the operator reads
            event(log, logging.ERROR, "audit line lost", action="certificate refused", cert=cert.name,
                  error=str(store_exc))
        raise


def record_renewal(store: Any, name: str, issued: Issued, info: CertInfo | None, state: RenewState, *,
                   now: dt.datetime) -> tuple[int, int | None]:
    """Store a renewed certificate: version, live, the order settled, the `renewed` row and the state — with
    PostgreSQL in one transaction (one durable commit, all or nothing: a lost database stores none of it and the
    next run resumes the order). Returns (version, previous live version)."""
    new_info = issued.material.info()
    with batched(store, f"store renewed {name}"):
        version = store.add_version(name, issued.material)
        previous = store.activate(name, version)
        orders.settle(store, name)
        old = (f"serial {info.serial} (expires {info.not_after.isoformat()})" if info else "nothing")
        new = f"serial {new_info.serial} (expires {new_info.not_after.isoformat()})"
        store.audit("renewed", name, frm=old, to=new, message=f"renewed {name}: {old} → {new}",
                    version=version, previous_version=previous, replaced=bool(issued.replaced),
                    timings={k: round(v, 3) for k, v in issued.timings.items()})
        store.save_json(state_path(name), state.succeeded(now, spread=plan_mod.spread_of(new_info.serial)).to_json())
    # <deploy hooks in after this point: cli.renew pushes outcomes with status "renewed" (see docs/renew.md)>
    return version, previous


async def _issue_and_store(run: _Run, ca: CA, cert: Certificate, material: CertMaterial | None,
                           info: CertInfo | None, state: RenewState, *, now: dt.datetime,
                           new_key: bool = False) -> RenewOutcome:
    providers, errors = run.providers()
    if cert.dns in errors:
        raise errors[cert.dns]
    client = await run.client(ca)
    await client.ensure_account(run.store, env=run.env)
    loop = asyncio.get_running_loop()

    async def make_key() -> keys.PrivateKey:
        if cert.reuse_key and not new_key and material is not None and info is not None \
                and info.key_type == cert.key_type:
            return keys.from_pem(material.privkey)
        return await loop.run_in_executor(run.executor, keys.generate, cert.key_type)

    replaces = None
    if client.has_ari and material is not None:
        try:
            replaces = ari_cert_id(material.leaf)
        except ValueError:
            replaces = None
    journal = CertJournal(run.journal, cert.name) if run.journal is not None else None
    # recorded before new-order, resumed by the next run when this one dies (certmgr.orders)
    issued = await orders.obtain(run.store, client, cert, make_key=make_key, new_key=new_key, inventory=run.inventory,
                                 providers=providers, replaces=replaces, journal=journal)
    try:
        await _check_issued(run, cert, issued.material, now=now)
    except CertificateRefused as exc:
        orders.settle(run.store, cert.name, abandoned=f"certificate refused ({'; '.join(exc.problems)})")
        raise
    new_info = issued.material.info()
    # in a thread: its transaction's round trips and durable commit leave the event loop to the other renewals;
    # a cancellation (SIGTERM) waits for it to end (stored whole or not at all), never leaves it half-known
    storing = asyncio.ensure_future(asyncio.to_thread(record_renewal, run.store, cert.name, issued, info, state,
                                                      now=now))
    try:
        version, previous = await asyncio.shield(storing)
    except asyncio.CancelledError:
        await asyncio.wait([storing])
        raise
    event(log, logging.INFO, "renewed", cert=cert.name, serial=new_info.serial, version=version,
          not_after=new_info.not_after.isoformat(), seconds=f"{issued.timings.get('total', 0):.2f}")
    return RenewOutcome(name=cert.name, status="renewed", decision=plan_mod.decide(cert, new_info, RenewState(), now),
                        old_serial=info.serial if info else None, old_not_after=info.not_after if info else None,
                        new_serial=new_info.serial, new_not_after=new_info.not_after, version=version,
                        previous_version=previous, replaced=bool(issued.replaced), notes=issued.notes)
