"""Benchmark: CPU of one SSH connection and one command, on both ends: certmgr (this process) and the POP's sshd tree.

    .venv/bin/python -m lab up --dir /tmp/certmgr-bench-ssh --port-base 15000 --pops 1
    .venv/bin/python benchmarks/sshconn.py --lab-dir /tmp/certmgr-bench-ssh [--connections 40]
        [--commands true,test,reload] [--variants default,curve25519,nistp256,chacha20]

For each command and variant, `--connections` connections in turn to the lab's first POP through
certmgr.remote.connect (strict host keys, certmgr's algorithm choices), each running the command
once. The POP's side is metered exactly with a cgroup v1 cpuacct group holding its sshd master (so
every process a connection starts — sshd's per-connection processes, the login shell, `sudo`, the
command — counts, kernel time included; procmeter.CpuGroups, root only); certmgr's with
getrusage. Commands: `true`, `test` (the POP's `sudo -n nginx -t`), `reload` (its
reload_command: the lab's `sudo -n pkill -HUP`), or any other text, run as given. Variants change
one of certmgr's connection options: the key exchange (`curve25519`, `nistp256`) or the cipher
(`chacha20`). Two rounds, interleaved; each line is one round.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmeter import CpuGroups  # noqa: E402

from certmgr import inventory as inventory_mod  # noqa: E402
from certmgr import remote  # noqa: E402
from lab import Lab  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "curve25519": {"kex_algs": ["curve25519-sha256"]},
    "nistp256": {"kex_algs": ["ecdh-sha2-nistp256"]},
    "chacha20": {"encryption_algs": ["chacha20-poly1305@openssh.com"]},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab-dir", required=True)
    ap.add_argument("--connections", type=int, default=40)
    ap.add_argument("--commands", default="true,test,reload")
    ap.add_argument("--variants", default="default")
    args = ap.parse_args()
    lab = Lab.load(args.lab_dir)
    pop = lab.pop_names[0]
    host = inventory_mod.load(lab.inventory_path).hosts[pop]
    paths = lab.pop_paths(pop)
    named = {"true": "true", "test": shlex.join(paths.test_command), "reload": shlex.join(paths.reload_command)}
    groups = CpuGroups(f"sshconn-{lab.ports.ssh}", ["sshd"])
    if not groups.ok:
        raise SystemExit("needs root: cgroup v1 cpuacct at /sys/fs/cgroup/cpuacct")
    groups.move("sshd", [lab.sshd_pid(pop)])
    connect = remote.asyncssh.connect

    async def run(command: str, options: dict[str, Any]) -> None:
        async def with_options(*a: Any, **kw: Any) -> Any:
            return await connect(*a, **{**kw, **options})

        remote.asyncssh.connect = with_options  # type: ignore[assignment]
        try:
            for _ in range(args.connections):
                async with remote.connect(host) as r:
                    proc = await r.conn.run(command, check=False, stdin=remote.asyncssh.DEVNULL)
                    if proc.exit_status != 0:
                        raise SystemExit(f"{command!r} exited {proc.exit_status}: {proc.stderr!r}")
        finally:
            remote.asyncssh.connect = connect  # type: ignore[assignment]

    print(f"{args.connections} connections per line, one after another, to {pop}; load avg "
          f"{Path('/proc/loadavg').read_text().split()[0]} on 2 cores; ms per connection")
    try:
        for _round in range(2):
            for cmd in args.commands.split(","):
                for variant in args.variants.split(","):
                    s0, c0, t = groups.read()["sshd"], resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                    asyncio.run(run(named.get(cmd, cmd), VARIANTS[variant]))
                    wall = time.monotonic() - t
                    s1, c1 = groups.read()["sshd"], resource.getrusage(resource.RUSAGE_SELF)
                    n = args.connections
                    client = (c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime) / n * 1000
                    user, system = ((s1[i] - s0[i]) / n * 1000 for i in (0, 1))
                    print(f"  {cmd:8s} {variant:10s}: certmgr {client:5.2f}, POP's sshd tree {user + system:6.2f} "
                          f"({user:.2f} user + {system:.2f} system); wall {wall / n * 1000:.0f}")
    finally:
        groups.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
