"""DNS providers as a seam: per-type schemas (key-path errors), generic secrets/redaction, exec and powerdns faults."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from certmgr import inventory
from certmgr.cli import main
from certmgr.dns import TXTRecord, ZoneUpdate, build, by_zone, first_error, log_failed_cleanups, typed_config
from certmgr.dns import exec as exec_mod
from certmgr.dns.registry import TYPES, diagnoser, first_check
from certmgr.errors import DNSAuthError, DNSError, InventoryError

HEAD = """
[ca.x]
directory = "https://127.0.0.1:9/dir"
[[certificates]]
name = "x"
domains = ["x.hachyderm.test"]
dns = "p"
"""


def inv(tmp_path: Path, body: str) -> inventory.Inventory:
    path = tmp_path / "domains.toml"
    path.write_text(HEAD + body)
    return inventory.load(path)


def problems(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(InventoryError) as info:
        inv(tmp_path, body)
    return list(info.value.problems)


PDNS = """
[dns.p]
type = "powerdns"
zones = ["hachyderm.test"]
nameservers = ["127.0.0.1:5300"]
api_url = "http://127.0.0.1:8081"
api_key_file = "pdns.key"
"""

EXEC = """
[dns.p]
type = "exec"
zones = ["hachyderm.test"]
nameservers = ["127.0.0.1"]
program = ["/usr/local/bin/hook", "--quiet"]
timeout = "20s"
[dns.p.env]
DNS_SERVER = "127.0.0.1"
TSIG_KEY_file = "tsig.key"
API_TOKEN_env = "HOOK_TOKEN"
"""


def test_every_type_is_registered_with_a_diagnosis() -> None:
    """rfc2136, powerdns and exec are the known types, and each offers doctor a diagnose capability."""
    assert TYPES == ("rfc2136", "powerdns", "exec")
    assert all(diagnoser(t) is not None for t in TYPES)
    assert [first_check(t) for t in TYPES] == ["tsig", "api", "program"]


def test_every_secret_a_provider_reads_is_masked_in_logs(tmp_path: Path) -> None:
    """A secret read through any provider's declared SecretRef is registered with the log filter (generic, so a
    new provider type is covered without code of its own), and so is one a provider wraps in Secret."""
    from certmgr import log

    (tmp_path / "tsig.key").write_text("exec-env-secret-never-logged\n")
    [(_, ref)] = [(n, r) for n, r in inv(tmp_path, EXEC.replace('API_TOKEN_env = "HOOK_TOKEN"\n', "")).dns["p"]
                  .config.secret_env]
    ref.read()
    assert log.redact("key=exec-env-secret-never-logged") == "key=***"
    (tmp_path / "pdns.key").write_text("pdns-api-key-never-logged\n")
    build(inv(tmp_path, PDNS).dns["p"])
    assert log.redact("key=pdns-api-key-never-logged") == "key=***"


@pytest.mark.parametrize(("body", "expected"), [
    (PDNS.replace('api_url = "http://127.0.0.1:8081"', 'api_url = "http://pdns.example:8081"'),
     ['dns.p.api_url: "http://pdns.example:8081" is http:// to a host that is not loopback: use https:// (the '
      "token or URL would cross the network in clear text)"]),
    (PDNS.replace('api_key_file = "pdns.key"', 'api_key = "inline"'),
     ["dns.p.api_key: secrets must not be written inline; use api_key_file, api_key_credential or api_key_env"]),
    (PDNS.replace('nameservers = ["127.0.0.1:5300"]\n', ""),
     ["dns.p.nameservers: required for type 'powerdns': the addresses of every authoritative server of the "
      "zones (the propagation check asks each)"]),
    (PDNS.replace('"127.0.0.1:5300"', '"ns1.example:53"'),
     ["dns.p.nameservers[0]: 'ns1.example:53' must be an IP address (or ADDRESS:PORT)"]),
    (PDNS + 'tsig_key = "k"\n', ["dns.p.tsig_key: unknown key"]),
    (EXEC.replace('program = ["/usr/local/bin/hook", "--quiet"]', 'program = "/usr/local/bin/hook present"'),
     ['dns.p.program: must be a list of arguments (argv), e.g. ["sudo", "-n", "nginx", "-t"]; certmgr never runs '
      "a shell string"]),
    (EXEC.replace('"/usr/local/bin/hook"', '"hook"'), ["dns.p.program[0]: 'hook' must be an absolute path (no $PATH "
                                                      "search)"]),
    (EXEC + 'mode = "RAW"\n',
     ["dns.p.env.mode: 'mode' is not an environment variable name (A-Z, 0-9, _)"]),
    (EXEC.replace('[dns.p.env]', 'mode = "rw"\n[dns.p.env]'),
     ["dns.p.mode: 'rw' is not one of default, raw (did you mean 'raw'?)"]),
    (EXEC + 'TSIG_KEY = "x"\n', ["dns.p.env.TSIG_KEY: given more than once"]),
    (EXEC + 'bad-name_file = "x"\n', ["dns.p.env.bad-name_file: 'bad-name' is not an environment variable name "
                                      "(A-Z, 0-9, _)"]),
    (EXEC + "COUNT = 3\n", ["dns.p.env.COUNT: must be a string, not int"]),
    ('[dns.p]\ntype = "route53"\nzones = ["hachyderm.test"]\n',
     ["dns.p.type: 'route53' is not one of rfc2136, powerdns, exec", "certificates[0].dns: no DNS provider named "
      "'p'"]),
])
def test_provider_schema_errors_name_their_key_path(tmp_path: Path, body: str, expected: list[str]) -> None:
    """Each provider type validates its own keys, every problem naming its key path."""
    assert problems(tmp_path, body) == expected


def test_powerdns_and_exec_parse_into_their_own_config(tmp_path: Path) -> None:
    """A type's keys land in its config object; the inventory keeps only the common ones."""
    pd = inv(tmp_path, PDNS).dns["p"]
    assert (pd.type, pd.zones, pd.nameservers) == ("powerdns", ("hachyderm.test",), ("127.0.0.1:5300",))
    assert pd.config.shown() == {"api_url": "http://127.0.0.1:8081", "server_id": "localhost", "timeout": 10.0,
                                 "api_key": f"<secret file:{tmp_path / 'pdns.key'}>"}
    ex = inv(tmp_path, EXEC).dns["p"].config
    assert isinstance(ex, exec_mod.ExecConfig)
    assert (ex.program, ex.mode, ex.timeout, ex.env) == (("/usr/local/bin/hook", "--quiet"), "default", 20.0,
                                                         (("DNS_SERVER", "127.0.0.1"),))
    assert [(n, r.describe()) for n, r in ex.secret_env] == [("TSIG_KEY", f"file:{tmp_path / 'tsig.key'}"),
                                                             ("API_TOKEN", "env:HOOK_TOKEN")]


def test_inventory_show_redacts_every_provider_secret(tmp_path: Path) -> None:
    """`inventory show --json` prints each type's secrets as references only (generic redaction)."""
    path = tmp_path / "domains.toml"
    path.write_text(HEAD + EXEC + PDNS.replace("[dns.p]", "[dns.q]"))
    (tmp_path / "tsig.key").write_text("c2VjcmV0LXRzaWctdmFsdWU=\n")
    result = CliRunner().invoke(main, ["--inventory", str(path), "inventory", "show", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["dns"]["p"]["env"] == {"DNS_SERVER": "127.0.0.1", "TSIG_KEY": f"<secret file:{tmp_path}/tsig.key>",
                                       "API_TOKEN": "<secret env:HOOK_TOKEN>"}
    assert data["dns"]["q"]["api_key"] == f"<secret file:{tmp_path}/pdns.key>"
    assert "c2VjcmV0LXRzaWctdmFsdWU" not in result.output


def test_inventory_check_reads_each_type_s_declared_secrets(tmp_path: Path) -> None:
    """`inventory check` finds a missing secret file of an exec env or a powerdns api_key, naming its key."""
    path = tmp_path / "domains.toml"
    path.write_text(HEAD + EXEC + PDNS.replace("[dns.p]", "[dns.q]"))
    result = CliRunner().invoke(main, ["--inventory", str(path), "inventory", "check"])
    assert result.exit_code != 0
    assert f"dns.p.env.TSIG_KEY_file: cannot read secret file {tmp_path}/tsig.key: No such file or directory" \
        in result.output
    assert f"dns.q.api_key_file: cannot read secret file {tmp_path}/pdns.key: No such file or directory" \
        in result.output


# ---------------------------------------------------------------- exec: faults with real programs


def hook(tmp_path: Path, script: str, *, timeout: str = "20s", mode: str = "default",
         secret: str = "s3cret-hook-token-value") -> Any:
    prog = tmp_path / "hook"
    prog.write_text("#!/bin/sh\n" + script)
    prog.chmod(0o755)
    (tmp_path / "token").write_text(secret + "\n")
    body = (f'[dns.p]\ntype = "exec"\nzones = ["hachyderm.test"]\nnameservers = ["127.0.0.1"]\n'
            f'program = ["{prog}"]\ntimeout = "{timeout}"\nmode = "{mode}"\n'
            f'[dns.p.env]\nHOOK_TOKEN_file = "{tmp_path / "token"}"\nOUT = "{tmp_path / "out"}"\n')
    return build(inv(tmp_path, body).dns["p"])


REC = TXTRecord(fqdn="_acme-challenge.x.hachyderm.test", zone="hachyderm.test", value="v" * 43,
                domain="*.x.hachyderm.test", token="tok", key_authorization="tok.thumb")


def test_exec_runs_lego_s_contract_with_secrets_in_the_environment_only(tmp_path: Path) -> None:
    """present/cleanup get `ACTION FQDN. VALUE`; the secret arrives in the environment, never in argv."""
    prov = hook(tmp_path, 'printf "%s|" "$@" "$HOOK_TOKEN" "$PATH" >> "$OUT"; echo >> "$OUT"\n')
    [up] = asyncio.run(prov.present([REC]))
    [down] = asyncio.run(prov.cleanup([REC]))
    assert (up.applied, down.applied) == (True, True)
    assert (tmp_path / "out").read_text().splitlines() == [
        f"present|_acme-challenge.x.hachyderm.test.|{'v' * 43}|s3cret-hook-token-value|/usr/local/bin:/usr/bin:/bin|",
        f"cleanup|_acme-challenge.x.hachyderm.test.|{'v' * 43}|s3cret-hook-token-value|/usr/local/bin:/usr/bin:/bin|"]


def test_exec_raw_mode_passes_domain_token_and_key_authorization(tmp_path: Path) -> None:
    """lego's raw mode: `ACTION DOMAIN TOKEN KEY_AUTHORIZATION`, the wildcard label removed from the domain."""
    prov = hook(tmp_path, 'echo "$*" >> "$OUT"\n', mode="RAW")
    asyncio.run(prov.present([REC]))
    assert (tmp_path / "out").read_text() == "present x.hachyderm.test tok tok.thumb\n"
    [u] = asyncio.run(prov.cleanup([TXTRecord(fqdn=REC.fqdn, zone=REC.zone, value=REC.value, domain=REC.domain)]))
    assert u.applied is False and str(u.error) == (
        "dns cleanup _acme-challenge.x.hachyderm.test via hook: raw mode needs the challenge token and key "
        "authorization, and this record has none (nothing run) (TXT may be left behind)")


@pytest.mark.parametrize(("script", "applied", "message"), [
    ('echo "zone not found" >&2; exit 3\n', None,
     "dns present _acme-challenge.x.hachyderm.test via hook: exited with status 3: zone not found (TXT may have "
     "been written; it is removed again)"),
    ('echo "using token $HOOK_TOKEN" >&2; exit 1\n', None,
     "dns present _acme-challenge.x.hachyderm.test via hook: exited with status 1: using token *** (TXT may have "
     "been written; it is removed again)"),
    ('printf "\\033[2Jrenewed ok\\n" >&2; exit 1\n', None,
     "dns present _acme-challenge.x.hachyderm.test via hook: exited with status 1: \\x1b[2Jrenewed ok (TXT may "
     "have been written; it is removed again)"),
    ("kill -9 $$\n", None,
     "dns present _acme-challenge.x.hachyderm.test via hook: killed by signal 9 (TXT may have been written; it is "
     "removed again)"),
])
def test_exec_failures_are_results_with_output_inert_and_secrets_masked(tmp_path: Path, script: str,
                                                                       applied: bool | None, message: str) -> None:
    """A failing program is a per-record result (outcome unknown: cleaned up later), its output inert and masked."""
    [u] = asyncio.run(hook(tmp_path, script).present([REC]))
    assert u.applied is applied and u.error is not None
    assert u.error.message == message
    assert "s3cret-hook-token-value" not in u.error.message


def test_exec_short_secret_printed_is_masked_too(tmp_path: Path) -> None:
    """A secret shorter than the log filter's minimum is still masked in the program's output."""
    [u] = asyncio.run(hook(tmp_path, 'echo "t=$HOOK_TOKEN"; exit 1\n', secret="abc").present([REC]))
    assert u.error is not None and u.error.message.endswith("exited with status 1: t=*** (TXT may have been "
                                                            "written; it is removed again)")


def test_exec_hanging_program_is_killed_with_its_children(tmp_path: Path) -> None:
    """A program still running at `timeout` is killed with its whole process group (a forked sleeper too)."""
    prov = hook(tmp_path, 'sleep 300 >/dev/null 2>&1 & echo $! > "$OUT"; wait\n', timeout="1s")
    [u] = asyncio.run(prov.present([REC]))
    assert u.applied is None and u.error is not None
    assert u.error.message == ("dns present _acme-challenge.x.hachyderm.test via hook: still running after 1s, "
                               "killed (TXT may have been written; it is removed again)")
    assert _gone(int((tmp_path / "out").read_text()))


def test_exec_program_done_while_its_child_holds_stdout_is_done(tmp_path: Path) -> None:
    """A program that exits 0 leaving a child with its stdout open succeeds (not taken for hung); the child is
    killed with the group."""
    prov = hook(tmp_path, 'sleep 30 & echo $! > "$OUT"; echo started\n', timeout="3s")
    [u] = asyncio.run(prov.present([REC]))
    assert (u.applied, u.error) == (True, None)
    assert _gone(int((tmp_path / "out").read_text()))


def _gone(pid: int) -> bool:
    """True once `pid` is dead (SIGKILL is delivered asynchronously: allow it a moment)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_exec_program_missing_fails_when_built(tmp_path: Path) -> None:
    """A program that is not an executable file fails when the provider is built, before any challenge."""
    body = EXEC.replace("/usr/local/bin/hook", str(tmp_path / "nope"))
    (tmp_path / "tsig.key").write_text("x\n")
    os.environ["HOOK_TOKEN"] = "t0ken-value"
    try:
        with pytest.raises(DNSError) as info:
            build(inv(tmp_path, body).dns["p"])
    finally:
        del os.environ["HOOK_TOKEN"]
    assert info.value.message == f"dns provider p: program {tmp_path}/nope is not an executable file (nothing run)"


# ---------------------------------------------------------------- powerdns: API faults (a fake API on loopback)


class FakeAPI:
    """A PowerDNS-shaped API: GET answers an empty RRset; PATCH answers `status` (or hangs when it is 0)."""

    def __init__(self) -> None:
        self.status = 204
        self.get_status = 200
        self.requests: list[tuple[str, str, str | None]] = []
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes) -> None:
                if status == 0:
                    api.release.wait(10)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                api.requests.append(("GET", self.path, self.headers.get("X-API-Key")))
                self._answer(api.get_status, json.dumps({"rrsets": [], "error": "Unauthorized"}).encode())

            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                api.requests.append(("PATCH", self.path, self.rfile.read(length).decode()))
                body = b"" if api.status == 204 else json.dumps({"error": "Backend error\x1b[2J"}).encode()
                self._answer(api.status, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


def pdns(tmp_path: Path, api: FakeAPI) -> Any:
    (tmp_path / "pdns.key").write_text("pdns-api-key-value\n")
    body = PDNS.replace("8081", str(api.port)) + 'timeout = "1s"\n'
    return build(inv(tmp_path, body).dns["p"])


STEP = "dns present hachyderm.test via http://127.0.0.1:{port}"


@pytest.mark.parametrize(("get", "patch", "applied", "kind", "message"), [
    (401, 204, False, DNSAuthError, "{step}: the API refused the key (HTTP 401) (TXT not written)"),
    (403, 204, False, DNSAuthError, "{step}: the API refused the key (HTTP 403) (TXT not written)"),
    (404, 204, False, DNSError, "{step}: HTTP 404 — no zone hachyderm.test on server 'localhost' (TXT not written)"),
    (500, 204, False, DNSError, "{step}: HTTP 500: \"Unauthorized\" (TXT not written)"),
    (200, 422, False, DNSError, "{step}: HTTP 422, the API rejected the change: \"Backend error\\x1b[2J\" (TXT not "
                                "written)"),
    (200, 500, None, DNSError, "{step}: HTTP 500: \"Backend error\\x1b[2J\" (TXT may have been written; it is "
                               "removed again)"),
    (200, 0, None, DNSError, "{step}: no answer from http://127.0.0.1:{port} within 1s (TXT may have been written; "
                             "it is removed again)"),
    (0, 204, False, DNSError, "{step}: no answer from http://127.0.0.1:{port} within 1s (TXT not written)"),
])
def test_powerdns_api_faults_are_exact_results(tmp_path: Path, api: FakeAPI, get: int, patch: int,
                                              applied: bool | None, kind: type[DNSError], message: str) -> None:
    """Each API failure is a per-zone result: refused before the PATCH → not written; a 5xx or silence after → unknown."""
    api.get_status, api.status = get, patch
    [u] = asyncio.run(pdns(tmp_path, api).present([REC]))
    assert u.applied is applied and type(u.error) is kind
    assert u.error.message == message.format(step=STEP.format(port=api.port), port=api.port)


def test_powerdns_sends_the_key_only_as_a_header_and_writes_the_union(tmp_path: Path, api: FakeAPI) -> None:
    """The key travels in X-API-Key; the PATCH REPLACEs the challenge RRset with quoted values, TTL 60."""
    [u] = asyncio.run(pdns(tmp_path, api).present([REC]))
    assert u.applied is True
    (m1, path1, key), (m2, path2, body) = api.requests
    assert (m1, key) == ("GET", "pdns-api-key-value")
    assert path1 == ("/api/v1/servers/localhost/zones/hachyderm.test.?rrset_name=_acme-challenge.x.hachyderm.test."
                     "&rrset_type=TXT")
    assert (m2, path2) == ("PATCH", "/api/v1/servers/localhost/zones/hachyderm.test.")
    assert json.loads(body or "") == {"rrsets": [{"name": "_acme-challenge.x.hachyderm.test.", "type": "TXT", "ttl": 60,
                                                  "changetype": "REPLACE",
                                                  "records": [{"content": f'"{"v" * 43}"', "disabled": False}]}]}
    assert first_error([u]) is None


def test_discover_stub_round_trips_every_provider_type(tmp_path: Path) -> None:
    """`discover`'s inventory stub writes each type's own keys (exec env as an inline table); they read back equal."""
    from certmgr.discover import stub

    first = inv(tmp_path, EXEC + PDNS.replace("[dns.p]", "[dns.q]"))
    text = stub.render(first, [stub.StubCert(name="x", domains=("x.hachyderm.test",), hosts=(), dns="p")])
    assert first.dns == inventory.loads(text, base=tmp_path).dns


def test_typed_config_refuses_another_providers_config(tmp_path: Path) -> None:
    """A provider module handed another type's `[dns.NAME]` refuses it with one wording for every type."""
    (tmp_path / "pdns.key").write_text("k\n")
    cfg = inv(tmp_path, PDNS).dns["p"]
    assert typed_config(cfg, type(cfg.config), "powerdns") is cfg.config
    with pytest.raises(DNSError) as info:
        typed_config(cfg, exec_mod.ExecConfig, "exec")
    assert str(info.value) == "dns provider p: type 'powerdns' is not exec"


def test_failed_cleanups_are_logged_one_line_each_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Cleanup logs one warning per failed update (zone, record count, error) and none for applied ones."""
    a = TXTRecord(fqdn="_acme-challenge.a.hachyderm.test", zone="hachyderm.test", value="v1", domain="a.hachyderm.test")
    b = TXTRecord(fqdn="_acme-challenge.b.example.test", zone="example.test", value="v2", domain="b.example.test")
    assert by_zone([a, b, a]) == {"hachyderm.test": [a, a], "example.test": [b]}
    updates = [ZoneUpdate(zone="hachyderm.test", records=(a,), applied=True),
               ZoneUpdate(zone="example.test", records=(b,), applied=None, error=DNSError("dns cleanup: timed out"))]
    with caplog.at_level("WARNING", logger="certmgr.dns.test"):
        log_failed_cleanups(logging.getLogger("certmgr.dns.test"), "p", updates)
    assert [(r.getMessage(), r.kv) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("challenge cleanup failed", {"provider": "p", "zone": "example.test", "records": 1,
                                      "error": "dns cleanup: timed out"})]
