"""Benchmark: `certmgr discover` over 4, 20 and 50 lab POPs (the messy profile on the first four).

    .venv/bin/python benchmarks/discover.py [--sizes 4,20,50] [--port-base 26300] [--dir /tmp/certmgr-bench-discover]

Per POP discover opens one SSH connection, runs `sudo nginx -T`, parses it with crossplane, reads
the certificate files and checks their keys on the POP (two short remote scripts) and handshakes
every (port, name). Each size runs 3 times (after a warm-up); the median wall time is printed with
this process's CPU time. Target: 50 POPs ≤ 3 s on the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certmgr import inventory as inventory_mod  # noqa: E402
from certmgr.discover.collect import discover  # noqa: E402
from lab import Lab, messy  # noqa: E402


def run(lab: Lab, n: int, parallel: int) -> tuple[float, float, int, int]:
    inv = inventory_mod.load(lab.inventory_path)
    hosts = [inv.hosts[name] for name in lab.pop_names[:n]]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    report = asyncio.run(discover(inv, hosts, now=dt.datetime.now(dt.UTC), parallel=parallel))
    wall = time.monotonic() - start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return wall, cpu, len(report.errors), len(report.bindings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,20,50")
    ap.add_argument("--port-base", type=int, default=26300)
    ap.add_argument("--dir", default="/tmp/certmgr-bench-discover")
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="leave the lab running")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lab = Lab(args.dir, args.port_base, pops=max(sizes))
    t = time.monotonic()
    messy.remove(lab, reload=False)  # a profile left by an earlier run would refer to files `up` reseeds away
    lab.up()
    print(f"lab with {lab.pops} POPs up in {time.monotonic() - t:.1f}s")
    try:
        messy.apply(lab)
        run(lab, sizes[-1], args.parallel)  # warm-up: first SSH connections, page cache
        print(f"{'POPs':>5} {'wall (median of 3)':>20} {'runs':>24} {'certmgr CPU':>12} {'bindings':>9} {'errors':>7}")
        for n in sizes:
            runs = [run(lab, n, args.parallel) for _ in range(3)]
            walls = [r[0] for r in runs]
            print(f"{n:>5} {statistics.median(walls):>19.2f}s {', '.join(f'{w:.2f}' for w in walls):>24} "
                  f"{statistics.median(r[1] for r in runs):>11.2f}s {runs[0][3]:>9} {runs[0][2]:>7}")
    finally:
        if not args.keep:
            messy.remove(lab, reload=False)
            lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
