"""The CI two-controller soak: two 96-second lifetimes on 3 POPs, one PostgreSQL, a fixed seed, HA faults.

`pytest -m "not soak"` leaves it out locally; `scripts/soak --controllers 2` is the long mode.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from tests.conftest import private_lab
from tests.soak.ha import ALL_KINDS, HA_KINDS, HaSoak
from tests.soak.harness import SoakConfig

pytestmark = [pytest.mark.soak, pytest.mark.integration]

HA = SoakConfig(duration=210.0, pops=3, seed=20261218, lifetime=96, ratio="twice-daily", controllers=2,
                kinds=ALL_KINDS + HA_KINDS, faults_per_lifetime=3.0)  # the HA kinds drawn twice as often


@pytest.fixture(scope="module")
def halab() -> Iterator[Lab]:
    """A lab of the two-controller soak's own: 3 POPs, the lagging secondary, Pebble issuing 96-second certificates."""
    with private_lab("hasoak", pops=HA.pops, secondary=True, validity=HA.lifetime) as instance:
        yield instance


def test_two_controllers_keep_the_fleet_valid_under_ha_faults(halab: Lab) -> None:
    """Two controllers on one PostgreSQL, one killed, paused or cut off at random: every invariant holds, work was done."""
    work = Path(tempfile.mkdtemp(prefix="certmgr-hasoak-ci-", dir=halab.dir))
    soak = HaSoak(HA, halab, work)
    report = soak.run()
    text = report.text()
    print(text)
    assert report.violations == [], text
    assert report.elapsed / HA.lifetime >= 2, text
    assert report.audit["add_version"] >= 3 * 2, text  # every lineage renewed about once a lifetime
    assert report.audit["deployed"] >= 3 * 2 * HA.pops, text
    assert {p.ctl for p in soak.procs if p.what == "run" and p.rc == 0} == {"a", "b"}, text  # both took turns
    assert any(e.kind in HA_KINDS for e in report.episodes), text  # HA faults really were injected
