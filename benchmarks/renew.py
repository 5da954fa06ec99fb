"""Benchmark: issue 1, 10 and 50 certificates from the lab's Pebble with certmgr, certbot and lego.

Every tool gets a fresh account (so Pebble reuses no authorization), the same names (c000…c049),
the same Pebble (nonce rejection as the lab runs it) and the same bind9 over RFC 2136 with TSIG.
Wall time and peak RSS (the largest process of the run, from wait4) are printed; nothing is asserted.

    .venv/bin/python -m lab up --dir /tmp/renew-lab --port-base 42000
    .venv/bin/python benchmarks/renew.py --lab-dir /tmp/renew-lab \
        --certbot .venv-peers/bin/certbot --lego /usr/bin/lego

certbot (PyPI 5.x + certbot-dns-rfc2136) gets `--dns-rfc2136-propagation-seconds 1` — it only sleeps,
it does not check — and HMAC-SHA256 spelled in upper case (otherwise it silently uses HMAC-MD5).
lego gets the lab DNS as its resolver, hmac-sha256, and `--dns.disable-cp` (its propagation check
resolves the NS host names through the system resolver, which cannot see the lab zone).
Both peers run one certificate per invocation, sequentially: that is how they are driven from cron.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab import Lab  # noqa: E402


def run_wait4(argv: list[str], *, env: dict[str, str], timeout: float = 900) -> tuple[float, int, int, str, str]:
    """(wall seconds, peak RSS KiB, exit status, stdout, stderr tail) of one child, reaped with os.wait4."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as errf, tempfile.TemporaryFile("w+") as outf:
        proc = subprocess.Popen(argv, env=env, stdout=outf, stderr=errf, text=True)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)  # the benchmark's own reaping loop, not in any measured tool's path
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        errf.seek(0)
        outf.seek(0)
        out = outf.read()
        tail = (errf.read() or out)[-800:]
    return wall, usage.ru_maxrss, proc.returncode, out, tail


def names(n: int, dns: str = "rfc2136") -> list[str]:
    if dns == "powerdns":
        return [f"p{i:03d}.pdns.test" for i in range(n)]
    return [f"c{i:03d}.hachyderm.test" for i in range(n)]


def dns_section(lab: Lab, dns: str) -> str:
    """The [dns.lab] provider: bind9 over RFC 2136, or the lab's PowerDNS through its HTTP API."""
    if dns == "powerdns":
        return f"""
[dns.lab]
type = "powerdns"
zones = ["pdns.test"]
nameservers = ["127.0.0.1:{lab.ports.pdns}"]
api_url = "{lab.powerdns.api_url}"
api_key_file = "{lab.powerdns.api_key_file}"
"""
    return f"""
[dns.lab]
type = "rfc2136"
zones = ["hachyderm.test"]
server = "127.0.0.1"
port = {lab.ports.dns}
nameservers = ["127.0.0.1"]
tsig_key = "certmgr-lab"
tsig_secret_file = "{lab.dns_dir / 'certmgr-lab.key'}"
"""


def tsig_secret(lab: Lab) -> str:
    text = (lab.dns_dir / "certmgr-lab.key").read_text()
    m = re.search(r'secret "([^"]+)"', text)
    assert m, "no secret in the lab key file"
    return m.group(1)


# ---------------------------------------------------------------- certmgr


def bench_certmgr(lab: Lab, n: int, work: Path, concurrency: int, dns: str = "rfc2136",
                  extra: str = "") -> dict[str, object]:
    """`renew --due` of n new certificates; `extra` is appended to the inventory (e.g. a [store] table)."""
    inv = work / "domains.toml"
    certs = "".join(f'\n[[certificates]]\nname = "{d}"\ndomains = ["{d}"]\n' for d in names(n, dns))
    inv.write_text(f"""
[defaults]
trust = ["{lab.pebble.roots}"]

[ca.pebble]
directory = "{lab.pebble.directory}"
contact = ["mailto:ops@hachyderm.test"]
agree_tos = true
trust = "{lab.https_ca}"
{dns_section(lab, dns)}
{certs}{extra}""")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "certmgr", "--inventory", str(inv), "--state-dir", str(work / "state"),
            "renew", "--due", "--json", "--concurrency", str(concurrency)]
    wall, rss, rc, out, tail = run_wait4(argv, env=env)
    try:
        ok = sum(1 for o in json.loads(out) if o["status"] == "renewed")
    except ValueError:
        ok = 0
    tool = "certmgr" if dns == "rfc2136" else f"certmgr+{dns}"
    return {"tool": tool, "n": n, "wall": wall, "rss_kib": rss, "ok": ok, "err": "" if rc == 0 else tail}


# ---------------------------------------------------------------- certbot


def bench_certbot(lab: Lab, n: int, work: Path, certbot: str) -> dict[str, object]:
    creds = work / "rfc2136.ini"
    creds.write_text(f"dns_rfc2136_server = 127.0.0.1\ndns_rfc2136_port = {lab.ports.dns}\n"
                     f"dns_rfc2136_name = certmgr-lab\ndns_rfc2136_secret = {tsig_secret(lab)}\n"
                     "dns_rfc2136_algorithm = HMAC-SHA256\n")
    creds.chmod(0o600)
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(lab.https_ca)}
    total, peak, failures, last_err = 0.0, 0, 0, ""
    for d in names(n):
        argv = [certbot, "certonly", "--non-interactive", "--agree-tos", "-m", "ops@hachyderm.test",
                "--server", lab.pebble.directory, "--config-dir", str(work / "etc"), "--work-dir", str(work / "w"),
                "--logs-dir", str(work / "logs"), "--dns-rfc2136", "--dns-rfc2136-credentials", str(creds),
                "--dns-rfc2136-propagation-seconds", "1", "--key-type", "ecdsa", "--cert-name", d, "-d", d]
        wall, rss, rc, _, tail = run_wait4(argv, env=env)
        total += wall
        peak = max(peak, rss)
        if rc != 0:
            failures += 1
            last_err = tail
    return {"tool": "certbot", "n": n, "wall": total, "rss_kib": peak, "ok": n - failures, "err": last_err}


# ---------------------------------------------------------------- lego


def bench_lego(lab: Lab, n: int, work: Path, lego: str) -> dict[str, object]:
    env = {**os.environ, "LEGO_CA_CERTIFICATES": str(lab.https_ca),
           "RFC2136_NAMESERVER": f"127.0.0.1:{lab.ports.dns}", "RFC2136_TSIG_KEY": "certmgr-lab.",
           "RFC2136_TSIG_SECRET": tsig_secret(lab), "RFC2136_TSIG_ALGORITHM": "hmac-sha256.",
           "RFC2136_POLLING_INTERVAL": "1", "RFC2136_PROPAGATION_TIMEOUT": "60"}
    total, peak, failures, last_err = 0.0, 0, 0, ""
    for d in names(n):
        argv = [lego, "--accept-tos", "--email", "ops@hachyderm.test", "--server", lab.pebble.directory,
                "--path", str(work / "lego"), "--key-type", "ec256", "--dns", "rfc2136",
                "--dns.resolvers", f"127.0.0.1:{lab.ports.dns}", "--dns.disable-cp", "--domains", d, "run"]
        wall, rss, rc, _, tail = run_wait4(argv, env=env)
        total += wall
        peak = max(peak, rss)
        if rc != 0:
            failures += 1
            last_err = tail
    return {"tool": "lego", "n": n, "wall": total, "rss_kib": peak, "ok": n - failures, "err": last_err}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lab-dir", default=os.environ.get("CERTMGR_LAB_DIR", "/tmp/certmgr-lab"))
    ap.add_argument("--counts", default="1,10,50")
    ap.add_argument("--concurrency", type=int, default=25)
    ap.add_argument("--certbot", help="certbot executable (PyPI 5.x with certbot-dns-rfc2136)")
    ap.add_argument("--lego", help="lego executable (Debian `lego`)")
    ap.add_argument("--peer-count", type=int, default=50, help="certificates for each peer (default 50)")
    ap.add_argument("--dns", choices=("rfc2136", "powerdns", "both"), default="rfc2136",
                    help="certmgr's DNS provider: bind9 over RFC 2136, the lab's PowerDNS API (started if needed), "
                         "or both, each count with each, and the powerdns/rfc2136 ratio (target: at most 1.5x)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each certmgr measurement this many times, interleaved; the median is compared "
                         "(on a shared machine one run says little)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    lab = Lab.load(args.lab_dir)
    counts = [int(c) for c in args.counts.split(",")]
    pebble_env = json.loads((lab.pebble.root / "state.json").read_text()).get("env", {})
    print(f"lab {lab.dir}: Pebble {lab.pebble.directory} env={pebble_env} "
          f"(PEBBLE_WFE_NONCEREJECT unset means Pebble's default 5%), bind 127.0.0.1:{lab.ports.dns}")
    results: list[dict[str, object]] = []
    base = Path(tempfile.mkdtemp(prefix="certmgr-bench-"))
    try:
        providers = ("rfc2136", "powerdns") if args.dns == "both" else (args.dns,)
        if "powerdns" in providers:
            lab.start_powerdns()
        for n in counts:
            for rep in range(args.repeat):
                for dns in providers:
                    work = base / f"certmgr-{dns}-{n}-{rep}"
                    work.mkdir()
                    results.append(bench_certmgr(lab, n, work, args.concurrency, dns))
                    _print(results[-1])
        for tool, exe in (("certbot", args.certbot), ("lego", args.lego)):
            if not exe:
                continue
            work = base / f"{tool}-{args.peer_count}"
            work.mkdir()
            fn = bench_certbot if tool == "certbot" else bench_lego
            results.append(fn(lab, args.peer_count, work, exe))
            _print(results[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ours = next((r for r in results if r["tool"] == "certmgr" and r["n"] == args.peer_count), None)
    for r in results:
        if not str(r["tool"]).startswith("certmgr") and ours and r["n"] == ours["n"]:
            ratio = float(r["wall"]) / float(ours["wall"])  # type: ignore[arg-type]
            print(f"ratio {r['tool']}/certmgr for {r['n']} certificates: {ratio:.1f}x "
                  f"({'meets' if ratio >= 10 or r['tool'] != 'certbot' else 'MISSES'} the 10x target vs certbot)"
                  if r["tool"] == "certbot" else f"ratio {r['tool']}/certmgr for {r['n']} certificates: {ratio:.1f}x")
    for n in counts:
        walls = [sorted(float(r["wall"]) for r in results if r["tool"] == t and r["n"] == n)  # type: ignore[arg-type]
                 for t in ("certmgr", "certmgr+powerdns")]
        if walls[0] and walls[1]:
            med = [statistics.median(w) for w in walls]
            ratio = med[1] / med[0]
            print(f"ratio powerdns/rfc2136 for {n} certificates, medians of {len(walls[1])} run(s) "
                  f"({med[1]:.2f}s / {med[0]:.2f}s): {ratio:.2f}x ({'meets' if ratio <= 1.5 else 'MISSES'} the 1.5x "
                  "target)")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _print(r: dict[str, object]) -> None:
    per = float(r["wall"]) / int(r["n"])  # type: ignore[arg-type, call-overload]
    print(f"{r['tool']:8} {r['n']:>3} certificates: {float(r['wall']):7.2f}s wall ({per:.2f}s each), "  # type: ignore[arg-type]
          f"peak RSS {int(r['rss_kib']) / 1024:.0f} MiB, ok {r['ok']}", flush=True)  # type: ignore[call-overload]
    if r.get("err"):
        print(f"         last error: {str(r['err']).strip()[-400:]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
