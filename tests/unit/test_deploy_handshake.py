"""Verify by handshake: one handshake per name once it serves the serial, stale names polled, bounded per POP."""

from __future__ import annotations

import asyncio
from collections import Counter

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmgr.deploy import handshake
from certmgr.deploy.plan import serial_of_probe
from certmgr.inventory import Host
from certmgr.scan import Probe
from lab import pki

CA = pki.make_ca("handshake test CA")
OLD = pki.make_leaf(CA, ["a.test"])
NEW = pki.make_leaf(CA, ["a.test"])
HOST = Host(name="h", address="127.0.0.1", port=22, cert_root="/le", test_command=("true",),
            reload_command=("true",))


def der(leaf: pki.Issued) -> bytes:
    return x509.load_pem_x509_certificate(leaf.cert_pem).public_bytes(serialization.Encoding.DER)


NEW_SERIAL = serial_of_probe(Probe(address="x", port=1, sni="x", chain=(der(NEW),)))


class FakePop:
    """Serves OLD for a name until it has been asked `stale[name]` times, then NEW; counts handshakes and peak load."""

    def __init__(self, stale: dict[str, int] | None = None) -> None:
        self.stale = stale or {}
        self.asked: Counter[str] = Counter()
        self.active = self.peak = 0

    async def prober(self, address: str, port: int, sni: str) -> Probe:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.001)
            self.asked[sni] += 1
            leaf = OLD if self.asked[sni] <= self.stale.get(sni, 0) else NEW
            return Probe(address=address, port=port, sni=sni, chain=(der(leaf),))
        finally:
            self.active -= 1


def test_one_handshake_per_name_when_the_new_serial_is_served() -> None:
    """Every name already serving the new serial is confirmed by exactly one handshake."""
    pop = FakePop()
    names = [f"n{i}.test" for i in range(40)]
    assert NEW_SERIAL is not None
    ok, seen = asyncio.run(handshake.wait_served(pop.prober, HOST, names, NEW_SERIAL, limit=5))
    assert ok and list(seen) == names
    assert set(pop.asked.values()) == {1}


def test_only_stale_names_are_asked_again() -> None:
    """A name still served by the old workers is polled until it serves the new serial; the others are not asked again."""
    pop = FakePop(stale={"b.test": 2})
    assert NEW_SERIAL is not None
    ok, seen = asyncio.run(handshake.wait_served(pop.prober, HOST, ["a.test", "b.test"], NEW_SERIAL, limit=5))
    assert ok and serial_of_probe(seen["b.test"]) == NEW_SERIAL
    assert pop.asked == Counter({"a.test": 1, "b.test": 3})


def test_a_name_never_served_fails_with_what_it_served() -> None:
    """A name that keeps serving the old serial fails the verify once the limit passes, and shows the old serial."""
    pop = FakePop(stale={"b.test": 10**6})
    assert NEW_SERIAL is not None
    ok, seen = asyncio.run(handshake.wait_served(pop.prober, HOST, ["a.test", "b.test"], NEW_SERIAL, limit=0.2))
    assert not ok and serial_of_probe(seen["b.test"]) != NEW_SERIAL and serial_of_probe(seen["a.test"]) == NEW_SERIAL


def test_handshakes_to_one_pop_are_bounded() -> None:
    """However many names a POP serves, at most handshake.PER_HOST handshakes are in flight to it at once."""
    pop = FakePop()
    names = [f"n{i}.test" for i in range(200)]
    asyncio.run(handshake.served(pop.prober, HOST, names))
    assert pop.peak == handshake.PER_HOST
