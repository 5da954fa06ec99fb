"""Benchmark: what one deploy costs a POP, on the POP: the CPU of its scripts, by CPU time, not wall.

    .venv/bin/python benchmarks/popside.py [--names-per-pop 50] [--certs 1,10] [--reload sighup|nginx]
        [--repeat 5] [--port-base 15500] [--dir DIR]

Brings up a lab of ONE POP with N names (each its own certificate, in certbot's layout) and runs
deploy's POP scripts on it as deploy would, without SSH or certmgr's controller: per run one
inspect.sh and one commit.sh (K certificates, their files on the commit's stdin, the real test and
reload commands through sudo). It reports the CPU of every process each script run starts (the
shell, coreutils, sudo, `nginx -t`, the reload command: getrusage of the reaped children, exact —
not 10 ms accounting ticks), for the first deploy (which converts certbot's layout and runs the
preflight test) and the median of the steady ones. The processes per run are counted exactly by
tests/unit/test_pop_processes.py.
Not in it: sshd, certmgr, and the nginx master's own reload (the same whatever the scripts do).

`--reload nginx` reloads with `nginx -s reload` (which parses the whole configuration, every
certificate, in the client before signalling); `sighup` (the lab's reload_command) with `pkill
-HUP -F nginx.pid -x nginx`. Run it from two worktrees for an A/B of the scripts: CPU time is
steady under the load of other jobs, wall time is not; `--scripts-from TREE` runs another
worktree's scripts (e.g. the base of an A/B) with this tree's lab.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certmgr.deploy import COMMIT_SH, FILE_ORDER, INSPECT_SH, sha256sums  # noqa: E402
from certmgr.deploy.steps import upload_archive  # noqa: E402
from certmgr.material import CertMaterial  # noqa: E402
from certmgr.remote import parse_kv, sh_command  # noqa: E402
from lab import Lab, pki  # noqa: E402


def run(argv: list[str], data: bytes = b"") -> tuple[str, float]:
    """(stdout, CPU ms of argv and of everything it started and reaped)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, input=data, capture_output=True, check=False, timeout=120)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1000
    out = proc.stdout.decode()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:2]} exited {proc.returncode}: {out[-400:]} {proc.stderr.decode()[-400:]}")
    return out, cpu


def scripts(tree: str | None) -> tuple[str, str]:
    """(INSPECT_SH, COMMIT_SH) of this tree, or of another worktree's certmgr package."""
    if tree is None:
        return INSPECT_SH, COMMIT_SH
    code = "import json; from certmgr.deploy import COMMIT_SH, INSPECT_SH; print(json.dumps([INSPECT_SH, COMMIT_SH]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True).stdout
    inspect_sh, commit_sh = json.loads(out)
    return str(inspect_sh), str(commit_sh)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names-per-pop", type=int, default=50)
    ap.add_argument("--certs", default="1,10")
    ap.add_argument("--reload", choices=("sighup", "nginx"), default="sighup")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("CERTMGR_BENCH_PORT_BASE", "15500")))
    ap.add_argument("--dir", default=None)
    ap.add_argument("--scripts-from", default=None, help="a worktree whose POP scripts to run (default: this one)")
    args = ap.parse_args()
    inspect_sh, commit_sh = scripts(args.scripts_from)
    lab = Lab(Path(args.dir or f"/tmp/certmgr-lab-popside-{args.port_base}"), args.port_base, pops=1,
              names_per_pop=args.names_per_pop)
    lab.up()
    try:
        p = lab.pop_paths(lab.pop_names[0])
        root = p.cert_root
        test = " ".join(p.test_command)
        reload = " ".join(p.reload_command if args.reload == "sighup" else p.nginx_reload_command)
        names = sorted(n for n in os.listdir(root / "live") if not n.startswith("."))
        ca = pki.make_ca("popside CA")
        version = 100
        print(f"1 POP × {args.names_per_pop} names, reload {args.reload}, scripts of {args.scripts_from or REPO}; "
              f"CPU ms of the POP's scripts per deploy; load avg {os.getloadavg()[0]:.1f}")
        for k in (int(x) for x in args.certs.split(",")):
            ns = names[:k]
            mats = {}
            for n in ns:
                leaf = pki.make_leaf(ca, [n])
                mats[n] = CertMaterial(cert=leaf.cert_pem, chain=ca.cert_pem, privkey=leaf.key_pem)
            rows = []
            for i in range(args.repeat + 1):
                conv = "1" if i == 0 else ""  # the first deploy converts certbot's layout (its version 1)
                out, c1 = run(["sh", "-c", sh_command(inspect_sh, [str(root), ns[0], test, "", "30", "", *ns[1:]])])
                preflight = parse_kv(out).get("preflight", [""])[-1] != "skipped"
                five: list[str] = []
                blobs: list[bytes] = []
                for n in ns:
                    # the live link's target as inspect read it, ahead of the sums, as deploy sends it
                    # (steps.link_line; an older tree's scripts would take it for a sum: none there)
                    live = root / "live" / n
                    link = f"link {os.readlink(live)}\n" if live.is_symlink() and "c_want_" in commit_sh else ""
                    five += [n, f".tmp-up-popside-{version}-{n}", str(version), link + sha256sums(mats[n]), conv]
                    blobs += [mats[n].files()[f] for f in FILE_ORDER]
                if "| tar -x" in commit_sh:  # one tar archive (receive.sh since issue 13 §1's third pass)
                    data = upload_archive([(n, f".tmp-up-popside-{version}-{n}", version, mats[n].files()) for n in ns],
                                          mtime=0)
                    sizes = str(len(data))
                else:  # an older tree's scripts: the files one after another, their sizes
                    data = b"".join(blobs)
                    sizes = " ".join(str(len(b)) for b in blobs)
                argv = [str(root), *five[:5], test, reload, "", "popside", "stamp", "30", "", "", sizes, *five[5:]]
                out, c2 = run(["sh", "-c", sh_command(commit_sh, argv)], data + b"go\n")
                if "done=1" not in out:
                    raise SystemExit(f"commit did not finish: {out[-600:]}")
                version += 1
                rows.append((c1, c2, preflight))
            f = rows[0]
            steady = rows[1:]
            med = [statistics.median(float(r[j]) for r in steady) for j in range(2)]
            print(f"  K={k:2}: first deploy (certbot converted, preflight {'run' if f[2] else 'skipped'}): inspect "
                  f"{f[0]:.0f} + commit {f[1]:.0f} = {f[0] + f[1]:.0f} ms; steady, median of {args.repeat} "
                  f"(preflight {'run' if steady[0][2] else 'skipped'}): inspect {med[0]:.0f} + commit {med[1]:.0f} = "
                  f"{med[0] + med[1]:.0f} ms")
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
