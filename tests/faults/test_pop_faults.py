"""POP faults: a broken nginx, a reload that does nothing, a full disk, a hung POP, a mismatched key pair.

Each case runs the daily job (`certmgr run`, the real CLI) against a lab of this module's own
(3 POPs; the faulty one is `sally`, not the canary) and checks every POP by TLS handshake, the
faulty POP's files, the audit log, the exit status and the chat receiver.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lab import Lab
from tests.conftest import private_lab
from tests.faults.helpers_b import (
    SilentListener,
    actions,
    audit,
    certmgr,
    inventory_text,
    served,
    small_tmpfs,
    sshd_marks,
    tree_digest,
    write_inventory,
)
from tests.receiver import Receiver

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MEDIA = "media.hachyderm.test"
BAD = "sally"
GOOD = ("cdn-frankfurt-1", "cdn-fremont-1")


@pytest.fixture(scope="module")
def plab() -> Iterator[Lab]:
    """A lab of this module's own: three POPs (cdn-frankfurt-1 is the canary; sally gets the faults)."""
    with private_lab("popfaults", pops=3) as lab:
        yield lab


@pytest.fixture(scope="module")
def rx(plab: Lab) -> Iterator[Receiver]:
    with Receiver(port=plab.ports.webhook) as receiver:
        yield receiver


@pytest.fixture()
def seeded(plab: Lab, rx: Receiver) -> Iterator[Lab]:
    """Every POP on its near-expiry certbot-layout seed, conf.d empty, chat log empty."""
    plab.reseed()
    rx.clear()
    yield plab
    for pop in plab.pop_names:
        for f in plab.pop_paths(pop).conf_d.glob("*.conf"):
            f.unlink()


def run(lab: Lab, tmp_path: Path, state: Path,
        **overrides: Mapping[str, object]) -> tuple[subprocess.CompletedProcess[str], float]:
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        lab, certs=(MEDIA,), host_overrides=overrides, channel_url_file=lab.webhook_url_file))
    started = time.monotonic()
    proc = certmgr(inv, state, "run", "--json", verbose=False)
    return proc, time.monotonic() - started


def live_serial(state: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate((state / "live" / MEDIA / "cert.pem").read_bytes()).serial_number


def failures(rx: Receiver) -> list[dict[str, Any]]:
    return [r.json for r in rx.requests if r.json["kind"] == "failure"]


def assert_good_pops_deployed(lab: Lab, state: Path, report: dict[str, Any]) -> None:
    """The healthy POPs serve the store's new live certificate and are audited and reported as deployed."""
    new = live_serial(state)
    now = served(lab, GOOD, certs=(MEDIA,))
    assert set(now.values()) == {new}, now
    assert sorted(e["host"] for e in actions(state, "deployed")) == sorted(GOOD)
    statuses = {d["host"]: d["status"] for d in report["deploys"]}
    assert all(statuses[h] == "deployed" for h in GOOD), statuses


def test_nginx_config_broken_beforehand_uploads_nothing(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """`nginx -t` failing before certmgr touches sally: nothing is uploaded there, the alert says it was broken beforehand, the rest deploy, exit 2."""
    state = tmp_path / "state"
    seed = seeded.seed_serial(MEDIA)
    (seeded.pop_paths(BAD).conf_d / "broken.conf").write_text("this is not nginx syntax;\n")
    before = tree_digest(seeded.pop_paths(BAD).cert_root)
    proc, _ = run(seeded, tmp_path, state)
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert_good_pops_deployed(seeded, state, report)
    [bad] = [d for d in report["deploys"] if d["host"] == BAD]
    assert bad["status"] == "failed"
    assert bad["error"].startswith(f"deploy {MEDIA} → {BAD}: config was already broken before deploy: ")
    assert bad["error"].endswith("(nothing changed)")
    assert tree_digest(seeded.pop_paths(BAD).cert_root) == before
    assert served(seeded, [BAD], certs=(MEDIA,)) == {(BAD, MEDIA): seed}
    [alert] = failures(rx)
    assert alert["title"] == f"FAILED deploy to {BAD}: {MEDIA} (failed)"
    assert "config was already broken before deploy" in "\n".join(alert["lines"])
    assert "broken.conf" in "\n".join(alert["lines"])
    assert not [e for e in actions(state, "deployed") if e["host"] == BAD]


def test_reload_that_changes_nothing_is_caught_by_the_handshake(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """A reload command that exits 0 but reloads nothing: the handshake check sees the old serial, sally is rolled back, never reported deployed."""
    state = tmp_path / "state"
    seed = seeded.seed_serial(MEDIA)
    seed_bytes = (seeded.seed_dir / "certs" / MEDIA / "fullchain.pem").read_bytes()
    proc, elapsed = run(seeded, tmp_path, state, **{BAD: {"reload_command": ["true"]}})
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert_good_pops_deployed(seeded, state, report)
    [bad] = [d for d in report["deploys"] if d["host"] == BAD]
    assert bad["status"] == "rolled back", bad
    assert "not served after 10s" in bad["error"] and str(bad["error"]).endswith("reloaded)"), bad["error"]
    assert served(seeded, [BAD], certs=(MEDIA,)) == {(BAD, MEDIA): seed}
    # what nginx would read on its next start is the old certificate again, whole
    live = seeded.pop_paths(BAD).cert_root / "live" / MEDIA
    assert (live / "fullchain.pem").read_bytes() == seed_bytes
    # audited: certbot's layout converted (its version kept), then rolled back; never deployed
    assert [e["action"] for e in audit_all(state) if e.get("host") == BAD] == ["converted", "rolled back"]
    [alert] = failures(rx)
    assert alert["title"] == f"FAILED deploy to {BAD}: {MEDIA} (rolled back)"
    assert elapsed < 60


def audit_all(state: Path) -> list[dict[str, Any]]:
    return audit(state)


def test_disk_full_on_a_pop_changes_nothing_live(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """sally's archive on a full 64 KiB tmpfs: the upload fails, live is unchanged and still served, no temp dir is left; freed, a rerun finishes."""
    state = tmp_path / "state"
    seed = seeded.seed_serial(MEDIA)
    root = seeded.pop_paths(BAD).cert_root
    with small_tmpfs(root / "archive" / MEDIA, fill_to_free=512) as arch:
        live_before = tree_digest(root / "live")
        proc, _ = run(seeded, tmp_path, state)
        leftovers = sorted(p.name for p in arch.iterdir() if p.name != ".filler")
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert_good_pops_deployed(seeded, state, report)
    [bad] = [d for d in report["deploys"] if d["host"] == BAD]
    assert bad["status"] == "failed" and str(bad["error"]).endswith("(live unchanged)"), bad
    # SFTP says only "Failure": the free space on the POP names the cause
    assert bad["error"].startswith(f"deploy {MEDIA} → {BAD}: no space left on {BAD}:{root}/archive/{MEDIA} ("), bad
    assert bad["error"].endswith(" KB free) (live unchanged)"), bad
    assert leftovers == sorted(f"{k}1.pem" for k in ("cert", "chain", "fullchain", "privkey")), leftovers
    assert tree_digest(root / "live") == live_before
    assert served(seeded, [BAD], certs=(MEDIA,)) == {(BAD, MEDIA): seed}
    [alert] = failures(rx)
    assert alert["title"] == f"FAILED deploy to {BAD}: {MEDIA} (failed)"

    # space back: the next run deploys sally and only sally
    rx.clear()
    again, _ = run(seeded, tmp_path, state)
    assert again.returncode == 0, again.stdout
    assert set(served(seeded, certs=(MEDIA,)).values()) == {live_serial(state)}
    assert [e["host"] for e in actions(state, "deployed")][-1] == BAD


def test_pop_hanging_after_connect_is_bounded_and_others_finish(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """sally accepts TCP on SSH and HTTPS and never speaks: the run is bounded by the timeouts, sally is unreachable, the others deploy."""
    state = tmp_path / "state"
    p = seeded.pop_paths(BAD)
    seeded.stop_pop(BAD)
    try:
        with SilentListener(p.address, seeded.ports.ssh) as ssh, SilentListener(p.address, seeded.ports.https) as tls:
            proc, elapsed = run(seeded, tmp_path, state)
            assert ssh.accepted >= 1 and tls.accepted >= 1
    finally:
        seeded.start_pop(BAD)
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert_good_pops_deployed(seeded, state, report)
    [bad] = [d for d in report["deploys"] if d["host"] == BAD]
    assert bad["status"] == "unreachable", bad
    assert bad["error"] == (f"deploy {MEDIA} → {BAD}: connect {BAD} ({p.address}:{seeded.ports.ssh}): timed out after "
                            "10s (nothing changed)"), bad["error"]
    # scan before (5 s handshake) + connect (10 s) + scan after (5 s), with slack for two shared cores
    assert elapsed < 45, f"run took {elapsed:.1f}s"
    [alert] = failures(rx)
    assert alert["title"] == f"FAILED deploy to {BAD}: {MEDIA} (unreachable)"


def test_mismatched_fullchain_and_key_are_refused_before_upload(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """A live version whose privkey does not match its certificate is refused locally: no SSH session, no POP changes, exit 2, an alert per POP."""
    state = tmp_path / "state"
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        seeded, certs=(MEDIA,), channel_url_file=seeded.webhook_url_file))
    renewed = certmgr(inv, state, "renew", MEDIA, "--no-deploy", verbose=False)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (state / "live" / MEDIA / "privkey.pem").write_bytes(other)  # a corrupted / hand-edited version
    pops_before = {pop: tree_digest(seeded.pop_paths(pop).cert_root) for pop in seeded.pop_names}
    served_before = served(seeded, certs=(MEDIA,))
    sshd = sshd_marks(seeded)
    rx.clear()
    proc, _ = run(seeded, tmp_path, state)
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert {d["host"]: d["status"] for d in report["deploys"]} == {pop: "failed" for pop in seeded.pop_names}
    for d in report["deploys"]:
        assert d["error"] == (f"deploy {MEDIA} → {d['host']}: certificate and private key do not match "
                              "(nothing changed)"), d["error"]
    assert all(m.count("Accepted publickey") == 0 for m in sshd.values()), "no SSH session may be opened"
    assert {pop: tree_digest(seeded.pop_paths(pop).cert_root) for pop in seeded.pop_names} == pops_before
    assert served(seeded, certs=(MEDIA,)) == served_before
    assert actions(state, "deployed") == []
    titles = sorted(str(a["title"]) for a in failures(rx))
    assert titles == sorted(f"FAILED deploy to {pop}: {MEDIA} (failed)" for pop in seeded.pop_names)


def test_test_command_without_sudo_rights_touches_nothing(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """A test command sudoers does not allow: "cannot run" with sudo's own words, nothing changed on sally, the rest deploy."""
    state = tmp_path / "state"
    seed = seeded.seed_serial(MEDIA)
    before = tree_digest(seeded.pop_paths(BAD).cert_root)
    proc, _ = run(seeded, tmp_path, state, **{BAD: {"test_command": ["sudo", "-n", "/usr/sbin/nginx", "-t"]}})
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert_good_pops_deployed(seeded, state, report)
    [bad] = [d for d in report["deploys"] if d["host"] == BAD]
    assert bad["status"] == "failed"
    assert "cannot run" in bad["error"] and "a password is required" in bad["error"], bad["error"]
    assert bad["error"].endswith("(nothing changed)")
    assert tree_digest(seeded.pop_paths(BAD).cert_root) == before
    assert served(seeded, [BAD], certs=(MEDIA,)) == {(BAD, MEDIA): seed}
    [alert] = failures(rx)
    assert alert["title"] == f"FAILED deploy to {BAD}: {MEDIA} (failed)"
