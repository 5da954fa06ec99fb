"""One TLS handshake to an address with SNI, returning the chain as served (read, never verified).

Split from `certmgr.scan`, which drives thousands of these; `certmgr.deploy` and `doctor` use it too.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from certmgr import peek as peek_mod
from certmgr import sanitize

_CLIENT_CTX: ssl.SSLContext | None = None
_ENCODING_DER = 2  # _ssl.ENCODING_DER


def _client_context() -> ssl.SSLContext:
    # A scanner must read bad certificates: verification is off for the handshake
    # and done afterwards against the system roots plus the inventory's trust.
    # One context for the whole scan: building one per handshake costs more than the handshake.
    global _CLIENT_CTX
    if _CLIENT_CTX is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Debian's SECLEVEL=2 would refuse to *read* weak servers; a scanner reports them instead.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        _CLIENT_CTX = ctx
    return _CLIENT_CTX


# ---------------------------------------------------------------- one handshake


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """What one handshake saw: the DER chain as served, or why there is none."""

    address: str
    port: int
    sni: str
    chain: tuple[bytes, ...] = ()  # leaf first, as sent by the server
    error: str | None = None  # "refused", "connect timeout", "handshake timeout", "tls: …", "dns: …", "os: …"
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chain)


async def probe(
    address: str, port: int, sni: str, *, connect_timeout: float = 5.0, handshake_timeout: float = 5.0,
    peek: bool = False,
) -> Probe:
    """One TLS handshake to `address:port` with `sni`; every failure becomes `Probe.error`.

    Connect and handshake are bounded separately. The handshake is an `ssl.SSLObject` over
    memory BIOs driven by a bare asyncio.Protocol on a plain TCP transport: no SSL transport, no
    stream objects; that is what makes thousands of handshakes per second possible from one loop.

    With `peek`, the chain is first read from a TLS 1.2 first flight without cryptography
    (`certmgr.peek`); whenever that does not simply work, a fresh connection does the full
    handshake, so errors are the same either way.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()

    def result(chain: tuple[bytes, ...] = (), error: str | None = None) -> Probe:
        # The TLS stack's and resolver's words can quote the peer: inert from here on.
        return Probe(address=address, port=port, sni=sni, chain=chain,
                     error=None if error is None else sanitize.line(error), elapsed=loop.time() - start)

    try:
        family, sockaddr = await _resolve(loop, address, port, connect_timeout)
    except _DNSFailure as exc:
        return result(error=f"dns: {exc}")
    if peek and peek_mod.peekable(sni):
        sock_or_error = await _connect(loop, family, sockaddr, connect_timeout)
        if isinstance(sock_or_error, str):
            return result(error=sock_or_error)
        try:
            async with asyncio.timeout(handshake_timeout):
                return result(chain=await _peek(loop, sock_or_error, sni))
        except TimeoutError:
            return result(error="handshake timeout")
        except (peek_mod.NoPeek, OSError):
            pass  # the full handshake below, on a new connection, says what is wrong (if anything)
        finally:
            sock_or_error.close()
    sock_or_error = await _connect(loop, family, sockaddr, connect_timeout)
    if isinstance(sock_or_error, str):
        return result(error=sock_or_error)
    sock = sock_or_error
    try:
        transport: asyncio.Transport | None = None
        try:
            done: asyncio.Future[tuple[bytes, ...]] = loop.create_future()
            async with asyncio.timeout(handshake_timeout):
                transport, _ = await loop.create_connection(lambda: _Handshake(sni, done), sock=sock)
                chain = await done
        except TimeoutError:
            return result(error="handshake timeout")
        except ssl.SSLError as exc:
            return result(error=f"tls: {_ssl_reason(exc)}")
        except (ConnectionError, OSError) as exc:
            return result(error=f"tls: connection lost ({exc.strerror or type(exc).__name__})")
        except _EOF:
            return result(error="tls: connection closed during handshake")
        finally:
            if not done.done():
                done.cancel()  # nobody will read it: no "exception never retrieved" after the abort below
            if transport is not None:
                transport.abort()
        if not chain:
            return result(error="tls: no certificate sent")
        return result(chain=chain)
    finally:
        sock.close()


async def _connect(loop: asyncio.AbstractEventLoop, family: socket.AddressFamily, sockaddr: tuple[Any, ...],
                   timeout: float) -> socket.socket | str:
    """A connected non-blocking socket, or the error to report."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, sockaddr)
    except TimeoutError:
        sock.close()
        return "connect timeout"
    except ConnectionRefusedError:
        sock.close()
        return "refused"
    except OSError as exc:
        sock.close()
        return f"os: {exc.strerror or exc}"
    except BaseException:
        sock.close()
        raise
    return sock


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, sni: str) -> tuple[bytes, ...]:
    await loop.sock_sendall(sock, peek_mod.client_hello(sni))
    flight = peek_mod.FirstFlight()
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise peek_mod.NoPeek("closed")
        chain = flight.feed(data)
        if chain is not None:
            return chain


class _EOF(Exception):
    pass


class _DNSFailure(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def _ip_version(address: str) -> int | None:
    """4 or 6 for an IP literal, None for a name; cached: a scan asks once per endpoint, for a few POP addresses."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


async def _resolve(loop: asyncio.AbstractEventLoop, address: str, port: int,
                   timeout: float) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    version = _ip_version(address)
    if version is not None:
        return (socket.AF_INET6, (address, port, 0, 0)) if version == 6 else (socket.AF_INET, (address, port))
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise _DNSFailure(f"{address}: timeout") from None
    except socket.gaierror as exc:
        raise _DNSFailure(f"{address}: {exc.strerror}") from None
    if not infos:
        raise _DNSFailure(f"{address}: no address")
    return infos[0][0], infos[0][4]


class _Handshake(asyncio.Protocol):
    """Drives one client handshake from data callbacks; resolves `done` with the served chain."""

    __slots__ = ("done", "incoming", "obj", "outgoing", "transport")

    def __init__(self, sni: str, done: asyncio.Future[tuple[bytes, ...]]) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = _client_context().wrap_bio(self.incoming, self.outgoing, server_hostname=sni)
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def eof_received(self) -> None:
        self._fail(_EOF())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or _EOF())

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def _step(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            data = self.outgoing.read()
            if data and self.transport is not None:
                self.transport.write(data)
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        # Our Finished is not sent: the server's certificate is already read, and a server that
        # never sees the Finished skips minting session tickets (half its remaining work). nginx
        # logs the early close at "info" level only.
        if not self.done.done():
            self.done.set_result(_served_chain(self.obj))


def _served_chain(obj: ssl.SSLObject) -> tuple[bytes, ...]:
    # Python 3.11 exposes the unverified chain only on the private object (public from 3.13).
    raw = obj._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    if raw:
        return tuple(c.public_bytes(_ENCODING_DER) for c in raw)
    leaf = obj.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    # OpenSSL names a received alert SSLV3_ALERT_*, TLSV1_ALERT_*, TLSV13_ALERT_* or TLSV1_* (e.g. unrecognized name)
    for prefix in ("SSLV3_ALERT_", "TLSV13_ALERT_", "TLSV1_ALERT_", "TLSV1_"):
        if reason.startswith(prefix):
            return "alert " + reason.removeprefix(prefix).lower().replace("_", " ")
    if reason == "WRONG_VERSION_NUMBER":
        return "not TLS (wrong version number)"
    return reason.lower().replace("_", " ") if reason else str(exc)


__all__ = ["Probe", "probe"]
