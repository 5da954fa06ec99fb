"""Scan against the lab's real nginx POPs: every certificate defect, dead POPs and silent ports, via the real CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certmgr.cli import main
from lab import Lab
from lab.proc import descendants, wait_until

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
LINEAGE = "media.hachyderm.test"
SNI = "media.hachyderm.test"
VICTIM = "sally"


# ---------------------------------------------------------------- lab and test PKI


@pytest.fixture(scope="module")
def scan_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The shared session `lab` (CERTMGR_TEST_PORT_BASE moves it), or a running lab named by CERTMGR_SCAN_LAB_DIR."""
    given = os.environ.get("CERTMGR_SCAN_LAB_DIR")
    if given:
        yield Lab.load(given)
        return
    yield request.getfixturevalue("lab")


@dataclass
class Key:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _issue(subject: str, issuer: Key | None, *, ca: bool, names: tuple[str, ...] = (),
           not_before: dt.datetime, not_after: dt.datetime) -> Key:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer = issuer.key if issuer else key
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.cert.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = (b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                             critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
             .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False))
    return Key(cert=b.sign(signer, hashes.SHA256()), key=key)


@dataclass
class PKI:
    root: Key
    inter: Key

    def leaf(self, names: tuple[str, ...] = (SNI,), *, start: float = -1, end: float = 89) -> Key:
        return _issue(names[0], self.inter, ca=False, names=names, not_before=NOW + start * DAY,
                      not_after=NOW + end * DAY)


@pytest.fixture(scope="module")
def pki() -> PKI:
    root = _issue("scan-test root", None, ca=True, not_before=NOW - 400 * DAY, not_after=NOW + 3650 * DAY)
    inter = _issue("scan-test intermediate", root, ca=True, not_before=NOW - 400 * DAY,
                   not_after=NOW + 3650 * DAY)
    return PKI(root=root, inter=inter)


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP and never says a word."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture(scope="module")
def inventory(scan_lab: Lab, pki: PKI, silent_port: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab's inventory plus our test CA in `trust` and a `silent` certificate on a mute host."""
    d = tmp_path_factory.mktemp("scan-inv")
    (d / "test-root.pem").write_bytes(pki.root.pem)
    text = scan_lab.inventory_path.read_text()
    text = text.replace("trust = [", f'trust = ["{d / "test-root.pem"}", ', 1)
    text = text.replace("[[certificates]]", f"""[hosts.mute]
address = "127.0.0.1"
https_port = {silent_port}

[[certificates]]""", 1)
    text += '\n[[certificates]]\nname = "silent.hachyderm.test"\ndomains = ["silent.hachyderm.test"]\n' \
            'dns = "lab"\nhosts = ["mute"]\n'
    path = d / "inventory.toml"
    path.write_text(text)
    return path


def install(lab: Lab, pop: str, chain: list[Key], leaf_key: Key | None = None) -> None:
    """Serve `chain` (leaf first) for LINEAGE on `pop`, reload nginx, wait until it is served."""
    p = lab.pop_paths(pop)
    live = p.cert_root / "live" / LINEAGE
    for fname, data, mode in (("fullchain.pem", b"".join(k.pem for k in chain), 0o644),
                              ("privkey.pem", (leaf_key or chain[0]).key_pem, 0o600)):
        target = live / fname
        target.unlink(missing_ok=True)  # a certbot symlink into archive/: replace it, never write through it
        target.write_bytes(data)
        os.chmod(target, mode)
    lab.nginx_reload(pop)
    want = chain[0].cert.serial_number
    master = lab.nginx_pid(pop)
    assert master is not None

    def settled() -> bool:
        # The old worker keeps accepting for a moment after a reload: once the new certificate is
        # served (so the new worker exists), wait until the master has only that one worker left.
        return _served(lab, pop) == want and len(descendants(master)) == 1

    assert wait_until(settled, 10.0, 0.05), f"{pop} does not serve the new certificate"


def _served(lab: Lab, pop: str) -> int | None:
    try:
        return lab.served_serial(pop, SNI)
    except Exception:  # not served yet (connection refused, handshake cut)
        return None


def run_scan(inventory: Path, state: Path, *args: str) -> tuple[int, dict[str, Any]]:
    res = CliRunner().invoke(main, ["--inventory", str(inventory), "--state-dir", str(state), "scan", "--json",
                                    "--no-notify", "--connect-timeout", "1", "--handshake-timeout", "1", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, json.loads(res.stdout)


@pytest.fixture
def clean(scan_lab: Lab) -> Iterator[None]:
    yield
    scan_lab.reseed()


def by_host(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["host"]: e for e in data["endpoints"]}


# ---------------------------------------------------------------- the cases


def test_seeded_lab_is_critical_near_expiry(scan_lab: Lab, inventory: Path, tmp_path: Path) -> None:
    """The lab's seed (5 days left of 90) is critical on every POP, with `certmgr renew` as the command."""
    code, data = run_scan(inventory, tmp_path, LINEAGE)
    assert code == 2
    assert {e["severity"] for e in data["endpoints"]} == {"critical"}
    assert data["certificates"][0]["command"] == f"certmgr renew {LINEAGE}"
    assert all(e["problems"][0].startswith("expires in 5.0d (critical below 9.0d, 1/10)") for e in data["endpoints"])


def openssl_serial(cert: x509.Certificate) -> str:
    """The serial as `openssl x509 -noout -serial` prints it (the operator's grep target)."""
    pem = cert.public_bytes(serialization.Encoding.PEM)
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem, capture_output=True, check=True).stdout
    return out.decode().strip().removeprefix("serial=")


def test_valid_everywhere_is_ok(scan_lab: Lab, pki: PKI, inventory: Path, tmp_path: Path, clean: None) -> None:
    """A valid, trusted, well-named certificate with a full chain on every POP scans ok, exit 0."""
    leaf = pki.leaf()
    for pop in scan_lab.pop_names:
        install(scan_lab, pop, [leaf, pki.inter])
    code, data = run_scan(inventory, tmp_path, LINEAGE)
    assert code == 0, [(x["host"], x["serial"], x["problems"]) for x in data["endpoints"]]
    e = by_host(data)[VICTIM]
    assert (e["severity"], e["chain"], e["serial"], e["key_type"], e["problems"]) == (
        "ok", "ok", openssl_serial(leaf.cert), "ecdsa-p256", [])
    assert e["issuer"] == "CN=scan-test intermediate"
    assert 88.9 < e["days_left"] < 89.1


@pytest.mark.parametrize("case,exit_code,severity,chain,problem", [
    ("warning", 1, "warning", "ok", "expires in 10.0d (warning below 22.5d, 1/4)"),
    ("expired", 2, "critical", "ok", "expired 2.0d ago"),
    ("not-yet-valid", 2, "critical", "ok", "not yet valid: starts in 3.0d"),
    ("self-signed", 2, "critical", "self-signed", "chain self-signed: self-signed by CN=media.hachyderm.test"),
    ("wrong-host", 2, "critical", "ok", "name mismatch: media.hachyderm.test not in certificate (www.other.test)"),
    ("missing-intermediate", 2, "critical", "incomplete",
     "chain incomplete: issuer CN=scan-test intermediate neither served nor trusted (missing intermediate?)"),
    ("drift", 2, "critical", "ok", "drift: serves serial"),
])
def test_defect_on_one_pop(scan_lab: Lab, pki: PKI, inventory: Path, tmp_path: Path, clean: None, case: str,
                           exit_code: int, severity: str, chain: str, problem: str) -> None:
    """One POP serving a defective certificate is classified precisely; the others stay ok."""
    good = pki.leaf()
    for pop in scan_lab.pop_names:
        if pop != VICTIM:
            install(scan_lab, pop, [good, pki.inter])
    if case == "warning":
        ageing = pki.leaf(start=-80, end=10)
        for pop in scan_lab.pop_names:  # every POP, so the verdict is the threshold alone
            install(scan_lab, pop, [ageing, pki.inter])
    elif case == "expired":
        install(scan_lab, VICTIM, [pki.leaf(start=-92, end=-2), pki.inter])
    elif case == "not-yet-valid":
        install(scan_lab, VICTIM, [pki.leaf(start=3, end=93), pki.inter])
    elif case == "self-signed":
        ss = _issue(SNI, None, ca=False, names=(SNI,), not_before=NOW - DAY, not_after=NOW + 89 * DAY)
        install(scan_lab, VICTIM, [ss])
    elif case == "wrong-host":
        install(scan_lab, VICTIM, [pki.leaf(("www.other.test",)), pki.inter])
    elif case == "missing-intermediate":
        install(scan_lab, VICTIM, [pki.leaf()])
    elif case == "drift":
        install(scan_lab, VICTIM, [pki.leaf(start=-30, end=59), pki.inter])  # older, still valid
    code, data = run_scan(inventory, tmp_path, LINEAGE)
    assert code == exit_code, [(x["host"], x["serial"], x["problems"]) for x in data["endpoints"]]
    e = by_host(data)[VICTIM]
    assert (e["severity"], e["chain"]) == (severity, chain), e
    assert any(p.startswith(problem) for p in e["problems"]), e["problems"]
    # serving something other than the other POPs is drift too, whatever else is wrong with it
    assert e["drift"] is (case != "warning")
    others = [x for h, x in by_host(data).items() if h != VICTIM]
    assert {x["severity"] for x in others} == ({"warning"} if case == "warning" else {"ok"})
    assert data["endpoints"][0]["host"] == VICTIM or case == "warning"  # most urgent first


def test_stopped_pop_is_error_and_the_rest_is_scanned(scan_lab: Lab, pki: PKI, inventory: Path, tmp_path: Path,
                                                      clean: None) -> None:
    """A stopped POP is "refused" (severity error, exit 3) while every other POP is still scanned."""
    good = pki.leaf()
    for pop in scan_lab.pop_names:
        install(scan_lab, pop, [good, pki.inter])
    scan_lab.stop_pop(VICTIM)
    code, data = run_scan(inventory, tmp_path, LINEAGE)
    assert code == 3
    e = by_host(data)[VICTIM]
    assert (e["severity"], e["error"], e["serial"]) == ("error", "refused", None)
    assert [x["severity"] for h, x in by_host(data).items() if h != VICTIM] == ["ok"] * (len(scan_lab.pop_names) - 1)
    assert data["certificates"][0]["command"] == f"certmgr scan {LINEAGE}"


def test_silent_port_times_out(inventory: Path, tmp_path: Path) -> None:
    """A port that accepts TCP and never speaks TLS is a handshake timeout within the bound, exit 3."""
    code, data = run_scan(inventory, tmp_path, "silent.hachyderm.test")
    assert code == 3
    (e,) = data["endpoints"]
    assert (e["host"], e["severity"], e["error"]) == ("mute", "error", "handshake timeout")
    assert 1000 <= e["elapsed_ms"] < 4000  # bounded by --handshake-timeout 1 (slack for a loaded machine)


def test_whole_inventory_prometheus_and_state(scan_lab: Lab, inventory: Path, tmp_path: Path) -> None:
    """A full scan writes the node_exporter file and one state file per certificate for `certmgr status`."""
    prom = tmp_path / "certmgr.prom"
    code, data = run_scan(inventory, tmp_path / "state", "--prometheus", str(prom))
    assert code == 3  # the mute host
    n = len(data["endpoints"])
    assert n == 4 * len(scan_lab.pop_names) + 1
    text = prom.read_text()
    assert text.count("\ncertmgr_scan_endpoint_success{") == n
    assert 'certmgr_scan_endpoint_success{certificate="silent.hachyderm.test",name="silent.hachyderm.test",' \
           'host="mute"' in text
    assert 'certmgr_scan_endpoints{severity="critical"} ' + str(n - 1) in text
    assert not [p for p in prom.parent.iterdir() if p.name.startswith(".")]  # no temp left behind
    state = json.loads((tmp_path / "state" / "state" / "scan" / f"{LINEAGE}.json").read_text())
    assert state["severity"] == "critical" and len(state["endpoints"]) == len(scan_lab.pop_names)


def test_public_scan_resolves_through_lab_dns(scan_lab: Lab, inventory: Path, tmp_path: Path) -> None:
    """--public resolves each name at the given DNS server and scans what it points to; NXDOMAIN is an error result."""
    code, data = run_scan(inventory, tmp_path, LINEAGE, "silent.hachyderm.test", "--public",
                          "--resolver", f"127.0.0.1:{scan_lab.ports.dns}", "--public-port", str(scan_lab.ports.https))
    hosts = {(e["certificate"], e["host"]): e for e in data["endpoints"]}
    pub = hosts[(LINEAGE, "public:127.0.1.2")]  # the lab zone's A records point at the first POP
    assert pub["serial"] == hosts[(LINEAGE, scan_lab.pop_names[0])]["serial"]
    nx = hosts[("silent.hachyderm.test", "public")]
    assert (nx["severity"], nx["error"]) == ("error", "dns: NXDOMAIN")
    assert code == 3


def test_scan_notifies_once_then_resolves(scan_lab: Lab, pki: PKI, inventory: Path, tmp_path: Path,
                                          clean: None) -> None:
    """Through the real CLI: a 500 is retried, a repeated scan stays quiet, and the fix sends "resolved"."""
    from tests.receiver import Receiver

    good = pki.leaf()
    for pop in scan_lab.pop_names:
        install(scan_lab, pop, [good, pki.inter])
    install(scan_lab, VICTIM, [pki.leaf(start=-92, end=-2), pki.inter])
    state = tmp_path / "state"

    def scan_notify() -> tuple[int, dict[str, Any]]:
        res = CliRunner().invoke(main, ["--inventory", str(inventory), "--state-dir", str(state), "scan", "--json",
                                        LINEAGE])
        return res.exit_code, json.loads(res.stdout)

    with Receiver(port=scan_lab.ports.webhook) as rx:  # the lab inventory's [channels.ops] webhook
        rx.script(500, 200)
        code, data = scan_notify()
        assert code == 2
        assert data["notifications"] == [{"channel": "ops", "kind": "problem", "certificate": LINEAGE, "ok": True,
                                          "attempts": 2, "error": None}]
        first = rx.wait_for(2)[1].json
        assert (first["kind"], first["severity"], first["hosts"], first["command"]) == (
            "problem", "critical", [VICTIM], f"certmgr renew {LINEAGE}")
        assert any(line.startswith(f"- {VICTIM} {SNI}: expired 2.0d ago") for line in first["lines"])

        code, data = scan_notify()
        assert (code, data["notifications"]) == (2, [])

        install(scan_lab, VICTIM, [good, pki.inter])
        code, data = scan_notify()
        assert code == 0
        assert [n["kind"] for n in data["notifications"]] == ["resolved"]
        assert rx.wait_for(3)[2].json["title"].startswith(f"RESOLVED {LINEAGE}: all ")
        assert len(rx.requests) == 3
