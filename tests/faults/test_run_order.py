"""`certmgr run` deploys what a POP already lacks at once, beside its renewals, not after them.

docs/reliability.md §8 (the seed-12 soak): a POP that missed a stored version waited behind unrelated
renewals and served an expired certificate. Here one POP is behind on a stored version of `media` while
the renewal of `hachyderm.test` is held at the CA (the wire-level proxy): the run must serve that POP
the stored version first, seen by a verifying handshake, while the held order has not reached Pebble.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certmgr.material import serial_text
from lab import Lab
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import (
    assert_every_pop_serves_live,
    audit,
    certmgr,
    check_store_whole,
    handshake,
    start_certmgr,
    wait_for,
    write_inventory,
)
from tests.faults.test_order_resume import db, db_audit, ha_inventory, ha_pg, store_of  # noqa: F401 - fixtures

pytestmark = [pytest.mark.faults, pytest.mark.integration]

APEX = "hachyderm.test"
MEDIA = "media.hachyderm.test"
LIVENESS = 120.0  # how long the lagging POP is waited for: a liveness bound, not a performance figure


def served_verified(lab: Lab, pop: str, sni: str) -> str:
    """The serial `pop` presents for `sni` in a handshake that verifies against Pebble's roots."""
    p = lab.pop_paths(pop)
    return serial_text(handshake(p.address, lab.ports.https, sni, lab.pebble.roots).serial_number)


def due_every_run(inventory: Path, name: str) -> None:
    """Make certificate `name` (only) due in every run: a renew_before longer than any lifetime."""
    text = inventory.read_text()
    line = f'name = "{name}"\n'
    assert text.count(line) == 1, text
    inventory.write_text(text.replace(line, line + 'renew_before = "36500d"\n'))


class Store:
    """The two stores `run` keeps its state in: the state directory, or PostgreSQL ([store], the run's locks)."""

    def __init__(self, kind: str, inv: Path, state: Path) -> None:
        self.kind, self.inv, self.state = kind, inv, state

    def live_serial(self, name: str) -> str:
        if self.kind == "dir":
            return check_store_whole(self.state)[name]
        with store_of(self.inv) as s:
            return serial_text(x509.load_pem_x509_certificate(s.read(name).cert).serial_number)

    def audit(self) -> list[dict[str, Any]]:
        return audit(self.state) if self.kind == "dir" else db_audit(self.inv)


@pytest.fixture(params=["dir", "pg"])
def store_kind(request: pytest.FixtureRequest) -> Callable[[Lab, ACMEProxy, Path], tuple[Path, Store]]:
    """An inventory on the state directory, or on a PostgreSQL of this module's own (the run's certificate locks)."""
    def make(lab: Lab, proxy: ACMEProxy, tmp_path: Path) -> tuple[Path, Store]:
        if request.param == "dir":
            inv = write_inventory(lab, proxy, tmp_path / "domains.toml")
        else:
            inv = ha_inventory(lab, proxy, request.getfixturevalue("db"), tmp_path)
        return inv, Store(request.param, inv, tmp_path / "state")

    return make


def test_a_lagging_pop_is_served_the_stored_version_while_another_renewal_is_held(
        fresh: Lab, proxy: ACMEProxy, tmp_path: Path,
        store_kind: Callable[[Lab, ACMEProxy, Path], tuple[Path, Store]]) -> None:
    """A POP behind on a stored version gets it while another certificate's renewal is held at the CA; the renewal
    is deployed once released, the report lists each (certificate, POP) once, and only the lagging POP reloads twice."""
    inv, store = store_kind(fresh, proxy, tmp_path)
    state = tmp_path / "state"
    first = certmgr(inv, state, "run", "--no-notify")
    assert first.returncode == 0, first.stdout + first.stderr

    # media's next version stored and deployed to one POP only: the other is behind on a stored version
    current, lag = fresh.pop_names
    renewed = certmgr(inv, state, "renew", MEDIA, "--force", "--no-deploy")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    partial = certmgr(inv, state, "deploy", MEDIA, "--hosts", current)
    assert partial.returncode == 0, partial.stdout + partial.stderr
    stored = store.live_serial(MEDIA)
    assert served_verified(fresh, current, MEDIA) == stored
    assert served_verified(fresh, lag, MEDIA) != stored

    due_every_run(inv, APEX)
    apex_before = served_verified(fresh, lag, APEX)
    orders_before = proxy.reached_ca("new-order", APEX)
    reloads = {pop: fresh.reload_count(pop) for pop in fresh.pop_names}
    audited = len(store.audit())
    # the client gives up on a request after 20 s and tries twice more: every attempt is held
    held, *_ = [proxy.hold("new-order", ident=APEX, drop=False) for _ in range(3)]
    run = start_certmgr(inv, state, "run", "--no-notify", "--json")
    try:
        ACMEProxy.wait_held(held)
        wait_for(lambda: served_verified(fresh, lag, MEDIA) == stored, LIVENESS,
                 f"{lag} to serve {MEDIA}'s stored version while {APEX}'s order is held")
        # the renewal has not completed: it cannot have succeeded (its order never reached the CA), nor
        # failed (no failure recorded: the client's three attempts, 20 s each, are all held)
        assert proxy.reached_ca("new-order", APEX) == orders_before
        assert not [e for e in store.audit()[audited:] if e["action"] == "renew failed"]
        assert run.poll() is None
        assert served_verified(fresh, lag, APEX) == apex_before
    finally:
        proxy.release()
    out, err = run.communicate(timeout=LIVENESS)
    assert run.returncode == 0, out + err
    report = json.loads(out)
    assert [r["name"] for r in report["renewals"] if r["status"] == "renewed"] == [APEX]
    outcomes = [(d["cert"], d["host"], d["status"]) for d in report["deploys"]]
    assert sorted(outcomes) == sorted([(MEDIA, lag, "deployed")] + [(APEX, pop, "deployed")
                                                                     for pop in fresh.pop_names]), outcomes
    assert [(p["cert"], p["hosts"]) for p in report["deploy_plan"]] == [(MEDIA, [lag]), (APEX, fresh.pop_names)]
    assert {(pop, name): served_verified(fresh, pop, name) for pop in fresh.pop_names for name in (MEDIA, APEX)} == {
        (pop, name): store.live_serial(name) for pop in fresh.pop_names for name in (MEDIA, APEX)}
    deployed = [(e["object"], e["host"]) for e in store.audit()[audited:] if e["action"] == "deployed"]
    assert sorted(deployed) == sorted([(MEDIA, lag)] + [(APEX, pop) for pop in fresh.pop_names])
    # one transaction for what was behind, one for the renewal: a second reload only where both applied
    assert {pop: fresh.reload_count(pop) - n for pop, n in reloads.items()} == {current: 1, lag: 2}


def test_nothing_renewed_means_one_reload_per_lagging_pop(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """With nothing due, a run deploys what POPs lack in one transaction per POP: one reload, none elsewhere."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    first = certmgr(inv, state, "run", "--no-notify")
    assert first.returncode == 0, first.stdout + first.stderr
    current, lag = fresh.pop_names
    for name in (MEDIA, APEX):
        renewed = certmgr(inv, state, "renew", name, "--force", "--no-deploy")
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        partial = certmgr(inv, state, "deploy", name, "--hosts", current)
        assert partial.returncode == 0, partial.stdout + partial.stderr
    reloads = {pop: fresh.reload_count(pop) for pop in fresh.pop_names}
    second = certmgr(inv, state, "run", "--no-notify", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads(second.stdout)
    assert not [r for r in report["renewals"] if r["status"] == "renewed"]
    assert sorted((d["cert"], d["host"], d["status"]) for d in report["deploys"]) == [
        (APEX, lag, "deployed"), (MEDIA, lag, "deployed")]
    assert_every_pop_serves_live(fresh, state)
    assert {pop: fresh.reload_count(pop) - n for pop, n in reloads.items()} == {current: 0, lag: 1}
