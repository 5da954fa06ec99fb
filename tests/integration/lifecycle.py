"""Helpers for the rollback and revoke lab tests: a store with issued versions, the CLI, handshakes, Pebble."""

from __future__ import annotations

import json
import shutil
import ssl
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmgr.cli import main
from certmgr.material import serial_text
from lab import Lab
from lab.pebble import https_get

MEDIA = "media.hachyderm.test"


def certmgr(lab: Lab, state: Path, *args: str, inventory: Path | None = None) -> Result:
    inv = inventory or lab.inventory_path
    return CliRunner().invoke(main, ["--inventory", str(inv), "--state-dir", str(state), *args])


def reusing_key(lab: Lab, dest: Path) -> Path:
    """The lab inventory with `reuse_key = true` for media.hachyderm.test."""
    text = lab.inventory_path.read_text()
    line = f'name = "{MEDIA}"\n'
    assert text.count(line) == 1
    dest.write_text(text.replace(line, line + "reuse_key = true\n"))
    return dest


def ok(result: Result, code: int = 0) -> str:
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def served(lab: Lab, sni: str = MEDIA) -> dict[str, str]:
    """{pop: serial} that each POP presents for `sni` right now, by handshake (as certmgr and openssl print it)."""
    return {pop: serial_text(lab.served_serial(pop, sni)) for pop in lab.pop_names}


def serial_of(state: Path, version: int, name: str = MEDIA) -> str:
    cert = x509.load_pem_x509_certificate((state / "archive" / name / str(version) / "cert.pem").read_bytes())
    return serial_text(cert.serial_number)


def spki_of(state: Path, version: int, name: str = MEDIA) -> bytes:
    cert = x509.load_pem_x509_certificate((state / "archive" / name / str(version) / "cert.pem").read_bytes())
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def live(state: Path, name: str = MEDIA) -> int:
    return int((state / "live" / name).readlink().name)


def audit(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "audit.log").read_text().splitlines() if line.strip()]


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a prepared store (links, modes and all)."""
    shutil.copytree(src, dst, symlinks=True)
    (dst / "lock").write_bytes(b"")
    return dst


def cert_status(lab: Lab, serial: str) -> dict[str, Any]:
    """Pebble's management view of `serial`: {"Status": "Valid"|"Revoked", "Reason": n, ...}."""
    ctx = ssl.create_default_context(cafile=str(lab.https_ca))
    pebble_form = format(int(serial, 16), "x")  # Pebble's management API: lower case, no leading zero
    body = https_get(lab.pebble._mgmt(f"/cert-status-by-serial/{pebble_form}"), ctx)
    assert body is not None, f"Pebble does not know serial {serial}"
    data: dict[str, Any] = json.loads(body)
    return data
