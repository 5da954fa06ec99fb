"""Scan: live TLS handshakes to a host's address with SNI; reads bad certificates too.

Verification is done separately (`certmgr.verify`) so that an expired, self-signed or wrong-host
certificate is read and reported, never a crash; every failure is a per-endpoint result.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import heapq
import itertools
import logging
import math
import os
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from certmgr import log, sanitize
from certmgr.errors import ScanError
from certmgr.inventory import SEVERITIES, Certificate, Inventory, Threshold
from certmgr.material import CertInfo
from certmgr.probe import Probe, probe
from certmgr.spool import Spool

_log = logging.getLogger(__name__)

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # ok < warning < critical < error
EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2, "error": 3}  # the Nagios/monitoring-plugins convention
WILDCARD_LABEL = "certmgr-scan"  # SNI sent for `*.example.org`: a name the wildcard must cover


def worst(severities: Iterable[str]) -> str:
    """The most severe of `severities` ("ok" when empty)."""
    return max(severities, key=SEVERITY_RANK.__getitem__, default="ok")


# ---------------------------------------------------------------- what to scan


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Every scan wait is bounded; connect and handshake separately."""

    connect: float = 5.0
    handshake: float = 5.0
    dns: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One (certificate, DNS name, host) triple: where to connect and which SNI to send."""

    cert: str
    name: str  # DNS name from the inventory (may be a wildcard)
    host: str  # inventory host name, or "public" for --public endpoints
    address: str
    port: int

    @property
    def sni(self) -> str:
        return WILDCARD_LABEL + self.name[1:] if self.name.startswith("*.") else self.name


def endpoints(certs: Iterable[Certificate], inventory: Inventory) -> Iterator[Endpoint]:
    """Every (certificate, name, deployed host) triple, in inventory order."""
    for cert in certs:
        for name in cert.domains:
            for host_name in cert.hosts:
                host = inventory.hosts[host_name]
                yield Endpoint(cert=cert.name, name=name, host=host.name, address=host.address,
                               port=host.https_port)


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointResult:
    """What was served at one endpoint and what is wrong with it; small, so 10,000 of them fit easily."""

    endpoint: Endpoint
    severity: str  # ok | warning | critical | error
    problems: tuple[str, ...] = ()
    error: str | None = None  # why no certificate could be read (then severity is "error")
    info: CertInfo | None = None  # the leaf served
    chain: str = ""  # chain status (certmgr.verify.CHAIN_*), "" when nothing was read
    chain_length: int = 0
    drift: bool = False
    elapsed: float = 0.0

    def days_left(self, now: dt.datetime) -> float | None:
        return None if self.info is None else (self.info.not_after - now).total_seconds() / 86400


@dataclass(frozen=True, slots=True, kw_only=True)
class CertSummary:
    """One certificate across all its endpoints."""

    name: str
    severity: str
    endpoints: int
    hosts_by_severity: Mapping[str, tuple[str, ...]]
    live_sha256: str | None = None  # the store's live version, when there is one
    live_version: int | None = None
    days_left: float | None = None  # minimum over endpoints that served something
    command: str | None = None  # what on-call should run


class _Spooled(Protocol):
    """Where a large scan keeps every endpoint: read back most urgent first, or per certificate."""

    def iter_sorted(self) -> Iterator[EndpointResult]: ...
    def iter_grouped(self) -> Iterator[tuple[str, list[EndpointResult]]]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanResult:
    """Everything one scan saw, endpoints sorted by urgency; `severity` is the worst of them.

    A scan of up to `keep` endpoints (scan()'s argument) holds them all in `endpoints`. A larger one
    holds only the `keep` most urgent there, with every endpoint on disk in `spooled`: use
    `iter_endpoints()` / `by_certificate()` and `total` / `severity_counts()` to see them all.
    """

    started: dt.datetime
    elapsed: float
    endpoints: tuple[EndpointResult, ...]
    certificates: tuple[CertSummary, ...]
    severity: str = "ok"
    total: int | None = None  # every endpoint scanned (None: len(endpoints))
    counts: Mapping[str, int] | None = None  # endpoints per severity (None: counted from endpoints)
    spooled: _Spooled | None = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.severity]

    @property
    def endpoint_count(self) -> int:
        return len(self.endpoints) if self.total is None else self.total

    def severity_counts(self) -> dict[str, int]:
        """Endpoints per severity, every severity present (ok, warning, critical, error)."""
        if self.counts is not None:
            return {s: self.counts.get(s, 0) for s in SEVERITIES}
        c = Counter(r.severity for r in self.endpoints)
        return {s: c.get(s, 0) for s in SEVERITIES}

    def iter_endpoints(self) -> Iterator[EndpointResult]:
        """Every endpoint, most urgent first (read back from disk for a large scan)."""
        return iter(self.endpoints) if self.spooled is None else self.spooled.iter_sorted()

    def by_certificate(self) -> Iterator[tuple[str, list[EndpointResult]]]:
        """(certificate, its endpoints most urgent first) for every certificate with endpoints, in no set order."""
        if self.spooled is not None:
            yield from self.spooled.iter_grouped()
            return
        groups: dict[str, list[EndpointResult]] = {}
        for r in self.endpoints:
            groups.setdefault(r.endpoint.cert, []).append(r)
        yield from groups.items()


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
    return f"{seconds / 86400:.1f}d" if seconds >= 86400 else f"{seconds / 3600:.1f}h"


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


@dataclass(frozen=True, slots=True)
class _DriftRef:
    sha256: str
    what: str  # "the live version" | "the other hosts"
    serial: str | None  # of the reference leaf, when some endpoint of the group serves it


def _drift_refs(groups: Mapping[tuple[str, str], Counter[str]], infos: Mapping[str, CertInfo],
                live: Mapping[str, str | None]) -> dict[tuple[str, str], _DriftRef]:
    """The reference leaf per (certificate, name) group, from the count of each leaf served in it."""
    out: dict[tuple[str, str], _DriftRef] = {}
    for (cert, name), counts in groups.items():
        ref = live.get(cert)
        what = "the live version"
        if ref is None:
            if len(counts) < 2:
                continue
            ref = max(counts, key=lambda h: (counts[h], infos[h].not_before))
            what = "the other hosts"
        out[(cert, name)] = _DriftRef(ref, what, infos[ref].serial if ref in counts else None)
    return out


def _with_drift(r: EndpointResult, refs: Mapping[tuple[str, str], _DriftRef]) -> EndpointResult:
    if r.info is None:
        return r
    ref = refs.get((r.endpoint.cert, r.endpoint.name))
    if ref is None or r.info.sha256 == ref.sha256:
        return r
    what = f"serial {ref.serial}" if ref.serial else f"sha256 {ref.sha256[:16]}…"
    msg = f"drift: serves serial {r.info.serial}, not {ref.what} ({what})"
    return replace(r, drift=True, severity=worst((r.severity, "critical")), problems=(*r.problems, msg))


def apply_drift(results: Sequence[EndpointResult], live: Mapping[str, str | None]) -> list[EndpointResult]:
    """Flag endpoints serving another leaf than the local live version, or than the other POPs.

    Reference per (certificate, name): the live version's SHA-256 when the store has one; otherwise
    the leaf most POPs serve, ties going to the newest (the classic case: one POP still serves the
    old certificate).
    """
    groups: dict[tuple[str, str], Counter[str]] = {}
    infos: dict[str, CertInfo] = {}
    for r in results:
        if r.info is not None:
            infos.setdefault(r.info.sha256, r.info)
            groups.setdefault((r.endpoint.cert, r.endpoint.name), Counter())[r.info.sha256] += 1
    refs = _drift_refs(groups, infos, live)
    return [_with_drift(r, refs) for r in results]


def urgency_key(r: EndpointResult) -> tuple[int, float, str, str, str]:
    """Most urgent first: worst severity, then least time left, then by name."""
    left = r.info.not_after.timestamp() if r.info is not None else -math.inf
    return (-SEVERITY_RANK[r.severity], left, r.endpoint.cert, r.endpoint.name, r.endpoint.host)


class _CertAgg:
    """One certificate's summary, built one endpoint at a time in any order."""

    __slots__ = ("bad_info", "drift_any", "drift_only", "hosts", "left", "n", "sev")

    def __init__(self) -> None:
        self.sev, self.n, self.left = "ok", 0, math.inf
        self.hosts: dict[str, dict[str, tuple[float, str]]] = {}  # severity → host → its most urgent (left, name)
        self.drift_any, self.drift_only, self.bad_info = False, True, False

    def add(self, r: EndpointResult, now: dt.datetime) -> None:
        self.n += 1
        if SEVERITY_RANK[r.severity] > SEVERITY_RANK[self.sev]:
            self.sev = r.severity
        if r.severity != "ok":
            _, left, _, name, host = urgency_key(r)
            seen = self.hosts.setdefault(r.severity, {})
            if host not in seen or (left, name) < seen[host]:
                seen[host] = (left, name)
            self.drift_only = self.drift_only and r.drift
            self.bad_info = self.bad_info or r.info is not None
        self.drift_any = self.drift_any or r.drift
        if (d := r.days_left(now)) is not None and d < self.left:
            self.left = d

    def summary(self, name: str, lv: tuple[int, str] | None) -> CertSummary:
        command = None
        if self.sev != "ok":
            if self.drift_only and self.drift_any and lv is not None:
                command = f"certmgr deploy {name}"
            elif self.bad_info:
                command = f"certmgr renew {name}"
            else:
                command = f"certmgr scan {name}"  # only unreachable hosts: look at them, then re-scan
        # Hosts in the order the urgency-sorted endpoints first name them, worst severity first.
        hosts = {s: tuple(h for _, h in sorted((key, h) for h, key in self.hosts[s].items()))
                 for s in sorted(self.hosts, key=SEVERITY_RANK.__getitem__, reverse=True)}
        return CertSummary(name=name, severity=self.sev, endpoints=self.n, hosts_by_severity=hosts,
                           live_version=lv[0] if lv else None, live_sha256=lv[1] if lv else None,
                           days_left=None if self.left == math.inf else self.left, command=command)


def summarise(results: Iterable[EndpointResult], certs: Sequence[Certificate], now: dt.datetime,
              live: Mapping[str, tuple[int, str] | None]) -> tuple[CertSummary, ...]:
    """One CertSummary per certificate (those in `certs` first, in order), from its endpoints in any order."""
    aggs: dict[str, _CertAgg] = {c.name: _CertAgg() for c in certs}
    for r in results:
        aggs.setdefault(r.endpoint.cert, _CertAgg()).add(r, now)
    return tuple(a.summary(name, live.get(name)) for name, a in aggs.items())


# ---------------------------------------------------------------- streaming the results

DEFAULT_KEEP = 1000  # endpoints a ScanResult holds in memory; a larger scan spools the rest to disk
_RUN = 2048  # endpoints per spooled run (merging reads one 64 KiB buffer per run)
_Record = tuple[Any, ...]


def _record(r: EndpointResult) -> _Record:
    e = r.endpoint
    return (*urgency_key(r), e.address, e.port, r.severity, r.problems, r.error,
            r.info.sha256 if r.info is not None else None, r.chain, r.chain_length, r.drift, r.elapsed)


_SHA = 10  # where _record puts the leaf's SHA-256


def _record_key(rec: _Record) -> tuple[Any, ...]:
    return rec[:5]


def _from_record(rec: _Record, infos: Mapping[str, CertInfo]) -> EndpointResult:
    (_, _, cert, name, host, address, port, severity, problems, error, sha, chain, chain_length, drift,
     elapsed) = rec
    # Interned: a large scan's per-certificate summaries hold these names once, not once per endpoint.
    return EndpointResult(endpoint=Endpoint(cert=sys.intern(cert), name=sys.intern(name), host=sys.intern(host),
                                            address=sys.intern(address), port=port),
                          severity=severity, problems=problems, error=error,
                          info=infos[sha] if sha is not None else None, chain=chain, chain_length=chain_length,
                          drift=drift, elapsed=elapsed)


class _SpoolView:
    """A large scan's endpoints on disk: runs each sorted by urgency, read back merged or per certificate."""

    def __init__(self, spool: Spool, infos: Mapping[str, CertInfo], per_cert: Mapping[str, int]) -> None:
        self.spool, self.infos, self.per_cert = spool, infos, per_cert

    def iter_sorted(self) -> Iterator[EndpointResult]:
        for rec in self.spool.merged(_record_key):
            yield _from_record(rec, self.infos)

    def iter_grouped(self) -> Iterator[tuple[str, list[EndpointResult]]]:
        # Runs arrive roughly in inventory order (certificate by certificate), so few certificates
        # are open at once: each is handed out as soon as all its endpoints have been read.
        open_: dict[str, list[_Record]] = {}
        for rec in self.spool.records():
            recs = open_.setdefault(rec[2], [])
            recs.append(rec)
            if len(recs) >= self.per_cert.get(rec[2], 0):
                del open_[rec[2]]
                recs.sort(key=_record_key)
                yield rec[2], [_from_record(x, self.infos) for x in recs]
        for cert, recs in open_.items():
            recs.sort(key=_record_key)
            yield cert, [_from_record(x, self.infos) for x in recs]


@contextlib.contextmanager
def _spooling() -> Iterator[None]:
    """A full or unwritable temporary directory is the operator's to fix: a ScanError, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise ScanError(f"scan: cannot spool results to {tempfile.gettempdir()}: {exc.strerror or exc} "
                        "(scan stopped)", hint="free space there, or set TMPDIR to a writable directory") from exc


class _Collector:
    """Takes each endpoint's result as it arrives, keeps aggregates, spools the rest to disk.

    Drift needs every endpoint of a name before any of them can be judged, so results are
    spooled twice: as they come, then (drift applied, runs sorted by urgency) for the readers.
    Memory: the distinct leaves served, one counter per (certificate, name), one summary per
    certificate, and the `keep` most urgent endpoints — not the endpoints.
    """

    def __init__(self, certs: Sequence[Certificate], now: dt.datetime, keep: int) -> None:
        self.now, self.keep = now, max(1, keep)
        with _spooling():
            self.raw = Spool()
        self.buf: list[_Record] = []
        self.n = 0
        self.infos: dict[str, CertInfo] = {}
        self.groups: dict[tuple[str, str], Counter[str]] = {}
        self.cert_names = [c.name for c in certs]

    def add(self, r: EndpointResult) -> None:
        if r.info is not None:
            self.infos.setdefault(r.info.sha256, r.info)
            self.groups.setdefault((r.endpoint.cert, r.endpoint.name), Counter())[r.info.sha256] += 1
        self.buf.append(_record(r))
        self.n += 1
        if len(self.buf) >= _RUN:
            self._flush()

    def add_records(self, records: Sequence[_Record], infos: Mapping[str, CertInfo]) -> None:
        """A worker's results as records (cheap to pickle), with the leaves they name."""
        for sha, info in infos.items():
            self.infos.setdefault(sha, info)
        for rec in records:
            if (sha := rec[_SHA]) is not None:
                self.groups.setdefault((rec[2], rec[3]), Counter())[sha] += 1
        self.buf.extend(records)
        self.n += len(records)
        if len(self.buf) >= _RUN:
            self._flush()

    def _flush(self) -> None:
        with _spooling():
            while self.buf:
                self.raw.add_run(self.buf[:_RUN])
                del self.buf[:_RUN]

    def finish(self, live: Mapping[str, tuple[int, str] | None], elapsed: float,
               extra: Sequence[EndpointResult] = ()) -> ScanResult:
        """Drift, summaries and the sorted spool; `extra` results (discover's unmanaged certificates)
        join the endpoints and the severity but no summary and no drift."""
        self._flush()
        refs = _drift_refs(self.groups, self.infos, {k: (v[1] if v else None) for k, v in live.items()})
        with _spooling():
            final = Spool()
        aggs: dict[str, _CertAgg] = {name: _CertAgg() for name in self.cert_names}
        counts: Counter[str] = Counter()
        top: list[EndpointResult] = []
        for i in range(self.raw.runs):
            run = sorted((_with_drift(_from_record(rec, self.infos), refs) for rec in self.raw.run(i)),
                         key=urgency_key)
            for r in run:
                aggs.setdefault(r.endpoint.cert, _CertAgg()).add(r, self.now)
                counts[r.severity] += 1
            top = list(itertools.islice(heapq.merge(top, run, key=urgency_key), self.keep))
            with _spooling():
                final.add_run(_record(r) for r in run)
        self.raw.close()
        per_cert = {name: a.n for name, a in aggs.items()}
        if extra:
            run = sorted(extra, key=urgency_key)
            for r in run:
                counts[r.severity] += 1
                per_cert[r.endpoint.cert] = per_cert.get(r.endpoint.cert, 0) + 1
                if r.info is not None:
                    self.infos.setdefault(r.info.sha256, r.info)
            top = list(itertools.islice(heapq.merge(top, run, key=urgency_key), self.keep))
            with _spooling():
                final.add_run(_record(r) for r in run)
            self.n += len(run)
        summaries = tuple(a.summary(name, live.get(name)) for name, a in aggs.items())
        severity = worst(counts)
        if self.n <= self.keep:
            final.close()
            return ScanResult(started=self.now, elapsed=elapsed, endpoints=tuple(top), certificates=summaries,
                              severity=severity)
        view = _SpoolView(final, self.infos, per_cert)
        return ScanResult(started=self.now, elapsed=elapsed, endpoints=tuple(top), certificates=summaries,
                          severity=severity, total=self.n, counts=dict(counts), spooled=view)


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
    if n_workers == 1:
        await _run_endpoints(replace(job, endpoints=tuple(eps)), collect)
    else:
        await _run_sharded(eps, n_eps, n_workers, job, collector, progress)
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


class _StateStore(Protocol):
    def save_json(self, relpath: str, obj: Any, **kw: Any) -> Any: ...


def save_state(store: _StateStore, result: ScanResult) -> None:
    """One file per certificate, `state/scan/<name>.json`, for `certmgr status` (atomic, via the store).

    Every file is attempted; the first error (a StoreError) is raised afterwards. Certificates are
    written as their endpoints come off the scan's spool, a bounded number in flight.
    """
    import concurrent.futures

    summaries = {c.name: c for c in result.certificates}
    written: set[str] = set()

    def one(c: CertSummary, eps: Sequence[EndpointResult]) -> None:
        store.save_json(f"state/scan/{c.name}.json", {
            "schema": SCHEMA_VERSION,
            "scanned_at": result.started.isoformat(),
            **certificate_json(c),
            "endpoints": [endpoint_json(r, result.started) for r in eps],
        })

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
    "EXIT_CODES", "CertSummary", "Endpoint", "EndpointResult", "Probe", "ScanResult", "Timeouts",
    "apply_drift", "classify", "endpoints", "expiry_problem", "json_text", "probe", "result_json", "save_state",
    "scan",
    "worst",
]

