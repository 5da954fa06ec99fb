"""monitoring/: the alerting rules pass `promtool check/test rules`, and rules, dashboard and runbook agree with the metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from certmgr import metrics

REPO = Path(__file__).parents[2]
MON = REPO / "monitoring"
RULES = MON / "prometheus" / "certmgr-rules.yml"
RULES_TEST = MON / "prometheus" / "certmgr-rules.test.yml"
DASHBOARD = MON / "grafana" / "certmgr-dashboard.json"
RUNBOOK = REPO / "docs" / "runbook.md"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")
FAMILIES = {name for name, _, _ in metrics.FAMILIES}


def alerts() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in data["panels"] for t in p["targets"]]


@needs_promtool
def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the shipped rules file."""
    proc = subprocess.run([promtool or "", "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    """The shipped unit tests (`promtool test rules certmgr-rules.test.yml`) pass."""
    proc = subprocess.run([promtool or "", "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query parses as PromQL (checked as recording rules, with $instance set to .*)."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))
    proc = subprocess.run([promtool or "", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_and_dashboard_use_only_metrics_certmgr_writes() -> None:
    """Every certmgr_* name in the rules, their tests and the dashboard is a family that certmgr run writes."""
    for path in (RULES, RULES_TEST, DASHBOARD):
        used = set(re.findall(r"\bcertmgr_[a-z_]+\b", path.read_text()))
        assert used, path
        assert used <= FAMILIES, (path.name, sorted(used - FAMILIES))


def test_every_alert_is_tested_and_has_a_runbook_section() -> None:
    """Each alert is exercised by the shipped promtool test and explained under its own heading in docs/runbook.md."""
    text = RULES.read_text()
    runbook = RUNBOOK.read_text()
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    for name in alerts():
        assert name in tested, name
        assert re.search(rf"^### {name}$", runbook, re.M), f"docs/runbook.md has no '### {name}'"
    for anchor in set(re.findall(r"runbook: docs/runbook\.md#(\S+)", text)):
        assert re.search(rf"^### {anchor}$", runbook, re.M | re.I), anchor


def test_dashboard_is_importable() -> None:
    """The dashboard has a fixed uid, a templated Prometheus data source and no hard-coded data source uid."""
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] == "certmgr" and data["panels"]
    names = [v["name"] for v in data["templating"]["list"]]
    assert names == ["datasource", "instance"]
    for p in data["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"])
        assert all('instance=~"$instance"' in t["expr"] for t in p["targets"]), p["title"]
