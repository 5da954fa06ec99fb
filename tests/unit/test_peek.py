"""Peek: the chain read from a TLS 1.2 first flight is the full handshake's chain; anything else falls back."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from certmgr.deploy.handshake import probe_with
from certmgr.peek import FirstFlight, NoPeek, client_hello, peekable
from certmgr.probe import Probe, probe
from certmgr.remote import Timeouts
from lab.pki import Issued, make_ca, make_leaf

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def chain() -> tuple[Issued, Issued]:
    root = make_ca("peek test root")
    inter = make_ca("peek test intermediate", issuer=root)
    return make_leaf(inter, ["a.example.test"]), inter


def _der(c: Issued) -> bytes:
    return c.cert.public_bytes(serialization.Encoding.DER)


@asynccontextmanager
async def server(handler: Handler, ctx: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on 127.0.0.1:<ephemeral>; yields its port and a list counting accepted connections."""
    conns: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await handler(r, w)
        except (OSError, ssl.SSLError):
            pass
        finally:
            w.close()

    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        conns.append(1)  # called at accept, before any TLS handshake
        reader = asyncio.StreamReader()
        return asyncio.StreamReaderProtocol(reader, handle)

    srv = await loop.create_server(factory, "127.0.0.1", 0, ssl=ctx)
    try:
        yield srv.sockets[0].getsockname()[1], conns
    finally:
        srv.close()


async def _read_one(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.read(1)


def _tls(tmp: Path, leaf: Issued, inter: Issued, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    (tmp / "full.pem").write_bytes(leaf.cert_pem + inter.cert_pem)
    (tmp / "key.pem").write_bytes(leaf.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.load_cert_chain(tmp / "full.pem", tmp / "key.pem")
    return ctx


def _both(port: int, timeout: float = 2.0) -> tuple[Probe, Probe]:
    async def go() -> tuple[Probe, Probe]:
        full = await probe("127.0.0.1", port, "a.example.test", connect_timeout=timeout, handshake_timeout=timeout)
        peeked = await probe("127.0.0.1", port, "a.example.test", connect_timeout=timeout,
                             handshake_timeout=timeout, peek=True)
        return full, peeked
    return asyncio.run(go())


def _run_with(handler: Handler, ctx: ssl.SSLContext | None = None, timeout: float = 2.0
              ) -> tuple[Probe, Probe, int]:
    async def go() -> tuple[Probe, Probe, int]:
        async with server(handler, ctx) as (port, conns):
            full, peeked = await asyncio.to_thread(_both, port, timeout)
            return full, peeked, len(conns)
    return asyncio.run(go())


def test_peek_reads_the_same_chain_in_one_connection(tmp_path: Path, chain: tuple[Issued, Issued]) -> None:
    """Against a TLS 1.2+ server, peeking yields exactly the full handshake's chain, on a single connection."""
    leaf, inter = chain
    full, peeked, conns = _run_with(_read_one, _tls(tmp_path, leaf, inter))
    assert full.ok and peeked.ok and peeked.chain == full.chain == (_der(leaf), _der(inter))
    assert conns == 2  # one for the full handshake, one for the peek: no fallback


def test_a_tls13_only_server_falls_back_to_the_full_handshake(tmp_path: Path, chain: tuple[Issued, Issued]) -> None:
    """A server refusing TLS 1.2 gets a second, full handshake, which reads the chain."""
    leaf, inter = chain
    full, peeked, conns = _run_with(_read_one, _tls(tmp_path, leaf, inter, ssl.TLSVersion.TLSv1_3))
    assert peeked.ok and peeked.chain == full.chain
    assert conns == 3  # full, then peek refused, then the fallback's full handshake


async def _not_tls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.read(1)
    w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    await w.drain()


async def _close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.read(65536)  # the whole ClientHello, then a clean close (unread data would make it a reset)


async def _silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)


@pytest.mark.parametrize(("handler", "error"), [
    (_not_tls, "tls: not TLS (wrong version number)"),
    (_close, "tls: connection closed during handshake"),
    (_silent, "handshake timeout"),
])
def test_peek_reports_the_same_errors_as_the_full_handshake(handler: Handler, error: str) -> None:
    """A server that is not TLS, hangs up or never answers gives the same error with and without peeking."""
    full, peeked, _ = _run_with(handler, timeout=0.3)
    assert full.error == peeked.error == error


def test_a_refused_port_is_refused_either_way() -> None:
    """Connect errors come before any peeking and read the same."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    full, peeked = _both(port)
    assert full.error == peeked.error == "refused"


# ---------------------------------------------------------------- the first-flight parser


def _record(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BHH", kind, 0x0303, len(payload)) + payload


def _msg(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def _cert_msg(*ders: bytes) -> bytes:
    entries = b"".join(len(d).to_bytes(3, "big") + d for d in ders)
    return _msg(11, len(entries).to_bytes(3, "big") + entries)


HELLO = _msg(2, b"\x03\x03" + bytes(32) + b"\x00\xc0\x2b\x00")


def test_first_flight_split_anywhere_gives_the_chain() -> None:
    """Records fed a byte at a time, and a Certificate spread over several records, still give the chain."""
    flight = HELLO + _cert_msg(b"leaf-der", b"inter-der") + _msg(14, b"")
    data = _record(22, flight[:10]) + _record(22, flight[10:30]) + _record(22, flight[30:])
    parser = FirstFlight()
    got = [c for b in range(len(data)) if (c := parser.feed(data[b:b + 1])) is not None]
    assert got == [(b"leaf-der", b"inter-der")]


@pytest.mark.parametrize(("data", "why"), [
    (_record(21, b"\x02\x46"), "alert"),
    (_record(22, _msg(2, b"\x03\x01" + bytes(34))), "not TLS 1.2"),
    (_record(22, HELLO + _msg(14, b"")), "handshake message 14"),
    (_record(22, _cert_msg(b"x")), "handshake message 11"),
    (_record(22, HELLO + _msg(11, b"\x00\x00\x05\x00\x00\x09abc")), "malformed Certificate"),
    (_record(22, HELLO + _msg(11, b"\x00\x00\x00")), "empty Certificate"),
    (struct.pack("!BHH", 22, 0x0303, 20000), "record type 22"),
    (_record(23, b"x"), "record type 23"),
], ids=["alert", "tls1.0", "no-certificate", "certificate-first", "bad-length", "empty", "oversized", "app-data"])
def test_first_flight_that_is_not_plain_tls12_is_no_peek(data: bytes, why: str) -> None:
    """Alerts, other versions, other messages, malformed or oversized input: NoPeek, never a chain."""
    with pytest.raises(NoPeek, match=why):
        FirstFlight().feed(data)


def test_client_hello_is_well_formed() -> None:
    """The ClientHello's record, handshake and extension lengths add up, and it names the SNI."""
    hello = client_hello("a.example.test")
    kind, _, length = struct.unpack_from("!BHH", hello)
    assert kind == 22 and length == len(hello) - 5
    assert hello[5] == 1 and int.from_bytes(hello[6:9], "big") == len(hello) - 9
    assert b"\x00\x00\x0ea.example.test" in hello
    assert (peekable("a.example.test"), peekable("127.0.0.1"), peekable("::1"), peekable(""),
            peekable("bücher.example")) == (True, False, False, False, False)


@pytest.mark.parametrize("sni", ["999.1.1.1", "1.2.3.04", "1.2.3", "1.2.3.4.5", "example.com.", "0x7f.0.0.1",
                                 "1.2.3.4", "::1", "fe80::1%eth0", "::ffff:1.2.3.4", "10.0.0.255"])
def test_peekable_skips_ip_address_only_when_the_name_cannot_be_a_literal(sni: str) -> None:
    """The cheap pre-check gives exactly ipaddress's answer: only a literal it accepts is refused."""
    import ipaddress

    try:
        ipaddress.ip_address(sni)
        literal = True
    except ValueError:
        literal = False
    assert peekable(sni) is (not literal)


def test_deploys_prober_reads_the_certificate_served_for_each_name_in_one_connection(tmp_path: Path) -> None:
    """deploy's verify prober peeks: per SNI the certificate that name is served with, one connection per handshake."""
    ca = make_ca("verify peek CA")
    leaves = {n: make_leaf(ca, [n]) for n in ("a.example.test", "b.example.test")}
    ctxs = {}
    for n, leaf in leaves.items():
        (tmp_path / n).mkdir()
        ctxs[n] = _tls(tmp_path / n, leaf, ca)

    def pick(obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        obj.context = ctxs[name or "a.example.test"]

    front = _tls(tmp_path, leaves["a.example.test"], ca)
    front.sni_callback = pick  # type: ignore[assignment]

    async def go() -> tuple[dict[str, Probe], int]:
        async with server(_read_one, front) as (port, conns):
            p = probe_with(Timeouts())
            seen = {n: await p("127.0.0.1", port, n) for n in reversed(list(leaves))}
            return seen, len(conns)

    seen, conns = asyncio.run(go())
    assert {n: s.chain for n, s in seen.items()} == {n: (_der(leaf), _der(ca)) for n, leaf in leaves.items()}
    assert conns == 2  # a peek each: a full handshake would need no more, but a failed peek would add one


def test_deploys_prober_falls_back_on_a_tls13_only_pop(tmp_path: Path, chain: tuple[Issued, Issued]) -> None:
    """A TLS 1.3-only POP still verifies through deploy's prober, at one more connection per handshake."""
    leaf, inter = chain

    async def go() -> tuple[Probe, int]:
        async with server(_read_one, _tls(tmp_path, leaf, inter, ssl.TLSVersion.TLSv1_3)) as (port, conns):
            return await probe_with(Timeouts())("127.0.0.1", port, "a.example.test"), len(conns)

    seen, conns = asyncio.run(go())
    assert seen.ok and seen.chain == (_der(leaf), _der(inter))
    assert conns == 2  # the failed peek, then the full handshake
