"""Verify by handshake: one good handshake per name, then a few confirming ones for the whole POP; bounded per POP."""

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
    """Serves per name OLD or NEW by the answers in `script[name]` (then NEW for ever); counts handshakes, peak load."""

    def __init__(self, script: dict[str, str] | None = None) -> None:
        self.script = script or {}
        self.asked: Counter[str] = Counter()
        self.active = self.peak = 0

    async def prober(self, address: str, port: int, sni: str) -> Probe:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.001)
            k = self.asked[sni]
            self.asked[sni] += 1
            answers = self.script.get(sni, "")
            leaf = OLD if k < len(answers) and answers[k] == "o" else NEW
            return Probe(address=address, port=port, sni=sni, chain=(der(leaf),))
        finally:
            self.active -= 1


def test_one_handshake_per_name_then_a_few_for_the_pop() -> None:
    """40 names already served: each is asked once, then two confirming rounds of CONFIRM_SAMPLE for the POP (not 3 × 40)."""
    pop = FakePop()
    names = [f"n{i}.test" for i in range(40)]
    assert NEW_SERIAL is not None
    ok, seen = asyncio.run(handshake.wait_served(pop.prober, HOST, names, NEW_SERIAL, limit=5))
    assert ok and list(seen) == names
    assert sum(pop.asked.values()) == 40 + (handshake.CONFIRM_ROUNDS - 1) * handshake.CONFIRM_SAMPLE
    assert min(pop.asked.values()) == 1


def test_only_stale_names_are_asked_again_before_the_confirmation() -> None:
    """A name still served by the old workers is polled alone until it serves the new serial; then the POP is confirmed."""
    pop = FakePop({"b.test": "oo"})
    assert NEW_SERIAL is not None
    ok, seen = asyncio.run(handshake.wait_served(pop.prober, HOST, ["a.test", "b.test"], NEW_SERIAL, limit=5))
    assert ok and serial_of_probe(seen["b.test"]) == NEW_SERIAL
    assert pop.asked == Counter({"a.test": 1 + 2, "b.test": 3 + 2})  # polled, then 2 rounds of both


def test_a_stale_answer_after_a_good_one_sends_the_certificate_back_to_polling() -> None:
    """A lucky new answer followed by an old worker's stale one is not taken as served: polling and confirmation start again."""
    pop = FakePop({"a.test": "nooo"})
    assert NEW_SERIAL is not None
    ok, seen = asyncio.run(handshake.wait_served(pop.prober, HOST, ["a.test"], NEW_SERIAL, limit=5))
    assert ok and serial_of_probe(seen["a.test"]) == NEW_SERIAL
    assert pop.asked["a.test"] == 1 + 2 + 1 + 1 + 2  # good, 2 confirming (stale), polled (stale), good, 2 confirming


def test_a_certificate_never_served_fails_alone() -> None:
    """On one POP a certificate whose name keeps serving the old serial fails; the other certificate verifies."""
    pop = FakePop({"b.test": "o" * 10**4})
    assert NEW_SERIAL is not None
    res = asyncio.run(handshake.wait_all(pop.prober, HOST, [(["a.test"], NEW_SERIAL), (["b.test"], NEW_SERIAL)],
                                         limit=0.5))
    assert [ok for ok, _ in res] == [True, False]
    assert serial_of_probe(res[1][1]["b.test"]) != NEW_SERIAL


class ReloadingPop(FakePop):
    """Every name serves OLD for the first `stale` handshakes to the POP (the old generation), then NEW; records how
    many handshakes were in flight as each one started."""

    def __init__(self, stale: int) -> None:
        super().__init__()
        self.stale = stale
        self.alone: list[bool] = []  # per handshake, in order: was it the only one in flight?

    async def prober(self, address: str, port: int, sni: str) -> Probe:
        self.alone.append(self.active == 0)
        self.active += 1
        try:
            self.asked[sni] += 1
            total = sum(self.asked.values())
            await asyncio.sleep(0.001)
            return Probe(address=address, port=port, sni=sni, chain=(der(OLD if total <= self.stale else NEW),))
        finally:
            self.active -= 1


def test_after_a_round_of_only_old_answers_one_name_is_asked_per_round() -> None:
    """The first round asks every name; when all 10 answer with the old generation, each later round asks one name
    (alone) until the new generation answers, then every name still to see at once, then the confirmation."""
    pop = ReloadingPop(stale=12)
    names = [f"n{i}.test" for i in range(10)]
    assert NEW_SERIAL is not None
    res = asyncio.run(handshake.wait_all(pop.prober, HOST, [([n], NEW_SERIAL) for n in names], limit=5))
    assert all(ok for ok, _ in res)
    # 10 (old) + 2 scouts (old) + 1 scout (new) + the 9 others + 2 confirming rounds of CONFIRM_SAMPLE
    assert sum(pop.asked.values()) == 10 + 3 + 9 + (handshake.CONFIRM_ROUNDS - 1) * handshake.CONFIRM_SAMPLE
    assert pop.alone[10:14] == [True, True, True, True]  # the three scouts; then the 9 go together
    assert pop.alone[13:22].count(False) == 8


def test_a_round_with_a_new_answer_does_not_start_scouting() -> None:
    """When the first round already sees the new generation somewhere, the names still stale are all asked again together."""
    pop = ReloadingPop(stale=3)
    names = [f"n{i}.test" for i in range(10)]
    assert NEW_SERIAL is not None
    res = asyncio.run(handshake.wait_all(pop.prober, HOST, [([n], NEW_SERIAL) for n in names], limit=5))
    assert all(ok for ok, _ in res)
    # 10 (3 old), confirmation of the 7 (2 × 4), the 3 again together (new), their confirmation (2 × 3)
    assert sum(pop.asked.values()) == 10 + 2 * 4 + 3 + 2 * 3
    assert [pop.asked[n] for n in names[:3]] == [1 + 1 + 2] * 3


def test_a_pop_never_reloaded_fails_every_certificate_and_shows_each_name() -> None:
    """A POP whose old generation keeps answering fails every certificate, and the answer holds a handshake of every name."""
    pop = ReloadingPop(stale=10**6)
    names = [f"n{i}.test" for i in range(12)]  # more than the rounds in the time allowed
    assert NEW_SERIAL is not None
    res = asyncio.run(handshake.wait_all(pop.prober, HOST, [([n], NEW_SERIAL) for n in names], limit=0.3))
    assert [ok for ok, _ in res] == [False] * 12
    assert [list(seen) for _, seen in res] == [[n] for n in names]


def test_handshakes_to_one_pop_are_bounded() -> None:
    """However many names a POP serves, at most handshake.PER_HOST handshakes are in flight to it at once."""
    pop = FakePop()
    names = [f"n{i}.test" for i in range(200)]
    asyncio.run(handshake.served(pop.prober, HOST, names))
    assert pop.peak == handshake.PER_HOST


def test_the_serial_read_from_a_handshake_or_a_pem_is_certinfos() -> None:
    """The serial verify compares (read alone, cached) is the one CertInfo reports, from a handshake's DER or a PEM."""
    from certmgr.deploy.plan import serial_of_pem
    from certmgr.material import CertInfo

    for leaf in (OLD, NEW, *(pki.make_leaf(CA, ["b.test"]) for _ in range(8))):
        want = CertInfo.from_der(der(leaf)).serial
        assert serial_of_probe(Probe(address="x", port=1, sni="b.test", chain=(der(leaf),))) == want
        assert serial_of_pem(leaf.cert_pem) == want
    assert serial_of_probe(Probe(address="x", port=1, sni="b.test", error="refused")) is None
    assert serial_of_pem(b"not a certificate") is None
