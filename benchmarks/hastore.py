"""renew-50 wall time: the PostgreSQL store against the directory store (issue 18: at most +10%).

Needs a lab (`python -m lab up --dir DIR --port-base P --pops 1`); starts its own PostgreSQL
(lab/pg.py, as the `postgres` user) on --pg-port. Rounds alternate dir, pg, dir, pg, … so a
machine's load drifts over both alike; prints each round and the ratio of the medians.
deploy-50 is not measured here yet.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.renew import bench_certmgr
from certmgr.pgstore import install_schema
from lab import Lab
from lab.pg import OWNER, RUNTIME, PgServer

TABLES = "certmgr_schema, certmgr_live, certmgr_versions, certmgr_json, certmgr_accounts, certmgr_audit, certmgr_epochs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lab-dir", required=True)
    ap.add_argument("--pg-port", type=int, required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=25)
    args = ap.parse_args()
    lab = Lab.load(args.lab_dir)
    base = Path(tempfile.mkdtemp(prefix="certmgr-bench-ha-"))
    os.chmod(base, 0o755)
    pg = PgServer(base / "pg", args.pg_port, fsync=True)  # durable commits, as in production
    pg.up()
    try:
        (base / "pw").write_text(pg.passwords[RUNTIME])
        (base / "key").write_text(f"k1 {base64.b64encode(os.urandom(32)).decode()}\n")
        extra = (f'\n[store]\nurl = "{pg.url()}"\npassword_file = "{base / "pw"}"\nkey_file = "{base / "key"}"\n')
        walls: dict[str, list[float]] = {"dir": [], "pg": []}
        for i in range(args.rounds):
            for kind in ("dir", "pg"):
                if kind == "pg":
                    with psycopg.connect(pg.url(OWNER), password=pg.passwords[OWNER], autocommit=True) as conn:
                        conn.execute(f"DROP TABLE IF EXISTS {TABLES} CASCADE")
                        install_schema(conn, runtime_role=RUNTIME)
                work = base / f"{kind}-{i}"
                work.mkdir()
                r = bench_certmgr(lab, args.n, work, args.concurrency, extra=extra if kind == "pg" else "")
                if r["ok"] != args.n:
                    print(f"round {i} {kind}: only {r['ok']}/{args.n} renewed: {r['err']}")
                    return 1
                walls[kind].append(float(r["wall"]))  # type: ignore[arg-type]
                print(f"round {i} {kind:3}: renew-{args.n} {r['wall']:.2f}s wall, {r['rss_kib']} KiB max RSS")
        d, p = statistics.median(walls["dir"]), statistics.median(walls["pg"])
        print(f"median renew-{args.n}: dir {d:.2f}s, pg {p:.2f}s: pg/dir = {p / d:.3f} "
              f"({'within' if p <= d * 1.10 else 'OVER'} the +10% budget)")
    finally:
        pg.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
