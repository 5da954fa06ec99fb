"""Verify a served chain with `cryptography`: hostname coverage, chain to trusted roots, validity window.

Each check is reported separately so an expired but otherwise sound chain reads "expired", not "untrusted".
Parsed certificates and verdicts are cached by DER hash: a scan sees the same few chains thousands of times.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import ssl
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certmgr import sanitize
from certmgr.errors import CertmgrError
from certmgr.material import CertInfo

DEBIAN_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# Chain statuses, from best to worst; "none" when nothing was served.
CHAIN_OK = "ok"
CHAIN_INCOMPLETE = "incomplete"  # the leaf's issuer is neither served nor a trusted root
CHAIN_SELF_SIGNED = "self-signed"
CHAIN_UNTRUSTED = "untrusted"  # a full chain that ends at a root nobody trusts, or fails policy
CHAIN_STATUSES = (CHAIN_OK, CHAIN_INCOMPLETE, CHAIN_SELF_SIGNED, CHAIN_UNTRUSTED)


class TrustError(CertmgrError):
    """A trust anchor file from the inventory cannot be read or parsed."""

    exit_code = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What verification found for one chain served for one name at one instant."""

    info: CertInfo  # the leaf
    chain: str  # one of CHAIN_STATUSES
    chain_detail: str | None  # why the chain is not "ok"
    name_ok: bool
    problems: tuple[str, ...]  # human-readable, e.g. "expired 3d ago", "name mismatch: …"
    expired: bool
    not_yet_valid: bool


def system_roots() -> list[x509.Certificate]:
    """The system trust store: OpenSSL's default cafile (Debian's bundle), no certifi. A root that does not
    parse is left out, not the bundle: a few historical roots have non-positive serials, which cryptography
    only warns about today and says a later release will refuse."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, str(DEBIAN_BUNDLE)):
        if candidate and Path(candidate).is_file():
            return load_pem_anchors(Path(candidate), skip_bad=True)
    return []


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_pem_anchors(path: Path, *, skip_bad: bool = False) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, each parsed on its own (OSError: unreadable). One that does not parse
    raises ValueError naming its place in the file — or, with `skip_bad` (the system bundle), is left out."""
    certs = []
    for i, block in enumerate(_PEM_CERT.findall(path.read_bytes()), 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an odd serial is warned about, and still an anchor
                certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            if not skip_bad:
                raise ValueError(f"certificate {i} does not parse: {sanitize.line(str(exc))}") from exc
    return certs


def matches_name(patterns: Iterable[str], name: str) -> bool:
    """RFC 6125 §6.4: exact match, or a `*` as the whole leftmost label matching exactly one label."""
    name = name.lower().rstrip(".")
    for pat in patterns:
        pat = pat.lower().rstrip(".")
        if pat == name:
            return True
        if pat.startswith("*.") and "." in name:
            head, _, rest = name.partition(".")
            if head and rest == pat[2:]:
                return True
    return False


def _human_delta(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.0f}m"


class Verifier:
    """Verifies served chains against the system roots plus extra trust anchors; caches by DER hash.

    Not thread-safe; one per scan (or per worker process). `now` is fixed per verifier so
    cached verdicts stay correct.
    """

    def __init__(self, *, now: dt.datetime, trust: Sequence[Path] = (), system: bool = True,
                 extra_roots: Sequence[x509.Certificate] = ()) -> None:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        self.now = now
        roots = system_roots() if system else []
        for path in trust:
            try:
                anchors = load_pem_anchors(path)
            except (OSError, ValueError) as exc:
                cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise TrustError(f"load trust {path}: {cause} (scan not started)",
                                 hint="fix or remove the path in [defaults] trust") from exc
            if not anchors:
                raise TrustError(f"load trust {path}: no PEM certificate in file (scan not started)",
                                 hint="trust files are PEM bundles of CA certificates")
            roots.extend(anchors)
        roots.extend(extra_roots)
        self._roots = roots
        self._store = Store(roots) if roots else None
        self._root_subjects = {r.subject for r in roots}
        self._certs: dict[bytes, x509.Certificate] = {}
        self._infos: dict[bytes, CertInfo] = {}
        self._verdicts: dict[tuple[bytes, str], Verdict] = {}
        self._chains: dict[bytes, tuple[str, str | None]] = {}  # chain status does not depend on the name

    # ------------------------------------------------------------ caches

    def cert(self, der: bytes) -> x509.Certificate:
        key = hashlib.sha256(der).digest()
        c = self._certs.get(key)
        if c is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = x509.load_der_x509_certificate(der)
            self._certs[key] = c
        return c

    def info(self, der: bytes) -> CertInfo:
        key = hashlib.sha256(der).digest()
        i = self._infos.get(key)
        if i is None:
            i = CertInfo.from_cert(self.cert(der))
            self._infos[key] = i
        return i

    # ------------------------------------------------------------ checks

    def verify(self, chain: Sequence[bytes], name: str) -> Verdict:
        """Verify `chain` (leaf first, DER, as served) for `name` at `self.now`; never raises on bad certs."""
        if not chain:
            raise ValueError("verify needs at least the leaf")
        h = hashlib.sha256()
        for der in chain:
            h.update(hashlib.sha256(der).digest())
        key = (h.digest(), name.lower())
        v = self._verdicts.get(key)
        if v is None:
            v = self._verify(chain, name, key[0])
            self._verdicts[key] = v
        return v

    def _verify(self, chain: Sequence[bytes], name: str, chain_key: bytes) -> Verdict:
        problems: list[str] = []
        try:
            leaf = self.cert(chain[0])
            info = self.info(chain[0])
        except ValueError as exc:
            raise ValueError(f"unparseable leaf: {sanitize.line(str(exc))}") from exc
        now = self.now
        expired = now >= info.not_after
        not_yet = now < info.not_before
        if expired:
            problems.append(f"expired {_human_delta((now - info.not_after).total_seconds())} ago "
                            f"({info.not_after:%Y-%m-%d %H:%M}Z)")
        if not_yet:
            problems.append(f"not yet valid: starts in {_human_delta((info.not_before - now).total_seconds())} "
                            f"({info.not_before:%Y-%m-%d %H:%M}Z)")
        name_ok = matches_name(info.names, name)
        if not name_ok:
            shown = ", ".join(info.names[:4]) + ("…" if len(info.names) > 4 else "") if info.names else "no DNS names"
            problems.append(f"name mismatch: {name} not in certificate ({shown})")
        cached = self._chains.get(chain_key)
        if cached is None:
            cached = self._chains[chain_key] = self._chain_status(leaf, info, chain)
        status, detail = cached
        if status != CHAIN_OK:
            problems.append(f"chain {status}: {detail}")
        return Verdict(info=info, chain=status, chain_detail=detail, name_ok=name_ok, problems=tuple(problems),
                       expired=expired, not_yet_valid=not_yet)

    def _chain_status(self, leaf: x509.Certificate, info: CertInfo,
                      chain: Sequence[bytes]) -> tuple[str, str | None]:
        """Chain trust alone: verified at an instant inside the leaf's window, for a name it covers."""
        intermediates: list[x509.Certificate] = []
        for der in chain[1:]:
            try:
                intermediates.append(self.cert(der))
            except ValueError:
                return CHAIN_UNTRUSTED, "an intermediate does not parse"
        self_issued = leaf.issuer == leaf.subject
        if self._store is None:
            return CHAIN_UNTRUSTED, "no trust anchors configured"
        # Clamp the verification time into the leaf's window so that expiry is reported as
        # expiry, not as a chain failure (intermediates outside that window still fail).
        at = min(max(self.now, info.not_before), info.not_after)
        probe_name = next((n for n in info.names if not n.startswith("*.")), None)
        if probe_name is None and info.names:
            probe_name = "certmgr-probe." + info.names[0][2:]
        if probe_name is None:
            return CHAIN_UNTRUSTED, "leaf has no subjectAltName DNS names"
        try:
            verifier = PolicyBuilder().store(self._store).time(at).build_server_verifier(DNSName(probe_name))
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            detail = sanitize.line(str(exc))  # cryptography's words may quote the certificate's
            if self_issued and leaf.subject not in self._root_subjects:
                return CHAIN_SELF_SIGNED, f"self-signed by {info.issuer} and not trusted"
            served_subjects = {c.subject for c in intermediates}
            if leaf.issuer not in served_subjects and leaf.issuer not in self._root_subjects:
                return CHAIN_INCOMPLETE, f"issuer {info.issuer} neither served nor trusted (missing intermediate?)"
            return CHAIN_UNTRUSTED, detail
        except ValueError as exc:  # e.g. a name the policy cannot parse
            return CHAIN_UNTRUSTED, sanitize.line(str(exc))
        return CHAIN_OK, None
