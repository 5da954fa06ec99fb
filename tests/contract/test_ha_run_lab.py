"""`certmgr run` on the real lab with `[store]` pointing at PostgreSQL: everything lands in the database."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from certmgr.cli import main
from certmgr.storeopen import configured, open_pg
from lab import Lab
from lab.pg import RUNTIME, PgServer
from tests.faults.conftest import wait_for

pytestmark = pytest.mark.integration


def _inventory(lab: Lab, pg: PgServer, tmp_path: Path, *, port: int | None = None) -> Path:
    (tmp_path / "pg-password").write_text(pg.passwords[RUNTIME])
    (tmp_path / "store-key").write_text(f"k1 {base64.b64encode(bytes(32)).decode()}\n")
    url = pg.url() if port is None else pg.url().replace(f":{pg.port}/", f":{port}/")
    inv = lab.inventory_path.with_name(f"domains-ha-{tmp_path.name}.toml")
    inv.write_text(lab.inventory_path.read_text() + f'\n[store]\nurl = "{url}"\n'
                   f'password_file = "{tmp_path / "pg-password"}"\nkey_file = "{tmp_path / "store-key"}"\n')
    return inv


def _certmgr(inv: Path, state: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--inventory", str(inv), "--state-dir", str(state), *args])


def test_run_with_the_postgres_store_renews_deploys_and_audits_there(lab: Lab, fresh_schema: PgServer,
                                                                     tmp_path: Path) -> None:
    """A run against the lab with [store] keeps versions, live and audit rows in PostgreSQL, nothing in the state dir."""
    lab.reseed()
    inv = _inventory(lab, fresh_schema, tmp_path)
    state = tmp_path / "state"
    res = _certmgr(inv, state, "run", "--no-notify")
    assert res.exit_code == 0, res.output
    cfg = configured(inv)
    assert cfg is not None
    store = open_pg(cfg)
    try:
        names = store.names()
        assert names and all(store.live_version(n) == 1 for n in names)
        actions = [e["action"] for e in store.read_audit()]
        assert "renewed" in actions and "deployed" in actions
        for n in names:
            stored = x509.load_pem_x509_certificate(store.read(n).cert).serial_number
            assert {lab.served_serial(pop, n) for pop in lab.pop_names} == {stored}, n
    finally:
        store.close()
    assert not (state / "archive").exists()
    status = _certmgr(inv, state, "status", "--json")
    assert status.exit_code == 0, status.output
    assert all(v["all_pops_current"] for v in json.loads(status.output)["certificates"])
    # each command closed its store when it ended (run in-process here: nothing else would have)
    wait_for(lambda: certmgr_sessions(fresh_schema) == [], 10, "the commands' database sessions to end")


def certmgr_sessions(pg: PgServer) -> list[str]:
    return pg.psql("SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE 'certmgr-%'",
                   db="certmgr").split()


def test_an_unreachable_database_fails_the_run_with_exit_69(lab: Lab, pg: PgServer, tmp_path: Path) -> None:
    """With [store] on a port where nothing listens, `certmgr run` exits 69 and writes no local state."""
    inv = _inventory(lab, pg, tmp_path, port=pg.port + 1)
    state = tmp_path / "state"
    res = _certmgr(inv, state, "run", "--no-notify")
    assert res.exit_code == 69, res.output
    assert "never falls back to local state" in res.output
    assert not state.exists()


def test_doctor_with_the_postgres_store_checks_the_database_not_the_directory(lab: Lab, fresh_schema: PgServer,
                                                                              tmp_path: Path) -> None:
    """doctor with [store]: postgres-connect/version/session and the store itself are ok; the state directory is not checked."""
    inv = _inventory(lab, fresh_schema, tmp_path)
    state = tmp_path / "absent-state"
    res = _certmgr(inv, state, "doctor", "--json", "--timer-interval", "12h")
    report = json.loads(res.output)
    store_checks = [(c["name"], c["status"]) for c in report["checks"] if c["group"] == "store"]
    assert store_checks == [("postgres-connect", "ok"), ("postgres-version", "ok"), ("postgres-session", "ok"),
                            ("store", "ok")]
    assert next(c for c in report["checks"] if c["group"] == "store" and c["name"] == "store")["subject"] == \
        fresh_schema.url().split("@")[-1]
    assert not state.exists()


def test_prune_on_a_pop_another_controller_fenced_removes_nothing_there(lab: Lab, fresh_schema: PgServer,
                                                                         tmp_path: Path) -> None:
    """`deploy --prune 1` with [store] passes the POP lock's epoch to prune.sh: a POP whose fence file names a newer epoch of another controller keeps every version (a `fenced` audit row, step prune); the others are pruned and record this controller's epoch."""
    lab.reseed()
    inv = _inventory(lab, fresh_schema, tmp_path)
    state = tmp_path / "state"
    assert (res := _certmgr(inv, state, "run", "--no-notify")).exit_code == 0, res.output
    name = lab.certificates[0][0]
    for _ in range(2):  # versions 1, 2, 3 on every POP of `name`, live 3
        assert (res := _certmgr(inv, state, "renew", name, "--force")).exit_code == 0, res.output
    pops = [p for p in lab.pop_names if (lab.pop_paths(p).cert_root / "archive" / name / "3").is_dir()]
    assert len(pops) >= 2, pops
    fenced_pop, others = pops[0], pops[1:]
    fence_file = lab.pop_paths(fenced_pop).cert_root / "archive" / ".certmgr-fence"
    fence_file.write_text("999999 other-controller/1\n")
    fence_file.chmod(0o644)
    try:
        res = _certmgr(inv, state, "deploy", name, "--prune", "1")
        assert res.exit_code == 0, res.output

        def versions(pop: str) -> list[str]:
            return sorted(e.name for e in (lab.pop_paths(pop).cert_root / "archive" / name).iterdir()
                          if e.name.isdigit())

        assert versions(fenced_pop) == ["1", "2", "3"]
        assert fence_file.read_text() == "999999 other-controller/1\n"
        for pop in others:
            assert versions(pop) == ["2", "3"], pop
            seen = (lab.pop_paths(pop).cert_root / "archive" / ".certmgr-fence").read_text().split()
            assert int(seen[0]) < 999999 and seen[1] != "other-controller/1", (pop, seen)
        cfg = configured(inv)
        assert cfg is not None
        store = open_pg(cfg)
        try:
            audit = list(store.read_audit())
        finally:
            store.close()
        fenced = [e for e in audit if e["action"] == "fenced"]
        assert [(e["host"], e["step"]) for e in fenced] == [(fenced_pop, "prune")], fenced
        assert "saw epoch 999999 from holder other-controller/1" in fenced[0]["summary"]
        assert sorted(e["host"] for e in audit if e["action"] == "pruned") == sorted(others)
    finally:
        fence_file.unlink(missing_ok=True)


def test_a_renewal_with_the_postgres_store_commits_four_times_fewer_when_batched(
        lab: Lab, fresh_schema: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`renew NAME --force --no-deploy` against the lab, commits counted by PgStore while the renewal is stored:
    one batch is one commit for its 5 writes, against 5 with the writes unbatched (counted around the store step
    only: the rest of the command's commits depend on whether the CA reuses authorizations)."""
    from contextlib import nullcontext

    from certmgr import renew as renew_mod

    lab.reseed()
    inv = _inventory(lab, fresh_schema, tmp_path)
    state = tmp_path / "state"
    name = lab.certificates[0][0]
    counted: list[int] = []
    record = renew_mod.record_renewal

    def counting(store: Any, *args: Any, **kw: Any) -> Any:
        before = store.commits
        try:
            return record(store, *args, **kw)
        finally:
            counted.append(store.commits - before)

    monkeypatch.setattr(renew_mod, "record_renewal", counting)
    assert (res := _certmgr(inv, state, "renew", name, "--force", "--no-deploy")).exit_code == 0, res.output
    monkeypatch.setattr(renew_mod, "batched", lambda store, what, **kw: nullcontext())
    assert (res := _certmgr(inv, state, "renew", name, "--force", "--no-deploy")).exit_code == 0, res.output
    print(f"commits storing `renew {name} --force --no-deploy`: {counted[0]} batched, {counted[1]} unbatched")
    assert counted == [1, 5], counted


def test_a_renewal_with_the_postgres_store_waits_on_the_disk_three_times_plus_once_per_zone(
        lab: Lab, fresh_schema: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`renew NAME --force --no-deploy` against the lab, PgStore's commits counted around one certificate's order and
    storing (the account's first registration is a warm-up run, not counted). Durable (waited for on the WAL flush):
    the order record before new-order, the DNS journal before the UPDATE, a `dns published` row per zone UPDATE and
    the stored renewal. Lazy (issue 18: re-derived after a database crash): the order URL, the journal drop and a
    `dns removed` row per zone. When Pebble reuses the authorizations there is no DNS step: 2 durable, 1 lazy."""
    from certmgr import renew as renew_mod

    lab.reseed()
    inv = _inventory(lab, fresh_schema, tmp_path)
    state = tmp_path / "state"
    name = lab.certificates[0][0]
    counted: list[tuple[int, int, int, int]] = []  # (commits, of which lazy, dns published rows, dns removed rows)
    real = renew_mod._issue_and_store

    async def counting(run: Any, *args: Any, **kw: Any) -> Any:
        store = run.store
        rows, commits, lazy = len(list(store.read_audit())), store.commits, store.lazy_commits
        try:
            return await real(run, *args, **kw)
        finally:
            new = [e["action"] for e in list(store.read_audit())[rows:]]
            counted.append((store.commits - commits, store.lazy_commits - lazy, new.count("dns published"),
                            new.count("dns removed")))

    assert (res := _certmgr(inv, state, "renew", name, "--force", "--no-deploy")).exit_code == 0, res.output
    monkeypatch.setattr(renew_mod, "_issue_and_store", counting)
    for _ in range(3):  # Pebble reuses an authorization half of the time: most likely at least one DNS step
        assert (res := _certmgr(inv, state, "renew", name, "--force", "--no-deploy")).exit_code == 0, res.output
    print(f"commits of `renew {name} --force --no-deploy` (commits, lazy, published, removed): {counted}")
    assert len(counted) == 3
    for commits, lazy, published, removed in counted:
        dns = 1 if published else 0  # the journal's entry before the UPDATEs, its drop after them
        assert published == removed, counted
        assert (commits - lazy, lazy) == (2 + dns + published, 1 + dns + removed), counted


def test_a_pops_switch_with_the_postgres_store_is_two_commits(
        lab: Lab, fresh_schema: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`renew NAME --force` against the lab, PgStore's commits counted around its deploy: per POP one for the intent
    and one for the `deployed` row, the deploy state and the intent's removal together (4 with those unbatched;
    before issue 18's change: 3 per POP and the state once per certificate)."""
    from contextlib import nullcontext

    import certmgr.deploy as deploy_pkg
    from certmgr import intents
    from certmgr.deploy import host as host_mod

    lab.reseed()
    inv = _inventory(lab, fresh_schema, tmp_path)
    state = tmp_path / "state"
    name = lab.certificates[0][0]
    counted: list[tuple[int, int]] = []  # (commits, POPs deployed)
    real = deploy_pkg.deploy

    async def counting(inventory: Any, store: Any, *args: Any, **kw: Any) -> Any:
        before = store.commits
        outcomes = await real(inventory, store, *args, **kw)
        counted.append((store.commits - before, sum(o.status.value == "deployed" for o in outcomes)))
        return outcomes

    monkeypatch.setattr(deploy_pkg, "deploy", counting)
    for _ in range(2):  # the first converts certbot's layout on each POP (a `converted` row of its own)
        assert (res := _certmgr(inv, state, "renew", name, "--force")).exit_code == 0, res.output
    monkeypatch.setattr(host_mod, "batched", lambda store, what, **kw: nullcontext())
    monkeypatch.setattr(intents, "batched", lambda store, what, **kw: nullcontext())
    assert (res := _certmgr(inv, state, "renew", name, "--force")).exit_code == 0, res.output
    print(f"commits deploying `renew {name} --force` (commits, POPs): {counted}")
    (batched, pops), (unbatched, pops_again) = counted[1:]
    assert pops > 1 and pops_again == pops
    assert (batched, unbatched) == (2 * pops, 4 * pops), counted
