"""The write fence against this controller's own lock releases: a lock released by a sibling task is not a lost lock.

Found by the two-controller soak (`unaudited-change`): a run's `deployed` audit row for one POP was
refused with "this controller no longer holds pop:OTHER" because another task of the same run
released its POP lock between the fence's snapshot of the held locks and its read of pg_locks; the
POP had switched, its audit row was gone, and the run exited 0.
"""

from __future__ import annotations

from typing import Any

import pytest

from certmgr.errors import LockLost
from certmgr.pglocks import LockSession
from lab.pg import PgServer
from tests.contract.conftest import open_pg, owner_conn

pytestmark = pytest.mark.integration


def test_an_audit_row_is_written_while_a_sibling_task_releases_its_pop_lock(
        fresh_schema: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fenced write (an audit row) made while another task of the same controller releases its POP lock
    between the fence's snapshot of the held locks and its pg_locks read is written, not refused as lost."""
    pgs = open_pg(fresh_schema)
    original = LockSession._check
    released: list[str] = []
    try:
        with pgs.lock("run"):
            other = pgs.lock_pop("pop-b", "run")
            other.__enter__()

            def check(self: LockSession, cur: Any, keys: list[str], what: str, held: dict[str, int],
                      **kw: Any) -> None:
                if "pop:pop-b" in keys and not released:  # the sibling task ends its POP transaction just now
                    other.__exit__(None, None, None)
                    released.append("pop:pop-b")
                original(self, cur, keys, what, held, **kw)

            monkeypatch.setattr(LockSession, "_check", check)
            with pgs.lock_pop("pop-a", "run"):
                pgs.audit("deployed", "example.com", host="pop-a", to="0A")
        assert released == ["pop:pop-b"]
        with owner_conn(fresh_schema) as conn:
            rows = [r[0] for r in conn.execute("SELECT entry FROM certmgr_audit ORDER BY id")]
        assert [(r["action"], r["host"]) for r in rows] == [("deployed", "pop-a")]
    finally:
        pgs.close()


def test_a_lock_truly_lost_still_fences_the_audit_row(fresh_schema: PgServer) -> None:
    """A POP lock this controller still believes it holds, but whose session the server ended, still refuses
    the audit row (the fix spares only locks this controller released itself)."""
    pgs = open_pg(fresh_schema)
    try:
        with pgs.lock("run"), pgs.lock_pop("pop-a", "run"):
            fresh_schema.psql(f"SELECT pg_terminate_backend({pgs._locks.backend_pid})")
            with pytest.raises(LockLost):
                pgs.audit("deployed", "example.com", host="pop-a", to="0A")
    finally:
        pgs.close()
