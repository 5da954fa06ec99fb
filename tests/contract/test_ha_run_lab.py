"""`certmgr run` on the real lab with `[store]` pointing at PostgreSQL: everything lands in the database."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from certmgr.cli import main
from certmgr.storeopen import configured, open_pg
from lab import Lab
from lab.pg import RUNTIME, PgServer

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
