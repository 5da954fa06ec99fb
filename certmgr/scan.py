"""Scan: live TLS handshakes to a host's address with SNI; reads bad certificates too.

Verification is done separately (`certmgr.verify`) so that an expired, self-signed or wrong-host
certificate is read and reported, never a crash; every failure is a per-endpoint result.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import math
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from certmgr import log, sanitize
from certmgr.errors import ScanError
from certmgr.inventory import SEVERITIES, Certificate, Inventory, Threshold
from certmgr.material import CertInfo
from certmgr.store_api import StateStore

_log = logging.getLogger(__name__)

_CLIENT_CTX: ssl.SSLContext | None = None
_ENCODING_DER = 2  # _ssl.ENCODING_DER

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # ok < warning < critical < error
EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2, "error": 3}  # the Nagios/monitoring-plugins convention
WILDCARD_LABEL = "certmgr-scan"  # SNI sent for `*.example.org`: a name the wildcard must cover


def _client_context() -> ssl.SSLContext:
    # A scanner must read bad certificates: verification is off for the handshake
    # and done afterwards against the system roots plus the inventory's trust.
    # One context for the whole scan: building one per handshake costs more than the handshake.
    global _CLIENT_CTX
    if _CLIENT_CTX is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Debian's SECLEVEL=2 would refuse to *read* weak servers; a scanner reports them instead.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        _CLIENT_CTX = ctx
    return _CLIENT_CTX


def worst(severities: Iterable[str]) -> str:
    """The most severe of `severities` ("ok" when empty)."""
    return max(severities, key=SEVERITY_RANK.__getitem__, default="ok")


# ---------------------------------------------------------------- one handshake


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """What one handshake saw: the DER chain as served, or why there is none."""

    address: str
    port: int
    sni: str
    chain: tuple[bytes, ...] = ()  # leaf first, as sent by the server
    error: str | None = None  # "refused", "connect timeout", "handshake timeout", "tls: …", "dns: …", "os: …"
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chain)


async def probe(
    address: str, port: int, sni: str, *, connect_timeout: float = 5.0, handshake_timeout: float = 5.0
) -> Probe:
    """One TLS handshake to `address:port` with `sni`; every failure becomes `Probe.error`.

    Connect and handshake are bounded separately. The handshake is an `ssl.SSLObject` over
    memory BIOs driven by a bare asyncio.Protocol on a plain TCP transport: no SSL transport, no
    stream objects; that is what makes thousands of handshakes per second possible from one loop.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()

    def result(chain: tuple[bytes, ...] = (), error: str | None = None) -> Probe:
        # The TLS stack's and resolver's words can quote the peer: inert from here on.
        return Probe(address=address, port=port, sni=sni, chain=chain,
                     error=None if error is None else sanitize.line(error), elapsed=loop.time() - start)

    try:
        family, sockaddr = await _resolve(loop, address, port, connect_timeout)
    except _DNSFailure as exc:
        return result(error=f"dns: {exc}")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.sock_connect(sock, sockaddr)
        except TimeoutError:
            return result(error="connect timeout")
        except ConnectionRefusedError:
            return result(error="refused")
        except OSError as exc:
            return result(error=f"os: {exc.strerror or exc}")
        transport: asyncio.Transport | None = None
        try:
            done: asyncio.Future[tuple[bytes, ...]] = loop.create_future()
            async with asyncio.timeout(handshake_timeout):
                transport, _ = await loop.create_connection(lambda: _Handshake(sni, done), sock=sock)
                chain = await done
        except TimeoutError:
            return result(error="handshake timeout")
        except ssl.SSLError as exc:
            return result(error=f"tls: {_ssl_reason(exc)}")
        except (ConnectionError, OSError) as exc:
            return result(error=f"tls: connection lost ({exc.strerror or type(exc).__name__})")
        except _EOF:
            return result(error="tls: connection closed during handshake")
        finally:
            if not done.done():
                done.cancel()  # nobody will read it: no "exception never retrieved" after the abort below
            if transport is not None:
                transport.abort()
        if not chain:
            return result(error="tls: no certificate sent")
        return result(chain=chain)
    finally:
        sock.close()


class _EOF(Exception):
    pass


class _DNSFailure(Exception):
    pass


async def _resolve(loop: asyncio.AbstractEventLoop, address: str, port: int,
                   timeout: float) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        return (socket.AF_INET6, (address, port, 0, 0)) if ip.version == 6 else (socket.AF_INET, (address, port))
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise _DNSFailure(f"{address}: timeout") from None
    except socket.gaierror as exc:
        raise _DNSFailure(f"{address}: {exc.strerror}") from None
    if not infos:
        raise _DNSFailure(f"{address}: no address")
    return infos[0][0], infos[0][4]


class _Handshake(asyncio.Protocol):
    """Drives one client handshake from data callbacks; resolves `done` with the served chain."""

    __slots__ = ("done", "incoming", "obj", "outgoing", "transport")

    def __init__(self, sni: str, done: asyncio.Future[tuple[bytes, ...]]) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = _client_context().wrap_bio(self.incoming, self.outgoing, server_hostname=sni)
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def eof_received(self) -> None:
        self._fail(_EOF())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or _EOF())

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def _step(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            data = self.outgoing.read()
            if data and self.transport is not None:
                self.transport.write(data)
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        # Our Finished is not sent: the server's certificate is already read, and a server that
        # never sees the Finished skips minting session tickets (half its remaining work). nginx
        # logs the early close at "info" level only.
        if not self.done.done():
            self.done.set_result(_served_chain(self.obj))


def _served_chain(obj: ssl.SSLObject) -> tuple[bytes, ...]:
    # Python 3.11 exposes the unverified chain only on the private object (public from 3.13).
    raw = obj._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    if raw:
        return tuple(c.public_bytes(_ENCODING_DER) for c in raw)
    leaf = obj.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    # OpenSSL names a received alert SSLV3_ALERT_*, TLSV1_ALERT_*, TLSV13_ALERT_* or TLSV1_* (e.g. unrecognized name)
    for prefix in ("SSLV3_ALERT_", "TLSV13_ALERT_", "TLSV1_ALERT_", "TLSV1_"):
        if reason.startswith(prefix):
            return "alert " + reason.removeprefix(prefix).lower().replace("_", " ")
    if reason == "WRONG_VERSION_NUMBER":
        return "not TLS (wrong version number)"
    return reason.lower().replace("_", " ") if reason else str(exc)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanResult:
    """Everything one scan saw, endpoints sorted by urgency; `severity` is the worst of them."""

    started: dt.datetime
    elapsed: float
    endpoints: tuple[EndpointResult, ...]
    certificates: tuple[CertSummary, ...]
    severity: str = "ok"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.severity]


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


def apply_drift(results: Sequence[EndpointResult], live: Mapping[str, str | None]) -> list[EndpointResult]:
    """Flag endpoints serving another leaf than the local live version, or than the other POPs.

    Reference per (certificate, name): the live version's SHA-256 when the store has one; otherwise
    the leaf most POPs serve, ties going to the newest (the classic case: one POP still serves the
    old certificate).
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(results):
        if r.info is not None:
            groups.setdefault((r.endpoint.cert, r.endpoint.name), []).append(i)
    out = list(results)
    for (cert, _name), idx in groups.items():
        ref = live.get(cert)
        ref_what = "the live version"
        if ref is None:
            counts = Counter(results[i].info.sha256 for i in idx)  # type: ignore[union-attr]
            if len(counts) < 2:
                continue
            newest = {results[i].info.sha256: results[i].info.not_before for i in idx}  # type: ignore[union-attr]
            ref = max(counts, key=lambda h: (counts[h], newest[h]))
            ref_what = "the other hosts"
        ref_serial = next((results[i].info.serial for i in idx  # type: ignore[union-attr]
                           if results[i].info.sha256 == ref), None)  # type: ignore[union-attr]
        for i in idx:
            r = out[i]
            assert r.info is not None
            if r.info.sha256 != ref:
                what = f"serial {ref_serial}" if ref_serial else f"sha256 {ref[:16]}…"
                msg = f"drift: serves serial {r.info.serial}, not {ref_what} ({what})"
                out[i] = replace(r, drift=True, severity=worst((r.severity, "critical")),
                                 problems=(*r.problems, msg))
    return out


def urgency_key(r: EndpointResult) -> tuple[int, float, str, str, str]:
    """Most urgent first: worst severity, then least time left, then by name."""
    left = r.info.not_after.timestamp() if r.info is not None else -math.inf
    return (-SEVERITY_RANK[r.severity], left, r.endpoint.cert, r.endpoint.name, r.endpoint.host)


def summarise(results: Sequence[EndpointResult], certs: Sequence[Certificate], now: dt.datetime,
              live: Mapping[str, tuple[int, str] | None]) -> tuple[CertSummary, ...]:
    by_cert: dict[str, list[EndpointResult]] = {c.name: [] for c in certs}
    for r in results:
        by_cert.setdefault(r.endpoint.cert, []).append(r)
    out = []
    for name, rs in by_cert.items():
        sev = worst(r.severity for r in rs)
        hosts: dict[str, list[str]] = {}
        for r in rs:
            if r.severity != "ok":
                lst = hosts.setdefault(r.severity, [])
                if r.endpoint.host not in lst:
                    lst.append(r.endpoint.host)
        lefts = [d for r in rs if (d := r.days_left(now)) is not None]
        lv = live.get(name)
        command = None
        if sev != "ok":
            drift_only = all(r.drift or r.severity == "ok" for r in rs) and any(r.drift for r in rs)
            if drift_only and lv is not None:
                command = f"certmgr deploy {name}"
            elif any(r.info is not None and r.severity != "ok" for r in rs):
                command = f"certmgr renew {name}"
            else:
                command = f"certmgr scan {name}"  # only unreachable hosts: look at them, then re-scan
        out.append(CertSummary(name=name, severity=sev, endpoints=len(rs),
                               hosts_by_severity={k: tuple(v) for k, v in hosts.items()},
                               live_version=lv[0] if lv else None, live_sha256=lv[1] if lv else None,
                               days_left=min(lefts) if lefts else None, command=command))
    return tuple(out)


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


_WORKER_VERIFIER: tuple[tuple[dt.datetime, tuple[Path, ...]], Any] | None = None


def _verifier_for(now: dt.datetime, trust: tuple[Path, ...]) -> Any:
    # One verifier (and its caches) per process and per scan instant.
    global _WORKER_VERIFIER
    from certmgr.verify import Verifier

    if _WORKER_VERIFIER is None or _WORKER_VERIFIER[0] != (now, trust):
        _WORKER_VERIFIER = ((now, trust), Verifier(now=now, trust=trust))
    return _WORKER_VERIFIER[1]


async def _run_endpoints(job: _Job, on_result: Callable[[EndpointResult], None]) -> None:
    """Probe `job.endpoints` with at most `job.concurrency` in flight; workers pull from one iterator,
    so memory does not grow with the number of endpoints."""
    verifier = _verifier_for(job.now, job.trust)
    it = iter(job.endpoints)

    async def worker() -> None:
        for ep in it:
            p = await probe(ep.address, ep.port, ep.sni, connect_timeout=job.timeouts.connect,
                            handshake_timeout=job.timeouts.handshake)
            warn, crit = job.thresholds[ep.cert]
            on_result(classify(ep, p, verifier, job.now, warn=warn, critical=crit))

    async with asyncio.TaskGroup() as tg:
        for _ in range(max(1, min(job.concurrency, len(job.endpoints)))):
            tg.create_task(worker())


def _run_job_in_process(job: _Job) -> list[EndpointResult]:
    _raise_nofile()
    out: list[EndpointResult] = []
    asyncio.run(_run_endpoints(job, out.append))
    return out


def _raise_nofile() -> None:
    # Each in-flight handshake holds a socket; lift the soft fd limit to the hard one.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


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
    timeouts: Timeouts = Timeouts(),
    workers: int | None = None,
    public: bool = False,
    public_resolver: tuple[str, int] | None = None,
    public_port: int = 443,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Scan every endpoint of the named certificates (all when none): per-endpoint results, drift, severity.

    Never raises for a bad certificate or an unreachable host (those are results); raises ScanError
    only when the scan cannot run at all (e.g. an unreadable trust file). `workers` > 1 shards the
    handshakes across processes (default: `default_workers`).
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
    eps = list(endpoints(certs, inventory))
    results: list[EndpointResult] = []
    if public:
        async for item in _public_endpoints(certs, resolver=public_resolver, port=public_port,
                                            timeout=timeouts.dns):
            if isinstance(item, tuple):
                results.append(EndpointResult(endpoint=item[0], severity="error", error=item[1],
                                              problems=(item[1],)))
            else:
                eps.append(item)
    total = len(eps) + len(results)
    thresholds = {c.name: (c.warn_before, c.critical_before) for c in certs}
    n_workers = workers if workers is not None else default_workers(len(eps))
    n_workers = max(1, min(n_workers, len(eps) or 1))
    _raise_nofile()

    def progress() -> None:
        if on_progress is not None:
            on_progress(len(results), total)

    def collect(r: EndpointResult) -> None:
        results.append(r)
        progress()

    if n_workers == 1:
        await _run_endpoints(_Job(endpoints=tuple(eps), thresholds=thresholds, trust=inventory.trust, now=now,
                                  concurrency=concurrency, timeouts=timeouts), collect)
    else:
        await _run_sharded(eps, n_workers, thresholds, inventory.trust, now, concurrency, timeouts, results,
                           progress)
    live = live_fingerprints(store, [c.name for c in certs])
    final = apply_drift(results, {k: (v[1] if v else None) for k, v in live.items()})
    final.sort(key=urgency_key)
    summaries = summarise(final, certs, now, live)
    if not names:  # the whole fleet: also what the last `certmgr discover` found unmanaged and expiring
        final = sorted([*final, *unmanaged_results(store, now)], key=urgency_key)
    return ScanResult(started=now, elapsed=loop.time() - t0, endpoints=tuple(final), certificates=summaries,
                      severity=worst(r.severity for r in final))


async def _run_sharded(eps: list[Endpoint], n_workers: int, thresholds: Mapping[str, tuple[Threshold, Threshold]],
                       trust: tuple[Path, ...], now: dt.datetime, concurrency: int, timeouts: Timeouts,
                       results: list[EndpointResult], progress: Callable[[], None]) -> None:
    import concurrent.futures
    import multiprocessing

    # Chunks several times smaller than a shard, so progress moves and a slow chunk does not idle a core.
    chunk = max(50, math.ceil(len(eps) / (n_workers * 4)))
    per_worker = max(1, math.ceil(concurrency / n_workers))
    loop = asyncio.get_running_loop()
    interned: dict[str, CertInfo] = {}
    with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futs = [
            loop.run_in_executor(pool, _run_job_in_process,
                                 _Job(endpoints=tuple(eps[i:i + chunk]), thresholds=thresholds, trust=trust,
                                      now=now, concurrency=per_worker, timeouts=timeouts))
            for i in range(0, len(eps), chunk)
        ]
        try:
            for fut in asyncio.as_completed(futs):
                for r in await fut:
                    if r.info is not None:  # share one CertInfo per distinct leaf, as the workers did
                        r = replace(r, info=interned.setdefault(r.info.sha256, r.info))
                    results.append(r)
                progress()
        finally:
            for f in futs:
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


def result_json(result: ScanResult) -> dict[str, Any]:
    """The whole scan in the documented `--json` schema."""
    counts = Counter(r.severity for r in result.endpoints)
    return {
        "schema": SCHEMA_VERSION,
        "scanned_at": result.started.isoformat(),
        "elapsed_s": round(result.elapsed, 3),
        "severity": result.severity,
        "exit_code": result.exit_code,
        "counts": {s: counts.get(s, 0) for s in SEVERITIES},
        "certificates": [certificate_json(c) for c in result.certificates],
        "endpoints": [endpoint_json(r, result.started) for r in result.endpoints],
    }


def save_state(store: StateStore, result: ScanResult) -> None:
    """One file per certificate, `state/scan/<name>.json`, for `certmgr status` (atomic, via the store).

    Every file is attempted; the first error (a StoreError) is raised afterwards.
    """
    per_cert: dict[str, list[dict[str, Any]]] = {c.name: [] for c in result.certificates}
    for r in result.endpoints:
        per_cert.setdefault(r.endpoint.cert, []).append(endpoint_json(r, result.started))

    def one(c: CertSummary) -> None:
        store.save_json(f"state/scan/{c.name}.json", {
            "schema": SCHEMA_VERSION,
            "scanned_at": result.started.isoformat(),
            **certificate_json(c),
            "endpoints": per_cert.get(c.name, []),
        })

    # Each save is write + fsync + rename + directory fsync; in parallel the file system batches
    # the journal commits (thousands of certificates would otherwise cost seconds).
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        errors = [f.exception() for f in [pool.submit(one, c) for c in result.certificates]]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


__all__ = [
    "EXIT_CODES", "CertSummary", "Endpoint", "EndpointResult", "Probe", "ScanResult", "Timeouts",
    "apply_drift", "classify", "endpoints", "expiry_problem", "probe", "result_json", "save_state", "scan",
    "worst",
]

