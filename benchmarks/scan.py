"""Benchmark `certmgr scan` on a running lab: names per POP x POPs; endpoints/s, CPU per process, memory.

Shape: the lab's own server blocks (`python -m lab up --pops 50 --names-per-pop 200`: every name a
server block with its own certificate), all POPs; `--names-per-pop K` beyond the lab's names adds names
no server block has (nginx answers them from its default server), to reach 100,000 endpoints on a
lab this machine can run. Beside it, the common way: a sequential `openssl s_client` loop, timed on
a sample and extrapolated to the same endpoint count. Not a test: it prints figures, asserts nothing.

    .venv/bin/python benchmarks/scan.py --lab-dir /tmp/scan-lab              # the lab's shape
    .venv/bin/python benchmarks/scan.py --lab-dir /tmp/scan-lab --names-per-pop 2000 --workers 2 --naive-sample 0
    .venv/bin/python benchmarks/scan.py --lab-dir /tmp/scan-lab --profile    # where the scanner's time goes
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
from certmgr import report
from certmgr import scan as scan_mod
from lab import Lab


def write_inventory(lab: Lab, names: int | None, pops: int, path: Path) -> tuple[Path, list[str]]:
    """The lab's lineages (or `names` of them, plus names no server block has), on the first `pops` POPs."""
    lab_inv = inv_mod.load(lab.inventory_path)
    hosts = list(lab_inv.hosts.values())[:pops]
    trust = ", ".join(f'"{p}"' for p in lab_inv.trust)
    parts = [f"[defaults]\ntrust = [{trust}]\n",
             '[ca.x]\ndirectory = "https://127.0.0.1:1/dir"\n',
             '[dns.x]\ntype = "rfc2136"\nzones = ["hachyderm.test"]\ntsig_key = "k"\ntsig_secret_env = "UNUSED"\n']
    for h in hosts:
        parts.append(f'[hosts.{h.name}]\naddress = "{h.address}"\nhttps_port = {h.https_port}\n')
    host_list = ", ".join(f'"{h.name}"' for h in hosts)
    lineages = list(lab.certificates)
    want = len(lineages) if names is None else names
    lineages = lineages[:want] + [(f"b{i:05d}.hachyderm.test", (f"b{i:05d}.hachyderm.test",))
                                  for i in range(len(lineages), want)]
    for name, domains in lineages:
        doms = ", ".join(f'"{d}"' for d in domains)
        parts.append(f'[[certificates]]\nname = "{name}"\ndomains = [{doms}]\nhosts = [{host_list}]\n')
    path.write_text("\n".join(parts))
    return path, [d for _, domains in lineages for d in domains]


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _tree_pss_kb() -> tuple[int, int]:
    """(this process, this process + every descendant): PSS, so forked pages shared are counted once."""
    me = os.getpid()
    total, todo = 0, [me]
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo += _children(pid)
    return _pss_kb(me), total


class _Store:
    """save_state's store: one JSON file per certificate, written plainly (not what is measured)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def load_json(self, relpath: str, default: object = None) -> object:
        path = self.root / relpath
        return json.loads(path.read_text()) if path.exists() else default

    def save_json(self, relpath: str, obj: object, **kw: object) -> None:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))


def one_run(inventory: Path, workers: int, concurrency: int, per_address: int) -> dict[str, float]:
    """One scan plus its outputs (JSON, Prometheus textfile, state files) in this process; figures as a dict."""
    import threading

    inv = inv_mod.load(inventory)
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            parent, total = _tree_pss_kb()
            peak[0], peak[1] = max(peak[0], parent), max(peak[1], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = asyncio.run(scan_mod.scan(inv, None, now=dt.datetime.now(dt.UTC), concurrency=concurrency,
                                       per_address=per_address, workers=workers,
                                       timeouts=scan_mod.Timeouts(connect=5, handshake=5)))
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        for piece in scan_mod.json_text(result, {"notifications": []}):
            devnull.write(piece)
        report.write_prometheus(result, Path(tmp) / "scan.prom")
        scan_mod.save_state(_Store(Path(tmp)), result)
        table = report.table(result)
    outputs = time.perf_counter() - t0 - wall
    stop.set()
    sampler.join()
    counts = result.severity_counts()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"endpoints": result.endpoint_count, "wall_s": wall, "eps": result.endpoint_count / wall,
            "outputs_s": outputs, "errors": counts["error"], "table_lines": len(table.splitlines()),
            "cpu_parent_s": me.ru_utime + me.ru_stime, "cpu_workers_s": kids.ru_utime + kids.ru_stime,
            "rss_parent_mb": me.ru_maxrss / 1024, "rss_worker_mb": kids.ru_maxrss / 1024,
            "pss_parent_mb": peak[0] / 1024, "pss_total_mb": peak[1] / 1024}


def nginx_cpu(lab: Lab, pops: int) -> float:
    """CPU seconds used so far by the first N POPs' nginx processes (the server side of each handshake)."""
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


def naive(lab: Lab, sample: int, pops: int, names: list[str]) -> float:
    """Seconds per endpoint for a sequential `openssl s_client` loop (the common shell-script way)."""
    hosts = list(inv_mod.load(lab.inventory_path).hosts.values())[:pops]
    t0 = time.perf_counter()
    for i in range(sample):
        h = hosts[i % len(hosts)]
        subprocess.run(["openssl", "s_client", "-connect", f"{h.address}:{h.https_port}", "-servername",
                        names[(i // len(hosts)) % len(names)]], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=10, check=False)
    return (time.perf_counter() - t0) / sample


def profile(inventory: Path, concurrency: int, per_address: int, top: int = 22) -> None:
    """One scan in one process under cProfile: the functions the scanner's own time goes to."""
    import cProfile
    import pstats

    inv = inv_mod.load(inventory)
    prof = cProfile.Profile(time.process_time)  # CPU, not wall: other processes share these cores
    prof.enable()
    result = asyncio.run(scan_mod.scan(inv, None, now=dt.datetime.now(dt.UTC), concurrency=concurrency,
                                       per_address=per_address, workers=1))
    prof.disable()
    print(f"  profile of one process, {result.endpoint_count} endpoints in {result.elapsed:.2f}s "
          f"(under cProfile, so slower), top {top} by own CPU time (user + system, kernel work in syscalls included):")
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab-dir", default=os.environ.get("CERTMGR_LAB_DIR", "/tmp/certmgr-lab"))
    ap.add_argument("--names-per-pop", "--names", dest="names", type=int, default=None,
                    help="names scanned per POP (default: the lab's, `lab up --names-per-pop`); more than the "
                         "lab has adds names each POP answers from its default server")
    ap.add_argument("--pops", type=int, default=None, help="POPs of the lab to use (default: all)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure (default 1,2)")
    ap.add_argument("--concurrency", type=int, default=400, help="handshakes in flight in total (default 400)")
    ap.add_argument("--per-address", type=int, default=scan_mod.DEFAULT_PER_ADDRESS,
                    help=f"handshakes in flight per POP (default {scan_mod.DEFAULT_PER_ADDRESS})")
    ap.add_argument("--naive-sample", type=int, default=60, help="openssl s_client runs to time (default 60; 0: none)")
    ap.add_argument("--profile", action="store_true", help="also profile one single-process scan")
    ap.add_argument("--one", nargs=4, metavar=("INVENTORY", "WORKERS", "CONCURRENCY", "PER_ADDRESS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(Path(args.one[0]), int(args.one[1]), int(args.one[2]), int(args.one[3]))))
        return 0

    lab = Lab.load(args.lab_dir)
    pops = args.pops or lab.pops
    with tempfile.TemporaryDirectory() as tmp:
        inventory, names = write_inventory(lab, args.names, pops, Path(tmp) / "bench.toml")
        total = len(names) * pops
        served = min(len(names), sum(len(d) for _, d in lab.certificates))
        print(f"scan benchmark: {pops} POPs x {len(names)} names ({lab.names_per_pop} server blocks per POP, "
              f"{served} of the names served by one) = {total} endpoints; concurrency {args.concurrency}, "
              f"{args.per_address} per POP; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        best = None
        for w in (int(x) for x in args.workers.split(",")):
            server_before = nginx_cpu(lab, pops)
            out = subprocess.run([sys.executable, __file__, "--one", str(inventory), str(w), str(args.concurrency),
                                  str(args.per_address)], capture_output=True, text=True, check=True)
            server_cpu = nginx_cpu(lab, pops) - server_before
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = r if best is None or r["eps"] > best["eps"] else best
            n = r["endpoints"]
            print(f"  certmgr scan --workers {w}: {n} endpoints in {r['wall_s']:.2f}s = {r['eps']:.0f}/s, "
                  f"{r['errors']} errors; outputs (JSON, textfile, state) {r['outputs_s']:.2f}s more")
            print(f"    CPU: parent {r['cpu_parent_s']:.1f}s, workers {r['cpu_workers_s']:.1f}s "
                  f"({(r['cpu_parent_s'] + r['cpu_workers_s']) / n * 1e6:.0f} us/handshake with outputs), "
                  f"nginx {server_cpu:.1f}s ({server_cpu / n * 1e6:.0f} us/handshake)")
            print(f"    memory: all processes {r['pss_total_mb']:.0f} MB peak PSS, parent {r['pss_parent_mb']:.0f} MB "
                  f"PSS ({r['rss_parent_mb']:.0f} MB peak RSS), largest worker {r['rss_worker_mb']:.0f} MB peak RSS")
        if args.naive_sample > 0:
            per = naive(lab, args.naive_sample, pops, names)
            print(f"  openssl s_client loop: {1 / per:.0f}/s on {args.naive_sample} endpoints "
                  f"-> {total} endpoints in ~{per * total:.0f}s (extrapolated)")
            assert best is not None
            print(f"  ratio: certmgr is {best['eps'] * per:.0f}x faster than the loop")
        if args.profile:
            profile(inventory, args.concurrency, args.per_address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
