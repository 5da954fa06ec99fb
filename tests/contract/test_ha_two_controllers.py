"""Two controllers, one database: fault proofs on the real lab and a real PostgreSQL (issue 18, docs/ha.md).

Two certmgr processes — A and B, two state directories, one database — against this module's own
lab (Pebble behind the fault proxy, bind9, two sshd+nginx POPs). Every test ends with the
independent observer (`observe`), which trusts nothing certmgr says: the POPs' lab-only trace
(written by commit.sh under the POP's flock) shows never two transactions on one POP at once and
epochs that never decrease; every version in the database has its `add_version` audit row with its
serial and every POP's live version its `deployed` row (the audit table read directly, as the owner
role); bind9, asked by address, serves no `_acme-challenge` TXT.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography import x509

from certmgr.deploy.fence import holder_id
from certmgr.material import serial_text
from lab import Lab, hatrace
from lab.pg import RUNTIME, PgServer
from tests.contract.conftest import owner_conn
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import CLI_TIMEOUT, LINEAGES, REPO, SNI, cli_env, wait_for, write_inventory
from tests.receiver import Receiver

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_POPS = 2
IDLE = 5  # [store] idle_timeout, the smallest certmgr accepts: a paused controller's locks go after 5 s
HELD, FREE = LINEAGES[0], LINEAGES[1]  # HELD: its order is held at the CA; FREE: renewed meanwhile by B


# ---------------------------------------------------------------- two controllers


@dataclass
class Ctl:
    """One certmgr process (a controller) with its output in files."""

    proc: subprocess.Popen[str]
    out: Path
    err: Path

    @property
    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def finish(self, timeout: float = CLI_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def holder(self) -> str:
        """How this process's POP fence entries name it (certmgr.deploy.fence.holder_id: host/pid)."""
        return f"{holder_id().rsplit('/', 1)[0]}/{self.proc.pid}"


def start(inv: Path, state: Path, *args: str, pause: Path | None = None) -> Ctl:
    state.mkdir(parents=True, exist_ok=True)
    head = ([sys.executable, "-m", "tests.contract.hapoints", "pause-before-commit", str(pause), "--"] if pause
            else [sys.executable, "-m", "certmgr"])
    out, err = state / "stdout", state / "stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([*head, "--inventory", str(inv), "--state-dir", str(state), *args], stdout=o,
                                stderr=e, text=True, env=cli_env(), cwd=REPO)
    return Ctl(proc=proc, out=out, err=err)


def run(inv: Path, state: Path, *args: str) -> tuple[int, str]:
    ctl = start(inv, state, *args)
    return ctl.finish(), ctl.text


@pytest.fixture
def ha(fresh: Lab, proxy: ACMEProxy, fresh_schema: PgServer, tmp_path: Path) -> Iterator[tuple[Lab, PgServer, Path]]:
    """The lab on its seeds with the POP trace on, an empty database, and the inventory both controllers share."""
    pops = [fresh.pop_paths(p) for p in fresh.pop_names]
    hatrace.enable(pops)
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    (tmp_path / "pg-password").write_text(fresh_schema.passwords[RUNTIME])
    (tmp_path / "store-key").write_text(f"k1 {base64.b64encode(bytes(32)).decode()}\n")
    with inv.open("a") as f:
        f.write(f'\n[store]\nurl = "{fresh_schema.url()}"\npassword_file = "{tmp_path / "pg-password"}"\n'
                f'key_file = "{tmp_path / "store-key"}"\nidle_timeout = {IDLE}\n')
    yield fresh, fresh_schema, inv
    proxy.clear()


# ---------------------------------------------------------------- the independent observer


def rows(pg: PgServer, sql: str) -> list[Any]:
    with owner_conn(pg) as conn:
        return conn.execute(sql).fetchall()


def audit(pg: PgServer) -> list[dict[str, Any]]:
    return [r[0] for r in rows(pg, "SELECT entry FROM certmgr_audit ORDER BY id")]


def txt_left(lab: Lab) -> list[str]:
    """`_acme-challenge` names bind9 (asked at its address) still serves a TXT for."""
    left = []
    for lineage in LINEAGES:
        for sni in SNI[lineage]:
            fqdn = f"_acme-challenge.{sni}"
            resp = dns.query.udp(dns.message.make_query(fqdn, "TXT"), "127.0.0.1", port=lab.ports.dns, timeout=3)
            if any(rr.rdtype == dns.rdatatype.TXT for rr in resp.answer):
                left.append(fqdn)
    return left


def live_on_pop(lab: Lab, pop: str, name: str) -> int | None:
    link = lab.pop_paths(pop).cert_root / "live" / name
    return int(os.readlink(link).rsplit("/", 1)[1]) if link.is_symlink() else None


def begins(lab: Lab, pop: str) -> list[hatrace.Line]:
    return [ln for ln in hatrace.read(lab.pop_paths(pop)) if ln.word == "begin"]


def observe(lab: Lab, pg: PgServer) -> list[str]:
    """Every invariant violation the observer sees (empty: none)."""
    bad = [f"{pop}: {v}" for pop, vs in hatrace.all_violations(
        {p: lab.pop_paths(p) for p in lab.pop_names}).items() for v in vs]
    for pop in lab.pop_names:  # a switched POP with an empty trace would make the checks above vacuous
        if any(live_on_pop(lab, pop, n) for n in LINEAGES) and not begins(lab, pop):
            bad.append(f"{pop}: switched, but its trace has no transaction")
    entries = audit(pg)
    added = {(e["object"], e["to"], e.get("serial")) for e in entries if e["action"] == "add_version"}
    for name, version, cert in rows(pg, "SELECT name, version, cert FROM certmgr_versions"):
        serial = serial_text(x509.load_pem_x509_certificate(bytes(cert)).serial_number)
        if (name, version, serial) not in added:
            bad.append(f"version {version} of {name} (serial {serial}) has no add_version audit row")
    deployed = {(e["object"], e.get("host"), e.get("version")) for e in entries if e["action"] == "deployed"}
    for pop in lab.pop_names:
        for name in LINEAGES:
            v = live_on_pop(lab, pop, name)
            if v is not None and (name, pop, v) not in deployed:
                bad.append(f"{pop} serves version {v} of {name} without a deployed audit row")
    bad += [f"TXT left at {fqdn}" for fqdn in txt_left(lab)]
    return bad


def db_live(pg: PgServer) -> dict[str, int]:
    return {name: version for name, version in rows(pg, "SELECT name, version FROM certmgr_live")}


def every_pop_serves_db_live(lab: Lab, pg: PgServer) -> None:
    live = db_live(pg)
    assert set(live) == set(LINEAGES)
    for pop in lab.pop_names:
        assert {n: live_on_pop(lab, pop, n) for n in LINEAGES} == live, pop
        for name in LINEAGES:
            cert = rows(pg, f"SELECT cert FROM certmgr_versions WHERE name = '{name}' AND version = {live[name]}")[0][0]
            want = x509.load_pem_x509_certificate(bytes(cert)).serial_number
            assert {lab.served_serial(pop, sni) for sni in SNI[name]} == {want}, (pop, name)


def issuances(proxy: ACMEProxy, name: str) -> int:
    """Certificates the CA issued for `name`: finalize requests Pebble accepted (a rejected nonce is retried)."""
    return len(proxy.requests("finalize", SNI[name][0], status=200, forwarded=True))


def lock_sessions(pg: PgServer) -> int:
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'certmgr-locks'").strip())


def lock_sessions_of(pg: PgServer, pid: int) -> list[str]:
    """The lock sessions still open of the controller process `pid` (the backends its lock takes recorded in
    certmgr_epochs), as pg_stat_activity shows them: another test's session in this server is not counted."""
    return [line for line in pg.psql(
        "SELECT pid, state, extract(epoch FROM now() - state_change)::int, left(query, 60) FROM pg_stat_activity "
        "WHERE application_name = 'certmgr-locks' AND pid IN (SELECT (holder->>'backend')::int FROM certmgr_epochs "
        f"WHERE (holder->>'pid')::int = {int(pid)})", db="certmgr").splitlines() if line]


# ---------------------------------------------------------------- the proofs


def test_renew_name_on_b_waits_only_for_its_certificate_while_a_runs(ha: tuple[Lab, PgServer, Path],
                                                                      proxy: ACMEProxy, tmp_path: Path) -> None:
    """While A's timer run is held at the CA on one certificate, B renews another at once; B's `renew` of the held one waits for that lock alone and, re-checking, orders nothing."""
    lab, pg, inv = ha
    rule = proxy.hold("finalize", ident=SNI[HELD][0], drop=False)
    a = start(inv, tmp_path / "a", "run", "--no-notify")
    proxy.wait_held(rule, 120)
    b = start(inv, tmp_path / "b", "renew", FREE, "--force")
    rc, text, b_holder = b.finish(), b.text, b.holder
    assert rc == 0, text
    assert a.proc.poll() is None, a.text  # B did not wait for A's run: A is still held at the CA
    b2 = start(inv, tmp_path / "b2", "renew", HELD, "--force")
    wait_for(lambda: "waiting for a lock another controller holds" in b2.text, 60, "B to wait for the certificate")
    assert f"cert:{HELD} is held by pid {a.proc.pid} " in b2.text and "(certmgr run: renew, started " in b2.text
    assert b2.proc.poll() is None
    proxy.remove(rule)  # the held finalize goes on to Pebble
    assert a.finish() == 0, a.text
    assert b2.finish() == 0, b2.text
    assert "not due" in b2.text, b2.text  # re-checked after the lock: A renewed it meanwhile
    assert {n: issuances(proxy, n) for n in LINEAGES} == {HELD: 1, FREE: 2, LINEAGES[2]: 1}
    assert db_live(pg) == {HELD: 1, FREE: 2, LINEAGES[2]: 1}
    every_pop_serves_db_live(lab, pg)
    for pop in lab.pop_names:  # both controllers switched each POP, one transaction at a time
        assert {ln.holder for ln in begins(lab, pop)} == {a.holder, b_holder}, hatrace.read(lab.pop_paths(pop))
    assert observe(lab, pg) == []


def test_b_leaves_the_challenge_records_of_a_s_order_in_flight(ha: tuple[Lab, PgServer, Path], proxy: ACMEProxy,
                                                                tmp_path: Path) -> None:
    """While A's run holds a certificate's lock with its TXT published (its challenge answer held at the CA), B's `renew` of another certificate retries the shared DNS journal's leftovers but leaves A's records: A's order validates and A renews it once."""
    lab, pg, inv = ha
    rule = proxy.hold("challenge", ident=SNI[HELD][0], drop=False)
    a = start(inv, tmp_path / "a", "run", "--no-notify")
    proxy.wait_held(rule, 120)
    held_txt = {f"_acme-challenge.{sni}" for sni in SNI[HELD]}  # A's other orders come and go meanwhile
    a_txt = [f for f in txt_left(lab) if f in held_txt]
    assert a_txt, "A's challenge record is published while its answer is held"
    rc, text = run(inv, tmp_path / "b", "-v", "renew", FREE, "--force")
    assert rc == 0, text
    assert [f for f in txt_left(lab) if f in held_txt] == a_txt, "B removed A's record"
    assert "challenge records of an order another controller is running: left to it" in text, text
    proxy.remove(rule)  # A's challenge answer goes on to Pebble, which finds A's TXT
    assert a.finish() == 0, a.text
    assert issuances(proxy, HELD) == 1
    assert observe(lab, pg) == []


def test_a_killed_holder_is_settled_by_b_s_run(ha: tuple[Lab, PgServer, Path], proxy: ACMEProxy,
                                               tmp_path: Path) -> None:
    """SIGKILL of A mid-order frees its locks at once; B's run renews and deploys everything, at most one extra issuance."""
    lab, pg, inv = ha
    rule = proxy.hold("finalize", ident=SNI[HELD][0], after=True)
    a = start(inv, tmp_path / "a", "run", "--no-notify")
    proxy.wait_held(rule, 120)
    a.proc.kill()
    assert a.finish() == -signal.SIGKILL
    proxy.remove(rule)
    rc, text = run(inv, tmp_path / "b", "run", "--no-notify")
    assert rc == 0, text
    assert issuances(proxy, HELD) <= 1 + 1  # the renewal needed, plus the one crash injected
    every_pop_serves_db_live(lab, pg)
    assert observe(lab, pg) == []


def test_a_paused_controller_is_fenced_by_the_database_and_by_the_pop(ha: tuple[Lab, PgServer, Path],
                                                                      proxy: ACMEProxy, chat: Receiver,
                                                                      tmp_path: Path) -> None:
    """A stopped just before a POP commit past idle_timeout: B takes over and deploys; woken, A's commit is refused by the POP's epoch and its writes by the database, and nothing A did after waking is switched."""
    lab, pg, inv = ha
    marker = tmp_path / "paused"
    a = start(inv, tmp_path / "a", "run", pause=marker)  # A notifies: the refusal must reach chat
    try:
        paused_controller_is_fenced(lab, pg, inv, chat, tmp_path, a, marker)
    finally:
        if a.proc.poll() is None:  # a failed assertion must not leave A stopped for the rest of the session
            os.kill(a.proc.pid, signal.SIGCONT)
            a.proc.kill()
            a.proc.wait()


def paused_controller_is_fenced(lab: Lab, pg: PgServer, inv: Path, chat: Receiver, tmp_path: Path, a: Ctl,
                                marker: Path) -> None:
    wait_for(marker.exists, 120, "A to reach a POP commit")
    pop, a_epoch = marker.read_text().split()
    # the server ends A's lock session after IDLE seconds without a heartbeat, and with it A's locks
    assert lock_sessions_of(pg, a.proc.pid), "A's lock session is seen while A runs"
    try:
        wait_for(lambda: not lock_sessions_of(pg, a.proc.pid), 60, "A's lock session to be closed by the server")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {lock_sessions_of(pg, a.proc.pid)}; every session: "
                             + pg.psql("SELECT pid, application_name, state, left(query, 60) FROM pg_stat_activity "
                                       "WHERE datname = 'certmgr'")) from exc
    rc, text = run(inv, tmp_path / "b", "run", "--no-notify")
    assert rc == 0, text
    every_pop_serves_db_live(lab, pg)
    fence_b = hatrace.fence(lab.pop_paths(pop))
    assert fence_b is not None and fence_b[0] > int(a_epoch)
    served = {p: {n: lab.served_serial(p, SNI[n][0]) for n in LINEAGES} for p in lab.pop_names}
    os.kill(a.proc.pid, signal.SIGCONT)
    rc = a.finish()
    assert rc != 0, a.text
    assert f"fenced: {pop} saw epoch {fence_b[0]} from holder {fence_b[1]}; ours {a_epoch}" in a.text, a.text
    assert "no longer holds" in a.text or "lock session ended" in a.text, a.text  # the database refused A too
    refusal = f"fenced: {pop} saw epoch {fence_b[0]} from holder {fence_b[1]}"
    alerts = [r.json for r in chat.requests if r.json.get("kind") == "failure" and pop in r.json.get("title", "")]
    assert alerts and refusal in "\n".join(alerts[0]["lines"]), [r.json for r in chat.requests]
    assert hatrace.fence(lab.pop_paths(pop)) == fence_b  # A left the POP's fence as B set it
    trace = hatrace.read(lab.pop_paths(pop))
    assert [ln.word for ln in trace if ln.holder == a.holder] == ["fenced"], trace
    assert {p: {n: lab.served_serial(p, SNI[n][0]) for n in LINEAGES} for p in lab.pop_names} == served
    every_pop_serves_db_live(lab, pg)
    assert observe(lab, pg) == []


@pytest.mark.parametrize("fault", ["pg_terminate_backend", "postgres restart"])
def test_a_lost_lock_session_mid_run_stops_a_and_b_settles(ha: tuple[Lab, PgServer, Path], proxy: ACMEProxy,
                                                           tmp_path: Path, fault: str) -> None:
    """A's lock session ended mid-order (terminated, or the server restarted): A stores and switches nothing more (exit 69); B's run settles, at most one extra issuance."""
    lab, pg, inv = ha
    rule = proxy.hold("finalize", ident=SNI[HELD][0], drop=False)
    a = start(inv, tmp_path / "a", "run", "--no-notify")
    proxy.wait_held(rule, 120)
    if fault == "pg_terminate_backend":
        pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'certmgr-locks'")
    else:
        pg.restart()
    wait_for(lambda: lock_sessions(pg) == 0, 30, "A's lock session to be gone")
    proxy.remove(rule)
    assert a.finish() == 69, a.text
    assert not any(ln.word == "begin" for p in lab.pop_names for ln in hatrace.read(lab.pop_paths(p))), \
        "A switched a POP after losing its lock"
    assert HELD not in db_live(pg)
    rc, text = run(inv, tmp_path / "b", "run", "--no-notify")
    assert rc == 0, text
    assert issuances(proxy, HELD) <= 1 + 1, [(r.status, r.forwarded) for r in proxy.requests("finalize", SNI[HELD][0])]
    every_pop_serves_db_live(lab, pg)
    assert observe(lab, pg) == []


def a_idle(pg: PgServer, ports: set[int]) -> float:
    """Seconds since A's store session (its connection through the proxy, not the lock session) last changed state;
    0 while it runs a statement or is inside a transaction."""
    out = pg.psql("SELECT client_port, state, extract(epoch FROM now() - state_change) FROM pg_stat_activity "
                  "WHERE application_name <> 'certmgr-locks' AND client_port IS NOT NULL")
    for line in out.splitlines():
        port, state, age = line.split("|")
        if int(port) in ports:
            return float(age) if state == "idle" else 0.0
    return 0.0


def test_a_blackholed_controller_switches_nothing_and_b_settles(ha: tuple[Lab, PgServer, Path], proxy: ACMEProxy,
                                                                tmp_path: Path) -> None:
    """A's database connections blackholed mid-order (every byte swallowed, nothing closed): the server frees A's locks after idle_timeout, B's run takes over and settles (at most one extra issuance), and A — its order answered afterwards — stores nothing and switches no POP."""
    from tests.contract.blackhole import Blackhole

    lab, pg, inv = ha
    hole = Blackhole(pg.port, pg.port + 51)
    inv_a = tmp_path / "domains-a.toml"  # A reaches the database through the proxy, B directly
    inv_a.write_text(inv.read_text().replace(f":{pg.port}/", f":{hole.port}/"))
    rule = proxy.hold("finalize", ident=SNI[HELD][0], drop=False)
    a = start(inv_a, tmp_path / "a", "run", "--no-notify")
    try:
        proxy.wait_held(rule, 120)
        others = set(LINEAGES) - {HELD}
        # A quiet towards the database (its other renewals done, the held one waiting at the CA): a statement
        # already in flight on a blackholed route would wait for TCP to give up (docs/ha.md, "Not done yet")
        wait_for(lambda: {e["object"] for e in audit(pg) if e["action"] == "renewed"} >= others, 120,
                 "A's other renewals")
        wait_for(lambda: a_idle(pg, hole.upstream_ports()) >= 3.0, 120, "A's store session to be idle")
        a_holder = a.holder
        hole.cut()
        wait_for(lambda: lock_sessions(pg) == 0, 60, "the server to end A's silent lock session")
        rc, text = run(inv, tmp_path / "b", "run", "--no-notify")
        assert rc == 0, text
        every_pop_serves_db_live(lab, pg)
        versions = rows(pg, "SELECT name, version FROM certmgr_versions ORDER BY 1, 2")
        traces = {p: hatrace.read(lab.pop_paths(p)) for p in lab.pop_names}
        served = {p: {n: lab.served_serial(p, SNI[n][0]) for n in LINEAGES} for p in lab.pop_names}
        proxy.remove(rule)  # A's held finalize goes on to Pebble: A learns its certificate after losing its locks
        rc = a.finish()
        assert rc == 69, a.text  # its own watchdog: the heartbeat went unanswered past idle_timeout
        assert "heartbeat unanswered" in a.text, a.text
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        hole.close()
    assert rows(pg, "SELECT name, version FROM certmgr_versions ORDER BY 1, 2") == versions  # A stored nothing
    assert {p: hatrace.read(lab.pop_paths(p)) for p in lab.pop_names} == traces  # A began no POP transaction
    for p, lines in traces.items():  # and none after B's: every transaction of A's came before B took over
        words = [ln.holder for ln in lines if ln.word == "begin"]
        if a_holder in words:
            assert max(i for i, h in enumerate(words) if h == a_holder) < words.index(
                next(h for h in words if h != a_holder)), (p, lines)
    assert {p: {n: lab.served_serial(p, SNI[n][0]) for n in LINEAGES} for p in lab.pop_names} == served
    assert issuances(proxy, HELD) <= 1 + 1, [(r.status, r.forwarded) for r in proxy.requests("finalize", SNI[HELD][0])]
    every_pop_serves_db_live(lab, pg)
    assert observe(lab, pg) == []
