"""certcheck: what an issued or stored certificate must be before it goes live, with the exact words of each refusal."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certmgr import certcheck
from certmgr.certcheck import Expected, check, load_roots, problems
from certmgr.errors import CertificateRefused
from certmgr.material import CertMaterial
from certmgr.verify import TrustError

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
NAMES = ("a.example", "b.example")


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _cn(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, *, issuer: CA | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> CA:
    """A root (no issuer) or an intermediate, valid NOW − 30 d … NOW + 10 y."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    signer = issuer.key if issuer else key
    cert = (x509.CertificateBuilder().subject_name(_cn(cn))
            .issuer_name(issuer.cert.subject if issuer else _cn(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - 30 * DAY).not_valid_after(NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))
    return CA(cert=cert, key=key)


ROOT_A = make_ca("Root A")
INTER_A = make_ca("Inter", issuer=ROOT_A)
ROOT_B = make_ca("Root B")
# Pebble's alternate chains: one intermediate key and subject, cross-signed by each root
INTER_B = make_ca("Inter", issuer=ROOT_B, key=INTER_A.key)
ROGUE = make_ca("Rogue Root")
ROGUE_INTER = make_ca("Inter", issuer=ROGUE)  # same subject as the real intermediate, another key
FAKE_B = make_ca("Root B")  # a self-signed impostor named like the preferred root
FAKE_C = make_ca("Root C")
ROOTS = (ROOT_A.cert, ROOT_B.cert)
KEY = ec.generate_private_key(ec.SECP256R1())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def leaf(names: Sequence[str] = NAMES, *, issuer: CA = INTER_A, key: ec.EllipticCurvePrivateKey = KEY,
         not_before: dt.datetime = NOW - HOUR, not_after: dt.datetime = NOW + 90 * DAY,
         eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
         ca: bool = False, ips: Sequence[str] = (), san: bool = True) -> x509.Certificate:
    """A leaf like an ACME CA's, every property settable."""
    b = (x509.CertificateBuilder().subject_name(_cn(names[0] if names else "x")).issuer_name(issuer.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False))
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if san:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer.key, hashes.SHA256())


def material(cert: x509.Certificate, *chain: x509.Certificate, key: ec.EllipticCurvePrivateKey = KEY) -> CertMaterial:
    return CertMaterial(cert=pem(cert), chain=pem(*(chain or (INTER_A.cert,))), privkey=key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


OTHER_KEY = ec.generate_private_key(ec.SECP256R1())

CASES = [
    ("sound", material(leaf()), {}, ()),
    ("sound, SANs in another order and case", material(leaf(("B.example", "a.example"))), {}, ()),
    ("wrong names", material(leaf(("a.example", "c.example"))), {},
     ("SANs differ: missing b.example, extra c.example",)),
    ("a missing SAN", material(leaf(("a.example",))), {}, ("SANs differ: missing b.example",)),
    ("an extra IP SAN", material(leaf(NAMES, ips=["192.0.2.1"])), {}, ("SANs differ: extra IP 192.0.2.1",)),
    ("no SAN extension", material(leaf(san=False)), {},
     ("SANs differ: no subjectAltName extension (missing a.example, b.example)",)),
    ("a leaf for another key", material(leaf(key=OTHER_KEY)), {},
     ("key differs: the leaf certifies another key, not the one the CSR was made with",)),
    ("client-only EKU", material(leaf(eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))), {},
     ("not a server certificate: extendedKeyUsage has no serverAuth (clientAuth)",)),
    ("a CA certificate as the leaf", material(leaf(ca=True)), {}, ("not a leaf: basicConstraints says CA",)),
    ("no EKU at all", material(leaf(eku=None)), {}, ()),
    ("expired", material(leaf(not_before=NOW - 91 * DAY, not_after=NOW - 2 * DAY)), {},
     ("expired: notAfter 2026-11-25 12:00Z was 2d ago",)),
    ("not yet valid", material(leaf(not_before=NOW + 3 * HOUR, not_after=NOW + 93 * DAY)), {},
     ("not yet valid: notBefore 2026-11-27 15:00Z is 3h ahead (more than the 1h of clock skew tolerated)",)),
    ("notBefore within the skew", material(leaf(not_before=NOW + 50 * dt.timedelta(minutes=1))), {}, ()),
    ("valid far too long", material(leaf(not_after=NOW + 5 * 365 * DAY)), {},
     ("valid too long: notAfter 2031-11-26 12:00Z is 1825d ahead (more than 398d)",)),
    ("far too long, bound off (a version already stored)", material(leaf(not_after=NOW + 5 * 365 * DAY)),
     {"max_validity": None}, ()),
    ("a chain that does not sign the leaf", material(leaf(), ROGUE_INTER.cert), {},
     ("chain does not verify to a trusted root: the chain does not sign the leaf: CN=Inter in the chain has another "
      "key (candidates exhausted: signature does not match)",)),
    ("a leaf whose issuer is missing", material(leaf(), ROOT_B.cert), {},
     ("chain does not verify to a trusted root: the leaf's issuer CN=Inter is neither in the chain nor a trusted "
      "root (candidates exhausted: all candidates exhausted with no interior errors)",)),
    ("a chain to an untrusted root", material(leaf(issuer=ROGUE_INTER), ROGUE_INTER.cert), {},
     ("chain does not verify to a trusted root: the chain ends at CN=Rogue Root, which is not a trusted root "
      "(candidates exhausted: all candidates exhausted with no interior errors)",)),
    ("no anchors at all", material(leaf()), {"roots": ()},
     ("chain not verified: no trust anchors (neither [defaults] trust nor a system store)",)),
    ("the preferred chain, really ending there", material(leaf(), INTER_B.cert), {"preferred_issuer": "Root B"}, ()),
    ("preferred issuer not offered: the default is kept", material(leaf()), {"preferred_issuer": "Root B"}, ()),
    ("an alternate naming the preferred issuer but ending elsewhere", material(leaf(), INTER_A.cert, FAKE_B.cert),
     {"preferred_issuer": "Root B"},
     ("preferred chain 'Root B': the chain names it at its top but verifies only to Root A",)),
    ("an alternate naming a preferred issuer nobody trusts", material(leaf(), INTER_A.cert, FAKE_C.cert),
     {"preferred_issuer": "Root C"},
     ("preferred chain 'Root C': no trusted root of that name (the chain verifies to Root A)",)),
    ("several differences at once", material(leaf(("c.example",), key=OTHER_KEY, not_after=NOW - DAY,
                                                  not_before=NOW - 90 * DAY)), {},
     ("SANs differ: missing a.example, b.example, extra c.example",
      "key differs: the leaf certifies another key, not the one the CSR was made with",
      "expired: notAfter 2026-11-26 12:00Z was 1d ago")),
    ("unparseable", CertMaterial(cert=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                 chain=b"", privkey=b""), {},
     ("does not parse: error parsing asn1 value: ParseError { kind: UnexpectedTag { actual: Tag { value: 0, "
      "constructed: false, class: Universal } } }",)),
]


@pytest.mark.parametrize(("material_", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_problems_name_each_difference(material_: CertMaterial, overrides: dict[str, object],
                                       expected: tuple[str, ...]) -> None:
    """Each way a certificate can differ from its order is named in its own exact phrase; a sound one has none."""
    want = Expected(**{"names": NAMES, "roots": ROOTS, **overrides})  # type: ignore[arg-type]
    got = problems(material_, want, now=NOW)
    assert got == expected


def test_check_raises_with_step_outcome_and_every_problem() -> None:
    """check() raises CertificateRefused shaped "step: causes (outcome)", carrying each problem and a hint."""
    with pytest.raises(CertificateRefused) as err:
        check(material(leaf(("a.example", "c.example"), not_after=NOW - DAY, not_before=NOW - 90 * DAY)),
              Expected(names=NAMES, roots=ROOTS), now=NOW, step="renew a.example: issued certificate refused",
              outcome="nothing stored")
    assert str(err.value) == ("renew a.example: issued certificate refused: SANs differ: missing b.example, extra "
                              "c.example; expired: notAfter 2026-11-26 12:00Z was 1d ago (nothing stored)")
    assert err.value.problems == ("SANs differ: missing b.example, extra c.example",
                                  "expired: notAfter 2026-11-26 12:00Z was 1d ago")
    assert err.value.hint == certcheck.HINT and not err.value.retryable


def test_check_passes_a_sound_certificate() -> None:
    """A sound certificate passes check() silently."""
    check(material(leaf()), Expected(names=NAMES, roots=ROOTS), now=NOW, step="s", outcome="o")


def test_load_roots_reads_pem_bundles_and_names_a_bad_file(tmp_path: Path) -> None:
    """load_roots returns the bundle's roots (system store off) and names an unreadable trust file."""
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(pem(ROOT_A.cert, ROOT_B.cert))
    assert load_roots([bundle], system=False, outcome="x") == ROOTS
    with pytest.raises(TrustError) as err:
        load_roots([tmp_path / "missing.pem"], system=False, outcome="nothing stored")
    assert str(err.value) == f"load trust {tmp_path / 'missing.pem'}: No such file or directory (nothing stored)"
