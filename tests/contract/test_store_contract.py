"""One contract, two stores: the directory store and the PostgreSQL store behave alike where the pipeline looks."""

from __future__ import annotations

from typing import Any

import pytest

from certmgr.errors import LockHeld, StoreError
from certmgr.material import CertMaterial
from tests.contract.conftest import FIXED

pytestmark = pytest.mark.integration  # the PostgreSQL half needs root (initdb runs as `postgres`)


def test_empty_store_has_nothing(store: Any) -> None:
    """A new store lists no names, no versions, no live version, no account key and no audit rows."""
    assert store.names() == []
    assert store.versions("example.com") == []
    assert store.live_version("example.com") is None
    assert store.load_account_key("pebble") is None
    assert list(store.read_audit()) == []
    assert store.load_state("example.com") == {}
    assert store.load_json("state/x/y.json", default="dflt") == "dflt"


def test_versions_number_from_one_and_read_back_whole(store: Any, materials: list[CertMaterial]) -> None:
    """add_version numbers 1, 2, … and read(name, N) returns exactly what was stored, key included."""
    with store.lock("test"):
        assert [store.add_version("example.com", m) for m in materials[:2]] == [1, 2]
    assert store.versions("example.com") == [1, 2]
    assert store.names() == ["example.com"]
    assert store.read("example.com", 2) == materials[1]
    assert store.live_version("example.com") is None


def test_activate_returns_previous_and_read_follows_live(store: Any, materials: list[CertMaterial]) -> None:
    """activate returns the previous live version; read(name) gives the live material; re-activating is a no-op."""
    with store.lock("test"):
        for m in materials[:2]:
            store.add_version("example.com", m)
        assert store.activate("example.com", 1) is None
        assert store.activate("example.com", 2) == 1
        assert store.activate("example.com", 2) == 2
    assert store.live_version("example.com") == 2
    assert store.read("example.com") == materials[1]


@pytest.mark.parametrize(("call", "message"), [
    (lambda s: s.read("example.com"), "store example.com: no live version"),
    (lambda s: s.read("example.com", 7), "store example.com: version 7 does not exist"),
])
def test_reading_what_is_absent_fails_clearly(store: Any, call: Any, message: str) -> None:
    """Reading a missing live or missing version raises StoreError with the same message on both stores."""
    with pytest.raises(StoreError) as err:
        call(store)
    assert str(err.value) == message


def test_activating_a_missing_version_changes_nothing(store: Any, materials: list[CertMaterial]) -> None:
    """activate of a version that does not exist raises StoreError naming it and leaves live alone."""
    with store.lock("test"):
        store.add_version("example.com", materials[0])
        store.activate("example.com", 1)
        with pytest.raises(StoreError, match=r"^store example.com: cannot activate version 5: it does not exist"):
            store.activate("example.com", 5)
    assert store.live_version("example.com") == 1


def test_writers_must_hold_the_lock(store: Any, materials: list[CertMaterial]) -> None:
    """add_version, activate and prune outside lock() are refused before anything is written."""
    for call in (lambda: store.add_version("example.com", materials[0]), lambda: store.activate("example.com", 1),
                 lambda: store.prune("example.com", 1)):
        with pytest.raises(RuntimeError):
            call()
    assert store.versions("example.com") == []


def test_prune_keeps_newest_and_live(store: Any, materials: list[CertMaterial]) -> None:
    """prune(keep=1) removes old versions but never the live one, and audits what it removed."""
    with store.lock("test"):
        for m in materials:
            store.add_version("example.com", m)
        store.activate("example.com", 1)
        assert store.prune("example.com", 1) == [2]
    assert store.versions("example.com") == [1, 3]
    assert next(e for e in store.read_audit() if e["action"] == "prune")["removed"] == [2]


def test_version_numbers_continue_after_prune(store: Any, materials: list[CertMaterial]) -> None:
    """After pruning, the next version is max + 1 of what remains."""
    with store.lock("test"):
        store.add_version("example.com", materials[0])
        store.add_version("example.com", materials[1])
        store.activate("example.com", 2)
        store.prune("example.com", 0)
        assert store.add_version("example.com", materials[2]) == 3


def test_audit_rows_for_version_writes(store: Any, materials: list[CertMaterial]) -> None:
    """add_version and activate each leave one audit row with time, the lock's actor, serial and from/to."""
    with store.lock("certmgr renew"):
        store.add_version("example.com", materials[0])
        store.activate("example.com", 1)
    rows = list(store.read_audit())
    assert [(r["action"], r["object"], r["from"], r["to"], r["actor"]) for r in rows] == [
        ("add_version", "example.com", None, 1, "certmgr renew"),
        ("activate", "example.com", None, 1, "certmgr renew"),
    ]
    assert rows[0]["time"] == FIXED.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows[0]["serial"] == materials[0].info().serial


def test_audit_refuses_private_keys_and_reserved_keys(store: Any, materials: list[CertMaterial]) -> None:
    """audit() raises ValueError for PEM private key material or a reserved field, and writes nothing."""
    with pytest.raises(ValueError, match="private key"):
        store.audit("oops", "example.com", detail=materials[0].privkey.decode())
    with pytest.raises(ValueError, match="reserved keys"):
        store.audit("oops", "example.com", time="x")
    assert list(store.read_audit()) == []


def test_audit_is_oldest_first_with_extras(store: Any) -> None:
    """Audit rows come back oldest first with their extra fields."""
    store.audit("a", "x", actor="me", n=1)
    store.audit("b", "y", frm=1, to=2, actor="me", names=["a", "b"])
    rows = list(store.read_audit())
    assert [(r["action"], r["object"]) for r in rows] == [("a", "x"), ("b", "y")]
    assert rows[1]["names"] == ["a", "b"] and rows[0]["n"] == 1


def test_json_round_trip_list_and_remove(store: Any) -> None:
    """save_json/load_json round-trip; list_json returns the documents under a directory by path; remove_json removes."""
    store.save_json("state/notify/b.json", {"k": [1, 2]})
    store.save_json("state/notify/a.json", {"k": "a", "when": FIXED})
    store.save_json("state/other.json", {"no": True})
    assert store.load_json("state/notify/a.json") == {"k": "a", "when": "2026-11-27T02:00:03Z"}
    assert store.list_json("state/notify") == [{"k": "a", "when": "2026-11-27T02:00:03Z"}, {"k": [1, 2]}]
    store.remove_json("state/notify/a.json")
    store.remove_json("state/notify/absent.json")
    assert store.load_json("state/notify/a.json") is None


def test_list_json_with_a_prefix_reads_only_the_matching_documents_right_under_the_directory(store: Any) -> None:
    """list_json(reldir, prefix) returns, by path, only the documents directly in reldir whose names start with prefix."""
    store.save_json("state/intents/c.test/pop-1.b.json", {"n": "1b"})
    store.save_json("state/intents/c.test/pop-1.a.json", {"n": "1a"})
    store.save_json("state/intents/c.test/pop-10.a.json", {"n": "10a"})
    store.save_json("state/intents/c.test/pop-1.x/deeper.json", {"n": "deeper"})
    store.save_json("state/intents/c.test/pop-2.a.json", {"n": "2a"})
    assert store.list_json("state/intents/c.test", "pop-1.") == [{"n": "1a"}, {"n": "1b"}]
    assert store.list_json("state/intents/c.test", "pop-[") == []
    assert len(store.list_json("state/intents/c.test")) == 5


@pytest.mark.parametrize("relpath", ["archive/x.json", "state/../lock", "state/.hidden.json", "lock"])
def test_json_paths_outside_state_are_refused(store: Any, relpath: str) -> None:
    """JSON paths outside state/ or accounts/, with '..' or hidden names, are refused by both stores."""
    with pytest.raises(StoreError, match=r"is not a state path$"):
        store.save_json(relpath, {})


def test_state_round_trip(store: Any) -> None:
    """save_state/load_state keep a certificate's state dict."""
    store.save_state("example.com", {"failures": 2, "last": "x"})
    assert store.load_state("example.com") == {"failures": 2, "last": "x"}


def test_account_key_is_kept_and_not_replaced_by_accident(store: Any, materials: list[CertMaterial]) -> None:
    """save_account_key stores the key, refuses a second one unless replace=True."""
    key = materials[0].privkey
    store.save_account_key("pebble", key)
    assert store.load_account_key("pebble") == key
    with pytest.raises(StoreError, match=r"^store accounts/pebble: an account key already exists \(kept\)$"):
        store.save_account_key("pebble", materials[1].privkey)
    store.save_account_key("pebble", materials[1].privkey, replace=True)
    assert store.load_account_key("pebble") == materials[1].privkey


def test_lock_is_exclusive_between_two_openers(store: Any, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    """A second opener of the same store gets LockHeld naming the holder while the first holds lock()."""
    if type(store).__name__ == "Store":
        from certmgr.store import Store
        other: Any = Store.open(store.root)
    else:
        from tests.contract.conftest import open_pg
        other = open_pg(request.getfixturevalue("pg"))
    try:
        with store.lock("holder-actor"):
            with pytest.raises(LockHeld, match="holder-actor") as err:
                with other.lock("second"):
                    pass
            assert err.value.exit_code == 75
        with other.lock("second"):
            pass
    finally:
        if hasattr(other, "close"):
            other.close()


def test_names_are_checked(store: Any) -> None:
    """A name with a slash or '..' is refused by both stores."""
    with pytest.raises(StoreError):
        store.versions("../etc")


def test_a_pending_revocation_round_trips_on_both_stores(store: Any, materials: list[CertMaterial]) -> None:
    """The record of an unfinished `certmgr revoke` (certificates included) reads back whole; cleared, it is gone;
    the renewal plan sees a live certificate certmgr revoked."""
    import datetime as dt

    from certmgr import pins
    from certmgr.renew import revoked_reason

    with store.lock("test"):
        store.activate("example.com", store.add_version("example.com", materials[0]))
    info = store.read("example.com").info()
    pending = pins.PendingRevocation(reason="keyCompromise", versions=(1,), serials=(info.serial,), now_first=True,
                                     at=dt.datetime(2026, 12, 4, tzinfo=dt.UTC), spki="3059",
                                     leaves=(materials[0].cert.decode(),))
    pins.save_pending(store, "example.com", pending)
    assert pins.load_pending(store, "example.com") == pending and pins.revocation_pending(store, "example.com")
    assert pins.pending_note(store, "example.com") == pending.note("example.com")
    assert revoked_reason(store, "example.com", info) is None
    pins.record_revoked(store, "example.com", info.serial, version=1, reason="keyCompromise", at=pending.at)
    assert revoked_reason(store, "example.com", info) == "keyCompromise"
    pins.clear_pending(store, "example.com")
    assert pins.load_pending(store, "example.com") is None and pins.pending_note(store, "example.com") is None
