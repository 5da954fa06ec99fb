"""`certmgr revoke NAME` on the real lab: a new key issued by Pebble, deployed to 4 POPs, then the old certificate
revoked — checked through Pebble's management interface (/cert-status-by-serial)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import Lab
from tests.integration.lifecycle import (
    MEDIA,
    audit,
    cert_status,
    certmgr,
    copy_store,
    live,
    ok,
    reusing_key,
    serial_of,
    served,
    spki_of,
)
from tests.receiver import Receiver

pytestmark = pytest.mark.integration

KEY_COMPROMISE, SUPERSEDED = 1, 4  # RFC 5280 §5.3.1 CRLReason


@pytest.fixture(scope="module")
def issued(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one Pebble-issued version of media.hachyderm.test, nothing deployed yet."""
    state = tmp_path_factory.mktemp("revoke") / "state"
    ok(certmgr(lab, state, "renew", MEDIA, "--no-deploy"))
    return state


@pytest.fixture()
def state(lab: Lab, issued: Path, tmp_path: Path) -> Path:
    """A private copy of the store with a fresh version 1 (the last test revoked the module's), served everywhere."""
    s = copy_store(issued, tmp_path / "state")
    ok(certmgr(lab, s, "renew", MEDIA, "--force"))  # version 2, deployed: never revoked by an earlier test
    assert set(served(lab).values()) == {serial_of(s, 2)}
    return s


def test_revoke_replaces_with_new_key_everywhere_then_revokes(lab: Lab, state: Path, receiver: Receiver) -> None:
    """keyCompromise: a new version with a different key is served on every POP, and only then is the old serial
    revoked at the CA with reason keyCompromise; audited, recorded, on chat."""
    old = serial_of(state, 2)
    assert cert_status(lab, old)["Status"] == "Valid"
    out = ok(certmgr(lab, state, "revoke", MEDIA, "--reason", "keyCompromise"))
    assert live(state) == 3
    new = serial_of(state, 3)
    assert spki_of(state, 3) != spki_of(state, 2)
    assert served(lab) == {pop: new for pop in lab.pop_names}
    status = cert_status(lab, old)
    assert (status["Status"], status["Reason"]) == ("Revoked", KEY_COMPROMISE)
    assert cert_status(lab, new)["Status"] == "Valid"
    assert f"revoked          {MEDIA} version 2 serial {old} (keyCompromise)" in out
    assert f"revoke {MEDIA}: done in " in out

    entries = audit(state)
    actions = [e["action"] for e in entries]
    revoked_at = actions.index("revoked")
    assert all(i < revoked_at for i, e in enumerate(entries) if e["action"] == "deployed" and e["to"] == new)
    assert entries[revoked_at]["from"] == old and entries[revoked_at]["reason"] == "keyCompromise"
    assert actions[-1] == "revoke done" or "revoke done" in actions
    chat = [r.json for r in receiver.wait_for(1) if r.json["kind"] == "revoke"]
    assert chat and chat[0]["title"] == f"REVOKED {MEDIA} (keyCompromise): 1 certificate"

    # certmgr remembers: that version can never be rolled back to
    refused = certmgr(lab, state, "rollback", MEDIA, "--to", "2")
    assert refused.exit_code == 1 and "was revoked by certmgr" in refused.output


def test_revoke_keycompromise_revokes_every_version_sharing_the_key(lab: Lab, state: Path) -> None:
    """With reuse of the key (version 3 copies version 2's key), keyCompromise revokes both and says so."""
    import shutil

    lineage = state / "archive" / MEDIA
    # a third version that shares version 2's key: the store's own copy under a new number, made live
    shutil.copytree(lineage / "2", lineage / "3")
    (state / "live" / MEDIA).unlink()
    (state / "live" / MEDIA).symlink_to(f"../archive/{MEDIA}/3")
    out = ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--reason", "keyCompromise"))
    assert "versions 2, 3 share the leaked key: all are revoked" in out
    assert cert_status(lab, serial_of(state, 2))["Status"] == "Revoked"
    assert spki_of(state, 4) != spki_of(state, 2)


def test_revoke_makes_a_new_key_even_with_reuse_key(lab: Lab, state: Path, tmp_path: Path) -> None:
    """With `reuse_key = true`, renew keeps the key (versions 2 and 3 share it), but revoke issues a new one."""
    inv = reusing_key(lab, tmp_path / "inventory.toml")
    ok(certmgr(lab, state, "renew", MEDIA, "--force", inventory=inv))
    assert spki_of(state, 3) == spki_of(state, 2)
    out = ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--reason", "keyCompromise", inventory=inv))
    assert "versions 2, 3 share the leaked key: all are revoked" in out
    assert spki_of(state, 4) not in (spki_of(state, 2), spki_of(state, 1))
    assert served(lab) == {pop: serial_of(state, 4) for pop in lab.pop_names}
    assert {cert_status(lab, serial_of(state, v))["Status"] for v in (2, 3)} == {"Revoked"}


def test_revoke_now_revokes_before_deploying(lab: Lab, state: Path) -> None:
    """--now: the old serial is revoked before the replacement is deployed anywhere."""
    old = serial_of(state, 2)
    ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--reason", "keyCompromise", "--now"))
    new = serial_of(state, 3)
    entries = audit(state)
    revoked_at = next(i for i, e in enumerate(entries) if e["action"] == "revoked" and e["from"] == old)
    deployed = [i for i, e in enumerate(entries) if e["action"] == "deployed" and e["to"] == new]
    assert len(deployed) == 4 and all(i > revoked_at for i in deployed)
    assert cert_status(lab, old)["Status"] == "Revoked"
    assert served(lab) == {pop: new for pop in lab.pop_names}


def test_revoke_a_version_no_longer_live(lab: Lab, state: Path) -> None:
    """--version 1 (superseded, not live): revoked at the CA without a new certificate or any POP change."""
    v1, v2 = serial_of(state, 1), serial_of(state, 2)
    out = ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--version", "1", "--reason", "superseded"))
    assert (cert_status(lab, v1)["Status"], cert_status(lab, v1)["Reason"]) == ("Revoked", SUPERSEDED)
    assert live(state) == 2 and not (state / "archive" / MEDIA / "3").exists()
    assert served(lab) == {pop: v2 for pop in lab.pop_names}
    assert "renewed" not in out
    again = ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--version", "1", "--reason", "keyCompromise"))
    # the reason it was revoked for, not the one asked now (which the CA did not get)
    [line] = [x for x in again.splitlines() if x.startswith("skipped ")]
    assert line.startswith(f"skipped          {MEDIA} version 1 serial {v1}: already revoked by certmgr on ")
    assert line.endswith(" as superseded"), line


def test_revoke_with_a_pop_down_does_not_revoke(lab: Lab, state: Path, receiver: Receiver) -> None:
    """A POP that cannot take the replacement: the old certificate is NOT revoked, exit 1, and output and chat say
    why and what to rerun; after the POP is back the plain rerun revokes that certificate (not the replacement)."""
    old = serial_of(state, 2)
    lab.stop_pop("esme")
    try:
        result = certmgr(lab, state, "revoke", MEDIA, "--reason", "keyCompromise")
    finally:
        lab.start_pop("esme")
    assert result.exit_code == 1, result.output
    assert ("NOT revoked: esme does not serve the replacement (see above), so revoking now would break it; the old "
            f"certificate stays valid. Fix it, then rerun `certmgr revoke {MEDIA} --reason keyCompromise` (it "
            "revokes the same certificate; or add --now to revoke regardless)") in result.output
    assert cert_status(lab, old)["Status"] == "Valid"
    chat = [r.json for r in receiver.wait_for(1) if r.json["kind"] == "revoke"]
    assert chat[0]["title"] == f"REVOKE {MEDIA} INCOMPLETE (keyCompromise)"
    assert served(lab)["esme"] == old

    out = ok(certmgr(lab, state, "revoke", MEDIA, "--reason", "keyCompromise"))
    assert "resuming the revocation asked at " in out and "renewed" not in out
    assert cert_status(lab, old)["Status"] == "Revoked"
    assert cert_status(lab, serial_of(state, 3))["Status"] == "Valid" and live(state) == 3
    assert served(lab) == {pop: serial_of(state, 3) for pop in lab.pop_names}


def test_revoke_dry_run_shows_the_plan_and_changes_nothing(lab: Lab, state: Path) -> None:
    """--dry-run names what would be revoked and replaced, and leaves the store, the audit log, the CA and every POP
    as they were (no pending record either)."""
    old = serial_of(state, 2)
    before = (live(state), len(audit(state)), sorted(p.name for p in (state / "archive" / MEDIA).iterdir()))
    out = ok(certmgr(lab, state, "revoke", MEDIA, "--reason", "keyCompromise", "--dry-run"))
    assert out.splitlines() == [
        f"would do: a replacement with a new key, deployed to 4 hosts ({', '.join(lab.pop_names)}) and verified; "
        "then revoke",
        f"would revoke     {MEDIA} version 2 serial {old} (keyCompromise)",
        f"revoke {MEDIA}: dry run, nothing ordered, deployed, revoked or recorded"]
    assert (live(state), len(audit(state)), sorted(p.name for p in (state / "archive" / MEDIA).iterdir())) == before
    assert not (state / "state" / "revoking" / f"{MEDIA}.json").exists()
    assert cert_status(lab, old)["Status"] == "Valid" and served(lab) == {pop: old for pop in lab.pop_names}


def test_revoke_with_the_compromised_pop_taken_out_of_the_inventory(lab: Lab, state: Path, tmp_path: Path) -> None:
    """The runbook's way when the compromised POP is the one offline: its [hosts.*] table removed (the certificate
    names its hosts by tag), revoke replaces the key on the other POPs and revokes the old certificate."""
    old = serial_of(state, 2)
    text = lab.inventory_path.read_text()
    head, _, rest = text.partition("[hosts.esme]\n")
    assert rest, "the lab inventory has a [hosts.esme] table"
    inv = tmp_path / "inventory.toml"
    inv.write_text(head + rest[rest.index("\n["):].lstrip("\n"))
    lab.stop_pop("esme")
    try:
        out = ok(certmgr(lab, state, "revoke", MEDIA, "--no-notify", "--reason", "keyCompromise", inventory=inv))
    finally:
        lab.start_pop("esme")
    assert f"revoke {MEDIA}: done in " in out and "esme" not in out
    assert cert_status(lab, old)["Status"] == "Revoked"
    others = {pop: serial_of(state, 3) for pop in lab.pop_names if pop != "esme"}
    assert {pop: s for pop, s in served(lab).items() if pop != "esme"} == others
