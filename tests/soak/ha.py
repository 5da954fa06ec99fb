"""The soak with two controllers on one PostgreSQL store (issue 18): `HaSoak(cfg, lab, work).run()`.

Controllers A and B have their own state directory and share the inventory, whose `[store]`
points at a PostgreSQL of the soak's own (lab/pg.py, on the lab's port base + 90). Each runs
`certmgr run` on the compressed timer (B half a period after A); on-call `renew NAME` / `deploy
NAME` go to either. Besides the one-controller faults, the scheduler (bounded by the same outage
bound) injects: SIGKILL of one controller's timer run (`sigkill-run`), SIGSTOP of a command past
`[store] idle_timeout` then SIGCONT (`sigstop`), `pg_terminate_backend` of one controller's
sessions (`pg-terminate`), a PostgreSQL stop and start (`pg-restart`), and the route from one
controller to PostgreSQL going silent past `idle_timeout` (`pg-blackhole`: each controller reaches
the database through a proxy of its own, tests/contract/blackhole.py, which swallows every byte and
closes nothing; statements in flight then are cut by certmgr's client-side bound, certmgr.pgwatch).

The end checks read the audit rows and stored versions from PostgreSQL directly and the POPs'
transaction traces (tests/soak/haobserver.py, no certmgr code): issuances per name ≤ renewals
needed + forced renewals + crashes/pauses injected; every stored version and every served
serial has its `add_version` row; per POP no two transactions at once and epochs never decrease.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from lab import Lab
from lab.pg import OWNER, RUNTIME, PgServer
from lab.pop import DEPLOY_USER
from tests.contract.blackhole import Blackhole
from tests.soak import haobserver
from tests.soak.harness import FAULT_KINDS, LINEAGES, RENEW_WINDOW, REPO, Proc, Report, Soak, SoakConfig
from tests.soak.observer import Violation

HA_KINDS = ("sigkill-run", "sigstop", "sigstop-upload", "pg-terminate", "pg-restart", "pg-blackhole")
ALL_KINDS = FAULT_KINDS + HA_KINDS
# faults that may cut a controller between issuing a certificate and finishing with it: each may cost one issuance
CRASHES = ("sigkill", "sigkill-write", "sigkill-run", "sigstop", "sigstop-upload", "pg-terminate", "pg-restart",
           "pg-blackhole")
CONTROLLERS = ("a", "b")
PG_OFFSET = 90  # the lab uses its base … base+11; its slot is 100 ports wide
HOLE_OFFSET = {"a": 91, "b": 92}  # each controller's proxy to PostgreSQL (pg-blackhole)


def traceable() -> bool:
    """Whether this checkout's POP commit script writes the lab-only trace (branch ha-locks's fence.sh)."""
    return (REPO / "certmgr" / "deploy" / "scripts" / "fence.sh").exists()


class HaSoak(Soak):
    def __init__(self, cfg: SoakConfig, lab: Lab, work: Path, log: Callable[[str], None] = lambda s: None) -> None:
        super().__init__(cfg, lab, work, log)
        self.states = {c: work / f"state-{c}" for c in CONTROLLERS}
        self.state = self.states["a"]  # the base's leftover and size checks look here (nothing is kept there)
        self.ctl_rng = random.Random(cfg.seed + 2)
        self.pg_dir = Path(tempfile.mkdtemp(prefix="certmgr-hasoak-pg-"))
        self.pg = PgServer(self.pg_dir, lab.ports.base + PG_OFFSET)
        self.forced: Counter[str] = Counter()
        self.traced = traceable()
        self.holes: dict[str, Blackhole] = {}  # controller -> its route to PostgreSQL (when pg-blackhole is drawn)
        self.inventories: dict[str, Path] = {}

    # ------------------------------------------------------------ set-up

    def run(self) -> Report:
        try:
            self.pg.up()
            from certmgr.pgstore import install_schema  # the driver sets up; the observer never imports certmgr

            with psycopg.connect(self.pg.url(OWNER), password=self.pg.passwords[OWNER], autocommit=True) as conn:
                install_schema(conn, runtime_role=RUNTIME)
            if self.traced:
                self._enable_traces()
            if "pg-blackhole" in self.cfg.kinds:
                self.holes = {c: Blackhole(self.pg.port, self.lab.ports.base + HOLE_OFFSET[c]) for c in CONTROLLERS}
            return super().run()
        finally:
            for hole in self.holes.values():
                hole.close()
            if os.environ.get("CERTMGR_LAB_KEEP"):  # the audit rows are evidence: stopped, kept
                with contextlib.suppress(Exception):
                    self.pg.stop("fast")
                self.say(f"PostgreSQL data kept in {self.pg_dir} (port {self.pg.port})")
            else:
                with contextlib.suppress(Exception):
                    self.pg.down()
                shutil.rmtree(self.pg_dir, ignore_errors=True)

    def _enable_traces(self) -> None:
        """An empty trace file on each POP, owned by the deploy user: commit.sh appends to it while it exists."""
        pw = pwd.getpwnam(DEPLOY_USER)
        for p in self.lab.pop_names:
            f = self.lab.pop_paths(p).cert_root / haobserver.TRACE
            f.write_text("")
            os.chown(f, pw.pw_uid, pw.pw_gid)
            f.chmod(0o600)

    def inventory_text(self, text: str) -> str:
        secrets = self.work / "secrets"
        secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        pw, key = secrets / "pg-password", secrets / "store-key"
        pw.write_text(self.pg.passwords[RUNTIME])
        key.write_text(f"soak1 {base64.b64encode(os.urandom(32)).decode()}\n")
        for f in (pw, key):
            f.chmod(0o600)
        store = (f'\n[store]\nurl = "{{url}}"\npassword_file = "{pw}"\nkey_file = "{key}"\n'
                 f"idle_timeout = {self.cfg.idle_timeout:g}\n")
        for c, hole in self.holes.items():  # each controller's own inventory: its store through its proxy
            self.inventories[c] = self.work / f"domains-{c}.toml"
            url = self.pg.url().replace(f":{self.pg.port}/", f":{hole.port}/")
            self.inventories[c].write_text(text + store.format(url=url))
        return text + store.format(url=self.pg.url())

    # ------------------------------------------------------------ processes

    def launch(self, what: str, *args: str, crash: str | None = None, ctl: str | None = None) -> Proc:
        ctl = ctl or self.ctl_rng.choice(CONTROLLERS)
        if len(args) >= 2 and args[0] == "renew" and "--force" in args:
            with self._lock:
                self.forced[args[1]] += 1
        n = len(self.procs)
        out = self.work / "runs" / f"{n:05d}-{ctl}-{what.replace(' ', '-')}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        module = ["tests.faults.crashpoints", crash, "--"] if crash else ["certmgr"]
        with open(out, "wb") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", *module, "--inventory", str(self.inventories.get(ctl, self.inventory)), "--state-dir",
                 str(self.states[ctl]), *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        proc = Proc(what, popen, out, time.time(), ctl=ctl)
        with self._lock:
            self.procs.append(proc)
            self.running.append(proc)
        threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
        return proc

    def start_timers(self) -> None:
        for c in CONTROLLERS:
            self._loop(f"timer-{c}", functools.partial(self._timer_of, c, [c == "b"]))

    def _timer_of(self, ctl: str, offset: list[bool]) -> float:
        if offset[0]:  # B's timer fires half a period after A's
            offset[0] = False
            return self.cfg.cadence / 2
        with self._lock:
            busy = any(p.what == "run" and p.ctl == ctl for p in self.running)
        if not busy:
            self.launch("run", "run", "--wait-lock", "900", ctl=ctl)
        return self.cfg.cadence

    # ------------------------------------------------------------ faults

    def inject(self, kind: str) -> None:
        if kind not in HA_KINDS:
            super().inject(kind)
            return
        c, rng = self.cfg.cadence, random.Random(self.rng.random())
        everyone = self.lab.pop_names
        if kind == "sigkill-run":
            with self._lock:
                victims = [p for p in self.running if p.what == "run" and p.rc is None]
            victim = rng.choice(victims) if victims else None
            delay = rng.uniform(0, c)
            if victim is not None and self._bounded(kind, everyone, c + delay):
                self._episode(kind, "certmgr", 2 * c + delay, f"controller {victim.ctl}'s run after {delay:.1f}s")

                self._kill_later(victim, delay)
        elif kind == "sigstop":
            with self._lock:
                victims = [p for p in self.running if p.rc is None]
            victim = rng.choice(victims) if victims else None
            d = self.cfg.idle_timeout + rng.uniform(1, 3)  # past the idle timeout: the server frees its locks
            # blocked while its locks are held (under d), then until the other controller's timer fires
            if victim is not None and self._bounded(kind, everyone, d + c / 2) and self._claim(f"stop:{victim.popen.pid}"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim.popen.pid, signal.SIGSTOP)
                self._episode(kind, "certmgr", d + 2 * c, f"controller {victim.ctl}'s {victim.what} paused {d:.1f}s")

                def wake() -> None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim.popen.pid, signal.SIGCONT)
                self._later(f"stop:{victim.popen.pid}", d, wake)
        elif kind == "sigstop-upload" and self._claim("stop-upload"):
            # paused holding a POP's lock, its upload on the POP: the other controller takes the POP over; woken, its
            # commit must be refused by the POP's fence. Watched for up to half a lifetime; the bound is asked when
            # the upload appears (the pause blocks from then on)
            d = self.cfg.idle_timeout + rng.uniform(1, 3)
            threading.Thread(target=self._pause_in_upload, args=(self.cfg.lifetime / 2, d), daemon=True).start()
        elif kind == "pg-terminate":
            ctl = rng.choice(CONTROLLERS)
            with self._lock:
                pids = [p.popen.pid for p in self.running if p.ctl == ctl and p.rc is None]
            hole = self.holes.get(ctl)  # through a proxy, the server sees the proxy's ports
            ports = sorted(hole.upstream_ports() if hole is not None and pids else
                           {port for pid in pids for port in client_ports(pid, self.pg.port)})
            if ports and self._bounded(kind, everyone, c):
                out = self.pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE client_port IN "
                                   f"({','.join(map(str, ports))})").strip()
                self._episode(kind, "certmgr", 2 * c, f"controller {ctl}: {out} session(s) of {len(pids)} command(s)")
        elif kind == "pg-restart" and self._bounded(kind, everyone, (d := rng.uniform(c / 2, c)) + c) \
                and self._claim("pg"):
            self.pg.stop("fast")
            self._episode(kind, "certmgr", d + 2 * c, f"PostgreSQL stopped {d:.1f}s")
            self._later("pg", d, self.pg.start)
        elif kind == "pg-blackhole":
            ctl = rng.choice(CONTROLLERS)
            d = self.cfg.idle_timeout + rng.uniform(1, 3)  # past the idle timeout: statements in flight are cut
            hole = self.holes.get(ctl)
            if hole is not None and self._bounded(kind, everyone, d + c / 2) and self._claim(f"hole:{ctl}"):
                hole.cut()
                self._episode(kind, "certmgr", d + 2 * c, f"controller {ctl}'s route to PostgreSQL silent {d:.1f}s")
                self._later(f"hole:{ctl}", d, hole.heal)

    def _pause_in_upload(self, within: float, pause: float) -> None:
        """SIGSTOP the holder of a POP's lock (certmgr_epochs names its pid) the moment its upload appears on that POP
        (watched for `within`), if the outage bound allows; SIGCONT after `pause`. The other controller carries on."""
        archives = [(p, self.lab.pop_paths(p).cert_root / "archive" / n) for p in self.lab.pop_names for n in LINEAGES]

        def uploads(d: Path) -> set[str]:
            try:
                return {e.name for e in os.scandir(d) if e.name.startswith(".tmp-up-")}
            except OSError:
                return set()
        try:
            conn = psycopg.connect(self.pg.url(OWNER), password=self.pg.passwords[OWNER], autocommit=True)
        except psycopg.Error:
            with self._lock:
                self._active.discard("stop-upload")
            return
        try:
            before = {d: uploads(d) for _, d in archives}
            deadline = time.time() + within
            while time.time() < deadline and not self._stop.is_set():
                for pop, d in archives:
                    new = uploads(d) - before[d]
                    before[d] |= new
                    if new and self._pause_holder(conn, pop, d, pause):
                        return
                time.sleep(0.02)
        finally:
            conn.close()
            with self._lock:
                self._active.discard("stop-upload")

    def _pause_holder(self, conn: psycopg.Connection[Any], pop: str, where: Path, pause: float) -> bool:
        try:
            row = conn.execute("SELECT holder->>'pid' FROM certmgr_epochs WHERE lock_key = %s", (f"pop:{pop}",)).fetchone()
        except psycopg.Error:
            return False
        pid = int(row[0]) if row and row[0] else 0
        with self._lock:
            victim = next((v for v in self.running if v.popen.pid == pid and v.rc is None), None)
        if victim is None or not self._bounded("sigstop-upload", self.lab.pop_names, pause + self.cfg.cadence / 2):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        self._episode("sigstop-upload", "certmgr", pause + 2 * self.cfg.cadence,
                      f"controller {victim.ctl}'s {victim.what} paused {pause:.1f}s, its upload in {where}")
        self._stop.wait(pause)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        return True

    def _restore(self) -> None:
        super()._restore()
        with self._lock:
            paused = [p for p in self.running if p.rc is None]
        for p in paused:  # a pause the soak's end cut short has been woken by its end action; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.popen.pid, signal.SIGCONT)
        for hole in self.holes.values():
            if hole.cut_off.is_set():
                hole.heal()
        if not (self.pg.sock / f".s.PGSQL.{self.pg.port}").exists():
            self.pg.start()

    # ------------------------------------------------------------ end checks

    def _audit(self) -> list[dict[str, Any]]:
        audit, self.stored = haobserver.read_database(self.pg.url(OWNER), self.pg.passwords[OWNER])
        self.report.audit = Counter(str(e.get("action")) for e in audit)
        self.audit_rows = audit
        return audit

    def check(self) -> None:
        super().check()
        cfg, rep = self.cfg, self.report
        crashes = sum(1 for e in rep.episodes if e.kind in CRASHES)
        needed = haobserver.renewals_needed(rep.elapsed, cfg.lifetime, RENEW_WINDOW)
        issued = haobserver.issuances(self.audit_rows)
        for name in LINEAGES:
            bound = needed + self.forced[name] + crashes
            if issued[name] > bound:
                rep.violations.append(Violation(time.time(), "extra-issuance", name,
                                                f"{issued[name]} certificates issued; at most {needed} renewals needed "
                                                f"+ {self.forced[name]} forced + {crashes} crashes/pauses"))
        runs = Counter(f"{p.ctl} exit {p.rc}" for p in self.procs if p.what == "run")
        rep.notes.append(f"timer runs per controller: {dict(sorted(runs.items()))}")
        rep.notes.append(f"two controllers, PostgreSQL store (idle_timeout {cfg.idle_timeout:g}s); issuances per name "
                         f"{dict(sorted(issued.items()))}, bound {needed} needed + forced "
                         f"{dict(sorted(self.forced.items()))} + {crashes} crashes/pauses")
        for s in haobserver.unaudited_versions(self.audit_rows, self.stored):
            rep.violations.append(Violation(time.time(), "unaudited-version", f"{s.name}/{s.version}",
                                            f"stored serial {s.serial} has no add_version audit row"))
        audited = {(str(e.get("object")), haobserver.hexserial(e.get("serial")))
                   for e in self.audit_rows if e.get("action") == "add_version"}
        for ch in self.observer.changes:
            if ch.serial not in self.observer.ignore and (ch.lineage, ch.serial) not in audited:
                rep.violations.append(Violation(ch.time, "unaudited-issue", f"{ch.pop}/{ch.sni}",
                                                f"serves serial {ch.serial}; no add_version audit row names it"))
        self._check_traces()

    def _check_traces(self) -> None:
        rep = self.report
        if not self.traced:
            rep.notes.append("POP traces: not checked (this checkout's commit.sh writes no trace)")
            return
        words: Counter[str] = Counter()
        for p in self.lab.pop_names:
            lines = haobserver.read_trace(self.lab.pop_paths(p).cert_root)
            if lines is None:
                rep.violations.append(Violation(time.time(), "trace-missing", p, f"no {haobserver.TRACE}"))
                continue
            words.update(ln.word for ln in lines)
            for bad in haobserver.trace_violations(lines):
                rep.violations.append(Violation(time.time(), "pop-trace", p, bad))
        if rep.audit["deployed"] and not words["begin"]:
            rep.violations.append(Violation(time.time(), "trace-empty", "POPs",
                                            f"{rep.audit['deployed']} deploys audited, no transaction traced"))
        rep.notes.append(f"POP traces: {words['begin']} transactions, {words['fenced']} fenced, on "
                         f"{len(self.lab.pop_names)} POPs")


def client_ports(pid: int, server_port: int) -> set[int]:
    """The local ports of process `pid`'s TCP connections to 127.0.0.1:`server_port` (pg_stat_activity's client_port)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    ports = set()
    for row in rows:
        f = row.split()
        if f[9] in inodes and int(f[2].split(":")[1], 16) == server_port:
            ports.add(int(f[1].split(":")[1], 16))
    return ports
