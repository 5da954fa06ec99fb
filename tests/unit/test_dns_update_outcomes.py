"""RFC2136Provider against a scripted loopback DNS server: per-zone outcomes and the Knot NOTAUTH + BADKEY answer.

bind never answers BADKEY for a key it knows; Knot does when its ACL denies the update (LAB-NOTES), so
that answer is replayed here byte for byte the way Knot sends it: rcode NOTAUTH, TSIG error BADKEY.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.tsig
import dns.update
import pytest

from certmgr import inventory
from certmgr.dns import TXTRecord
from certmgr.dns import rfc2136 as rfc2136_mod
from certmgr.dns.rfc2136 import RFC2136Provider, parse_tsig_secret

SECRET = base64.b64encode(os.urandom(32)).decode()
KEY = dns.tsig.Key("certmgr-lab.", SECRET, dns.tsig.HMAC_SHA256)

# how the server answers an UPDATE for each zone: (rcode, TSIG error), or None to never answer
Script = dict[str, tuple[int, int] | None]


@asynccontextmanager
async def server(script: Script) -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP DNS server on 127.0.0.1 answering UPDATEs as `script` says; yields (port, zones asked in order)."""
    asked: list[str] = []
    stalled: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        msg = dns.message.from_wire(await reader.readexactly(size), keyring={KEY.name: KEY})
        zone = str(msg.question[0].name).rstrip(".")
        asked.append(zone)
        answer = script[zone]
        if answer is None:
            stalled.append(writer)
            return
        rcode, tsig_error = answer
        resp = dns.message.make_response(msg)
        resp.set_rcode(rcode)
        if tsig_error:
            resp.use_tsig(KEY, tsig_error=tsig_error, original_id=msg.id)
        wire = resp.to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], asked
    finally:
        for w in stalled:
            w.close()
        srv.close()


def provider(tmp_path: Path, port: int, zones: list[str]) -> RFC2136Provider:
    key = tmp_path / "k.key"
    key.write_text(f'key "certmgr-lab" {{ algorithm hmac-sha256; secret "{SECRET}"; }};\n')
    inv = inventory.loads(f"""
[ca.x]
directory = "https://127.0.0.1:1/dir"
[dns.lab]
type = "rfc2136"
zones = {zones!r}
server = "127.0.0.1"
port = {port}
tsig_key = "certmgr-lab"
tsig_algorithm = "hmac-sha256"
tsig_secret_file = "{key}"
[[certificates]]
name = "x"
domains = ["x.{zones[0]}"]
ca = "x"
dns = "lab"
""".replace("'", '"'))
    cfg = inv.dns["lab"]
    return RFC2136Provider(cfg, parse_tsig_secret(key.read_text(), key_name="certmgr-lab", algorithm="hmac-sha256",
                                                  where=str(key)))


def rec(name: str, zone: str, value: str = "v") -> TXTRecord:
    return TXTRecord(fqdn=f"_acme-challenge.{name}", zone=zone, value=value, domain=name)


def test_knot_acl_denial_notauth_badkey_names_both_causes(tmp_path: Path) -> None:
    """NOTAUTH with TSIG error BADKEY (Knot's answer to an update its ACL denies) says: unknown key, or policy/ACL."""
    async def go() -> None:
        async with server({"hachyderm.test": (dns.rcode.NOTAUTH, dns.rcode.BADKEY)}) as (port, _):
            prov = provider(tmp_path, port, ["hachyderm.test"])
            [u] = await prov.present([rec("www.hachyderm.test", "hachyderm.test")])
            assert u.applied is False and u.error is not None
            assert u.error.message == (
                f"dns update hachyderm.test @127.0.0.1:{port}: BADKEY for TSIG key 'certmgr-lab': the server does "
                "not know this key, or its update policy/ACL denies it (TXT not written)")
            assert u.error.hint == (
                "check tsig_key 'certmgr-lab' against the key names in the server's config; if it is there, the "
                "server's update policy/ACL (bind update-policy, Knot acl) must allow this key to update TXT on "
                "_acme-challenge.www.hachyderm.test")
            assert u.error.retryable is False
    asyncio.run(go())


def test_each_zone_update_runs_to_its_end_and_reports_its_own_outcome(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Three zones in one batch — accepted, refused, silent — give applied True, False and None, none cut short."""
    monkeypatch.setattr(rfc2136_mod, "UPDATE_TIMEOUT", 0.3)
    script: Script = {"a.test": (dns.rcode.NOERROR, 0), "b.test": (dns.rcode.REFUSED, 0), "c.test": None}

    async def go() -> None:
        async with server(script) as (port, asked):
            prov = provider(tmp_path, port, ["a.test", "b.test", "c.test"])
            changes: list[tuple[str, str]] = []
            prov.on_change = lambda action, zone, recs: changes.append((action, zone))
            recs = [rec("www.a.test", "a.test"), rec("www.b.test", "b.test"), rec("www.c.test", "c.test")]
            present = {u.zone: u for u in await prov.present(recs)}
            assert {z: u.applied for z, u in present.items()} == {"a.test": True, "b.test": False, "c.test": None}
            assert present["a.test"].error is None
            assert str(present["b.test"].error) == (f"dns update b.test @127.0.0.1:{port}: REFUSED for "
                                                    "_acme-challenge.www.b.test (TXT not written)")
            assert str(present["c.test"].error) == (f"dns update c.test @127.0.0.1:{port}: no answer within 0.3s "
                                                    "(TXT not written)")
            assert sorted(asked) == ["a.test", "b.test", "c.test"]
            assert changes == [("dns published", "a.test")]
            gone = {u.zone: u.applied for u in await prov.cleanup(recs)}
            assert gone == {"a.test": True, "b.test": False, "c.test": None}
    asyncio.run(go())


def test_nothing_listening_is_not_applied(tmp_path: Path) -> None:
    """A refused connection means nothing reached the server: applied False, with the 'is it running' hint."""
    async def go() -> None:
        async with server({}) as (port, _):
            pass  # closed again: nothing listens on `port` now
        prov = provider(tmp_path, port, ["hachyderm.test"])
        [u] = await prov.cleanup([rec("www.hachyderm.test", "hachyderm.test")])
        assert u.applied is False and u.error is not None
        assert u.error.message == (f"dns update hachyderm.test @127.0.0.1:{port}: connection refused "
                                   "(TXT may be left behind)")
    asyncio.run(go())
