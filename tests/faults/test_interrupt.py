"""Interrupt or kill `certmgr renew --force` / `certmgr deploy` at many moments: every switch of a POP's live link
ends up in the audit log exactly once.

The switches are counted on the POPs themselves: an inotify watch on each POP's `live/` directory sees every
rename onto `live/<name>` (the commit's swap, certbot's conversion, a rollback), whoever made it. After each
interrupted run the next `certmgr deploy --all` settles what the interrupted one left, and then the audit log
holds one switch line per switch seen, no more, no fewer. SIGINT and SIGTERM end the command with 130/143 and
one summary line, never click's `Aborted!` or a traceback.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import signal
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from lab import Lab
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import (
    LINEAGES,
    assert_every_pop_serves_live,
    audit,
    certmgr,
    check_pop_files_whole,
    kill9,
    start_certmgr,
    wait_for,
    write_inventory,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_POPS = 3
IN_MOVED_TO, IN_Q_OVERFLOW, IN_NONBLOCK = 0x80, 0x4000, 0o4000
# a rollback line records a switch and the switch back (commit test/reload failed, or verify failed)
SWITCH_WEIGHT = {"deployed": 1, "rolled back": 2}


class LiveSwitches:
    """Counts renames onto `live/<lineage>` on every POP (inotify IN_MOVED_TO), as they happen."""

    def __init__(self, flab: Lab) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.pop_of: dict[int, str] = {}
        for pop in flab.pop_names:
            wd = self._libc.inotify_add_watch(self.fd, str(flab.pop_paths(pop).cert_root / "live").encode(),
                                              IN_MOVED_TO)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.pop_of[wd] = pop
        self.counts: Counter[tuple[str, str]] = Counter()

    def poll(self) -> Counter[tuple[str, str]]:
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.counts
            i = 0
            while i < len(buf):
                wd, mask, _cookie, size = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + size].rstrip(b"\0").decode()
                i += 16 + size
                assert not mask & IN_Q_OVERFLOW, "inotify queue overflowed: switches were not counted"
                if name in LINEAGES:
                    self.counts[(name, self.pop_of[wd])] += 1

    def total(self) -> int:
        return sum(self.poll().values())

    def close(self) -> None:
        os.close(self.fd)


def audited_switches(state: Path) -> Counter[tuple[str, str]]:
    """(lineage, POP) → switches the audit log records (a rollback line counts its switch and the switch back)."""
    out: Counter[tuple[str, str]] = Counter()
    for e in audit(state):
        assert e["action"] not in ("rollback failed", "deploy unsettled"), e
        if e["action"] in SWITCH_WEIGHT and e.get("host"):
            out[(e["object"], e["host"])] += SWITCH_WEIGHT[e["action"]]
    return out


def quiet(switches: LiveSwitches, seconds: float = 0.6) -> None:
    """Wait until no POP has switched for `seconds`: a killed run's commit scripts run on after it died."""
    last = (switches.total(), time.monotonic())

    def settled() -> bool:
        nonlocal last
        now = switches.total()
        if now != last[0]:
            last = (now, time.monotonic())
            return False
        return time.monotonic() - last[1] >= seconds

    wait_for(settled, 60, "the POPs to stop switching", interval=0.05)


def flip_store_live(state: Path, lineages: tuple[str, ...] = LINEAGES) -> None:
    """Make the other of the two newest stored versions live, so that the next deploy has something to push."""
    from certmgr.store import Store

    store = Store.open(state)
    with store.lock("test flip"):
        for lineage in lineages:
            newest = sorted(store.versions(lineage))[-2:]
            live = store.live_version(lineage)
            store.activate(lineage, newest[0] if live == newest[1] else newest[1])


def lock_holder(state: Path) -> object:
    """The pid in the directory store's lock record (None while there is none)."""
    try:
        return json.loads((state / "lock").read_text() or "{}").get("pid")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def interrupt_at(proc: subprocess.Popen[str], how: signal.Signals, moment: tuple[str, float], state: Path,
                 switches: LiveSwitches) -> None:
    """Send `how` at `moment`: (`start`|`renewed`|`switch`, delay): after the command took the store lock (its
    signal handlers are in place by then: a signal during the interpreter's imports would only test Python), after
    its first `renewed` audit line, or after the first POP switched live/ in this run."""
    event, delay = moment
    if event == "start":
        wait_for(lambda: proc.poll() is not None or lock_holder(state) == proc.pid, 120, "the store lock",
                 interval=0.002)
    elif event == "renewed":
        done = sum(1 for e in audit(state) if e["action"] == "renewed")
        wait_for(lambda: proc.poll() is not None or sum(1 for e in audit(state) if e["action"] == "renewed") > done,
                 120, "a renewal", interval=0.005)
    elif event in ("switch", "twice"):
        before = switches.total()
        wait_for(lambda: proc.poll() is not None or switches.total() > before, 120, "a POP switch", interval=0.002)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(how)
    if event == "twice":  # a second signal cuts short what the first let finish
        time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(how)


EXPECT = {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}
RENEW_MOMENTS = [("start", 0.2), ("renewed", 0.0), ("switch", 0.0), ("switch", 0.1)]
DEPLOY_MOMENTS = [("start", 0.0), ("switch", 0.0), ("switch", 0.03), ("switch", 0.15), ("switch", 0.4),
                  ("twice", 0.0)]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_every_switch_is_audited_once_whatever_the_moment_of_interruption(
        fresh: Lab, proxy: ACMEProxy, tmp_path: Path, how: signal.Signals) -> None:
    """Whatever the moment `renew --force` or `deploy` is killed or interrupted, after the next deploy the audit log
    holds exactly one switch line per switch of a POP's live link; SIGINT/SIGTERM exit 130/143 with one summary
    line and neither `Aborted!` nor a traceback; `status` shows when each POP last switched."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    switches = LiveSwitches(fresh)
    interrupted = 0
    last_switch_round: dict[tuple[str, str], dt.datetime] = {}
    first = certmgr(inv, state, "renew", "--force", "--no-deploy", *LINEAGES)  # a live version to deploy after a kill
    assert first.returncode == 0, first.stdout + first.stderr
    try:
        rounds = [("renew", m) for m in RENEW_MOMENTS] + [("deploy", m) for m in DEPLOY_MOMENTS]
        for i, (command, moment) in enumerate(rounds):
            if command == "deploy":
                flip_store_live(state)
            began = dt.datetime.now(dt.UTC)
            before = Counter(switches.poll())
            args = ("renew", "--force", *LINEAGES) if command == "renew" else ("deploy", "--all")
            proc = start_certmgr(inv, state, *args)
            try:
                interrupt_at(proc, how, moment, state, switches)
                out, err = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            where = f"round {i} ({command}, {moment}): exit {proc.returncode}\n{out}\n{err}"
            assert "Traceback" not in err and "Aborted!" not in err + out, where
            if proc.returncode != 0:  # 0: the run finished before the moment came
                interrupted += 1
                assert proc.returncode == EXPECT[how], where
                if how != signal.SIGKILL:
                    lines = [line for line in err.splitlines() if line.startswith("certmgr: interrupted by")]
                    assert len(lines) == 1 and lines[0].startswith(f"certmgr: interrupted by {how.name}"), where
                    if moment == ("switch", 0.0):  # the first switch of 9: the signal stops the commits not begun
                        assert "not started: " in lines[0], where
            # at once, as an operator would: the next run settles what the interrupted one left (its commit scripts
            # ran on), and brings every POP to the store's live version
            rerun = certmgr(inv, state, "deploy", "--all")
            assert rerun.returncode == 0, where + rerun.stdout + rerun.stderr
            assert not list((state / "state" / "intents").rglob("*.json")), "every intent is settled"
            quiet(switches)
            seen = switches.poll()
            for key in seen:
                if seen[key] > before[key]:
                    last_switch_round[key] = began
            assert audited_switches(state) == seen, f"{where}\naudit vs POPs after round {i}"
        assert interrupted >= len(rounds) - 2, f"only {interrupted} of {len(rounds)} runs were interrupted"
        check_pop_files_whole(fresh)
        assert_every_pop_serves_live(fresh, state)
        status = json.loads(certmgr(inv, state, "status", "--json").stdout)
        for cert in status["certificates"]:
            for pop in cert["pops"]:
                at = dt.datetime.fromisoformat(pop["deployed_at"])
                assert at >= last_switch_round[(cert["name"], pop["host"])], (cert["name"], pop)
                assert not pop["unsettled"]
    finally:
        switches.close()


def test_kill_after_the_audit_line_before_the_intent_is_removed(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """SIGKILL between a switch's audit line and the removal of its intent: the next run settles the intent without
    auditing that switch a second time."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    first = certmgr(inv, state, "renew", "--force", "--no-deploy", *LINEAGES)
    assert first.returncode == 0, first.stdout + first.stderr
    switches = LiveSwitches(fresh)
    try:
        killed = certmgr(inv, state, "deploy", "--all", crash="intent-remove")
        assert killed.returncode == -9, killed.stdout + killed.stderr
        left = list((state / "state" / "intents").rglob("*.json"))
        assert left, "the run died with an intent whose switch is already audited"
        assert any(e.get("intent") == json.loads(left[0].read_text())["id"] for e in audit(state))
        rerun = certmgr(inv, state, "deploy", "--all")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert not list((state / "state" / "intents").rglob("*.json"))
        quiet(switches)
        assert audited_switches(state) == switches.poll()
        assert not [e for e in audit(state) if e.get("settled")], "nothing needed settling: the line was there"
    finally:
        switches.close()


def test_run_stops_on_sigterm_and_the_next_run_settles_a_killed_deploy(fresh: Lab, proxy: ACMEProxy,
                                                                        tmp_path: Path) -> None:
    """`certmgr run` stopped by SIGTERM exits 143 naming `certmgr run` to finish; a deploy SIGKILLed right after a POP
    switched (so that POP looks current to a scan) is settled by the next `certmgr run`: one audit line per switch."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    switches = LiveSwitches(fresh)
    try:
        first = certmgr(inv, state, "renew", "--force", *LINEAGES)
        assert first.returncode == 0, first.stdout + first.stderr
        first = certmgr(inv, state, "renew", "--force", "--no-deploy", *LINEAGES)
        assert first.returncode == 0, first.stdout + first.stderr
        proc = start_certmgr(inv, state, "run", "--no-notify")
        interrupt_at(proc, signal.SIGTERM, ("switch", 0.0), state, switches)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, out + err
        [line] = [x for x in err.splitlines() if x.startswith("certmgr:")]
        assert line.startswith("certmgr: interrupted by SIGTERM: ") and "not started" in line, line
        assert line.endswith(" — run `certmgr run` to finish"), line
        done = certmgr(inv, state, "run", "--no-notify")
        assert done.returncode == 0, done.stdout + done.stderr
        quiet(switches)
        assert audited_switches(state) == switches.poll()

        # one certificate only: the POP that switched is then in no other deploy of the next run
        flip_store_live(state, LINEAGES[:1])
        proc = start_certmgr(inv, state, "deploy", LINEAGES[0])
        interrupt_at(proc, signal.SIGKILL, ("switch", 0.0), state, switches)
        proc.communicate(timeout=120)
        assert proc.returncode == -9
        [left] = list((state / "state" / "intents").rglob("*.json"))
        assert left.parent.name == LINEAGES[0], "the killed deploy left the intent of the commit it began"
        done = certmgr(inv, state, "run", "--no-notify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert not list((state / "state" / "intents").rglob("*.json")), "run settled it"
        quiet(switches)
        assert audited_switches(state) == switches.poll()
        assert_every_pop_serves_live(fresh, state)
    finally:
        switches.close()


@pytest.mark.parametrize("command", ["rollback", "revoke"])
def test_ctrl_c_in_rollback_or_revoke_names_the_command_that_finishes_it(fresh: Lab, proxy: ACMEProxy, tmp_path: Path,
                                                                         command: str) -> None:
    """Ctrl-C during `rollback` (to the version below live, not named) or `revoke`, one POP frozen (its sshd stopped)
    after the others switched: the exit line names the command that finishes the job — `certmgr rollback NAME --to
    V` with V resolved, `certmgr revoke NAME --reason R` — never `certmgr deploy NAME`, which would undo the rollback
    (it clears the pin) and never revokes. Running the named command finishes it: every POP serves the live version."""
    from tests.integration.lifecycle import MEDIA, cert_status, live, serial_of

    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    state = tmp_path / "state"
    for args in (("renew", MEDIA), ("renew", "--force", MEDIA)):
        made = certmgr(inv, state, *args)
        assert made.returncode == 0, made.stdout + made.stderr
    assert live(state) == 2
    if command == "rollback":
        argv, finish = ("rollback", MEDIA), ("rollback", MEDIA, "--to", "1")
    else:
        argv, finish = ("revoke", MEDIA, "--reason", "superseded"), ("revoke", MEDIA, "--reason", "superseded")
    switches = LiveSwitches(fresh)
    frozen = fresh.pop_names[-1]
    pid = fresh.sshd_pid(frozen)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = start_certmgr(inv, state, *argv, "--no-notify")
        others = set(fresh.pop_names) - {frozen}
        wait_for(lambda: proc.poll() is not None or {pop for (_, pop) in switches.poll()} >= others, 60,
                 "every POP but the frozen one to switch", interval=0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        os.kill(pid, signal.SIGCONT)
        switches.close()
    assert proc.returncode == 130, out + err
    [line] = [x for x in err.splitlines() if x.startswith("certmgr:")]
    assert line.endswith(f" — run `certmgr {' '.join(finish)}` to finish"), line
    assert "certmgr deploy" not in line, line
    done = certmgr(inv, state, *finish, "--no-notify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert live(state) == (1 if command == "rollback" else 3)
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    if command == "revoke":
        assert cert_status(fresh, serial_of(state, 2))["Status"] == "Revoked"


def test_a_switch_a_killed_run_never_verified_is_switched_back_when_not_served(fresh: Lab, proxy: ACMEProxy,
                                                                               tmp_path: Path) -> None:
    """One POP's nginx serves media from a fixed version directory (so a new live link changes nothing there);
    `deploy` is SIGKILLed while that POP's verify polls for the new serial. The next deploy settles the switch —
    never verified, so `status` does not call that POP current — and, the new serial still not served after the
    verify's wait, switches it back to the version before (not to the same one), reloads and verifies the old
    serial, exactly as the killed run's failed verify would have: rolled back, audited, BEHIND in status."""
    from tests.integration.lifecycle import MEDIA, serial_of

    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    state = tmp_path / "state"
    for args in (("renew", MEDIA), ("renew", "--force", "--no-deploy", MEDIA)):
        made = certmgr(inv, state, *args)
        assert made.returncode == 0, made.stdout + made.stderr
    v1, v2 = serial_of(state, 1), serial_of(state, 2)
    pop = fresh.pop_names[-1]
    p = fresh.pop_paths(pop)
    link = p.cert_root / "live" / MEDIA
    before = os.readlink(link)
    fixed = (link.parent / before).resolve()
    conf = p.prefix / "nginx.conf"
    original = conf.read_text()
    conf.write_text(original.replace(f"{link}/", f"{fixed}/"))
    fresh.nginx_reload(pop)
    switches = LiveSwitches(fresh)
    try:
        proc = start_certmgr(inv, state, "deploy", MEDIA)
        wait_for(lambda: proc.poll() is not None or switches.poll()[(MEDIA, pop)] > 0, 60, f"{pop} to switch")
        time.sleep(1.0)  # its commit (test, reload) is over: its verify polls for a serial it will never see
        kill9(proc)
        assert os.readlink(link) == f"../archive/{MEDIA}/2" and fresh.served_serial(pop, MEDIA) == int(v1, 16)
        shown = certmgr(inv, state, "status", MEDIA)
        [row] = [x for x in shown.stdout.splitlines() if x.strip().startswith(pop)]
        assert "current" not in row.split()[1:2], row

        again = certmgr(inv, state, "deploy", MEDIA)
        assert again.returncode == 1, again.stdout + again.stderr
        assert "switched by an interrupted run, is not served" in again.stdout, again.stdout
        assert f"(rolled back to version {before.rsplit('/', 1)[-1]}, reloaded)" in again.stdout, again.stdout
        assert os.readlink(link) == before and fresh.served_serial(pop, MEDIA) == int(v1, 16)
        mine = [e["action"] for e in audit(state) if e.get("host") == pop and e["action"] in ("deployed", "rolled back")]
        assert mine[-2:] == ["deployed", "rolled back"], mine  # the settled switch, then its switch back
        # the switch back had its own intent (a controller dying during it leaves it to be settled), now removed
        [back] = [e for e in audit(state) if e.get("host") == pop and e["action"] == "rolled back"][-1:]
        assert back.get("intent"), back
        assert not list((state / "state" / "intents").rglob("*.json"))
        shown = certmgr(inv, state, "status", MEDIA)
        [row] = [x for x in shown.stdout.splitlines() if x.strip().startswith(pop)]
        assert shown.returncode == 2 and row.split()[1] == "BEHIND" and f"serial {v1}" in row, row
        assert "a deploy rolled back: serves the old certificate" in row, row
    finally:
        conf.write_text(original)
        fresh.nginx_reload(pop)
        switches.close()
    done = certmgr(inv, state, "deploy", MEDIA)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    assert fresh.served_serial(pop, MEDIA) == int(v2, 16)
