"""Smoke tests for the local lab: each component answers the way certmgr will rely on."""

from __future__ import annotations

import asyncio
import shlex
import ssl
import uuid
from pathlib import Path
from typing import Any

import asyncssh
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from lab import Lab, read_bind_key, served_certificate

pytestmark = pytest.mark.integration


def _tsig(path: str) -> dns.tsig.Key:
    name, algorithm, secret = read_bind_key(Path(path))
    return dns.tsig.Key(name, secret, algorithm)


def _send(lab: Lab, update: dns.update.UpdateMessage) -> dns.rcode.Rcode:
    dns_info = lab.info["dns"]
    response = dns.query.tcp(update, dns_info["server"], port=dns_info["port"], timeout=5)
    return response.rcode()


def _txt(lab: Lab, name: str) -> tuple[set[str], list[str]]:
    """TXT strings at `name` and the types of every answer RRset (to see CNAMEs chased)."""
    dns_info = lab.info["dns"]
    response = dns.query.udp(dns.message.make_query(name, "TXT"), dns_info["server"], port=dns_info["port"], timeout=5)
    texts = {b"".join(r.strings).decode() for rrset in response.answer if rrset.rdtype == dns.rdatatype.TXT for r in rrset}
    return texts, [dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer]


def _ssh(lab: Lab, pop: dict[str, Any], known_hosts: str, command: str) -> asyncssh.SSHCompletedProcess:
    async def go() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            pop["address"],
            port=pop["ssh_port"],
            username=lab.info["ssh"]["user"],
            client_keys=[lab.info["ssh"]["key"]],
            known_hosts=known_hosts,
            agent_path=None,
            config=None,
        ) as conn:
            return await conn.run(command, check=True, timeout=30)

    return asyncio.run(asyncio.wait_for(go(), 60))


def test_pebble_directory_over_verified_https(lab: Lab) -> None:
    """Pebble's ACME directory answers over HTTPS verified against the lab's own HTTPS CA."""
    ctx = ssl.create_default_context(cafile=lab.info["pebble"]["https_ca"])
    with httpx.Client(verify=ctx, trust_env=False, timeout=10) as client:
        response = client.get(lab.info["pebble"]["directory"])
    assert response.status_code == 200
    assert {"newNonce", "newAccount", "newOrder"} <= response.json().keys()


def test_signed_update_in_policy_is_applied_and_visible(lab: Lab) -> None:
    """bind9 applies a TSIG-signed TXT update at _acme-challenge.www.hachyderm.test and serves it at once."""
    name = "_acme-challenge.www.hachyderm.test."
    token = f"smoke-{uuid.uuid4().hex}"
    key = _tsig(lab.info["dns"]["keys"]["certmgr-lab"])
    add = dns.update.UpdateMessage("hachyderm.test.", keyring=key)
    add.add(name, 60, "TXT", f'"{token}"')
    assert dns.rcode.to_text(_send(lab, add)) == "NOERROR"
    try:
        assert token in _txt(lab, name)[0]
    finally:
        delete = dns.update.UpdateMessage("hachyderm.test.", keyring=key)
        delete.delete(name, "TXT", f'"{token}"')
        assert dns.rcode.to_text(_send(lab, delete)) == "NOERROR"


def test_unsigned_update_is_refused(lab: Lab) -> None:
    """bind9 refuses an update that carries no TSIG signature."""
    update = dns.update.UpdateMessage("hachyderm.test.")
    update.add("_acme-challenge.www.hachyderm.test.", 60, "TXT", '"unsigned"')
    assert dns.rcode.to_text(_send(lab, update)) == "REFUSED"


@pytest.mark.parametrize(
    ("zone", "key", "name", "rdtype", "value"),
    [
        ("hachyderm.test.", "certmgr-lab", "www.hachyderm.test.", "A", "127.0.0.9"),
        ("hachyderm.test.", "certmgr-lab", "_acme-challenge.unlisted.hachyderm.test.", "TXT", '"x"'),
        ("hachyderm.test.", "certmgr-challenges", "_acme-challenge.www.hachyderm.test.", "TXT", '"x"'),
        ("refuse.test.", "certmgr-lab", "_acme-challenge.www.refuse.test.", "TXT", '"x"'),
    ],
    ids=["A-record", "unlisted-name", "other-zone-key", "refuse-zone"],
)
def test_signed_update_outside_policy_is_refused(lab: Lab, zone: str, key: str, name: str, rdtype: str, value: str) -> None:
    """bind9 refuses a correctly signed update that its update-policy does not grant."""
    update = dns.update.UpdateMessage(zone, keyring=_tsig(lab.info["dns"]["keys"][key]))
    update.add(name, 60, rdtype, value)
    assert dns.rcode.to_text(_send(lab, update)) == "REFUSED"


def test_cname_delegated_challenge_resolves_through_challenge_zone(lab: Lab) -> None:
    """A TXT written in challenges.test with its own key answers _acme-challenge.delegated.hachyderm.test via the CNAME."""
    token = f"delegated-{uuid.uuid4().hex}"
    key = _tsig(lab.info["dns"]["keys"]["certmgr-challenges"])
    add = dns.update.UpdateMessage("challenges.test.", keyring=key)
    add.add("delegated.challenges.test.", 60, "TXT", f'"{token}"')
    assert dns.rcode.to_text(_send(lab, add)) == "NOERROR"
    try:
        texts, types = _txt(lab, "_acme-challenge.delegated.hachyderm.test.")
        assert types[0] == "CNAME"
        assert token in texts
    finally:
        delete = dns.update.UpdateMessage("challenges.test.", keyring=key)
        delete.delete("delegated.challenges.test.", "TXT", f'"{token}"')
        _send(lab, delete)


def test_each_pop_serves_its_seed_certificates(lab: Lab) -> None:
    """Every POP's nginx presents, for each SNI name, the near-expiry seed certificate of that lineage."""
    seed = lab.info["seed"]["certificates"]
    for pop in lab.info["pops"]:
        for lineage in seed.values():
            for sni in lineage["domains"]:
                cert = served_certificate(pop["address"], pop["https_port"], sni)
                assert cert.serial_number == lineage["serial"], (pop["name"], sni)
        assert lineage["days_left"] < 10


def test_unknown_sni_still_completes_a_handshake(lab: Lab) -> None:
    """A POP answers an unknown SNI with its default certificate rather than failing the handshake."""
    pop = lab.info["pops"][0]
    cert = served_certificate(pop["address"], pop["https_port"], "unknown.example")
    assert cert.serial_number not in {c["serial"] for c in lab.info["seed"]["certificates"].values()}


def test_sshd_accepts_lab_key_and_runs_sudo_test_command(lab: Lab) -> None:
    """Every POP's sshd accepts the lab key as certmgr-deploy under strict host-key checking and lets it run sudo -n nginx -t."""
    for pop in lab.info["pops"]:
        result = _ssh(lab, pop, lab.info["ssh"]["known_hosts"], f"id -un && {shlex.join(pop['test_command'])}")
        assert str(result.stdout).strip() == "certmgr-deploy"
        assert "test is successful" in str(result.stderr)


def test_wrong_host_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    """A known_hosts entry with a different key for the POP makes the connection fail with a host-key error."""
    pop = lab.info["pops"][0]
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    line = other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{pop['address']}]:{pop['ssh_port']} {line}\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        _ssh(lab, pop, str(known_hosts), "true")


def test_reseed_repairs_a_broken_pop(lab: Lab) -> None:
    """reseed empties conf.d and restores the certbot layout, so a POP a test broke passes nginx -t again."""
    name = lab.pop_names[-1]
    paths = lab.pop_paths(name)
    (paths.conf_d / "broken.conf").write_text("this is not nginx syntax\n")
    (paths.cert_root / "live" / "media.hachyderm.test" / "fullchain.pem").unlink()
    assert lab.nginx_test(name)[0] != 0
    lab.reseed(name)
    assert lab.nginx_test(name)[0] == 0
    assert lab.served_serial(name, "media.hachyderm.test") == lab.seed_serial("media.hachyderm.test")


def test_restart_pebble_applies_env_and_refreshes_roots(lab: Lab) -> None:
    """restart_pebble runs Pebble with the given knobs and rewrites roots.pem with its newly generated root."""
    roots = Path(lab.info["pebble"]["roots"])
    before = roots.read_bytes()
    try:
        lab.restart_pebble(env={"PEBBLE_WFE_NONCEREJECT": "0"})
        assert lab.info["pebble"]["env"]["PEBBLE_WFE_NONCEREJECT"] == "0"
        assert roots.read_bytes() != before
    finally:
        lab.restart_pebble()
    assert "PEBBLE_WFE_NONCEREJECT" not in lab.info["pebble"]["env"]
