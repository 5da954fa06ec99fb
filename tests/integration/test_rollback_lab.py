"""`certmgr rollback NAME` on the real lab: Pebble-issued versions, 4 sshd+nginx POPs, handshakes, the pin."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from certmgr.material import CertMaterial
from certmgr.store import Store
from lab import Lab, pki
from tests.helpers import tree_digest
from tests.integration.lifecycle import (
    MEDIA,
    audit,
    certmgr,
    copy_store,
    live,
    ok,
    serial_of,
    served,
)
from tests.receiver import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def issued(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two Pebble-issued versions of media.hachyderm.test (2 live), nothing deployed yet."""
    state = tmp_path_factory.mktemp("rollback") / "state"
    ok(certmgr(lab, state, "renew", MEDIA, "--no-deploy"))
    ok(certmgr(lab, state, "renew", MEDIA, "--force", "--no-deploy"))
    assert live(state) == 2
    return state


@pytest.fixture()
def state(lab: Lab, issued: Path, tmp_path: Path) -> Path:
    """A private copy of the issued store, with every POP serving its live version 2."""
    s = copy_store(issued, tmp_path / "state")
    ok(certmgr(lab, s, "deploy", MEDIA))
    assert set(served(lab).values()) == {serial_of(s, 2)}
    return s


def test_rollback_to_previous_everywhere_pinned_until_deploy(lab: Lab, state: Path, receiver: Receiver) -> None:
    """Rollback serves version 1 on every POP, switches the store, audits, tells chat; `run` keeps the pin and says
    so; `deploy NAME` clears it and version 2 is served again."""
    v1, v2 = serial_of(state, 1), serial_of(state, 2)
    out = ok(certmgr(lab, state, "rollback", MEDIA))
    assert (f"rolled back {MEDIA}: version 2 (serial {v2}) → version 1 (serial {v1}) on cdn-frankfurt-1, "
            "cdn-fremont-1, sally, esme") in out
    assert f"pinned {MEDIA} to version 1" in out
    assert served(lab) == {pop: v1 for pop in lab.pop_names}
    assert live(state) == 1
    entries = audit(state)
    assert [(e["from"], e["to"]) for e in entries if e["action"] == "activate"][-1] == (2, 1)
    assert [e for e in entries if e["action"] == "rollback"][-1]["hosts"] == lab.pop_names
    done = [e for e in entries if e["action"] == "rollback done"][-1]
    assert (done["from"], done["to"], done["serial"], done["failed"]) == (2, 1, v1, [])
    assert sorted(e["host"] for e in entries if e["action"] == "deployed" and e["to"] == v1) == sorted(lab.pop_names)
    chat = [r.json for r in receiver.wait_for(1)]
    assert chat[0]["kind"] == "rollback" and chat[0]["title"] == f"ROLLED BACK {MEDIA} to version 1 on 4 of 4 hosts"
    assert "  renewal: not due — pinned to rolled-back version 1 (" in ok(certmgr(lab, state, "status"))

    out = certmgr(lab, state, "run", "--no-notify").output
    assert f"pinned {MEDIA} to rolled-back version 1 (from version 2, " in out
    assert f"`certmgr deploy {MEDIA}` or `certmgr renew {MEDIA}` clears the pin" in out
    assert f"renewed  {MEDIA}" not in out
    assert served(lab) == {pop: v1 for pop in lab.pop_names}
    assert live(state) == 1

    out = ok(certmgr(lab, state, "deploy", MEDIA))
    assert f"unpinned {MEDIA}: version 2 live again (was pinned to rolled-back version 1)" in out
    assert served(lab) == {pop: v2 for pop in lab.pop_names}
    assert live(state) == 2
    assert [e for e in audit(state) if e["action"] == "unpinned"][-1]["from"] == 1
    assert "pinned" not in certmgr(lab, state, "run", "--no-notify").output


def test_renew_name_clears_the_pin_by_renewing(lab: Lab, state: Path, receiver: Receiver) -> None:
    """`renew NAME` on a pinned certificate renews at once (it would not be due), deploys the new version and
    clears the pin; the next `run` no longer mentions it."""
    ok(certmgr(lab, state, "rollback", MEDIA, "--no-notify"))
    out = ok(certmgr(lab, state, "renew", MEDIA))
    assert f"renewed  {MEDIA}: serial {serial_of(state, 1)}" in out
    assert "pin on rolled-back version 1 cleared" in out
    assert live(state) == 3
    assert served(lab) == {pop: serial_of(state, 3) for pop in lab.pop_names}
    assert [e for e in audit(state) if e["action"] == "unpinned"][-1]["why"].startswith("renewed: version 3 is live")
    assert "pinned" not in certmgr(lab, state, "run", "--no-notify").output
    assert not [r for r in receiver.requests if r.json["kind"] == "rollback"]  # --no-notify


def _expired_version(state: Path) -> int:
    """Version 3: a leaf for media.hachyderm.test that expired yesterday (its key matches)."""
    ca = pki.make_ca("rollback test CA", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    leaf = pki.make_leaf(ca, [MEDIA], not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=20),
                         not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    store = Store.open(state)
    with store.lock("test"):
        return store.add_version(MEDIA, CertMaterial(cert=leaf.cert_pem, chain=ca.cert_pem, privkey=leaf.key_pem))


def _mismatched_version(state: Path) -> int:
    """Version 4, written straight into the archive: version 2's certificate with version 1's private key."""
    lineage = state / "archive" / MEDIA
    v4 = lineage / "4"
    v4.mkdir(mode=0o700)
    for f in ("cert.pem", "chain.pem", "fullchain.pem"):
        (v4 / f).write_bytes((lineage / "2" / f).read_bytes())
    fd = os.open(v4 / "privkey.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (lineage / "1" / "privkey.pem").read_bytes())
    os.close(fd)
    return 4


def test_rollback_refuses_expired_revoked_and_mismatched_versions(lab: Lab, state: Path) -> None:
    """An expired version, one revoked by certmgr, and one whose key does not match are refused up front; nothing
    changes in the store or on any POP."""
    expired = _expired_version(state)
    mismatched = _mismatched_version(state)
    ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--version", "1", "--reason", "superseded"))
    cases = [
        (str(expired), f"rollback {MEDIA}: version {expired} refused: expired: notAfter "),
        ("1", f"rollback {MEDIA}: version 1 refused: serial {serial_of(state, 1)} was revoked by certmgr on "),
        (str(mismatched), f"rollback {MEDIA}: version {mismatched} refused: its private key does not match its "
                          "certificate (certificate and private key do not match)"),
    ]
    before = tree_digest(state / "archive"), (state / "live" / MEDIA).readlink(), served(lab)
    for version, message in cases:
        result = certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--to", version)
        assert result.exit_code == 1, result.output
        assert f"certmgr: error: {message}" in result.output, result.output
        assert result.output.rstrip().splitlines()[-2].endswith("(nothing changed)"), result.output
    assert (tree_digest(state / "archive"), (state / "live" / MEDIA).readlink(), served(lab)) == before
    assert not (state / "state" / "pin" / f"{MEDIA}.json").exists()


def test_rollback_hosts_subset(lab: Lab, state: Path) -> None:
    """--hosts tag:canary,esme rolls back only those POPs now; the others keep version 2 and the output says so."""
    v1, v2 = serial_of(state, 1), serial_of(state, 2)
    out = ok(certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--hosts", "tag:canary,esme"))
    assert served(lab) == {"cdn-frankfurt-1": v1, "cdn-fremont-1": v2, "sally": v2, "esme": v1}
    assert "not touched now: cdn-fremont-1, sally; they still serve what they had" in out
    shown = certmgr(lab, state, "status", MEDIA)
    assert shown.exit_code == 2, shown.output
    for pop in ("cdn-fremont-1", "sally"):  # verified on version 2 by the fixture's deploy: not on live 1, no rollback
        [row] = [x for x in shown.output.splitlines() if x.strip().startswith(pop)]
        assert f"serial {v2}," in row and row.endswith("serves version 2, not the live version"), row
    assert "a deploy rolled back" not in shown.output
    before = tree_digest(state), served(lab)
    for empty in ("", ","):  # an empty shell variable must not mean "every host"
        bad = certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--to", "1", "--hosts", empty)
        assert bad.exit_code == 2 and f"--hosts: {empty!r} names nothing" in bad.output, bad.output
    bad = certmgr(lab, state, "deploy", MEDIA, "--hosts", "")
    assert bad.exit_code == 2 and "--hosts: '' names nothing" in bad.output, bad.output
    assert (tree_digest(state), served(lab)) == before
    ok(certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--to", "1"))  # the rest follow
    assert served(lab) == {pop: v1 for pop in lab.pop_names}
    bad = certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--to", "1", "--hosts", "nowhere")
    assert bad.exit_code == 2 and "rollback --hosts: no host or tag 'nowhere' in the inventory" in bad.output


def test_rollback_dry_run_changes_nothing(lab: Lab, state: Path) -> None:
    """--dry-run checks the version and prints the plan; the store, the POPs and the audit log are untouched."""
    before = tree_digest(state), served(lab)
    out = ok(certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--dry-run"))
    assert f"would roll back {MEDIA}: version 2 (serial {serial_of(state, 2)}) → version 1" in out
    assert "(dry run: nothing changed)" in out
    assert (tree_digest(state), served(lab)) == before


def test_rollback_with_a_pop_down_says_where_it_did_not_happen(lab: Lab, state: Path) -> None:
    """A POP that cannot be reached keeps what it served; exit 1 and the output names it and the command to rerun."""
    v1, v2 = serial_of(state, 1), serial_of(state, 2)
    lab.stop_pop("sally")
    try:
        result = certmgr(lab, state, "rollback", MEDIA, "--no-notify")
        assert result.exit_code == 1, result.output
        assert f"NOT rolled back on sally (each kept what it served, see above); the store's live version is 1: " \
               f"rerun `certmgr rollback {MEDIA} --to 1`" in result.output
    finally:
        lab.start_pop("sally")
    assert served(lab) == {"cdn-frankfurt-1": v1, "cdn-fremont-1": v1, "sally": v2, "esme": v1}
    # status says what sally serves: version 2, which the fixture's deploy verified (the rollback could not reach it)
    shown = certmgr(lab, state, "status", MEDIA)
    assert shown.exit_code == 2, shown.output
    [row] = [x for x in shown.output.splitlines() if x.strip().startswith("sally")]
    assert row.split()[1] == "BEHIND" and f"serial {v2}, last deploy unreachable" in row, row
    assert "(verified by a deploy " in row and row.endswith("serves version 2, not the live version"), row
    ok(certmgr(lab, state, "rollback", MEDIA, "--no-notify", "--to", "1"))
    assert served(lab) == {pop: v1 for pop in lab.pop_names}
