"""dns/: TSIG secret parsing, propagation polling, CNAME-following `locate`, error unwrapping — with fakes."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path

import pytest

from certmgr import inventory
from certmgr.dns import Provider, TXTRecord, ZoneUpdate, challenge_name, locate, run_all
from certmgr.dns.propagation import wait_served
from certmgr.dns.rfc2136 import RFC2136Config, RFC2136Provider, parse_tsig_secret
from certmgr.errors import DNSAuthError, DNSError, PropagationTimeout, SecretError
from tests.helpers import PEBBLE_LAB_HEAD

SECRET = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def bind_file(name: str = "certmgr-lab", alg: str = "hmac-sha256", secret: str = SECRET) -> str:
    return f'key "{name}" {{\n\talgorithm {alg};\n\tsecret "{secret}";\n}};\n'


@pytest.mark.parametrize("text", [bind_file(), SECRET, f"  {SECRET}\n", bind_file(alg="HMAC-SHA256."),
                                  bind_file(name="certmgr-lab.")])
def test_tsig_secret_forms(text: str) -> None:
    """A BIND key file (any algorithm spelling) or a bare base64 secret gives the same key."""
    key = parse_tsig_secret(text, key_name="certmgr-lab", algorithm="hmac-sha256", where="dns.lab.tsig_secret_file")
    assert key.name == "certmgr-lab" and key.algorithm == "hmac-sha256" and key.secret.reveal() == SECRET
    assert SECRET not in repr(key)


@pytest.mark.parametrize(("text", "message"), [
    (bind_file(name="other"), "dns.lab.tsig_secret_file: the key file defines key 'other' but tsig_key is 'certmgr-lab'"),
    (bind_file(alg="hmac-md5"), "dns.lab.tsig_secret_file: the key file's algorithm 'hmac-md5' is refused "
                                "(HMAC-MD5 and unknown algorithms are never used)"),
    (bind_file(alg="hmac-sha512"), "dns.lab.tsig_secret_file: the key file says hmac-sha512 but tsig_algorithm is "
                                   "hmac-sha256"),
    ('key "certmgr-lab" { algorithm hmac-sha256; };', 'dns.lab.tsig_secret_file: the key file has no secret "…"; line'),
    ("not base64!", "dns.lab.tsig_secret_file: the TSIG secret is not base64 (nor a BIND key file)"),
    (base64.b64encode(b"short").decode(), "dns.lab.tsig_secret_file: the TSIG secret is only 5 bytes (at least 16 "
                                          "expected)"),
])
def test_tsig_secret_problems(text: str, message: str) -> None:
    """Each unusable key file is refused when the provider is built, with one exact message."""
    with pytest.raises(SecretError) as err:
        parse_tsig_secret(text, key_name="certmgr-lab", algorithm="hmac-sha256", where="dns.lab.tsig_secret_file")
    assert str(err.value) == message


def provider_cfg(tmp_path: Path, secret_text: str | None = None) -> inventory.DNSProvider:
    path = tmp_path / "tsig.key"
    if secret_text is not None:
        path.write_text(secret_text)
    return inventory.DNSProvider(name="lab", type="rfc2136", zones=("hachyderm.test",), config=RFC2136Config(
        tsig_key="certmgr-lab", tsig_secret=inventory.SecretRef("file", str(path), "dns.lab.tsig_secret_file"),
        server="127.0.0.1", port=53))


def test_provider_is_validated_when_built(tmp_path: Path) -> None:
    """Building a provider reads its secret: a missing file fails then, not mid-challenge."""
    with pytest.raises(SecretError, match="cannot read secret file"):
        RFC2136Provider.build(provider_cfg(tmp_path))
    prov = RFC2136Provider.build(provider_cfg(tmp_path, bind_file()))
    assert SECRET not in repr(prov)


def test_challenge_name_drops_the_wildcard() -> None:
    """`*.example` and `example` validate at the same `_acme-challenge` name (RFC 8555 §8.4)."""
    assert challenge_name("*.hachyderm.test") == challenge_name("hachyderm.test") == "_acme-challenge.hachyderm.test"


# ---------------------------------------------------------------- propagation


class FakeServers:
    """TXT data per (address, fqdn); `appear_after` polls before a server starts serving."""

    def __init__(self, data: dict[str, dict[str, frozenset[str]]], appear_after: dict[str, int] | None = None,
                 dead: Sequence[str] = ()) -> None:
        self.data = data
        self.appear_after = appear_after or {}
        self.dead = set(dead)
        self.calls: dict[str, int] = {}

    async def __call__(self, address: str, port: int, fqdn: str) -> frozenset[str] | None:
        self.calls[address] = self.calls.get(address, 0) + 1
        if address in self.dead:
            return None
        if self.calls[address] <= self.appear_after.get(address, 0):
            return frozenset()
        return self.data.get(address, {}).get(fqdn, frozenset())


EXPECTED = {"_acme-challenge.hachyderm.test": frozenset({"v1", "v2"})}


def test_propagation_waits_for_every_server() -> None:
    """The check returns only once every authoritative server serves every value, polling the laggards."""
    served = {"_acme-challenge.hachyderm.test": frozenset({"v1", "v2", "other-order"})}
    fake = FakeServers({"a": served, "b": served}, appear_after={"b": 3})
    waited = asyncio.run(wait_served("hachyderm.test", [("a", 53), ("b", 53)], EXPECTED, timeout=5, interval=0.01,
                                     query=fake))
    assert fake.calls == {"a": 1, "b": 4}  # a is not asked again once it serves everything
    assert waited < 1


@pytest.mark.parametrize(("fake", "message", "lagging"), [
    (FakeServers({"a": {"_acme-challenge.hachyderm.test": EXPECTED["_acme-challenge.hachyderm.test"]}}),
     "dns propagation hachyderm.test: 1 of 2 nameserver(s) still lag after 0.05s — "
     "b:53: _acme-challenge.hachyderm.test lacks 2 of 2 value(s) (challenge not answered)", ("b:53",)),
    (FakeServers({"a": {"_acme-challenge.hachyderm.test": frozenset({"v1"})}}, dead=["b"]),
     "dns propagation hachyderm.test: 2 of 2 nameserver(s) still lag after 0.05s — "
     "a:53: _acme-challenge.hachyderm.test lacks 1 of 2 value(s); b:53: no answer (challenge not answered)",
     ("a:53", "b:53")),
])
def test_propagation_timeout_names_the_laggards(fake: FakeServers, message: str, lagging: tuple[str, ...]) -> None:
    """On time-out the error names each lagging server and what it misses."""
    with pytest.raises(PropagationTimeout) as err:
        asyncio.run(wait_served("hachyderm.test", [("a", 53), ("b", 53)], EXPECTED, timeout=0.05, interval=0.01,
                                query=fake))
    assert str(err.value) == message
    assert err.value.lagging == lagging
    assert err.value.retryable


def test_propagation_without_servers_is_an_error() -> None:
    """No known nameserver is a clear error, not a silent pass."""
    with pytest.raises(PropagationTimeout, match="no authoritative nameservers known"):
        asyncio.run(wait_served("z.test", [], EXPECTED, timeout=1))


# ---------------------------------------------------------------- locate


INV = "\n" + PEBBLE_LAB_HEAD + """\

[dns.challenges]
type = "rfc2136"
zones = ["challenges.test"]
server = "127.0.0.1"
tsig_key = "certmgr-challenges"
tsig_secret_env = "Y"

[[certificates]]
name = "a"
domains = ["delegated.hachyderm.test"]
dns = "lab"
"""


class FakeProvider:
    on_change = None

    def __init__(self, name: str, cnames: dict[str, str]) -> None:
        self.name = name
        self.cnames = cnames
        self.asked: list[tuple[str, str]] = []

    async def present(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        return ()

    async def cleanup(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        return ()

    async def wait_propagated(self, records: Sequence[TXTRecord], *, timeout: float | None = None) -> None: ...

    async def cname_target(self, fqdn: str, zone: str) -> str | None:
        self.asked.append((fqdn, zone))
        return self.cnames.get(fqdn)


def test_locate_follows_a_cname_into_the_challenge_zone() -> None:
    """A CNAMEd `_acme-challenge` is written in the target zone, through that zone's provider."""
    inv = inventory.loads(INV)
    lab = FakeProvider("lab", {"_acme-challenge.delegated.hachyderm.test": "delegated.challenges.test"})
    ch = FakeProvider("challenges", {})
    providers: dict[str, Provider] = {"lab": lab, "challenges": ch}
    prov, rec = asyncio.run(locate(inv, providers, "delegated.hachyderm.test", "v"))
    assert prov is ch
    assert rec == TXTRecord(fqdn="delegated.challenges.test", zone="challenges.test", value="v",
                            domain="delegated.hachyderm.test")
    assert lab.asked == [("_acme-challenge.delegated.hachyderm.test", "hachyderm.test")]


@pytest.mark.parametrize(("cnames", "message"), [
    ({"_acme-challenge.www.hachyderm.test": "x.elsewhere.test"},
     "dns locate www.hachyderm.test: x.elsewhere.test (via CNAME from _acme-challenge.www.hachyderm.test) is in none "
     "of the inventory's DNS zones (challenge not attempted)"),
    ({"_acme-challenge.www.hachyderm.test": "a.hachyderm.test", "a.hachyderm.test": "_acme-challenge.www.hachyderm.test"},
     "dns locate www.hachyderm.test: CNAME loop _acme-challenge.www.hachyderm.test → a.hachyderm.test → "
     "_acme-challenge.www.hachyderm.test (challenge not attempted)"),
])
def test_locate_problems(cnames: dict[str, str], message: str) -> None:
    """A CNAME out of the inventory's zones, or a loop, is refused before anything is written."""
    inv = inventory.loads(INV)
    providers: dict[str, Provider] = {"lab": FakeProvider("lab", cnames), "challenges": FakeProvider("challenges", {})}
    with pytest.raises(DNSError) as err:
        asyncio.run(locate(inv, providers, "www.hachyderm.test", "v"))
    assert str(err.value) == message


def test_run_all_raises_the_first_error_itself() -> None:
    """Concurrent DNS steps surface the CertmgrError itself, not an ExceptionGroup."""
    async def bad() -> None:
        raise DNSAuthError("dns update z: REFUSED")

    async def slow() -> None:
        await asyncio.sleep(10)

    with pytest.raises(DNSAuthError, match="REFUSED"):
        asyncio.run(run_all([bad(), slow()]))
