"""Serial numbers are printed as `openssl x509 -serial` prints them, so the two can be grepped against each other."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmgr.material import CertInfo, serial_text

KEY = ec.generate_private_key(ec.SECP256R1())


def cert_with_serial(serial: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serial.test")])
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(KEY.public_key())
            .serial_number(serial).not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .sign(KEY, hashes.SHA256()))


@pytest.mark.parametrize("serial,text", [
    (0x0A, "0A"),
    (0x80, "80"),
    (0x123, "0123"),
    (0xABCDEF, "ABCDEF"),
    (0x3ADF5C0B7D1B3A0F05E2A1D9C4F1E2B3C4D5, "3ADF5C0B7D1B3A0F05E2A1D9C4F1E2B3C4D5"),
    (1, "01"),
])
def test_serial_text_table(serial: int, text: str) -> None:
    """Upper-case hex, two digits per byte, no colons: what openssl prints after `serial=`."""
    assert serial_text(serial) == text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
@pytest.mark.parametrize("serial", [0x0A, 0x80, 0x123, 0x7F00FF, 0x3ADF5C0B7D1B3A0F05E2A1D9C4F1E2B3C4D5,
                                    0x0B7D1B3A0F05E2A1D9C4F1E2B3C4D5])
def test_certinfo_serial_equals_openssl_output(serial: int) -> None:
    """CertInfo.serial (used in every output, audit line, JSON and chat message) equals `openssl x509 -serial`."""
    cert = cert_with_serial(serial)
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=cert.public_bytes(serialization.Encoding.PEM),
                         capture_output=True, check=True).stdout.decode().strip()
    assert out == f"serial={CertInfo.from_cert(cert).serial}"


@pytest.mark.parametrize("text", ["0A3F", "0a3f", "a3f", "0x0A3F", "0A:3F", " 0A3F "])
def test_revoke_serial_argument_matches_by_value(text: str) -> None:
    """`revoke --serial` accepts what openssl, certmgr or a CA page show: compared by value, not by spelling."""
    from certmgr.revoke import _serial_value

    assert _serial_value(text) == 0x0A3F
    assert _serial_value("not-hex") is None
