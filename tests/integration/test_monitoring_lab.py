"""Monitoring on the real lab: `certmgr run --prometheus` metrics drive the shipped alerting rules under `promtool`.

Each test runs `certmgr run` against the lab, turns the textfile it wrote into a `promtool test rules`
file (the samples as they are at t=0, then unchanged: certmgr stopped) and asserts exactly which alerts fire.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from certmgr.cli import main
from lab import Lab
from lab.named import LAB_KEY

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian prometheus)")]

REPO = Path(__file__).parents[2]
RULES = REPO / "monitoring" / "prometheus" / "certmgr-rules.yml"
UNIT = REPO / "systemd" / "certmgr.service"
LINEAGES = ("hachyderm.test", "media.hachyderm.test", "static.hachyderm.test")
SEVERITY = {"CertmgrNoSuccessfulRun": "critical", "CertmgrCertificateExpired": "critical",
            "CertmgrCertificateExpiringSoon": "warning", "CertmgrCertificateExpiringCritical": "critical",
            "CertmgrStaleCertificateServed": "warning", "CertmgrEndpointDown": "warning",
            "CertmgrRenewalFailing": "warning", "CertmgrRenewalOverdue": "critical",
            "CertmgrDeployFailed": "warning", "CertmgrMetricsMissing": "warning"}
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def certmgr(inventory: Path, state: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--inventory", str(inventory), "--state-dir", str(state), *args])


def samples(text: str) -> list[tuple[str, dict[str, str], str, float]]:
    """(name, labels, raw label text, value) per sample line of a textfile."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        raw = m["labels"] or "{}"
        out.append((m["name"], dict(LABEL.findall(raw)), raw, float(m["value"])))
    return out


def value(text: str, name: str, **labels: str) -> float:
    [v] = [v for n, lab, _, v in samples(text) if n == name and lab == labels]
    return v


def firing(tmp_path: Path, textfile: str, checks: dict[str, list[dict[str, str]]]) -> subprocess.CompletedProcess[str]:
    """Run `promtool test rules` on the textfile's samples, held constant from t=0, checking ALERTS at each time.

    Times become relative to the run's start (t=0), so time() in the rules is "seconds since this run".
    """
    t0 = value(textfile, "certmgr_run_last_timestamp_seconds")
    minutes = 60 * max(int(at.removesuffix("h")) for at in checks) + 60  # one sample a minute, to past the last check
    series = []
    for name, _, raw, v in samples(textfile):
        v = v - t0 if name.endswith("_timestamp_seconds") else v
        labels = raw[:-1] + ("," if raw != "{}" else "") + 'instance="cm",job="node"}'
        series.append({"series": name + labels, "values": f"{v:.3f}+0x{minutes}"})
    tests = [{"expr": 'ALERTS{alertstate="firing"}', "eval_time": at, "exp_samples": [
        {"labels": "ALERTS{" + ",".join(f'{k}="{v}"' for k, v in sorted(
            {"alertstate": "firing", "instance": "cm", "job": "node", "severity": SEVERITY[a["alertname"]],
             **a}.items())) + "}", "value": 1} for a in alerts]} for at, alerts in checks.items()]
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "from-lab-run.test.yml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, check=False)


def per(alertname: str, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"alertname": alertname, "certificate": c, "host": h} for c, h in pairs]


def unit_success_statuses() -> set[int]:
    [line] = [x for x in UNIT.read_text().splitlines() if x.startswith("SuccessExitStatus=")]
    return {0, *(int(v) for v in line.split("=", 1)[1].split())}


def test_clean_run_writes_metrics_and_only_the_dead_mans_switch_fires_later(seeded: Lab, tmp_path: Path) -> None:
    """A clean lab run: valid metrics, every POP current; no alert at 1h or 25h; 27h of silence fires the switch."""
    prom = tmp_path / "textfile" / "certmgr.prom"
    prom.parent.mkdir()
    result = certmgr(seeded.inventory_path, tmp_path / "state", "run", "--no-notify", "--prometheus", str(prom))
    assert result.exit_code == 0, result.output
    assert prom.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in prom.parent.iterdir()] == ["certmgr.prom"]
    text = prom.read_text()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    t0 = value(text, "certmgr_run_last_timestamp_seconds")
    assert value(text, "certmgr_run_last_success_timestamp_seconds") == t0
    assert value(text, "certmgr_run_exit_code") == 0 and value(text, "certmgr_run_duration_seconds") > 0
    for cert in LINEAGES:
        live = value(text, "certmgr_certificate_not_after_timestamp_seconds", certificate=cert)
        assert value(text, "certmgr_certificate_renewal_last_attempt_success", certificate=cert) == 1
        assert value(text, "certmgr_certificate_renewal_consecutive_failures", certificate=cert) == 0
        for pop in seeded.pop_names:
            assert value(text, "certmgr_served_not_after_timestamp_seconds", certificate=cert, host=pop) == live
            assert value(text, "certmgr_served_current", certificate=cert, host=pop) == 1
            assert value(text, "certmgr_deploy_last_success", certificate=cert, host=pop) == 1
            assert value(text, "certmgr_deploy_last_outcome", certificate=cert, host=pop, outcome="deployed") == 1

    proc = firing(tmp_path, text, {"1h": [], "25h": [], "27h": [{"alertname": "CertmgrNoSuccessfulRun"}]})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_broken_pop_fires_stale_and_deploy_alerts_until_a_clean_run(seeded: Lab, tmp_path: Path) -> None:
    """nginx -t failing on esme: stale, deploy-failed and expiring alerts for esme only; fixed and rerun, none."""
    prom, state = tmp_path / "certmgr.prom", tmp_path / "state"
    broken = seeded.pop_paths("esme").conf_d / "broken.conf"
    broken.write_text("this is not nginx syntax\n")
    first = certmgr(seeded.inventory_path, state, "run", "--no-notify", "--prometheus", str(prom))
    assert first.exit_code == 2, first.output
    text = prom.read_text()
    assert value(text, "certmgr_run_success") == 0
    assert value(text, "certmgr_run_last_success_timestamp_seconds") == 0  # never
    esme = [(c, "esme") for c in LINEAGES]
    expected = [{"alertname": "CertmgrNoSuccessfulRun"}, *per("CertmgrStaleCertificateServed", esme),
                *per("CertmgrDeployFailed", esme), *per("CertmgrCertificateExpiringSoon", esme),
                *per("CertmgrCertificateExpiringCritical", esme)]
    proc = firing(tmp_path, text, {"1h": expected})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    broken.unlink()
    second = certmgr(seeded.inventory_path, state, "run", "--no-notify", "--prometheus", str(prom))
    assert second.exit_code == 0, second.output
    text = prom.read_text()
    assert value(text, "certmgr_run_last_success_timestamp_seconds") == value(text, "certmgr_run_last_timestamp_seconds")
    proc = firing(tmp_path, text, {"1h": []})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_failed_renewal_fails_the_unit_and_fires_renewal_alerts(seeded: Lab, tmp_path: Path) -> None:
    """A wrong TSIG secret: the run exits with a status the unit treats as failure, and renewal alerts fire."""
    bad = tmp_path / "bad.key"
    bad.write_text('key "' + LAB_KEY + '" {\n\talgorithm hmac-sha256;\n\tsecret "'
                   + base64.b64encode(b"x" * 32).decode() + '";\n};\n')
    good = str(seeded.dns_dir / f"{LAB_KEY}.key")
    text = seeded.inventory_path.read_text()
    assert json.dumps(good) in text
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(text.replace(json.dumps(good), json.dumps(str(bad))))
    prom = tmp_path / "certmgr.prom"

    result = certmgr(inventory, tmp_path / "state", "run", "--no-notify", "--prometheus", str(prom))
    assert result.exit_code == 2, result.output
    assert result.exit_code not in unit_success_statuses(), "a failed renewal must mark certmgr.service failed"
    assert "BADSIG" in result.output

    metrics = prom.read_text()
    for cert in LINEAGES:
        assert value(metrics, "certmgr_certificate_renewal_consecutive_failures", certificate=cert) == 1
        assert value(metrics, "certmgr_certificate_renewal_last_attempt_success", certificate=cert) == 0
    assert value(metrics, "certmgr_run_renewals", result="failed") == 3
    all_pops = [(c, p) for c in LINEAGES for p in seeded.pop_names]
    expected = [{"alertname": "CertmgrNoSuccessfulRun"},
                *({"alertname": a, "certificate": c} for a in ("CertmgrRenewalFailing", "CertmgrRenewalOverdue")
                  for c in LINEAGES),
                *per("CertmgrCertificateExpiringSoon", all_pops), *per("CertmgrCertificateExpiringCritical", all_pops)]
    proc = firing(tmp_path, metrics, {"1h": expected})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_plugin_on_the_lab(seeded: Lab, tmp_path: Path) -> None:
    """`certmgr check`: CRITICAL on the near-expiry seed, OK after a run, CRITICAL naming a stopped POP."""
    state = tmp_path / "state"
    perf = re.compile(r"'soonest_days'=[0-9.]+;22\.5:;9:;;")
    before = certmgr(seeded.inventory_path, state, "check")
    assert before.exit_code == 2, before.output
    first = before.output.splitlines()[0]
    assert first.startswith("CERTMGR CRITICAL - 16 critical of 16 endpoints: ")
    assert perf.search(first) and "'critical'=16;;;0;16" in first, first

    assert certmgr(seeded.inventory_path, state, "run", "--no-notify").exit_code == 0
    after = certmgr(seeded.inventory_path, state, "check")
    assert after.exit_code == 0, after.output
    assert re.match(r"CERTMGR OK - 16 endpoints ok, soonest expiry \S+ on \S+ in (89|90)d \| 'endpoints'=16;;;0 ",
                    after.output), after.output
    assert after.output.count("\n") == 1 and perf.search(after.output)

    seeded.stop_pop("esme")
    try:
        down = certmgr(seeded.inventory_path, state, "check", "static.hachyderm.test", "--connect-timeout", "2")
    finally:
        seeded.start_pop("esme")
    assert down.exit_code == 2, down.output
    lines = down.output.splitlines()
    assert lines[0].startswith("CERTMGR CRITICAL - 1 error of 4 endpoints: static.hachyderm.test on esme: "), lines[0]
    assert lines[1].startswith("ERROR: static.hachyderm.test on esme: ") and len(lines) == 2
