"""powerdns and exec providers against real parts: PowerDNS 4.7 (sqlite3), bind9 via nsupdate, Pebble validating."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from certmgr.cli import main
from certmgr.dns import TXTRecord, build
from certmgr.dns import journal as journal_mod
from certmgr.dns.propagation import query_txt
from certmgr.errors import DNSAuthError
from certmgr.store import Store
from lab import Lab
from lab.named import PDNS_ZONE
from tests.integration.test_renew import inventory_text, load, run_renew

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "tests" / "dnsexec" / "nsupdate-hook"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def pdns_lab(lab: Lab) -> Iterator[Lab]:
    """The session lab with its optional PowerDNS started (pdns.test; bind forwards it, so Pebble validates it)."""
    if shutil.which("pdns_server", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("pdns-server is not installed (scripts/bootstrap installs lab/requirements-apt.txt)")
    lab.start_powerdns()
    yield lab
    lab.stop_powerdns()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


def pdns_dns(lab: Lab, *, name: str = "pd", zones: Sequence[str] = (PDNS_ZONE,), key_file: Path | None = None,
             timeout: str | None = None) -> str:
    zl = ", ".join(f'"{z}"' for z in zones)
    return (f'\n[dns.{name}]\ntype = "powerdns"\nzones = [{zl}]\nnameservers = ["127.0.0.1:{lab.ports.pdns}"]\n'
            f'propagation_timeout = "10s"\napi_url = "{lab.powerdns.api_url}"\n'
            f'api_key_file = "{key_file or lab.powerdns.api_key_file}"\n'
            + (f'timeout = "{timeout}"\n' if timeout else ""))


def exec_dns(lab: Lab, *, mode: str = "default", extra_env: str = "") -> str:
    return (f'\n[dns.hook]\ntype = "exec"\nzones = ["hachyderm.test"]\nnameservers = ["127.0.0.1:{lab.ports.dns}"]\n'
            f'propagation_timeout = "10s"\nprogram = ["{HOOK}"]\nmode = "{mode}"\ntimeout = "20s"\n'
            f'[dns.hook.env]\nDNS_SERVER = "127.0.0.1"\nDNS_PORT = "{lab.ports.dns}"\n'
            f'TSIG_KEY_file = "{lab.dns_dir / "certmgr-lab.key"}"\n{extra_env}')


def pdns_txt(lab: Lab, fqdn: str) -> frozenset[str]:
    got = asyncio.run(query_txt("127.0.0.1", lab.ports.pdns, fqdn))
    assert got is not None, f"PowerDNS 127.0.0.1:{lab.ports.pdns} did not answer for {fqdn}"
    return got


def dns_audit(store: Store) -> list[tuple[str, str, str]]:
    """(action, zone, provider) of every DNS change the audit log records."""
    lines = [json.loads(ln) for ln in (store.root / "audit.log").read_text().splitlines()]
    return [(a["action"], a["object"], a.get("provider", "")) for a in lines if a["action"].startswith("dns ")]


def bind_txt(lab: Lab, fqdn: str) -> frozenset[str]:
    got = asyncio.run(query_txt("127.0.0.1", lab.ports.dns, fqdn))
    assert got is not None
    return got


def put_txt(lab: Lab, fqdn: str, values: Sequence[str]) -> None:
    """Write an RRset straight through the PowerDNS API (a value someone else owns)."""
    status, body = lab.powerdns.request("PATCH", f"/api/v1/servers/localhost/zones/{PDNS_ZONE}.", {"rrsets": [{
        "name": fqdn + ".", "type": "TXT", "ttl": 60, "changetype": "REPLACE" if values else "DELETE",
        "records": [{"content": f'"{v}"', "disabled": False} for v in values]}]})
    assert status == 204, body


# ---------------------------------------------------------------- powerdns


def test_powerdns_renews_apex_and_wildcard_and_leaves_nothing(pdns_lab: Lab, store: Store, tmp_path: Path) -> None:
    """A certificate for pdns.test and *.pdns.test (one `_acme-challenge` name, two values) is issued through
    the PowerDNS API — Pebble validates via bind's forward — and no challenge TXT is left (checked by query)."""
    inv = load(tmp_path, inventory_text(pdns_lab, [{"name": "pdns.test", "domains": ["pdns.test", "*.pdns.test"],
                                                    "dns": "pd"}], extra_dns=pdns_dns(pdns_lab)))
    [out] = run_renew(inv, store)
    assert out.status == "renewed", out.error
    assert dns_audit(store) == [("dns published", PDNS_ZONE, "pd"), ("dns removed", PDNS_ZONE, "pd")]
    assert pdns_txt(pdns_lab, f"_acme-challenge.{PDNS_ZONE}") == frozenset()


def test_powerdns_keeps_other_values_of_the_name(pdns_lab: Lab) -> None:
    """present and cleanup touch only our values: a value someone else wrote at the same name stays served."""
    fqdn = f"_acme-challenge.keep.{PDNS_ZONE}"
    put_txt(pdns_lab, fqdn, ["someone-else"])
    prov = build(load_dns(pdns_lab))
    rec = TXTRecord(fqdn=fqdn, zone=PDNS_ZONE, value="ours-1", domain=f"keep.{PDNS_ZONE}")
    [up] = asyncio.run(prov.present([rec]))
    assert up.applied is True and pdns_txt(pdns_lab, fqdn) == {"someone-else", "ours-1"}
    [down] = asyncio.run(prov.cleanup([rec]))
    assert down.applied is True and pdns_txt(pdns_lab, fqdn) == {"someone-else"}
    put_txt(pdns_lab, fqdn, [])


def load_dns(lab: Lab, **kw: Any) -> Any:
    from certmgr import inventory

    text = inventory_text(lab, [{"name": "x", "domains": [f"x.{PDNS_ZONE}"], "dns": "pd"}], extra_dns=pdns_dns(lab, **kw))
    return inventory.loads(text).dns["pd"]


def test_powerdns_concurrent_orders_never_lose_each_other_s_values(pdns_lab: Lab) -> None:
    """Twelve presents for one name at once all end up served; twelve cleanups at once leave nothing."""
    fqdn = f"_acme-challenge.busy.{PDNS_ZONE}"
    prov = build(load_dns(pdns_lab))
    recs = [TXTRecord(fqdn=fqdn, zone=PDNS_ZONE, value=f"value-{i:02d}", domain=f"busy.{PDNS_ZONE}")
            for i in range(12)]

    async def each(action: str) -> list[Any]:
        fn = prov.present if action == "present" else prov.cleanup
        return [u for batch in await asyncio.gather(*(fn([r]) for r in recs)) for u in batch]

    async def both() -> tuple[list[Any], frozenset[str] | None, list[Any]]:
        up = await each("present")
        served = await query_txt("127.0.0.1", pdns_lab.ports.pdns, fqdn)
        return up, served, await each("cleanup")

    up, served, down = asyncio.run(both())
    assert all(u.applied for u in up) and served == {r.value for r in recs}
    assert all(u.applied for u in down)
    assert pdns_txt(pdns_lab, fqdn) == frozenset()


def test_powerdns_wrong_key_fails_clearly_and_writes_nothing(pdns_lab: Lab, store: Store, tmp_path: Path) -> None:
    """An API key PowerDNS refuses fails the renewal with the 401 named, and nothing is in DNS (checked by query)."""
    bad = tmp_path / "bad-key"
    bad.write_text("not-the-key\n")
    inv = load(tmp_path, inventory_text(pdns_lab, [{"name": "k.pdns.test", "domains": ["k.pdns.test"], "dns": "pd"}],
                                        extra_dns=pdns_dns(pdns_lab, key_file=bad)))
    [out] = run_renew(inv, store)
    assert out.status == "failed"
    assert out.error == (f"dns present {PDNS_ZONE} via {pdns_lab.powerdns.api_url}: the API refused the key "
                         "(HTTP 401) (TXT not written)")
    assert pdns_txt(pdns_lab, f"_acme-challenge.k.{PDNS_ZONE}") == frozenset()


def test_powerdns_partial_success_across_zones_is_cleaned_up(pdns_lab: Lab, store: Store, tmp_path: Path) -> None:
    """One zone written, another refused (404: not on the server): the renewal fails naming the 404, the
    written zone's TXT is removed again, and nothing is left in DNS (checked by query)."""
    inv = load(tmp_path, inventory_text(
        pdns_lab, [{"name": "two.pdns.test", "domains": ["two.pdns.test", "x.missing.test"], "dns": "pd"}],
        extra_dns=pdns_dns(pdns_lab, zones=(PDNS_ZONE, "missing.test"))))
    [out] = run_renew(inv, store)
    assert out.status == "failed"
    assert out.error == (f"dns present missing.test via {pdns_lab.powerdns.api_url}: HTTP 404 — no zone missing.test "
                         "on server 'localhost' (TXT not written)")
    assert pdns_txt(pdns_lab, f"_acme-challenge.two.{PDNS_ZONE}") == frozenset()
    assert journal_mod.read(store) == []  # the server confirmed the removal: nothing left to retry


def test_powerdns_api_down_fails_before_writing(pdns_lab: Lab) -> None:
    """A refused connection to the API is a per-zone result (nothing written), never an exception."""
    prov = build(load_dns(pdns_lab))
    prov.conf = type(prov.conf)(api_url="http://127.0.0.1:9", api_key=prov.conf.api_key, timeout=2.0)
    [u] = asyncio.run(prov.present([TXTRecord(fqdn=f"_acme-challenge.d.{PDNS_ZONE}", zone=PDNS_ZONE, value="v",
                                              domain=f"d.{PDNS_ZONE}")]))
    assert u.applied is False and u.error is not None and not isinstance(u.error, DNSAuthError)
    assert u.error.message.startswith(f"dns present {PDNS_ZONE} via http://127.0.0.1:9: cannot connect to "
                                      "http://127.0.0.1:9: ")


def test_doctor_diagnoses_powerdns_and_exec(pdns_lab: Lab, tmp_path: Path) -> None:
    """doctor asks each provider's diagnose(): the API accepts the key and has the zone; the hook is executable;
    every listed nameserver answers; a wrong key is a failed `api` check naming the 401."""
    bad = tmp_path / "bad-key"
    bad.write_text("not-the-key\n")
    text = inventory_text(pdns_lab, [{"name": "x.pdns.test", "domains": ["x.pdns.test"], "dns": "pd"}],
                          extra_dns=pdns_dns(pdns_lab) + pdns_dns(pdns_lab, name="bad", key_file=bad)
                          + exec_dns(pdns_lab))
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    Store.open(tmp_path / "state")
    result = CliRunner().invoke(main, ["--inventory", str(path), "--state-dir", str(tmp_path / "state"), "doctor",
                                       "--json"])
    report = json.loads(result.output)
    rows = {(c["name"], c["subject"]): (c["status"], c["message"]) for c in report["checks"]}
    assert rows[("api", f"dns.pd {PDNS_ZONE}")] == (
        "ok", f"{pdns_lab.powerdns.api_url} accepts the key; server 'localhost' has zone {PDNS_ZONE}")
    assert rows[("api", f"dns.bad {PDNS_ZONE}")] == (
        "fail", f"GET zone {PDNS_ZONE}: the API refused the key (HTTP 401)")
    assert rows[("nameservers", f"dns.pd {PDNS_ZONE}")][0] == "ok"
    assert rows[("program", "dns.hook hachyderm.test")] == (
        "ok", f"{HOOK} is executable (default mode, 1 secret(s) readable); whether it can change hachyderm.test "
              "shows only on a run")
    assert rows[("nameservers", "dns.hook hachyderm.test")][0] == "ok"
    assert pdns_lab.powerdns.api_key() not in result.output


# ---------------------------------------------------------------- exec (lego's contract, nsupdate to bind9)


@pytest.mark.parametrize("mode", ["default", "raw"])
def test_exec_hook_renews_through_nsupdate(lab: Lab, store: Store, tmp_path: Path, mode: str) -> None:
    """A lego-style hook script (nsupdate to the lab's bind9) issues a certificate in default and raw mode,
    and no challenge TXT is left (checked by query)."""
    name = f"n04{'1' if mode == 'raw' else '0'}.hachyderm.test"
    inv = load(tmp_path, inventory_text(lab, [{"name": name, "domains": [name], "dns": "hook"}],
                                        extra_dns=exec_dns(lab, mode=mode)))
    [out] = run_renew(inv, store)
    assert out.status == "renewed", out.error
    assert dns_audit(store) == [("dns published", "hachyderm.test", "hook"), ("dns removed", "hachyderm.test", "hook")]
    assert bind_txt(lab, f"_acme-challenge.{name}") == frozenset()


def test_exec_hook_failing_after_its_update_is_cleaned_up(lab: Lab, store: Store, tmp_path: Path) -> None:
    """A hook that writes the TXT, prints the secret and exits 1: the renewal fails with its (masked) output,
    cleanup is attempted, and nothing is left in DNS (checked by query)."""
    name = "n043.hachyderm.test"
    secret = (lab.dns_dir / "certmgr-lab.key").read_text().strip()
    env = 'HOOK_PRINT_SECRET = "1"\nHOOK_FAIL_ON = "present"\n'
    hook = tmp_path / "failing-hook"
    # fail only on present: the cleanup that follows must still succeed and remove the value
    hook.write_text(f'#!/bin/sh\nif [ "$1" = present ]; then HOOK_FAIL_AFTER=1; export HOOK_FAIL_AFTER; fi\n'
                    f'exec {HOOK} "$@"\n')
    hook.chmod(0o755)
    inv = load(tmp_path, inventory_text(lab, [{"name": name, "domains": [name], "dns": "hook"}],
                                        extra_dns=exec_dns(lab, extra_env=env).replace(str(HOOK), str(hook))))
    [out] = run_renew(inv, store)
    assert out.status == "failed"
    assert out.error == (f"dns present _acme-challenge.{name} via failing-hook: exited with status 1: debug: using key "
                         "*** | hook: failing after the update (TXT may have been written; it is removed again)")
    assert secret not in (out.error or "")
    assert bind_txt(lab, f"_acme-challenge.{name}") == frozenset()


class FaultProxy:
    """Loopback HTTP proxy in front of the lab's PowerDNS API that breaks the next PATCH's answer on purpose:
    "500" forwards it (PowerDNS applies it) and answers 500; "hang" forwards it and never answers; "403"
    answers 403 without forwarding. Later requests pass through."""

    def __init__(self, lab: Lab) -> None:
        import threading
        import urllib.error
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode = ""
        self.release = threading.Event()
        upstream = lab.powerdns.api_url
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))) or None
                mode = proxy.mode if method == "PATCH" else ""
                if mode:
                    proxy.mode = ""
                if mode == "403":
                    return self._send(403, b'{"error": "Forbidden"}')
                req = urllib.request.Request(upstream + self.path, data=body, method=method,
                                             headers={"X-API-Key": self.headers.get("X-API-Key", ""),
                                                      "Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:  # loopback, the lab's own API
                        status, data = resp.status, resp.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                if mode == "500":
                    return self._send(500, b'{"error": "injected after the write"}')
                if mode == "hang":
                    proxy.release.wait(30)
                    return None
                return self._send(status, data)

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._relay("GET")

            def do_PATCH(self) -> None:
                self._relay("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(pdns_lab: Lab) -> Iterator[FaultProxy]:
    proxy = FaultProxy(pdns_lab)
    yield proxy
    proxy.close()


@pytest.mark.parametrize(("mode", "cause", "outcome"), [
    ("500", 'HTTP 500: "injected after the write"', "(TXT may have been written; it is removed again)"),
    ("hang", "no answer from {url} within 2s", "(TXT may have been written; it is removed again)"),
    ("403", "the API refused the key (HTTP 403)", "(TXT not written)"),
])
def test_powerdns_write_answer_lost_is_cleaned_up(pdns_lab: Lab, fault_proxy: FaultProxy, store: Store,
                                                  tmp_path: Path, mode: str, cause: str, outcome: str) -> None:
    """A PATCH that PowerDNS applied but whose answer is a 500 or never comes (or a 403 before it): the renewal
    fails with that cause, cleanup removes the value, the journal is empty and nothing is left (by query)."""
    fault_proxy.mode = mode
    name = f"lost-{mode}.{PDNS_ZONE}"
    dns = pdns_dns(pdns_lab, timeout="2s").replace(pdns_lab.powerdns.api_url, fault_proxy.url)
    inv = load(tmp_path, inventory_text(pdns_lab, [{"name": name, "domains": [name], "dns": "pd"}], extra_dns=dns))
    [out] = run_renew(inv, store)
    assert out.status == "failed"
    assert out.error == f"dns present {PDNS_ZONE} via {fault_proxy.url}: {cause.format(url=fault_proxy.url)} {outcome}"
    fault_proxy.release.set()
    assert pdns_txt(pdns_lab, f"_acme-challenge.{name}") == frozenset()
    assert journal_mod.read(store) == []


def test_exec_partial_success_across_zones(lab: Lab, store: Store, tmp_path: Path) -> None:
    """One hook for two zones, the second refusing its key (nsupdate fails): the renewal fails naming that
    record, the first zone's value is removed again, and nothing is left in either zone (checked by query)."""
    name, other = "n044.hachyderm.test", "x.challenges.test"
    dns = exec_dns(lab).replace('zones = ["hachyderm.test"]', 'zones = ["hachyderm.test", "challenges.test"]')
    inv = load(tmp_path, inventory_text(lab, [{"name": name, "domains": [name, other], "dns": "hook"}],
                                        extra_dns=dns))
    [out] = run_renew(inv, store)
    assert out.status == "failed"
    assert out.error is not None and out.error.startswith(
        f"dns present _acme-challenge.{other} via nsupdate-hook: exited with status 2: ")
    assert out.error.endswith("(TXT may have been written; it is removed again)")
    assert bind_txt(lab, f"_acme-challenge.{name}") == frozenset()
    assert bind_txt(lab, f"_acme-challenge.{other}") == frozenset()
    # the refused zone's value stays journaled: a hook cannot say it never wrote it (the next run retries it)
    assert [(e.zone, e.fqdn) for e in journal_mod.read(store)] == [("challenges.test", f"_acme-challenge.{other}")]
