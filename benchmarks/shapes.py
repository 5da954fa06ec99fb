"""The fleet's shapes (POPs × names per POP), each beside its peer: one table, and where the CPU goes.

`benchmarks/run shapes` calls this once per shape and step, then once to print:

    shapes.py scan   --results R.json --lab-dir D [--quick]      # scan.py on a running lab, openssl loop beside
                                                                  # it; then `certmgr discover` of its POPs
    shapes.py deploy --results R.json --shape 50x50 --port-base B --dir D [--quick]
                                                                  # benchmarks/deploy.py as a black box
    shapes.py table  --results R.json                             # the table and the CPU breakdown

Each step runs the existing benchmark script as a child, reads its printed figures, and meters
the CPU of every process it and the lab's POPs run, per phase (`benchmarks/procmeter.py`: /proc for
live processes, process accounting for those that exit). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from procmeter import Meter  # noqa: E402

from lab import Lab  # noqa: E402

POP_KINDS = ("sshd", "sudo", "nginx", "shells", "sftp-server", "openssl", "other")  # openssl: discover's, on the POP
KINDS = ("certmgr", "sshd", "sudo", "nginx", "shells", "openssl", "sftp-server", "ssh/scp (loop)", "other")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"shapes": {}}


def _save(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1))


def _stream(argv: list[str], on_line: Any) -> int:
    """Run `argv`, echo its output indented, call on_line(line) as each line arrives."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        print("  | " + line.rstrip(), flush=True)
        on_line(line.rstrip())
    return proc.wait()


def _phase(meter: Meter, label: str, runs: int = 1) -> dict[str, Any]:
    cpu = meter.mark(label)
    return {"cpu": {k: v / runs for k, v in cpu.items() if v > 0}, "exited": dict(meter.exited[label]),
            "pop_total_s": meter.pop_total[label] / runs, "runs": runs}


def do_scan(args: argparse.Namespace) -> None:
    lab = Lab.load(args.lab_dir)
    shape = f"{lab.pops}x{lab.names_per_pop}"
    meter = Meter()
    meter.add_roots([lab.sshd_pid(p) for p in lab.pop_names] + [lab.nginx_pid(p) for p in lab.pop_names])
    out: dict[str, Any] = {"load_start": os.getloadavg()[0], "phases": {}, "runs": {}}
    argv = [sys.executable, str(HERE / "scan.py"), "--lab-dir", args.lab_dir,
            "--workers", "2" if args.quick else "1,2", "--naive-sample", "20" if args.quick else "60"]
    if args.profile:
        argv.append("--profile")
    state = {"w": None}

    def on_line(line: str) -> None:
        if m := re.match(r"\s*certmgr scan --workers (\d+): (\d+) endpoints in ([\d.]+)s", line):
            state["w"] = m.group(1)
            out["runs"][m.group(1)] = {"endpoints": int(m.group(2)), "wall_s": float(m.group(3))}
        elif (m := re.match(r"\s*memory: all processes (\d+) MB peak PSS, parent (\d+) MB", line)) and state["w"]:
            w = state["w"]
            out["runs"][w].update(pss_total_mb=int(m.group(1)), pss_parent_mb=int(m.group(2)))
            out["phases"][f"scan, {w} worker(s)"] = _phase(meter, f"scan w{w}")
            state["w"] = None
        elif m := re.match(r"\s*openssl s_client loop: (\d+)/s on (\d+) endpoints -> (\d+) endpoints in ~(\d+)s", line):
            out["openssl"] = {"per_s": int(m.group(1)), "sample": int(m.group(2)), "extrapolated_s": int(m.group(4))}
            out["phases"]["openssl s_client loop"] = _phase(meter, "openssl", int(m.group(2)))
            out["phases"]["openssl s_client loop"]["per"] = "endpoint"
    try:
        rc = _stream(argv, on_line)
        if not args.no_discover:  # cheap: one SSH connection and `sudo nginx -T` per POP
            res = subprocess.run([sys.executable, __file__, "discover-child", "--results", "-", "--lab-dir",
                                  args.lab_dir], capture_output=True, text=True, check=False)
            if res.returncode == 0:
                out["discover"] = json.loads(res.stdout.strip().splitlines()[-1])
                out["phases"]["certmgr discover, all POPs"] = _phase(meter, "discover")
                print(f"  certmgr discover of {lab.pops} POPs: {out['discover']['wall_s']:.2f}s, "
                      f"{out['discover']['bindings']} host bindings, {out['discover']['errors']} errors")
            else:
                print(f"  certmgr discover failed:\n{res.stderr}")
    finally:
        meter.close()
    out["load_end"] = os.getloadavg()[0]
    out["rc"] = rc
    data = _load(args.results)
    data["shapes"].setdefault(shape, {})["scan"] = out
    _save(args.results, data)


def do_discover_child(args: argparse.Namespace) -> None:
    """`certmgr discover` over every POP of the lab, in this (child) process; prints JSON."""
    import asyncio
    import datetime as dt

    from certmgr import inventory as inventory_mod
    from certmgr.discover.collect import discover

    lab = Lab.load(args.lab_dir)
    inv = inventory_mod.load(lab.inventory_path)
    hosts = [inv.hosts[name] for name in lab.pop_names]
    start = time.monotonic()
    report = asyncio.run(discover(inv, hosts, now=dt.datetime.now(dt.UTC), parallel=50))
    print(json.dumps({"wall_s": time.monotonic() - start, "bindings": len(report.bindings),
                      "errors": len(report.errors)}))


def _has_flag(script: Path, flag: str) -> bool:
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=False)
    return flag in res.stdout


def do_deploy(args: argparse.Namespace) -> None:
    pops, names = (int(x) for x in args.shape.split("x"))
    script = HERE / "deploy.py"
    repeat = 1 if args.quick else 3
    argv = [sys.executable, str(script), "--sizes", str(pops), "--certs", "1,10", "--repeat", str(repeat),
            "--port-base", str(args.port_base), "--dir", args.dir]
    out: dict[str, Any] = {"load_start": os.getloadavg()[0], "phases": {}, "figures": {}}
    if names != 3:
        if not _has_flag(script, "--names-per-pop"):
            out["skipped"] = "benchmarks/deploy.py takes no --names-per-pop yet (its lab serves 3 names per POP)"
            print(f"deploy at {args.shape}: not measured: {out['skipped']}")
            data = _load(args.results)
            data["shapes"].setdefault(args.shape, {})["deploy"] = out
            _save(args.results, data)
            return
        argv += ["--names-per-pop", str(names)]
    meter = Meter()
    fig = out["figures"]

    def on_line(line: str) -> None:
        if line.startswith("lab:"):
            lab = Lab.load(args.dir)
            meter.add_roots([lab.sshd_pid(p) for p in lab.pop_names] + [lab.nginx_pid(p) for p in lab.pop_names])
            out["phases"]["lab up"] = _phase(meter, "lab up")
        elif m := re.match(r"(?:warm-up|first deploy) .*?: ([\d.]+)s", line):
            fig["first_deploy_10_s"] = float(m.group(1))
            out["phases"]["certmgr first deploy, 10 certs (converts certbot's layout)"] = _phase(meter, "warm")
        elif m := re.match(r"certmgr\s+(\d+) cert\(s\) × +(\d+) POPs: median ([\d.]+)s", line):
            k = m.group(1)
            fig[f"certmgr_{k}_s"] = float(m.group(3))
            if r := re.search(r"reloads per POP per run ([\d-]+)", line):
                fig[f"reloads_{k}"] = r.group(1)
            out["phases"][f"certmgr deploy, {k} cert(s)"] = _phase(meter, f"certmgr {k}", repeat)
        elif re.match(r"certmgr\s+\d+ cert\(s\) × +\d+ POPs, canary first", line):
            _phase(meter, "canary")
        elif m := re.match(r"(by hand|batched loop)\s+(\d+) cert\(s\) × +\d+ POPs: ([\d.]+)s", line):
            k = m.group(2)
            fig[f"loop_{k}_s"] = float(m.group(3))
            out["phases"][f"{m.group(1)}, {k} cert(s)"] = _phase(meter, f"loop {k}")
    try:
        out["rc"] = _stream(argv, on_line)
    finally:
        meter.close()
    out["load_end"] = os.getloadavg()[0]
    data = _load(args.results)
    data["shapes"].setdefault(args.shape, {})["deploy"] = out
    _save(args.results, data)


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def do_table(args: argparse.Namespace) -> None:
    data = _load(args.results)
    print(f"fleet shapes ({os.cpu_count()} CPUs; load average at each step's start → end)\n")
    print("| shape (POPs × names) | work | certmgr | peer | peer is | certmgr vs peer | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, d in data["shapes"].items():
        sc = d.get("scan")
        if sc and sc.get("runs"):
            best = min(sc["runs"].values(), key=lambda r: r["wall_s"])
            w = min(sc["runs"], key=lambda k: sc["runs"][k]["wall_s"])
            loop = sc.get("openssl", {}).get("extrapolated_s")
            ratio = f"{loop / best['wall_s']:.0f}× faster" if loop else "–"
            print(f"| {shape.replace('x', ' × ')} | scan {best['endpoints']:,} endpoints ({w} worker(s); "
                  f"{best.get('pss_total_mb', '?')} MB all processes) | {_s(best['wall_s'])} | ~{_s(loop)} | "
                  f"sequential `openssl s_client` loop, {sc.get('openssl', {}).get('sample', 0)} timed, "
                  f"extrapolated | {ratio} | {sc['load_start']:.1f} → {sc['load_end']:.1f} |")
        if sc and sc.get("discover"):
            dc = sc["discover"]
            print(f"| {shape.replace('x', ' × ')} | discover {shape.split('x')[0]} POPs ({dc['bindings']} host "
                  f"bindings, {dc['errors']} errors) | {_s(dc['wall_s'])} | – | no peer run | – | |")
        dp = d.get("deploy")
        if dp and dp.get("skipped"):
            print(f"| {shape.replace('x', ' × ')} | deploy | not measured | | | {dp['skipped']} | |")
        elif dp:
            f = dp["figures"]
            for k, peer in (("1", "by-hand loop (ssh mkdir, scp, ssh swap+test+reload)"),
                            ("10", "batched loop (one scp -r + one ssh per POP)")):
                c, lp = f.get(f"certmgr_{k}_s"), f.get(f"loop_{k}_s")
                ratio = (f"{lp / c:.1f}× faster" if lp >= c else f"{c / lp:.1f}× slower") if c and lp else "–"
                print(f"| {shape.replace('x', ' × ')} | deploy {k} cert(s) → {shape.split('x')[0]} POPs "
                      f"(reloads/POP {f.get(f'reloads_{k}', '?')}) | {_s(c)} | {_s(lp)} | {peer} | {ratio} | "
                      f"{dp['load_start']:.1f} → {dp['load_end']:.1f} |")
            first, normal = f.get("first_deploy_10_s"), f.get("certmgr_10_s")
            if first and normal:
                print(f"| {shape.replace('x', ' × ')} | first deploy, 10 certs (certbot layout converted) | "
                      f"{_s(first)} | | | {first / normal:.2f}× a normal one | |")
    print("\nwhere the CPU goes: seconds per run (scan, deploy) or per endpoint (openssl loop), by process kind; "
          "the POPs' /proc total = their live sshd and nginx, own CPU plus all they reaped (/proc); it misses "
          "processes reparented away from them (it reads below the per-kind sum in some phases); the per-kind "
          "columns read exited processes from process accounting, in whole 10 ms ticks, truncated, so short "
          "processes read low; 'unattributed' = the /proc total minus the per-kind POP sum when positive; "
          "`certmgr` is every Python process of the benchmark (in a loop's phase: the driver)\n")
    print("| shape | phase | " + " | ".join(KINDS) + " | POPs' /proc total | unattributed "
          "| exited processes |")
    print("| --- | --- | " + " | ".join("---" for _ in KINDS) + " | --- | --- | --- |")
    for shape, d in data["shapes"].items():
        for step in ("scan", "deploy"):
            for label, ph in (d.get(step) or {}).get("phases", {}).items():
                cells = " | ".join(f"{ph['cpu'][k]:.3f}" if ph["cpu"].get(k) else "" for k in KINDS)
                ex = ", ".join(f"{k} {n}" for k, n in sorted(ph["exited"].items(), key=lambda x: -x[1]))
                seen = sum(v for k, v in ph["cpu"].items() if k in POP_KINDS)
                gap = max(0.0, ph["pop_total_s"] - seen)
                print(f"| {shape.replace('x', ' × ')} | {label} | {cells} | {ph['pop_total_s']:.3f} | {gap:.3f} "
                      f"| {ex} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("scan", "deploy", "table", "discover-child"))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--lab-dir")
    ap.add_argument("--shape", help="POPSxNAMES, for deploy")
    ap.add_argument("--port-base", type=int)
    ap.add_argument("--dir")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller openssl sample")
    ap.add_argument("--profile", action="store_true", help="scan: also cProfile one single-process scan")
    ap.add_argument("--no-discover", action="store_true", help="scan: skip `certmgr discover` on the lab")
    args = ap.parse_args()
    {"scan": do_scan, "deploy": do_deploy, "table": do_table, "discover-child": do_discover_child}[args.step](args)
    return 0


if __name__ == "__main__":
    start = time.monotonic()
    rc = main()
    sys.exit(rc)
