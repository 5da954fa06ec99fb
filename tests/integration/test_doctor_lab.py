"""`certmgr doctor` against the real lab: a fresh lab passes; each broken piece fails with its exact message."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmgr.cli import main
from certmgr.material import CertInfo, CertMaterial, split_pem
from certmgr.store import Store
from certmgr.timer import REPO_SYSTEMD_DIR
from lab import Lab
from lab.proc import descendants
from tests import fake_systemctl

pytestmark = pytest.mark.integration

LINEAGE = "media.hachyderm.test"


@pytest.fixture(scope="module")
def doctor_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session `lab` (CERTMGR_TEST_PORT_BASE moves it), or a running lab named by CERTMGR_DOCTOR_LAB_DIR."""
    given = os.environ.get("CERTMGR_DOCTOR_LAB_DIR")
    if given:
        instance = Lab.load(given)
        instance.up()
        yield instance
        return
    yield request.getfixturevalue("lab")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty store, as a fresh install has it (systemd's StateDirectory=)."""
    Store.open(tmp_path / "state")
    return tmp_path / "state"


def doctor(inventory: Path, state: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["--inventory", str(inventory), "--state-dir", str(state), "doctor", "--json",
                                       *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)  # --json is stdout; logs (stderr) may interleave


def find(report: dict[str, Any], name: str, subject: str) -> dict[str, Any]:
    hits = [c for c in report["checks"] if c["name"] == name and c["subject"] == subject]
    assert len(hits) == 1, [(c["name"], c["subject"]) for c in report["checks"]]
    return hits[0]


def not_ok(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["name"], c["subject"], c["status"]) for c in report["checks"] if c["status"] != "ok"]


def inventory_copy(lab: Lab, tmp_path: Path, replace: dict[str, str]) -> Path:
    text = lab.inventory_path.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def live_info(lab: Lab, pop: str, name: str) -> CertInfo:
    data = (lab.pop_paths(pop).cert_root / "live" / name / "fullchain.pem").read_bytes()
    return CertInfo.from_cert(x509.load_pem_x509_certificate(split_pem(data)[0]))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_fresh_lab_passes_and_changes_nothing(doctor_lab: Lab, state_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh lab with its own inventory every check is ok (exit 0); no POP file, nginx worker or account changes."""
    # systemd is not PID 1 here: a fake `systemctl` on PATH reports the repository's timer installed and enabled
    for key, value in fake_systemctl.install(tmp_path / "bin", {
            "certmgr.timer": fake_systemctl.repo_timer(REPO_SYSTEMD_DIR)}).items():
        monkeypatch.setenv(key, value)
    pops = doctor_lab.pop_names
    before = {p: tree(doctor_lab.pop_paths(p).cert_root) for p in pops}
    workers = {p: sorted(descendants(doctor_lab.nginx_pid(p) or 0)) for p in pops}
    code, report = doctor(doctor_lab.inventory_path, state_dir)
    assert not_ok(report) == []
    assert code == 0 and report["status"] == "ok"
    names = {c["name"] for c in report["checks"]}
    assert names == {"inventory", "trust", "secret", "store", "leftovers", "directory", "account", "tsig", "nameservers",
                     "ssh", "write",
                     "test-command",
                     "reload-command", "serves-live", "installed", "interval"}
    assert len([c for c in report["checks"] if c["name"] == "serves-live"]) == 3 * len(pops)
    assert find(report, "account", "pebble")["message"].startswith("no account yet: the first renewal registers one")
    assert {p: tree(doctor_lab.pop_paths(p).cert_root) for p in pops} == before
    assert {p: sorted(descendants(doctor_lab.nginx_pid(p) or 0)) for p in pops} == workers  # never reloaded
    assert not list((state_dir / "accounts").rglob("*.pem")) and not list((state_dir / "accounts").rglob("*key*"))
    text = json.dumps(report)
    import re
    for key in ("certmgr-lab", "certmgr-challenges"):
        secret = re.search(r'secret "([^"]+)"', (doctor_lab.dns_dir / f"{key}.key").read_text())
        assert secret is not None and secret.group(1) not in text
    assert doctor_lab.webhook_url_file.read_text().strip() not in text


def test_plain_text_output_groups_checks(doctor_lab: Lab, state_dir: Path) -> None:
    """Without --json the report is grouped plain text (no ✓ when not a TTY) ending in a summary line."""
    result = CliRunner().invoke(main, ["--inventory", str(doctor_lab.inventory_path), "--state-dir", str(state_dir),
                                       "doctor", "--timer-interval", "12h"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Inventory" and "Timer" in lines
    assert "✓" not in result.output
    assert lines[-1].startswith("doctor: ") and ", 0 warnings, 0 failed (" in lines[-1]


@pytest.mark.parametrize(("key_name", "expected"), [
    ("certmgr-lab", "TSIG key certmgr-lab: {server} rejected the signature (BADSIG): the secret or algorithm "
                    "(hmac-sha256) differs from the server's"),
    ("certmgr-nokey", "TSIG key certmgr-nokey: {server} answered BADKEY for TSIG key 'certmgr-nokey': the server "
                      "does not know this key, or its update policy/ACL denies it"),
])
def test_wrong_tsig_secret_fails_naming_the_key(doctor_lab: Lab, state_dir: Path, tmp_path: Path, key_name: str,
                                                expected: str) -> None:
    """A key file with the wrong secret (BADSIG) or a key name the server lacks (BADKEY) fails that zone only."""
    real = (doctor_lab.dns_dir / "certmgr-lab.key").read_text()
    import base64
    import re
    bad = re.sub(r'secret "[^"]*"', f'secret "{base64.b64encode(os.urandom(32)).decode()}"', real)
    bad = bad.replace('key "certmgr-lab"', f'key "{key_name}"')
    (tmp_path / "bad.key").write_text(bad)
    inv = inventory_copy(doctor_lab, tmp_path, {
        str(doctor_lab.dns_dir / "certmgr-lab.key"): str(tmp_path / "bad.key"),
        'tsig_key = "certmgr-lab"': f'tsig_key = "{key_name}"',
    })
    code, report = doctor(inv, state_dir, "--timer-interval", "12h")
    assert code == 2
    assert not_ok(report) == [("tsig", "dns.lab hachyderm.test", "fail")]
    server = f"127.0.0.1:{doctor_lab.ports.dns}"
    assert find(report, "tsig", "dns.lab hachyderm.test")["message"] == expected.format(server=server)
    assert find(report, "tsig", "dns.challenges challenges.test")["status"] == "ok"


@pytest.mark.parametrize(("zone", "expected"), [
    ("www.hachyderm.test", "key certmgr-lab accepted, but {server} has no SOA for www.hachyderm.test: it is not a "
                           "zone apex"),
    ("nothere.test", "key certmgr-lab accepted, but zone nothere.test does not exist at {server} (NXDOMAIN)"),
])
def test_zone_not_served_fails(doctor_lab: Lab, state_dir: Path, tmp_path: Path, zone: str, expected: str) -> None:
    """A zone the primary does not serve (or a name that is no apex) fails its tsig check; the real zone passes."""
    inv = inventory_copy(doctor_lab, tmp_path, {'zones = ["hachyderm.test"]': f'zones = ["hachyderm.test", "{zone}"]'})
    code, report = doctor(inv, state_dir, "--timer-interval", "12h")
    assert code == 2
    assert ("tsig", f"dns.lab {zone}", "fail") in not_ok(report)
    server = f"127.0.0.1:{doctor_lab.ports.dns}"
    assert find(report, "tsig", f"dns.lab {zone}")["message"] == expected.format(server=server)
    assert find(report, "tsig", "dns.lab hachyderm.test")["status"] == "ok"


def test_stopped_pop_fails_and_the_others_pass(doctor_lab: Lab, state_dir: Path) -> None:
    """With one POP's sshd and nginx stopped, its ssh check fails by name and every other host is ok."""
    victim = doctor_lab.pop_names[-1]
    p = doctor_lab.pop_paths(victim)
    doctor_lab.stop_pop(victim)
    try:
        code, report = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", "12h")
    finally:
        doctor_lab.start_pop(victim)
    assert code == 2
    assert not_ok(report) == [("ssh", victim, "fail")]
    assert find(report, "ssh", victim)["message"] == (
        f"connect {victim} ({p.address}:{doctor_lab.ports.ssh}): Connection refused (nothing else checked on this host)")
    others = [h for h in doctor_lab.pop_names if h != victim]
    for h in others:
        assert find(report, "ssh", h)["status"] == "ok"
        assert find(report, "serves-live", f"{h} {LINEAGE}")["status"] == "ok"
    assert not any(c["subject"].startswith(f"{victim} ") for c in report["checks"])


def test_wrong_known_hosts_entry_fails_with_host_key_message(doctor_lab: Lab, state_dir: Path, tmp_path: Path) -> None:
    """A known_hosts that lists another key for one POP fails that POP with "host key changed"; nothing is accepted."""
    victim = doctor_lab.pop_names[2]
    p = doctor_lab.pop_paths(victim)
    hostport = f"[{p.address}]:{doctor_lab.ports.ssh}"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    lines = []
    for line in doctor_lab.known_hosts.read_text().splitlines():
        lines.append(f"{hostport} {other}" if line.startswith(hostport + " ") else line)
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join(lines) + "\n")
    inv = inventory_copy(doctor_lab, tmp_path, {str(doctor_lab.known_hosts): str(kh)})
    code, report = doctor(inv, state_dir, "--timer-interval", "12h")
    assert code == 2
    assert not_ok(report) == [("ssh", victim, "fail")]
    fp = asyncssh.read_public_key(str(p.host_key) + ".pub").get_fingerprint()
    assert find(report, "ssh", victim)["message"] == (
        f"connect {victim} ({p.address}:{doctor_lab.ports.ssh}): host key changed: server offered ssh-ed25519 {fp}, "
        f"which {kh} does not list for {hostport} (nothing else checked on this host)")
    assert kh.read_text() == "\n".join(lines) + "\n"


def test_nginx_reading_another_path_fails_for_that_pop(doctor_lab: Lab, state_dir: Path) -> None:
    """nginx on one POP pointed at another certificate file for a name fails serves-live there, with both serials."""
    victim = doctor_lab.pop_names[1]
    p = doctor_lab.pop_paths(victim)
    original = p.nginx_conf.read_text()
    live_dir = p.cert_root / "live" / LINEAGE
    other = p.prefix / "elsewhere"
    other.mkdir(exist_ok=True)
    shutil.copy(doctor_lab.seed_dir / "pop-default.pem", other / "fullchain.pem")
    shutil.copy(doctor_lab.seed_dir / "pop-default.key", other / "privkey.pem")
    p.nginx_conf.write_text(original.replace(f"{live_dir}/fullchain.pem", f"{other}/fullchain.pem")
                            .replace(f"{live_dir}/privkey.pem", f"{other}/privkey.pem"))
    try:
        doctor_lab.nginx_reload(victim)
        code, report = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", "12h")
    finally:
        p.nginx_conf.write_text(original)
        doctor_lab.nginx_reload(victim)
    assert code == 2
    assert not_ok(report) == [("serves-live", f"{victim} {LINEAGE}", "fail")]
    served = CertInfo.from_cert(x509.load_pem_x509_certificate((other / "fullchain.pem").read_bytes()))
    live = live_info(doctor_lab, victim, LINEAGE)
    check = find(report, "serves-live", f"{victim} {LINEAGE}")
    assert check["message"] == (
        f"nginx serves another certificate than {live_dir}/fullchain.pem (serial {live.serial}): "
        f"{LINEAGE}: serial {served.serial}; it reads another path, or was not reloaded")
    assert check["hint"].startswith(f"on {victim}, point ssl_certificate/ssl_certificate_key for {LINEAGE} at ")


def test_broken_web_server_config_fails_the_test_command(doctor_lab: Lab, state_dir: Path) -> None:
    """A conf.d file nginx cannot parse fails that POP's test command with nginx's own message; nothing reloads."""
    victim = doctor_lab.pop_names[0]
    p = doctor_lab.pop_paths(victim)
    bad = p.conf_d / "doctor-broken.conf"
    bad.write_text("this_is_not_a_directive on;\n")
    try:
        code, report = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", "12h")
    finally:
        bad.unlink()
    assert code == 2
    assert not_ok(report) == [("test-command", victim, "fail")]
    check = find(report, "test-command", victim)
    assert check["message"] == (
        f'`nginx -t` failed (exit 1): "nginx: [emerg] unknown directive "this_is_not_a_directive" in {bad}:1 '
        f'nginx: configuration file {p.nginx_conf} test failed"')
    assert check["hint"] == f"fix the web server config on {victim}; deploy refuses to swap while this fails"


def _six_day_material(now: dt.datetime) -> CertMaterial:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doctor test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LINEAGE)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=6))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(LINEAGE)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return CertMaterial(cert=leaf.public_bytes(pem), chain=ca.public_bytes(pem),
                        privkey=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.mark.parametrize(("interval", "status", "message"), [
    ("24h", "fail", "interval 24h is too long: media.hachyderm.test lives 6d (store) and renews in its last 3d, which "
                    "needs a run at least every 18h (4 chances inside the window)"),
    ("12h", "ok", "runs at least every 12h; media.hachyderm.test lives 6d (store) and renews in its last 3d, which "
                  "needs at most 18h"),
])
def test_six_day_certificate_needs_more_than_a_daily_timer(doctor_lab: Lab, state_dir: Path, interval: str,
                                                           status: str, message: str) -> None:
    """A 6-day certificate live in the store fails a daily timer as too long, and passes a twice-daily one."""
    store = Store.open(state_dir)
    with store.lock("test"):
        store.activate(LINEAGE, store.add_version(LINEAGE, _six_day_material(dt.datetime.now(dt.UTC))))
    code, report = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", interval)
    check = find(report, "interval", "--timer-interval")
    assert (check["status"], check["message"]) == (status, message)
    assert code == (2 if status == "fail" else 0)
    if status == "fail":
        assert "twice-daily.conf" in check["hint"]


def test_stored_account_key_unknown_to_the_ca_is_a_warning(doctor_lab: Lab, state_dir: Path) -> None:
    """An account key the CA does not know (e.g. after a Pebble restart) warns; doctor registers nothing."""
    from certmgr import inventory, issue, keys

    ca = inventory.load(doctor_lab.inventory_path).cas["pebble"]
    store = Store.open(state_dir)
    key_pem = keys.to_pem(ec.generate_private_key(ec.SECP256R1()))
    with store.lock("test"):
        store.save_account_key(issue.account_id(ca), key_pem)
    code, report = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", "12h")
    assert code == 1
    assert not_ok(report) == [("account", "pebble", "warning")]
    assert find(report, "account", "pebble")["message"] == (
        f"the CA does not know the stored account key (accounts/{issue.account_id(ca)}): the next renewal registers "
        "this key again")
    # doctor looked it up and did not register it: a second run says the same
    _, again = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", "12h")
    assert find(again, "account", "pebble")["status"] == "warning"


def test_registered_account_is_valid(doctor_lab: Lab, state_dir: Path) -> None:
    """After renew's own account registration, doctor finds that account valid by its URL."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from certmgr import inventory, issue

    ca = inventory.load(doctor_lab.inventory_path).cas["pebble"]
    store = Store.open(state_dir)

    async def register() -> None:
        with ThreadPoolExecutor(2) as ex:
            client = await issue.ACMEClient.open(ca, executor=ex)
            with store.lock("test"):
                await client.ensure_account(store)

    asyncio.run(register())
    code, report = doctor(doctor_lab.inventory_path, state_dir, "--timer-interval", "12h")
    assert code == 0, not_ok(report)
    msg = find(report, "account", "pebble")["message"]
    assert msg.startswith(f"account https://127.0.0.1:{doctor_lab.ports.acme}/") and msg.endswith(" valid")


def test_privkey_owner_a_deploy_user_cannot_set_fails(doctor_lab: Lab, state_dir: Path, tmp_path: Path) -> None:
    """privkey_group the deploy user belongs to passes; privkey_owner = root (deploy user not root) fails early,
    with chown's own words, instead of failing every deploy to that host."""
    from lab.pop import KEY_GROUP

    first, second = doctor_lab.pop_names[0], doctor_lab.pop_names[1]
    text = doctor_lab.inventory_path.read_text()
    text = text.replace(f"[hosts.{first}]\n", f"[hosts.{first}]\nprivkey_group = \"{KEY_GROUP}\"\n", 1)
    text = text.replace(f"[hosts.{second}]\n", f"[hosts.{second}]\nprivkey_owner = \"root\"\n", 1)
    inv = tmp_path / "inventory.toml"
    inv.write_text(text)
    before = {p: tree(doctor_lab.pop_paths(p).cert_root) for p in (first, second)}
    code, report = doctor(inv, state_dir, "--timer-interval", "12h")
    assert code == 2
    assert not_ok(report) == [("privkey-owner", second, "fail")]
    assert find(report, "privkey-owner", first)["message"] == f"certmgr-deploy can give privkey.pem to {KEY_GROUP}"
    bad = find(report, "privkey-owner", second)
    assert bad["message"].startswith("certmgr-deploy cannot give privkey.pem to root: \"chown: changing ownership")
    assert "Operation not permitted" in bad["message"] and "privkey_owner" in bad["hint"]
    assert {p: tree(doctor_lab.pop_paths(p).cert_root) for p in (first, second)} == before
