"""Benchmark: `certmgr rollback` on 4 and 50 lab POPs, and `certmgr revoke` (key leaked → new key served everywhere
and the old certificate revoked) on 4 POPs — each one `certmgr` process, timed from start to exit.

    .venv/bin/python benchmarks/rollback.py [--sizes 4,50] [--port-base 26400] [--repeat 3] [--names-per-pop 3]

Per size N, media.hachyderm.test is pointed at the first N POPs (a copy of the lab inventory), two versions are
issued by the lab's Pebble and version 2 is deployed; then `certmgr rollback` (2 → 1) and `certmgr deploy`
(clears the pin, 1 → 2) alternate, `--repeat` times each; the median rollback is reported. The revoke figure
(4 POPs) includes the ACME order with DNS-01, the deploy with handshake verification and the revocation.
Targets (issue 13): rollback 4 POPs ≤ 2 s, 50 POPs ≤ 5 s; revoke 4 POPs ≤ 5 s. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab import Lab  # noqa: E402

NAME = "media.hachyderm.test"


def inventory_for(lab: Lab, n: int, work: Path) -> Path:
    """The lab inventory with media.hachyderm.test on the first `n` POPs only."""
    text = lab.inventory_path.read_text()
    head, sep, tail = text.partition(f'name = "{NAME}"\n')
    assert sep, "media.hachyderm.test not in the lab inventory"
    hosts = "hosts = [" + ", ".join(f'"{p}"' for p in lab.pop_names[:n]) + "]"
    tail = tail.replace('hosts = ["tag:cdn"]', hosts, 1)
    path = work / f"inventory-{n}.toml"
    path.write_text(head + sep + tail)
    return path


def certmgr(inv: Path, state: Path, *args: str) -> tuple[float, str]:
    t = time.monotonic()
    res = subprocess.run([str(REPO / ".venv/bin/certmgr"), "-q", "--inventory", str(inv), "--state-dir", str(state),
                          *args], capture_output=True, text=True, check=False, timeout=600)
    wall = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"certmgr {' '.join(args)} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return wall, res.stdout


class _Chat(http.server.BaseHTTPRequestHandler):
    """The lab's webhook channel, answered at once (204), so chat delivery is part of each figure."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,50")
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("CERTMGR_TEST_PORT_BASE", "26400")))
    ap.add_argument("--dir", default=None, help="lab dir (default /tmp/certmgr-lab-rollback-bench-PORTBASE)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="leave the lab running")
    ap.add_argument("--names-per-pop", type=int, default=3, help="server blocks per POP (the lab's shape)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lab = Lab(Path(args.dir or f"/tmp/certmgr-lab-rollback-bench-{args.port_base}"), args.port_base,
              pops=max(sizes), names_per_pop=args.names_per_pop)
    t = time.monotonic()
    lab.up()
    lab.reseed()
    print(f"lab: {lab.pops} POPs up and seeded in {time.monotonic() - t:.1f}s (port base {args.port_base}); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="certmgr-bench-rollback-"))
    chat = http.server.ThreadingHTTPServer(("127.0.0.1", lab.ports.webhook), _Chat)
    threading.Thread(target=chat.serve_forever, daemon=True).start()
    try:
        for n in sizes:
            inv = inventory_for(lab, n, work)
            state = work / f"state-{n}"
            certmgr(inv, state, "renew", NAME, "--no-deploy")
            certmgr(inv, state, "renew", NAME, "--force")  # version 2, deployed (certbot layout converted)
            walls = []
            for _ in range(args.repeat):
                wall, _ = certmgr(inv, state, "rollback", NAME)
                walls.append(wall)
                certmgr(inv, state, "deploy", NAME)  # clears the pin: version 2 everywhere again
            print(f"rollback {n:>2} POPs: median {statistics.median(walls):.2f} s "
                  f"(runs {', '.join(f'{w:.2f}' for w in walls)}; one certmgr process each, start to exit; "
                  f"load average {os.getloadavg()[0]:.1f})")
        if 4 in sizes:
            inv = inventory_for(lab, 4, work)
            state = work / "state-4"
            walls = []
            for _ in range(args.repeat):
                wall, _ = certmgr(inv, state, "revoke", NAME, "--reason", "keyCompromise")
                walls.append(wall)
            print(f"revoke    4 POPs: median {statistics.median(walls):.2f} s (runs "
                  f"{', '.join(f'{w:.2f}' for w in walls)}; new key ordered with DNS-01, deployed and verified on "
                  f"4 POPs, old certificate revoked)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        chat.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the stores (private keys): not left in /tmp
        if not args.keep:
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
