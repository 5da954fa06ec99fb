"""Read a server's certificate chain from its first TLS 1.2 flight, without any cryptography.

In TLS 1.2 the server's Certificate message travels in the clear right after its ServerHello
(RFC 5246 §7.4.2), so a scanner that only wants the chain can send a ClientHello, read up to the
Certificate and hang up: no key exchange, no signature check, a fraction of a full handshake's
CPU on the scanning side. Anything else (an alert, TLS 1.3 only, an older version, anonymous
suites, a malformed record) is `NoPeek`, and the caller does the full handshake instead, so
every error a user sees still comes from OpenSSL.
"""

from __future__ import annotations

import ipaddress
import os
import struct

_HANDSHAKE, _ALERT = 22, 21
_SERVER_HELLO, _CERTIFICATE = 2, 11
_MAX_RECORD = 16384 + 2048  # RFC 5246 §6.2.3: TLSCiphertext.length ≤ 2^14 + 2048
_MAX_FLIGHT = 256 * 1024  # a chain larger than this is not read here (the full handshake still can)

# RFC 5246/8422/5288/7905 suites, ECDSA first (a server with an RSA and an ECDSA certificate serves
# the ECDSA one, as it does for a TLS 1.3 client), then RSA, then plain RSA key exchange.
_SUITES = bytes.fromhex(
    "c02b" "c02c" "cca9" "c023" "c024" "c009" "c00a"  # ECDHE-ECDSA AES-GCM, ChaCha20, AES-CBC
    "c02f" "c030" "cca8" "c027" "c028" "c013" "c014"  # ECDHE-RSA
    "009c" "009d" "003c" "003d" "002f" "0035"  # RSA key exchange GCM, CBC (no DHE: costly for the server)
)
_GROUPS = bytes.fromhex("001d" "0017" "0018" "0019")  # x25519, secp256r1, secp384r1, secp521r1
_SIGALGS = bytes.fromhex("0403" "0503" "0603" "0804" "0805" "0806" "0401" "0501" "0601" "0203" "0201")


class NoPeek(Exception):
    """The first flight was not a plain TLS 1.2 ServerHello + Certificate: do the full handshake."""


def peekable(sni: str) -> bool:
    """Whether `sni` can go in a server_name extension (a DNS name in ASCII, not an IP address)."""
    if not sni or len(sni) > 253 or not sni.isascii():
        return False
    if ":" not in sni and not all(part.isdigit() for part in sni.split(".", 4)):
        return True  # neither IPv6 (has ":") nor a dotted quad: skip ip_address's costly ValueError per name
    try:
        ipaddress.ip_address(sni)
    except ValueError:
        return True
    return False


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def client_hello(sni: str) -> bytes:
    """A TLS 1.2 ClientHello record with `sni` (no supported_versions: the server answers with 1.2)."""
    host = sni.encode("ascii")
    exts = b"".join((
        _ext(0x0000, struct.pack("!HBH", len(host) + 3, 0, len(host)) + host),  # server_name
        _ext(0x000a, struct.pack("!H", len(_GROUPS)) + _GROUPS),  # supported_groups
        _ext(0x000b, b"\x01\x00"),  # ec_point_formats: uncompressed
        _ext(0x000d, struct.pack("!H", len(_SIGALGS)) + _SIGALGS),  # signature_algorithms
        _ext(0x0017, b""),  # extended_master_secret
        _ext(0xff01, b"\x00"),  # renegotiation_info (RFC 5746)
    ))
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + struct.pack("!H", len(_SUITES)) + _SUITES + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    hs = bytes([1]) + len(body).to_bytes(3, "big") + body
    return struct.pack("!BHH", _HANDSHAKE, 0x0301, len(hs)) + hs


class FirstFlight:
    """Feed the server's bytes as they come; `feed` returns the chain once the Certificate is whole."""

    __slots__ = ("hello", "messages", "records")

    def __init__(self) -> None:
        self.records = bytearray()
        self.messages = bytearray()
        self.hello = False

    def feed(self, data: bytes) -> tuple[bytes, ...] | None:
        self.records += data
        while len(self.records) >= 5:
            kind, _version, length = struct.unpack_from("!BHH", self.records)
            if kind != _HANDSHAKE or length == 0 or length > _MAX_RECORD:
                raise NoPeek("alert" if kind == _ALERT else f"record type {kind}")
            if len(self.records) < 5 + length:
                break
            self.messages += self.records[5:5 + length]
            del self.records[:5 + length]
            if len(self.messages) > _MAX_FLIGHT:
                raise NoPeek("first flight too large")
            chain = self._messages()
            if chain is not None:
                return chain
        if len(self.records) > _MAX_FLIGHT:
            raise NoPeek("first flight too large")
        return None

    def _messages(self) -> tuple[bytes, ...] | None:
        while len(self.messages) >= 4:
            kind = self.messages[0]
            length = int.from_bytes(self.messages[1:4], "big")
            if len(self.messages) < 4 + length:
                return None
            body = bytes(self.messages[4:4 + length])
            del self.messages[:4 + length]
            if kind == _SERVER_HELLO and not self.hello:
                if body[:2] != b"\x03\x03":
                    raise NoPeek("not TLS 1.2")
                self.hello = True
            elif kind == _CERTIFICATE and self.hello:
                return _certificates(body)
            else:
                raise NoPeek(f"handshake message {kind}")
        return None


def _certificates(body: bytes) -> tuple[bytes, ...]:
    # RFC 5246 §7.4.2: opaque ASN.1Cert<1..2^24-1>; ASN.1Cert certificate_list<0..2^24-1>
    if len(body) < 3 or int.from_bytes(body[:3], "big") != len(body) - 3:
        raise NoPeek("malformed Certificate")
    out: list[bytes] = []
    i = 3
    while i < len(body):
        if i + 3 > len(body):
            raise NoPeek("malformed Certificate")
        n = int.from_bytes(body[i:i + 3], "big")
        if n == 0 or i + 3 + n > len(body):
            raise NoPeek("malformed Certificate")
        out.append(body[i + 3:i + 3 + n])
        i += 3 + n
    if not out:
        raise NoPeek("empty Certificate")
    return tuple(out)
