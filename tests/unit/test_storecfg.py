"""The inventory's [store] table: a postgresql:// URL without a password, secrets by reference, bounded timeouts."""

from __future__ import annotations

import pytest

from certmgr import inventory
from certmgr.errors import InventoryError
from tests.unit.test_inventory import BASE


def _load(store: str) -> inventory.Inventory:
    return inventory.loads(BASE + "\n[store]\n" + store)


def test_no_store_table_means_the_directory_store() -> None:
    """Without [store] the inventory has no store config (the state directory is used)."""
    assert inventory.loads(BASE).store is None


def test_a_store_table_is_parsed() -> None:
    """url, password and key references and idle_timeout land in StoreConfig."""
    cfg = _load('url = "postgresql://certmgr@db:5432/certmgr"\npassword_credential = "pg"\nkey_file = "/k"\n'
                'idle_timeout = 20\n').store
    assert cfg is not None
    assert (cfg.url, cfg.password.describe() if cfg.password else None, cfg.key.describe(), cfg.idle_timeout) == (
        "postgresql://certmgr@db:5432/certmgr", "credential:pg", "file:/k", 20.0)


@pytest.mark.parametrize(("body", "problem"), [
    ('url = "postgresql://certmgr:pw@db/certmgr"\nkey_file = "/k"', "store.url: must not contain a password; give it as password_credential, password_file or password_env"),
    ('url = "postgresql://certmgr@db/certmgr?password=pw"\nkey_file = "/k"', "store.url: must not contain a password; give it as password_credential, password_file or password_env"),
    ('url = "mysql://db/certmgr"\nkey_file = "/k"', "store.url: 'mysql://db/certmgr' is not a postgresql:// URL"),
    ('url = "postgresql://db/certmgr"', "store.key_file: required: the key must come from key_file, key_credential or key_env"),
    ('url = "postgresql://db/certmgr"\nkey_file = "/k"\npassword = "pw"', "store.password: secrets must not be written inline; use password_file, password_credential or password_env"),
    ('url = "postgresql://db/certmgr"\nkey_file = "/k"\nidle_timeout = 1', "store.idle_timeout: must be between 5 and 3600 seconds, not 1"),
])
def test_bad_store_tables_are_refused(body: str, problem: str) -> None:
    """Each problem in [store] names its key path."""
    with pytest.raises(InventoryError) as err:
        _load(body)
    assert problem in str(err.value)
