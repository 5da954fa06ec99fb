"""An observer of the fleet that shares no code with certmgr: it sees what a client and a POP's disk see.

Every `interval` seconds it handshakes (unverified: it wants whatever is served) with every
POP × name and records each change of the served leaf (serial, notBefore, notAfter); an expired
leaf is a violation at once. It also reads each POP's `live/<lineage>` on disk: the link must
resolve, and the certificate and private key it leads to must be a pair. Only `ssl`, `socket`,
`os` and `cryptography` are used, never `certmgr` (a test asserts this).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class Endpoint:
    pop: str
    address: str
    port: int
    sni: str
    lineage: str


@dataclass(frozen=True)
class Change:
    """The served leaf of one endpoint changed (or was first seen) at `time` (epoch seconds)."""

    time: float
    pop: str
    sni: str
    lineage: str
    serial: str  # lower-case hex without padding; the end checks compare serials by value
    not_before: float
    not_after: float


@dataclass(frozen=True)
class Violation:
    time: float
    kind: str  # expired-served | key-mismatch | dangling-live | …
    where: str
    evidence: str

    def line(self) -> str:
        stamp = dt.datetime.fromtimestamp(self.time, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        return f"{stamp}Z {self.kind} {self.where}: {self.evidence}"


@dataclass
class EndpointStats:
    min_fraction: float = 1.0  # least remaining fraction of lifetime ever served (Pebble-issued leaves)
    min_fraction_at: float = 0.0
    failures: int = 0  # handshakes that did not complete
    samples: int = 0
    low: list[tuple[float, str, float]] = field(default_factory=list)  # (time, serial, fraction) under `critical`


def _key_pair_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def served_leaf(ep: Endpoint, timeout: float = 2.0) -> x509.Certificate:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((ep.address, ep.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=ep.sni) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise OSError("no certificate presented")
    return x509.load_der_x509_certificate(der)


class Observer(threading.Thread):
    """`Observer(endpoints, cert_roots, lineages).start()`; `stop()`; then read `changes`, `violations`, `stats`."""

    def __init__(self, endpoints: Sequence[Endpoint], cert_roots: dict[str, Path], lineages: Sequence[str], *,
                 interval: float = 1.0, critical: float = 0.1, ignore_serials: Sequence[str] = ()) -> None:
        super().__init__(name="soak-observer", daemon=True)
        self.endpoints = list(endpoints)
        self.cert_roots = dict(cert_roots)
        self.lineages = list(lineages)
        self.interval = interval
        self.critical = critical
        self.ignore = set(ignore_serials)  # the lab's seed certificates (a certbot-era 90-day leaf)
        self.changes: list[Change] = []
        self.violations: list[Violation] = []
        self.stats: dict[tuple[str, str], EndpointStats] = {(e.pop, e.sni): EndpointStats() for e in self.endpoints}
        self.rounds = 0
        self.disk_checks = 0
        self._current: dict[tuple[str, str], str] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def current(self) -> dict[tuple[str, str], str]:
        with self._lock:
            return dict(self._current)

    def run(self) -> None:
        while not self._halt.is_set():
            t0 = time.monotonic()
            self.round()
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def round(self) -> None:
        for ep in self.endpoints:
            self._handshake(ep)
        for pop, root in self.cert_roots.items():
            for lineage in self.lineages:
                self._check_disk(pop, root, lineage)
        self.rounds += 1

    def _violate(self, kind: str, where: str, evidence: str) -> None:
        with self._lock:
            self.violations.append(Violation(time.time(), kind, where, evidence))

    def _handshake(self, ep: Endpoint) -> None:
        st = self.stats[(ep.pop, ep.sni)]
        try:
            leaf = served_leaf(ep)
        except (OSError, ValueError):
            st.failures += 1
            return
        now = time.time()
        st.samples += 1
        serial = f"{leaf.serial_number:x}"
        nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        key = (ep.pop, ep.sni)
        with self._lock:
            if self._current.get(key) != serial:
                self._current[key] = serial
                self.changes.append(Change(now, ep.pop, ep.sni, ep.lineage, serial, nb, na))
        if now >= na:
            self._violate("expired-served", f"{ep.pop}/{ep.sni}",
                          f"serial {serial} expired {now - na:.1f}s ago (notAfter "
                          f"{leaf.not_valid_after_utc:%H:%M:%S}Z)")
        if serial in self.ignore:
            return
        frac = (na - now) / max(na - nb, 1.0)
        if frac < st.min_fraction:
            st.min_fraction, st.min_fraction_at = frac, now
        if frac < self.critical:
            st.low.append((now, serial, frac))

    def _check_disk(self, pop: str, root: Path, lineage: str) -> None:
        live = root / "live" / lineage
        where = f"{pop}:{live}"
        for attempt in range(3):  # a swap or prune between two reads is retried, never reported
            try:
                if live.is_symlink():
                    target = live.parent / os.readlink(live)
                    if not target.is_dir():
                        raise FileNotFoundError(f"live/{lineage} → {os.readlink(live)} does not exist")
                    d = target.resolve()
                    fullchain, key = (d / "fullchain.pem").read_bytes(), (d / "privkey.pem").read_bytes()
                else:  # certbot's layout (the seed): a directory of links to archive/ files
                    for f in ("cert", "chain", "fullchain", "privkey"):
                        if not (live / f"{f}.pem").exists():
                            raise FileNotFoundError(f"live/{lineage}/{f}.pem dangles")
                    fullchain, key = (live / "fullchain.pem").read_bytes(), (live / "privkey.pem").read_bytes()
                ok = _key_pair_matches(fullchain, key)
            except (OSError, ValueError) as exc:
                if attempt < 2:
                    time.sleep(0.05)
                    continue
                kind = "dangling-live" if isinstance(exc, FileNotFoundError) else "unreadable-live"
                self._violate(kind, where, str(exc))
                return
            if ok:
                self.disk_checks += 1
                return
            if attempt == 2:
                self._violate("key-mismatch", where, "fullchain.pem's leaf and privkey.pem are not a pair")
            else:
                time.sleep(0.05)
