"""doctor's PostgreSQL checks: version ≥ 14, a real session, a clear failure when the server is not there."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from certmgr.model import SecretRef, StoreConfig
from certmgr.pgdoctor import check, session_findings, version_finding
from lab.pg import RUNTIME, PgServer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("num", "ok", "message"), [
    (150004, True, "PostgreSQL 15.4"),
    (140000, True, "PostgreSQL 14.0"),
    (130011, False, "PostgreSQL 13.11 is older than 14: no idle_session_timeout, so a paused controller would keep "
                    "its locks (HA refused)"),
])
def test_version_findings(num: int, ok: bool, message: str) -> None:
    """Servers older than 14 fail with the reason; 14 and later pass."""
    f = version_finding(num)
    assert (f.ok, f.message) == (ok, message)


def _cfg(pg: PgServer, tmp_path: Path, port: int | None = None) -> StoreConfig:
    pw = tmp_path / "pw"
    pw.write_text(pg.passwords[RUNTIME])
    url = pg.url() if port is None else pg.url().replace(f":{pg.port}/", f":{port}/")
    return StoreConfig(url=url, password=SecretRef("file", str(pw), "store.password_file"),
                       key=SecretRef("file", "/nonexistent", "store.key_file"), connect_timeout=2)


def test_a_direct_connection_passes_every_check(pg: PgServer, tmp_path: Path) -> None:
    """Against the lab's PostgreSQL 15 directly: connect, version and session all ok, no warning."""
    findings = check(_cfg(pg, tmp_path))
    assert [(f.name, f.ok, f.warning) for f in findings] == [
        ("connect", True, False), ("version", True, False), ("session", True, False)]


def test_an_unreachable_server_is_one_failed_finding(pg: PgServer, tmp_path: Path) -> None:
    """No server on the port: one failed `connect` finding saying certmgr never falls back to local state."""
    findings = check(_cfg(pg, tmp_path, port=pg.port + 1))
    assert [(f.name, f.ok) for f in findings] == [("connect", False)]
    assert "never falls back to local state" in findings[0].message


class _PooledConn:
    """A stand-in for a transaction-pooled connection: each statement lands on another server session."""

    def __init__(self, pg: PgServer) -> None:
        self._pg = pg
        self._conns = [psycopg.connect(pg.url(), password=pg.passwords[RUNTIME], autocommit=True) for _ in range(2)]
        self._n = 0

    def execute(self, query: str) -> psycopg.Cursor[tuple[object, ...]]:
        self._n += 1
        return self._conns[self._n % 2].execute(query)

    def close(self) -> None:
        for c in self._conns:
            c.close()


def test_transaction_pooling_is_refused(pg: PgServer) -> None:
    """When statements land on different server sessions (transaction pooling), the session check fails."""
    conn = _PooledConn(pg)
    try:
        findings = session_findings(conn, pg.port)
    finally:
        conn.close()
    assert findings[0].ok is False
    assert findings[0].message.startswith("the connection does not keep one server session (transaction pooling")
