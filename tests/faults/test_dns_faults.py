"""DNS faults against the real bind9 (primary + a lagging secondary) and Pebble, through the real CLI.

Every case checks what reached the CA (Pebble's own log: orders, challenge answers, validations),
what bind did (its log and what it serves), the exit status, the renew state and the audit log.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import pytest

from lab import Lab
from lab.named import read_bind_key
from tests.conftest import private_lab
from tests.faults.helpers_b import (
    REPO,
    LogMark,
    actions,
    certmgr,
    everything_written,
    inventory_text,
    lab_secrets,
    pebble_mark,
    write_inventory,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

NOPE = "nope.hachyderm.test"  # not granted by the zone's update-policy
MEDIA = "media.hachyderm.test"


@pytest.fixture(scope="module")
def dlab() -> Iterator[Lab]:
    """A lab of this module's own with the lagging secondary nameserver (127.0.0.2) and one POP."""
    with private_lab("dnsfaults", pops=1, secondary=True) as lab:
        yield lab


def txt_at(lab: Lab, fqdn: str, server: str = "127.0.0.1") -> set[str]:
    """TXT values `server` serves for `fqdn` (authoritative answer, asked directly)."""
    q = dns.message.make_query(fqdn, "TXT")
    resp = dns.query.udp(q, server, port=lab.ports.dns, timeout=2)
    return {b"".join(rd.strings).decode() for rr in resp.answer if rr.rdtype == dns.rdatatype.TXT for rd in rr}


def foreign_update(lab: Lab, adds: Sequence[tuple[str, str]]) -> None:
    """Write TXT values as another tool sharing the key would (certmgr never journalled them)."""
    name, alg, secret = read_bind_key(lab.dns_dir / "certmgr-lab.key")
    upd = dns.update.UpdateMessage("hachyderm.test", keyring=dns.tsigkeyring.from_text({name: (alg, secret)}),
                                   keyalgorithm=alg)
    for fqdn, value in adds:
        upd.add(fqdn + ".", 60, "TXT", f'"{value}"')
    resp = dns.query.tcp(upd, "127.0.0.1", port=lab.ports.dns, timeout=5)
    assert resp.rcode() == 0, resp


def journal_entries(state: Path) -> list[dict[str, str]]:
    """The DNS journal as written (it must exist once a run has journaled anything)."""
    data: list[dict[str, str]] = json.loads((state / "state" / "dns" / "journal.json").read_text())
    return data


def renew_json(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    start = proc.stdout.index("[")
    data: list[dict[str, object]] = json.loads(proc.stdout[start:])
    return data


def assert_no_secret(lab: Lab, proc: subprocess.CompletedProcess[str], state: Path) -> None:
    text = proc.stdout + proc.stderr + everything_written(state)
    for s in lab_secrets(lab):
        assert s not in text


def assert_failure_audited(state: Path, cert: str, error: object) -> None:
    """The audit log holds exactly one `renew failed` line for `cert`, with the error as reported, and no `renewed`."""
    [failed] = actions(state, "renew failed")
    assert failed["object"] == cert and failed["error"] == error and failed["failures"] == 1, failed
    assert actions(state, "renewed") == []


def bad_key_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.key"
    path.write_text(f'key "{name}" {{\n\talgorithm hmac-sha256;\n\tsecret "'
                    + base64.b64encode(os.urandom(32)).decode() + '";\n};\n')
    return path


# ---------------------------------------------------------------- TSIG and policy: fail fast, no challenge


@pytest.mark.parametrize("fault", ["outside-policy", "unknown-key", "wrong-secret"])
def test_dns_update_refused_fails_fast_without_answering_a_challenge(dlab: Lab, tmp_path: Path, fault: str) -> None:
    """REFUSED, BADKEY and BADSIG fail the certificate at once with the server's verdict; no challenge is answered, one UPDATE only, and the next run backs off."""
    port = dlab.ports.dns
    where = f"dns update hachyderm.test @127.0.0.1:{port}"
    if fault == "outside-policy":
        cert, overrides = NOPE, {}
        expected = f"{where}: REFUSED for _acme-challenge.{NOPE} (TXT not written)"
        named_says = "rejected by secure update (REFUSED)"
    elif fault == "unknown-key":
        cert, overrides = MEDIA, {"tsig_key": "certmgr-nobody",
                                  "tsig_secret_file": str(bad_key_file(tmp_path, "certmgr-nobody"))}
        expected = (f"{where}: BADKEY for TSIG key 'certmgr-nobody': the server does not know this key, or its "
                    "update policy/ACL denies it (TXT not written)")
        named_says = "(BADKEY)"
    else:
        cert, overrides = MEDIA, {"tsig_secret_file": str(bad_key_file(tmp_path, "certmgr-lab"))}
        expected = (f"{where}: TSIG signature rejected (BADSIG) — wrong secret or algorithm for key 'certmgr-lab' "
                    "(TXT not written)")
        named_says = "(BADSIG)"
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        dlab, certs=(), hosts=[], dns_overrides=overrides, extra_certs=[{"name": cert, "domains": [cert]}]))
    state = tmp_path / "state"
    pebble, named = pebble_mark(dlab), LogMark(dlab.dns_dir / "named.log")

    started = time.monotonic()
    proc = certmgr(inv, state, "renew", cert, "--json")
    elapsed = time.monotonic() - started

    assert proc.returncode == 1, proc.stderr
    [out] = renew_json(proc)
    assert out["status"] == "failed" and out["error"] == expected and out["retryable"] is False
    assert elapsed < 15, f"a refused update must fail fast, took {elapsed:.1f}s"
    # the CA: one order placed, its challenge never answered, so no authorization is spent
    assert pebble.count("orders in the db") == 1  # created (a badNonce retry of new-order is not a new order)
    assert pebble.count("POST /chalZ/") == 0 and pebble.count("Pulled a task") == 0
    # bind: the add turned away once; no cleanup UPDATE for a value that was never written
    assert named.count(named_says) == 1, named.new()[-2000:]
    assert txt_at(dlab, f"_acme-challenge.{cert}") == set()
    # on disk: nothing live, the failure remembered, nothing audited as renewed
    assert not (state / "live" / cert).exists()
    st = json.loads((state / "state" / "renew" / f"{cert}.json").read_text())
    assert st["failures"] == 1 and st["last_error"] == expected
    assert_failure_audited(state, cert, expected)
    assert_no_secret(dlab, proc, state)

    # the timer's next run: held back, nothing sent to the CA or to bind
    pebble2, named2 = pebble_mark(dlab), LogMark(dlab.dns_dir / "named.log")
    again = certmgr(inv, state, "renew", "--due", "--json")
    assert again.returncode == 0, again.stderr
    assert renew_json(again)[0]["status"] == "backoff"
    assert pebble2.count("orders in the db") == 0 and named2.count("updating zone") == 0
    assert_failure_audited(state, cert, expected)  # a backoff is not a new failure


def test_tsig_clock_skew_is_classified_as_clock_skew(dlab: Lab, tmp_path: Path) -> None:
    """With this machine's clock 2 h ahead (faketime), bind answers BADTIME: reported as clock skew with an NTP hint, no challenge answered."""
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(dlab, hosts=[]))
    state = tmp_path / "state"
    pebble, named = pebble_mark(dlab), LogMark(dlab.dns_dir / "named.log")
    proc = certmgr(inv, state, "renew", MEDIA, "--json", prefix=["faketime", "-f", "+2h"],
                   env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    assert proc.returncode == 1, proc.stderr
    [out] = renew_json(proc)
    assert out["error"] == (f"dns update hachyderm.test @127.0.0.1:{dlab.ports.dns}: TSIG time rejected (BADTIME) "
                            "(TXT not written)")
    assert out["hint"] == ("this machine's clock and the DNS server's differ by more than 5 minutes; fix NTP")
    assert out["retryable"] is False
    # bind saw the add, stamped 2 h ahead, and wrote nothing; no cleanup UPDATE follows a rejected add
    assert named.count("tsig verify failure (BADTIME)") == 1, named.new()[-2000:]
    assert pebble.count("POST /chalZ/") == 0 and pebble.count("Pulled a task") == 0
    assert txt_at(dlab, f"_acme-challenge.{MEDIA}") == set()
    assert not (state / "live" / MEDIA).exists()
    assert_failure_audited(state, MEDIA, out["error"])
    assert_no_secret(dlab, proc, state)


def test_dns_server_down_fails_fast_without_answering_a_challenge(dlab: Lab, tmp_path: Path) -> None:
    """A DNS server that does not answer fails the certificate within the query bound, naming the server, with no TXT written and no challenge answered."""
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        dlab, hosts=[], dns_overrides={"server": "127.0.0.3"}))  # nothing listens there
    state = tmp_path / "state"
    pebble = pebble_mark(dlab)
    started = time.monotonic()
    proc = certmgr(inv, state, "renew", MEDIA, "--json")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    [out] = renew_json(proc)
    fqdn = f"_acme-challenge.{MEDIA}"
    assert out["error"] == (f"dns locate {fqdn}: dns query {fqdn} CNAME @127.0.0.3:{dlab.ports.dns}: TimeoutError "
                            "(challenge not attempted)")
    assert elapsed < 15
    assert pebble.count("POST /chalZ/") == 0 and pebble.count("Pulled a task") == 0
    assert not (state / "live" / MEDIA).exists()
    assert_failure_audited(state, MEDIA, out["error"])


# ---------------------------------------------------------------- propagation


def test_secondary_never_receiving_the_record_fails_bounded_and_cleans(dlab: Lab, tmp_path: Path) -> None:
    """A second authoritative server that never gets the TXT: failure within the bound naming it, challenge unanswered, TXT removed."""
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        dlab, hosts=[], dns_overrides={"nameservers": ["127.0.0.1", "127.0.0.2"], "propagation_timeout": "3s"}))
    state = tmp_path / "state"
    pebble = pebble_mark(dlab)
    started = time.monotonic()
    proc = certmgr(inv, state, "renew", MEDIA, "--json")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    [out] = renew_json(proc)
    error = str(out["error"])
    assert error.startswith(f"dns propagation hachyderm.test: 1 of 2 nameserver(s) still lag after 3s — "
                            f"127.0.0.2:{dlab.ports.dns}: _acme-challenge.{MEDIA} lacks 1 of 1 value(s)"), error
    assert error.endswith("(challenge not answered)") and out["retryable"] is True
    assert 3 <= elapsed < 20
    assert pebble.count("orders in the db") == 1
    assert pebble.count("POST /chalZ/") == 0 and pebble.count("Pulled a task") == 0
    assert txt_at(dlab, f"_acme-challenge.{MEDIA}") == set()  # cleaned on the primary
    assert journal_entries(state) == []  # the journal says nothing is left behind
    assert_failure_audited(state, MEDIA, error)


def test_lagging_secondary_that_catches_up_is_waited_for(dlab: Lab, tmp_path: Path) -> None:
    """A secondary that gets the TXT only when it transfers the zone mid-wait: certmgr waits, answers the challenge once, renews, and cleans up."""
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        dlab, hosts=[], dns_overrides={"nameservers": ["127.0.0.1", "127.0.0.2"], "propagation_timeout": "30s"}))
    state = tmp_path / "state"
    pebble = pebble_mark(dlab)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "certmgr", "--inventory", str(inv), "--state-dir", str(state),
                             "renew", MEDIA, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    fqdn = f"_acme-challenge.{MEDIA}"
    try:
        deadline = time.monotonic() + 30
        while not txt_at(dlab, fqdn):
            assert proc.poll() is None and time.monotonic() < deadline, "the TXT never reached the primary"
            time.sleep(0.05)
        assert txt_at(dlab, fqdn, "127.0.0.2") == set() and pebble.count("POST /chalZ/") == 0
        dlab.sync_secondary()  # the secondary transfers the zone: now both serve the value
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    [outcome] = json.loads(out[out.index("["):])
    assert outcome["status"] == "renewed", outcome["error"]
    assert pebble.count("orders in the db") == 1 and pebble.count("Pulled a task") == 1
    assert txt_at(dlab, fqdn) == set()
    [renewed] = actions(state, "renewed")
    assert renewed["object"] == MEDIA


# ---------------------------------------------------------------- stale records after a crash


STALE_NAMES = [f"c{i:03d}.hachyderm.test" for i in range(40, 70)]  # 30 names the lab key may write


def test_thirty_stale_values_from_a_crash_are_removed_and_foreign_ones_kept(dlab: Lab, tmp_path: Path) -> None:
    """A run SIGKILLed with 30 challenge TXT values published: the rerun removes exactly those, leaves other tools' values alone, and renews."""
    name = "many.hachyderm.test"
    cert = {"name": name, "domains": STALE_NAMES}
    slow = write_inventory(tmp_path / "slow.toml", inventory_text(
        dlab, certs=(), hosts=[], extra_certs=[cert],
        dns_overrides={"nameservers": ["127.0.0.1", "127.0.0.2"], "propagation_timeout": "120s"}))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "certmgr", "--inventory", str(slow), "--state-dir", str(state),
                             "renew", name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(txt_at(dlab, f"_acme-challenge.{n}") for n in STALE_NAMES):
                break
            assert proc.poll() is None, "the slow run ended before publishing its records"
            time.sleep(0.1)
        else:
            raise AssertionError("the 30 challenge values never all appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    stale = {n: txt_at(dlab, f"_acme-challenge.{n}") for n in STALE_NAMES}
    assert all(len(v) == 1 for v in stale.values()), "SIGKILL cleans nothing: 30 of our values are left"

    # other tools' values: beside ours on the same names, and on a name certmgr never used
    foreign = [(f"_acme-challenge.{n}", f"foreign-{i}") for i, n in enumerate(STALE_NAMES[:5])]
    foreign.append(("_acme-challenge.c070.hachyderm.test", "foreign-other-name"))
    foreign_update(dlab, foreign)

    good = write_inventory(tmp_path / "good.toml", inventory_text(dlab, certs=(), hosts=[], extra_certs=[cert]))
    pebble = pebble_mark(dlab)
    rerun = certmgr(good, state, "renew", name, "--json")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    [out] = renew_json(rerun)
    assert out["status"] == "renewed", out["error"]
    # the killed run recorded its order (certmgr.orders): the rerun resumes it instead of ordering again
    assert pebble.count("orders in the db") == 0
    assert 'msg="order resumed"' in rerun.stderr
    assert "removed challenge records left by an interrupted run" in rerun.stderr
    assert "records=30" in rerun.stderr
    for i, n in enumerate(STALE_NAMES):
        left = txt_at(dlab, f"_acme-challenge.{n}")
        assert not (left & stale[n]), f"{n}: stale value still served"
        assert left == ({f"foreign-{i}"} if i < 5 else set()), (n, left)
    assert txt_at(dlab, "_acme-challenge.c070.hachyderm.test") == {"foreign-other-name"}
    assert journal_entries(state) == []
    [renewed] = actions(state, "renewed")
    assert renewed["object"] == name


# ---------------------------------------------------------------- records left behind: the DNS journal


WWW = "www.hachyderm.test"


def wait_published(lab: Lab, proc: subprocess.Popen[str], fqdn: str) -> set[str]:
    """Wait until the primary serves a TXT at `fqdn` (the run presented it); return the values."""
    deadline = time.monotonic() + 60
    while not (values := txt_at(lab, fqdn)):
        assert proc.poll() is None and time.monotonic() < deadline, "the TXT never reached the primary"
        time.sleep(0.05)
    return values


def doctor_check(inv: Path, state: Path, name: str) -> dict[str, object]:
    proc = certmgr(inv, state, "doctor", "--json", "--timer-interval", "12h", verbose=False)
    [check] = [c for c in json.loads(proc.stdout)["checks"] if c["name"] == name]
    return dict(check)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_dns_server_lost_during_cleanup_keeps_the_record_until_a_later_run_of_another_cert_removes_it(
        dlab: Lab, tmp_path: Path, fault: str) -> None:
    """The DNS server killed (or frozen) between present and cleanup: the journal keeps the value, status and doctor
    list it, the zone still serves it; with the server back, the next `renew` of another certificate (or `run`)
    removes it first."""
    fqdn = f"_acme-challenge.{MEDIA}"
    certs = [{"name": MEDIA, "domains": [MEDIA]}, {"name": WWW, "domains": [WWW]}]
    # the lagging secondary makes the run fail propagation after 3 s and clean up, with the primary gone by then
    slow = write_inventory(tmp_path / "slow.toml", inventory_text(
        dlab, certs=(), hosts=[], extra_certs=certs,
        dns_overrides={"nameservers": ["127.0.0.1", "127.0.0.2"], "propagation_timeout": "3s"}))
    good = write_inventory(tmp_path / "good.toml", inventory_text(dlab, certs=(), hosts=[], extra_certs=certs))
    state = tmp_path / "state"
    port = dlab.ports.dns
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "certmgr", "--inventory", str(slow), "--state-dir", str(state),
                             "-vv", "renew", MEDIA, "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        [value] = wait_published(dlab, proc, fqdn)
        pid = dlab.named_pid
        assert pid is not None
        if fault == "kill":
            dlab.kill_named()
        else:
            os.kill(pid, signal.SIGSTOP)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-2000:]
        [outcome] = json.loads(out[out.index("["):])
        assert str(outcome["error"]).startswith("dns propagation hachyderm.test: ")
        said = ("connection refused" if fault == "kill" else "no answer within 10s") + " (TXT may be left behind)"
        assert f"dns update hachyderm.test @127.0.0.1:{port}: {said}" in err
        # the journal: the value, unconfirmed, kept with everything needed to remove it
        [entry] = journal_entries(state)
        assert {k: entry[k] for k in ("zone", "fqdn", "value", "provider", "cert", "domain")} == {
            "zone": "hachyderm.test", "fqdn": fqdn, "value": value, "provider": "lab", "cert": MEDIA,
            "domain": MEDIA}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if fault == "kill":
            dlab.restart_named()  # over the same zone file and journal: what named had accepted is back
        elif pid is not None:
            os.kill(pid, signal.SIGCONT)
    if fault == "kill":
        assert txt_at(dlab, fqdn) == {value}  # bind had applied the add: the value is still in the zone
    # status and doctor show it, with its age
    status = certmgr(good, state, "status", verbose=False)
    assert status.returncode == 0, status.stderr
    assert ("DNS: 1 challenge TXT record(s) left behind, not yet confirmed removed (the next renew retries them "
            "first):") in status.stdout
    assert f'  {fqdn} TXT "{value[:10]}…" (zone hachyderm.test, provider lab, cert {MEDIA}) left ' in status.stdout
    [left] = json.loads(certmgr(good, state, "status", "--json", verbose=False).stdout)["dns_leftovers"]
    assert left["value"] == value and left["cert"] == MEDIA and left["age_seconds"] >= 0
    check = doctor_check(good, state, "leftovers")
    assert check["status"] == "warning" and check["subject"] == "state/dns/journal.json"
    assert str(check["message"]).startswith(f"1 challenge TXT record(s) left behind, not yet confirmed removed: "
                                            f"{fqdn} TXT")

    # the next run, of another certificate, first removes it (by query: nothing left), then renews
    if fault == "kill":
        rerun = certmgr(good, state, "renew", WWW, "--json")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert renew_json(rerun)[0]["status"] == "renewed"
    else:  # the daily `run`: MEDIA is held back after its failure, WWW renews
        rerun = certmgr(good, state, "run", "--json", "--no-notify")
        report = json.loads(rerun.stdout[rerun.stdout.index("{"):])
        assert {r["name"]: r["status"] for r in report["renewals"]} == {MEDIA: "backoff", WWW: "renewed"}, (
            rerun.stderr[-3000:])
        assert rerun.returncode == report["exit_code"] == 0, rerun.stderr[-3000:]
    assert "removed challenge records left by an interrupted run" in rerun.stderr and "records=1" in rerun.stderr
    assert txt_at(dlab, fqdn) == set() and txt_at(dlab, f"_acme-challenge.{WWW}") == set()
    assert journal_entries(state) == []
    assert "left behind" not in certmgr(good, state, "status", verbose=False).stdout
    assert doctor_check(good, state, "leftovers")["status"] == "ok"


def test_a_zone_refusing_the_update_does_not_hide_another_zones_accepted_record(dlab: Lab, tmp_path: Path) -> None:
    """One certificate over two zones of one provider: refuse.test answers REFUSED, hachyderm.test accepts; the error
    names refuse.test, the accepted value is removed (journal empty), and no delete is sent to the refusing zone."""
    name = "two-zones"
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        dlab, certs=(), hosts=[], dns_overrides={"zones": ["hachyderm.test", "refuse.test"]},
        extra_certs=[{"name": name, "domains": [MEDIA, "www.refuse.test"]}]))
    state = tmp_path / "state"
    pebble, named = pebble_mark(dlab), LogMark(dlab.dns_dir / "named.log")
    proc = certmgr(inv, state, "renew", name, "--json")
    assert proc.returncode == 1, proc.stderr
    [out] = renew_json(proc)
    assert out["error"] == (f"dns update refuse.test @127.0.0.1:{dlab.ports.dns}: REFUSED for "
                            "_acme-challenge.www.refuse.test (TXT not written)")
    # the accepted zone's value was published and then removed; the refusing zone got one UPDATE only
    assert [(a["object"], a["names"]) for a in actions(state, "dns published")] == [
        ("hachyderm.test", [f"_acme-challenge.{MEDIA}"])]
    assert [(a["object"], a["names"]) for a in actions(state, "dns removed")] == [
        ("hachyderm.test", [f"_acme-challenge.{MEDIA}"])]
    assert named.count("update 'refuse.test/IN' denied") == 1, named.new()[-2000:]
    assert txt_at(dlab, f"_acme-challenge.{MEDIA}") == set()
    assert journal_entries(state) == []
    assert pebble.count("POST /chalZ/") == 0
