"""Foreign text: one inert line on the terminal, the same text in JSON, and each chat's markup neutralized."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from certmgr import log, report, sanitize
from certmgr.deploy import _quote_text
from certmgr.doctor import _one_line
from certmgr.inventory import Channel, SecretRef, Threshold
from certmgr.issue import shown
from certmgr.material import CertInfo
from certmgr.notify import Message, message_for, payload
from certmgr.scan import CertSummary, Endpoint, Probe, ScanResult, classify, result_json
from certmgr.verify import Verifier
from lab.pki import make_ca
from tests.helpers import PEBBLE_LAB_HEAD

NOW = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)
NAME = "media.hachyderm.test"
# A subject that clears the screen, forges an "ok" line, reverses the text after it, and carries
# every chat's markup: what a hostile (or broken) POP can put in the certificate it serves.
CN = f"x\x1b[2J\n{NAME}  ok  served by every POP\r\u202egnp.exe"
ORG = "@everyone <b>bold</b> **pwn** __u__ ~~s~~ `c` <@123456789012345678> <!channel> @here @room [x](http://e.test)"
SAN = f"{NAME}\x1b]0;owned\x07"
CONTROLS = "\x00\x07\x08\t\n\x0b\x0c\r\x1b\x7f\x85\x9b"
INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2060\ufeff\u2028\u2029"


def raw_controls(text: str) -> list[str]:
    """Characters in `text` a terminal would act on or a reader would not see."""
    return [c for c in text if not c.isprintable() and c != "\n"]


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(("text", "shown_as"), [
    ("plain ascii, kept", "plain ascii, kept"),
    ("müde ⚠️ 🔴 中文", "müde ⚠️ 🔴 中文"),
    ("\x1b[2J", "\\x1b[2J"),
    ("a\nb\r\nc\td", "a\\nb\\r\\nc\\td"),
    ("del\x7f nel\x85 csi\x9b", "del\\x7f nel\\x85 csi\\x9b"),
    ("bidi \u202eexe.txt", "bidi \\u202eexe.txt"),
    ("zw\u200bsp\u200d\ufeff", "zw\\u200bsp\\u200d\\ufeff"),
    ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ("nbsp\xa0", "nbsp\\xa0"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("already \\x1b escaped", "already \\x1b escaped"),
    ("", ""),
])
def test_line_shows_every_unprintable_character_as_its_escape(text: str, shown_as: str) -> None:
    """Controls, bidi overrides, zero-width and separator characters become escapes; printable text is unchanged."""
    assert sanitize.line(text) == shown_as


def test_line_escapes_the_whole_c0_c1_and_invisible_sets() -> None:
    """No character of C0, DEL, C1, or the bidi/zero-width/separator set survives raw."""
    every = "".join(map(chr, range(0x20))) + "".join(map(chr, range(0x7F, 0xA0))) + INVISIBLE
    out = sanitize.line(every, limit=None)
    assert out.isprintable()
    assert out.count("\\") == len(every)


@pytest.mark.parametrize(("text", "limit", "out"), [
    ("a" * 600, sanitize.LIMIT, "a" * 511 + "…"),
    ("abcdef", 4, "abc…"),
    ("abcd", 4, "abcd"),
    ("\x1b" * 5, 10, "\\x1b\\x1b…"),  # never half an escape
    ("ab\x1b", 5, "ab…"),
    ("a" * 2000, None, "a" * 2000),
])
def test_line_is_bounded_with_an_ellipsis(text: str, limit: int | None, out: str) -> None:
    """Long text is cut to `limit` characters, the last an ellipsis, and an escape is never cut in half."""
    assert sanitize.line(text, limit=limit) == out
    assert limit is None or len(sanitize.line(text, limit=limit)) <= limit


@pytest.mark.parametrize("text", [CN, ORG, SAN, CONTROLS, INVISIBLE, "a\\nb", "x" * 700, "\x1b" * 300])
def test_line_is_idempotent(text: str) -> None:
    """Sanitizing sanitized text changes nothing, so a second pass (chat, status) cannot double-escape."""
    once = sanitize.line(text)
    assert sanitize.line(once) == once


def test_flat_joins_command_output_into_one_inert_line() -> None:
    """Multi-line POP output (nginx -t) is one line: whitespace runs become a space, ESC is escaped."""
    out = "nginx: [emerg] cannot load \x1b[2J\"/x\"\nnginx: configuration file /etc/nginx.conf test failed\n"
    assert sanitize.flat(out) == ('nginx: [emerg] cannot load \\x1b[2J"/x" nginx: configuration file '
                                  "/etc/nginx.conf test failed")
    assert _quote_text(out) == ('"nginx: [emerg] cannot load \\x1b[2J\'/x\' nginx: configuration file '
                                '/etc/nginx.conf test failed"')
    assert _one_line(out, 30) == "nginx: [emerg] cannot load …"  # the escape is not cut in half
    assert sanitize.quoted('a"b\x1b') == '"a\'b\\x1b"'


def test_ca_text_uses_the_one_rule() -> None:
    """The CA's error detail is escaped by the same rule (and bounded more generously)."""
    detail = "refused\nrenewed ok\x1b[2J \u202e"
    assert shown(detail) == sanitize.line(detail) == "refused\\nrenewed ok\\x1b[2J \\u202e"
    assert shown(None) is None
    assert shown("d" * 2000) == "d" * 999 + "…"


def test_log_lines_escape_every_control_character() -> None:
    """A foreign value in a log event stays on one line and cannot drive the terminal."""
    record = logging.LogRecord("certmgr.test", logging.WARNING, __file__, 1, "peer said", None, None)
    record.kv = {"reason": CN, "name": "x\x1b[2J\u202e"}
    [line] = log.KVFormatter(timestamps=False).format(record).splitlines()
    assert not raw_controls(line)
    assert line.endswith(' name="x\\x1b[2J\\u202e"')  # quoted although it holds no blank
    assert 'reason="x\\x1b[2J\\nmedia.hachyderm.test  ok  served by every POP\\r\\u202egnp.exe"' in line


# ---------------------------------------------------------------- a served certificate


def hostile_leaf() -> bytes:
    """A self-signed leaf whose subject (so also issuer) and SANs hold terminal escapes and chat markup."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, CN)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=60))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME), x509.DNSName(SAN)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def hostile_scan() -> ScanResult:
    ep = Endpoint(cert=NAME, name=NAME, host="sally", address="127.0.1.4", port=443)
    probe = Probe(address=ep.address, port=ep.port, sni=ep.sni, chain=(hostile_leaf(),))
    verifier = Verifier(now=NOW, system=False, extra_roots=[make_ca("some other root").cert])
    r = classify(ep, probe, verifier, NOW, warn=Threshold(fraction=1 / 3),
                 critical=Threshold(fraction=1 / 10))
    summary = CertSummary(name=NAME, severity=r.severity, endpoints=1, hosts_by_severity={r.severity: ("sally",)},
                          days_left=r.days_left(NOW), command=f"certmgr renew {NAME}")
    return ScanResult(started=NOW, elapsed=0.1, endpoints=(r,), certificates=(summary,), severity=r.severity)


def test_served_certificate_fields_are_inert_where_they_enter() -> None:
    """Subject, issuer and SANs of a served certificate are escaped as they are read (CertInfo)."""
    info = CertInfo.from_der(hostile_leaf())
    for field in (info.subject, info.issuer, *info.names):
        assert field.isprintable(), field
    assert info.subject == info.issuer == sanitize.line(x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, CN)]
    ).rfc4514_string())
    assert "CN=x\\x1b[2J\\nmedia.hachyderm.test  ok  served by every POP\\r\\u202egnp.exe" in info.subject
    assert info.names == (NAME, "media.hachyderm.test\\x1b]0;owned\\x07")


def test_scan_table_is_one_line_per_endpoint_with_no_escape_sequence() -> None:
    """The terminal table shows the hostile subject escaped: no ESC, no CR, no forged `ok` line."""
    result = hostile_scan()
    [r] = result.endpoints
    assert r.severity == "critical"
    assert any(p.startswith("chain self-signed: self-signed by CN=x\\x1b[2J\\nmedia") for p in r.problems)
    for colour in (False, True):
        text = report.table(result, colour=colour)
        assert "\r" not in text and "\u202e" not in text and "\x07" not in text
        assert text.count("\x1b") == (2 * len(result.endpoints) if colour else 0)  # only our own colour codes
        lines = text.splitlines()
        assert len(lines) == 1 + len(result.endpoints) + 3  # header, endpoints, blank, summary, one command
        assert not [line for line in lines if line.lstrip().startswith(NAME)]
        assert "x\\x1b[2J\\nmedia.hachyderm.test  ok  served by every POP\\r\\u202egnp.exe" in lines[1]


def test_scan_json_carries_the_same_inert_text() -> None:
    """`--json` holds the escaped form the table shows; the printed JSON has no raw control character."""
    result = hostile_scan()
    data = result_json(result)
    [ep] = data["endpoints"]
    info = result.endpoints[0].info
    assert info is not None
    assert (ep["subject"], ep["issuer"], ep["names"]) == (info.subject, info.issuer, list(info.names))
    assert ep["subject"].isprintable() and "CN=x\\x1b[2J\\nmedia.hachyderm.test  ok" in ep["subject"]
    assert all(p.isprintable() for p in ep["problems"])
    printed = json.dumps(data, indent=2)  # what cli.emit_json prints
    assert not raw_controls(printed)
    assert json.loads(printed)["endpoints"][0]["subject"] == info.subject


# ---------------------------------------------------------------- chat


def chan(kind: str) -> Channel:
    if kind == "matrix":
        return Channel(name=kind, type=kind, homeserver="http://127.0.0.1:9", room="!r:example.test",
                       token=SecretRef("env", "T", "t"))
    return Channel(name=kind, type=kind, url=SecretRef("env", "U", "u"))


def hostile_message() -> Message:
    result = hostile_scan()
    return message_for(result.certificates[0], result.endpoints, "problem")


def body_for(kind: str, message: Message | None = None) -> dict[str, object]:
    _, _, _, body = payload(chan(kind), message or hostile_message(), "http://127.0.0.1:9/hook", "token")
    assert not raw_controls(json.dumps(body, ensure_ascii=False).replace("\u200b", ""))
    return body


def test_message_text_is_inert_even_from_unsanitized_lines() -> None:
    """A message line that was never sanitized still cannot forge a chat line or carry ESC."""
    msg = Message(kind="failure", severity="error", title="FAILED\nrenewed ok", lines=(CN,), command="x\ny")
    assert msg.text.splitlines() == ["❌ FAILED\\nrenewed ok", sanitize.line(CN), "Run: x\\ny"]


@pytest.mark.parametrize(("text", "out"), [
    ("@everyone and @here", "@\u200beveryone and @\u200bhere"),
    ("<@123456789012345678> <@&42> <#7>", r"\<@" "\u200b" r"123456789012345678\> \<@" "\u200b" r"&42\> \<\#7\>"),
    ("**bold** __u__ ~~s~~ `c` ||spoiler||", "\\*\\*bold\\*\\* \\_\\_u\\_\\_ \\~\\~s\\~\\~ \\`c\\` \\|\\|spoiler\\|\\|"),
    ("[x](http://e.test) > q # h", "\\[x\\](http://e.test) \\> q \\# h"),
    ("<b>bold</b>", r"\<b\>bold\</b\>"),
    ("a\\x1b b", "a\\\\x1b b"),
    ("certmgr renew media.hachyderm.test", "certmgr renew media.hachyderm.test"),
])
def test_discord_markup_is_shown_literally(text: str, out: str) -> None:
    """Discord: markdown is backslash-escaped and a zero-width space after `@` stops every mention."""
    assert sanitize.discord(text) == out


@pytest.mark.parametrize(("text", "out"), [
    ("<!channel> <!here> <@U123>", "&lt;!channel&gt; &lt;!here&gt; &lt;@\u200bU123&gt;"),
    ("<b>bold</b> & <http://e.test|click>", "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;http://e.test|click&gt;"),
    ("*bold* _it_ ~s~ `c`", "\u200b*\u200bbold\u200b*\u200b \u200b_\u200bit\u200b_\u200b \u200b~\u200bs\u200b~\u200b "
                            "\u200b`\u200bc\u200b`\u200b"),
    ("**pwn**", "\u200b*\u200b\u200b*\u200bpwn\u200b*\u200b\u200b*\u200b"),
    ("@channel @everyone", "@\u200bchannel @\u200beveryone"),
    ("certmgr renew my_cert.example", "certmgr renew my_cert.example"),  # inside a word: no formatting, kept
])
def test_slack_markup_is_neutralized(text: str, out: str) -> None:
    """Slack: `&<>` as entities (Slack's rule), formatting marks at a word boundary fenced by zero-width spaces."""
    assert sanitize.slack(text) == out


def test_matrix_body_and_html_are_neutralized() -> None:
    """Matrix: `@room` defused in body and formatted_body, and the HTML body escapes `<b>`."""
    text = "<b>bold</b> @room\n**x** & @alice:example.test"
    assert sanitize.matrix_body(text) == "<b>bold</b> @\u200broom\n**x** & @\u200balice:example.test"
    assert sanitize.matrix_html(text) == ("&lt;b&gt;bold&lt;/b&gt; @\u200broom<br>**x** &amp; "
                                          "@\u200balice:example.test")


def test_discord_payload_from_a_hostile_certificate() -> None:
    """The Discord payload escapes markdown, defuses mentions, pings nobody and keeps one line per fact."""
    body = body_for("discord")
    content = str(body["content"])
    assert body["allowed_mentions"] == {"parse": []}
    assert "@everyone" not in content and "@here" not in content and "<@123" not in content
    assert "**" not in content.replace("\\*\\*", "") and "\\*\\*pwn\\*\\*" in content
    assert r"\\\<b\\\>bold" in content  # RFC 4514's own `\<`, its backslash and `<` each escaped
    assert len(content.splitlines()) == len(hostile_message().text.splitlines())
    assert not [line for line in content.splitlines() if line.startswith(NAME)]


def test_slack_payload_from_a_hostile_certificate() -> None:
    """The Slack payload has no raw `<`, `>` or unfenced `*`, and no `<!channel>`."""
    body = body_for("slack")
    block = body["blocks"][0]["text"]  # type: ignore[index]
    text = block["text"]
    assert block["type"] == "mrkdwn"
    assert "<" not in text and ">" not in text and r"&lt;!channel\&gt;" in text
    assert "**" not in text and "\u200b*\u200b\u200b*\u200bpwn" in text
    assert "@everyone" not in text


def test_matrix_payload_from_a_hostile_certificate() -> None:
    """The Matrix payload has no `@room`, an HTML-escaped formatted_body and an empty m.mentions."""
    body = body_for("matrix")
    assert body["m.mentions"] == {}
    for key in ("body", "formatted_body"):
        assert "@room" not in str(body[key]) and "@everyone" not in str(body[key])
    html_body = str(body["formatted_body"])
    assert "<b>" not in html_body and "\\&lt;b\\&gt;bold" in html_body  # RFC 4514's `\<`, then HTML-escaped
    assert "<" not in html_body.replace("<br>", "")
    assert html_body.count("<br>") == len(hostile_message().text.splitlines()) - 1


def test_plain_webhook_payload_carries_the_inert_text() -> None:
    """The generic webhook keeps the text as data: every line inert (escaped), no markup changes."""
    body = body_for("webhook")
    lines = body["lines"]
    assert isinstance(lines, list)
    assert all(isinstance(line, str) and line.isprintable() for line in lines)
    assert any("O=@everyone \\<b\\>bold\\</b\\> **pwn**" in line for line in lines)
    assert str(body["text"]).splitlines()[1:] == [*lines, f"Run: certmgr renew {NAME}"]


def test_certbot_import_shows_a_hostile_lineage_name_inert(tmp_path: Path) -> None:
    """A certbot lineage directory named with ESC and a newline is refused and reported escaped."""
    from certmgr.store import Store

    src = tmp_path / "letsencrypt"
    (src / "live" / "evil\x1b[2J\nok").mkdir(parents=True)
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        [r] = store.import_certbot(src)
    assert r.name == "evil\\x1b[2J\\nok"
    assert r.problem is not None and not raw_controls(r.problem) and "\n" not in r.problem


# ---------------------------------------------------------------- DNS and SSH peers


def test_dns_server_error_text_is_inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception text from the DNS exchange (query and UPDATE) reaches the error escaped, on one line."""
    import asyncio

    import dns.asyncquery
    import dns.exception

    from certmgr.dns import TXTRecord, first_error
    from certmgr.dns.rfc2136 import RFC2136Config, RFC2136Provider
    from certmgr.errors import DNSError
    from certmgr.inventory import DNSProvider

    async def hostile(*args: object, **kwargs: object) -> object:
        raise dns.exception.DNSException("bad answer\x1b[2J\nrenewed ok")

    monkeypatch.setattr(dns.asyncquery, "udp_with_fallback", hostile)
    monkeypatch.setattr(dns.asyncquery, "tcp", hostile)
    key = tmp_path / "tsig.key"
    key.write_text('key "certmgr-lab" { algorithm hmac-sha256; secret "c2VjcmV0LXNlY3JldC1zZWNyZXQtMzI=" ; };\n')
    prov = RFC2136Provider.build(DNSProvider(name="lab", type="rfc2136", zones=("hachyderm.test",), config=RFC2136Config(
        tsig_key="certmgr-lab", server="127.0.0.1", port=53,
        tsig_secret=SecretRef("file", str(key), "dns.lab.tsig_secret_file"))))
    with pytest.raises(DNSError) as query:
        asyncio.run(prov.cname_target(f"_acme-challenge.{NAME}", "hachyderm.test"))
    rec = TXTRecord(domain=NAME, fqdn=f"_acme-challenge.{NAME}", zone="hachyderm.test", value="v" * 43)
    # present() reports each zone's UPDATE as a result (ZoneUpdate) instead of raising.
    update = first_error(asyncio.run(prov.present([rec])))
    assert update is not None
    for exc in (query.value, update):
        assert "bad answer\\x1b[2J\\nrenewed ok" in exc.message, exc.message
        assert exc.message.isprintable()


def test_ssh_peer_reasons_are_inert() -> None:
    """An SSH server's disconnect or SFTP reason is shown escaped in results and errors."""
    import asyncssh

    from certmgr.remote import describe_exc

    exc = asyncssh.DisconnectError(asyncssh.DISC_BY_APPLICATION, "bye\x1b[2J\nrenewed ok")
    assert describe_exc(exc) == "DisconnectError: bye\\x1b[2J\\nrenewed ok"


def test_status_shows_saved_scan_text_inert(tmp_path: Path) -> None:
    """Scan text saved by an older certmgr (raw ESC, newline) is shown escaped by `status`."""
    from certmgr import inventory, status
    from certmgr.store import Store

    inv = inventory.loads(f"""
{PEBBLE_LAB_HEAD}
[hosts.sally]
address = "127.0.1.4"

[[certificates]]
name = "{NAME}"
domains = ["{NAME}"]
dns = "lab"
hosts = ["sally"]
""")
    store = Store.open(tmp_path / "state")
    store.save_json(f"state/scan/{NAME}.json", {"scanned_at": NOW.isoformat(), "endpoints": [
        {"host": "sally", "severity": "critical", "problems": [f"chain self-signed: self-signed by CN={CN}"],
         "error": None}]})
    [view] = status.gather(inv, store, now=NOW)
    [pop] = view.pops
    assert pop.problems == (sanitize.line(f"chain self-signed: self-signed by CN={CN}"),)
    rendered = "\n".join(status.render([view], NOW))
    assert not raw_controls(rendered)
    assert not [line for line in rendered.splitlines() if line.lstrip().startswith(f"{NAME}  ok")]
