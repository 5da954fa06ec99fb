"""Scan: live TLS handshakes to a host's address with SNI; reads bad certificates too.

Verification is done separately (with `cryptography`) so that an expired,
self-signed or wrong-host certificate is read and reported, never a crash.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

_CLIENT_CTX: ssl.SSLContext | None = None


def _client_context() -> ssl.SSLContext:
    # A scanner must read bad certificates: verification is off for the handshake
    # and done afterwards against the system roots plus the inventory's trust.
    global _CLIENT_CTX
    if _CLIENT_CTX is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _CLIENT_CTX = ctx
    return _CLIENT_CTX


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
    address: str, port: int, sni: str, *, connect_timeout: float = 5.0, handshake_timeout: float = 5.0
) -> Probe:
    """One TLS handshake to `address:port` with `sni`; every failure becomes `Probe.error`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer = None
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(address, port)
    except TimeoutError:
        return Probe(address=address, port=port, sni=sni, error="connect timeout", elapsed=loop.time() - start)
    except ConnectionRefusedError:
        return Probe(address=address, port=port, sni=sni, error="refused", elapsed=loop.time() - start)
    except OSError as exc:
        return Probe(address=address, port=port, sni=sni, error=f"os: {exc.strerror or exc}",
                     elapsed=loop.time() - start)
    try:
        async with asyncio.timeout(handshake_timeout):
            await writer.start_tls(_client_context(), server_hostname=sni)
        sslobj = writer.get_extra_info("ssl_object")
        # Python 3.11 has the unverified chain only on the private _sslobj (public from 3.13).
        raw = sslobj._sslobj.get_unverified_chain() if hasattr(sslobj, "_sslobj") else None
        if raw:
            chain = tuple(c.public_bytes(ssl._ssl.ENCODING_DER) for c in raw)  # type: ignore[attr-defined]
        else:
            leaf = sslobj.getpeercert(binary_form=True)
            chain = (leaf,) if leaf else ()
        return Probe(address=address, port=port, sni=sni, chain=chain, elapsed=loop.time() - start)
    except TimeoutError:
        return Probe(address=address, port=port, sni=sni, error="handshake timeout", elapsed=loop.time() - start)
    except ssl.SSLError as exc:
        return Probe(address=address, port=port, sni=sni, error=f"tls: {exc.reason or exc}",
                     elapsed=loop.time() - start)
    except (ConnectionError, OSError) as exc:
        return Probe(address=address, port=port, sni=sni, error=f"tls: connection lost ({exc})",
                     elapsed=loop.time() - start)
    finally:
        writer.transport.abort()
