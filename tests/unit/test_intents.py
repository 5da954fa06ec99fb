"""Deploy intents: what a commit cut short leaves, and how the next deploy settles it (local fake hosts, real scripts)."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from certmgr import intents, interrupt, pipeline
from certmgr import remote as remote_mod
from certmgr.deploy import Status, deploy
from certmgr.errors import StoreError
from certmgr.inventory import Host
from certmgr.remote import Result, Timeouts
from certmgr.store import Store
from tests.unit.test_deploy import NAME, FakeFleet, LocalSession, fleet_inventory, material, run_fleet, seeded_store
from tests.unit.test_pipeline import INV, MEDIA, outcome, scan_result

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def intent(**kw: Any) -> intents.Intent:
    base: dict[str, Any] = dict(cert=NAME, host="h0", version=3, layout="link", from_target=f"../archive/{NAME}/2",
                                back_target=f"../archive/{NAME}/2", from_serial="aa", to_serial="bb", now=NOW)
    return intents.Intent.new(**(base | kw))


@pytest.mark.parametrize(("kw", "layout", "target", "versions", "want"), [
    ({}, "link", f"../archive/{NAME}/3", {2, 3}, "deployed"),
    ({}, "link", f"../archive/{NAME}/2", {2, 3}, "rolled back"),
    ({}, "link", f"../archive/{NAME}/2", {2}, "not switched"),
    ({}, "link", f"../archive/{NAME}/7", {2, 3, 7}, "unknown"),
    ({"layout": "none", "from_target": "", "back_target": ""}, "none", None, set(), "not switched"),
    ({"layout": "none", "from_target": "", "back_target": ""}, "none", None, {3}, "rolled back"),
    ({"layout": "certbot", "from_target": "", "back_target": f"../archive/{NAME}/1"}, "certbot", None, {1},
     "not switched"),
    ({"layout": "certbot", "from_target": "", "back_target": f"../archive/{NAME}/1"}, "link",
     f"../archive/{NAME}/1", {1, 3}, "rolled back"),
    ({"layout": "certbot", "from_target": "", "back_target": f"../archive/{NAME}/1"}, "link",
     f"../archive/{NAME}/3", {1, 3}, "deployed"),
])
def test_verdict_reads_what_happened_from_the_live_link(kw: dict[str, Any], layout: str, target: str | None,
                                                         versions: set[int], want: str) -> None:
    """The POP's live link (and whether the commit stored its version) tells a switch from a rollback from nothing."""
    assert intents.verdict(intent(**kw), layout=layout, target=target, versions=versions) == want


@pytest.mark.parametrize(("last_commit", "want"), [("up-1", "rolled back"), ("up-0", "not switched"),
                                                   (None, "not switched")])
def test_a_link_back_where_it_was_is_a_rollback_only_if_that_commit_got_to_its_switch(last_commit: str | None,
                                                                                         want: str) -> None:
    """The version on the POP already (a redeploy of an older one): its being stored proves nothing, the
    lineage's .last-commit (written by commit.sh just before it switches) names the commit that got there."""
    it = intent(tmp="up-1")
    assert intents.verdict(it, layout="link", target=it.from_target, versions={2, 3}, last_commit=last_commit) == want
    assert intents.verdict(intent(), layout="link", target=it.from_target, versions={2, 3},
                           last_commit=last_commit) == "rolled back"  # an intent written before .last-commit existed


def test_settle_audits_a_switch_once_records_state_and_drops_the_intent(tmp_path: Path) -> None:
    """A switch that happened gets one `deployed` line (settled, with the intent id) and deploy state dated when
    the commit started; settling the same intent again (a kill before its removal) adds no second line."""
    store = Store.open(tmp_path / "s")
    it = intent()
    with store.lock("test"):
        intents.write(store, it)
        assert intents.pending(store) == [it]
        assert intents.pending(store, NAME, "other") == []
        intents.settle(store, [it], layout="link", target=it.to_target, versions={2, 3})
        assert intents.pending(store) == []
        intents.write(store, it)  # as if the run died between the audit line and the removal
        assert intents.settle(store, [it], layout="link", target=it.to_target, versions={2, 3}) == [(it, "deployed")]
    lines = [e for e in store.read_audit() if e["action"] == "deployed"]
    assert len(lines) == 1
    assert lines[0]["intent"] == it.id and lines[0]["settled"] is True and lines[0]["to"] == "bb"
    assert "settled after interrupt" in lines[0]["summary"]
    host = store.load_json(f"state/deploy/{NAME}.json")["hosts"]["h0"]
    assert host["deployed_at"] == NOW.isoformat() and host["serial"] == "bb" and host["version"] == 3
    assert intents.pending(store) == []


def test_settle_writes_nothing_for_a_commit_that_never_switched(tmp_path: Path) -> None:
    """An intent whose commit never got to the swap is dropped without any audit line."""
    store = Store.open(tmp_path / "s")
    it = intent()
    with store.lock("test"):
        intents.write(store, it)
        intents.settle(store, [it], layout="link", target=it.from_target, versions={2})
    assert list(store.read_audit()) == []
    assert intents.pending(store) == []


class CutSession(LocalSession):
    """Runs the commit script to its end on the 'host', then loses the connection: the controller never hears."""

    async def run_script(self, script: str, args: Sequence[str], *, step: str, timeout: float | None = None) -> Result:
        res = await super().run_script(script, args, step=step, timeout=timeout)
        if step == "commit":
            raise remote_mod.ConnectionLost(f"commit {self.host.name}: connection lost (state unknown: rerun deploy)")
        return res


class CutFleet(FakeFleet):
    @asynccontextmanager
    async def connector(self, host: Host, *, jump: Host | None, accept_new: bool, timeouts: Timeouts,
                        on_accept: Any = None) -> AsyncIterator[LocalSession]:
        yield CutSession(host)


class BreakingSession(CutSession):
    """The config breaks after the preflight passed, so the commit's own test fails and it switches back; or, with
    `cut_before`, the connection is lost before the commit starts. Either way the controller never hears it."""

    root = Path()
    cut_before = False

    async def run_script(self, script: str, args: Sequence[str], *, step: str, timeout: float | None = None) -> Result:
        if step == "commit" and self.cut_before:
            raise remote_mod.ConnectionLost(f"commit {self.host.name}: connection lost before the commit started")
        if step == "commit":
            (self.root / "broken").touch()
        return await super().run_script(script, args, step=step, timeout=timeout)


def breaking_fleet(root: Path, *, cut_before: bool = False) -> FakeFleet:
    class BreakingFleet(FakeFleet):
        @asynccontextmanager
        async def connector(self, host: Host, *, jump: Host | None, accept_new: bool, timeouts: Timeouts,
                            on_accept: Any = None) -> AsyncIterator[LocalSession]:
            session = BreakingSession(host)
            session.root, session.cut_before = root, cut_before
            yield session

    return BreakingFleet()


def test_a_commit_cut_after_the_switch_is_audited_by_the_next_deploy(tmp_path: Path) -> None:
    """The switch a run never heard about is audited once by the next deploy, which then skips the host."""
    inv = fleet_inventory(tmp_path, 1)
    store, serial = seeded_store(tmp_path)
    o = run_fleet(inv, store, CutFleet())["h0"]
    assert o.status == Status.UNKNOWN and "(state unknown: the commit may have run on h0; the next deploy settles " \
        "it)" in (o.error or ""), o.error
    assert [e for e in store.read_audit() if e["action"] == "deployed"] == []
    [left] = intents.pending(store)
    again = run_fleet(inv, store, FakeFleet())["h0"]
    assert again.status == Status.SKIPPED
    [line] = [e for e in store.read_audit() if e["action"] == "deployed"]
    assert line["intent"] == left.id and line["settled"] is True and line["to"] == serial
    assert intents.pending(store) == []
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.SKIPPED
    assert len([e for e in store.read_audit() if e["action"] == "deployed"]) == 1


def test_a_commit_cut_after_its_rollback_is_audited_as_a_rollback(tmp_path: Path) -> None:
    """A commit whose test failed switched and switched back; the next deploy records that as one `rolled back`."""
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, material()))
    root = Path(inv.hosts["h0"].cert_root)

    assert run_fleet(inv, store, breaking_fleet(root))["h0"].status == Status.UNKNOWN
    (root / "broken").unlink()
    [left] = intents.pending(store)
    run_fleet(inv, store, FakeFleet())
    rolled = [e for e in store.read_audit() if e["action"] == "rolled back"]
    assert len(rolled) == 1 and rolled[0]["intent"] == left.id and rolled[0]["settled"] is True
    assert intents.pending(store) == []


@pytest.mark.parametrize("commit_ran", [False, True], ids=["cut-before-the-commit", "commit-switched-back"])
def test_an_interrupted_redeploy_of_a_version_the_pop_has_is_settled_by_what_its_commit_did(
        tmp_path: Path, commit_ran: bool) -> None:
    """Going back to a version the POP holds already (v1 after v2), the run dies after writing its intent: if the
    commit never ran, the next deploy audits no rollback (the link never moved) and switches; if it ran and its
    test failed (switched and switched back), one settled `rolled back`. Both leave the same link."""
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, material()))
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    with store.lock("test"):
        store.activate(NAME, 1)  # back to the version on the POP already
    root = Path(inv.hosts["h0"].cert_root)

    assert run_fleet(inv, store, breaking_fleet(root, cut_before=not commit_ran))["h0"].status == Status.UNKNOWN
    (root / "broken").unlink(missing_ok=True)
    [left] = intents.pending(store)
    assert left.version == 1 and left.tmp
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    rolled = [e for e in store.read_audit() if e["action"] == "rolled back"]
    assert [e["intent"] for e in rolled] == ([left.id] if commit_ran else []), rolled
    assert intents.pending(store) == []


def test_run_plans_a_deploy_to_hosts_with_an_unsettled_intent() -> None:
    """`run` deploys (and so settles) where an interrupted deploy left an intent, although the host looks current."""
    scan = scan_result({"sally": "a", "esme": "a"}, "a")
    assert pipeline.plan_deploys(INV, scan, [outcome(MEDIA, "not-due")], dry_run=False) == []
    [plan] = pipeline.plan_deploys(INV, scan, [outcome(MEDIA, "not-due")], dry_run=False,
                                   unsettled=[(MEDIA, "esme")])
    assert plan.hosts == ("esme",) and plan.reason == "behind the local live version: an interrupted deploy to settle"


def test_no_commit_without_its_intent(tmp_path: Path) -> None:
    """When the intent cannot be written the commit is not started: the host fails with live unchanged, no temp left."""
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    (tmp_path / "state" / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "state" / "intents").write_text("not a directory")
    o = run_fleet(inv, store, FakeFleet())["h0"]
    assert o.status == Status.FAILED
    assert o.error is not None and o.error.startswith(f"deploy {NAME} → h0: cannot record the deploy intent: store ")
    assert o.error.endswith("(live unchanged)")
    root = Path(inv.hosts["h0"].cert_root)
    assert not (root / "live" / NAME).exists() and not (root / "live" / NAME).is_symlink()
    assert not (root / "archive" / NAME).exists()  # the upload rides on the commit: nothing made on the POP at all


def test_status_shows_an_unsettled_intent_and_the_last_switch(tmp_path: Path) -> None:
    """`status` marks a POP with an intent left by an interrupted deploy, and shows when its live link last switched."""
    from certmgr import status

    inv = fleet_inventory(tmp_path, 2)
    store, _ = seeded_store(tmp_path)
    run_fleet(inv, store, FakeFleet())
    run_fleet(inv, store, FakeFleet())  # skipped: "last deploy skipped", the switch time kept
    with store.lock("test"):
        intents.write(store, intent(host="h1"))
    views = status.gather(inv, store, now=NOW)
    pops = {p.host: p for p in views[0].pops}
    assert pops["h0"].last_deploy == "skipped" and pops["h0"].deployed_at == NOW.isoformat()
    assert (pops["h0"].unsettled, pops["h1"].unsettled) == (False, True)
    text = "\n".join(status.render(views, NOW))
    assert "last deploy skipped 2026-11-27 12:00Z (switched 2026-11-27 12:00Z)" in text
    assert f"INTERRUPTED deploy not settled yet (`certmgr deploy {NAME}` settles it)" in text


class SlowCommitSession(LocalSession):
    """The commit script starts `delay` seconds late (a slow POP): long enough to cancel the deploy meanwhile."""

    delay = 0.3

    async def run_script(self, script: str, args: Sequence[str], *, step: str, timeout: float | None = None) -> Result:
        if step == "commit":
            await asyncio.sleep(self.delay)
        return await super().run_script(script, args, step=step, timeout=timeout)


class SlowFleet(FakeFleet):
    @asynccontextmanager
    async def connector(self, host: Host, *, jump: Host | None, accept_new: bool, timeouts: Timeouts,
                        on_accept: Any = None) -> AsyncIterator[LocalSession]:
        yield SlowCommitSession(host)


async def cancel_mid_commit(inv: Any, store: Store, cancels: int) -> None:
    """Start a deploy, cancel it `cancels` times once a commit is under way, and expect CancelledError."""
    task = asyncio.ensure_future(deploy(inv, store, inv.certificates, now=NOW, connector=SlowFleet().connector,
                                        prober=FakeFleet().prober, timeouts=Timeouts(verify=1.0)))
    while not interrupt.tally().committing:
        await asyncio.sleep(0.005)
    for _ in range(cancels):  # as run_async does on each SIGINT
        interrupt.note(signal.SIGINT)
        task.cancel()
        await asyncio.sleep(0.01)
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture()
def tally() -> Iterator[interrupt.Tally]:
    yield interrupt.reset().tally
    interrupt.reset()


def test_a_commit_under_way_when_cancelled_finishes_and_is_audited(tmp_path: Path, tally: interrupt.Tally) -> None:
    """Cancelled (a signal) while its commit runs, a deploy waits for that commit: audited, saved, intent removed."""
    inv = fleet_inventory(tmp_path, 1)
    store, serial = seeded_store(tmp_path)
    asyncio.run(cancel_mid_commit(inv, store, cancels=1))
    [line] = [e for e in store.read_audit() if e["action"] == "deployed"]
    assert line["to"] == serial and "settled" not in line
    assert intents.pending(store) == []
    assert store.load_json(f"state/deploy/{NAME}.json")["hosts"]["h0"]["status"] == "deployed"
    assert tally.done == {NAME: {"h0": "deployed"}} and not tally.committing


@pytest.mark.parametrize("how", ["second cancellation", "grace ran out"])
def test_the_wait_for_a_commit_is_cut_by_a_second_cancellation_or_the_grace(
        how: str, tmp_path: Path, tally: interrupt.Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second signal, or GRACE seconds, end the wait: nothing audited now, the intent left for the next deploy."""
    monkeypatch.setattr(interrupt, "GRACE", 0.05 if how == "grace ran out" else 3600.0)
    monkeypatch.setattr(intents, "QUIET", 0.0)  # the fake POP's cut commit never runs: no second look needed
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    asyncio.run(cancel_mid_commit(inv, store, cancels=2 if how == "second cancellation" else 1))
    assert [e for e in store.read_audit() if e["action"] == "deployed"] == []
    assert len(intents.pending(store)) == 1
    assert tally.committing == {(NAME, "h0")}
    interrupt.reset()  # the next run is a new process
    run_fleet(inv, store, FakeFleet())  # the next deploy settles it (this fake never ran the cut commit)
    assert intents.pending(store) == []
    assert len([e for e in store.read_audit() if e["action"] == "deployed"]) == 1


def test_pending_skips_temporaries_and_files_that_are_not_intents(tmp_path: Path) -> None:
    """A writer's temporary, a torn file or foreign JSON under state/intents/ is skipped, never fatal."""
    store = Store.open(tmp_path / "s")
    it = intent()
    with store.lock("test"):
        intents.write(store, it)
    d = tmp_path / "s" / "state" / "intents" / NAME
    (d / ".h0.x.json.tmp-123").write_text("{")
    (d / "torn.json").write_text('{"id": ')
    (d / "list.json").write_text("[1, 2]")
    assert intents.pending(store) == [it]
    with store.lock("test"):
        store.remove_json(it.relpath)
        store.remove_json(it.relpath)  # absent: fine
    assert intents.pending(store) == []


def test_recheck_waits_only_for_a_young_intent_that_has_not_switched() -> None:
    """Only an intent younger than QUIET whose POP shows no switch yet asks for a second look, for the rest of QUIET."""
    it = intent()  # at NOW
    later = NOW + dt.timedelta(seconds=2)
    assert intents.recheck_in([it], layout="link", target=it.from_target, versions={2}, now=later) == \
        intents.QUIET - 2
    assert intents.recheck_in([it], layout="link", target=it.to_target, versions={2, 3}, now=later) == 0
    assert intents.recheck_in([it], layout="link", target=it.from_target, versions={2},
                              now=NOW + dt.timedelta(seconds=intents.QUIET + 1)) == 0


def test_a_commit_still_running_on_the_pop_is_not_taken_for_none(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The killed run's commit switches the POP just after the next run's inspection: the second look sees it and
    audits it, instead of dropping the intent as "not switched"."""
    import os
    import shutil
    import threading

    monkeypatch.setattr(intents, "QUIET", 1.0)
    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    root = Path(inv.hosts["h0"].cert_root)
    it = intent(version=2, from_target=f"../archive/{NAME}/1", back_target=f"../archive/{NAME}/1",
                now=dt.datetime.now(dt.UTC))
    with store.lock("test"):
        intents.write(store, it)

    def late_commit() -> None:  # what the dead run's script does on the POP, a moment late
        shutil.copytree(root / "archive" / NAME / "1", root / "archive" / NAME / "2")
        os.symlink(it.to_target, root / "live" / ".tmp-late")
        os.replace(root / "live" / ".tmp-late", root / "live" / NAME)

    timer = threading.Timer(0.3, late_commit)
    timer.start()
    try:
        run_fleet(inv, store, FakeFleet())
    finally:
        timer.join()
    settled = [e for e in store.read_audit() if e.get("settled")]
    assert [(e["action"], e["intent"]) for e in settled] == [("deployed", it.id)]
    assert intents.pending(store) == []


def test_a_switch_whose_audit_row_is_refused_keeps_its_intent_and_the_next_deploy_audits_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A POP switched whose `deployed` row the store refuses (logged, the deploy goes on) keeps its intent, so
    the next deploy to that host settles it and writes the row: a switch never ends up unaudited."""
    from certmgr.errors import StoreError

    inv = fleet_inventory(tmp_path, 1)
    store, serial = seeded_store(tmp_path)
    real = store.audit

    def refusing(action: str, obj: str, **kw: Any) -> None:
        if action == "deployed":
            raise StoreError("store: audit deployed: refused (not written)")
        real(action, obj, **kw)

    monkeypatch.setattr(store, "audit", refusing)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.DEPLOYED
    assert not [e for e in store.read_audit() if e["action"] == "deployed"]
    [left] = intents.pending(store)
    monkeypatch.setattr(store, "audit", real)
    assert run_fleet(inv, store, FakeFleet())["h0"].status == Status.SKIPPED
    [row] = [e for e in store.read_audit() if e["action"] == "deployed"]
    assert (row["host"], row["to"], row["intent"], row.get("settled")) == ("h0", serial, left.id, True)
    assert intents.pending(store) == []


def test_a_settled_switch_gets_the_retention_its_interrupted_run_never_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that switched a POP but never pruned it (killed, paused or fenced before its prune) leaves its intent;
    the next deploy settles that switch and applies retention there, so the POP keeps no more than keep_versions."""
    from certmgr.deploy.host import Deployer

    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    archive = Path(inv.hosts["h0"].cert_root) / "archive" / NAME
    assert run_fleet(inv, store, FakeFleet(), keep=1)["h0"].status == Status.DEPLOYED
    for _ in range(2):  # v2 deployed whole (prune.sh keeps the live version and the one before it), then v3
        with store.lock("test"):
            store.activate(NAME, store.add_version(NAME, material()))
        if _ == 0:
            assert run_fleet(inv, store, FakeFleet(), keep=1)["h0"].status == Status.DEPLOYED
    real_audit, real_prune = store.audit, Deployer.prune_host

    def refusing(action: str, obj: str, **kw: Any) -> None:
        if action == "deployed":
            raise StoreError("store: audit deployed: refused (not written)")
        real_audit(action, obj, **kw)

    async def never(self: Deployer, *args: Any, **kw: Any) -> None:
        return None  # the run stopped before its prune

    monkeypatch.setattr(store, "audit", refusing)
    monkeypatch.setattr(Deployer, "prune_host", never)
    assert run_fleet(inv, store, FakeFleet(), keep=1)["h0"].status == Status.DEPLOYED
    assert sorted(e.name for e in archive.iterdir() if e.name.isdigit()) == ["1", "2", "3"]
    monkeypatch.setattr(store, "audit", real_audit)
    monkeypatch.setattr(Deployer, "prune_host", real_prune)
    assert run_fleet(inv, store, FakeFleet(), keep=1)["h0"].status == Status.SKIPPED
    assert intents.pending(store) == []
    assert sorted(e.name for e in archive.iterdir() if e.name.isdigit()) == ["2", "3"]


def test_a_pop_left_with_more_versions_than_kept_is_pruned_by_the_next_deploy_that_finds_it_current(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs stopped after their switch was audited but before their prune (a SIGTERM between the two) leave no
    intent, only versions beyond keep_versions; the next deploy finds the POP current (skipped) and prunes it."""
    from certmgr.deploy.host import Deployer

    inv = fleet_inventory(tmp_path, 1)
    store, _ = seeded_store(tmp_path)
    archive = Path(inv.hosts["h0"].cert_root) / "archive" / NAME
    real_prune = Deployer.prune_host

    async def never(self: Deployer, *args: Any, **kw: Any) -> None:
        return None  # each run stopped before its prune

    monkeypatch.setattr(Deployer, "prune_host", never)
    assert run_fleet(inv, store, FakeFleet(), keep=3)["h0"].status == Status.DEPLOYED
    for _ in range(4):
        with store.lock("test"):
            store.activate(NAME, store.add_version(NAME, material()))
        assert run_fleet(inv, store, FakeFleet(), keep=3)["h0"].status == Status.DEPLOYED
    assert sorted(int(e.name) for e in archive.iterdir() if e.name.isdigit()) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(Deployer, "prune_host", real_prune)
    assert run_fleet(inv, store, FakeFleet(), keep=3)["h0"].status == Status.SKIPPED
    assert sorted(int(e.name) for e in archive.iterdir() if e.name.isdigit()) == [3, 4, 5]
    assert [e["removed"] for e in store.read_audit() if e["action"] == "pruned"] == [[1, 2]]
    assert run_fleet(inv, store, FakeFleet(), keep=3)["h0"].status == Status.SKIPPED  # nothing more to prune
    assert len([e for e in store.read_audit() if e["action"] == "pruned"]) == 1


def test_one_run_uploads_a_certificate_under_one_temp_name_on_every_pop_and_the_next_run_under_another(
        tmp_path: Path) -> None:
    """A run's upload temp dir of a certificate is the same on each POP (its archive block is built once for all,
    steps.upload_archive) and unique to the run: the intents left by two cut runs name it."""
    inv = fleet_inventory(tmp_path, 2)
    store, _ = seeded_store(tmp_path)
    run_fleet(inv, store, CutFleet())
    first = {i.host: i.tmp for i in intents.pending(store)}
    assert set(first) == {"h0", "h1"} and len(set(first.values())) == 1 and first["h0"]
    with store.lock("test"):
        store.activate(NAME, store.add_version(NAME, material()))
    run_fleet(inv, store, CutFleet())  # settles the first run's intents, then leaves its own
    second = {i.host: i.tmp for i in intents.pending(store)}
    assert set(second) == {"h0", "h1"} and len(set(second.values())) == 1 and second["h0"] != first["h0"]
