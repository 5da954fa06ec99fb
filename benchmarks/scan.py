"""Benchmark `certmgr scan`: K names x N POPs of a running lab; endpoints/s, wall time, peak RSS.

Compares with the common way (a sequential `openssl s_client` loop) on a small sample,
extrapolated to the same endpoint count. Not a test: it prints figures and asserts nothing.

    .venv/bin/python benchmarks/scan.py --lab-dir /tmp/scan-lab --names 2500 --pops 4
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certmgr import inventory as inv_mod
from certmgr import scan as scan_mod
from lab import Lab


def write_inventory(lab: Lab, names: int, pops: int, path: Path) -> Path:
    """K single-name certificates, each deployed to the first N POPs (unknown SNI: nginx's default server)."""
    lab_inv = inv_mod.load(lab.inventory_path)
    hosts = list(lab_inv.hosts.values())[:pops]
    trust = ", ".join(f'"{p}"' for p in lab_inv.trust)
    parts = [f"[defaults]\ntrust = [{trust}]\n",
             '[ca.x]\ndirectory = "https://127.0.0.1:1/dir"\n',
             '[dns.x]\ntype = "rfc2136"\nzones = ["hachyderm.test"]\ntsig_key = "k"\ntsig_secret_env = "UNUSED"\n']
    for h in hosts:
        parts.append(f'[hosts.{h.name}]\naddress = "{h.address}"\nhttps_port = {h.https_port}\n')
    host_list = ", ".join(f'"{h.name}"' for h in hosts)
    for i in range(names):
        parts.append(f'[[certificates]]\nname = "b{i:05d}.hachyderm.test"\ndomains = ["b{i:05d}.hachyderm.test"]\n'
                     f"hosts = [{host_list}]\n")
    path.write_text("\n".join(parts))
    return path


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_pss_kb() -> int:
    """Proportional set size of this process plus its children: shared (forked) pages counted once."""
    me = os.getpid()
    kids: list[int] = []
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return _pss_kb(me) + sum(_pss_kb(k) for k in kids)


def one_run(inventory: Path, workers: int, concurrency: int) -> dict[str, float]:
    """Run one scan in this process; print figures as JSON (called in a fresh subprocess per config)."""
    import threading

    inv = inv_mod.load(inventory)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _tree_pss_kb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = asyncio.run(scan_mod.scan(inv, None, now=dt.datetime.now(dt.UTC), concurrency=concurrency,
                                       workers=workers,
                                       timeouts=scan_mod.Timeouts(connect=5, handshake=5)))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    errors = sum(1 for r in result.endpoints if r.error)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest single worker
    return {"endpoints": len(result.endpoints), "wall_s": wall, "eps": len(result.endpoints) / wall,
            "errors": errors, "cpu_s": cpu, "rss_parent_mb": self_kb / 1024, "pss_total_mb": peak[0] / 1024,
            "rss_worker_mb": child_kb / 1024}


def nginx_cpu(lab: Lab, pops: int) -> float:
    """CPU seconds used so far by the first N POPs' nginx workers (the server side of each handshake)."""
    from lab.proc import descendants

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for name in lab.pop_names[:pops]:
        master = lab.nginx_pid(name)
        for pid in [master, *descendants(master)] if master else []:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def naive(lab: Lab, sample: int, pops: int) -> float:
    """Seconds per endpoint for a sequential `openssl s_client` loop (the common shell-script way)."""
    hosts = list(inv_mod.load(lab.inventory_path).hosts.values())[:pops]
    t0 = time.perf_counter()
    for i in range(sample):
        h = hosts[i % len(hosts)]
        subprocess.run(["openssl", "s_client", "-connect", f"{h.address}:{h.https_port}", "-servername",
                        f"b{i:05d}.hachyderm.test"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                       check=False)
    return (time.perf_counter() - t0) / sample


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab-dir", default=os.environ.get("CERTMGR_LAB_DIR", "/tmp/certmgr-lab"))
    ap.add_argument("--names", type=int, default=2500, help="K certificate names (default 2500)")
    ap.add_argument("--pops", type=int, default=4, help="N POPs of the lab to use (default 4)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure (default 1,2)")
    ap.add_argument("--concurrency", type=int, default=400, help="handshakes in flight in total (default 400)")
    ap.add_argument("--naive-sample", type=int, default=60, help="openssl s_client runs to time (default 60)")
    ap.add_argument("--one", nargs=3, metavar=("INVENTORY", "WORKERS", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(Path(args.one[0]), int(args.one[1]), int(args.one[2]))))
        return 0

    lab = Lab.load(args.lab_dir)
    with tempfile.TemporaryDirectory() as tmp:
        inventory = write_inventory(lab, args.names, args.pops, Path(tmp) / "bench.toml")
        total = args.names * args.pops
        print(f"scan benchmark: {args.names} names x {args.pops} POPs = {total} endpoints, "
              f"concurrency {args.concurrency}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        best = None
        for w in (int(x) for x in args.workers.split(",")):
            server_before = nginx_cpu(lab, args.pops)
            out = subprocess.run([sys.executable, __file__, "--one", str(inventory), str(w), str(args.concurrency)],
                                 capture_output=True, text=True, check=True)
            server_cpu = nginx_cpu(lab, args.pops) - server_before
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = r if best is None or r["eps"] > best["eps"] else best
            print(f"  certmgr scan --workers {w}: {r['endpoints']} endpoints in {r['wall_s']:.2f}s = "
                  f"{r['eps']:.0f}/s, {r['errors']} errors, scanner CPU {r['cpu_s']:.1f}s "
                  f"({r['cpu_s'] / r['endpoints'] * 1e6:.0f} us/handshake), "
                  f"peak RSS parent {r['rss_parent_mb']:.0f} MB, "
                  f"largest worker {r['rss_worker_mb']:.0f} MB, all processes (PSS) {r['pss_total_mb']:.0f} MB; "
                  f"nginx CPU {server_cpu:.1f}s "
                  f"({server_cpu / r['endpoints'] * 1e6:.0f} us/handshake)")
        per = naive(lab, args.naive_sample, args.pops)
        print(f"  openssl s_client loop: {1 / per:.0f}/s on {args.naive_sample} endpoints "
              f"-> {total} endpoints in ~{per * total:.0f}s (extrapolated)")
        assert best is not None
        print(f"  ratio: certmgr is {best['eps'] * per:.0f}x faster "
              f"(target: 10000 endpoints <= 8s, i.e. >= 1250/s; peak RSS <= 150 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
