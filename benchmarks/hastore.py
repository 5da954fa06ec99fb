"""renew-50 and deploy-50 wall time: the PostgreSQL store against the directory store (issue 18: at most +10%).

    .venv/bin/python benchmarks/hastore.py --port-base 14500 --pg-port 14590 [--rounds 5] [--what renew,deploy]
    .venv/bin/python benchmarks/hastore.py --lab-dir DIR --pg-port P      # a lab already up with >= 50 POPs

Starts a lab of its own on --port-base with --pops POPs (or uses --lab-dir) and its own PostgreSQL
(lab/pg.py, as the `postgres` user, `fsync = on` unless --no-fsync) on --pg-port. Rounds alternate
dir, pg, dir, pg, … so a machine's load drifts over both alike; prints each round with the load
average and the ratio of the medians.

renew-50: `renew --due` of 50 new certificates (benchmarks/renew.py's bench_certmgr; a fresh
schema for each pg round). deploy-50: a fresh version of `--deploy-certs` certificate(s) pushed
to 50 POPs at once (benchmarks/deploy.py's child: its `wall` is deploy() itself), after one
warm-up run that converts the lab's certbot layout; each store keeps its versions across rounds.
For each pg round the database's transactions and WAL flushes and the time spent in them
(pg_stat_database, pg_stat_wal with track_wal_io_timing: with fsync on each flush is a durable
commit, and the store's commits are serial on its one connection) are printed per certificate
(renew) or per POP (deploy).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.deploy import run_child
from benchmarks.renew import bench_certmgr
from certmgr.pgstore import CALLS_ENV, install_schema
from lab import Lab
from lab.pg import DATABASE, OWNER, RUNTIME, TABLES, PgServer


def reset_schema(pg: PgServer) -> None:
    with psycopg.connect(pg.url(OWNER), password=pg.passwords[OWNER], autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLES} CASCADE")
        install_schema(conn, runtime_role=RUNTIME)


def db_counters(pg: PgServer) -> tuple[float, float, float]:
    """(transactions committed in certmgr's database — an autocommit read is one —, WAL flushes of the whole
    server, milliseconds spent in them) so far."""
    out = pg.psql("SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) "
                  "|| ' ' || wal_sync || ' ' || wal_sync_time FROM pg_stat_wal", db=DATABASE)
    xacts, syncs, ms = out.split()
    return float(xacts), float(syncs), float(ms)


def db_line(pg: PgServer, before: tuple[float, float, float], per: int, unit: str) -> str:
    xacts, syncs, ms = (a - b for a, b in zip(db_counters(pg), before, strict=True))
    return (f"; per {unit}: {xacts / per:.1f} transactions, {syncs / per:.1f} WAL flushes "
            f"({ms / per:.1f} ms flushing; {ms / 1000:.2f}s in all)")


def call_split(calls: Path, per: int, unit: str) -> str:
    """The store's transactions per `unit` by call site, as the certmgr processes counted them (PgStore.calls:
    `read` one autocommit statement, `durable` a commit waited for on the WAL flush, `lazy` one not waited
    for, `lock` the lock session's)."""
    total: Counter[str] = Counter()
    for line in calls.read_text().splitlines() if calls.exists() else []:
        total.update(json.loads(line))
    calls.unlink(missing_ok=True)
    return f"\n    per {unit} by call site: " + "; ".join(f"{n / per:.2f} {site}" for site, n in total.most_common())


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def verdict(what: str, walls: dict[str, list[float]]) -> str:
    if not walls["dir"] or not walls["pg"]:
        return f"{what}: no complete round for both stores"
    d, p = statistics.median(walls["dir"]), statistics.median(walls["pg"])
    return (f"median {what}: dir {d:.2f}s, pg {p:.2f}s: pg/dir = {p / d:.3f} "
            f"({'within' if p <= d * 1.10 else 'OVER'} the +10% budget; rounds dir "
            f"{' '.join(f'{w:.2f}' for w in walls['dir'])} / pg {' '.join(f'{w:.2f}' for w in walls['pg'])})")


def bench_renew(lab: Lab, pg: PgServer, base: Path, extra: str, args: argparse.Namespace) -> str:
    walls: dict[str, list[float]] = {"dir": [], "pg": []}
    for i in range(args.rounds):
        for kind in ("dir", "pg"):
            if kind == "pg":
                reset_schema(pg)
            before = db_counters(pg)
            work = base / f"renew-{kind}-{i}"
            work.mkdir()
            calls = base / "calls.jsonl"
            calls.unlink(missing_ok=True)  # a round not counted leaves its counts behind
            os.environ[CALLS_ENV] = str(calls)  # inherited by the certmgr process; only a PgStore writes it
            r = bench_certmgr(lab, args.n, work, args.concurrency, extra=extra if kind == "pg" else "")
            del os.environ[CALLS_ENV]
            if r["ok"] != args.n:  # e.g. Pebble timing out on an overloaded machine: said, not counted
                print(f"round {i} {kind:3}: only {r['ok']}/{args.n} renewed, not counted, {load()}: "
                      f"{str(r['err']).strip().splitlines()[-1][:300]}", flush=True)
                continue
            walls[kind].append(float(r["wall"]))  # type: ignore[arg-type]
            per = db_line(pg, before, args.n, "certificate") if kind == "pg" else ""
            per += call_split(calls, args.n, "certificate") if kind == "pg" and args.split else ""
            print(f"round {i} {kind:3}: renew-{args.n} {r['wall']:.2f}s wall, {r['rss_kib']} KiB max RSS, "
                  f"{load()}{per}", flush=True)
    return verdict(f"renew-{args.n}", walls)


def bench_deploy(lab: Lab, pg: PgServer, base: Path, spec: Path, args: argparse.Namespace) -> str:
    n, k = args.deploy_pops, args.deploy_certs
    if len(lab.pop_names) < n:
        raise SystemExit(f"lab {lab.dir} has {len(lab.pop_names)} POPs; deploy-{n} needs {n} (--pops)")
    reset_schema(pg)
    for p in lab.pop_names:  # a fresh database's epochs start at 1: an earlier database's POP fence would refuse them
        (lab.pop_paths(p).cert_root / "archive" / ".certmgr-fence").unlink(missing_ok=True)
    states = {"dir": base / "deploy-dir" / "state", "pg": base / "deploy-pg" / "state"}
    for s in states.values():
        s.parent.mkdir()
    warm = run_child(lab, n, min(n, 50), states["dir"], k=k)  # converts the lab's certbot layout, once
    print(f"warm-up (certbot layout converted, directory store): deploy-{n} {warm['wall']:.2f}s, {load()}", flush=True)
    walls: dict[str, list[float]] = {"dir": [], "pg": []}
    for i in range(args.rounds):
        for kind in ("dir", "pg"):
            before = db_counters(pg)
            r = run_child(lab, n, min(n, 50), states[kind], k=k, pg=str(spec) if kind == "pg" else "-")
            if r["bad"]:
                print(f"round {i} {kind:3}: not all deployed, not counted, {load()}: {r['bad'][:3]}", flush=True)
                continue
            walls[kind].append(float(r["wall"]))
            per = db_line(pg, before, n, "POP") if kind == "pg" else ""
            print(f"round {i} {kind:3}: deploy-{n} ({k} cert(s)) {r['wall']:.2f}s wall, "
                  f"{r['rss_kb']} KiB max RSS, {load()}{per}", flush=True)
    return verdict(f"deploy-{n}", walls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--lab-dir", help="a lab already up (deploy needs --deploy-pops POPs in it)")
    where.add_argument("--port-base", type=int, help="start a lab of its own on these ports (and stop it after)")
    ap.add_argument("--pops", type=int, default=50, help="POPs of the lab started with --port-base (default 50)")
    ap.add_argument("--pg-port", type=int, required=True)
    ap.add_argument("--what", default="renew,deploy", help="renew, deploy or both (default)")
    ap.add_argument("--n", type=int, default=50, help="certificates renewed (default 50)")
    ap.add_argument("--deploy-pops", type=int, default=50, help="POPs deployed to at once (default 50)")
    ap.add_argument("--deploy-certs", type=int, default=1, help="certificates per deploy (default 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=25)
    ap.add_argument("--split", action="store_true", help="renew: print the store's transactions by call site too")
    ap.add_argument("--no-fsync", action="store_true", help="PostgreSQL with fsync = off (the tests' setting)")
    args = ap.parse_args()
    what = set(args.what.split(","))
    if args.lab_dir:
        lab = Lab.load(args.lab_dir)
    else:
        lab = Lab(Path(f"/tmp/certmgr-bench-hastore-{args.port_base}"), args.port_base, pops=args.pops)
        lab.up()
    base = Path(tempfile.mkdtemp(prefix="certmgr-bench-ha-"))
    os.chmod(base, 0o755)
    pg = PgServer(base / "pg", args.pg_port, fsync=not args.no_fsync)  # durable commits, as in production
    print(f"PostgreSQL on 127.0.0.1:{args.pg_port}, fsync {'off' if args.no_fsync else 'on'}; lab {lab.dir} "
          f"({len(lab.pop_names)} POPs); {load()} on {os.cpu_count()} cores", flush=True)
    pg.up()
    try:
        pg.psql("ALTER SYSTEM SET track_wal_io_timing = on")  # pg_stat_wal.wal_sync_time: the time fsync costs
        pg.psql("SELECT pg_reload_conf()")
        (base / "pw").write_text(pg.passwords[RUNTIME])
        (base / "key").write_text(f"k1 {base64.b64encode(os.urandom(32)).decode()}\n")
        spec = base / "pg.json"
        spec.write_text(json.dumps({"url": pg.url(), "password_file": str(base / "pw"),
                                    "key_file": str(base / "key")}))
        extra = (f'\n[store]\nurl = "{pg.url()}"\npassword_file = "{base / "pw"}"\nkey_file = "{base / "key"}"\n')
        lines = []
        if "renew" in what:
            lines.append(bench_renew(lab, pg, base, extra, args))
        if "deploy" in what:
            lines.append(bench_deploy(lab, pg, base, spec, args))
        for line in lines:
            print(line)
    finally:
        pg.down()
        shutil.rmtree(base, ignore_errors=True)  # its stores hold (test) private keys
        if not args.lab_dir:
            lab.reseed()
            lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
