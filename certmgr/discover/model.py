"""What discover saw on each host, and the fleet report drawn from it (pure: no I/O, `now` passed in).

A `HostScan` is one host's raw findings (its parsed nginx configuration, the certificate files
read there, key checks, handshakes); `analyze` turns the fleet's scans into a `Report`: per name
who serves it from which file, unmanaged certificates soonest-expiring first, drift between hosts,
orphaned files, key mismatches and names configured but not served.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmgr.discover.nginxconf import CertRef, Config, ServerBlock
from certmgr.material import CertInfo, split_pem

_DNS_LIKE = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)+\.?")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRead:
    """One certificate file as read on a host: its leaf, or why not."""

    path: str  # as configured (absolute)
    real_path: str  # symlinks resolved on the host
    status: str  # ok | missing | unreadable | toolarge | notfile | not-a-certificate
    info: CertInfo | None = None
    leaf_pem: str = field(default="", repr=False)
    public_key_pem: str = field(default="", repr=False)  # what `openssl pkey -pubout` prints for its key
    is_ca: bool = False


def read_pem(path: str, real_path: str, status: str, pem: bytes | None) -> FileRead:
    """A FileRead from the bytes a host sent (the first certificate in the file is the leaf)."""
    if status != "ok" or pem is None:
        return FileRead(path=path, real_path=real_path, status=status)
    blocks = split_pem(pem)
    if not blocks:
        return FileRead(path=path, real_path=real_path, status="not-a-certificate")
    try:
        cert = x509.load_pem_x509_certificate(blocks[0])
        info = CertInfo.from_cert(cert)
    except ValueError:
        return FileRead(path=path, real_path=real_path, status="not-a-certificate")
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    spki = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return FileRead(path=path, real_path=real_path, status="ok", info=info, leaf_pem=blocks[0].decode(),
                    public_key_pem=spki.decode().strip(), is_ca=is_ca)


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """What one handshake (host address, port, SNI) returned."""

    sha256: str | None = None
    serial: str | None = None
    error: str | None = None
    info: CertInfo | None = None
    leaf_pem: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostScan:
    """Everything discover gathered on one host; `error` set means nothing else is trustworthy."""

    host: str
    address: str
    cert_root: str
    error: str | None = None
    config: Config | None = None
    files: Mapping[str, FileRead] = field(default_factory=dict)  # configured path → read
    keys: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (cert path, key path) → status
    found: tuple[FileRead, ...] = ()  # certificate files in the directories looked at
    served: Mapping[tuple[int, str], Served] = field(default_factory=dict)  # (port, sni) → handshake
    notes: tuple[str, ...] = ()  # problems that did not stop the host


# ---------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """One name served by one host on one port: the server block's certificate and what was served."""

    name: str
    host: str
    port: int
    config: str  # file:line of the ssl_certificate directive (or of the server block)
    certificate: str | None  # path as configured, None when the block has none
    real_path: str | None
    status: str  # the file's read status, or "dynamic"
    info: CertInfo | None
    managed: bool
    lineage: str | None  # inventory certificate name when managed
    served: str  # same | different | error | unchecked
    served_serial: str | None = None
    served_error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unmanaged:
    """One certificate (by leaf) that certmgr does not manage, wherever it is served."""

    info: CertInfo
    names: tuple[str, ...]
    hosts: tuple[str, ...]
    paths: tuple[str, ...]
    where: tuple[tuple[str, str], ...] = ()  # (host, file) pairs, in binding order
    leaf_pem: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialName:
    name: str
    served_on: tuple[str, ...]
    missing_on: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Drift:
    """A (name, port) whose server block differs between hosts: each variant's differing lines and hosts."""

    name: str
    port: int
    variants: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  # (lines only in this variant, hosts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Orphan:
    host: str
    path: str
    info: CertInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyProblem:
    host: str
    certificate: str
    key: str
    status: str  # mismatch | missing
    config: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NotServed:
    host: str
    name: str
    port: int
    certificate: str
    configured_serial: str | None
    served_serial: str | None
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Dynamic:
    host: str
    names: tuple[str, ...]
    certificate: str
    config: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """The fleet as it is served today."""

    started: dt.datetime
    elapsed: float
    hosts: tuple[str, ...]  # in inventory order
    errors: Mapping[str, str]  # host → why it could not be discovered
    problems: tuple[tuple[str, str], ...]  # (host, problem) that did not stop the host
    bindings: tuple[Binding, ...]  # sorted by name, port, host
    unmanaged: tuple[Unmanaged, ...]  # soonest expiry first
    partial: tuple[PartialName, ...]
    drift: tuple[Drift, ...]
    orphans: tuple[Orphan, ...]
    key_problems: tuple[KeyProblem, ...]
    not_served: tuple[NotServed, ...]
    dynamic: tuple[Dynamic, ...]
    pids: Mapping[str, str] = field(default_factory=dict)  # host → its nginx's `pid` directive, where it has one

    @property
    def exit_code(self) -> int:
        """0 every host discovered, 1 some hosts could not be (their errors are in the report)."""
        return 1 if self.errors else 0


def is_dns_name(name: str) -> bool:
    """Names a handshake can be made for (not `_`, not a regex, not empty)."""
    return bool(_DNS_LIKE.fullmatch(name)) and len(name) <= 253


def sni_for(name: str) -> str:
    n = name.rstrip(".")
    return "certmgr-scan" + n[1:] if n.startswith("*.") else n


def handshake_targets(cfg: Config) -> list[tuple[int, str]]:
    """Every (port, SNI) worth a handshake: each TLS port of each server block × each DNS name."""
    out: dict[tuple[int, str], None] = {}
    for sb in cfg.servers:
        if not sb.certs:
            continue
        for port in sb.ssl_ports:
            for name in sb.names:
                if is_dns_name(name):
                    out[(port, sni_for(name))] = None
    return list(out)


def lineage_of(path: str | None, cert_root: str, lineages: Iterable[str]) -> str | None:
    """The inventory certificate whose `cert_root/live/<name>/` (or archive/) holds `path`, if any."""
    if not path:
        return None
    root = cert_root.rstrip("/")
    for name in lineages:
        for sub in ("live", "archive"):
            if path.startswith(f"{root}/{sub}/{name}/"):
                return name
    return None


def _where(ref: CertRef | ServerBlock) -> str:
    return f"{ref.file}:{ref.line}"


def _signature(sb: ServerBlock, prefix: str) -> tuple[str, ...]:
    """The TLS-relevant lines of a server block, paths under nginx's prefix written relative to it."""
    def norm(a: str) -> str:
        return "<prefix>/" + a[len(prefix) + 1:] if prefix != "/" and a.startswith(prefix + "/") else a

    lines = [f"listen {s}" for s in sorted({lst.shape() for lst in sb.listens})]
    lines.append("server_name " + " ".join(sorted(sb.names)))
    lines += [" ".join([d, *(norm(a) for a in args)]) for d, args in sb.tls]
    return tuple(lines)


def analyze(scans: Sequence[HostScan], *, lineages: Iterable[str], now: dt.datetime, elapsed: float = 0.0) -> Report:
    """The fleet report from every host's scan (hosts in inventory order)."""
    lineages = tuple(lineages)
    errors = {s.host: s.error for s in scans if s.error is not None}
    good = [s for s in scans if s.error is None and s.config is not None]
    problems: list[tuple[str, str]] = []
    bindings: list[Binding] = []
    dynamic: list[Dynamic] = []
    key_problems: list[KeyProblem] = []
    not_served: list[NotServed] = []
    orphans: list[Orphan] = []
    names_by_host: dict[str, set[str]] = {}
    sigs: dict[tuple[str, int], dict[tuple[str, ...], list[str]]] = {}
    for s in good:
        cfg = s.config
        assert cfg is not None
        problems += [(s.host, f"nginx configuration: {p}") for p in cfg.problems]
        problems += [(s.host, n) for n in s.notes]
        seen: set[tuple[str, int]] = set()
        referenced: set[str] = set()
        for sb in cfg.servers:
            ports = sb.ssl_ports
            if not ports:
                continue
            ref = sb.certs[0] if sb.certs else None
            for cref in sb.certs:
                if cref.dynamic:
                    dynamic.append(Dynamic(host=s.host, names=sb.names, certificate=cref.certificate,
                                           config=_where(cref)))
                    continue
                fr = s.files.get(cref.certificate)
                if fr is not None:
                    referenced.update((fr.path, fr.real_path))
                    if fr.status != "ok":
                        problems.append((s.host, f"{cref.certificate} ({_where(cref)}): {fr.status}"))
                if cref.key is not None:
                    ks = s.keys.get((cref.certificate, cref.key), "unchecked")
                    if ks in ("mismatch", "missing"):  # unreadable: normal for root-only keys, not checked
                        key_problems.append(KeyProblem(host=s.host, certificate=cref.certificate, key=cref.key,
                                                       status=ks, config=_where(cref)))
            for port in ports:
                for name in sb.names:
                    if (name, port) in seen:
                        continue  # nginx serves the first server block with this name on this port
                    seen.add((name, port))
                    names_by_host.setdefault(s.host, set()).add(name)
                    sigs.setdefault((name, port), {}).setdefault(_signature(sb, cfg.prefix), []).append(s.host)
                    bindings.append(_binding(s, sb, ref, name, port, lineages, not_served))
        # orphans: certificate files next to configured ones whose leaf no configuration references
        used = {fr.info.sha256 for fr in s.files.values() if fr.info is not None}
        for fr in s.found:
            if fr.info is None or fr.is_ca or fr.info.sha256 in used:
                continue
            if fr.path in referenced or fr.real_path in referenced:
                continue
            orphans.append(Orphan(host=s.host, path=fr.path, info=fr.info))
    bindings.sort(key=lambda b: (b.name, b.port, scans_index(scans, b.host)))
    host_order = [s.host for s in good]
    partial = []
    all_names = sorted({n for ns in names_by_host.values() for n in ns})
    for name in all_names:
        on = [h for h in host_order if name in names_by_host.get(h, set())]
        if len(on) != len(host_order):
            partial.append(PartialName(name=name, served_on=tuple(on),
                                       missing_on=tuple(h for h in host_order if h not in on)))
    drift = []
    for (name, port), variants in sorted(sigs.items()):
        if len(variants) < 2:
            continue
        common = set.intersection(*(set(v) for v in variants))
        drift.append(Drift(name=name, port=port, variants=tuple(
            (tuple(line for line in sig if line not in common), tuple(hosts))
            for sig, hosts in sorted(variants.items(), key=lambda kv: (-len(kv[1]), kv[1])))))
    return Report(
        started=now, elapsed=elapsed, hosts=tuple(s.host for s in scans), errors=errors, problems=tuple(problems),
        bindings=tuple(bindings), unmanaged=_unmanaged(good, bindings), partial=tuple(partial), drift=tuple(drift),
        orphans=tuple(sorted(orphans, key=lambda o: (o.info.not_after, o.host, o.path))),
        key_problems=tuple(key_problems), not_served=tuple(not_served), dynamic=tuple(dynamic),
        pids={s.host: s.config.pid for s in good if s.config is not None and s.config.pid})


def scans_index(scans: Sequence[HostScan], host: str) -> int:
    return next((i for i, s in enumerate(scans) if s.host == host), len(scans))


def _binding(s: HostScan, sb: ServerBlock, ref: CertRef | None, name: str, port: int, lineages: tuple[str, ...],
             not_served: list[NotServed]) -> Binding:
    seen = s.served.get((port, sni_for(name))) if is_dns_name(name) else None
    served_sha = seen.sha256 if seen else None
    if ref is None:
        return Binding(name=name, host=s.host, port=port, config=_where(sb), certificate=None, real_path=None,
                       status="none", info=None, managed=False, lineage=None, served="unchecked")
    if ref.dynamic:  # the file is chosen per handshake: what was served is all there is to know
        fr = None
        status = "dynamic"
        info = seen.info if seen else None
    else:
        fr = s.files.get(ref.certificate)
        status = fr.status if fr else "unchecked"
        info = fr.info if fr else None
    lineage = lineage_of(ref.certificate, s.cert_root, lineages) or lineage_of(fr.real_path if fr else None,
                                                                              s.cert_root, lineages)
    if ref.dynamic:
        served = "dynamic" if seen is not None and seen.error is None else ("error" if seen else "unchecked")
    elif seen is None:
        served = "unchecked"
    elif seen.error is not None:
        served = "error"
    elif info is None:
        served = "unchecked"
    else:
        served = "same" if served_sha == info.sha256 else "different"
    if served in ("error", "different"):
        not_served.append(NotServed(host=s.host, name=name, port=port, certificate=ref.certificate,
                                    configured_serial=info.serial if info else None,
                                    served_serial=seen.serial if seen else None, error=seen.error if seen else None))
    return Binding(name=name, host=s.host, port=port, config=_where(ref), certificate=ref.certificate,
                   real_path=fr.real_path if fr else None, status=status, info=info, managed=lineage is not None,
                   lineage=lineage, served=served, served_serial=seen.serial if seen else None,
                   served_error=seen.error if seen else None)


def _unmanaged(good: Sequence[HostScan], bindings: Sequence[Binding]) -> tuple[Unmanaged, ...]:
    by_leaf: dict[str, dict[str, list[Any]]] = {}
    infos: dict[str, CertInfo] = {}
    pems: dict[str, str] = {}
    for b in bindings:
        if b.managed or b.info is None:
            continue
        d = by_leaf.setdefault(b.info.sha256, {"names": [], "hosts": [], "paths": [], "where": []})
        infos[b.info.sha256] = b.info
        for key, value in (("names", b.name), ("hosts", b.host), ("paths", b.certificate or ""),
                           ("where", (b.host, b.certificate or ""))):
            if value not in d[key]:
                d[key].append(value)
    for s in good:
        for fr in s.files.values():
            if fr.info is not None and fr.info.sha256 in by_leaf:
                pems[fr.info.sha256] = fr.leaf_pem
        for seen in s.served.values():
            if seen.info is not None and seen.info.sha256 in by_leaf and seen.info.sha256 not in pems:
                pems[seen.info.sha256] = seen.leaf_pem
    out = [Unmanaged(info=infos[k], names=tuple(sorted(v["names"])), hosts=tuple(v["hosts"]),
                     paths=tuple(sorted(v["paths"])), where=tuple(v["where"]), leaf_pem=pems.get(k, ""))
           for k, v in by_leaf.items()]
    out.sort(key=lambda u: (u.info.not_after, u.names))
    return tuple(out)
