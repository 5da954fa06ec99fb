"""The CI soak: about five 48-second lifetimes on 8 POPs with a fixed seed, faults, on-call races, every invariant.

`pytest -m "not soak"` leaves it out locally; `scripts/test` runs it. The long mode is `scripts/soak`.
"""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from tests.conftest import private_lab
from tests.soak.harness import Soak, SoakConfig

pytestmark = [pytest.mark.soak, pytest.mark.integration]

CI = SoakConfig(duration=200.0, pops=8, seed=20261203, lifetime=48, ratio="twice-daily")


@pytest.fixture(scope="module")
def slab() -> Iterator[Lab]:
    """A lab of the soak's own: 8 POPs, the lagging secondary, Pebble issuing 48-second certificates."""
    with private_lab("soak", pops=CI.pops, secondary=True, validity=CI.lifetime) as instance:
        yield instance


def test_fleet_stays_valid_over_five_lifetimes_under_faults(slab: Lab) -> None:
    """Over ~5 lifetimes with faults and racing on-call commands, every invariant holds and the report shows work done."""
    work = Path(tempfile.mkdtemp(prefix="certmgr-soak-ci-", dir=slab.dir))
    report = Soak(CI, slab, work).run()
    text = report.text()
    print(text)
    assert report.violations == [], text
    assert report.elapsed / CI.lifetime >= 4, text
    assert report.audit["renewed"] >= 3 * 4, text  # every lineage renewed in (nearly) every lifetime
    assert report.audit["deployed"] >= 3 * 4 * CI.pops, text
    assert len(report.episodes) >= 5, text  # faults really were injected
    assert report.runs, text


def test_observer_shares_no_code_with_certmgr() -> None:
    """The observer imports only the standard library and cryptography: it cannot share certmgr's bugs."""
    tree = ast.parse(Path(__file__).with_name("observer.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "datetime", "os", "socket", "ssl", "threading", "time", "collections",
                       "dataclasses", "pathlib", "cryptography"}, modules


def test_observer_flags_a_mismatched_pair_and_a_dangling_live_link(tmp_path: Path) -> None:
    """The observer's disk check reports a key that is not the certificate's and a live link to nothing; a whole pair passes."""
    from lab import pki
    from tests.soak.observer import Observer

    ca = pki.make_ca("soak test CA")
    a, b = pki.make_leaf(ca, ["a.test"]), pki.make_leaf(ca, ["b.test"])
    root = tmp_path / "pop" / "etc" / "letsencrypt"
    for lineage, cert, key in (("good", a, a), ("mixed", a, b)):
        d = root / "archive" / lineage / "1"
        d.mkdir(parents=True)
        (d / "fullchain.pem").write_bytes(cert.cert_pem + ca.cert_pem)
        (d / "privkey.pem").write_bytes(key.key_pem)
    (root / "live").mkdir()
    for lineage in ("good", "mixed", "gone"):
        (root / "live" / lineage).symlink_to(f"../archive/{lineage}/1")
    obs = Observer([], {"pop": root}, ["good", "mixed", "gone"])
    obs.round()
    assert sorted((v.kind, v.where.rsplit("/", 1)[-1]) for v in obs.violations) == [
        ("dangling-live", "gone"), ("key-mismatch", "mixed")]
    assert obs.disk_checks == 1
