"""`certmgr status`: a verified deploy counts until a later scan, NAME filters, the exit status says what needs action."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from certmgr import status as status_mod
from certmgr.cli import main
from certmgr.inventory import loads
from certmgr.material import CertMaterial
from certmgr.store import Store
from lab import pki
from tests import inv

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
_CA = pki.make_ca("status test CA", not_before=NOW - dt.timedelta(days=30))
INV = inv.toml(hosts={"pop1": {"address": "127.0.1.1"}, "pop2": {"address": "127.0.1.2"}},
               certificates=[inv.cert("a.example.test", "pop1", "pop2"), inv.cert("b.example.test", "pop1")])


def material(name: str, days: float = 90) -> CertMaterial:
    """A 90-day leaf with `days` left."""
    leaf = pki.make_leaf(_CA, [name], not_before=NOW + dt.timedelta(days=days - 90),
                         not_after=NOW + dt.timedelta(days=days))
    return CertMaterial(cert=leaf.cert_pem, chain=_CA.cert_pem, privkey=leaf.key_pem)


def at(minutes: float) -> str:
    return (NOW + dt.timedelta(minutes=minutes)).isoformat()


@pytest.fixture()
def env(tmp_path: Path) -> tuple[Path, Store, dict[str, Any]]:
    """An inventory file and a store with both certificates live; returns their CertInfos by name too."""
    inv = tmp_path / "domains.toml"
    inv.write_text(INV)
    store = Store.open(tmp_path / "state")
    infos = {}
    with store.lock("test"):
        for name in ("a.example.test", "b.example.test"):
            store.activate(name, store.add_version(name, material(name)))
            infos[name] = store.read(name).info()
    return inv, store, infos


def scan_state(store: Store, name: str, scanned_at: str, served: dict[str, tuple[str, str, str]]) -> None:
    """state/scan/NAME.json as scan saves it: host → (serial, sha256, severity)."""
    store.save_json(f"state/scan/{name}.json", {"scanned_at": scanned_at, "endpoints": [
        {"host": h, "serial": s, "sha256": sha, "severity": sev, "problems": [], "error": None}
        for h, (s, sha, sev) in served.items()]})


def deploy_state(store: Store, name: str, hosts: dict[str, tuple[str, str, str | None]]) -> None:
    """state/deploy/NAME.json as deploy saves it: host → (status, at, serial)."""
    store.save_json(f"state/deploy/{name}.json", {"hosts": {
        h: {"status": st, "at": when, "serial": serial, "error": None} for h, (st, when, serial) in hosts.items()}})


def status(inv: Path, store: Store, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["--inventory", str(inv), "--state-dir", str(store.root), "status", *args])
    return res.exit_code, res.output


def test_verified_deploy_after_the_scan_shows_current(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """Right after a verified deploy every POP shows current, though the last scan (earlier) saw the old one."""
    inv, store, infos = env
    a, b = infos["a.example.test"], infos["b.example.test"]
    scan_state(store, "a.example.test", at(-60), {"pop1": ("0A", "old", "critical"), "pop2": ("0A", "old", "critical")})
    scan_state(store, "b.example.test", at(-60), {"pop1": (b.serial, b.sha256, "ok")})
    deploy_state(store, "a.example.test", {"pop1": ("deployed", at(-1), a.serial),
                                            "pop2": ("skipped", at(-1), a.serial.lower().lstrip("0"))})
    code, out = status(inv, store)
    assert code == 0, out
    assert out.count("current  ok       serial " + a.serial) == 2
    assert "BEHIND" not in out and "(verified by that deploy, after the last scan)" in out
    assert out.splitlines()[-1] == "status: 2 certificate(s), nothing needs action (exit 0)"


def test_a_later_scan_overrules_the_deploy(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """A scan newer than the deploy says what is served: a POP that lost the certificate is BEHIND again (exit 2)."""
    inv, store, infos = env
    a = infos["a.example.test"]
    deploy_state(store, "a.example.test", {"pop1": ("deployed", at(-10), a.serial),
                                            "pop2": ("deployed", at(-10), a.serial)})
    scan_state(store, "a.example.test", at(-1), {"pop1": (a.serial, a.sha256, "ok"), "pop2": ("0A", "old", "ok")})
    code, out = status(inv, store, "a.example.test")
    assert code == 2, out
    assert "pop2                 BEHIND" in out
    assert out.splitlines()[-1] == "status: needs action: a.example.test: pop2 behind (exit 2)"


def test_a_rolled_back_deploy_is_behind(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """A deploy that rolled back verified the old serial: that POP is behind until fixed."""
    inv, store, _ = env
    deploy_state(store, "a.example.test", {"pop1": ("rolled back", at(-1), "0A")})
    code, out = status(inv, store, "a.example.test")
    assert code == 2
    assert "pop1                 BEHIND   critical serial 0A, last deploy rolled back" in out


def test_a_failed_deploy_after_a_confirming_one_keeps_what_that_one_saw(
        env: tuple[Path, Store, dict[str, Any]]) -> None:
    """A POP unreachable (or failing its test) since a deploy confirmed another serial AFTER the last scan serves that
    serial, not what the older scan saw: BEHIND, exit 2 — not `current` from a scan the deploy made stale."""
    inv, store, infos = env
    a = infos["a.example.test"]
    scan_state(store, "a.example.test", at(-60), {"pop1": (a.serial, a.sha256, "ok"), "pop2": (a.serial, a.sha256, "ok")})
    store.save_json("state/deploy/a.example.test.json", {"hosts": {
        "pop1": {"status": "unreachable", "at": at(-1), "serial": "0B", "version": 5, "serial_at": at(-30),
                 "error": "connect refused"},
        "pop2": {"status": "deployed", "at": at(-30), "serial": a.serial, "version": 1, "serial_at": at(-30)}}})
    code, out = status(inv, store, "a.example.test")
    assert code == 2, out
    line = next(s for s in out.splitlines() if s.strip().startswith("pop1"))
    assert line.split()[1:4] == ["BEHIND", "critical", "serial"], line
    assert "serial 0B, last deploy unreachable" in line and "(verified by a deploy " in line, line
    assert line.endswith("serves version 5, not the live version"), line
    assert "pop2                 current  ok       serial " + a.serial in out
    assert out.splitlines()[-1] == "status: needs action: a.example.test: pop1 behind (exit 2)"


def test_a_failed_deploy_without_a_confirmation_time_reads_the_scan(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """State saved before `serial_at` existed: a failed last deploy says nothing of when its serial was seen, so the
    scan decides (as before)."""
    inv, store, infos = env
    a = infos["a.example.test"]
    scan_state(store, "a.example.test", at(-60), {"pop1": (a.serial, a.sha256, "ok"), "pop2": (a.serial, a.sha256, "ok")})
    deploy_state(store, "a.example.test", {"pop1": ("unreachable", at(-1), "0B")})
    code, out = status(inv, store, "a.example.test")
    assert code == 0, out
    assert "pop1                 current  ok       serial " + a.serial + ", last deploy unreachable" in out


def test_a_pop_left_on_a_version_the_store_moved_from_is_not_called_rolled_back(
        env: tuple[Path, Store, dict[str, Any]]) -> None:
    """A deploy verified version 7 there, then the live version changed (a rollback of other hosts only): the POP
    serves version 7, not the live one — no deploy rolled back there."""
    inv, store, _ = env
    store.save_json("state/deploy/a.example.test.json", {"hosts": {
        "pop1": {"status": "deployed", "at": at(-5), "serial": "0C", "version": 7, "serial_at": at(-5), "error": None}}})
    code, out = status(inv, store, "a.example.test")
    assert code == 2, out
    assert "rolled back" not in out
    assert "serial 0C, last deploy deployed" in out and out.count("serves version 7, not the live version") == 1


def test_a_settled_switch_is_not_a_verified_one(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """A switch settled from a killed run's intent (the link moved, no handshake saw what is served) does not make
    the POP current: the scan says what it serves."""
    inv, store, infos = env
    a = infos["a.example.test"]
    scan_state(store, "a.example.test", at(-60), {"pop1": ("0A", "old", "critical"), "pop2": (a.serial, a.sha256, "ok")})
    store.save_json("state/deploy/a.example.test.json", {"hosts": {
        "pop1": {"status": "deployed", "at": at(-5), "deployed_at": at(-5), "serial": a.serial, "version": 1,
                 "verified": False, "error": None}}})
    code, out = status(inv, store, "a.example.test")
    assert code == 2, out
    assert "pop1                 BEHIND   critical serial 0A, last deploy deployed" in out
    assert "verified by" not in out


def test_a_pop_serving_a_certificate_certmgr_revoked_is_critical(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """`revoke --now` killed before the replacement: every POP serves the live certificate, which certmgr revoked.
    Each POP line says so and is critical (exit 2), not `current ok`."""
    from certmgr import pins

    inv, store, infos = env
    a = infos["a.example.test"]
    scan_state(store, "a.example.test", at(-1), {"pop1": (a.serial, a.sha256, "ok"), "pop2": (a.serial, a.sha256, "ok")})
    with store.lock("test"):
        pins.record_revoked(store, "a.example.test", a.serial.lower(), version=1, reason="keyCompromise", at=NOW)
    code, out = status(inv, store, "a.example.test")
    assert code == 2, out
    assert out.count(f"critical serial {a.serial} — serves a certificate certmgr revoked (keyCompromise)") == 2, out


def test_names_filter_and_unknown_name(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """`status NAME` shows only that certificate; an unknown name is an inventory error (exit 2)."""
    inv, store, _ = env
    code, out = status(inv, store, "b.example.test", "--json")
    assert code == 0
    assert [v["name"] for v in json.loads(out)["certificates"]] == ["b.example.test"]
    code, out = status(inv, store, "nope.example.test")
    assert code == 2 and "no certificate named 'nope.example.test'" in out


@pytest.mark.parametrize(("severity", "code"), [("ok", 0), ("warning", 1), ("critical", 2), ("error", 2)])
def test_exit_status_follows_the_worst_pop(env: tuple[Path, Store, dict[str, Any]], severity: str, code: int) -> None:
    """A POP's scan severity sets the exit status: ok 0, warning 1, critical or unreachable 2."""
    inv, store, infos = env
    b = infos["b.example.test"]
    scan_state(store, "b.example.test", at(-1), {"pop1": (b.serial, b.sha256, severity)})
    got, out = status(inv, store, "b.example.test", "--json")
    assert got == code and json.loads(out)["exit_code"] == code


def test_overdue_and_expired_need_action(tmp_path: Path) -> None:
    """A certificate past its renewal time, or expired, needs action (level 2); a due one is the timer's business."""
    inv = loads(INV)
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        store.activate("a.example.test", store.add_version("a.example.test", material("a.example.test", days=0.5)))
        store.activate("b.example.test", store.add_version("b.example.test", material("b.example.test", days=29.5)))
    views = {v.name: v for v in status_mod.gather(inv, store, now=NOW)}
    assert views["a.example.test"].findings() == [(2, "renewal overdue")]
    assert views["b.example.test"].decision.due and views["b.example.test"].findings() == []
    later = status_mod.gather(inv, store, now=NOW + dt.timedelta(days=1))
    assert later[0].findings()[0] == (2, "expired")
    assert status_mod.exit_code(later) == 2


def test_a_failed_attempt_inside_the_window_is_the_timers_business(tmp_path: Path) -> None:
    """A renewal that failed once inside the window (plan calls it overdue) needs no human until the grace passes."""
    from certmgr import renew as renew_mod
    from certmgr.plan import RenewState

    inv = loads(INV)
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        store.activate("b.example.test", store.add_version("b.example.test", material("b.example.test", days=29.5)))
    store.save_json(renew_mod.state_path("b.example.test"),
                    RenewState(failures=1, last_attempt=NOW - dt.timedelta(minutes=5), last_error="boom").to_json())
    [view] = status_mod.gather(inv, store, now=NOW, certs=inv.select(["b.example.test"]))
    assert view.decision.overdue and view.failures == 1
    assert view.findings() == []
    [later] = status_mod.gather(inv, store, now=NOW + dt.timedelta(days=1, hours=1), certs=inv.select(["b.example.test"]))
    assert later.findings() == [(2, "renewal overdue")]


def test_an_interrupted_deploy_needs_action(env: tuple[Path, Store, dict[str, Any]]) -> None:
    """A POP with an unsettled deploy intent (an interrupted deploy) needs action: `certmgr deploy NAME` settles it."""
    import dataclasses

    _, store, infos = env
    b = infos["b.example.test"]
    scan_state(store, "b.example.test", at(-1), {"pop1": (b.serial, b.sha256, "ok")})
    [view] = status_mod.gather(loads(INV), store, now=NOW, certs=loads(INV).select(["b.example.test"]))
    assert view.findings() == []
    pop = dataclasses.replace(view.pops[0], unsettled=True)
    assert dataclasses.replace(view, pops=(pop,)).findings() == [(2, "pop1 deploy interrupted")]
