"""Crash at every step: `certmgr run` SIGKILLed mid-way, then rerun as the next timer would.

The kill comes from outside at an observable moment — a request held at the ACME proxy (before
Pebble sees it, or after Pebble answered but before certmgr does), a line in the audit log — or,
for the two steps that last microseconds, from tests/faults/crashpoints.py armed on the system
call itself. After each crash nothing at a final path is truncated or mixed (store and POPs), and
after the rerun every POP serves a valid certificate with at most one extra order per certificate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import pytest

from lab import Lab
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import (
    LINEAGES,
    SNI,
    assert_every_pop_serves_a_valid_certificate,
    assert_every_pop_serves_live,
    audit,
    certmgr,
    check_pop_files_whole,
    check_store_whole,
    kill9,
    start_certmgr,
    torn_audit_lines,
    wait_for,
    write_inventory,
)
from tests.receiver import Receiver

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_POPS = 3
MEDIA = "media.hachyderm.test"


def orders_created(proxy: ACMEProxy) -> dict[str, int]:
    return {lineage: proxy.created("new-order", SNI[lineage][0]) for lineage in LINEAGES}


def challenge_txt(flab: Lab) -> dict[str, list[str]]:
    """Every `_acme-challenge` TXT value the lab's primary still serves for the lab's names."""
    out = {}
    for name in sorted({n for names in SNI.values() for n in names}):
        fqdn = f"_acme-challenge.{name}."
        resp = dns.query.udp(dns.message.make_query(fqdn, "TXT"), "127.0.0.1", port=flab.ports.dns, timeout=3)
        values = [b"".join(r.strings).decode() for rrset in resp.answer for r in rrset]
        if values:
            out[fqdn] = values
    return out


def renewed_before_crash(state: Path) -> set[str]:
    return {e["object"] for e in audit(state) if e["action"] == "renewed"}


def wait_for_pop_scripts(flab: Lab, timeout: float = 60.0) -> None:
    """Until no certmgr script holds any POP's lock (archive/.certmgr.lock, flock: commit.sh keeps it to its end)."""
    import fcntl
    import time

    deadline = time.monotonic() + timeout
    for pop in flab.pop_names:
        path = flab.pop_paths(pop).cert_root / "archive" / ".certmgr.lock"
        if not path.exists():
            continue  # no script has ever run there
        with path.open("a") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"{pop}: a script still holds the POP lock after {timeout:g}s"
                    time.sleep(0.02)


def crash_and_rerun(flab: Lab, proxy: ACMEProxy, tmp_path: Path, crash: Callable[[subprocess.Popen[str]], None],
                    *, wrapper: str | None = None) -> tuple[Path, set[str]]:
    """Start `certmgr run`, let `crash` kill it, check nothing is torn, rerun, check every POP; return the state dir."""
    inv = write_inventory(flab, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    proc = start_certmgr(inv, state, "run", "--no-notify", crash=wrapper)
    try:
        crash(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        proxy.release()
    assert proc.returncode == -9, f"certmgr was killed, not finished (exit {proc.returncode})"
    done_before = renewed_before_crash(state)
    # right after the crash: every final path in the store is whole; on every POP once the scripts the killed run
    # started there have ended (they run on, holding the POP lock: a certbot conversion in flight has its lineage
    # between two renames for a moment, which nginx never reads — it loads files at a test or reload only)
    check_store_whole(state)
    wait_for_pop_scripts(flab)
    check_pop_files_whole(flab)
    assert_every_pop_serves_a_valid_certificate(flab, tmp_path / "trust.pem")

    rerun = certmgr(inv, state, "run", "--no-notify")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_every_pop_serves_live(flab, state)
    check_pop_files_whole(flab)
    assert challenge_txt(flab) == {}, "the rerun removed the challenge records the killed run left"
    orders = orders_created(proxy)
    for lineage in LINEAGES:
        assert orders[lineage] <= (1 if lineage in done_before else 2), (lineage, orders)
    assert not list((state / "archive").glob("*/.tmp-*")), "temporaries of the killed run are swept"
    return state, done_before


def _held(proxy: ACMEProxy, kind: str, *, after: bool) -> Callable[[subprocess.Popen[str]], None]:
    rule = proxy.hold(kind, ident=None if kind == "new-account" else MEDIA, after=after)

    def crash(proc: subprocess.Popen[str]) -> None:
        ACMEProxy.wait_held(rule)
        kill9(proc)

    return crash


@pytest.mark.parametrize(("step", "kind", "after", "ca_orders"), [
    ("after account registration", "new-account", True, 0),
    ("after key generation", "new-order", False, 0),
    ("after new-order", "new-order", True, 1),
    ("after answering the challenge", "challenge", True, 1),
    ("after finalize", "finalize", True, 1),
    ("after downloading the certificate", "certificate", True, 1),
])
def test_kill_at_acme_step(fresh: Lab, proxy: ACMEProxy, tmp_path: Path, step: str, kind: str, after: bool,
                           ca_orders: int) -> None:
    """SIGKILL at an ACME step (request held at the proxy) → the rerun serves valid certificates everywhere, with at
    most one extra order for the certificate that was in flight."""
    crash = _held(proxy, kind, after=after)
    accounts_at_kill: list[int] = []

    def and_count(proc: subprocess.Popen[str]) -> None:
        crash(proc)
        assert proxy.created("new-order", MEDIA) == ca_orders, step
        accounts_at_kill.append(proxy.created("new-account"))

    state, _ = crash_and_rerun(fresh, proxy, tmp_path, and_count)
    # the order URL was recorded before the kill (certmgr.orders): the rerun resumes that order, places none
    resumed = kind in ("challenge", "finalize", "certificate")
    assert proxy.created("new-order", MEDIA) == ca_orders + (0 if resumed else 1)
    assert (MEDIA in {e["object"] for e in audit(state) if e["action"] == "order resumed"}) == resumed
    # the account key is stored once the CA accepted it: a crash in between costs one orphan account, no more.
    # (The proxy holds only an answer the CA carried out: a random badNonce rejection is passed on.)
    if kind == "new-account":
        assert accounts_at_kill[0] == 1
        assert proxy.created("new-account") == accounts_at_kill[0] + 1
    else:
        assert proxy.created("new-account") == 1
    if kind in ("finalize", "certificate"):
        # the CA issued a certificate the killed run never stored: the rerun downloads it, issues none
        assert len(proxy.requests("finalize", MEDIA, status=200)) == 1
    media = [e for e in audit(state) if e["action"] == "renewed" and e["object"] == MEDIA]
    assert len(media) == 1 and media[0]["version"] == 1


def test_kill_mid_write_of_private_key(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """SIGKILL half-way through writing a version's privkey.pem leaves only a hidden temp dir; live is never torn."""
    state_dir = tmp_path / "state"

    def crash(proc: subprocess.Popen[str]) -> None:
        proc.wait(timeout=120)
        torn = [p for p in state_dir.glob("archive/*/.tmp-*/privkey.pem")]
        assert torn, "the crash hit while a private key was being written"
        assert all(b"END" not in p.read_bytes() for p in torn), "the key file was cut short"
        assert [p.name for p in state_dir.glob("live/*") if not p.name.startswith(".")] == [], "nothing became live"

    crash_and_rerun(fresh, proxy, tmp_path, crash, wrapper="privkey-write")


def test_kill_between_the_renames_of_a_swap(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """SIGKILL after a version is renamed into archive/ but before live/<name> is renamed onto it: live stays as it
    was, the version is whole, and the rerun makes a version live everywhere."""
    state_dir = tmp_path / "state"

    def crash(proc: subprocess.Popen[str]) -> None:
        proc.wait(timeout=120)
        versions = [p for p in state_dir.glob("archive/*/*") if p.name.isdigit()]
        assert versions, "a version was stored before the crash"
        assert [p.name for p in state_dir.glob("live/*") if not p.name.startswith(".")] == [], \
            "the crash came before the live rename"
        assert [p for p in state_dir.glob("live/.*.tmp-*") if p.is_symlink()], "the new link was made, not renamed"

    state, _ = crash_and_rerun(fresh, proxy, tmp_path, crash, wrapper="live-swap")
    for lineage in LINEAGES:
        assert (state / "live" / lineage).is_symlink()
    assert not list(state.glob("live/.*")), "the rerun swept the temporary link"


def test_kill_mid_audit_line_after_activation(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """SIGKILL after a version went live, half-way through its `renewed` audit line: the rerun orders nothing more
    for it, deploys it everywhere, and appends whole lines after the torn one (which readers skip)."""
    state_dir = tmp_path / "state"
    torn_name: list[str] = []

    def crash(proc: subprocess.Popen[str]) -> None:
        proc.wait(timeout=120)
        [line] = torn_audit_lines(state_dir)
        assert '"action": "renewed"' not in line or not line.endswith("}"), line
        torn_name.extend(n for n in LINEAGES if f'"object": "{n}"' in line)
        assert torn_name, "the torn line names the certificate that went live"
        assert (state_dir / "live" / torn_name[0]).is_symlink()

    state, _ = crash_and_rerun(fresh, proxy, tmp_path, crash, wrapper="audit-renewed")
    assert orders_created(proxy)[torn_name[0]] == 1, "already live: the rerun does not order it again"
    assert len(torn_audit_lines(state)) == 1
    assert (state / "audit.log").read_text().endswith("\n")
    assert any(e["action"] == "deployed" and e["object"] == torn_name[0] for e in audit(state))


def test_kill_mid_push(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """SIGKILL the moment the first POP's live/<name> is switched (its commit script runs on; the other POPs are
    mid-upload or mid-commit): every POP serves a whole certificate, and the rerun brings every POP to the live
    version without a new order, the audit log naming every POP's new serial."""
    links = [fresh.pop_paths(pop).cert_root / "live" / lineage for pop in fresh.pop_names for lineage in LINEAGES]

    def crash(proc: subprocess.Popen[str]) -> None:
        wait_for(lambda: any(p.is_symlink() for p in links) or proc.poll() is not None, 120,
                 "the first POP to switch live/<name>", interval=0.002)
        kill9(proc)

    state, done = crash_and_rerun(fresh, proxy, tmp_path, crash)
    assert done == set(LINEAGES), "every certificate was renewed before the push began"
    assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}, "a redeploy orders nothing"
    live = check_store_whole(state)
    deployed = {(e["object"], e["host"]): e["to"] for e in audit(state) if e["action"] == "deployed"}
    assert deployed == {(lineage, pop): live[lineage] for lineage in LINEAGES for pop in fresh.pop_names}, \
        "every POP's switch to the new serial is in the audit log, also one the killed run made"


def test_pop_crash_between_the_two_renames_of_the_certbot_conversion(fresh: Lab, proxy: ACMEProxy,
                                                                     tmp_path: Path) -> None:
    """A POP that died between `mv live/<name> live/.<name>.certbot-old` and `mv <new link> live/<name>` (the two
    renames converting certbot's layout; the remote script survives certmgr's own death, so only the host dying can
    stop it there) is repaired by the next run: certbot's directory is put back, converted, and the POP serves the
    new certificate."""
    pop = fresh.pop_names[-1]
    live = fresh.pop_paths(pop).cert_root / "live"
    # exactly what the first rename leaves: live/<name> missing, certbot's directory under the backup name,
    # and the new link prepared under its temporary name
    os.rename(live / MEDIA, live / f".{MEDIA}.certbot-old")
    os.symlink(f"../archive/{MEDIA}/2", live / f".{MEDIA}.tmp-4242-new")
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    res = certmgr(inv, state, "run", "--no-notify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    check_pop_files_whole(fresh)
    assert not (live / f".{MEDIA}.certbot-old").exists()


# ---------------------------------------------------------------- `certmgr revoke` killed between its steps


def _revoke_setup(flab: Lab, proxy: ACMEProxy, tmp_path: Path) -> tuple[Path, Path, str]:
    """media.hachyderm.test alone, version 1 issued and served on every POP: (inventory, state, its serial)."""
    from tests.integration.lifecycle import serial_of

    inv = write_inventory(flab, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    state = tmp_path / "state"
    first = certmgr(inv, state, "renew", MEDIA)
    assert first.returncode == 0, first.stdout + first.stderr
    return inv, state, serial_of(state, 1)


def test_revoke_killed_once_the_replacement_is_live_revokes_the_leaked_key_on_rerun(
        fresh: Lab, proxy: ACMEProxy, chat: Receiver, tmp_path: Path) -> None:
    """SIGKILL right after the replacement (version 2, a new key) became live, before the deploy and the revocation:
    status and run say the leaked certificate is still valid — run on chat too, even when it changed nothing —;
    another request waits for this one; the rerun revokes version 1 — not the replacement, which is live by then —
    without ordering a third certificate."""
    from tests.integration.lifecycle import cert_status, live, serial_of, spki_of

    inv, state, leaked = _revoke_setup(fresh, proxy, tmp_path)
    killed = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify",
                     crash="after-audit:renewed")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert live(state) == 2 and spki_of(state, 2) != spki_of(state, 1)
    replacement = serial_of(state, 2)
    assert cert_status(fresh, leaked)["Status"] == "Valid"

    status = certmgr(inv, state, "status", MEDIA)
    assert status.returncode == 2, status.stdout + status.stderr
    assert (f"revocation of {MEDIA} not finished (keyCompromise, asked ") in status.stdout
    assert f"version 1 (serial {leaked}) still valid at the CA; `certmgr revoke {MEDIA} --reason keyCompromise` " \
           "finishes it" in status.stdout
    assert "revocation not finished" in status.stdout.splitlines()[-1]
    check = certmgr(inv, state, "check", MEDIA)  # the monitoring plugin, the store readable
    assert check.returncode == 2 and check.stdout.startswith(f"CERTMGR CRITICAL - revocation of {MEDIA} not finished")

    for _ in range(2):  # the first run deploys version 2 to the POPs; the second changes nothing and still says it,
        chat.clear()    # exiting 2 as status does: a leaked key still valid at the CA is critical
        run = certmgr(inv, state, "run")
        assert run.returncode == 2 and f"version 1 (serial {leaked}) still valid at the CA" in run.stdout, run.stdout
        summary = [r.json for r in chat.wait_for(1) if "certmgr run" in str(r.json.get("title", ""))]
        assert summary and any(f"revocation of {MEDIA} not finished" in line for line in summary[0]["lines"]), summary

    other = certmgr(inv, state, "revoke", MEDIA, "--reason", "superseded", "--version", "2", "--no-notify")
    assert other.returncode != 0 and "is not finished; finish it first with " \
        f"`certmgr revoke {MEDIA} --reason keyCompromise` (nothing done)" in other.stdout + other.stderr
    assert cert_status(fresh, replacement)["Status"] == "Valid"

    orders = proxy.created("new-order", MEDIA)
    rerun = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming the revocation asked at " in rerun.stdout
    assert f"revoked          {MEDIA} version 1 serial {leaked} (keyCompromise)" in rerun.stdout
    assert proxy.created("new-order", MEDIA) == orders, "the rerun ordered no certificate"
    assert live(state) == 2 and not (state / "archive" / MEDIA / "3").exists()
    assert (cert_status(fresh, leaked)["Status"], cert_status(fresh, leaked)["Reason"]) == ("Revoked", 1)
    assert cert_status(fresh, replacement)["Status"] == "Valid"
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    after = certmgr(inv, state, "status", MEDIA)
    assert "revocation" not in after.stdout, after.stdout


def test_revoke_now_killed_after_revoking_is_replaced_by_the_next_run(
        fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """`revoke --now` SIGKILLed right after the CA revoked the live certificate (served everywhere, no replacement):
    the next `run` renews it at once with a new key and deploys it, and — its scan showing the replacement on every
    POP, the leaked serial revoked — finishes the revocation itself: record cleared, audited, exit 0; no rerun of
    revoke is needed."""
    from tests.integration.lifecycle import cert_status, live, serial_of, spki_of

    inv, state, leaked = _revoke_setup(fresh, proxy, tmp_path)
    killed = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--now", "--no-notify",
                     crash="after-audit:revoked")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert cert_status(fresh, leaked)["Status"] == "Revoked" and live(state) == 1

    # the run renews with a new key and deploys it everywhere; its scan then shows the replacement on every POP and
    # the leaked serial is revoked: the revocation is finished by the run itself, record cleared, exit 0
    run = certmgr(inv, state, "run", "--no-notify")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "the live certificate was revoked by certmgr (keyCompromise): a new key" in run.stdout, run.stdout
    assert "not finished" not in run.stdout, run.stdout
    assert f"revocation of {MEDIA} finished (keyCompromise): version 1 revoked at the CA, the replacement (version " \
           f"2, serial {serial_of(state, 2)}) served on every host" in run.stdout, run.stdout
    assert live(state) == 2 and spki_of(state, 2) != spki_of(state, 1)
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    assert [e.get("by") for e in audit(state) if e["action"] == "revoke done"] == ["run"]
    status = certmgr(inv, state, "status", MEDIA)
    assert status.returncode == 0 and "revocation" not in status.stdout, status.stdout
    again = certmgr(inv, state, "run", "--no-notify")
    assert again.returncode == 0 and "revocation" not in again.stdout and "renewed" not in again.stdout, again.stdout


def test_a_renewal_while_a_revocation_is_pending_never_reuses_the_leaked_key(
        fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """`reuse_key = true`, revoke killed right after it recorded its request (nothing else done): an operator's
    `renew --force` meanwhile makes a new key, not the leaked one; the rerun revokes version 1 only and keeps the
    renewed version 2 live, with no further order."""
    from tests.integration.lifecycle import cert_status, live, serial_of, spki_of

    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA],
                          cert_extra={"reuse_key": "true"})
    state = tmp_path / "state"
    assert certmgr(inv, state, "renew", MEDIA).returncode == 0
    leaked = serial_of(state, 1)
    killed = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify",
                     crash="after-audit:revoke requested")
    assert killed.returncode == -9 and live(state) == 1
    renewed = certmgr(inv, state, "renew", MEDIA, "--force")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert live(state) == 2 and spki_of(state, 2) != spki_of(state, 1), "the pending revocation forbids reuse_key"
    orders = proxy.created("new-order", MEDIA)
    rerun = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert proxy.created("new-order", MEDIA) == orders and live(state) == 2
    assert cert_status(fresh, leaked)["Status"] == "Revoked"
    assert cert_status(fresh, serial_of(state, 2))["Status"] == "Valid"
    assert_every_pop_serves_live(fresh, state, [MEDIA])


@pytest.mark.parametrize(("sig", "after"), [(signal.SIGINT, False), (signal.SIGKILL, True)],
                         ids=["ctrl-c-before-the-ca-revoked", "sigkill-after-the-ca-revoked-unseen"])
def test_revoke_interrupted_at_the_ca_request(fresh: Lab, proxy: ACMEProxy, tmp_path: Path, sig: signal.Signals,
                                               after: bool) -> None:
    """Ctrl-C while revokeCert is on its way (the CA never gets it), or SIGKILL once the CA revoked but before
    certmgr saw the answer. Checked from outside: the replacement is live and served on every POP with whole
    files, no challenge record is left in the zone, Pebble's status of the old serial is what really happened,
    the audit log holds no `revoked` line; status needs action. The rerun revokes (or finds `already revoked`)
    the old certificate only, with no new order, and clears the record."""
    from tests.integration.lifecycle import cert_status, live, serial_of

    inv, state, leaked = _revoke_setup(fresh, proxy, tmp_path)
    rule = proxy.hold("revoke", after=after)
    proc = start_certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify")
    try:
        ACMEProxy.wait_held(rule)
        signalled = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        # not a benchmark: the held request's own timeout is 20 s, and Ctrl-C must not wait for it
        stopped_in = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        proxy.release()
    assert proc.returncode == (130 if sig == signal.SIGINT else -9), (proc.returncode, out, err)
    assert stopped_in < 12, f"certmgr took {stopped_in:.1f}s to stop: it waited for the blocked CA request"
    if sig == signal.SIGINT:
        assert err.rstrip().splitlines()[-1].startswith("certmgr: interrupted by SIGINT: renewed "), err

    replacement = serial_of(state, 2)
    assert live(state) == 2
    check_store_whole(state)
    wait_for_pop_scripts(fresh)
    check_pop_files_whole(fresh)
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    assert challenge_txt(fresh) == {}
    assert cert_status(fresh, leaked)["Status"] == ("Revoked" if after else "Valid")
    assert cert_status(fresh, replacement)["Status"] == "Valid"
    actions = [e["action"] for e in audit(state)]
    assert "revoke requested" in actions and "revoked" not in actions and "revoke done" not in actions
    status = certmgr(inv, state, "status", MEDIA)
    assert status.returncode == 2 and f"version 1 (serial {leaked}) still valid at the CA" in status.stdout

    orders = proxy.created("new-order", MEDIA)
    rerun = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    verb = "already revoked" if after else "revoked        "
    assert f"{verb}  {MEDIA} version 1 serial {leaked} (keyCompromise)" in rerun.stdout
    assert proxy.created("new-order", MEDIA) == orders and live(state) == 2
    assert cert_status(fresh, leaked)["Status"] == "Revoked" and cert_status(fresh, replacement)["Status"] == "Valid"
    assert [e["action"] for e in audit(state)].count("revoked") == 1
    assert "revocation" not in certmgr(inv, state, "status", MEDIA).stdout
