"""`doctor` for the PostgreSQL store: reachable, new enough, and a real session (not transaction pooling).

Session advisory locks only work on a connection that keeps its server session: PgBouncer in
transaction pooling hands each transaction to whichever server connection is free, so a lock
taken in one transaction may be held by a session the next one is not on. Returns findings
typed here; doctor turns them into its checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from certmgr.errors import CertmgrError
from certmgr.model import StoreConfig

MIN_VERSION = 140000


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    name: str  # "connect", "version", "session"
    ok: bool
    warning: bool = False
    message: str
    hint: str | None = None


def version_finding(num: int) -> Finding:
    """PostgreSQL ≥ 14 (idle_session_timeout frees a paused controller's locks)."""
    shown = f"{num // 10000}.{num % 10000}"
    if num >= MIN_VERSION:
        return Finding(name="version", ok=True, message=f"PostgreSQL {shown}")
    return Finding(name="version", ok=False, message=f"PostgreSQL {shown} is older than 14: no idle_session_timeout, "
                   "so a paused controller would keep its locks (HA refused)",
                   hint="upgrade the server to 14 or later (Debian 12 ships 15)")


def session_findings(conn: Any, url_port: int | None) -> list[Finding]:
    """Same backend across two transactions, a session advisory lock still ours in the next, and no port remap."""
    out: list[Finding] = []
    pid1 = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.execute("SELECT pg_advisory_lock(74470001, 1)")
    try:
        pid2, held = conn.execute(
            "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND classid::bigint = 74470001 AND objid::bigint = 1)").fetchone()
    finally:
        conn.execute("SELECT pg_advisory_unlock(74470001, 1)")
    if pid1 != pid2 or not held:
        out.append(Finding(name="session", ok=False,
                           message="the connection does not keep one server session (transaction pooling, "
                                   "e.g. PgBouncer pool_mode=transaction): session locks would let two holders in",
                           hint="connect certmgr to PostgreSQL directly, or through a pooler in session mode"))
    else:
        out.append(Finding(name="session", ok=True, message=f"one server session (backend {pid1}) keeps its locks"))
    server_port = conn.execute("SELECT inet_server_port()").fetchone()[0]
    if url_port is not None and server_port is not None and server_port != url_port:
        out.append(Finding(name="session", ok=True, warning=True,
                           message=f"connected to port {url_port} but the server listens on {server_port}: "
                                   "a pooler or proxy is in between",
                           hint="PgBouncer in transaction mode breaks the locks; connect to PostgreSQL directly"))
    return out


def check(cfg: StoreConfig) -> list[Finding]:
    """Every HA store finding for `[store]`; a connection failure is one failed finding."""
    from certmgr.pgstore import connect

    try:
        conn = connect(cfg.url, password=cfg.password.read() if cfg.password else None,
                       timeout=cfg.connect_timeout, role="doctor")
    except CertmgrError as exc:
        return [Finding(name="connect", ok=False, message=exc.message, hint=exc.hint)]
    with conn:
        out = [Finding(name="connect", ok=True, message=f"connected to {cfg.url.split('@')[-1]}")]
        row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        version = version_finding(int(row[0]))
        out.append(version)
        if version.ok:
            out += session_findings(conn, urlsplit(cfg.url).port or 5432)
    return out
