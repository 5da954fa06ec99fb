"""Hostile input: shell metacharacters, paths, NUL and confusables in the inventory; a hostile ACME server.

Inventory values are refused before any I/O (no state dir, nothing sent to the CA, bind, any POP or
chat). Hostile CA responses come from tests/faults/acmeproxy.py in front of the real Pebble; they
must end as text in a failed outcome, and the canary file they try to create never appears.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.helpers_b import (
    REPO,
    LogMark,
    audit,
    certmgr,
    inventory_text,
    pebble_mark,
    served,
    sshd_marks,
    tree_digest,
    write_inventory,
)
from tests.receiver import Receiver

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MEDIA = "media.hachyderm.test"
CANARY = Path(f"/tmp/certmgr-pwned-{secrets.token_hex(4)}")
INJECT = f"$(touch {CANARY})"


@pytest.fixture(scope="module")
def rx(lab: Lab) -> Iterator[Receiver]:
    with Receiver(port=lab.ports.webhook) as receiver:
        yield receiver


@pytest.fixture()
def quiet(lab: Lab, rx: Receiver) -> Iterator[Lab]:
    """The session lab with its POPs on the seed and an empty chat log; the canary must never exist."""
    lab.reseed()
    rx.clear()
    CANARY.unlink(missing_ok=True)
    yield lab
    assert not CANARY.exists(), f"{CANARY} was created: hostile text reached a shell"


def canary_nowhere(lab: Lab) -> None:
    """The canary file is absent locally and under every POP (its prefix and cert root)."""
    assert not CANARY.exists()
    for pop in lab.pop_names:
        assert not list(lab.pop_paths(pop).prefix.rglob(CANARY.name)), pop


# ---------------------------------------------------------------- the inventory


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("name-semicolon", {"extra_certs": [{"name": "a.example.com;reboot", "domains": [MEDIA]}]},
     "certificates[0].name: 'a.example.com;reboot' is not a valid certificate name"),
    ("name-traversal", {"extra_certs": [{"name": "../../etc", "domains": [MEDIA]}]},
     "certificates[0].name: '../../etc' is not a valid certificate name"),
    ("name-injection", {"extra_certs": [{"name": INJECT, "domains": [MEDIA]}]},
     f"certificates[0].name: '{INJECT}' is not a valid certificate name"),
    ("domain-subshell", {"extra_certs": [{"name": "x.hachyderm.test", "domains": ["$(id).x"]}]},
     "certificates[0].domains[0]: '$(id).x' contains characters not allowed in a DNS name: '$()'"),
    ("domain-nul", {"extra_certs": [{"name": "x.hachyderm.test", "domains": [MEDIA + "\x00.evil.test"]}]},
     "certificates[0].domains[0]: 'media.hachyderm.test\\x00.evil.test' contains characters not allowed"),
    ("domain-confusable", {"extra_certs": [{"name": "x.hachyderm.test", "domains": ["m\u0435dia.hachyderm.test"]}]},
     "certificates[0].domains[0]: 'm\u0435dia.hachyderm.test' contains non-ASCII characters; write the A-label "
     "form 'xn--mdia-v4d.hachyderm.test'"),
    ("domain-fullwidth-dot", {"extra_certs": [{"name": "x.hachyderm.test", "domains": ["media\uff0ehachyderm.test"]}]},
     "certificates[0].domains[0]: 'media\uff0ehachyderm.test' contains non-ASCII characters"),
    ("host-address", {"host_overrides": {"sally": {"address": INJECT}}},
     f"hosts.sally.address: '{INJECT}' contains characters not allowed in a DNS name"),
    ("cert-root-traversal", {"host_overrides": {"sally": {"cert_root": "../../etc"}}},
     "hosts.sally.cert_root: '../../etc' must be an absolute path"),
    ("cert-root-semicolon", {"host_overrides": {"sally": {"cert_root": "/etc/letsencrypt;reboot"}}},
     "hosts.sally.cert_root: '/etc/letsencrypt;reboot' must be an absolute path"),
    ("ssh-user", {"host_overrides": {"sally": {"user": "root;id"}}},
     "hosts.sally.user: 'root;id' is not a valid user name"),
    ("ssh-option-address", {"host_overrides": {"sally": {"address": "-oProxyCommand=touch"}}},
     "hosts.sally.address: '-oProxyCommand=touch' contains characters not allowed in a DNS name: '='"),
    ("host-name-semicolon", {"_replace": [("[hosts.sally]", '[hosts."sally;reboot"]'),
                                          ('"sally",', '"sally;reboot",')]},
     "hosts.sally;reboot: 'sally;reboot' is not a valid name"),
    ("tsig-key-name", {"dns_overrides": {"tsig_key": "certmgr-lab;reboot"}},
     "dns.lab.tsig_key: 'certmgr-lab;reboot' is not a valid key name"),
    ("test-command-nul", {"host_overrides": {"sally": {"test_command": ["nginx\x00", "-t"]}}},
     "hosts.sally.test_command[0]: contains a NUL or newline"),
    ("domain-rtl-override", {"extra_certs": [{"name": "x.hachyderm.test", "domains": ["x\u202e.hachyderm.test"]}]},
     "certificates[0].domains[0]: 'x\\u202e.hachyderm.test' is not a valid internationalised name"),
]


@pytest.mark.parametrize(("case", "where", "problem"), HOSTILE, ids=[c for c, _, _ in HOSTILE])
def test_hostile_inventory_value_is_rejected_before_any_io(quiet: Lab, rx: Receiver, tmp_path: Path, case: str,
                                                           where: dict[str, Any], problem: str) -> None:
    """A hostile name, address, path or user in the inventory: exit 2 naming its key path; no state dir, and nothing reaches the CA, bind, a POP or chat."""
    certs = () if "extra_certs" in where else (MEDIA,)  # the hostile certificate is certificates[0]
    kwargs = {k: v for k, v in where.items() if not k.startswith("_")}
    text = inventory_text(quiet, certs=certs, channel_url_file=quiet.webhook_url_file, **kwargs)
    for old, new in where.get("_replace", ()):
        assert old in text
        text = text.replace(old, new)
    inv = write_inventory(tmp_path / "domains.toml", text)
    state = tmp_path / "state"
    pebble, named, sshd = pebble_mark(quiet), LogMark(quiet.dns_dir / "named.log"), sshd_marks(quiet)
    pops = {pop: tree_digest(quiet.pop_paths(pop).cert_root) for pop in quiet.pop_names}
    for cmd in (["run"], ["renew", "--due"], ["deploy", "--all"]):
        proc = certmgr(inv, state, *cmd)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert problem in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"certmgr: error: inventory {inv}: ")
    assert not state.exists(), "nothing may be created before the inventory is valid"
    assert pebble.new() == "" and named.new() == ""
    assert all(m.new() == "" for m in sshd.values())
    assert {pop: tree_digest(quiet.pop_paths(pop).cert_root) for pop in quiet.pop_names} == pops
    assert rx.requests == []
    canary_nowhere(quiet)


# ---------------------------------------------------------------- a hostile ACME server


@pytest.fixture(scope="module")
def proxy(lab: Lab) -> Iterator[ACMEProxy]:
    with ACMEProxy.running(lab.ports.acme, lab.https_cert, lab.https_key, lab.https_ca) as p:
        yield p


def run_through(lab: Lab, proxy: ACMEProxy, tmp_path: Path) -> tuple[Any, Path]:
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        lab, channel_url_file=lab.webhook_url_file).replace(lab.pebble.directory, proxy.directory))
    state = tmp_path / "state"
    return certmgr(inv, state, "run", "--json"), state


@pytest.mark.parametrize("token", ["../../x", f"AAAAAAAAAAAAAAAAAAAAAA{INJECT}"], ids=["traversal", "subshell"])
def test_hostile_challenge_token_is_rejected(quiet: Lab, rx: Receiver, proxy: ACMEProxy, tmp_path: Path,
                                             token: str) -> None:
    """A dns-01 token such as `../../x` or one holding `$(touch …)` fails that certificate as text: no TXT written, no challenge answered, no file created, POPs untouched."""
    proxy.clear()
    proxy.rewrite_token(token)
    named = LogMark(quiet.dns_dir / "named.log")
    before = served(quiet, certs=(MEDIA,))
    try:
        proc, state = run_through(quiet, proxy, tmp_path)
    finally:
        proxy.clear()
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    [out] = report["renewals"]
    assert out["status"] == "failed"
    assert out["error"] == (f"acme authorization {MEDIA}: the CA sent a dns-01 token that is not base64url "
                            f"(RFC 8555 §8.1): {token!r} (order abandoned)"), out["error"]
    assert out["retryable"] is False
    assert [e["error"] for e in audit(state) if e["action"] == "renew failed"] == [out["error"]]
    assert "Traceback" not in proc.stderr
    assert proxy.requests("challenge") == [] and named.count("updating zone") == 0
    for base in (REPO, state, state / "archive", tmp_path, Path("/")):
        assert not (base / "../../x").exists()
    assert not (state / "live" / MEDIA).exists()
    assert served(quiet, certs=(MEDIA,)) == before
    alerts = [r.json for r in rx.requests if r.json["kind"] == "failure"]
    assert [a["title"] for a in alerts] == [f"FAILED renewal of {MEDIA}"]
    assert f": {token!r} (order abandoned)" in alerts[0]["lines"][0]
    canary_nowhere(quiet)


def test_error_detail_with_shell_syntax_is_shown_as_text(quiet: Lab, rx: Receiver, proxy: ACMEProxy,
                                                         tmp_path: Path) -> None:
    """An ACME error detail holding `$(touch …)`, backticks, a forged newline and terminal escapes is reported as inert text (escaped), never executed."""
    proxy.clear()
    detail = f"order refused {INJECT} `touch {CANARY}`; reboot\nrenewed  {MEDIA}: forged\x1b]0;owned\x07\x1b[2J"
    escaped = detail.replace("\n", "\\n").replace("\x1b", "\\x1b").replace("\x07", "\\x07")
    proxy.fail("new-order", 400, "malformed", detail, times=None)
    try:
        proc, state = run_through(quiet, proxy, tmp_path)
        inv = tmp_path / "domains.toml"
        text = certmgr(inv, state, "renew", MEDIA, "--force")  # the human-readable form on-call reads
    finally:
        proxy.clear()
    assert proc.returncode == 2, proc.stderr
    [out] = json.loads(proc.stdout)["renewals"]
    assert out["error"] == f"acme new-order {MEDIA}: malformed: {escaped} (order not placed)"
    st = json.loads((state / "state" / "renew" / f"{MEDIA}.json").read_text())
    assert st["last_error"] == out["error"]
    assert next(e["error"] for e in audit(state) if e["action"] == "renew failed") == out["error"]
    alerts = [r.json for r in rx.requests if r.json["kind"] == "failure"]
    assert len(alerts) == 1 and escaped in alerts[0]["lines"][0]
    assert text.returncode == 1
    assert f"FAILED   {MEDIA} [OVERDUE]: acme new-order {MEDIA}: malformed: {escaped} (order not placed)" in text.stdout
    for output in (proc.stdout, proc.stderr, text.stdout, text.stderr):
        assert "\x1b" not in output and "\x07" not in output
    assert not [line for line in text.stdout.splitlines() if line.startswith("renewed")]
    canary_nowhere(quiet)
