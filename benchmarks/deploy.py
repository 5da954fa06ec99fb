"""Benchmark: push K certificates to 1, 4, 20 and 50 lab POPs with certmgr, beside hand-written loops.

    .venv/bin/python benchmarks/deploy.py [--sizes 1,4,20,50] [--certs 1,10] [--port-base 44200] [--rtt MS]
        [--names-per-pop 50] [--peers auto|batched,by-hand] [--no-canary] [--profile] [--cgroups]
        [--wanproxy PATH]

Issue 17's shape, side by side with the batched loop, with a profile of certmgr:

    .venv/bin/python benchmarks/deploy.py --names-per-pop 50 --sizes 1,50 --certs 1,10 --peers batched \
        --no-canary --profile

Each certmgr run is a child process (so its peak RSS is its own) that deploys a fresh version of
K lineages to the first N POPs, all at once, after a warm-up run (which converts certbot's layout);
the largest size is also run canary-first, as `certmgr deploy` does with the lab's canary tag.
The lineages are the lab's own (`--names-per-pop` N: N server blocks per POP, each its own
certificate, in certbot's layout until the first deploy converts them); with K > N the benchmark
adds lineages `benchI.hachyderm.test` to every POP (files, a conf.d server block, one reload).
The first deploy (the warm-up: certbot's layout converted) is reported against a normal one
(issue 17: ≤ 1.5×). Per run it reports the reloads each POP's nginx
logged (its error log's SIGHUP lines — not certmgr's own report) and the CPU the whole machine
spent per POP: the POPs' sshd trees (sessions, sh, sudo, nginx -t, coreutils: the CPU of what
they reaped, from /proc/PID/stat), their nginx trees (master, workers, old generations), certmgr's
own, the whole machine's busy time (/proc/stat, other jobs included) and the processes started
per POP (/proc/stat `processes`, machine-wide). The `/proc` figure for the sshd trees misses the
session processes nobody reaps into the master's counters (most of them): `--cgroups` (root) meters
each kind exactly instead — certmgr, the POPs' sshd trees, their nginx, the WAN proxy — in cgroup v1
cpuacct groups (procmeter.CpuGroups), kernel time included. `--profile` also splits certmgr's CPU
inside deploy() by part (asyncssh protocol and crypto, TLS handshakes, asyncio, certmgr's steps).
Each size also prints every host's steps (connect, inspect, commit, verify, the whole) as
min/median/max seconds over its runs: where a fan-out's time goes (at `--rtt 50`, 50 POPs wait in
the commit — the POPs' processes on the two shared cores — far more than in connecting or verifying).

Two hand-written peers, sequential over POPs: the by-hand loop for one certificate (`ssh mkdir`,
`scp` the four files, `ssh 'ln -sfn … && sudo nginx -t && sudo nginx -s reload'`) and the batched
loop for K (one `scp -r` of all K version dirs, one `ssh` doing the K symlink swaps, one nginx -t
and one reload). Targets (issue 13): 10 certificates × 50 POPs ≤ 1.5× 1 certificate × 50 POPs;
one reload per POP per run; at `--rtt 50`, 50 POPs ≤ 2× one POP.

`--rtt MS` puts every POP behind `benchmarks/wanproxy.py` (SSH and HTTPS), which adds that
round-trip time, as between a control host and real, remote POPs: on loopback the POPs' work is
CPU time on the same two cores as certmgr, while in the field each POP brings its own CPU and
the cost certmgr pays per POP is mostly waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import datetime as dt
import json
import os
import pstats
import pwd
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certmgr import inventory as inventory_mod  # noqa: E402
from certmgr.deploy import Status, deploy, handshake  # noqa: E402
from certmgr.material import CertMaterial  # noqa: E402
from certmgr.model import SecretRef, StoreConfig  # noqa: E402
from certmgr.remote import Timeouts  # noqa: E402
from certmgr.store import Store  # noqa: E402
from lab import Lab, pki  # noqa: E402
from lab.pop import DEPLOY_USER  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmeter import CpuGroups  # noqa: E402

NAME = "media.hachyderm.test"


def lineages(lab: Lab, k: int) -> list[tuple[str, tuple[str, ...]]]:
    """The K lineages a run deploys: the lab's own first (media first, then its `--names-per-pop` sites),
    then benchI.hachyderm.test."""
    own = sorted(lab.certificates, key=lambda c: c[0] != NAME)
    extra = [(f"bench{i}.hachyderm.test", (f"bench{i}.hachyderm.test",)) for i in range(max(0, k - len(own)))]
    return (own + extra)[:k]


def add_bench_lineages(lab: Lab, k: int) -> None:
    """Put the extra lineages on every POP: a seed version live (certmgr's layout), a server block, one reload."""
    extra = [x for x in lineages(lab, k) if x[0].startswith("bench")]
    if not extra:
        return
    ca = pki.make_ca("benchmark seed CA")
    pw = pwd.getpwnam(DEPLOY_USER)
    for pop in lab.pop_names:
        p = lab.pop_paths(pop)
        listen = re.search(r"listen (\S+) ssl default_server;", p.nginx_conf.read_text())
        assert listen is not None
        servers = []
        for name, domains in extra:
            arch = p.cert_root / "archive" / name
            seed = arch / "seed"
            if not seed.exists():
                seed.mkdir(parents=True)
                leaf = pki.make_leaf(ca, list(domains))
                for fname, data in (("fullchain.pem", leaf.cert_pem + ca.cert_pem), ("privkey.pem", leaf.key_pem),
                                    ("cert.pem", leaf.cert_pem), ("chain.pem", ca.cert_pem)):
                    pki.write_file(seed / fname, data, 0o600 if fname == "privkey.pem" else 0o644)
                os.symlink(f"../archive/{name}/seed", p.cert_root / "live" / name)
                for path in (arch, seed, *seed.iterdir(), p.cert_root / "live" / name):
                    os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
            live = p.cert_root / "live" / name
            servers.append(f"server {{ listen {listen.group(1)} ssl; server_name {' '.join(domains)}; "
                           f"ssl_certificate {live}/fullchain.pem; ssl_certificate_key {live}/privkey.pem; "
                           f'location / {{ return 200 "{pop} {name}\\n"; }} }}\n')
        (p.conf_d / "bench.conf").write_text("".join(servers))
        lab.nginx_reload(pop)


def open_store(state: str, pg: str) -> Any:
    """The directory store at `state`, or (`pg` a JSON file {"url", "password_file", "key_file"}) the PostgreSQL
    store it names (benchmarks/hastore.py)."""
    if pg == "-":
        return Store.open(Path(state))
    from certmgr.storeopen import open_pg  # psycopg: the postgres extra

    spec = json.loads(Path(pg).read_text())
    return open_pg(StoreConfig(url=spec["url"], key=SecretRef(kind="file", where=spec["key_file"],
                                                              key_path="store.key_file"),
                               password=SecretRef(kind="file", where=spec["password_file"],
                                                  key_path="store.password_file")))


def child(lab_dir: str, n: int, parallel: int, state: str, canary: bool, far: str, k: int, profile: str = "-",
          pg: str = "-") -> None:
    """One certmgr deploy of a fresh version of K lineages to the first `n` POPs; prints JSON with time and peak RSS.

    Without `canary` the lab's canary tag is dropped, so all POPs go at once (a pure fan-out
    measure); with it the canary POP goes first and the rest after it verified. `pg` (a JSON file,
    see open_store) puts the versions and deploy state in the PostgreSQL store instead of `state`.
    """
    lab = Lab.load(lab_dir)
    inv = inventory_mod.load(lab.inventory_path)
    pops = lab.pop_names[:n]
    base = inv.certificate(NAME)
    certs = [dataclasses.replace(base, name=name, domains=domains, hosts=tuple(pops), verify_names=())
             for name, domains in lineages(lab, k)]
    hosts = dict(inv.hosts)
    if far != "-":  # the POPs seen through wanproxy: {pop: address} and a known_hosts for those addresses
        spec = json.loads(Path(far).read_text())
        hosts = {h: dataclasses.replace(x, address=spec["address"][h], known_hosts=Path(spec["known_hosts"]))
                 if h in spec["address"] else x for h, x in hosts.items()}
    if not canary:
        hosts = {h: dataclasses.replace(x, tags=tuple(t for t in x.tags if t != "canary")) for h, x in hosts.items()}
    if pids := os.environ.get("CERTMGR_BENCH_RELOAD_PIDS"):  # --reload-by-pid: SIGHUP to the master's pid itself
        master = json.loads(pids)
        hosts = {h: dataclasses.replace(x, reload_command=("sudo", "-n", KILL, "-HUP", str(master[h])))
                 if h in master else x for h, x in hosts.items()}
    store = open_store(state, pg)
    ca = pki.make_ca("benchmark CA")
    trust = Path(state).parent / "benchmark-ca.pem"  # deploy's certcheck verifies the chain to a trusted root
    trust.write_bytes(ca.cert_pem)
    inv = dataclasses.replace(inv, certificates=tuple(certs), hosts=hosts, trust=(*inv.trust, trust))
    with store.lock("benchmark"):
        for cert in certs:
            leaf = pki.make_leaf(ca, list(cert.domains))
            store.activate(cert.name, store.add_version(cert.name, CertMaterial(
                cert=leaf.cert_pem, chain=ca.cert_pem, privkey=leaf.key_pem)))
        # CPU time, not wall time: on two busy cores a wall-clock profile charges the waits to whoever was running
        prof = cProfile.Profile(time.process_time) if profile != "-" else None
        prober, counts = counting()
        start, cpu0 = time.monotonic(), time.process_time()
        if prof is not None:
            prof.enable()
        outcomes = asyncio.run(deploy(inv, store, certs, parallel=parallel, now=dt.datetime.now(dt.UTC),
                                      prober=prober))
        wall, deploy_cpu = time.monotonic() - start, time.process_time() - cpu0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
    if pg != "-":
        store.close()
    bad = [o.line() for o in outcomes if o.status != Status.DEPLOYED]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    steps: dict[str, list[float]] = {}
    for o in outcomes:
        for key, secs in (*o.timings, ("elapsed", o.elapsed)):
            steps.setdefault(key, []).append(secs)
    print(json.dumps({"n": n, "k": k, "wall": wall, "rss_kb": ru.ru_maxrss, "client_cpu": ru.ru_utime + ru.ru_stime,
                      "deploy_cpu": deploy_cpu, "steps": {key: sorted(v) for key, v in steps.items()},
                      "deployed": sum(o.status == Status.DEPLOYED for o in outcomes), "bad": bad, **counts}))


def counting() -> tuple[Any, dict[str, int]]:
    """deploy's prober, counting TLS handshakes; SSH connections and channels (sessions) counted in asyncssh."""
    counts = {"connections": 0, "channels": 0, "handshakes": 0}
    probe = handshake.probe_with(Timeouts())
    connect, session = asyncssh.connect, asyncssh.SSHClientConnection.create_session

    async def prober(address: str, port: int, sni: str) -> Any:
        counts["handshakes"] += 1
        return await probe(address, port, sni)

    async def counted_connect(*a: Any, **kw: Any) -> Any:
        counts["connections"] += 1
        return await connect(*a, **kw)

    async def counted_session(self: Any, *a: Any, **kw: Any) -> Any:
        counts["channels"] += 1
        return await session(self, *a, **kw)

    asyncssh.connect = counted_connect  # type: ignore[assignment]
    asyncssh.SSHClientConnection.create_session = counted_session  # type: ignore[method-assign]
    return prober, counts


def _proc_cpu(pid: int | None) -> float:
    """CPU seconds of `pid` plus its reaped children (sshd sessions, sh, sudo, nginx -t; old nginx workers)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _busy() -> float:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _forks() -> int:
    """Processes created on the whole machine so far (/proc/stat `processes`): forks on the POPs dominate."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def server_cpu(lab: Lab, n: int) -> tuple[float, float]:
    """CPU seconds so far of the first `n` POPs' (sshd trees: sshd sessions, sh, sudo, nginx -t, coreutils;
    nginx trees: master and workers, old generations included)."""
    pops = lab.pop_names[:n]
    return (sum(_proc_cpu(lab.sshd_pid(p)) for p in pops), sum(_proc_cpu(lab.nginx_pid(p)) for p in pops))


def run_child(lab: Lab, n: int, parallel: int, state: Path, canary: bool = False, far: str = "-",
              k: int = 1, profile: str = "-", pg: str = "-") -> dict[str, Any]:
    (ssh0, ngx0), busy0, forks0 = server_cpu(lab, n), _busy(), _forks()
    proxy0 = sum(_proc_cpu(p) for p in _PROXIES)
    reloads0 = {p: lab.reload_count(p) for p in lab.pop_names[:n]}
    groups0 = _GROUPS[0].read() if _GROUPS else {}
    join = str(_GROUPS[0].procs_file("certmgr")) if _GROUPS else None
    t = time.monotonic()
    res = subprocess.run([sys.executable, __file__, "--child", str(lab.dir), str(n), str(parallel), str(state),
                          "canary" if canary else "all", far, str(k), profile, pg],
                         capture_output=True, text=True, check=False, timeout=900,
                         preexec_fn=(lambda: Path(join).write_text("0")) if join else None)
    total = time.monotonic() - t
    time.sleep(0.3)  # let the POPs' sshd reap their sessions so the children's CPU is counted
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall"] = total
    ssh1, ngx1 = server_cpu(lab, n)
    out["sshd_cpu"], out["nginx_cpu"] = ssh1 - ssh0, ngx1 - ngx0
    out["proxy_cpu"] = sum(_proc_cpu(p) for p in _PROXIES) - proxy0
    if _GROUPS:
        g1 = _GROUPS[0].read()
        out["groups"] = {kd: (u - groups0[kd][0], st - groups0[kd][1]) for kd, (u, st) in g1.items()}
    out["server_cpu"] = out["sshd_cpu"] + out["nginx_cpu"]
    out["machine_busy"] = _busy() - busy0
    out["forks"] = _forks() - forks0
    out["load"] = os.getloadavg()[0]
    reloads = [lab.reload_count(p) - reloads0[p] for p in lab.pop_names[:n]]
    out["reloads"] = (min(reloads), max(reloads))
    return out


KILL = "/usr/bin/kill"  # procps' kill: signals the pid it is given, reads no process table
_GROUPS: list[CpuGroups] = []  # with --cgroups: exact CPU per kind of process (procmeter.CpuGroups)
_PROXIES: list[int] = []  # the running wanproxy's pid: its CPU is the lab's, reported apart from certmgr's


class FarPops:
    """wanproxy in front of every POP (SSH and HTTPS): POP i is reached at 127.0.3.(i+2), `rtt_ms` away."""

    def __init__(self, lab: Lab, rtt_ms: float, work: Path, proxy: str | None = None) -> None:
        self.address = {pop: f"127.0.3.{i + 2}" for i, pop in enumerate(lab.pop_names)}
        pairs = [f"{self.address[pop]}:{port}={lab.pop_paths(pop).address}:{port}"
                 for pop in lab.pop_names for port in (lab.ports.ssh, lab.ports.https)]
        real = {lab.pop_paths(pop).address: self.address[pop] for pop in lab.pop_names}
        lines = []
        for line in lab.known_hosts.read_text().splitlines():
            hostport, _, key = line.partition(" ")
            addr = hostport.strip("[").split("]")[0]
            if addr in real:
                lines.append(hostport.replace(addr, real[addr]) + " " + key)
        self.known_hosts = work / "known_hosts-far"
        self.known_hosts.write_text("\n".join(lines) + "\n")
        self.spec = work / "far.json"
        self.spec.write_text(json.dumps({"address": self.address, "known_hosts": str(self.known_hosts)}))
        self.proc = subprocess.Popen([sys.executable, str(proxy or Path(__file__).with_name("wanproxy.py")), "--rtt",
                                      str(rtt_ms), *pairs], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("wanproxy did not start")
        _PROXIES.append(self.proc.pid)

    def close(self) -> None:
        _PROXIES.remove(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.spec.parent, ignore_errors=True)


def by_hand(lab: Lab, n: int, version: int, far: FarPops | None = None) -> float:
    """The sequential loop an operator would write; returns its wall time for the first `n` POPs."""
    ca = pki.make_ca("by-hand CA")
    leaf = pki.make_leaf(ca, [NAME])
    files = Path(tempfile.mkdtemp(prefix="certmgr-byhand-"))
    for fname, data in (("fullchain.pem", leaf.cert_pem + ca.cert_pem), ("privkey.pem", leaf.key_pem),
                        ("cert.pem", leaf.cert_pem), ("chain.pem", ca.cert_pem)):
        (files / fname).write_bytes(data)
    (files / "privkey.pem").chmod(0o600)
    port = str(lab.ports.ssh)
    known_hosts = far.known_hosts if far else lab.known_hosts
    opts = ["-i", str(lab.ssh_key), "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    start = time.monotonic()
    for pop in lab.pop_names[:n]:
        p = lab.pop_paths(pop)
        dest = f"{p.cert_root}/archive/{NAME}/byhand{version}"
        target = f"certmgr-deploy@{far.address[pop] if far else p.address}"
        subprocess.run(["ssh", *opts, "-p", port, target, shlex.join(["mkdir", "-p", dest])], check=True)
        subprocess.run(["scp", "-q", *opts, "-P", port, *[str(files / f) for f in sorted(os.listdir(files))],
                        f"{target}:{dest}/"], check=True)
        script = " && ".join([shlex.join(["ln", "-sfn", dest, f"{p.cert_root}/live/{NAME}"]),
                              shlex.join(p.test_command), shlex.join(p.nginx_reload_command)])
        subprocess.run(["ssh", *opts, "-p", port, target, script], check=True, capture_output=True)
    took = time.monotonic() - start
    shutil.rmtree(files, ignore_errors=True)  # the loop's key: not left in /tmp
    return took


def batched(lab: Lab, n: int, k: int, version: int, far: FarPops | None = None) -> float:
    """The batched loop for K certificates: per POP (sequentially) one `scp -r` of the K version dirs and
    one `ssh` doing the K symlink swaps, one nginx -t and one reload. Returns its wall time."""
    ca = pki.make_ca("batched CA")
    top = Path(tempfile.mkdtemp(prefix="certmgr-batched-"))
    names = [name for name, _ in lineages(lab, k)]
    for name, domains in lineages(lab, k):
        leaf = pki.make_leaf(ca, list(domains))
        d = top / f"{name}-batch{version}"
        d.mkdir()
        for fname, data in (("fullchain.pem", leaf.cert_pem + ca.cert_pem), ("privkey.pem", leaf.key_pem),
                            ("cert.pem", leaf.cert_pem), ("chain.pem", ca.cert_pem)):
            (d / fname).write_bytes(data)
        (d / "privkey.pem").chmod(0o600)
    port = str(lab.ports.ssh)
    known_hosts = far.known_hosts if far else lab.known_hosts
    opts = ["-i", str(lab.ssh_key), "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    start = time.monotonic()
    for pop in lab.pop_names[:n]:
        p = lab.pop_paths(pop)
        target = f"certmgr-deploy@{far.address[pop] if far else p.address}"
        subprocess.run(["scp", "-q", "-r", *opts, "-P", port, *[str(top / f"{x}-batch{version}") for x in names],
                        f"{target}:{p.cert_root}/archive/"], check=True)
        swaps = [shlex.join(["ln", "-sfn", f"{p.cert_root}/archive/{x}-batch{version}", f"{p.cert_root}/live/{x}"])
                 for x in names]
        script = " && ".join([*swaps, shlex.join(p.test_command), shlex.join(p.nginx_reload_command)])
        subprocess.run(["ssh", *opts, "-p", port, target, script], check=True, capture_output=True)
    took = time.monotonic() - start
    shutil.rmtree(top, ignore_errors=True)  # the loop's keys: not left in /tmp
    return took


# Where a function's own time is counted in the profile's split: the first pattern its file path contains.
_PARTS = (("asyncssh crypto: ciphers, kex, keys", ("asyncssh/crypto/", "asyncssh/encryption", "asyncssh/mac",
                                                   "asyncssh/kex", "asyncssh/public_key", "asyncssh/ed25519")),
          ("asyncssh protocol: packets, channels, auth", ("asyncssh/",)),
          ("TLS handshakes (certmgr.probe, ssl)", ("certmgr/probe", "/ssl.py")),
          ("certificate checks (certmgr.verify, x509)", ("certmgr/verify", "certmgr/material", "x509")),
          ("certmgr: deploy steps, store, logging", ("certmgr/",)),
          ("asyncio event loop, sockets", ("asyncio/", "selectors.py", "/socket.py")))


def profile_split(path: str, n: int) -> list[tuple[str, float]]:
    """The profile's CPU in parts (ms per POP): each function's own time to the part of its file; C functions
    and `cryptography`'s Python (used by asyncssh and certmgr alike) to their callers' parts, pro rata."""
    st = pstats.Stats(path)
    stats: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}

    def part(fn: Any) -> str | None:
        f = fn[0]
        if f == "~" or "cryptography" in f:
            return None
        return next((name for name, pats in _PARTS if any(p in f for p in pats)), "other Python")

    def charge(fn: Any, amount: float, depth: int = 0) -> None:
        name = part(fn)
        callers = stats[fn][4]
        weight = sum(v[3] for v in callers.values())
        if name is None and depth < 10 and weight > 0:
            for caller, v in callers.items():
                charge(caller, amount * v[3] / weight, depth + 1)
            return
        key = name or "other Python"
        parts[key] = parts.get(key, 0.0) + amount

    for fn, v in stats.items():
        charge(fn, v[2])
    return sorted(((k, v * 1000 / n) for k, v in parts.items()), key=lambda x: -x[1])


def report_profile(path: str, n: int, top: int = 25) -> None:
    st = pstats.Stats(path)
    st.sort_stats("tottime").print_stats(top)
    split = profile_split(path, n)
    total = sum(v for _, v in split)
    print(f"certmgr's CPU inside deploy() by part (cProfile, its own overhead included: {total:.1f} ms per POP)")
    for name, ms in split:
        print(f"  {name:45s} {ms:6.2f} ms per POP ({ms / total * 100:4.1f} %)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "canary", sys.argv[7],
              int(sys.argv[8]), sys.argv[9] if len(sys.argv) > 9 else "-", sys.argv[10] if len(sys.argv) > 10 else "-")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,20,50")
    ap.add_argument("--certs", default="1", help="K certificates per POP, all due: a comma list (e.g. 1,10)")
    ap.add_argument("--names-per-pop", type=int, default=3,
                    help="server blocks (names, each its own certificate) per POP: the lab's shape (3, 50, 200)")
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("CERTMGR_TEST_PORT_BASE", "44200")))
    ap.add_argument("--dir", default=None, help="lab dir (default /tmp/certmgr-lab-deploy-bench-PORTBASE)")
    ap.add_argument("--repeat", type=int, default=3, help="certmgr runs per size; the median is reported")
    ap.add_argument("--no-baseline", action="store_true", help="skip the hand-written loops")
    ap.add_argument("--peers", default="auto",
                    help="hand-written loops beside certmgr, a comma list: batched (one scp -r + one ssh per POP, "
                         "every K), by-hand (ssh mkdir, scp, ssh swap+test+reload; K = 1 only); auto (default): "
                         "by-hand for K = 1, batched for K > 1")
    ap.add_argument("--no-canary", action="store_true", help="skip the canary-first run")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile certmgr's largest run (K max × the largest size) and print its top functions")
    ap.add_argument("--keep", action="store_true", help="leave the lab running")
    ap.add_argument("--wanproxy", default=None, help="the proxy script for --rtt (default benchmarks/wanproxy.py; "
                                                     "another for an A/B of the proxy itself)")
    ap.add_argument("--cgroups", action="store_true",
                    help="also meter CPU per kind (certmgr, the POPs' sshd trees, their nginx, wanproxy) exactly, "
                         "kernel time and unreaped processes included, in cgroup v1 cpuacct groups (root only)")
    ap.add_argument("--reload-by-pid", action="store_true",
                    help="an experiment, not certmgr's default: each POP reloads by `sudo -n kill -HUP <its nginx "
                         "master's pid>` (a sudoers rule per POP for this run), where the default `pkill -F` reads "
                         "the whole machine's process table — on this lab every POP's processes, on a POP its own")
    ap.add_argument("--rtt", type=float, default=0.0,
                    help="milliseconds of round-trip time between certmgr and each POP (benchmarks/wanproxy.py)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    peers = set() if args.no_baseline else set(args.peers.split(","))
    lab = Lab(Path(args.dir or f"/tmp/certmgr-lab-deploy-bench-{args.port_base}"), args.port_base, pops=max(sizes),
              names_per_pop=args.names_per_pop)
    t = time.monotonic()
    for pop in lab.pop_names:  # a stopped POP is seeded afresh by up(): an earlier run's bench lineages are gone
        (lab.pop_paths(pop).conf_d / "bench.conf").unlink(missing_ok=True)
    lab.up()
    lab.reseed()
    print(f"lab: {lab.pops} POPs × {args.names_per_pop} names up and seeded in {time.monotonic() - t:.1f}s "
          f"(port base {args.port_base}; load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    state = Path(tempfile.mkdtemp(prefix="certmgr-bench-state-"))
    far = FarPops(lab, args.rtt, Path(tempfile.mkdtemp(prefix="certmgr-bench-far-")), args.wanproxy) \
        if args.rtt else None
    fs = str(far.spec) if far else "-"
    if far:
        print(f"every POP is {args.rtt:g} ms away (round trip), through benchmarks/wanproxy.py")
    ks = [int(k) for k in args.certs.split(",")]
    add_bench_lineages(lab, max(ks))
    by_pid = Path(f"/etc/sudoers.d/certmgr-bench-{args.port_base}")
    if args.reload_by_pid:
        master = {p: lab.nginx_pid(p) for p in lab.pop_names}
        rules = ", ".join(f"{KILL} -HUP {pid}" for pid in master.values())
        by_pid.write_text(f"# benchmarks/deploy.py --reload-by-pid (removed at its end)\n"
                          f"certmgr-deploy ALL=(root) NOPASSWD: {rules}\n")
        by_pid.chmod(0o440)
        if subprocess.run(["visudo", "-cqf", str(by_pid)], check=False).returncode != 0:
            by_pid.unlink()
            raise SystemExit(f"--reload-by-pid: visudo refused {by_pid}")
        os.environ["CERTMGR_BENCH_RELOAD_PIDS"] = json.dumps(master)
        print("reload: `sudo -n kill -HUP <nginx master pid>` per POP (--reload-by-pid), not pkill's scan")
    if args.cgroups:
        groups = CpuGroups(str(args.port_base), ["certmgr", "sshd", "nginx", "wanproxy"])
        if not groups.ok:
            raise SystemExit("--cgroups: /sys/fs/cgroup/cpuacct is not writable (cgroup v1 cpuacct, as root)")
        groups.move("sshd", [lab.sshd_pid(p) for p in lab.pop_names])
        groups.move("nginx", [lab.nginx_pid(p) for p in lab.pop_names])
        groups.move("wanproxy", _PROXIES)
        _GROUPS.append(groups)
    try:
        big = max(sizes)
        warm = run_child(lab, big, min(big, 50), state, far=fs, k=max(ks))  # converts certbot's layout
        print(f"first deploy (certbot layout converted) of {max(ks)} certificates to {big} POPs: "
              f"{warm['wall']:.2f}s; reloads per POP {warm['reloads'][0]}-{warm['reloads'][1]}")
        med: dict[tuple[int, int], float] = {}
        for k in ks:
            for n in sizes:
                runs = [run_child(lab, n, min(n, 50), state, far=fs, k=k) for _ in range(args.repeat)]
                for r in runs:
                    if r["bad"]:
                        print(f"  {k} cert(s) × {n} POPs: not all deployed: {r['bad'][:3]}")
                walls = sorted(float(r["wall"]) for r in runs)
                rss = max(int(r["rss_kb"]) for r in runs)
                med[k, n] = walls[len(walls) // 2]
                avg = {key: sum(r[key] for r in runs) / len(runs)
                       for key in ("sshd_cpu", "nginx_cpu", "client_cpu", "machine_busy", "load", "forks",
                                   "connections", "channels", "handshakes", "proxy_cpu", "deploy_cpu")}
                srv = avg["sshd_cpu"] + avg["nginx_cpu"]
                lo, hi = min(r["reloads"][0] for r in runs), max(r["reloads"][1] for r in runs)
                print(f"certmgr {k:>2} cert(s) × {n:>2} POPs: median {med[k, n]:.2f}s "
                      f"(runs {', '.join(f'{w:.2f}' for w in walls)}), peak RSS {rss / 1024:.0f} MiB; "
                      f"reloads per POP per run {lo}{'' if lo == hi else f'-{hi}'} (nginx error logs); "
                      f"CPU per POP per deploy: {(srv + avg['client_cpu']) * 1000 / n:.0f} ms "
                      f"(POPs' sshd trees {avg['sshd_cpu'] * 1000 / n:.0f} ms + nginx {avg['nginx_cpu'] * 1000 / n:.0f}"
                      f" ms + certmgr {avg['client_cpu'] * 1000 / n:.0f} ms; whole machine "
                      f"{avg['machine_busy'] * 1000 / n:.0f} ms, other load included"
                      + (f", of it wanproxy {avg['proxy_cpu'] * 1000 / n:.0f} ms and not attributed "
                         f"{(avg['machine_busy'] - srv - avg['client_cpu'] - avg['proxy_cpu']) * 1000 / n:.0f} ms"
                         if _PROXIES else "")
                      + f"); processes started per POP "
                      f"{avg['forks'] / n:.0f} (machine-wide); load avg {avg['load']:.1f} on {os.cpu_count()} cores; "
                      f"per POP: {avg['connections'] / n:.1f} SSH connections, {avg['channels'] / n:.1f} SSH channels, "
                      f"{avg['handshakes'] / n:.1f} TLS handshakes; certmgr's CPU inside deploy() (start-up, "
                      f"keys and store set-up left out) {avg['deploy_cpu'] * 1000 / n:.1f} ms per POP")
                # each host's steps (deploy's own timings), over every run: where the time of a fan-out goes
                steps: dict[str, list[float]] = {}
                for r in runs:
                    for key, secs in r["steps"].items():
                        steps.setdefault(key, []).extend(secs)
                print("    per host, seconds min/median/max: " + ", ".join(
                    f"{key} {min(v):.3f}/{sorted(v)[len(v) // 2]:.3f}/{max(v):.3f}" for key, v in steps.items()))
                if _GROUPS:
                    g = {kd: [sum(r["groups"][kd][j] for r in runs) / len(runs) / n * 1000 for j in (0, 1)]
                         for kd in _GROUPS[0].kinds}
                    total = sum(u + st for u, st in g.values())
                    print("    cgroups, CPU per POP per deploy (user + system): " + ", ".join(
                        f"{kd} {u + st:.1f} ms ({u:.1f} + {st:.1f})" for kd, (u, st) in g.items())
                        + f"; sum {total:.1f} ms of the whole machine's {avg['machine_busy'] * 1000 / n:.0f} ms")
        kk = max(ks)
        if (kk, big) in med:
            conv = warm["wall"] / med[kk, big]
            print(f"target first deploy: converting certbot's layout ≤ 1.5x a normal deploy ({kk} cert(s) × {big} "
                  f"POPs) → {conv:.2f}x ({'met' if conv <= 1.5 else 'NOT met'})")
        k0 = ks[0]
        for n in sizes:
            print(f"  {k0} cert(s): {n:>2} POPs / {sizes[0]} POP(s) = {med[k0, n] / med[k0, sizes[0]]:.2f}x")
        if args.profile:
            prof = str(state.parent / f"certmgr-deploy-{kk}x{big}.prof")
            r = run_child(lab, big, min(big, 50), state, far=fs, k=kk, profile=prof)
            print(f"profile of certmgr {kk} cert(s) × {big} POPs ({r['wall']:.2f}s, certmgr CPU "
                  f"{r['client_cpu'] * 1000 / big:.0f} ms per POP): {prof}")
            report_profile(prof, big)
        if not args.no_canary:
            canary = sorted(float(run_child(lab, big, min(big, 50), state, canary=True, far=fs, k=k0)["wall"])
                            for _ in range(args.repeat))
            print(f"certmgr {k0} cert(s) × {big:>2} POPs, canary first (the default with a canary-tagged POP): "
                  f"median {canary[len(canary) // 2]:.2f}s (runs {', '.join(f'{w:.2f}' for w in canary)})")
        for k in ks:
            for n in sizes:
                auto = "auto" in peers
                if k == 1 and ("by-hand" in peers or auto):
                    loop = by_hand(lab, n, n, far)
                    print(f"by hand  {k:>2} cert(s) × {n:>2} POPs: {loop:.2f}s ({loop / n:.2f}s per POP) → certmgr "
                          f"{loop / med[k, n]:.1f}x faster")
                if "batched" in peers or (auto and k > 1):
                    r0 = {p: lab.reload_count(p) for p in lab.pop_names[:n]}
                    loop = batched(lab, n, k, n, far)
                    rl = sorted(lab.reload_count(p) - r0[p] for p in lab.pop_names[:n])
                    print(f"batched loop {k:>2} cert(s) × {n:>2} POPs: {loop:.2f}s ({loop / n:.2f}s per POP; reloads "
                          f"per POP {rl[0]}-{rl[-1]}) → certmgr {loop / med[k, n]:.1f}x faster")
        if sizes[0] == 1 and big > 1:  # the fan-out needs a one-POP run to compare with
            fan = med[k0, big] / med[k0, 1]
            print(f"target fan-out: {big} POPs ≤ 2x 1 POP (judged at --rtt 50) → {fan:.2f}x "
                  f"({'met' if fan <= 2 else 'NOT met'}{'' if args.rtt else '; this run is on loopback'})")
        if 1 in ks and len(ks) > 1:
            ratio = med[kk, big] / med[1, big]
            print(f"target K: {kk} certificates × {big} POPs ≤ 1.5x 1 certificate × {big} POPs → {ratio:.2f}x "
                  f"({'met' if ratio <= 1.5 else 'NOT met'})")
    finally:
        by_pid.unlink(missing_ok=True)
        for gr in _GROUPS:
            gr.close()
        if far:
            far.close()
        shutil.rmtree(state, ignore_errors=True)  # the benchmark's stores (private keys): not left in /tmp
        if not args.keep:
            lab.reseed()
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
