"""Check a certificate before it goes live: the names ordered, the key it was ordered for, a server
certificate, a sane validity window, and a chain that verifies to a trusted root (`cryptography`'s
`x509.verification`, never hand-built paths). Renew runs it before storing a version; deploy before uploading.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certmgr.errors import CertificateRefused
from certmgr.material import CertMaterial, public_key_der, split_pem
from certmgr.verify import TrustError, load_pem_anchors, system_roots

# A CA's clock may run a little ahead of ours; Let's Encrypt backdates notBefore by an hour anyway.
SKEW = dt.timedelta(hours=1)
# CA/Browser Forum Baseline Requirements §6.3.2: no publicly trusted TLS certificate is valid for more
# than 398 days. Further out than that is a CA fault (or a forgery), not a policy choice.
MAX_VALIDITY = dt.timedelta(days=398)

HINT = ("nothing was stored and the live version is unchanged; the renewal is retried after backoff. If the CA "
        "moved to a new root, add it to [defaults] trust; otherwise report the certificate to the CA")

DEPLOY_HINT = ("the store's live version may not be served; renew it (`certmgr renew {name} --force`), then deploy; "
               "`certmgr status` shows the live version")


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    """What a certificate must be: for these names (A-labels), by a chain to one of these roots."""

    names: tuple[str, ...]
    roots: tuple[x509.Certificate, ...]
    preferred_issuer: str | None = None  # [[certificates]] preferred_chain: the top issuer's CN
    skew: dt.timedelta = SKEW
    max_validity: dt.timedelta | None = MAX_VALIDITY  # None: no upper bound (a version already stored)


def load_roots(trust: Sequence[Path], *, system: bool = True, outcome: str) -> tuple[x509.Certificate, ...]:
    """The trust anchors a certificate must chain to: the inventory's `[defaults] trust` plus the system store."""
    roots = list(system_roots()) if system else []
    for path in trust:
        try:
            anchors = load_pem_anchors(path)
        except (OSError, ValueError) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TrustError(f"load trust {path}: {cause} ({outcome})",
                             hint="fix or remove the path in [defaults] trust") from exc
        if not anchors:
            raise TrustError(f"load trust {path}: no PEM certificate in file ({outcome})",
                             hint="trust files are PEM bundles of CA certificates")
        roots.extend(anchors)
    return tuple(roots)


def problems(material: CertMaterial, expected: Expected, *, now: dt.datetime) -> tuple[str, ...]:
    """Every way `material` differs from `expected` at `now`, one phrase each; () when it may go live."""
    try:
        leaf = x509.load_pem_x509_certificate(material.cert)
        chain = [x509.load_pem_x509_certificate(p) for p in split_pem(material.chain)]
        key = serialization.load_pem_private_key(material.privkey, password=None)
    except ValueError as exc:
        return (f"does not parse: {exc}",)
    found: list[str] = []
    found += _names(leaf, expected.names)
    if public_key_der(leaf.public_key()) != public_key_der(key.public_key()):
        found.append("key differs: the leaf certifies another key, not the one the CSR was made with")
    server = _server(leaf)
    found += server
    found += _window(leaf, expected, now)
    if not server:  # the server-certificate policy would only repeat the EKU/CA problem as a chain failure
        found += _chain(leaf, chain, expected, now)
    return tuple(found)


def check(material: CertMaterial, expected: Expected, *, now: dt.datetime, step: str, outcome: str,
          hint: str = HINT) -> None:
    """Raise CertificateRefused ("STEP: cause; cause (OUTCOME)") unless `material` may go live."""
    found = problems(material, expected, now=now)
    if found:
        raise CertificateRefused(f"{step}: {'; '.join(found)} ({outcome})", problems=found, hint=hint)


def _names(leaf: x509.Certificate, names: Sequence[str]) -> list[str]:
    """The SANs must be exactly the names ordered (A-labels, any order): nothing missing, nothing extra."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [f"SANs differ: no subjectAltName extension (missing {', '.join(sorted(names))})"]
    have = {n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)}
    want = {n.lower() for n in names}
    other = [f"{type(g).__name__.removesuffix('Address').removesuffix('Name')} {g.value}" for g in san
             if not isinstance(g, x509.DNSName)]
    missing, extra = sorted(want - have), sorted(have - want) + sorted(other)
    if not missing and not extra:
        return []
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"] if extra else [])
    return [f"SANs differ: {', '.join(parts)}"]


def _server(leaf: x509.Certificate) -> list[str]:
    """A TLS server leaf: not a CA, and serverAuth among its extended key usages when it lists any."""
    out = []
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            out.append("not a leaf: basicConstraints says CA")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return out
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        usages = ", ".join(getattr(u, "_name", None) or u.dotted_string for u in eku) or "none"
        out.append(f"not a server certificate: extendedKeyUsage has no serverAuth ({usages})")
    return out


def _window(leaf: x509.Certificate, expected: Expected, now: dt.datetime) -> list[str]:
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    out = []
    if nb > now + expected.skew:
        out.append(f"not yet valid: notBefore {nb:%Y-%m-%d %H:%M}Z is {_human(nb - now)} ahead "
                   f"(more than the {_human(expected.skew)} of clock skew tolerated)")
    if na <= now:
        out.append(f"expired: notAfter {na:%Y-%m-%d %H:%M}Z was {_human(now - na)} ago")
    elif expected.max_validity is not None and na - now > expected.max_validity:
        out.append(f"valid too long: notAfter {na:%Y-%m-%d %H:%M}Z is {_human(na - now)} ahead "
                   f"(more than {_human(expected.max_validity)})")
    return out


def _chain(leaf: x509.Certificate, chain: Sequence[x509.Certificate], expected: Expected,
           now: dt.datetime) -> list[str]:
    """Leaf to a trusted root by `cryptography`'s verifier; with a preferred issuer claimed, to that root."""
    if not expected.roots:
        return ["chain not verified: no trust anchors (neither [defaults] trust nor a system store)"]
    probe = next((n for n in _dns_names(leaf) if not n.startswith("*.")), None)
    if probe is None:
        wild = next(iter(_dns_names(leaf)), None)
        if wild is None:
            return []  # no DNS name to verify for: the SAN check already refused it
        probe = "certmgr-probe." + wild[2:]
    # Verified at an instant inside the leaf's own window, so that an expired leaf reads "expired"
    # once, not also as a chain failure (intermediates outside that instant still fail).
    at = min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)

    def verify(roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        verifier = PolicyBuilder().store(Store(list(roots))).time(at).build_server_verifier(x509.DNSName(probe))
        return verifier.verify(leaf, list(chain))

    try:
        path = verify(expected.roots)
    except (VerificationError, ValueError) as exc:
        return [f"chain does not verify to a trusted root: {_why(leaf, chain, expected.roots, exc)}"]
    want = expected.preferred_issuer
    if not want or not chain or want not in _cns(chain[-1].issuer):
        return []  # no preference, or the CA offered no chain to it (issue noted it and kept the default)
    # The chain claims the preferred issuer at its top (that is why it was chosen): it must really end there.
    anchors = [r for r in expected.roots if want in _cns(r.subject)]
    got = ", ".join(_cns(path[-1].subject)) or path[-1].subject.rfc4514_string()
    if not anchors:
        return [f"preferred chain {want!r}: no trusted root of that name (the chain verifies to {got})"]
    try:
        verify(anchors)
    except (VerificationError, ValueError):
        return [f"preferred chain {want!r}: the chain names it at its top but verifies only to {got}"]
    return []


def _why(leaf: x509.Certificate, chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
         exc: Exception) -> str:
    """The verifier's words, led by the plain cause when it is the leaf's own issuer that is missing or wrong."""
    detail = str(exc).removeprefix("validation failed: ")
    issuer = leaf.issuer.rfc4514_string()
    named = [c for c in (*chain, *roots) if c.subject == leaf.issuer]
    if not named:
        return f"the leaf's issuer {issuer} is neither in the chain nor a trusted root ({detail})"
    if not any(_signed_by(leaf, c) for c in named):
        return f"the chain does not sign the leaf: {issuer} in the chain has another key ({detail})"
    top = chain[-1] if chain else leaf
    if top.issuer == top.subject and top not in roots:
        return f"the chain ends at {top.subject.rfc4514_string()}, a root that is not trusted ({detail})"
    if top.issuer != top.subject and not any(r.subject == top.issuer for r in roots):
        return f"the chain ends at {top.issuer.rfc4514_string()}, which is not a trusted root ({detail})"
    return detail


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return []


def _cns(name: x509.Name) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _human(delta: dt.timedelta) -> str:
    s = abs(delta.total_seconds())
    if s >= 86400:
        return f"{s / 86400:.1f}d".replace(".0d", "d")
    if s >= 3600:
        return f"{s / 3600:.1f}h".replace(".0h", "h")
    return f"{s / 60:.0f}m"
