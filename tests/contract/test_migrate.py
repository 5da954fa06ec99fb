"""`certmgr store migrate`: directory → PostgreSQL and back, idempotent, numbers kept, verified, source marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from certmgr.cli import main
from certmgr.material import CertMaterial
from certmgr.store import Store
from lab.pg import RUNTIME, PgServer
from tests.contract.conftest import FIXED, SEALER

pytestmark = pytest.mark.integration

INVENTORY = """
[store]
url = "{url}"
password_file = "pg-password"
key_file = "store-key"

[ca.pebble]
directory = "https://127.0.0.1:14000/dir"
contact = ["mailto:ops@hachyderm.test"]
agree_tos = true

[dns.lab]
type = "rfc2136"
zones = ["hachyderm.test"]
server = "127.0.0.1"
tsig_key = "certmgr-lab"
tsig_secret_file = "tsig.key"

[hosts.sally]
address = "127.0.1.2"

[[certificates]]
name = "media.hachyderm.test"
domains = ["media.hachyderm.test"]
hosts = ["sally"]
"""


@pytest.fixture
def setup(tmp_path: Path, fresh_schema: PgServer, materials: list[CertMaterial]) -> dict[str, Any]:
    """A directory store with a pruned gap (versions 2 and 3 of one name, live 2), state, an account, audit rows."""
    state = tmp_path / "state"
    d = Store.open(state, clock=lambda: FIXED)
    with d.lock("setup"):
        for m in materials:
            d.add_version("media.hachyderm.test", m)
        d.activate("media.hachyderm.test", 3)
        d.prune("media.hachyderm.test", 2)  # v1 goes (prune keeps live and the version before it)
        d.activate("media.hachyderm.test", 2)  # then a rollback: live 2 of the versions 2 and 3
        d.add_version("other.hachyderm.test", materials[0])
        d.activate("other.hachyderm.test", 1)
    d.save_json("state/renew/media.hachyderm.test.json", {"failures": 1})
    d.save_json("accounts/pebble/account.json", {"uri": "https://127.0.0.1:14000/acct/1"})
    d.save_account_key("pebble", materials[2].privkey)
    (tmp_path / "pg-password").write_text(fresh_schema.passwords[RUNTIME])
    key_line = "k1 " + __import__("base64").b64encode(bytes(range(32))).decode()
    (tmp_path / "store-key").write_text(key_line + "\n")
    (tmp_path / "tsig.key").write_text("x")
    inv = tmp_path / "domains.toml"
    inv.write_text(INVENTORY.format(url=fresh_schema.url()))
    assert SEALER.current == "k1"
    return {"state": state, "inv": inv, "url": fresh_schema.url(), "dir": d}


def _cli(setup: dict[str, Any], *args: str) -> Any:
    return CliRunner().invoke(main, ["--inventory", str(setup["inv"]), "--state-dir", str(setup["state"]), *args],
                              catch_exceptions=False)


def test_migrate_to_postgres_and_back_keeps_everything(setup: dict[str, Any]) -> None:
    """Dir → PG copies versions with their numbers, live, state, account and audit; re-running copies nothing; back again restores the directory's use."""
    d: Store = setup["dir"]
    before = {n: (d.versions(n), d.live_version(n), [d.read(n, v) for v in d.versions(n)]) for n in d.names()}
    res = _cli(setup, "store", "migrate", "--from", str(setup["state"]), "--to", setup["url"], "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert (report["names"], report["versions_copied"], report["verified_versions"]) == (2, 3, 3)
    again = json.loads(_cli(setup, "store", "migrate", "--from", str(setup["state"]), "--to", setup["url"],
                            "--json").output)
    assert (again["versions_copied"], again["versions_present"], again["documents_copied"],
            again["audit_rows_copied"]) == (0, 3, 0, 0)
    from certmgr.storeopen import configured, open_pg
    cfg = configured(setup["inv"])
    assert cfg is not None
    pg = open_pg(cfg)
    try:
        assert {n: (pg.versions(n), pg.live_version(n), [pg.read(n, v) for v in pg.versions(n)])
                for n in pg.names()} == before
        assert pg.load_json("state/renew/media.hachyderm.test.json") == {"failures": 1}
        assert pg.load_account_key("pebble") == d.load_account_key("pebble")
        actions = [e["action"] for e in pg.read_audit()]
        assert actions.count("add_version") == 4 and actions.count("prune") == 1
    finally:
        pg.close()
    # the directory is marked: a command using it without [store] is refused
    moved = json.loads((setup["state"] / "MOVED-TO").read_text())
    assert moved["to"] == setup["url"].split("@")[-1]
    back = _cli(setup, "store", "migrate", "--from", setup["url"], "--to", str(setup["state"]), "--json")
    assert back.exit_code == 0, back.output
    assert not (setup["state"] / "MOVED-TO").exists()
    pg = open_pg(cfg, check_moved=False)
    try:
        assert pg.load_json("state/store-moved-to.json")["to"] == str(setup["state"])
    finally:
        pg.close()


def test_a_marked_directory_is_refused(setup: dict[str, Any]) -> None:
    """After migrating away, opening the directory store (no [store] in the inventory) fails naming where it went."""
    assert _cli(setup, "store", "migrate", "--from", str(setup["state"]), "--to", setup["url"]).exit_code == 0
    from certmgr.errors import StoreError
    from certmgr.storeopen import open_store
    with pytest.raises(StoreError, match=r"^store .*/state: moved to 127.0.0.1:\d+/certmgr on .* \(not used\)$"):
        open_store(setup["state"], setup["state"] / "no-inventory.toml", readonly=False)


def test_a_differing_version_stops_the_migration(setup: dict[str, Any], materials: list[CertMaterial]) -> None:
    """A destination holding a different version under the same number is not overwritten: exit 1, source unmarked."""
    from certmgr.storeopen import configured, open_pg
    cfg = configured(setup["inv"])
    assert cfg is not None
    pg = open_pg(cfg)
    try:
        with pg.lock("other"):
            pg.put_version("other.hachyderm.test", 1, materials[1])
    finally:
        pg.close()
    res = CliRunner().invoke(main, ["--inventory", str(setup["inv"]), "--state-dir", str(setup["state"]), "store",
                                    "migrate", "--from", str(setup["state"]), "--to", setup["url"]])
    assert res.exit_code == 1
    assert "store migrate other.hachyderm.test: version 1 differs between" in res.output
    assert not (setup["state"] / "MOVED-TO").exists()


def test_pending_orders_are_resealed_idempotent_and_never_overwritten(setup: dict[str, Any]) -> None:
    """A pending order in the directory reaches the database sealed (same key, CSR, URL); a second migrate finds it
    there; an unreadable record is counted and not copied; a different order already at the target stops it."""
    from certmgr import orders
    from certmgr.storeopen import configured, open_pg
    from tests.contract.test_ha_orders import pending

    d: Store = setup["dir"]
    order = pending()
    orders.save(d, order)
    d.save_json(orders.order_path("broken.hachyderm.test"), {"cert": "broken.hachyderm.test"})
    args = ("store", "migrate", "--from", str(setup["state"]), "--to", setup["url"], "--json")
    first = json.loads(_cli(setup, *args).output)
    assert (first["orders_copied"], first["orders_present"], first["orders_unreadable"]) == (1, 0, 1)
    again = json.loads(_cli(setup, *args).output)
    assert (again["orders_copied"], again["orders_present"], again["orders_unreadable"]) == (0, 1, 1)
    cfg = configured(setup["inv"])
    assert cfg is not None
    pg = open_pg(cfg)
    try:
        assert orders.load(pg, order.cert) == order
        assert "privkey_sealed" in pg.load_json(orders.order_path(order.cert))
        assert pg.load_json(orders.order_path("broken.hachyderm.test")) is None
        orders.save(pg, pending(url="https://ca.test/my-order/2"))  # the database's own order since
    finally:
        pg.close()
    res = CliRunner().invoke(main, ["--inventory", str(setup["inv"]), "--state-dir", str(setup["state"]), "store",
                                    "migrate", "--from", setup["url"], "--to", str(setup["state"])])
    assert res.exit_code == 1
    assert (f"store migrate {orders.order_path(order.cert)}: a different pending order is already in "
            f"{setup['state']} (nothing overwritten)") in res.output
    assert orders.load(d, order.cert) == order
