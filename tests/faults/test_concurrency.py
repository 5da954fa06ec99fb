"""Concurrency: the timer's `certmgr run` and an on-call `certmgr renew` on one store.

One holds the store's flock; the other fails at once with exit 75 naming the holder's pid and
start time, or (`run --wait-lock`) waits and then re-plans. Orders are counted at the ACME proxy:
never two for one certificate. A holder killed with `kill -9` releases the lock with its life.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from lab import Lab
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import (
    LINEAGES,
    SNI,
    assert_every_pop_serves_live,
    audit,
    certmgr,
    kill9,
    start_certmgr,
    wait_for,
    write_inventory,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MEDIA = "media.hachyderm.test"


def orders_created(proxy: ACMEProxy) -> dict[str, int]:
    return {lineage: proxy.created("new-order", SNI[lineage][0]) for lineage in LINEAGES}


def lock_record(state: Path) -> dict[str, object] | None:
    try:
        text = (state / "lock").read_text()
    except FileNotFoundError:
        return None
    return json.loads(text) if text.strip() else None


def holds_open(pid: int, path: Path) -> bool:
    """True if process `pid` has `path` open (read from /proc, no cooperation needed)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if Path(fd.readlink()) == path:
                return True
        except OSError:
            continue
    return False


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_oncall_renew_fails_fast_naming_the_timer_run(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """While the timer's run holds the lock, `certmgr renew --due` exits 75 at once naming its pid and start time,
    orders nothing, and the timer's run completes with one order per certificate."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    held = proxy.hold("new-order", ident=MEDIA, drop=False)
    timer = start_certmgr(inv, state, "run", "--no-notify")
    try:
        ACMEProxy.wait_held(held)
        holder = lock_record(state)
        assert holder is not None and holder["pid"] == timer.pid and holder["actor"] == "certmgr run"
        # Fails fast, does not wait: the timer's run cannot finish while the proxy holds its order, so an on-call
        # renew that waited for the lock would never return here (no wall-clock bound needed).
        oncall = certmgr(inv, state, "renew", "--due")
        assert timer.poll() is None, "the timer's run still holds the lock"
    finally:
        proxy.release()
    assert oncall.returncode == 75, oncall.stdout + oncall.stderr
    assert re.search(rf"is locked by pid {timer.pid} \(certmgr run, started {re.escape(str(holder['started']))}\)",
                     oncall.stderr), oncall.stderr
    assert "hint: wait for it to finish" in oncall.stderr
    code, out, err = finish(timer)
    assert code == 0, out + err
    assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}
    assert {e["actor"] for e in audit(state)} == {"certmgr run"}, "the on-call renew wrote nothing"
    assert_every_pop_serves_live(fresh, state)


def test_wait_lock_waits_then_replans(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """`run --wait-lock 60` started during the timer's run waits for the lock, then finds nothing due: no second
    order for any certificate, nothing deployed twice."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    held = proxy.hold("new-order", ident=MEDIA, drop=False)
    timer = start_certmgr(inv, state, "run", "--no-notify")
    waiter = None
    try:
        ACMEProxy.wait_held(held)
        waiter = start_certmgr(inv, state, "run", "--no-notify", "--wait-lock", "60")
        # the waiter has the lock file open (it is polling flock) while the timer still holds it
        wait_for(lambda: holds_open(waiter.pid, state / "lock") or waiter.poll() is not None, 30,
                 "the waiting run to open the lock file")
        assert waiter.poll() is None, "it waits instead of failing"
        assert lock_record(state)["pid"] == timer.pid  # type: ignore[index]
    finally:
        proxy.release()
    code, out, err = finish(timer)
    assert code == 0, out + err
    assert waiter is not None
    wcode, wout, werr = finish(waiter)
    assert wcode == 0, wout + werr
    assert "renewed" not in wout and "deployed " not in wout, wout
    assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}
    deployed = [(e["object"], e["host"]) for e in audit(state) if e["action"] == "deployed"]
    assert sorted(deployed) == sorted({(c, h) for c in LINEAGES for h in fresh.pop_names}), "each pushed once"
    assert_every_pop_serves_live(fresh, state)


def test_timer_and_oncall_start_together(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """Started in the same instant, one of `run` and `renew --due` does the work and the other exits 75 naming it
    (or finds nothing left to do); never two orders for one certificate."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"  # not there yet: both create the store at the same time too
    procs = {"run": start_certmgr(inv, state, "run", "--no-notify"),
             "renew": start_certmgr(inv, state, "renew", "--due")}
    results = {k: finish(p) for k, p in procs.items()}
    codes = sorted(r[0] for r in results.values())
    assert codes in ([0, 0], [0, 75]), results
    for k, (code, _, err) in results.items():
        if code == 75:
            other = procs["renew" if k == "run" else "run"]
            actor = "renew" if k == "run" else "certmgr run"
            assert f"is locked by pid {other.pid} ({actor}, started " in err, err
    assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}
    assert_every_pop_serves_live(fresh, state)


def test_kill9_of_the_holder_frees_the_lock_at_once(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """After `kill -9` of the run holding the lock, the next run takes it at once (no exit 75, no waiting), cleans up
    and completes; the killed order costs at most one extra order."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    held = proxy.hold("new-order", ident=MEDIA)
    timer = start_certmgr(inv, state, "run", "--no-notify")
    try:
        ACMEProxy.wait_held(held)
        kill9(timer)
    finally:
        proxy.release()
    stale = lock_record(state)
    assert stale is not None and stale["pid"] == timer.pid, "the dead holder's record is still in the file"
    nxt = start_certmgr(inv, state, "run", "--no-notify")
    taken = wait_for(lambda: ((r := lock_record(state)) is not None and r["pid"] == nxt.pid) or nxt.poll() is not None,
                     10, "the next run to take the lock")
    # `run` waits for no lock by default (--wait-lock 0): had the dead holder's flock survived, it would have
    # exited 75 with "locked" at once instead of taking the lock. No wall-clock bound: the machine may be slow.
    assert taken, "the lock was taken"
    code, out, err = finish(nxt)
    assert code == 0, out + err
    assert "locked" not in err
    orders = orders_created(proxy)
    assert all(n <= 2 for n in orders.values()) and orders[MEDIA] == 1, orders
    assert_every_pop_serves_live(fresh, state)
