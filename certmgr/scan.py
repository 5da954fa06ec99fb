"""Scan: live TLS handshakes to a host's address with SNI; reads bad certificates too.

Verification is done separately (`certmgr.verify`) so that an expired, self-signed or wrong-host
certificate is read and reported, never a crash; every failure is a per-endpoint result.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from certmgr import docmerge, log, sanitize
from certmgr.errors import ScanError
from certmgr.inventory import Certificate, Inventory, Threshold
from certmgr.material import CertInfo
from certmgr.probe import Probe, probe
from certmgr.scanresult import (  # re-exported: the types and helpers scan's callers have always imported from here
    DEFAULT_KEEP,
    EXIT_CODES,
    SEVERITY_RANK,
    WILDCARD_LABEL,
    CertSummary,
    Endpoint,
    EndpointResult,
    ScanResult,
    _Collector,
    _Record,
    _record,
    apply_drift,
    summarise,
    urgency_key,
    worst,
)
from certmgr.store_api import StateStore

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------- what to scan


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Every scan wait is bounded; connect and handshake separately."""

    connect: float = 5.0
    handshake: float = 5.0
    dns: float = 5.0


def endpoints(certs: Iterable[Certificate], inventory: Inventory) -> Iterator[Endpoint]:
    """Every (certificate, name, deployed host) triple, in inventory order."""
    for cert in certs:
        for name in cert.domains:
            for host_name in cert.hosts:
                host = inventory.hosts[host_name]
                yield Endpoint(cert=cert.name, name=name, host=host.name, address=host.address,
                               port=host.https_port)


def expiry_problem(info: CertInfo, now: dt.datetime, *, warn: Threshold, critical: Threshold) -> tuple[str, str]:
    """Severity from time left alone: thresholds are durations or fractions of the cert's own lifetime."""
    lifetime = info.lifetime.total_seconds()
    left = (info.not_after - now).total_seconds()
    if left <= 0:
        return "critical", ""  # reported as "expired" by verify
    crit_s, warn_s = critical.before(lifetime), warn.before(lifetime)
    if left < crit_s:
        return "critical", f"expires in {_days(left)} (critical below {_days(crit_s)}, {critical})"
    if left < warn_s:
        return "warning", f"expires in {_days(left)} (warning below {_days(warn_s)}, {warn})"
    return "ok", ""


def _days(seconds: float) -> str:
    # nothing here assumes days: a lab certificate lives minutes, Let's Encrypt's shortest 6 days
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.0f}s"


class _VerifierLike(Protocol):
    def verify(self, chain: Sequence[bytes], name: str) -> Any: ...


def classify(ep: Endpoint, p: Probe, verifier: _VerifierLike, now: dt.datetime, *, warn: Threshold,
             critical: Threshold) -> EndpointResult:
    """Turn one probe into a result (drift is decided later, across endpoints)."""
    if not p.ok:
        return EndpointResult(endpoint=ep, severity="error", error=p.error or "no certificate",
                              problems=(p.error or "no certificate",), elapsed=p.elapsed)
    try:
        v = verifier.verify(p.chain, ep.sni)
    except ValueError as exc:
        return EndpointResult(endpoint=ep, severity="critical",
                              problems=(f"unparseable certificate: {sanitize.line(str(exc))}",),
                              chain_length=len(p.chain), elapsed=p.elapsed)
    problems = list(v.problems)
    sev = "critical" if problems else "ok"
    exp_sev, exp_problem = expiry_problem(v.info, now, warn=warn, critical=critical)
    if exp_problem:
        problems.append(exp_problem)
    sev = worst((sev, exp_sev))
    return EndpointResult(endpoint=ep, severity=sev, problems=tuple(problems), info=v.info, chain=v.chain,
                          chain_length=len(p.chain), elapsed=p.elapsed)


UNMANAGED = "(unmanaged)"  # certificate column of discover's findings: not a valid lineage name, never ours


def unmanaged_results(store: object, now: dt.datetime) -> list[EndpointResult]:
    """One result per host for each unmanaged certificate the last discover saw, at warning or above."""
    from certmgr.discover import state as discover_state

    out = []
    default_warn, default_crit = Threshold(fraction=0.25, text="1/4"), Threshold(fraction=0.1, text="1/10")
    for u in discover_state.unmanaged(store if hasattr(store, "load_json") else None):  # type: ignore[arg-type]
        sev, why = expiry_problem(u.info, now, warn=default_warn, critical=default_crit)
        if sev == "ok":
            continue
        why = why or f"expired {_days((now - u.info.not_after).total_seconds())} ago"
        files = {h: [f for hh, f in u.where if hh == h] or list(u.files) for h in u.hosts}
        out += [EndpointResult(endpoint=Endpoint(cert=UNMANAGED, name=u.names[0] if u.names else "-", host=h,
                                                 address="", port=0), severity=sev, info=u.info,
                               problems=(why, f"not managed by certmgr: {', '.join(files[h])} "
                                              f"(certmgr discover, {discover_state.age(u.discovered_at, now)})"))
                for h in u.hosts]
    return out


# ---------------------------------------------------------------- running a scan


class _StoreLike(Protocol):
    def live_version(self, name: str) -> int | None: ...
    def read(self, name: str, version: int | None = None) -> Any: ...


def live_fingerprints(store: _StoreLike | None, names: Iterable[str]) -> dict[str, tuple[int, str] | None]:
    """(live version, leaf SHA-256) per certificate from the local store; None where there is none."""
    out: dict[str, tuple[int, str] | None] = {}
    for name in names:
        out[name] = None
        if store is None:
            continue
        try:
            version = store.live_version(name)
            if version is None:
                continue
            out[name] = (version, store.read(name, version).info().sha256)
        except Exception as exc:
            log.event(_log, logging.WARNING, "scan: cannot read live version", cert=name, error=str(exc))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Job:
    endpoints: tuple[Endpoint, ...]
    thresholds: Mapping[str, tuple[Threshold, Threshold]]
    trust: tuple[Path, ...]
    now: dt.datetime
    concurrency: int
    timeouts: Timeouts
    per_address: int = 0  # handshakes in flight per address at most (0: no bound beyond `concurrency`)
    peek: bool = True  # read the chain from a TLS 1.2 first flight when the server allows (certmgr.peek)


_WORKER_VERIFIER: tuple[tuple[dt.datetime, tuple[Path, ...]], Any] | None = None


def _verifier_for(now: dt.datetime, trust: tuple[Path, ...]) -> Any:
    # One verifier (and its caches) per process and per scan instant.
    global _WORKER_VERIFIER
    from certmgr.verify import Verifier

    if _WORKER_VERIFIER is None or _WORKER_VERIFIER[0] != (now, trust):
        _WORKER_VERIFIER = ((now, trust), Verifier(now=now, trust=trust))
    return _WORKER_VERIFIER[1]


def _drop_verifier() -> None:
    """After a scan: the verifier memoises a verdict per (chain, name) seen, which grows with the names
    scanned; nothing needs it once the results are in, so the parent does not keep it."""
    global _WORKER_VERIFIER
    _WORKER_VERIFIER = None


async def _run_endpoints(job: _Job, on_result: Callable[[EndpointResult], None]) -> None:
    """Probe `job.endpoints` with at most `job.concurrency` in flight in all, `job.per_address` per address.

    One queue per address drained by at most `per_address` lanes, every handshake also taking a
    slot of the shared gate: a POP with many names waits its turn without holding up the others.
    """
    verifier = _verifier_for(job.now, job.trust)
    queues: dict[str, collections.deque[Endpoint]] = {}
    for ep in job.endpoints:
        queues.setdefault(ep.address, collections.deque()).append(ep)
    gate = asyncio.Semaphore(max(1, job.concurrency))
    per_address = job.per_address if job.per_address > 0 else max(1, job.concurrency)

    async def lane(queue: collections.deque[Endpoint]) -> None:
        while queue:
            ep = queue.popleft()
            async with gate:
                p = await probe(ep.address, ep.port, ep.sni, connect_timeout=job.timeouts.connect,
                                handshake_timeout=job.timeouts.handshake, peek=job.peek)
            warn, crit = job.thresholds[ep.cert]
            on_result(classify(ep, p, verifier, job.now, warn=warn, critical=crit))

    async with asyncio.TaskGroup() as tg:
        for queue in queues.values():
            for _ in range(min(per_address, len(queue))):
                tg.create_task(lane(queue))


def _run_job_in_process(job: _Job) -> tuple[list[_Record], dict[str, CertInfo]]:
    """In a worker: the job's results as records, and each leaf they name once (pickled back cheaply)."""
    _raise_nofile()
    records: list[_Record] = []
    infos: dict[str, CertInfo] = {}

    def keep(r: EndpointResult) -> None:
        if r.info is not None:
            infos.setdefault(r.info.sha256, r.info)
        records.append(_record(r))

    asyncio.run(_run_endpoints(job, keep))
    return records, infos


def _raise_nofile() -> None:
    # Each in-flight handshake holds a socket; lift the soft fd limit to the hard one.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


DEFAULT_PER_ADDRESS = 16  # handshakes in flight per address (one POP) at most, all workers together


def default_workers(n_endpoints: int) -> int:
    """One process below a few hundred endpoints (fork costs more than it saves), else one per CPU."""
    return 1 if n_endpoints < 400 else max(1, os.cpu_count() or 1)


async def _public_endpoints(certs: Sequence[Certificate], *, resolver: tuple[str, int] | None, port: int,
                            timeout: float) -> AsyncIterator[Endpoint | tuple[Endpoint, str]]:
    """Resolve each name (A and AAAA); yields endpoints, or (placeholder endpoint, error) per DNS failure."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    res = dns.asyncresolver.Resolver(configure=resolver is None)
    if resolver is not None:
        res.nameservers = [resolver[0]]
        res.port = resolver[1]
    res.lifetime = timeout
    for cert in certs:
        for name in cert.domains:
            qname = WILDCARD_LABEL + name[1:] if name.startswith("*.") else name
            addrs: list[str] = []
            errors: list[str] = []
            for rdtype in ("A", "AAAA"):
                try:
                    ans = await res.resolve(qname, rdtype)
                    addrs.extend(r.to_text() for r in ans)
                except dns.resolver.NoAnswer:
                    continue
                except dns.resolver.NXDOMAIN:
                    errors.append("NXDOMAIN")
                    break
                except dns.exception.Timeout:
                    errors.append("timeout")
                except dns.exception.DNSException as exc:
                    errors.append(type(exc).__name__)
            if addrs:
                for a in addrs:
                    yield Endpoint(cert=cert.name, name=name, host=f"public:{a}", address=a, port=port)
            else:
                yield (Endpoint(cert=cert.name, name=name, host="public", address="", port=port),
                       "dns: " + (", ".join(dict.fromkeys(errors)) or "no address"))


async def scan(
    inventory: Inventory,
    store: _StoreLike | None,
    names: Sequence[str] = (),
    *,
    now: dt.datetime,
    concurrency: int = 100,
    per_address: int = DEFAULT_PER_ADDRESS,
    timeouts: Timeouts = Timeouts(),
    workers: int | None = None,
    public: bool = False,
    public_resolver: tuple[str, int] | None = None,
    public_port: int = 443,
    on_progress: Callable[[int, int], None] | None = None,
    keep: int = DEFAULT_KEEP,
    peek: bool = True,
) -> ScanResult:
    """Scan every endpoint of the named certificates (all when none): per-endpoint results, drift, severity.

    Never raises for a bad certificate or an unreachable host (those are results); raises ScanError
    only when the scan cannot run at all (e.g. an unreadable trust file). `workers` > 1 shards the
    handshakes across processes (default: `default_workers`). At most `concurrency` handshakes are
    in flight in all and `per_address` per address (a POP), across all workers. Results stream
    into aggregates as they arrive; beyond `keep` endpoints they are spooled to a temporary file
    (see ScanResult). With `peek` (the default) each chain is read from the server's TLS 1.2 first
    flight when it offers one, a full handshake otherwise (`certmgr.peek`).
    """
    from certmgr.verify import TrustError

    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    certs = inventory.select(tuple(names))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        _verifier_for(now, inventory.trust)  # fail fast on bad trust files, before any handshake
    except TrustError as exc:
        raise ScanError(exc.message, hint=exc.hint) from exc
    collector = _Collector(certs, now, keep)
    n_eps = sum(len(c.domains) * len(c.hosts) for c in certs)
    public_eps: list[Endpoint] = []
    if public:
        async for item in _public_endpoints(certs, resolver=public_resolver, port=public_port,
                                            timeout=timeouts.dns):
            if isinstance(item, tuple):
                collector.add(EndpointResult(endpoint=item[0], severity="error", error=item[1],
                                             problems=(item[1],)))
            else:
                public_eps.append(item)
    eps = itertools.chain(endpoints(certs, inventory), public_eps)
    n_eps += len(public_eps)
    total = n_eps + collector.n
    thresholds = {c.name: (c.warn_before, c.critical_before) for c in certs}
    n_workers = workers if workers is not None else default_workers(n_eps)
    n_workers = max(1, min(n_workers, n_eps or 1))
    _raise_nofile()

    def progress() -> None:
        if on_progress is not None:
            on_progress(collector.n, total)

    def collect(r: EndpointResult) -> None:
        collector.add(r)
        progress()

    job = _Job(endpoints=(), thresholds=thresholds, trust=inventory.trust, now=now, concurrency=concurrency,
               timeouts=timeouts, per_address=per_address, peek=peek)
    try:
        if n_workers == 1:
            await _run_endpoints(replace(job, endpoints=tuple(eps)), collect)
        else:
            await _run_sharded(eps, n_eps, n_workers, job, collector, progress)
    finally:
        _drop_verifier()
    live = live_fingerprints(store, [c.name for c in certs])
    # the whole fleet: also what the last `certmgr discover` found unmanaged and expiring (not summarised)
    extra = unmanaged_results(store, now) if not names else []
    return collector.finish(live, loop.time() - t0, extra=extra)


async def _run_sharded(eps: Iterator[Endpoint], n_eps: int, n_workers: int, job: _Job, collector: _Collector,
                       progress: Callable[[], None]) -> None:
    """Shard `eps` across forked worker processes in chunks, a few in flight at a time.

    Each worker gets its share of both bounds (at least one): `concurrency` / workers in all and
    `per_address` / workers per address, so the sum over workers stays within each bound.
    """
    import concurrent.futures
    import multiprocessing

    per_worker = max(1, math.ceil(job.concurrency / n_workers))
    share = replace(job, concurrency=per_worker,
                    per_address=max(1, job.per_address // n_workers) if job.per_address > 0 else 0)
    # Chunks several times smaller than a shard, so progress moves and a slow chunk does not idle a
    # core; but bounded, with only a few queued, so neither side holds every endpoint at once.
    chunk = min(max(50, math.ceil(n_eps / (n_workers * 4))), max(2000, per_worker * 10))
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending: set[asyncio.Future[tuple[list[_Record], dict[str, CertInfo]]]] = set()
        try:
            while True:
                while len(pending) < n_workers * 2 and (batch := tuple(itertools.islice(eps, chunk))):
                    pending.add(loop.run_in_executor(pool, _run_job_in_process, replace(share, endpoints=batch)))
                if not pending:
                    break
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    collector.add_records(*fut.result())
                    progress()
        finally:
            for f in pending:
                f.cancel()


# ---------------------------------------------------------------- state for `certmgr status`

SCHEMA_VERSION = 1


def endpoint_json(r: EndpointResult, now: dt.datetime) -> dict[str, Any]:
    """One endpoint in the documented `--json` schema (docs/scan.md)."""
    i = r.info
    days = r.days_left(now)
    return {
        "certificate": r.endpoint.cert,
        "name": r.endpoint.name,
        "host": r.endpoint.host,
        "address": r.endpoint.address,
        "port": r.endpoint.port,
        "severity": r.severity,
        "problems": list(r.problems),
        "error": r.error,
        "drift": r.drift,
        "serial": i.serial if i else None,
        "sha256": i.sha256 if i else None,
        "subject": i.subject if i else None,
        "issuer": i.issuer if i else None,
        "not_before": i.not_before.isoformat() if i else None,
        "not_after": i.not_after.isoformat() if i else None,
        "days_left": round(days, 3) if days is not None else None,
        "key_type": i.key_type if i else None,
        "names": list(i.names) if i else [],
        "chain": r.chain or None,
        "chain_length": r.chain_length,
        "elapsed_ms": round(r.elapsed * 1000, 1),
    }


def certificate_json(c: CertSummary) -> dict[str, Any]:
    return {
        "name": c.name,
        "severity": c.severity,
        "endpoints": c.endpoints,
        "hosts": {k: list(v) for k, v in c.hosts_by_severity.items()},
        "days_left": round(c.days_left, 3) if c.days_left is not None else None,
        "live_version": c.live_version,
        "live_sha256": c.live_sha256,
        "command": c.command,
    }


def _head_json(result: ScanResult) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "scanned_at": result.started.isoformat(),
        "elapsed_s": round(result.elapsed, 3),
        "severity": result.severity,
        "exit_code": result.exit_code,
        "counts": result.severity_counts(),
        "certificates": [certificate_json(c) for c in result.certificates],
    }


def result_json(result: ScanResult) -> dict[str, Any]:
    """The whole scan in the documented `--json` schema (all in memory: `json_text` streams it)."""
    return {**_head_json(result), "endpoints": [endpoint_json(r, result.started) for r in result.iter_endpoints()]}


def json_text(result: ScanResult, extra: Mapping[str, Any] | None = None) -> Iterator[str]:
    """`json.dumps({**result_json(result), **extra}, indent=2)`, in pieces, one endpoint at a time."""
    import json

    head = json.dumps({**_head_json(result), "endpoints": []}, indent=2)
    yield head[:head.rindex("[]")]
    first = True
    for r in result.iter_endpoints():
        body = json.dumps(endpoint_json(r, result.started), indent=2).replace("\n", "\n    ")
        yield ("[\n    " if first else ",\n    ") + body
        first = False
    yield "[]" if first else "\n  ]"
    for key, value in (extra or {}).items():
        item = json.dumps({key: value}, indent=2, default=str)
        yield ",\n" + item[2:-2]
    yield "\n}"


def save_state(store: StateStore, result: ScanResult) -> None:
    """One file per certificate, `state/scan/<name>.json`, for `certmgr status` (atomic, via the store).

    Every file is attempted; the first error (a StoreError) is raised afterwards. Certificates are
    written as their endpoints come off the scan's spool, a bounded number in flight.
    """
    import concurrent.futures

    summaries = {c.name: c for c in result.certificates}
    written: set[str] = set()

    def one(c: CertSummary, eps: Sequence[EndpointResult]) -> None:
        # scan takes no lock: a slower scan (the other controller's) finishing later keeps the newer one (docmerge)
        docmerge.merge_json(store, f"state/scan/{c.name}.json", {
            "schema": SCHEMA_VERSION,
            "scanned_at": result.started.isoformat(),
            **certificate_json(c),
            "endpoints": [endpoint_json(r, result.started) for r in eps],
        }, "scan")

    def groups() -> Iterator[tuple[CertSummary, Sequence[EndpointResult]]]:
        for name, eps in result.by_certificate():
            if name in summaries:
                written.add(name)
                yield summaries[name], eps
        for c in result.certificates:
            if c.name not in written:
                yield c, ()

    # Each save is write + fsync + rename + directory fsync; in parallel the file system batches
    # the journal commits (thousands of certificates would otherwise cost seconds).
    errors: list[BaseException] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        pending: set[concurrent.futures.Future[None]] = set()
        for c, eps in groups():
            if len(pending) >= 32:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                errors += [e for f in done if (e := f.exception()) is not None]
            pending.add(pool.submit(one, c, eps))
        errors += [e for f in concurrent.futures.as_completed(pending) if (e := f.exception()) is not None]
    if errors:
        raise errors[0]


__all__ = [
    "DEFAULT_KEEP", "DEFAULT_PER_ADDRESS", "EXIT_CODES", "SEVERITY_RANK", "UNMANAGED", "WILDCARD_LABEL",
    "CertSummary", "Endpoint", "EndpointResult", "Probe", "ScanResult", "Timeouts",
    "apply_drift", "classify", "endpoints", "expiry_problem", "json_text", "probe", "result_json", "save_state",
    "scan", "summarise", "unmanaged_results", "urgency_key", "worst",
]

