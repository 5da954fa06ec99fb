"""Private keys and CSRs for issuance: generation per `key_type`, PEM round-trips, CSRs built with `cryptography`.

RSA generation is CPU-bound (up to ~1 s for 4096 bits): callers run `generate` in a thread.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certmgr.errors import CertmgrError
from certmgr.material import key_type_of

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")


class KeyMaterialError(CertmgrError):
    """A private key that cannot be generated or used for a CSR."""


def generate(key_type: str) -> PrivateKey:
    """A fresh private key of `key_type` (one of KEY_TYPES)."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise KeyMaterialError(f"generate key: unknown key type {key_type!r} (expected one of {', '.join(KEY_TYPES)})")


def to_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the store keeps it 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def from_pem(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError("load key: the stored private key does not parse (re-issue without reuse_key)") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise KeyMaterialError(f"load key: unsupported key algorithm {type(key).__name__}")
    return key


def key_type(key: PrivateKey) -> str:
    return key_type_of(key.public_key())


def csr(key: PrivateKey, domains: tuple[str, ...]) -> bytes:
    """A PEM CSR for `domains` (all in the SAN; the first also as CN when it fits in 64 characters)."""
    if not domains:
        raise KeyMaterialError("build CSR: no DNS names")
    builder = x509.CertificateSigningRequestBuilder()
    if len(domains[0]) <= 64:
        builder = builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
    else:
        builder = builder.subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]),
                                    critical=False)
    req = builder.sign(key, hashes.SHA256())
    return req.public_bytes(serialization.Encoding.PEM)
