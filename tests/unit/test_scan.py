"""Scan: handshakes against in-process TLS servers, verification verdicts, severity, drift and exit codes."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certmgr import inventory as inv_mod
from certmgr import scan as scan_mod
from certmgr.certcheck import load_roots
from certmgr.inventory import Threshold
from certmgr.material import CertInfo
from certmgr.scan import Endpoint, EndpointResult, Probe, apply_drift, classify, expiry_problem, probe
from certmgr.verify import TrustError, Verifier, load_pem_anchors, matches_name
from lab.pki import Issued, make_ca, make_leaf
from tests import inv as inv_builder

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = make_ca("scan test root")
    inter = make_ca("scan test intermediate", issuer=root)
    return {"root": root, "inter": inter}


def inv_text(tmp_path: Path, ports: dict[str, int]) -> str:
    """Certificate "a" on loopback hosts at these HTTPS ports, trusting tmp_path/trust.pem."""
    return inv_builder.toml(defaults={"trust": [f"{tmp_path}/trust.pem"]},
                            hosts={h: {"address": "127.0.0.1", "https_port": p} for h, p in ports.items()},
                            certificates=[inv_builder.cert("a", *ports, domains=["a.example.test"])])


def self_signed(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + 80 * DAY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def pem(*certs: Issued) -> bytes:
    return b"".join(c.cert_pem for c in certs)


def der(c: Issued) -> bytes:
    return c.cert.public_bytes(serialization.Encoding.DER)


@asynccontextmanager
async def tls_server(tmp: Path, leaf: Issued, chain: tuple[Issued, ...] = ()) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1:<ephemeral> serving `leaf` + `chain`."""
    (tmp / "full.pem").write_bytes(pem(leaf, *chain))
    (tmp / "key.pem").write_bytes(leaf.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "full.pem", tmp / "key.pem")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.read(1)
        except (OSError, ssl.SSLError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def run(coro_fn: Callable[[], object]) -> object:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_probe_reads_the_served_chain(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A probe returns the leaf and intermediate exactly as served, in order."""
    leaf = make_leaf(pki["inter"], ["www.example.test"])

    async def go() -> Probe:
        async with tls_server(tmp_path, leaf, (pki["inter"],)) as port:
            return await probe("127.0.0.1", port, "www.example.test")

    p = run(go)
    assert isinstance(p, Probe) and p.ok and p.error is None
    assert p.chain == (der(leaf), der(pki["inter"]))


@pytest.mark.parametrize("case,expected", [
    ("refused", "refused"),
    ("silent", "handshake timeout"),
    ("close", "tls: connection closed during handshake"),
    ("alert", "tls: alert unrecognized name"),
    ("plaintext", "tls: not TLS (wrong version number)"),
])
def test_probe_failures_are_results(tmp_path: Path, pki: dict[str, Issued], case: str, expected: str) -> None:
    """Refused, silent, closing, alerting and non-TLS ports each give a precise `Probe.error`, never raise."""

    async def go() -> Probe:
        if case == "refused":
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            return await probe("127.0.0.1", port, "x.test", handshake_timeout=0.3)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if case == "plaintext":
                w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                await w.drain()
            if case == "silent":
                await r.read()
            if case in ("close", "alert"):
                # read the whole ClientHello record so that closing sends a FIN, not a reset
                head = await r.readexactly(5)
                await r.readexactly(int.from_bytes(head[3:5], "big"))
            if case == "alert":
                w.write(b"\x15\x03\x03\x00\x02\x02\x70")  # fatal alert 112 unrecognized_name (RFC 8446 §6)
                await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            return await probe("127.0.0.1", server.sockets[0].getsockname()[1], "x.test", handshake_timeout=0.3)
        finally:
            server.close()

    p = run(go)
    assert isinstance(p, Probe)
    assert not p.ok
    assert p.error == expected


def test_probe_connect_timeout_is_bounded() -> None:
    """A black-holed address times out at the connect timeout, reported as such."""
    async def go() -> Probe:
        # A listener with a full accept queue drops further SYNs: the connect hangs until our timeout.
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(("127.0.0.1", port))
                fillers.append(f)
            return await probe("127.0.0.1", port, "x.test", connect_timeout=0.3)
        finally:
            for f in fillers:
                f.close()
            lst.close()

    p = run(go)
    assert isinstance(p, Probe)
    assert p.error == "connect timeout"
    assert 0.3 <= p.elapsed < 2.0  # bounded by connect_timeout (slack for a loaded machine)


@pytest.mark.parametrize("patterns,name,ok", [
    (["www.example.test"], "www.example.test", True),
    (["WWW.Example.test"], "www.example.test", True),
    (["*.example.test"], "www.example.test", True),
    (["*.example.test"], "example.test", False),
    (["*.example.test"], "a.b.example.test", False),
    (["example.test"], "www.example.test", False),
])
def test_name_matching(patterns: list[str], name: str, ok: bool) -> None:
    """Hostname coverage follows RFC 6125: exact, or one leftmost wildcard label."""
    assert matches_name(patterns, name) is ok


def verifier(pki: dict[str, Issued], tmp: Path) -> Verifier:
    (tmp / "trust.pem").write_bytes(pki["root"].cert_pem)
    return Verifier(now=NOW, trust=(tmp / "trust.pem",), system=False)


@pytest.mark.parametrize("case,chain_status,problem_prefixes", [
    ("valid", "ok", []),
    ("expired", "ok", ["expired "]),
    ("future", "ok", ["not yet valid: starts in "]),
    ("wrong-host", "ok", ["name mismatch: www.example.test not in certificate (other.example.test)"]),
    ("self-signed", "self-signed", ["chain self-signed: self-signed by CN=www.example.test and not trusted"]),
    ("missing-intermediate", "incomplete",
     ["chain incomplete: issuer CN=scan test intermediate,O=certmgr lab neither served nor trusted "
      "(missing intermediate?)"]),
    ("untrusted", "untrusted", ["chain untrusted: "]),
])
def test_verdicts(tmp_path: Path, pki: dict[str, Issued], case: str, chain_status: str,
                  problem_prefixes: list[str]) -> None:
    """Each defect is reported on its own: expiry is not a chain failure, a wrong name is not untrusted."""
    inter = pki["inter"]
    name = "www.example.test"
    chain: tuple[bytes, ...]
    if case == "valid":
        chain = (der(make_leaf(inter, [name])), der(inter))
    elif case == "expired":
        # inside the test intermediate's window (it starts a day ago), so only the leaf is expired
        chain = (der(make_leaf(inter, [name], not_before=NOW - 20 * HOUR, not_after=NOW - HOUR)), der(inter))
    elif case == "future":
        chain = (der(make_leaf(inter, [name], not_before=NOW + 2 * DAY, not_after=NOW + 92 * DAY)), der(inter))
    elif case == "wrong-host":
        chain = (der(make_leaf(inter, ["other.example.test"])), der(inter))
    elif case == "self-signed":
        chain = (der(self_signed(name)),)
    elif case == "missing-intermediate":
        chain = (der(make_leaf(inter, [name])),)
    else:
        other_root = make_ca("unknown root")
        other_inter = make_ca("unknown intermediate", issuer=other_root)
        chain = (der(make_leaf(other_inter, [name])), der(other_inter), der(other_root))
    v = verifier(pki, tmp_path).verify(chain, name)
    assert v.chain == chain_status
    assert len(v.problems) == len(problem_prefixes), v.problems
    for got, want in zip(v.problems, problem_prefixes, strict=True):
        assert got.startswith(want), got


def test_verifier_caches_by_der_hash(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """The same chain and name give the same verdict object (parsed and verified once)."""
    v = verifier(pki, tmp_path)
    chain = (der(make_leaf(pki["inter"], ["a.example.test"])), der(pki["inter"]))
    assert v.verify(chain, "a.example.test") is v.verify(tuple(bytes(c) for c in chain), "a.example.test")


def test_system_roots_are_loaded() -> None:
    """Without extra trust, the system bundle is used (Debian's ca-certificates)."""
    v = Verifier(now=NOW)
    assert len(v._roots) > 50


BAD_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n"  # what a later cryptography refuses


def test_a_root_that_does_not_parse_leaves_the_system_bundle_usable(tmp_path: Path) -> None:
    """One certificate of a bundle that does not parse (cryptography says it will refuse non-positive serials, which a
    few historical roots of the system bundle have) is left out of the system roots, never the whole bundle; in a
    trust file the inventory names it is an error that says which certificate."""
    a, b = make_ca("root a"), make_ca("root b")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"# a comment line, as in Debian's bundle\n" + a.cert_pem + BAD_PEM + b.cert_pem)
    got = load_pem_anchors(bundle, skip_bad=True)
    assert [c.subject for c in got] == [x509.load_pem_x509_certificate(p).subject for p in (a.cert_pem, b.cert_pem)]
    with pytest.raises(ValueError, match=r"^certificate 2 does not parse"):
        load_pem_anchors(bundle)
    with pytest.raises(TrustError, match=re.escape(f"load trust {bundle}: certificate 2 does not parse")):
        Verifier(now=NOW, trust=(bundle,), system=False)
    with pytest.raises(TrustError, match=re.escape(f"load trust {bundle}: certificate 2 does not parse")):
        load_roots((bundle,), system=False, outcome="nothing stored")
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    with pytest.raises(TrustError, match="no PEM certificate in file"):
        load_roots((empty,), system=False, outcome="nothing stored")


def info(not_before: dt.datetime, not_after: dt.datetime, sha: str = "aa", serial: str = "1") -> CertInfo:
    return CertInfo(serial=serial, sha256=sha, subject="CN=x", issuer="CN=ca", not_before=not_before,
                    not_after=not_after, names=("x.test",), key_type="ecdsa-p256")


QUARTER = Threshold(fraction=0.25, text="1/4")
TENTH = Threshold(fraction=0.1, text="1/10")


@pytest.mark.parametrize("lifetime_d,left_h,severity", [
    (90, 30 * 24, "ok"),
    (90, 20 * 24, "warning"),      # < 22.5 d
    (90, 8 * 24, "critical"),      # < 9 d
    (6, 48, "ok"),                 # a 6-day cert with 2 days left is on schedule
    (6, 30, "warning"),            # < 36 h
    (6, 12, "critical"),           # < 14.4 h
])
def test_default_thresholds_scale_with_lifetime(lifetime_d: int, left_h: int, severity: str) -> None:
    """The 1/4 and 1/10 defaults make sense for 90-day and 6-day certificates alike."""
    not_after = NOW + dt.timedelta(hours=left_h)
    i = info(not_after - lifetime_d * DAY, not_after)
    assert expiry_problem(i, NOW, warn=QUARTER, critical=TENTH)[0] == severity


def test_absolute_thresholds() -> None:
    """A threshold in days is used as is, whatever the lifetime, and the message says so."""
    not_after = NOW + 5 * DAY
    sev, msg = expiry_problem(info(not_after - 90 * DAY, not_after), NOW,
                              warn=Threshold(seconds=30 * 86400, text="30d"),
                              critical=Threshold(seconds=7 * 86400, text="7d"))
    assert (sev, msg) == ("critical", "expires in 5.0d (critical below 7.0d, 7d)")


class _FixedVerifier:
    def __init__(self, v: object) -> None:
        self.v = v

    def verify(self, chain: object, name: str) -> object:
        return self.v


def ep(host: str, cert: str = "c", name: str = "x.test") -> Endpoint:
    return Endpoint(cert=cert, name=name, host=host, address="127.0.0.1", port=1)


def test_classify_probe_error_is_error_severity() -> None:
    """An unreachable endpoint is severity "error" with the probe's reason as its problem."""
    r = classify(ep("a"), Probe(address="127.0.0.1", port=1, sni="x.test", error="refused"),
                 _FixedVerifier(None), NOW, warn=QUARTER, critical=TENTH)
    assert (r.severity, r.error, r.problems) == ("error", "refused", ("refused",))


def ok_result(host: str, sha: str, serial: str, nb: dt.datetime, cert: str = "c") -> EndpointResult:
    return EndpointResult(endpoint=ep(host, cert), severity="ok", info=info(nb, nb + 90 * DAY, sha, serial),
                          chain="ok")


def test_drift_against_other_pops_flags_the_old_one() -> None:
    """Without a live version, the POP serving a different (older) leaf than the others is drift."""
    rs = [ok_result("a", "new", "2", NOW - DAY), ok_result("b", "old", "1", NOW - 60 * DAY),
          ok_result("c", "new", "2", NOW - DAY)]
    out = apply_drift(rs, {"c": None})
    assert [r.drift for r in out] == [False, True, False]
    assert out[1].severity == "critical"
    assert out[1].problems == ("drift: serves serial 1, not the other hosts (serial 2)",)


def test_drift_tie_goes_to_newest() -> None:
    """With two POPs disagreeing, the one serving the older certificate is the one flagged."""
    out = apply_drift([ok_result("a", "old", "1", NOW - 60 * DAY), ok_result("b", "new", "2", NOW - DAY)],
                      {"c": None})
    assert [r.drift for r in out] == [True, False]


def test_drift_against_live_version() -> None:
    """With a live version in the store, every POP not serving it is drift, even when they all agree."""
    out = apply_drift([ok_result("a", "old", "1", NOW - DAY), ok_result("b", "old", "1", NOW - DAY)],
                      {"c": "live"})
    assert all(r.drift for r in out)
    assert out[0].problems == ("drift: serves serial 1, not the live version (sha256 live…)",)


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_end_to_end_in_process(tmp_path: Path, pki: dict[str, Issued], workers: int) -> None:
    """`scan()` over an inventory (in one process or sharded to forked workers): per-endpoint results,
    urgency order, drift, summary command and exit code."""
    good = make_leaf(pki["inter"], ["a.example.test"], not_before=NOW - DAY, not_after=NOW + 89 * DAY)
    old = make_leaf(pki["inter"], ["a.example.test"], not_before=NOW - 80 * DAY, not_after=NOW + 10 * DAY)
    (tmp_path / "trust.pem").write_bytes(pki["root"].cert_pem)

    async def go() -> scan_mod.ScanResult:
        d1, d2 = tmp_path / "1", tmp_path / "2"
        d1.mkdir()
        d2.mkdir()
        async with tls_server(d1, good, (pki["inter"],)) as p1, tls_server(d2, old, (pki["inter"],)) as p2:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
            s.close()
            inv = inv_mod.loads(inv_text(tmp_path, {"pop1": p1, "pop2": p2, "pop3": dead}))
            seen: list[tuple[int, int]] = []
            return await scan_mod.scan(inv, None, now=NOW, concurrency=4, workers=workers,
                                       timeouts=scan_mod.Timeouts(connect=1, handshake=1),
                                       on_progress=lambda d, t: seen.append((d, t)))

    result = run(go)
    assert isinstance(result, scan_mod.ScanResult)
    assert [(r.endpoint.host, r.severity) for r in result.endpoints] == [
        ("pop3", "error"), ("pop2", "critical"), ("pop1", "ok")]
    assert result.endpoints[1].drift
    assert result.severity == "error" and result.exit_code == 3
    (summary,) = result.certificates
    assert summary.hosts_by_severity == {"error": ("pop3",), "critical": ("pop2",)}
    assert summary.command == "certmgr renew a"
    data = scan_mod.result_json(result)
    assert data["counts"] == {"ok": 1, "warning": 0, "critical": 1, "error": 1}
    assert data["endpoints"][0]["error"] == "refused"


def test_drift_against_the_stores_live_version(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """With a live version in the real Store, a POP still serving the old leaf is drift and the command is deploy."""
    from certmgr.material import CertMaterial
    from certmgr.store import Store

    old = make_leaf(pki["inter"], ["a.example.test"], not_before=NOW - 30 * DAY, not_after=NOW + 60 * DAY)
    new = make_leaf(pki["inter"], ["a.example.test"], not_before=NOW - DAY, not_after=NOW + 89 * DAY)
    (tmp_path / "trust.pem").write_bytes(pki["root"].cert_pem)
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        v = store.add_version("a", CertMaterial(cert=new.cert_pem, chain=pki["inter"].cert_pem, privkey=new.key_pem))
        store.activate("a", v)

    async def go() -> scan_mod.ScanResult:
        d1, d2 = tmp_path / "1", tmp_path / "2"
        d1.mkdir()
        d2.mkdir()
        async with tls_server(d1, new, (pki["inter"],)) as p1, tls_server(d2, old, (pki["inter"],)) as p2:
            inv = inv_mod.loads(inv_text(tmp_path, {"fresh": p1, "stale": p2}))
            return await scan_mod.scan(inv, store, now=NOW, workers=1)

    result = run(go)
    assert isinstance(result, scan_mod.ScanResult)
    stale, fresh = result.endpoints
    assert (stale.endpoint.host, stale.severity, stale.drift) == ("stale", "critical", True)
    assert stale.problems[-1].startswith("drift: serves serial ") and "not the live version" in stale.problems[-1]
    assert (fresh.severity, fresh.drift) == ("ok", False)
    (summary,) = result.certificates
    assert (summary.live_version, summary.command) == (1, "certmgr deploy a")
    scan_mod.save_state(store, result)
    saved = store.load_json("state/scan/a.json")
    assert saved["command"] == "certmgr deploy a" and [e["host"] for e in saved["endpoints"]] == ["stale", "fresh"]
