"""Scan results: the types, drift, per-certificate summaries, and the streaming that keeps them small.

`certmgr.scan` produces these (and re-exports them); a large scan's endpoints live in a spool on
disk (`certmgr.spool`), read back most urgent first or one certificate at a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import itertools
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from certmgr.errors import ScanError
from certmgr.inventory import SEVERITIES, Certificate
from certmgr.material import CertInfo
from certmgr.spool import Spool

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # ok < warning < critical < error
EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2, "error": 3}  # the Nagios/monitoring-plugins convention
WILDCARD_LABEL = "certmgr-scan"  # SNI sent for `*.example.org`: a name the wildcard must cover


def worst(severities: Iterable[str]) -> str:
    """The most severe of `severities` ("ok" when empty)."""
    return max(severities, key=SEVERITY_RANK.__getitem__, default="ok")


# ---------------------------------------------------------------- results


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
