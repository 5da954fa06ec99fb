"""The soak: many certificate lifetimes on the real lab, the real `certmgr run` on a timer, faults at random.

Pebble issues certificates valid for `lifetime` seconds; `certmgr run` starts every `cadence`
seconds, the ratio a timer has to a real lifetime (twice daily : 6 days, or daily : 90 days).
On-call `renew NAME` / `deploy NAME` commands race it; a seeded scheduler injects faults into the
real components (the ACME proxy, bind9, the lagging secondary, sshd, nginx, a POP's disk, certmgr
itself). The independent `Observer` watches what is served and what is on the POPs' disks; the
end checks compare it with the audit log, DNS, the store and the POPs. `Soak.run()` returns a
`Report`; `report.violations` must be empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from lab import Lab
from lab.pop import CERTIFICATES, DEPLOY_USER
from lab.proc import stop_tree
from tests.faults.acmeproxy import ACMEProxy, Rule
from tests.receiver import Receiver
from tests.soak.observer import Endpoint, Observer, Violation

REPO = Path(__file__).resolve().parents[2]
LINEAGES = tuple(name for name, _ in CERTIFICATES)
# (modelled certificate lifetime in days, timer period in days): the ratio the soak keeps
RATIOS = {"twice-daily": (6.0, 0.5), "daily": (90.0, 1.0)}
FAULT_KINDS = ("acme-5xx", "bad-nonce", "slow-ca", "ca-outage", "dns-down", "secondary-lag", "sshd-down",
               "nginx-broken", "disk-full", "sigkill", "sigkill-write", "two-runs")
ACME_KINDS = ("new-order", "authz", "challenge", "finalize", "order", "certificate")
CRITICAL = 0.1  # certmgr's default critical_before (1/10 of the lifetime)
RENEW_WINDOW = 0.5 * 1.2  # renewal starts at 1/2 of the lifetime left (under 10 days), up to 1/5 earlier


@dataclass(frozen=True)
class SoakConfig:
    duration: float = 200.0  # seconds of faults and timer runs
    pops: int = 8
    seed: int = 20261203
    lifetime: int = 48  # seconds (Pebble's certificateValidityPeriod)
    ratio: str = "twice-daily"
    faults: bool = True
    oncall: bool = True
    keep_versions: int = 3
    faults_per_lifetime: float = 2.5
    kinds: tuple[str, ...] = FAULT_KINDS  # the fault kinds drawn from (a break check may want only some)
    oncall_per_lifetime: float = 1.5
    controllers: int = 1  # 2: two controllers share a PostgreSQL store (tests/soak/ha.py)
    idle_timeout: float = 5.0  # [store] idle_timeout with two controllers (seconds; certmgr's minimum is 5)

    @property
    def cadence(self) -> float:
        life_days, period_days = RATIOS[self.ratio]
        return self.lifetime * period_days / life_days

    @property
    def sim_day(self) -> float:
        """Real seconds that stand for one day of the modelled lifetime."""
        return self.lifetime / RATIOS[self.ratio][0]


@dataclass
class Episode:
    kind: str
    start: float
    end: float
    affects: str  # "ca" | "dns" | "certmgr" | a POP name
    detail: str = ""


@dataclass
class Proc:
    what: str
    popen: subprocess.Popen[bytes]
    out: Path
    started: float
    rc: int | None = None
    cpu: float = 0.0
    elapsed: float = 0.0
    ctl: str = ""  # which controller ran it (two controllers: "a" or "b")


# certmgr logs (and goes on) when the audit row of a POP switch cannot be written: the switch is then unaudited
AUDIT_LOST = re.compile(rb"^.*level=error\b.*msg=\"?audit: .*\baudit (?:deployed|rolled back|rollback failed) .*$",
                        re.MULTILINE)


@dataclass
class Report:
    config: SoakConfig
    elapsed: float = 0.0
    episodes: list[Episode] = field(default_factory=list)
    runs: Counter[str] = field(default_factory=Counter)
    audit: Counter[str] = field(default_factory=Counter)
    cpu: float = 0.0
    min_fraction: dict[str, float] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    sizes: list[dict[str, float]] = field(default_factory=list)
    growth_per_year: dict[str, float] = field(default_factory=dict)
    alerts: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    observer: dict[str, int] = field(default_factory=dict)
    run_time: dict[str, float] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)  # faults the outage bound did not inject
    load: list[float] = field(default_factory=list)  # the machine's 1-minute load average, sampled

    def text(self) -> str:
        c = self.config
        sim_days = self.elapsed / c.sim_day
        lines = [
            f"soak: {self.elapsed:.0f}s, seed {c.seed}, {c.pops} POPs, lifetime {c.lifetime}s "
            f"(models {RATIOS[c.ratio][0]:g} days), `certmgr run` every {c.cadence:.1f}s ({c.ratio})",
            f"lifetimes covered: {self.elapsed / c.lifetime:.1f}; simulated days: {sim_days:.0f}",
            "faults injected: " + (", ".join(f"{k} {n}" for k, n in sorted(Counter(e.kind for e in self.episodes)
                                                                            .items())) or "none"),
            "faults not injected (they would have left no time to keep up): "
            + (", ".join(f"{k} {n}" for k, n in sorted(self.refused.items())) or "none"),
            "processes: " + ", ".join(f"{k} {n}" for k, n in sorted(self.runs.items())),
            f"timer runs took {self.run_time.get('mean', 0):.1f}s on average, {self.run_time.get('max', 0):.1f}s at "
            "most (exit 75: the store lock was held by another command)",
            f"machine load (1-min average, {os.cpu_count()} CPUs): "
            + (f"{sum(self.load) / len(self.load):.1f} on average, {max(self.load):.1f} at most"
               if self.load else "not sampled"),
            f"renewals: {self.audit['renewed']}, deploys: {self.audit['deployed']}, "
            f"rollbacks: {self.audit['rolled back']}, renew failures: {self.audit['renew failed']}, "
            f"pruned (POP/store): {self.audit['pruned']}/{self.audit['prune']}",
            f"alerts by kind: {dict(sorted(self.alerts.items()))}",
            f"controller CPU: {self.cpu:.1f}s in all, {self.cpu / max(sim_days, 1e-9):.2f}s per simulated day",
            f"observer: {self.observer}",
            "minimum remaining fraction of lifetime ever served (Pebble certificates), per endpoint:",
        ]
        worst = sorted(self.min_fraction.items(), key=lambda kv: kv[1])
        for ep, frac in worst[:5]:
            lines.append(f"  {ep:<48} {frac:6.1%}")
        if len(worst) > 5:
            lines.append(f"  … {len(worst) - 5} more, best {worst[-1][1]:.1%}")
        lines.append("state and log growth per simulated year (bytes): "
                     + ", ".join(f"{k} {v:,.0f}" for k, v in self.growth_per_year.items()))
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"invariant violations: {len(self.violations)}"
                     + (f" {dict(sorted(Counter(v.kind for v in self.violations).items()))}" if self.violations else ""))
        lines += [f"  {v.line()}" for v in self.violations[:40]]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.__dict__, "elapsed": self.elapsed,
                "episodes": [e.__dict__ for e in self.episodes], "runs": dict(self.runs),
                "audit": dict(self.audit), "cpu": self.cpu, "min_fraction": self.min_fraction,
                "violations": [v.__dict__ for v in self.violations], "sizes": self.sizes,
                "growth_per_year": self.growth_per_year, "alerts": dict(self.alerts), "notes": self.notes,
                "refused": dict(self.refused)}


# ---------------------------------------------------------------- bounding the outages


def outage_bounds(lifetime: float, cadence: float) -> tuple[float, float]:
    """(longest blocked stretch, shortest clear stretch) per POP that leave a correct controller time to keep up.

    A certificate enters its renewal window at least `lifetime / 2` before it expires. To renew it
    and deploy it to a POP, a controller on a timer needs one clear stretch — CA, DNS, certmgr and
    that POP all working — of two timer periods: one for the next run to start, one for the run
    (and its capped backoff) to finish, a run taking well under a period when not load-bound. If
    every blocked stretch is at most W - 2·need long and every clear one at least need, any
    interval of W holds a whole clear stretch of need — whatever the faults' timing.
    """
    need = 2 * cadence
    return lifetime / 2 - 2 * need, need


def fits(spans: list[tuple[float, float]], start: float, end: float, *, max_block: float,
         min_clear: float) -> bool:
    """Whether blocking [start, end) keeps every blocked stretch (spans closer than `min_clear` join) at most
    `max_block` long."""
    lo, hi = start, end
    changed = True
    while changed:
        changed = False
        for a, b in spans:
            if a < hi + min_clear and b > lo - min_clear and (a < lo or b > hi):
                lo, hi, changed = min(lo, a), max(hi, b), True
    return hi - lo <= max_block


# ---------------------------------------------------------------- inventory


def soak_inventory(lab: Lab, proxy: ACMEProxy, cfg: SoakConfig) -> str:
    """The lab's inventory through the proxy, both nameservers checked, durations scaled to the lifetime."""
    text = lab.inventory_path.read_text().replace(lab.pebble.directory, proxy.directory)
    text = text.replace("[defaults]\n", f"[defaults]\nkeep_versions = {cfg.keep_versions}\n", 1)
    prop = max(2, int(cfg.lifetime / 10))
    text = text.replace('tsig_key = "certmgr-lab"\n',
                        'tsig_key = "certmgr-lab"\nnameservers = ["127.0.0.1", "127.0.0.2"]\n'
                        f'propagation_timeout = "{prop}s"\n', 1)
    # a problem is repeated once per simulated day, as the daily default does for real lifetimes
    text = text.replace("[channels.ops]\n", f'[channels.ops]\nrepeat = "{max(1, int(cfg.sim_day))}s"\n', 1)
    return text


# ---------------------------------------------------------------- the soak


class Soak:
    def __init__(self, cfg: SoakConfig, lab: Lab, work: Path, log: Callable[[str], None] = lambda s: None) -> None:
        self.cfg = cfg
        self.lab = lab
        self.work = work
        self.say = log
        # one generator per thread: the fault schedule (times, kinds, durations) depends on the seed
        # alone, not on how the threads interleave
        self.rng = random.Random(cfg.seed)
        self.oncall_rng = random.Random(cfg.seed + 1)
        self.state = work / "state"
        self.inventory = work / "domains.toml"
        self.report = Report(config=cfg)
        self.procs: list[Proc] = []
        self.running: list[Proc] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sync_paused_until = 0.0
        self._active: set[str] = set()  # fault targets in use ("dns", "ca", "sshd:sally", …)
        self._blocked: list[tuple[float, float, str]] = []  # (start, end, "all" | POP): what each fault blocks
        self._threads: list[threading.Thread] = []
        self._mounts: list[Path] = []
        self.t0 = 0.0

    # ------------------------------------------------------------ processes

    def launch(self, what: str, *args: str, crash: str | None = None) -> Proc:
        """Start a certmgr command; `crash`: under tests.faults.crashpoints, SIGKILLed at that step."""
        n = len(self.procs)
        out = self.work / "runs" / f"{n:05d}-{what.replace(' ', '-')}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        module = ["tests.faults.crashpoints", crash, "--"] if crash else ["certmgr"]
        with open(out, "wb") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", *module, "--inventory", str(self.inventory), "--state-dir",
                 str(self.state), *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        proc = Proc(what, popen, out, time.time())
        with self._lock:
            self.procs.append(proc)
            self.running.append(proc)
        threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
        return proc

    def _reap(self, proc: Proc) -> None:
        _, status, usage = os.wait4(proc.popen.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        proc.popen.returncode = rc
        proc.rc, proc.cpu, proc.elapsed = rc, usage.ru_utime + usage.ru_stime, time.time() - proc.started
        with self._lock:
            self.running.remove(proc)
            self.report.runs[f"{proc.what} exit {rc}"] += 1
            self.report.cpu += proc.cpu
        text = proc.out.read_bytes()
        if rc == 70 or b"Traceback" in text:
            self._violation("certmgr-crash", proc.what, f"exit {rc}, output {proc.out}: "
                            + proc.out.read_text(errors="replace")[-600:])
        elif lost := AUDIT_LOST.findall(text):
            self._violation("audit-lost", proc.what, f"exit {rc}, output {proc.out}: {len(lost)} line(s), the first: "
                            + lost[0].decode(errors="replace")[:600])
        elif rc == 0 and b"level=error" not in text:
            proc.out.unlink(missing_ok=True)  # keep only what needs reading

    def wait_idle(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self.running:
                    return
            if time.monotonic() > deadline:
                with self._lock:
                    stuck = [p.what for p in self.running]
                self._violation("hung-process", ",".join(stuck), f"still running {timeout:.0f}s after the faults")
                for p in list(self.running):
                    p.popen.kill()
                return
            time.sleep(0.1)

    def _violation(self, kind: str, where: str, evidence: str) -> None:
        with self._lock:
            self.report.violations.append(Violation(time.time(), kind, where, evidence))

    # ------------------------------------------------------------ loops

    def _loop(self, name: str, body: Callable[[], float], until: threading.Event | None = None) -> None:
        stop = until or self._stop

        def run() -> None:
            while not stop.is_set():
                try:
                    wait = body()
                except Exception as exc:  # a harness bug must show, not hang the soak
                    self._violation("harness-error", name, repr(exc))
                    wait = 1.0
                stop.wait(wait)
        t = threading.Thread(target=run, name=f"soak-{name}", daemon=True)
        t.start()
        if until is None:
            self._threads.append(t)

    def inventory_text(self, text: str) -> str:
        """The inventory the controllers use (two controllers add their [store])."""
        return text

    def start_timers(self) -> None:
        self._loop("timer", self._timer)

    def _timer(self) -> float:
        # a systemd timer never starts its service while the previous run is still going
        with self._lock:
            busy = any(p.what == "run" for p in self.running)
        if not busy:
            self.launch("run", "run", "--wait-lock", "900")  # as systemd/certmgr.service does
        return self.cfg.cadence

    def _oncall(self) -> float:
        rng = self.oncall_rng
        gap = rng.expovariate(self.cfg.oncall_per_lifetime / self.cfg.lifetime)
        if self._stop.wait(gap):
            return 0
        name = rng.choice(LINEAGES)
        if rng.random() < 0.5:
            force = rng.random() < 0.5
            self.launch("oncall renew", "renew", name, *(["--force"] if force else []))
        else:
            self.launch("oncall deploy", "deploy", name)
        return 0

    def _syncer(self) -> float:
        """The secondary follows the primary every half second, unless a fault holds it back."""
        if time.time() >= self._sync_paused_until and self.lab.named_pid is not None:
            with contextlib.suppress(Exception):
                self.lab.rndc("retransfer", "hachyderm.test", server="127.0.0.2")
        return 0.5

    def _sampler(self) -> float:
        self.report.sizes.append({"t": time.time() - self.t0, **self.sizes()})
        self.report.load.append(os.getloadavg()[0])
        return max(self.cfg.lifetime / 2, 5.0)

    # ------------------------------------------------------------ faults

    def _faults(self) -> float:
        gap = self.rng.expovariate(self.cfg.faults_per_lifetime / self.cfg.lifetime)
        if self._stop.wait(gap):
            return 0
        kind = self.rng.choice(self.cfg.kinds)
        try:
            self.inject(kind)
        except Exception as exc:
            self._violation("harness-error", f"fault {kind}", repr(exc))
        return 0

    def _episode(self, kind: str, affects: str, duration: float, detail: str = "") -> Episode:
        now = time.time()
        ep = Episode(kind, now, now + duration, affects, detail)
        with self._lock:
            self.report.episodes.append(ep)
        self.say(f"fault {kind} {detail} for {duration:.1f}s")
        return ep

    def _later(self, target: str, duration: float, end: Callable[[], None]) -> None:
        def run() -> None:
            self._stop.wait(duration)  # the faults stop with the soak, never later
            try:
                end()
            finally:
                with self._lock:
                    self._active.discard(target)
        threading.Thread(target=run, daemon=True).start()

    def _claim(self, target: str) -> bool:
        with self._lock:
            if target in self._active:
                return False
            self._active.add(target)
            return True

    @staticmethod
    def _kill_later(victim: Proc, delay: float) -> None:
        """SIGKILL `victim` after `delay` seconds (in a thread), unless it has ended by then."""
        def kill() -> None:
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                if victim.rc is None:
                    os.kill(victim.popen.pid, signal.SIGKILL)
        threading.Thread(target=kill, daemon=True).start()

    def _bounded(self, kind: str, pops: list[str], cost: float) -> bool:
        """Whether a fault that keeps `pops` from being renewed or deployed to for `cost` seconds, from now, may start.

        The schedule leaves a correct controller able to keep up (see `fits`); a fault that would not is not
        injected, and counted.
        """
        now, c = time.time(), self.cfg.cadence
        max_block, min_clear = outage_bounds(self.cfg.lifetime, c)
        with self._lock:
            for pop in pops:
                spans = [(a, b) for a, b, who in self._blocked if who in ("all", pop)]
                if not fits(spans, now, now + cost, max_block=max_block, min_clear=min_clear):
                    self.report.refused[kind] += 1
                    return False
            self._blocked.append((now, now + cost, "all" if len(pops) > 1 else pops[0]))
        return True

    def inject(self, kind: str) -> None:
        # the master generator gives each fault one seed, whatever the branch below draws from it
        L, c, rng, lab, proxy = self.cfg.lifetime, self.cfg.cadence, random.Random(self.rng.random()), self.lab, \
            self.proxy
        pop = rng.choice(lab.pop_names)
        if kind == "acme-5xx" and self._bounded(kind, lab.pop_names, c):
            k, n = rng.choice(ACME_KINDS), rng.randint(1, 4)
            proxy.fail(k, 503, "serverInternal", "soak: the CA's load balancer answers 503", times=n,
                       retry_after=1)
            self._episode(kind, "ca", 2 * c, f"{n}× on {k}")
        elif kind == "bad-nonce" and self._bounded(kind, lab.pop_names, c):
            n = rng.randint(3, 12)
            for k in rng.sample(ACME_KINDS[:4], 2):
                proxy.fail(k, 400, "badNonce", "soak: JWS has an invalid anti-replay nonce", times=n)
            self._episode(kind, "ca", 2 * c, f"{n}× on two kinds")
        elif kind == "slow-ca":
            k, secs, n = rng.choice(ACME_KINDS), rng.uniform(0.3, 1.5) * L / 40, rng.randint(1, 3)
            if self._bounded(kind, lab.pop_names, c + secs * n):  # the run it slows, and the slowness
                proxy.slow(k, secs, times=n)
                self._episode(kind, "ca", 2 * c + secs * n, f"{n}× {secs:.1f}s on {k}")
        elif kind == "ca-outage" and self._bounded(kind, lab.pop_names, d := rng.uniform(1.5 * c, 2 * c)) \
                and self._claim("ca"):
            rules: list[Rule] = [proxy.fail(k, 503, "serverInternal", "soak: CA outage", times=None)
                                 for k in ("directory", "nonce", "new-account", "account", *ACME_KINDS)]
            self._episode(kind, "ca", d, "every request 503")

            def back() -> None:
                for r in rules:
                    proxy.remove(r)
            self._later("ca", d, back)
        elif kind == "dns-down" and self._bounded(kind, lab.pop_names, d := rng.uniform(c, 2 * c)) \
                and self._claim("dns"):
            lab.kill_named()
            self._episode(kind, "dns", d, "primary named SIGKILLed")
            self._later("dns", d, lab.restart_named)
        elif kind == "secondary-lag" and self._bounded(kind, lab.pop_names, d := rng.uniform(c, 2 * c)) \
                and self._claim("secondary"):
            self._sync_paused_until = time.time() + d
            self._episode(kind, "dns", d, "secondary does not transfer")
            self._later("secondary", d, lambda: None)
        elif kind == "sshd-down" and self._bounded(kind, [pop], d := rng.uniform(c, 2 * c)) \
                and self._claim(f"sshd:{pop}"):
            pid = lab.sshd_pid(pop)
            if pid is not None:
                stop_tree(pid, str(lab.pop_paths(pop).sshd_config), children_first=True)
            lab.pop_paths(pop).sshd_pid.unlink(missing_ok=True)
            self._episode(kind, pop, d, pop)
            self._later(f"sshd:{pop}", d, lambda: lab.start_pop(pop))
        elif kind == "nginx-broken" and self._bounded(kind, [pop], d := rng.uniform(c, 2 * c)) \
                and self._claim(f"nginx:{pop}"):
            bad = lab.pop_paths(pop).conf_d / "soak-broken.conf"
            bad.write_text("this is not nginx;\n")
            self._episode(kind, pop, d, pop)
            self._later(f"nginx:{pop}", d, lambda: bad.unlink(missing_ok=True))
        elif kind == "disk-full" and self._bounded(kind, [pop], d := rng.uniform(c, 2 * c)) \
                and self._claim(f"disk:{pop}"):
            lineage = rng.choice(LINEAGES)
            where = lab.pop_paths(pop).cert_root / "archive" / lineage
            ctx = full_disk(where)
            ctx.__enter__()
            self._episode(kind, pop, d, f"{pop}:archive/{lineage}")
            self._later(f"disk:{pop}", d, lambda: ctx.__exit__(None, None, None))
        elif kind == "sigkill":
            with self._lock:
                victims = list(self.running)
            victim = rng.choice(victims) if victims else None
            # any moment of a run (a run takes up to about a period), not only its start: uploads and
            # store writes come late in a run
            delay = rng.uniform(0, c)
            if victim is not None and self._bounded(kind, lab.pop_names, c + delay):
                self._episode(kind, "certmgr", 2 * c + delay, f"{victim.what} after {delay:.1f}s")

                self._kill_later(victim, delay)
        elif kind == "sigkill-write" and self._bounded(kind, lab.pop_names, c):
            # killed while a temporary exists: half-way through writing a new version into the store, or
            # while a deploy's upload sits in a POP's `archive/<name>/.tmp-up-…` (watched for one period)
            lineage = rng.choice(LINEAGES)
            if rng.random() < 0.5:
                self._episode(kind, "certmgr", 2 * c, f"oncall renew {lineage} killed writing privkey.pem")
                self.launch("oncall renew (killed)", "renew", lineage, "--force", crash="privkey-write")
            else:
                self._episode(kind, "certmgr", 2 * c, "a command killed while its upload is on a POP")
                threading.Thread(target=self._kill_in_upload, args=(c,), daemon=True).start()
        elif kind == "two-runs":
            self.launch("run (second)", "run")
            self._episode(kind, "certmgr", c, "a second `certmgr run`")

    def _kill_in_upload(self, within: float) -> None:
        """SIGKILL every running certmgr command the moment an upload temp dir appears on any POP."""
        archives = [self.lab.pop_paths(p).cert_root / "archive" / n for p in self.lab.pop_names for n in LINEAGES]

        def uploads(d: Path) -> set[str]:
            try:
                return {e.name for e in os.scandir(d) if e.name.startswith(".tmp-up-")}
            except OSError:
                return set()
        before = {d: uploads(d) for d in archives}  # one a killed command left is not a new upload
        deadline = time.time() + within
        while time.time() < deadline and not self._stop.is_set():
            for d in archives:
                if uploads(d) - before[d]:
                    with self._lock:
                        victims = [p for p in self.running if p.rc is None]
                    for v in victims:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(v.popen.pid, signal.SIGKILL)
                    self.say(f"sigkill-write: {len(victims)} command(s) killed with an upload in {d}")
                    return
            time.sleep(0.02)

    # ------------------------------------------------------------ measuring

    def sizes(self) -> dict[str, float]:
        def du(p: Path, skip: str | None = None) -> int:
            total = 0
            for dirpath, dirs, files in os.walk(p):
                if skip:
                    dirs[:] = [d for d in dirs if d != skip]
                for f in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, f)).st_size
            return total
        audit = self.state / "audit.log"
        rotated = self.state / "audit.log.1"
        return {
            "audit_log": (audit.stat().st_size if audit.exists() else 0)
            + (rotated.stat().st_size if rotated.exists() else 0),
            "state_json": du(self.state / "state"),
            "store_archive": du(self.state / "archive"),
            "pop_archives": sum(du(self.lab.pop_paths(p).cert_root / "archive") for p in self.lab.pop_names),
        }

    # ------------------------------------------------------------ the whole soak

    def run(self) -> Report:
        cfg, lab = self.cfg, self.lab
        endpoints = [Endpoint(p, lab.pop_paths(p).address, lab.ports.https, sni, lineage)
                     for p in lab.pop_names for lineage, names in CERTIFICATES for sni in names]
        seeds = [f"{lab.seed_serial(n):x}" for n in LINEAGES]
        self.observer = Observer(endpoints, {p: lab.pop_paths(p).cert_root for p in lab.pop_names}, LINEAGES,
                                 critical=CRITICAL, ignore_serials=seeds)
        with ACMEProxy.running(lab.ports.acme, lab.https_cert, lab.https_key, lab.https_ca) as proxy, \
                Receiver(port=lab.ports.webhook) as chat:
            self.proxy = proxy
            self.state.mkdir(parents=True, exist_ok=True)
            self.inventory.write_text(self.inventory_text(soak_inventory(lab, proxy, cfg)))
            self.t0 = time.time()
            self.observer.start()
            self.start_timers()
            done = threading.Event()  # the secondary keeps following the primary through the clean run
            self._loop("syncer", self._syncer, until=done)
            self._loop("sampler", self._sampler)
            if cfg.oncall:
                self._loop("oncall", self._oncall)
            if cfg.faults:
                self._loop("faults", self._faults)
            self.say(f"soak running for {cfg.duration:.0f}s, run every {cfg.cadence:.1f}s")
            time.sleep(cfg.duration)
            # the faults stop: every fault's end runs now (its wait is cut short)
            self._stop.set()
            for t in self._threads:
                t.join(timeout=30)
            proxy.clear()
            self._restore()
            self.wait_idle()
            self.say("faults stopped; one clean run")
            clean = self.launch("clean run", "run", "--wait-lock", "60")
            while clean.rc is None:
                time.sleep(0.1)
            self.report.elapsed = time.time() - self.t0
            time.sleep(1.5)
            self.observer.stop()
            self.observer.round()  # what the clean run left is observed at least twice
            time.sleep(1.0)
            self.observer.round()
            self.report.sizes.append({"t": time.time() - self.t0, **self.sizes()})
            done.set()
            self.report.alerts = Counter(r.json.get("kind", "?") for r in chat.requests if r.body[:1] == b"{")
        self.check()
        return self.report

    def _restore(self) -> None:
        """Whatever a fault left broken is mended (the faults' own end actions ran when the soak stopped)."""
        self._sync_paused_until = 0.0
        deadline = time.monotonic() + 30
        while self._active and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.lab.named_pid is None:
            self.lab.restart_named()
        for p in self.lab.pop_names:
            (self.lab.pop_paths(p).conf_d / "soak-broken.conf").unlink(missing_ok=True)
            if self.lab.sshd_pid(p) is None or self.lab.nginx_pid(p) is None:
                self.lab.start_pop(p)
        with contextlib.suppress(Exception):
            self.lab.sync_secondary()

    # ------------------------------------------------------------ invariants at the end

    def check(self) -> None:
        rep, obs = self.report, self.observer
        rep.violations[:0] = obs.violations
        times = [p.elapsed for p in self.procs if p.what == "run" and p.rc is not None]
        rep.run_time = {"mean": sum(times) / len(times), "max": max(times)} if times else {}
        if times and rep.run_time["mean"] > 0.75 * self.cfg.cadence:
            rep.notes.append(f"load-bound: timer runs took {rep.run_time['mean']:.1f}s on average, more than 3/4 of "
                             f"the {self.cfg.cadence:.1f}s period; the outage bound gives a run one period (a longer "
                             "--lifetime gives runs more room)")
        rep.observer = {"rounds": obs.rounds, "changes": len(obs.changes), "disk_checks": obs.disk_checks,
                        "failed_handshakes": sum(s.failures for s in obs.stats.values())}
        for (pop, sni), st in obs.stats.items():
            rep.min_fraction[f"{pop}/{sni}"] = st.min_fraction
        self._check_critical()
        audit = self._audit()
        self._check_audit(audit)
        self._check_leftovers()
        self._check_retention()
        self._check_growth()

    def _check_critical(self) -> None:
        """Past the critical threshold is a violation unless the CA, DNS, certmgr or that POP had a fault in the
        renewal window before (while all of them worked, certmgr had the whole window to renew and deploy)."""
        window = RENEW_WINDOW * self.cfg.lifetime
        for (pop, sni), st in self.observer.stats.items():
            for t, serial, frac in st.low:
                if t - self.t0 < window:
                    continue  # the first window after the seed certificates
                excuses = [e for e in self.report.episodes
                           if e.affects in ("ca", "dns", "certmgr", pop) and e.start < t and e.end > t - window]
                if not excuses:
                    self.report.violations.append(Violation(
                        t, "critical-served", f"{pop}/{sni}",
                        f"serial {serial} with {frac:.1%} of its lifetime left, and no CA, DNS, certmgr or "
                        f"{pop} fault in the {window:.0f}s before"))
                    break

    def _audit(self) -> list[dict[str, Any]]:
        out = []
        for name in ("audit.log.1", "audit.log"):
            p = self.state / name
            if p.exists():
                for line in p.read_bytes().splitlines():
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        if isinstance(entry, dict):
                            out.append(entry)
        self.report.audit = Counter(str(e.get("action")) for e in out)
        return out

    def _check_audit(self, audit: list[dict[str, Any]]) -> None:
        """Every served-serial change has its deploy/rollback audit line; every audited deploy was seen served."""
        swaps = [e for e in audit if e.get("action") in ("deployed", "rolled back")]
        explained: set[tuple[str, str, str]] = set()
        for e in swaps:
            explained.add((str(e.get("host")), str(e.get("object")), _serial(e.get("to"))))
            if e.get("action") == "rolled back":  # the failed version may have been served for a moment
                explained.add((str(e.get("host")), str(e.get("object")), _serial(e.get("from"))))
        first: set[tuple[str, str]] = set()
        seen: set[tuple[str, str, str]] = set()
        for ch in self.observer.changes:
            seen.add((ch.pop, ch.lineage, _serial(ch.serial)))
            if (ch.pop, ch.sni) not in first:
                first.add((ch.pop, ch.sni))
                continue  # what was served when the soak began
            if (ch.pop, ch.lineage, _serial(ch.serial)) not in explained:
                self.report.violations.append(Violation(
                    ch.time, "unaudited-change", f"{ch.pop}/{ch.sni}",
                    f"now serves {ch.serial}; no deployed/rolled back line for {ch.pop} {ch.lineage} names it"))
        brief = 0
        deployed = [e for e in swaps if e.get("action") == "deployed"]
        for i, e in enumerate(deployed):
            key = (str(e.get("host")), str(e.get("object")), _serial(e.get("to")))
            if key in seen:
                continue
            t = _epoch(e.get("time"))
            later = [_epoch(x.get("time")) for x in swaps[i:] if x is not e and x.get("host") == key[0]
                     and x.get("object") == key[1] and _epoch(x.get("time")) >= t]
            if later and min(later) - t < 2 * self.observer.interval + 0.5:
                brief += 1  # replaced before an observer round could see it
                continue
            self.report.violations.append(Violation(
                t, "deploy-never-served", f"{key[0]}/{key[1]}", f"audit says serial {key[2]} deployed; never seen"))
        if brief:
            self.report.notes.append(f"{brief} deploy(s) replaced within one observer round (not counted)")

    def _check_leftovers(self) -> None:
        """After the clean run: no _acme-challenge TXT, no temporary directories in the store or on a POP."""
        for _, names in CERTIFICATES:
            for name in names:
                fqdn = f"_acme-challenge.{name}."
                q = dns.message.make_query(fqdn, "TXT")
                resp = dns.query.udp(q, "127.0.0.1", port=self.lab.ports.dns, timeout=3)
                values = [rd.to_text() for rr in resp.answer if rr.rdtype == dns.rdatatype.TXT for rd in rr]
                if values:
                    self.report.violations.append(Violation(time.time(), "txt-left", fqdn, ", ".join(values)))
        roots = [("store", self.state)] + [(p, self.lab.pop_paths(p).cert_root) for p in self.lab.pop_names]
        for where, root in roots:
            for dirpath, dirs, files in os.walk(root):
                for n in dirs + files:
                    if ".tmp-" in n:
                        self.report.violations.append(Violation(time.time(), "temp-left", where,
                                                                os.path.join(dirpath, n)))

    def _check_retention(self) -> None:
        keep = self.cfg.keep_versions
        for lineage in LINEAGES:
            places = [("store", self.state / "archive" / lineage)]
            places += [(p, self.lab.pop_paths(p).cert_root / "archive" / lineage) for p in self.lab.pop_names]
            for where, d in places:
                versions = sorted(int(e.name) for e in d.iterdir() if e.name.isdigit()) if d.is_dir() else []
                # the certbot-era seed (version 1, set aside on conversion) is not certmgr's to prune
                if len(versions) > keep:
                    self.report.violations.append(Violation(
                        time.time(), "retention", f"{where}:{lineage}",
                        f"{len(versions)} versions kept ({versions}), retention is {keep}"))

    def _check_growth(self) -> None:
        sizes = self.report.sizes
        if len(sizes) < 3:
            return
        mid, last = sizes[len(sizes) // 2], sizes[-1]
        span = last["t"] - mid["t"]
        year = 365 * self.cfg.sim_day
        for k in ("audit_log", "state_json", "store_archive", "pop_archives"):
            self.report.growth_per_year[k] = (last[k] - mid[k]) / max(span, 1e-9) * year
        # bounded: once every lineage has renewed a few times (two lifetimes), small state files do not
        # grow with runs and archives do not grow with renewals (retention)
        warm = [s for s in sizes[:-1] if s["t"] >= 2 * self.cfg.lifetime]
        if len(warm) < 2:
            return
        for k in ("state_json", "store_archive", "pop_archives"):
            plateau = max(s[k] for s in warm[: len(warm) // 2 + 1])
            if last[k] > 1.5 * plateau + 65536:
                self.report.violations.append(Violation(
                    time.time(), "unbounded-growth", k, f"{plateau:,.0f} → {last[k]:,.0f} bytes"))


def _serial(value: object) -> str:
    """A serial in one form whatever the writer's (certmgr writes openssl's `0A1B`, the observer `a1b`)."""
    try:
        return format(int(str(value).replace(":", ""), 16), "x")
    except ValueError:
        return str(value)


def _epoch(value: object) -> float:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0


@contextlib.contextmanager
def full_disk(where: Path) -> Iterator[Path]:
    """A full filesystem at `where` (a POP's archive/<lineage>): a tmpfs holding a copy of its content, no space left.

    Unmounted on exit: the original directory (and what the live link points at) is visible again.
    """
    import pwd

    saved = Path(tempfile.mkdtemp(prefix="certmgr-soak-disk-"))
    copy = saved / "c"
    shutil.copytree(where, copy, symlinks=True)
    st = where.stat()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=256k,mode={st.st_mode & 0o777:o}", "tmpfs", str(where)],
                   check=True)
    try:
        pw = pwd.getpwnam(DEPLOY_USER)
        shutil.copytree(copy, where, symlinks=True, dirs_exist_ok=True)
        for dirpath, dirs, files in os.walk(where):
            for n in [".", *dirs, *files]:
                os.chown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)
        # unbuffered: the write that finds the disk full raises here, and closing flushes nothing
        with open(where / ".soak-filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(saved, ignore_errors=True)
