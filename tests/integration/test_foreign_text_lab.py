"""Foreign text from real lab POPs: a served certificate and `nginx -t` output that try to drive the terminal and chat.

One POP serves, for one name, a certificate whose subject holds `ESC[2J`, a newline with a forged
`ok` line, a bidi override and every chat's markup; the real CLI (`certmgr scan`, `scan --json`)
runs as a subprocess and sends to Discord, Slack, Matrix and webhook channels on a local receiver.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lab import Lab, pki
from lab.proc import descendants, wait_until
from tests.faults.helpers_b import REPO, certmgr, inventory_text, write_inventory
from tests.receiver import Receiver

pytestmark = pytest.mark.integration

MEDIA = "media.hachyderm.test"
VICTIM = "sally"
FORGED = f"{MEDIA}  ok  served by every POP"
CN = f"x\x1b[2J\n{FORGED}\r\u202egnp.exe"  # 62 bytes: within the 64 a CN may have
ORG = "@everyone <b>bold</b> **pwn** <@123456789012345678> <!channel> @here @room"
CN_SHOWN = f"x\\x1b[2J\\n{FORGED}\\r\\u202egnp.exe"


def raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on (ESC, CR, BEL…) or a reader would not see (bidi, zero-width)."""
    return [c for c in text if not c.isprintable() and c != "\n"]


def certmgr_on_tty(inventory: Path, state: Path, *args: str) -> tuple[int, str, str]:
    """Run the real CLI with stdout on a pseudo-terminal: what on-call's terminal receives (click strips
    ANSI sequences only when stdout is not a TTY, so a pipe would hide them). Returns (status, stdout, stderr)."""
    master, slave = pty.openpty()
    argv = [sys.executable, "-m", "certmgr", "--inventory", str(inventory), "--state-dir", str(state), *args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"})  # no colour of our own
    os.close(slave)
    chunks: list[bytes] = []
    give_up = time.monotonic() + 180  # a hung CLI fails the test instead of hanging the suite
    try:
        while time.monotonic() < give_up:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    # the terminal's own output processing turns "\n" into "\r\n"; any other CR is the program's
    out = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return proc.returncode, out, err.decode("utf-8", "replace")


def hostile_leaf() -> pki.Issued:
    """A self-signed leaf for MEDIA (so also its issuer is hostile text), valid for 60 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, CN)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=60))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(MEDIA), x509.DNSName(f"{MEDIA}\x1b]0;owned\x07")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return pki.Issued(cert=cert, key=key)


def install(lab: Lab, pop: str, leaf: pki.Issued) -> None:
    """Serve `leaf` for MEDIA on `pop` (live/ files replaced, nginx reloaded) and wait until it is served."""
    live = lab.pop_paths(pop).cert_root / "live" / MEDIA
    for fname, data, mode in (("fullchain.pem", leaf.cert_pem, 0o644), ("privkey.pem", leaf.key_pem, 0o600)):
        target = live / fname
        target.unlink(missing_ok=True)  # a certbot symlink into archive/: replace it, never write through it
        target.write_bytes(data)
        os.chmod(target, mode)
    lab.nginx_reload(pop)
    master = lab.nginx_pid(pop)
    assert master is not None

    def settled() -> bool:
        try:
            serving = lab.served_serial(pop, MEDIA) == leaf.cert.serial_number
        except Exception:  # not served yet
            return False
        return serving and len(descendants(master)) == 1

    assert wait_until(settled, 10.0, 0.05), f"{pop} does not serve the hostile certificate"


@pytest.fixture()
def hostile(lab: Lab) -> Iterator[Lab]:
    """The session lab with VICTIM serving the hostile certificate for MEDIA; reseeded afterwards."""
    lab.reseed()
    install(lab, VICTIM, hostile_leaf())
    try:
        yield lab
    finally:
        lab.reseed()


def chat_inventory(lab: Lab, rx: Receiver, where: Path) -> Path:
    """The lab inventory for MEDIA with one channel of each type, all pointing at `rx`."""
    secrets = where / "secrets"
    secrets.mkdir()
    files = {"discord": rx.url("/discord/api/webhooks/1/x"), "slack": rx.url("/slack/services/T/B/x"),
             "webhook": rx.url("/hook"), "matrix": "syt_lab_token"}
    for name, value in files.items():
        (secrets / name).write_text(value + "\n")
        (secrets / name).chmod(0o600)
    extra = "".join(f'\n[channels.{kind}]\ntype = "{kind}"\nurl_file = "{secrets / kind}"\n'
                    for kind in ("discord", "slack", "webhook"))
    extra += (f'\n[channels.matrix]\ntype = "matrix"\nhomeserver = "{rx.url("")}"\nroom = "!ops:hachyderm.test"\n'
              f'token_file = "{secrets / "matrix"}"\n')
    return write_inventory(where / "domains.toml", inventory_text(lab, certs=(MEDIA,), extra=extra))


def by_service(rx: Receiver) -> dict[str, Any]:
    return {r.path.split("/")[1]: r.json for r in rx.requests}


def test_hostile_certificate_scan_terminal_json_and_chat(hostile: Lab, tmp_path: Path) -> None:
    """A served subject with ESC[2J, a forged `ok` line and chat markup: escaped in the table and JSON, neutralized per chat format."""
    with Receiver() as rx:
        inv = chat_inventory(hostile, rx, tmp_path)
        state = tmp_path / "state"
        code, stdout, stderr = certmgr_on_tty(inv, state, "scan", MEDIA)  # the table; notifies the four channels
        rx.wait_for(4)
        chats = by_service(rx)
        as_json = certmgr(inv, state, "scan", "--json", "--no-notify", MEDIA)
    assert code == 2, stderr
    assert as_json.returncode == 2, as_json.stderr
    for out in (stdout, stderr, as_json.stdout, as_json.stderr):
        assert not raw_controls(out), [c for c in raw_controls(out)][:5]
    # terminal: one row per endpoint, the subject escaped inside it, no line forged
    assert not [line for line in stdout.splitlines() if line.lstrip().startswith(FORGED)]
    rows = [line for line in stdout.splitlines() if line.startswith("critical ")]
    assert len(rows) == len(hostile.pop_names)  # the others serve the near-expiry seed
    [row] = [line for line in rows if f" {VICTIM} " in line]
    assert f"chain self-signed: self-signed by CN={CN_SHOWN}," in row
    # JSON: the same inert text as data
    data = json.loads(as_json.stdout)
    [ep] = [e for e in data["endpoints"] if e["host"] == VICTIM]
    assert ep["subject"].startswith(f"CN={CN_SHOWN},O=@everyone \\<b\\>bold\\</b\\> **pwn**")
    assert ep["issuer"] == ep["subject"]
    assert ep["names"] == [MEDIA, f"{MEDIA}\\x1b]0;owned\\x07"]
    assert any(CN_SHOWN in p for p in ep["problems"])
    assert all(not raw_controls(e["subject"] or "") for e in data["endpoints"])
    # chat, per format
    assert set(chats) == {"discord", "slack", "_matrix", "hook"}
    d = chats["discord"]
    assert d["allowed_mentions"] == {"parse": []}
    assert "@everyone" not in d["content"] and "@here" not in d["content"] and "<@1" not in d["content"]
    assert "\\*\\*pwn\\*\\*" in d["content"] and "x\\\\x1b\\[2J\\\\n" in d["content"]
    s = chats["slack"]["blocks"][0]["text"]["text"]
    assert "<" not in s and ">" not in s and "@everyone" not in s and "**" not in s
    assert "&lt;!channel\\&gt;" in s and "\u200b*\u200b\u200b*\u200bpwn" in s
    m = chats["_matrix"]
    assert m["m.mentions"] == {} and "@room" not in m["body"] and "@room" not in m["formatted_body"]
    assert "<b>" not in m["formatted_body"] and "\\&lt;b\\&gt;bold" in m["formatted_body"]
    w = chats["hook"]
    assert any(f"self-signed by CN={CN_SHOWN},O=@everyone \\<b\\>bold" in line for line in w["lines"])
    for body in (d["content"], s, m["body"], m["formatted_body"], w["text"], *w["lines"]):
        assert not raw_controls(body.replace("\u200b", "")), body
        assert not [line for line in body.splitlines() if line.startswith(FORGED)]


def test_nginx_test_output_with_escape_sequences_is_shown_inert(lab: Lab, tmp_path: Path) -> None:
    """`nginx -t` quoting a conf.d file named with ESC[2J and a newline: the deploy error shows it escaped, on one line."""
    lab.reseed()
    state = tmp_path / "state"
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(lab, certs=(MEDIA,), hosts=(VICTIM,)))
    imported = certmgr(inv, state, "import", str(lab.pop_paths(VICTIM).cert_root))
    assert imported.returncode == 0, imported.stderr
    conf_d = lab.pop_paths(VICTIM).conf_d
    bad = conf_d / "evil\x1b[2J\nrenewed ok.conf"
    bad.write_text("this is not nginx syntax;\n")
    try:
        code, out = lab.nginx_test(VICTIM)
        assert code != 0 and "\x1b[2J" in out  # nginx itself prints the name raw
        code, stdout, stderr = certmgr_on_tty(inv, state, "-vv", "deploy", MEDIA)
        as_json = certmgr(inv, state, "deploy", "--json", MEDIA)
    finally:
        bad.unlink()
    assert code != 0 and as_json.returncode != 0, stderr
    for o in (stdout, stderr, as_json.stdout, as_json.stderr):
        assert not raw_controls(o), raw_controls(o)[:5]
        assert not [line for line in o.splitlines() if line.startswith("renewed ok")]
    [d] = json.loads(as_json.stdout)
    assert d["error"].startswith(f"deploy {MEDIA} → {VICTIM}: config was already broken before deploy: ")
    assert "evil\\x1b[2J renewed ok.conf" in d["error"], d["error"]
    assert "evil\\x1b[2J renewed ok.conf" in stdout
