"""The lab's optional PowerDNS Authoritative server (Debian's pdns-server 4.7, sqlite3 backend), on loopback.

It serves `pdns.test` (created through its HTTP API) on P+7 and its API on P+8. Pebble validates
through the lab's bind9 (its `-dnsserver`), which forwards `pdns.test` here: a `type forward` zone in
bind's config (`forwarders { 127.0.0.1 port P+7; }`), so one Pebble validates both bind and PowerDNS zones.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

from lab.proc import LabError, ours, read_pid, spawn, stop_tree, tail, wait_tcp, wait_until

PDNS_SERVER = "/usr/sbin/pdns_server"
SCHEMA = Path("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql")
PDNS_ZONE = "pdns.test"
PDNS_ADDRESS = "127.0.0.1"
SERVER_ID = "localhost"


class PowerDNS:
    """One pdns_server under `dir` (config dir, sqlite database, API key file, log, pid)."""

    def __init__(self, dir: Path, *, dns_port: int, api_port: int) -> None:
        self.dir = dir
        self.dns_port = dns_port
        self.api_port = api_port
        self.conf = dir / "pdns.conf"
        self.db = dir / "pdns.sqlite3"
        self.api_key_file = dir / "api-key"
        self.log = dir / "pdns.log"
        self.pid_file = dir / "pdns_server.pid"

    @property
    def api_url(self) -> str:
        return f"http://{PDNS_ADDRESS}:{self.api_port}"

    @property
    def pid(self) -> int | None:
        pid = read_pid(self.pid_file)
        return pid if ours(pid, str(self.dir)) else None

    def api_key(self) -> str:
        return self.api_key_file.read_text().strip()

    def start(self) -> None:
        """Start pdns_server if it is not running, with `pdns.test` created (idempotent)."""
        if self.pid is not None:
            return
        if not Path(PDNS_SERVER).exists() or not SCHEMA.exists():
            raise LabError(f"missing {PDNS_SERVER} or {SCHEMA}: apt-get install pdns-server pdns-backend-sqlite3")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.api_key_file.exists():
            self.api_key_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.api_key_file.chmod(0o600)
        if not self.db.exists():
            with sqlite3.connect(self.db) as db:
                db.executescript(SCHEMA.read_text())
        # pdns reads <config-dir>/pdns.conf; everything it needs is written here (never /etc/powerdns).
        self.conf.write_text("\n".join([
            "launch=gsqlite3", f"gsqlite3-database={self.db}", f"local-address={PDNS_ADDRESS}",
            f"local-port={self.dns_port}", "api=yes", f"api-key={self.api_key()}", "webserver=yes",
            f"webserver-address={PDNS_ADDRESS}", f"webserver-port={self.api_port}",
            "webserver-allow-from=127.0.0.0/8", f"socket-dir={self.dir}", "daemon=no", "guardian=no",
            "disable-syslog=yes", "loglevel=4", "zone-cache-refresh-interval=0",
            "security-poll-suffix=",  # no security-status query off the machine
            # answers straight from the database, as bind answers after an UPDATE
            "cache-ttl=0", "negquery-cache-ttl=0", "query-cache-ttl=0", "",
        ]))
        self.conf.chmod(0o600)
        pid = spawn([PDNS_SERVER, f"--config-dir={self.dir}"], log=self.log)
        self.pid_file.write_text(f"{pid}\n")
        wait_tcp("pdns_server", PDNS_ADDRESS, self.api_port, pid=pid, log=self.log)
        wait_tcp("pdns_server", PDNS_ADDRESS, self.dns_port, pid=pid, log=self.log)
        self.ensure_zone(PDNS_ZONE)

    def stop(self) -> list[int]:
        pid = self.pid
        return stop_tree(pid, str(self.dir)) if pid is not None else []

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                     headers={"X-API-Key": self.api_key(), "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def ensure_zone(self, zone: str) -> None:
        status, _ = self.request("GET", f"/api/v1/servers/{SERVER_ID}/zones/{zone}.")
        if status == 200:
            return
        status, body = self.request("POST", f"/api/v1/servers/{SERVER_ID}/zones", {
            "name": f"{zone}.", "kind": "Native", "nameservers": [f"ns1.{zone}."],
            "rrsets": [{"name": f"ns1.{zone}.", "type": "A", "ttl": 300, "changetype": "REPLACE",
                        "records": [{"content": PDNS_ADDRESS, "disabled": False}]}]})
        if status != 201:
            raise LabError(f"pdns_server: creating zone {zone} answered {status}: {body}; log {self.log}:\n"
                           f"{tail(self.log)}")
        if not wait_until(lambda: self.request("GET", f"/api/v1/servers/{SERVER_ID}/zones/{zone}.")[0] == 200, 10):
            raise LabError(f"pdns_server: zone {zone} not visible after creation")
