"""Fixtures for the store contract: a real PostgreSQL (lab/pg.py) and one fixture giving each store in turn."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmgr.material import CertMaterial
from certmgr.pgstore import PgStore, install_schema
from certmgr.sealing import Sealer
from certmgr.store import Store
from lab.pg import OWNER, RUNTIME, PgServer
from tests.conftest import _lab_port_base
from tests.faults.conftest import chat, flab, fresh, proxy  # noqa: F401  (the two-controller proofs' lab fixtures)

PG_PORT_OFFSET = 900  # inside this worker's port block, above the lab's base … base+11

TABLES = "certmgr_schema, certmgr_live, certmgr_versions, certmgr_json, certmgr_accounts, certmgr_audit, certmgr_epochs"


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """A PostgreSQL 15 on 127.0.0.1 in a temp dir, run as `postgres`, removed at the end of the session."""
    path = Path(tempfile.mkdtemp(prefix=f"certmgr-pg-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"))
    server = PgServer(path, _lab_port_base() + PG_PORT_OFFSET)
    try:
        server.up()
        yield server
    finally:
        server.down()
        shutil.rmtree(path, ignore_errors=True)


def owner_conn(pg: PgServer) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.url(OWNER), password=pg.passwords[OWNER], autocommit=True)


@pytest.fixture
def fresh_schema(pg: PgServer) -> PgServer:
    """The certmgr schema, empty: dropped and installed again by the owner role."""
    with owner_conn(pg) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLES} CASCADE")
        install_schema(conn, runtime_role=RUNTIME)
    return pg


SEALER = Sealer({"k1": bytes(range(32))}, "k1")


def open_pg(pg: PgServer, *, clock: Any = None, idle_timeout: float = 30.0) -> PgStore:
    kw: dict[str, Any] = {"clock": clock} if clock else {}
    return PgStore.open(pg.url(), password=pg.passwords[RUNTIME], sealer=SEALER, idle_timeout=idle_timeout, **kw)


FIXED = dt.datetime(2026, 11, 27, 2, 0, 3, tzinfo=dt.UTC)


@pytest.fixture(params=["dir", "pg"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each store in turn, empty, its clock fixed at FIXED."""
    if request.param == "dir":
        yield Store.open(tmp_path / "state", clock=lambda: FIXED)
        return
    pg = request.getfixturevalue("fresh_schema")
    s = open_pg(pg, clock=lambda: FIXED)
    try:
        yield s
    finally:
        s.close()


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
          serial: int) -> bytes:
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=6))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
            .sign(signer, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_material(serial: int = 2, ca_key: ec.EllipticCurvePrivateKey | None = None) -> CertMaterial:
    """One whole version (leaf + issuing CA + matching key) for example.com."""
    ca_key = ca_key or ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    return CertMaterial(cert=_cert("example.com", key, "Test CA", ca_key, serial),
                        chain=_cert("Test CA", ca_key, "Test CA", ca_key, 1), privkey=pem_key(key))


@pytest.fixture(scope="session")
def materials() -> list[CertMaterial]:
    """Three whole versions (leaf + issuing CA + matching key) for example.com."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    return [make_material(serial, ca_key) for serial in range(2, 5)]
