"""What only the PostgreSQL store promises: sealed keys, an append-only audit, locks that fence, exit 69 when down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from certmgr.errors import LockHeld, LockLost, StoreError, StoreUnavailable
from certmgr.material import CertMaterial
from certmgr.pglocks import LockSession
from certmgr.pgstore import PgStore, check_url
from lab.pg import RUNTIME, PgServer
from tests.contract.conftest import SEALER, open_pg, owner_conn

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pgs(fresh_schema: PgServer) -> Any:
    s = open_pg(fresh_schema)
    yield s
    s.close()


def test_a_database_dump_holds_no_private_key(fresh_schema: PgServer, pgs: PgStore,
                                              materials: list[CertMaterial]) -> None:
    """After storing a certificate and an account key, pg_dump of the database contains no private key."""
    with pgs.lock("test"):
        pgs.add_version("example.com", materials[0])
    pgs.save_account_key("pebble", materials[1].privkey)
    dump = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_dump", "-h",
                           str(fresh_schema.sock), "-p", str(fresh_schema.port), "-d", "certmgr"],
                          capture_output=True, text=True, check=True).stdout
    assert "certmgr_versions" in dump
    assert "PRIVATE KEY" not in dump
    for m in materials[:2]:
        body = b"".join(m.privkey.splitlines()[1:-1])[:40].decode()
        assert body not in dump


def test_a_key_row_copied_to_another_name_does_not_open(fresh_schema: PgServer, pgs: PgStore,
                                                        materials: list[CertMaterial]) -> None:
    """An account key row copied over another CA's row fails to open (its sealing names the CA)."""
    pgs.save_account_key("ca-a", materials[0].privkey)
    pgs.save_account_key("ca-b", materials[1].privkey)
    fresh_schema.psql("UPDATE certmgr_accounts SET key = (SELECT key FROM certmgr_accounts WHERE ca_id = 'ca-a') "
                      "WHERE ca_id = 'ca-b'", db="certmgr")
    assert pgs.load_account_key("ca-a") == materials[0].privkey
    with pytest.raises(StoreError, match=r"^store accounts ca-b v1: sealed private key does not open"):
        pgs.load_account_key("ca-b")


@pytest.mark.parametrize("statement", [
    "UPDATE certmgr_audit SET entry = '{}'",
    "DELETE FROM certmgr_audit",
    "TRUNCATE certmgr_audit",
])
def test_the_runtime_role_cannot_rewrite_the_audit_log(pgs: PgStore, pg: PgServer, statement: str) -> None:
    """The runtime role may INSERT and SELECT audit rows only: UPDATE, DELETE, TRUNCATE are denied."""
    pgs.audit("something", "example.com", actor="test")
    with psycopg.connect(pg.url(), password=pg.passwords[RUNTIME], autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)
    assert len(list(pgs.read_audit())) == 1


@pytest.mark.parametrize("statement", [
    "UPDATE certmgr_audit SET entry = '{}'",
    "DELETE FROM certmgr_audit",
    "UPDATE certmgr_versions SET version = 9",
])
def test_even_the_owner_cannot_rewrite_audit_rows_or_versions(pgs: PgStore, pg: PgServer,
                                                               materials: list[CertMaterial], statement: str) -> None:
    """Triggers refuse UPDATE/DELETE of audit rows and UPDATE of versions, whoever asks."""
    with pgs.lock("test"):
        pgs.add_version("example.com", materials[0])
    with owner_conn(pg) as conn, pytest.raises(psycopg.errors.RaiseException, match="refused"):
        conn.execute(statement)


def test_each_acquisition_bumps_the_epoch(pgs: PgStore) -> None:
    """Taking the run lock twice gives epochs 1 then 2; a certificate's lock has its own epoch."""
    with pgs.lock("a"):
        assert pgs.held == {"run": 1}
    with pgs.lock("a"):
        assert pgs.held == {"run": 2}
    with pgs.lock_cert("example.com", "renew example.com") as epoch:
        assert epoch == 1


def test_renew_name_on_b_waits_only_for_that_certificate(fresh_schema: PgServer, pgs: PgStore,
                                                         materials: list[CertMaterial]) -> None:
    """While A holds example.com's lock, B can take and write another certificate but not example.com."""
    b = open_pg(fresh_schema)
    try:
        with pgs.lock_cert("example.com", "A run"):
            with b.lock_cert("other.example", "B renew other.example"):
                assert b.add_version("other.example", materials[1]) == 1
            with pytest.raises(LockHeld, match=r"cert:example.com is held by pid \d+ on .* \(A run, started "):
                with b.lock_cert("example.com", "B renew example.com"):
                    pass
            assert pgs.add_version("example.com", materials[0]) == 1
    finally:
        b.close()


def test_a_terminated_lock_session_fences_every_later_write(fresh_schema: PgServer, pgs: PgStore,
                                                            materials: list[CertMaterial]) -> None:
    """After pg_terminate_backend of A's lock session, A's writes raise LockLost and write nothing."""
    with pgs.lock("A"):
        # pg_terminate_backend only signals: wait until the session has ended (and its locks with it)
        fresh_schema.psql(f"SELECT pg_terminate_backend({pgs._locks.backend_pid}, 10000)")
        with pytest.raises(LockLost, match=r"this controller no longer holds run \(not written\)$"):
            pgs.add_version("example.com", materials[0])
    assert pgs.versions("example.com") == []
    assert list(pgs.read_audit()) == []


def test_a_newer_holder_fences_the_older_one(fresh_schema: PgServer, pgs: PgStore,
                                             materials: list[CertMaterial]) -> None:
    """A's lock session killed, B takes the lock (epoch 2): A's write is refused naming both epochs; B's works."""
    b = open_pg(fresh_schema)
    try:
        with pgs.lock("A"):
            fresh_schema.psql(f"SELECT pg_terminate_backend({pgs._locks.backend_pid})")
            with b.lock("B", wait=30):
                assert b.held == {"run": 2}
                with pytest.raises(LockLost):
                    pgs.add_version("example.com", materials[0])
                assert b.add_version("example.com", materials[1]) == 1
        assert [e["actor"] for e in b.read_audit()] == ["B"]
    finally:
        b.close()


def test_a_paused_holder_loses_its_lock_and_cannot_write_when_it_wakes(fresh_schema: PgServer,
                                                                       pgs: PgStore) -> None:
    """SIGSTOP past idle_session_timeout: the server frees the lock, B takes it; on SIGCONT the old holder writes nothing."""
    child = subprocess.Popen([sys.executable, str(REPO / "tests/contract/pg_holder.py"), fresh_schema.url(),
                              fresh_schema.passwords[RUNTIME], "1.5"], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().split() == ["held", "1"]
        os.kill(child.pid, signal.SIGSTOP)
        with pgs.lock("B", wait=60):  # returns once the server has ended the stopped holder's session
            assert pgs.held == {"run": 2}
            os.kill(child.pid, signal.SIGCONT)
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
        assert line.startswith("refused LockLost: "), line
        assert child.wait(timeout=60) == 0
        assert pgs.versions("example.com") == []
    finally:
        os.kill(child.pid, signal.SIGCONT) if child.poll() is None else None
        child.kill()
        child.wait()


def test_a_holder_paused_inside_a_lock_transaction_loses_its_locks(fresh_schema: PgServer, pgs: PgStore) -> None:
    """SIGSTOP while the lock session is inside a transaction (a take in a worker thread; idle_session_timeout does
    not apply to a session idle in a transaction): the server still ends the session, and B gets the run lock."""
    child = subprocess.Popen([sys.executable, str(REPO / "tests/contract/pg_holder.py"), fresh_schema.url(),
                              fresh_schema.passwords[RUNTIME], "1.5", "in-take"], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["held", "1"]
        assert child.stdout.readline().split() == ["in-take"]  # and it has stopped itself inside the transaction
        started = time.monotonic()
        with pgs.lock("B", wait=30):
            assert pgs.held == {"run": 2}
        print(f"B took the run lock {time.monotonic() - started:.1f}s after A stopped (idle_timeout 1.5 s)")
    finally:
        os.kill(child.pid, signal.SIGCONT) if child.poll() is None else None
        child.kill()
        child.wait()


def test_an_unreachable_database_is_exit_69_and_never_local(pg: PgServer) -> None:
    """Connecting to a port where no PostgreSQL listens raises StoreUnavailable (exit 69) saying nothing was done."""
    url = pg.url().replace(f":{pg.port}/", f":{pg.port + 1}/")
    with pytest.raises(StoreUnavailable, match=r"cannot connect to PostgreSQL: .*\(nothing done; certmgr never "
                                               r"falls back to local state\)$") as err:
        PgStore.open(url, password="x", sealer=SEALER, timeout=2)
    assert err.value.exit_code == 69


@pytest.mark.parametrize("url", ["postgresql://u:secret@h/db", "postgresql://u@h/db?password=secret"])
def test_a_password_in_the_url_is_refused(url: str) -> None:
    """A store URL carrying a password is refused; the password must be a secret reference."""
    with pytest.raises(StoreError, match=r"^store url: contains a password$"):
        check_url(url)


def test_state_audit_and_account_writes_are_fenced_once_a_lock_is_lost(fresh_schema: PgServer, pgs: PgStore,
                                                                       materials: list[CertMaterial]) -> None:
    """With the run lock lost, save_json, audit and save_account_key raise LockLost and write nothing."""
    pgs.save_json("state/x.json", {"before": True})  # no lock held: unfenced, as for the directory store
    with pgs.lock("A"):
        fresh_schema.psql(f"SELECT pg_terminate_backend({pgs._locks.backend_pid})")
        for call in (lambda: pgs.save_json("state/x.json", {"after": True}),
                     lambda: pgs.audit("x", "y"),
                     lambda: pgs.save_account_key("pebble", materials[0].privkey)):
            with pytest.raises(LockLost, match=r"\(not written\)$"):
                call()
    assert pgs.load_json("state/x.json") == {"before": True}
    assert list(pgs.read_audit()) == []
    assert pgs.load_account_key("pebble") is None


def test_every_held_lock_is_checked_by_the_one_fence_statement(fresh_schema: PgServer, pgs: PgStore,
                                                               materials: list[CertMaterial]) -> None:
    """With the run lock and a certificate lock held, a bumped epoch on either refuses the write, naming that lock."""
    with pgs.lock("A"), pgs.lock_cert("example.com", "A"):
        pgs.save_json("state/x.json", {"before": True})
        for key in ("run", "cert:example.com"):
            with owner_conn(fresh_schema) as conn:
                conn.execute("UPDATE certmgr_epochs SET epoch = epoch + 1 WHERE lock_key = %s", (key,))
            ours = pgs.held[key]
            with pytest.raises(LockLost, match=rf"^store .*: write state/x.json: {key} was taken over "
                                               rf"\(epoch {ours + 1} after ours, {ours}\) \(not written\)$"):
                pgs.save_json("state/x.json", {"after": key})
            with owner_conn(fresh_schema) as conn:
                conn.execute("UPDATE certmgr_epochs SET epoch = epoch - 1 WHERE lock_key = %s", (key,))
        with owner_conn(fresh_schema) as conn:
            conn.execute("UPDATE certmgr_epochs SET epoch = epoch + 1 WHERE lock_key = 'cert:example.com'")
        with pytest.raises(LockLost, match=r"cert:example.com was taken over"):
            pgs.add_version("example.com", materials[0])
    assert pgs.load_json("state/x.json") == {"before": True}
    assert pgs.versions("example.com") == []


def test_a_lock_another_task_releases_during_the_fence_check_is_no_loss(pgs: PgStore,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit row written while another task of this controller releases its POP lock (between the fence's snapshot of held locks and its pg_locks read) is written, not refused as a lost lock."""
    with pgs.lock("A"):
        other_task = ExitStack()
        other_task.enter_context(pgs.lock_pop("cdn-1", "A"))
        check = LockSession._check

        def released_meanwhile(self: LockSession, cur: Any, keys: list[str], what: str, held: dict[str, int]) -> None:
            other_task.close()  # deletes pop:cdn-1 from the held locks, then pg_advisory_unlock
            check(self, cur, keys, what, held)

        monkeypatch.setattr(LockSession, "_check", released_meanwhile)
        pgs.audit("deployed", "example.com", host="cdn-2")
        assert "pop:cdn-1" not in pgs.held
    assert [(e["action"], e["host"]) for e in pgs.read_audit()] == [("deployed", "cdn-2")]


def test_a_killed_holder_frees_the_lock_at_once(fresh_schema: PgServer, pgs: PgStore) -> None:
    """SIGKILL of the process holding the run lock: the server ends its session and the next opener gets epoch 2."""
    child = subprocess.Popen([sys.executable, str(REPO / "tests/contract/pg_holder.py"), fresh_schema.url(),
                              fresh_schema.passwords[RUNTIME], "30"], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["held", "1"]
        with pytest.raises(LockHeld, match=r"run is held by pid \d+ on .* \(paused holder, started "):
            with pgs.lock("B"):
                pass
        child.kill()
        child.wait()
        with pgs.lock("B", wait=30):
            assert pgs.held == {"run": 2}
    finally:
        child.kill()
        child.wait()


def test_a_postgres_restart_fences_the_holder_and_keeps_epochs(fresh_schema: PgServer, pgs: PgStore,
                                                               materials: list[CertMaterial]) -> None:
    """Across a PostgreSQL restart the holder's write fails (nothing written) and the next holder's epoch is 2."""
    with pgs.lock("A"):
        fresh_schema.restart()
        with pytest.raises(StoreError) as err:  # the data connection died too: StoreUnavailable or LockLost
            pgs.add_version("example.com", materials[0])
        assert err.value.exit_code == 69
    pgs.close()
    b = open_pg(fresh_schema)
    try:
        with b.lock("B"):
            assert b.held == {"run": 2}
        assert b.versions("example.com") == []
    finally:
        b.close()


def test_a_blackholed_holder_loses_its_lock_and_writes_nothing(fresh_schema: PgServer, pgs: PgStore) -> None:
    """The holder's connections go silent (a proxy swallows every byte): the server frees the lock, B takes it; the holder refuses to write."""
    from tests.contract.blackhole import Blackhole

    hole = Blackhole(fresh_schema.port, fresh_schema.port + 50)
    url = fresh_schema.url().replace(f":{fresh_schema.port}/", f":{hole.port}/")
    child = subprocess.Popen([sys.executable, str(REPO / "tests/contract/pg_holder.py"), url,
                              fresh_schema.passwords[RUNTIME], "1.5"], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().split() == ["held", "1"]
        hole.cut()
        with pgs.lock("B", wait=60):  # the server ended the silent session after idle_session_timeout
            assert pgs.held == {"run": 2}
            assert fresh_schema.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'certmgr-locks' "
                                     f"AND pid <> {pgs._locks.backend_pid}", db="certmgr").strip() == "0"
            time.sleep(2.0)  # past the holder's own idle timeout (1.5 s): its heartbeat has gone unanswered that long
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
        assert line.startswith("refused LockLost: "), line
        assert "heartbeat unanswered for more than 1.5s" in line
        assert pgs.versions("example.com") == []
    finally:
        child.kill()
        child.wait()
        hole.close()


def test_two_deploys_of_one_controller_never_share_a_pops_lock(pgs: PgStore, caplog: pytest.LogCaptureFixture) -> None:
    """Two concurrent POP transactions of one controller on one POP (two deploy() calls in one process) take turns:
    the second waits until the first released the POP lock and then takes it itself, with a newer epoch — never
    inside the first's hold, and never on after the first released it (holding nothing). The wait is said as one
    for another task of this run, not (a warning) for another controller."""
    import asyncio
    import logging

    caplog.set_level(logging.INFO, logger="certmgr")

    from certmgr import halocks

    trace: list[tuple[str, str, int | None, bool]] = []  # (task, event, epoch, POP lock held by this controller)

    async def txn(who: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with halocks.pop_held(pgs, "cdn-1", "deploy") as epoch:
            trace.append((who, "begin", epoch, "pop:cdn-1" in pgs.held))
            await asyncio.sleep(0.3)  # the transaction's inspect, commit, verify
            trace.append((who, "end", epoch, "pop:cdn-1" in pgs.held))

    async def both() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(txn("first", 0))
            tg.create_task(txn("second", 0.1))

    with pgs.lock("run"):
        asyncio.run(both())
    assert [(w, e) for w, e, _, _ in trace] == [("first", "begin"), ("first", "end"), ("second", "begin"),
                                               ("second", "end")], trace
    assert all(held for *_, held in trace), trace
    first, second = trace[0][2], trace[2][2]
    assert first is not None and second is not None and second > first, trace
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "waiting for a lock" in r.getMessage()]
    assert len(said) == 1 and said[0][0] == logging.INFO, said
    assert "another task of this run" in said[0][1] and "another controller" not in said[0][1], said


def test_a_statement_in_flight_when_the_route_goes_silent_ends_within_its_bound(
        fresh_schema: PgServer, materials: list[CertMaterial]) -> None:
    """A write sent after the route went silent (its bytes swallowed, nothing closed, the proxy still ACKing) fails
    as StoreUnavailable once idle_timeout passes without an answer (the watch cuts the connection), instead of
    waiting for TCP; then nothing more is sent (LockLost before sending) and nothing was written."""
    import threading

    from tests.contract.blackhole import Blackhole

    hole = Blackhole(fresh_schema.port, fresh_schema.port + 51)
    url = fresh_schema.url().replace(f":{fresh_schema.port}/", f":{hole.port}/")
    a = PgStore.open(url, password=fresh_schema.passwords[RUNTIME], sealer=SEALER, idle_timeout=5.0)
    outcome: list[BaseException] = []
    try:
        with a.lock("A"):
            hole.cut()

            def write() -> None:
                try:
                    a.add_version("example.com", materials[0])
                except BaseException as exc:  # handed to the test's thread
                    outcome.append(exc)

            worker = threading.Thread(target=write, daemon=True)
            started = time.monotonic()
            worker.start()
            worker.join(60)  # without a client-side bound it waits for TCP: hours behind a proxy that ACKs
            assert not worker.is_alive(), "the write is still waiting for the database after 60 s"
            took = time.monotonic() - started
            assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable), outcome
            assert ("database connection lost: add a version of example.com unanswered for more than 5s "
                    "(connection cut)") in outcome[0].message
            assert outcome[0].exit_code == 69
            with pytest.raises(LockLost, match=r"connection to the database silent"):
                a.audit("deployed", "example.com", host="cdn-1")  # refused before anything is sent
        print(f"the blackholed write failed after {took:.1f}s (bound 5 s)")
    finally:
        a.close()
        hole.close()
    b = open_pg(fresh_schema)
    try:
        assert b.versions("example.com") == [] and list(b.read_audit()) == []
    finally:
        b.close()
