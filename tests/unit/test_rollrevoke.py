"""Rollback pins (plan.pin_hold, certmgr.pins), rollback's version choice, revoke's targets — no lab."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from certmgr import pins
from certmgr.errors import UsageError
from certmgr.inventory import Certificate
from certmgr.material import CertInfo, CertMaterial
from certmgr.plan import RenewState, decide
from certmgr.revoke import targets
from certmgr.rollback import choose
from certmgr.store import Store
from lab import pki

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
NAME = "media.hachyderm.test"


def cert() -> Certificate:
    return Certificate(name=NAME, domains=(NAME,), dns="lab", hosts=(), ca="pebble")


def info(days: float) -> CertInfo:
    return CertInfo(serial="aa", sha256="00", subject="", issuer="", not_before=T0, not_after=T0 + days * DAY,
                    names=(NAME,), key_type="ecdsa-p256")


@pytest.mark.parametrize(("day", "due", "reason"), [
    # 90-day certificate: the renewal window opens at day 60 (1/3 left); a pin holds renewal until 10 days remain
    (30, False, "pinned to rolled-back version 1 (60d left): renewal held until 2026-03-22 00:00Z; "
                "`certmgr renew media.hachyderm.test` or `certmgr deploy media.hachyderm.test` clears the pin"),
    (65, False, "pinned to rolled-back version 1 (25d left): renewal held until 2026-03-22 00:00Z; "
                "`certmgr renew media.hachyderm.test` or `certmgr deploy media.hachyderm.test` clears the pin"),
    (80, True, "pinned to rolled-back version 1, but only 10d left (the last third of 1/3 of lifetime before "
               "expiry): renewing clears the pin"),
    (92, True, "pinned version 1 expired 2d ago: renewing clears the pin"),
])
def test_a_pin_holds_renewal_until_the_last_third_of_the_renewal_period(day: int, due: bool, reason: str) -> None:
    """Pinned, a certificate inside its renewal window is not renewed (that would undo the rollback) until a third of
    its renewal period is left; then it is due, so a pin never lets it expire."""
    d = decide(cert(), info(90), RenewState(), T0 + day * DAY, pinned=1)
    assert (d.due, d.reason, d.source) == (due, reason, "pin")
    assert decide(cert(), info(90), RenewState(), T0 + day * DAY).due == (day >= 60)  # the same, unpinned


def test_naming_a_pinned_certificate_renews_it() -> None:
    """`renew NAME` (release_pin) makes a pinned certificate due at once."""
    d = decide(cert(), info(90), RenewState(), T0 + 30 * DAY, pinned=1, release_pin=True)
    assert d.due and d.attempt
    assert d.reason == "pinned to rolled-back version 1 (60d left): renewing as asked clears the pin"


def test_pin_round_trip_and_clear_is_audited(tmp_path: Path) -> None:
    """A pin saved is read back whole; clearing it audits "unpinned" and leaves no pin."""
    store = Store.open(tmp_path / "state")
    pin = pins.Pin(version=3, serial="ab", rolled_back_from=4, at=T0)
    pins.save_pin(store, NAME, pin)
    assert pins.load_pin(store, NAME) == pin
    assert pins.clear_pin(store, NAME, why="test") == pin
    assert pins.load_pin(store, NAME) is None
    assert pins.clear_pin(store, NAME, why="again") is None
    [line] = [e for e in store.read_audit() if e["action"] == "unpinned"]
    assert (line["from"], line["why"]) == (3, "test")


def _material() -> CertMaterial:
    leaf = pki.make_leaf(_CA, [NAME], not_before=T0, not_after=T0 + 90 * DAY)
    return CertMaterial(cert=leaf.cert_pem, chain=_CA.cert_pem, privkey=leaf.key_pem)


_CA = pki.make_ca("unit test CA", not_before=T0 - DAY)


def test_revoke_targets_follow_the_key_for_key_compromise(tmp_path: Path) -> None:
    """keyCompromise takes every version with the leaked key; another reason takes only the version named."""
    store = Store.open(tmp_path / "state")
    first = pki.make_leaf(_CA, [NAME], not_before=T0, not_after=T0 + 90 * DAY)
    with store.lock("test"):
        store.add_version(NAME, _material())  # 1: its own key
        store.add_version(NAME, CertMaterial(cert=first.cert_pem, chain=_CA.cert_pem, privkey=first.key_pem))  # 2
        again = pki.make_leaf(_CA, [NAME], not_before=T0, not_after=T0 + 90 * DAY, key=first.key)
        store.activate(NAME, store.add_version(NAME, CertMaterial(cert=again.cert_pem, chain=_CA.cert_pem,
                                                                  privkey=again.key_pem)))  # 3, live, key of 2
    now = T0 + DAY
    todo, notes, _ = targets(store, NAME, reason="keyCompromise", version=None, serial=None, now=now)
    assert [t.version for t in todo] == [2, 3] and notes == ["versions 2, 3 share the leaked key: all are revoked"]
    todo, notes, _ = targets(store, NAME, reason="superseded", version=None, serial=None, now=now)
    assert [t.version for t in todo] == [3] and notes == []
    todo, _, _ = targets(store, NAME, reason="keyCompromise", version=1, serial=None, now=now)
    assert [(t.version, t.status) for t in todo] == [(1, "pending")]
    todo, _, _ = targets(store, NAME, reason="superseded", version=None, serial="0x" + todo[0].serial, now=now)
    assert [t.version for t in todo] == [1]
    todo, _, _ = targets(store, NAME, reason="superseded", version=1, serial=None, now=T0 + 100 * DAY)
    assert todo[0].status == "skipped: expired (a CA no longer revokes it; no client accepts it)"
    with pytest.raises(UsageError, match=r"^revoke media.hachyderm.test --version 9: no version 9 in the store "
                                         r"\(versions: 1, 2, 3; nothing revoked\)$"):
        targets(store, NAME, reason="superseded", version=9, serial=None, now=now)


def test_rollback_chooses_the_version_below_live(tmp_path: Path) -> None:
    """Without --to the version below the live one; --to must name a stored version; the oldest has no previous."""
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        for _ in range(3):
            store.add_version(NAME, _material())
        store.activate(NAME, 3)
    assert choose(store, NAME, None) == (2, 3)
    assert choose(store, NAME, 1) == (1, 3)
    with pytest.raises(UsageError, match=r"--to 7: no version 7 in the store \(versions: 1, 2, 3; nothing changed\)"):
        choose(store, NAME, 7)
    with store.lock("test"):
        store.activate(NAME, 1)
    with pytest.raises(UsageError, match="live version 1 is the oldest stored"):
        choose(store, NAME, None)


def test_run_says_pinned_and_chat_says_when_a_renewal_cleared_a_pin() -> None:
    """`run` prints each pin; its chat summary says when a renewal that could wait no longer replaced a pinned
    version."""
    from certmgr import pipeline
    from certmgr.renew import RenewOutcome
    from certmgr.scan import ScanResult

    pin = pins.Pin(version=1, serial="ab", rolled_back_from=2, at=T0)
    note = pin.note(NAME)
    assert note == (f"pinned {NAME} to rolled-back version 1 (from version 2, 2026-01-01 00:00Z): run keeps version 1 "
                    f"live and deployed, not the newest; `certmgr deploy {NAME}` or `certmgr renew {NAME}` clears "
                    "the pin")
    scan = ScanResult(started=T0, elapsed=0.1, endpoints=(), certificates=())
    decision = decide(cert(), info(90), RenewState(), T0 + 81 * DAY, pinned=1)
    renewed = RenewOutcome(name=NAME, status="renewed", decision=decision, new_serial="cd", version=3,
                           new_not_after=T0 + 170 * DAY, unpinned=1)
    report = pipeline.RunReport(started=T0, dry_run=False, scan_before=scan, renewals=(renewed,), deploy_plan=(),
                                scan_after=scan, notes=(note,))
    assert f"  {note}" in pipeline.render(report)
    assert "pin on rolled-back version 1 cleared" in renewed.line()
    lines = pipeline.summary_message(report, ()).lines
    assert (f"unpinned {NAME}: renewal could wait no longer; rolled-back version 1 replaced by version 3 "
            f"(pinned to rolled-back version 1, but only 9d left (the last third of 1/3 of lifetime before expiry): "
            "renewing clears the pin)") in lines


def test_a_live_certificate_certmgr_revoked_renews_now_pinned_or_not() -> None:
    """decide(revoked=…): due and overdue at once, whatever the pin or the lifetime left; backoff still applies."""
    for pinned in (None, 1):
        d = decide(cert(), info(90), RenewState(), T0 + DAY, pinned=pinned, revoked="keyCompromise")
        assert (d.due, d.overdue, d.attempt, d.source) == (True, True, True, "revoked")
        assert d.reason == "the live certificate was revoked by certmgr (keyCompromise)"
    failed = RenewState(failures=1, last_attempt=T0, last_failure=T0, last_error="CA down")
    assert decide(cert(), info(90), failed, T0 + dt.timedelta(seconds=1), revoked="superseded").blocked_until


def _three_versions(store: Store) -> None:
    """Versions 1 and 2 share a key (2 live), version 3 is a replacement with its own key, made live."""
    first = pki.make_leaf(_CA, [NAME], not_before=T0, not_after=T0 + 90 * DAY)
    again = pki.make_leaf(_CA, [NAME], not_before=T0, not_after=T0 + 90 * DAY, key=first.key)
    with store.lock("test"):
        store.add_version(NAME, CertMaterial(cert=first.cert_pem, chain=_CA.cert_pem, privkey=first.key_pem))
        store.activate(NAME, store.add_version(NAME, CertMaterial(cert=again.cert_pem, chain=_CA.cert_pem,
                                                                  privkey=again.key_pem)))


def test_an_unfinished_revocation_resumes_its_own_versions_not_the_live_replacement(tmp_path: Path) -> None:
    """With a pending record, targets are the recorded versions (the leaked key), not the live replacement; a
    version whose serial no longer matches the record is named, not revoked; other requests are refused."""
    from certmgr.revoke import _resumable

    store = Store.open(tmp_path / "state")
    _three_versions(store)
    now = T0 + DAY
    todo, _, leaked = targets(store, NAME, reason="keyCompromise", version=None, serial=None, now=now)
    pending = pins.PendingRevocation(reason="keyCompromise", versions=tuple(t.version for t in todo),
                                     serials=tuple(t.serial for t in todo), now_first=False, at=now)
    pins.save_pending(store, NAME, pending)
    assert pins.load_pending(store, NAME) == pending
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, _material()))  # the replacement, version 3, is live
    assert _resumable(store, NAME, reason="keyCompromise", version=None, serial=None, now=now) == pending
    assert _resumable(store, NAME, reason="keyCompromise", version=2, serial=None, now=now) == pending
    resumed, notes, spki = targets(store, NAME, reason="keyCompromise", version=None, serial=None, now=now,
                                   pending=pending)
    assert [(t.version, t.status) for t in resumed] == [(1, "pending"), (2, "pending")] and spki == leaked
    assert notes == ["resuming the revocation asked at 2026-01-02 00:00Z (keyCompromise): versions 1, 2"]
    for reason, version in (("superseded", None), ("keyCompromise", 3)):
        with pytest.raises(UsageError, match=r"^revoke media.hachyderm.test: the revocation asked at 2026-01-02 "
                                             r"00:00Z \(versions 1, 2, keyCompromise\) is not finished; finish it "
                                             r"first with `certmgr revoke media.hachyderm.test --reason "
                                             r"keyCompromise` \(nothing done\)$"):
            _resumable(store, NAME, reason=reason, version=version, serial=None, now=now)

    # version 1 alone was recorded (no key, no certificates: an older record): version 2, with the same key, joins;
    # version 7 is gone from the store and was not recorded, so it is failed, never silently done
    odd = pins.PendingRevocation(reason="keyCompromise", versions=(1, 7), serials=(todo[0].serial, "77"),
                                 now_first=False, at=now)
    resumed, notes, _ = targets(store, NAME, reason="keyCompromise", version=None, serial=None, now=now, pending=odd)
    assert [(t.version, t.serial, t.status) for t in resumed] == [
        (1, todo[0].serial, "pending"),
        (7, "77", "failed: no longer in the store and not recorded with the request: revoke serial 77 at the CA by "
                  f"hand, then move state/revoking/{NAME}.json aside"),
        (2, todo[1].serial, "pending")]
    assert notes[1] == "version 2 carries the leaked key too (issued since with reuse_key): revoked as well"
    # a version pruned since the request: revoked from the certificate recorded with it
    pem = store.read(NAME, 1).cert.decode()
    pruned = pins.PendingRevocation(reason="superseded", versions=(9,), serials=(todo[0].serial,), now_first=False,
                                    at=now, leaves=(pem,))
    resumed, notes, _ = targets(store, NAME, reason="superseded", version=None, serial=None, now=now, pending=pruned)
    assert [(t.version, t.serial, t.status, t.leaf_pem) for t in resumed] == [(9, todo[0].serial, "pending", pem)]
    assert notes[1] == "version 9 is no longer in the store: revoked from the certificate recorded with the request"
    assert pins.load_pending(store, NAME) == pending  # unchanged by the look-ups
    pins.save_pending(store, NAME, pruned)
    assert pins.load_pending(store, NAME) == pruned
    pins.save_pending(store, NAME, pending)

    pins.record_revoked(store, NAME, todo[0].serial, version=1, reason="keyCompromise", at=now)
    assert pending.note(NAME, pins.load_revoked(store, NAME)) == (
        f"revocation of {NAME} not finished (keyCompromise, asked 2026-01-02 00:00Z): version 2 (serial "
        f"{todo[1].serial}) still valid at the CA; `certmgr revoke {NAME} --reason keyCompromise` finishes it")
    pins.record_revoked(store, NAME, todo[1].serial, version=2, reason="keyCompromise", at=now)
    assert pins.pending_note(store, NAME) == (
        f"revocation of {NAME} not finished (keyCompromise, asked 2026-01-02 00:00Z): revoked at the CA, the "
        f"replacement not yet confirmed on every host; `certmgr revoke {NAME} --reason keyCompromise` finishes it")
    pins.clear_pending(store, NAME)
    assert pins.load_pending(store, NAME) is None and pins.pending_note(store, NAME) is None


def test_an_unreadable_revocation_record_is_named_not_ignored(tmp_path: Path) -> None:
    """A record that is not a pending revocation: status and run say so (and revoke refuses) instead of forgetting
    a leaked key."""
    store = Store.open(tmp_path / "state")
    store.save_json(f"state/revoking/{NAME}.json", {"reason": "keyCompromise", "versions": [1, 2], "serials": ["a"],
                                                    "at": "2026-01-01T00:00:00+00:00"})
    note = pins.pending_note(store, NAME)
    assert note is not None and note.startswith(f"revocation record of {NAME} unreadable: store {NAME}: "
                                                f"state/revoking/{NAME}.json is not a pending revocation")
    from certmgr.errors import StoreError
    from certmgr.revoke import _resumable

    with pytest.raises(StoreError):
        _resumable(store, NAME, reason="keyCompromise", version=None, serial=None, now=T0)


def test_status_needs_action_while_a_revocation_is_unfinished(tmp_path: Path) -> None:
    """`status`: a pending revocation is a level-2 finding with its own line, and JSON carries it."""
    from certmgr import status as status_mod

    store = Store.open(tmp_path / "state")
    _three_versions(store)
    pins.save_pending(store, NAME, pins.PendingRevocation(reason="superseded", versions=(2,), serials=("ab",),
                                                          now_first=False, at=T0))
    [view] = status_mod.gather(None, store, now=T0 + DAY, certs=[cert()])  # type: ignore[arg-type]  # certs given
    assert view.revoking and (2, "revocation not finished") in view.findings()
    assert view.to_json()["revoking"] == view.revoking
    assert f"  {view.revoking}" in status_mod.render([view], T0 + DAY)


def test_a_pin_on_a_version_that_is_not_live_holds_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """rollback saves its pin, then switches live: killed between the two, the pin names a version that is not live.
    It holds nothing (renewal, run and status go by the live version) and the log says so."""
    from certmgr.renew import pinned_version

    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        for _ in range(2):
            store.add_version(NAME, _material())
        store.activate(NAME, 2)
    pins.save_pin(store, NAME, pins.Pin(version=1, serial="ab", rolled_back_from=2, at=T0))
    pins._IGNORED.clear()  # another test's ignored pin must not hide this one's line
    assert pins.holding_pin(store, NAME) is None and pinned_version(store, NAME) is None
    assert pins.holding_pin(store, NAME) is None
    assert caplog.text.count("pin ignored: not the live version") == 1  # once per command, not per read
    with store.lock("test"):
        store.activate(NAME, 1)  # the rollback's switch
    assert pinned_version(store, NAME) == 1


def test_rollback_refuses_a_version_whose_revocation_is_unfinished(tmp_path: Path) -> None:
    """A version named by an unfinished revocation (a leaked key not yet revoked) may not be made live again."""
    from certmgr.rollback import refusals

    store = Store.open(tmp_path / "state")
    _three_versions(store)
    v1 = store.read(NAME, 1).info().serial
    pins.save_pending(store, NAME, pins.PendingRevocation(reason="keyCompromise", versions=(1,), serials=(v1,),
                                                          now_first=False, at=T0))
    why = ("its revocation (keyCompromise) was asked for on 2026-01-01 00:00Z and is not finished: "
           f"`certmgr revoke {NAME} --reason keyCompromise` finishes it")
    roots = (x509.load_pem_x509_certificate(_CA.cert_pem),)
    assert why in refusals(store, None, cert(), 1, now=T0 + DAY, roots=roots)[1]  # type: ignore[arg-type]
    assert why not in refusals(store, None, cert(), 2, now=T0 + DAY, roots=roots)[1]  # type: ignore[arg-type]
    pins.record_revoked(store, NAME, v1, version=1, reason="keyCompromise", at=T0)
    [only] = [p for p in refusals(store, None, cert(), 1, now=T0 + DAY, roots=roots)[1] if "revo" in p]  # type: ignore[arg-type]
    assert only.startswith(f"serial {v1} was revoked by certmgr on ")


def test_a_damaged_record_never_stops_status_run_or_metrics(tmp_path: Path) -> None:
    """A record of revoked serials that does not parse, or a pending record with an infinite version: the note
    says unreadable, nothing raises, and renewal would still change the key."""
    from certmgr import status as status_mod

    store = Store.open(tmp_path / "state")
    _three_versions(store)
    pins.save_pending(store, NAME, pins.PendingRevocation(reason="superseded", versions=(2,), serials=("ab",),
                                                          now_first=False, at=T0))
    (tmp_path / "state" / "state" / "revoked").mkdir(parents=True, exist_ok=True)
    (tmp_path / "state" / "state" / "revoked" / f"{NAME}.json").write_text("{not json")
    note = pins.pending_note(store, NAME)
    assert note is not None and note.startswith(f"revocation record of {NAME} unreadable: ")
    [view] = status_mod.gather(None, store, now=T0 + DAY, certs=[cert()])  # type: ignore[arg-type]  # certs given
    assert view.revoking == note
    (tmp_path / "state" / "state" / "revoked" / f"{NAME}.json").unlink()
    (tmp_path / "state" / "state" / "revoking" / f"{NAME}.json").write_text(
        '{"reason": "superseded", "versions": [Infinity], "serials": ["ab"], "at": "2026-01-01T00:00:00+00:00"}')
    note = pins.pending_note(store, NAME)
    assert note is not None and "is not a pending revocation" in note
    assert pins.revocation_pending(store, NAME)


def test_the_run_summary_is_critical_while_a_revocation_is_unfinished() -> None:
    """The chat summary of a run that only says an unfinished revocation is critical, not ok."""
    from certmgr import pipeline
    from certmgr.scan import ScanResult

    scan = ScanResult(started=T0, elapsed=0.1, endpoints=(), certificates=())
    note = f"revocation of {NAME} not finished (…)"
    report = pipeline.RunReport(started=T0, dry_run=False, scan_before=scan, renewals=(), deploy_plan=(),
                                scan_after=scan, notes=(note,), revoking=(note,))
    msg = pipeline.summary_message(report, [])
    assert msg.severity == "critical" and note in msg.lines
    quiet = pipeline.RunReport(started=T0, dry_run=False, scan_before=scan, renewals=(), deploy_plan=(),
                               scan_after=scan)
    assert pipeline.summary_message(quiet, []).severity == "ok"
    # and the run exits 2 for it, as status does (a leaked key may still be valid at the CA); a dry run does not
    assert (report.exit_code, quiet.exit_code) == (pipeline.EXIT_FAILED, pipeline.EXIT_OK)
    dry = pipeline.RunReport(started=T0, dry_run=True, scan_before=scan, renewals=(), deploy_plan=(),
                             scan_after=scan, notes=(note,), revoking=(note,))
    assert dry.exit_code == pipeline.EXIT_OK


def test_revoke_dry_run_plans_a_resume_without_a_new_order(tmp_path: Path) -> None:
    """--dry-run on an unfinished revocation whose replacement is live: resume lines, deploy of the live version, no
    order; it refuses what the real command would refuse."""
    from certmgr.revoke import plan

    store = Store.open(tmp_path / "state")
    _three_versions(store)
    v2 = store.read(NAME, 2).info().serial
    pins.save_pending(store, NAME, pins.PendingRevocation(reason="superseded", versions=(2,), serials=(v2,),
                                                          now_first=False, at=T0))
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, _material()))  # 3, the replacement
    lines = plan(store, cert(), reason="superseded", now=T0 + DAY)
    assert lines == ["resuming the revocation asked at 2026-01-01 00:00Z (superseded): version 2",
                     "would do: version 3 (live) deployed to 0 hosts (none) and verified, nothing ordered; then revoke",
                     f"would revoke     {NAME} version 2 serial {v2} (superseded)",
                     f"revoke {NAME}: dry run, nothing ordered, deployed, revoked or recorded"]
    with pytest.raises(UsageError, match="is not finished; finish it first"):
        plan(store, cert(), reason="keyCompromise", now=T0 + DAY)


def test_a_record_whose_leaked_key_is_not_hex_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    """A damaged `spki` would otherwise fail revoke's resume deep inside; it is a StoreError at load time."""
    from certmgr.errors import StoreError

    store = Store.open(tmp_path / "state")
    store.save_json(f"state/revoking/{NAME}.json", {"reason": "keyCompromise", "versions": [1], "serials": ["a"],
                                                    "at": "2026-01-01T00:00:00+00:00", "spki": "zz"})
    with pytest.raises(StoreError, match="is not a pending revocation"):
        pins.load_pending(store, NAME)
    note = pins.pending_note(store, NAME)
    assert note is not None and note.startswith(f"revocation record of {NAME} unreadable: ")


def test_a_hint_stands_under_its_own_pop() -> None:
    """A rollback (or revoke) whose first POP failed its test and whose last deployed: the hint about the first
    POP's config is printed under that POP's line, not after the last one."""
    from certmgr.deploy import HostOutcome, Status
    from certmgr.rollback import RollbackResult

    bad = HostOutcome(cert=NAME, host="sally", status=Status.FAILED, new_serial="0B", old_serial="0A",
                      error="nginx -t failed", hint="fix the web server config on sally first")
    good = HostOutcome(cert=NAME, host="esme", status=Status.DEPLOYED, new_serial="0B", old_serial="0A")
    result = RollbackResult(name=NAME, target=1, serial="0B", previous=2, previous_serial="0A",
                            hosts=("sally", "esme"), others=(), pinned=True, deploys=(bad, good))
    lines = result.lines()
    hint = next(i for i, line in enumerate(lines) if "hint: fix the web server config on sally" in line)
    assert "→ sally" in lines[hint - 1] and "nginx -t failed" in lines[hint - 1], lines
    assert "→ esme" in lines[hint + 1], lines


def test_a_run_finishes_a_revocation_only_when_it_is_done_but_for_its_record(tmp_path: Path) -> None:
    """revoke.finish_confirmed clears a pending revocation (audited `revoke done`, by run) only when every recorded
    serial is revoked and the run's scan shows the live replacement — not one being revoked, not the leaked key —
    on every endpoint of every host; anything short of that leaves the record."""
    from types import SimpleNamespace

    from certmgr.material import public_key_der
    from certmgr.revoke import finish_confirmed

    store = Store.open(tmp_path / "state")
    leaked = pki.make_leaf(_CA, [NAME], not_before=T0, not_after=T0 + 90 * DAY)
    with store.lock("test"):
        store.add_version(NAME, CertMaterial(cert=leaked.cert_pem, chain=_CA.cert_pem, privkey=leaked.key_pem))
        store.activate(NAME, store.add_version(NAME, _material()))
    old, new = store.read(NAME, 1).info(), store.read(NAME, 2).info()
    spki = public_key_der(store.read(NAME, 1).leaf.public_key()).hex()
    pins.save_pending(store, NAME, pins.PendingRevocation(reason="keyCompromise", versions=(1,),
                                                          serials=(old.serial,), now_first=False, at=T0, spki=spki))
    hosts = ("h1", "h2")
    crt = SimpleNamespace(name=NAME, hosts=hosts)

    def ep(host: str, sha: str | None, cert_name: str = NAME) -> SimpleNamespace:
        return SimpleNamespace(endpoint=SimpleNamespace(cert=cert_name, host=host),
                               info=None if sha is None else SimpleNamespace(sha256=sha))

    everywhere = [ep(h, new.sha256) for h in hosts]
    assert finish_confirmed(store, crt, everywhere) is None  # the leaked serial is not revoked yet
    with store.lock("test"):
        pins.record_revoked(store, NAME, old.serial, version=1, reason="keyCompromise", at=T0)
    for short in ([ep("h1", new.sha256)],                                   # h2 not in the scan
                  [ep("h1", new.sha256), ep("h2", old.sha256)],              # h2 serves the leaked one
                  [ep("h1", new.sha256), ep("h2", None)],                    # h2 unreadable
                  [ep("h1", new.sha256), ep("h2", new.sha256, "other.test")]):  # h2's line is another certificate's
        assert finish_confirmed(store, crt, short) is None
        assert pins.load_pending(store, NAME) is not None
    line = finish_confirmed(store, crt, everywhere)
    assert line is not None and line.startswith(f"revocation of {NAME} finished (keyCompromise): version 1 revoked")
    assert pins.load_pending(store, NAME) is None
    [done] = [e for e in store.read_audit() if e["action"] == "revoke done"]
    assert done["by"] == "run"
    # a live version that carries the leaked key is no replacement
    pins.save_pending(store, NAME, pins.PendingRevocation(
        reason="keyCompromise", versions=(1,), serials=(old.serial,), now_first=False, at=T0,
        spki=public_key_der(store.read(NAME, 2).leaf.public_key()).hex()))
    assert finish_confirmed(store, crt, everywhere) is None


@pytest.mark.parametrize(("value", "items"), [(None, []), ("a, b,", ["a", "b"]), ("tag:canary", ["tag:canary"])])
def test_csv_list_reads_an_option(value: str | None, items: list[str]) -> None:
    from certmgr.cli.base import csv_list

    assert csv_list(value, "--hosts") == items


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_csv_list_refuses_an_option_given_but_naming_nothing(value: str) -> None:
    from certmgr.cli.base import csv_list

    with pytest.raises(UsageError, match=r"^--hosts: .* names nothing"):
        csv_list(value, "--hosts")
    assert csv_list(value) == []  # without an option name (not a user's option): empty stays empty
