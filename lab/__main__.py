"""`python -m lab up|down|status`: bring the certmgr lab up, down, or report on it."""

from __future__ import annotations

import argparse
import os
import sys
import time

from lab.lab import DEFAULT_DIR, DEFAULT_PORT_BASE, DEFAULT_VALIDITY, Lab
from lab.pop import DEFAULT_NAMES_PER_POP, MAX_NAMES_PER_POP, MAX_POPS
from lab.proc import LabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dir_help = f"lab directory (env CERTMGR_LAB_DIR, default {DEFAULT_DIR})"
    up = sub.add_parser("up", help="start every component that is not running")
    up.add_argument("--dir", default=os.environ.get("CERTMGR_LAB_DIR", DEFAULT_DIR), help=dir_help)
    up.add_argument(
        "--port-base",
        type=int,
        default=int(os.environ.get("CERTMGR_LAB_PORT_BASE", DEFAULT_PORT_BASE)),
        help=f"first of the lab's ports (env CERTMGR_LAB_PORT_BASE, default {DEFAULT_PORT_BASE})",
    )
    up.add_argument("--pops", type=int, default=4, help=f"number of CDN POPs, 1-{MAX_POPS} (default 4)")
    up.add_argument("--names-per-pop", type=int, default=DEFAULT_NAMES_PER_POP,
                    help=f"server blocks per POP, each with its own certificate, 1-{MAX_NAMES_PER_POP} (default "
                         f"{DEFAULT_NAMES_PER_POP}: the lab's three lineages; more add s0003.hachyderm.test, …)")
    up.add_argument("--secondary", action="store_true", help="also run a lagging secondary nameserver (127.0.0.2)")
    up.add_argument("--powerdns", action="store_true",
                    help="also run PowerDNS 4.7 for pdns.test (DNS on P+7, HTTP API on P+8; bind forwards pdns.test)")
    up.add_argument(
        "--validity", type=int, default=DEFAULT_VALIDITY, help="Pebble certificate lifetime, seconds (default 90 days)"
    )
    up.add_argument("--messy", action="store_true",
                    help="apply the messy-fleet profile (lab/messy.py) to the 4 named POPs, for `certmgr discover`")
    for name, text in (("down", "stop everything this lab started"), ("status", "show each component up/down")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", default=os.environ.get("CERTMGR_LAB_DIR", DEFAULT_DIR), help=dir_help)
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            lab = Lab(args.dir, args.port_base, pops=args.pops, secondary=args.secondary, validity=args.validity,
                      names_per_pop=args.names_per_pop)
            started = time.monotonic()
            from lab import messy

            messy.remove(lab, reload=False)  # an earlier profile names files `up` may reseed away
            lab.up()
            if args.powerdns:
                lab.start_powerdns()
            if args.messy:
                messy.apply(lab)
            print(f"lab up in {time.monotonic() - started:.1f}s ({args.pops} POPs x {args.names_per_pop} names, "
                  f"port base {args.port_base}{', messy fleet' if args.messy else ''})")
            print(lab.inventory_path)
            return 0
        lab = Lab.load(args.dir)
        if args.command == "down":
            started = time.monotonic()
            lab.down()
            print(f"lab down in {time.monotonic() - started:.1f}s ({lab.dir})")
            return 0
        rows = lab.status()
        width = max(len(k) for k in rows)
        for name, row in rows.items():
            state = "up" if row["up"] else "down"
            pid = f"pid {row['pid']}" if row["pid"] else ""
            print(f"{name:<{width}}  {state:<4}  {row['where']:<21}  {pid}")
        return 0 if all(r["up"] for r in rows.values()) else 1
    except LabError as exc:
        print(f"lab {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
