"""`certmgr run`, the daily job, end to end on the real lab: scan → renew → deploy → verify → notify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from certmgr.cli import main
from lab import Lab
from tests.helpers import tree_digest
from tests.receiver import Receiver

pytestmark = pytest.mark.integration

LINEAGES = ("hachyderm.test", "media.hachyderm.test", "static.hachyderm.test")
SNI = {"hachyderm.test": ("hachyderm.test", "www.hachyderm.test"), "media.hachyderm.test": ("media.hachyderm.test",),
       "static.hachyderm.test": ("static.hachyderm.test",)}


def certmgr(lab: Lab, state: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--inventory", str(lab.inventory_path), "--state-dir", str(state), *args])


def served(lab: Lab) -> dict[tuple[str, str], int]:
    return {(pop, sni): lab.served_serial(pop, sni) for pop in lab.pop_names for names in SNI.values()
            for sni in names}


def audit(state: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (state / "audit.log").read_text().splitlines() if line.strip()]


def test_run_renews_deploys_and_summarises_once(seeded: Lab, receiver: Receiver, tmp_path: Path) -> None:
    """A near-expiry seed on 4 POPs → one run → every POP serves a fresh certificate, one chat summary, audited."""
    state = tmp_path / "state"
    seeds = served(seeded)
    first = certmgr(seeded, state, "run")
    assert first.exit_code == 0, first.output
    after = served(seeded)
    assert all(after[k] != seeds[k] for k in seeds), "every endpoint serves a new certificate"
    for lineage, names in SNI.items():
        assert len({after[(pop, sni)] for pop in seeded.pop_names for sni in names}) == 1, lineage

    requests = receiver.wait_for(1)
    assert len(requests) == 1
    body = requests[0].json
    assert body["kind"] == "summary"
    assert "3 renewed, 12 deployed, 0 failed" in body["title"]

    entries = audit(state)
    assert sorted(e["object"] for e in entries if e["action"] == "renewed") == sorted(LINEAGES)
    deployed = [e for e in entries if e["action"] == "deployed"]
    assert sorted((e["object"], e["host"]) for e in deployed) == sorted(
        (lineage, pop) for lineage in LINEAGES for pop in seeded.pop_names)

    status = certmgr(seeded, state, "status", "--json")
    assert status.exit_code == 0, status.output
    views = json.loads(status.output)["certificates"]
    assert all(v["all_pops_current"] for v in views)

    # The second run finds nothing to do and says nothing new.
    before = tree_digest(state / "archive"), served(seeded), len(audit(state))
    second = certmgr(seeded, state, "run")
    assert second.exit_code == 0, second.output
    assert "renewed" not in second.output and "deployed " not in second.output
    assert (tree_digest(state / "archive"), served(seeded)) == before[:2]
    assert not [e for e in audit(state)[before[2]:] if e["action"] in ("renewed", "deployed", "activate")]
    assert len(receiver.requests) == 1


def test_run_with_one_broken_pop(seeded: Lab, receiver: Receiver, tmp_path: Path) -> None:
    """nginx -t failing on one POP: the others are done, one alert, exit non-zero; fixed and rerun, it completes."""
    state = tmp_path / "state"
    seeds = served(seeded)
    broken = seeded.pop_paths("esme").conf_d / "broken.conf"
    broken.write_text("this is not nginx syntax\n")
    first = certmgr(seeded, state, "run")
    assert first.exit_code == 2, first.output
    now = served(seeded)
    assert all(now[(pop, sni)] != seeds[(pop, sni)] for pop, sni in seeds if pop != "esme")
    assert all(now[("esme", sni)] == seeds[("esme", sni)] for _, sni in seeds)
    failures = [r.json for r in receiver.requests if r.json["kind"] == "failure"]
    assert len(failures) == 1
    assert failures[0]["title"].startswith("FAILED deploy to esme")
    assert "config was already broken before deploy" in "\n".join(failures[0]["lines"])

    broken.unlink()
    receiver.clear()
    second = certmgr(seeded, state, "run")
    assert second.exit_code == 0, second.output
    final = served(seeded)
    assert all(final[("esme", sni)] == final[("sally", sni)] for _, sni in seeds)
    assert [r.json["kind"] for r in receiver.requests] == ["summary"]


def test_dry_run_changes_nothing(seeded: Lab, receiver: Receiver, tmp_path: Path) -> None:
    """`run --dry-run` prints the plan and changes nothing on disk, on any POP, or in chat."""
    state = tmp_path / "state"
    pops_before = {pop: tree_digest(seeded.pop_paths(pop).cert_root) for pop in seeded.pop_names}
    served_before = served(seeded)
    result = certmgr(seeded, state, "run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would renew  media.hachyderm.test: no certificate yet" in result.output
    assert "would deploy media.hachyderm.test → cdn-frankfurt-1, cdn-fremont-1, sally, esme" in result.output
    assert not state.exists()
    assert {pop: tree_digest(seeded.pop_paths(pop).cert_root) for pop in seeded.pop_names} == pops_before
    assert served(seeded) == served_before
    assert receiver.requests == []
