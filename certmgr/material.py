"""Certificate material: the four PEM files of one version, and what can be read from them.

Owned here so that store, issue, deploy and scan all speak the same type.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certmgr import sanitize
from certmgr.errors import CertmgrError

FILES = ("fullchain.pem", "privkey.pem", "cert.pem", "chain.pem")


class MaterialError(CertmgrError):
    """Certificate files that cannot be used (unparseable, mismatched key)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CertMaterial:
    """One version of a lineage: leaf, chain and private key as PEM bytes."""

    cert: bytes
    chain: bytes
    privkey: bytes = field(repr=False)

    @property
    def fullchain(self) -> bytes:
        return self.cert + self.chain

    def files(self) -> dict[str, bytes]:
        """The four files certbot (and nginx configs) expect, by name."""
        return {
            "fullchain.pem": self.fullchain,
            "privkey.pem": self.privkey,
            "cert.pem": self.cert,
            "chain.pem": self.chain,
        }

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)

    def info(self) -> CertInfo:
        return CertInfo.from_cert(self.leaf)

    def check(self) -> None:
        """Refuse material whose key does not match its leaf or whose PEM does not parse."""
        try:
            leaf = self.leaf
            x509.load_pem_x509_certificates(self.fullchain)
            key = serialization.load_pem_private_key(self.privkey, password=None)
        except ValueError as exc:
            raise MaterialError(f"certificate material does not parse: {sanitize.line(str(exc))}") from exc
        if public_key_der(key.public_key()) != public_key_der(leaf.public_key()):
            raise MaterialError(
                "certificate and private key do not match",
                hint="the privkey.pem does not belong to cert.pem; re-issue or restore a whole version",
            )

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> CertMaterial:
        """Build from `fullchain.pem` + `privkey.pem` (and `cert.pem`/`chain.pem` when present)."""
        if "cert.pem" in files and "chain.pem" in files:
            return cls(cert=files["cert.pem"], chain=files["chain.pem"], privkey=files["privkey.pem"])
        return cls.from_fullchain(files["fullchain.pem"], files["privkey.pem"])

    @classmethod
    def from_fullchain(cls, fullchain: bytes, privkey: bytes) -> CertMaterial:
        certs = split_pem(fullchain)
        if not certs:
            raise MaterialError("fullchain contains no certificate")
        return cls(cert=certs[0], chain=b"".join(certs[1:]), privkey=privkey)


def split_pem(data: bytes) -> list[bytes]:
    """Split a PEM bundle into its certificates, each normalised to end with a newline."""
    out: list[bytes] = []
    end = b"-----END CERTIFICATE-----"
    for part in data.split(end)[:-1]:
        begin = part.find(b"-----BEGIN CERTIFICATE-----")
        if begin >= 0:
            out.append(part[begin:] + end + b"\n")
    return out


def public_key_der(key: object) -> bytes:
    assert isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) or hasattr(key, "public_bytes")
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_type_of(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name, f"ecdsa-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The SAN dNSNames, each as an inert line (a served certificate's names are foreign text)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(sanitize.line(n) for n in san.get_values_for_type(x509.DNSName))


def serial_text(serial: int) -> str:
    """A serial number as `openssl x509 -noout -serial` prints it (after `serial=`), so one can be grepped
    against the other: upper-case hex, two digits per byte (`0A`, `0123`), no colons, `-` when negative."""
    digits = format(abs(serial), "X")
    return ("-" if serial < 0 else "") + ("0" * (len(digits) % 2)) + digits


@dataclass(frozen=True, slots=True, kw_only=True)
class CertInfo:
    """What an operator wants to know about a leaf certificate.

    `subject`, `issuer` and `names` are whoever made the certificate's words (a POP can serve
    anything): they are made inert here, where they enter (`sanitize.line`), so no later use can
    print an ESC or a newline from them.
    """

    serial: str  # as `openssl x509 -serial` prints it (serial_text): upper-case hex, whole bytes, no colons
    sha256: str  # fingerprint of the DER, hex
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    names: tuple[str, ...]
    key_type: str

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def remaining(self, now: dt.datetime) -> dt.timedelta:
        return self.not_after - now

    @classmethod
    def from_cert(cls, cert: x509.Certificate) -> CertInfo:
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(
            serial=serial_text(cert.serial_number),
            sha256=hashlib.sha256(der).hexdigest(),
            subject=sanitize.line(cert.subject.rfc4514_string()),
            issuer=sanitize.line(cert.issuer.rfc4514_string()),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            names=dns_names(cert),
            key_type=key_type_of(cert.public_key()),
        )

    @classmethod
    def from_der(cls, der: bytes) -> CertInfo:
        return cls.from_cert(x509.load_der_x509_certificate(der))


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()
