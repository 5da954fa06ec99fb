"""`python -m tests.soak --duration 60m --pops 20 --seed S [--controllers 2]`: the long soak on a lab of its own.

See scripts/soak. `--controllers 2`: two controllers on a PostgreSQL store of the soak's own (tests/soak/ha.py).

Prints the report; exits 1 when any invariant was violated. The lab lives in a fresh /tmp dir on
ports from $CERTMGR_TEST_PORT_BASE (default 18500) and is stopped and removed at the end
(CERTMGR_LAB_KEEP=1 keeps it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from lab import Lab
from tests.soak.ha import ALL_KINDS, HA_KINDS, HaSoak
from tests.soak.harness import FAULT_KINDS, RATIOS, Soak, SoakConfig


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 20m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def kinds(text: str) -> tuple[str, ...]:
    chosen = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(chosen) - set(ALL_KINDS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {', '.join(unknown) or '(none)'}; "
                                         f"known: {', '.join(ALL_KINDS)} (the last {len(HA_KINDS)} need "
                                         "--controllers 2)")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=seconds, default=seconds("60m"), help="how long faults and runs go on")
    ap.add_argument("--pops", type=int, default=20)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--lifetime", type=int, default=120,
                    help="certificate lifetime in seconds (Pebble validity); the timer period is lifetime/12 "
                    "(twice-daily): keep a run well under half of it")
    ap.add_argument("--ratio", choices=sorted(RATIOS), default="twice-daily",
                    help="timer period to lifetime: twice-daily (6-day certificates) or daily (90-day)")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--faults", type=kinds, default=None, metavar="KIND,…",
                    help=f"only these fault kinds (default all: {','.join(FAULT_KINDS)}; with --controllers 2 "
                    f"also {','.join(HA_KINDS)})")
    ap.add_argument("--controllers", type=int, choices=(1, 2), default=1,
                    help="2: two controllers (two state dirs) on one PostgreSQL store, HA faults too")
    ap.add_argument("--idle-timeout", type=float, default=5.0,
                    help="with --controllers 2: the store's idle_timeout (seconds, at least 5)")
    ap.add_argument("--faults-per-lifetime", type=float, default=2.5, help="how often a fault is drawn")
    ap.add_argument("--oncall-per-lifetime", type=float, default=1.5, help="how often an on-call command is drawn")
    ap.add_argument("--keep-versions", type=int, default=3, help="the inventory's retention (keep_versions)")
    ap.add_argument("--report", type=Path, help="also write the report (text) here, and JSON beside it")
    args = ap.parse_args(argv)

    default = ALL_KINDS if args.controllers == 2 else FAULT_KINDS
    if args.faults and args.controllers == 1 and set(args.faults) & set(HA_KINDS):
        ap.error(f"--faults {','.join(sorted(set(args.faults) & set(HA_KINDS)))} need --controllers 2")
    cfg = SoakConfig(duration=args.duration, pops=args.pops, seed=args.seed, lifetime=args.lifetime,
                     ratio=args.ratio, faults=not args.no_faults, keep_versions=args.keep_versions,
                     kinds=args.faults or default, faults_per_lifetime=args.faults_per_lifetime,
                     oncall_per_lifetime=args.oncall_per_lifetime, controllers=args.controllers, idle_timeout=args.idle_timeout)
    base = int(os.environ.get("CERTMGR_TEST_PORT_BASE", "18000")) + 500
    path = Path(tempfile.mkdtemp(prefix="certmgr-hasoak-" if cfg.controllers == 2 else "certmgr-soak-"))
    lab = Lab(path, base, pops=cfg.pops, secondary=True, validity=cfg.lifetime)

    def say(text: str) -> None:
        print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {text}", file=sys.stderr, flush=True)

    try:
        lab.up()
        kind = HaSoak if cfg.controllers == 2 else Soak
        report = kind(cfg, lab, path / "soak", log=say).run()
    finally:
        lab.down()
        if not os.environ.get("CERTMGR_LAB_KEEP"):
            shutil.rmtree(path, ignore_errors=True)
    text = report.text()
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
        args.report.with_suffix(".json").write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
