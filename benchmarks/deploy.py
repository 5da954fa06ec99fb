"""Benchmark: push one certificate to 1, 4, 20 and 50 lab POPs with certmgr, beside the by-hand loop.

    .venv/bin/python benchmarks/deploy.py [--sizes 1,4,20,50] [--port-base 44200] [--rtt MS]

Each certmgr run is a child process (so its peak RSS is its own) that deploys a fresh version of
one lineage to the first N POPs, all at once, after a warm-up run (which converts certbot's layout);
the largest size is also run canary-first, as `certmgr deploy` does with the lab's canary tag. The by-hand
way is a sequential loop per POP: `ssh mkdir`, `scp` the four files, `ssh 'ln -sfn … && sudo nginx -t
&& sudo nginx -s reload'`. Targets: 50 POPs ≤ 3x the time of 1 POP; ≥ 10x faster than the loop at 50.

`--rtt MS` puts every POP behind `benchmarks/wanproxy.py` (SSH and HTTPS), which adds that
round-trip time, as between a control host and real, remote POPs: on loopback the POPs' work is
CPU time on the same two cores as certmgr, while in the field each POP brings its own CPU and
the cost certmgr pays per POP is mostly waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certmgr import inventory as inventory_mod  # noqa: E402
from certmgr.deploy import Status, deploy  # noqa: E402
from certmgr.material import CertMaterial  # noqa: E402
from certmgr.store import Store  # noqa: E402
from lab import Lab, pki  # noqa: E402

NAME = "media.hachyderm.test"


def child(lab_dir: str, n: int, parallel: int, state: str, canary: bool, far: str) -> None:
    """One certmgr deploy of a fresh version to the first `n` POPs; prints JSON with time and peak RSS.

    Without `canary` the lab's canary tag is dropped, so all POPs go at once (a pure fan-out
    measure); with it the canary POP goes first and the rest after it verified.
    """
    lab = Lab.load(lab_dir)
    inv = inventory_mod.load(lab.inventory_path)
    pops = lab.pop_names[:n]
    cert = dataclasses.replace(inv.certificate(NAME), hosts=tuple(pops))
    hosts = dict(inv.hosts)
    if far != "-":  # the POPs seen through wanproxy: {pop: address} and a known_hosts for those addresses
        spec = json.loads(Path(far).read_text())
        hosts = {k: dataclasses.replace(h, address=spec["address"][k], known_hosts=Path(spec["known_hosts"]))
                 if k in spec["address"] else h for k, h in hosts.items()}
    if not canary:
        hosts = {k: dataclasses.replace(h, tags=tuple(t for t in h.tags if t != "canary")) for k, h in hosts.items()}
    store = Store.open(Path(state))
    ca = pki.make_ca("benchmark CA")
    trust = Path(state).parent / "benchmark-ca.pem"  # deploy's certcheck verifies the chain to a trusted root
    trust.write_bytes(ca.cert_pem)
    inv = dataclasses.replace(inv, certificates=(cert,), hosts=hosts, trust=(*inv.trust, trust))
    leaf = pki.make_leaf(ca, list(cert.domains))
    with store.lock("benchmark"):
        store.activate(NAME, store.add_version(NAME, CertMaterial(cert=leaf.cert_pem, chain=ca.cert_pem,
                                                                    privkey=leaf.key_pem)))
        start = time.monotonic()
        outcomes = asyncio.run(deploy(inv, store, [cert], parallel=parallel, now=dt.datetime.now(dt.UTC)))
        wall = time.monotonic() - start
    bad = [o.line() for o in outcomes if o.status != Status.DEPLOYED]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"n": n, "wall": wall, "rss_kb": ru.ru_maxrss, "client_cpu": ru.ru_utime + ru.ru_stime,
                      "deployed": sum(o.status == Status.DEPLOYED for o in outcomes), "bad": bad}))


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


def server_cpu(lab: Lab, n: int) -> float:
    return sum(_proc_cpu(lab.sshd_pid(p)) + _proc_cpu(lab.nginx_pid(p)) for p in lab.pop_names[:n])


def run_child(lab: Lab, n: int, parallel: int, state: Path, canary: bool = False, far: str = "-") -> dict[str, Any]:
    cpu0, busy0 = server_cpu(lab, n), _busy()
    t = time.monotonic()
    res = subprocess.run([sys.executable, __file__, "--child", str(lab.dir), str(n), str(parallel), str(state),
                          "canary" if canary else "all", far],
                         capture_output=True, text=True, check=False, timeout=600)
    total = time.monotonic() - t
    time.sleep(0.3)  # let the POPs' sshd reap their sessions so the children's CPU is counted
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall"] = total
    out["server_cpu"] = server_cpu(lab, n) - cpu0
    out["machine_busy"] = _busy() - busy0
    out["load"] = os.getloadavg()[0]
    return out


class FarPops:
    """wanproxy in front of every POP (SSH and HTTPS): POP i is reached at 127.0.3.(i+2), `rtt_ms` away."""

    def __init__(self, lab: Lab, rtt_ms: float, work: Path) -> None:
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
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("wanproxy.py")), "--rtt",
                                      str(rtt_ms), *pairs], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("wanproxy did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


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
                              shlex.join(p.test_command), shlex.join(p.reload_command)])
        subprocess.run(["ssh", *opts, "-p", port, target, script], check=True, capture_output=True)
    return time.monotonic() - start


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "canary", sys.argv[7])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,20,50")
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("CERTMGR_TEST_PORT_BASE", "44200")))
    ap.add_argument("--dir", default=None, help="lab dir (default /tmp/certmgr-lab-deploy-bench-PORTBASE)")
    ap.add_argument("--repeat", type=int, default=3, help="certmgr runs per size; the median is reported")
    ap.add_argument("--no-baseline", action="store_true", help="skip the by-hand loop")
    ap.add_argument("--keep", action="store_true", help="leave the lab running")
    ap.add_argument("--rtt", type=float, default=0.0,
                    help="milliseconds of round-trip time between certmgr and each POP (benchmarks/wanproxy.py)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lab = Lab(Path(args.dir or f"/tmp/certmgr-lab-deploy-bench-{args.port_base}"), args.port_base, pops=max(sizes))
    t = time.monotonic()
    lab.up()
    lab.reseed()
    print(f"lab: {lab.pops} POPs up and seeded in {time.monotonic() - t:.1f}s (port base {args.port_base})")
    state = Path(tempfile.mkdtemp(prefix="certmgr-bench-state-"))
    far = FarPops(lab, args.rtt, Path(tempfile.mkdtemp(prefix="certmgr-bench-far-"))) if args.rtt else None
    fs = str(far.spec) if far else "-"
    if far:
        print(f"every POP is {args.rtt:g} ms away (round trip), through benchmarks/wanproxy.py")
    try:
        warm = run_child(lab, max(sizes), min(max(sizes), 50), state, far=fs)  # converts certbot's layout everywhere
        print(f"warm-up (certbot layout conversion) to {max(sizes)} POPs: {warm['wall']:.2f}s")
        rows = []
        for n in sizes:
            runs = [run_child(lab, n, min(n, 50), state, far=fs) for _ in range(args.repeat)]
            for r in runs:
                if r["bad"]:
                    print(f"  {n} POPs: not all deployed: {r['bad']}")
            walls = sorted(float(r["wall"]) for r in runs)
            rss = max(int(r["rss_kb"]) for r in runs)
            rows.append((n, walls[len(walls) // 2], walls, rss))
            srv = sum(r["server_cpu"] for r in runs) / len(runs)
            cli = sum(r["client_cpu"] for r in runs) / len(runs)
            busy = sum(r["machine_busy"] for r in runs) / len(runs)
            load = sum(r["load"] for r in runs) / len(runs)
            print(f"certmgr {n:>2} POPs: median {walls[len(walls) // 2]:.2f}s "
                  f"(runs {', '.join(f'{w:.2f}' for w in walls)}), peak RSS {rss / 1024:.0f} MiB; "
                  f"CPU: POPs {srv * 1000 / n:.0f} ms/POP, certmgr {cli:.2f}s, whole machine {busy:.1f}s "
                  f"busy (load avg {load:.1f} on {os.cpu_count()} cores)")
        one = rows[0][1]
        for n, med, _, _ in rows:
            print(f"  {n:>2} POPs / 1 POP = {med / one:.2f}x")
        big = sizes[-1]
        canary = sorted(float(run_child(lab, big, min(big, 50), state, canary=True, far=fs)["wall"])
                        for _ in range(args.repeat))
        print(f"certmgr {big:>2} POPs, canary first (the default with a canary-tagged POP): median "
              f"{canary[len(canary) // 2]:.2f}s (runs {', '.join(f'{w:.2f}' for w in canary)})")
        if not args.no_baseline:
            base = {}
            for n in sizes:
                base[n] = by_hand(lab, n, n, far)
                print(f"by hand {n:>2} POPs: {base[n]:.2f}s ({base[n] / n:.2f}s per POP)")
            print(f"at {big} POPs: certmgr {rows[-1][1]:.2f}s vs by hand {base[big]:.2f}s → "
                  f"{base[big] / rows[-1][1]:.1f}x faster")
        print(f"target 1: {sizes[-1]} POPs ≤ 3x 1 POP → {rows[-1][1] / one:.2f}x "
              f"({'met' if rows[-1][1] <= 3 * one else 'NOT met'})")
    finally:
        if far:
            far.close()
        if not args.keep:
            lab.reseed()
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
