"""One Pebble ACME server: its config, its process, and the roots it makes on every start."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab import pki
from lab.proc import LabError, check_ports_free, ours, pid_alive, read_pid, spawn, stop_tree, tail, wait_until

PEBBLE = "/usr/bin/pebble"
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class Pebble:
    """A Pebble on 127.0.0.1:`acme_port` (management on `management_port`) under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        acme_port: int,
        management_port: int,
        dns_port: int,
        https_cert: Path,
        https_key: Path,
        https_ca: Path,
    ) -> None:
        self.name = root.name
        self.root = root
        self.acme_port = acme_port
        self.management_port = management_port
        self.dns_port = dns_port
        self.https_cert, self.https_key, self.https_ca = https_cert, https_key, https_ca
        self.conf = root / "pebble-config.json"
        self.pidfile = root / "pebble.pid"
        self.log = root / "pebble.log"
        self.roots = root / "roots.pem"
        self.intermediates = root / "intermediates.pem"
        self.state = root / "state.json"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if ours(pid, str(self.conf)) else None

    def start(self, env: Mapping[str, str | None] | None, validity: int,
              eab_keys: Mapping[str, str] | None = None) -> None:
        """Start unless running. `env` goes on top of PEBBLE_VA_NOSLEEP=1; a None value unsets.

        With `eab_keys` ({kid: base64url HMAC key}), External Account Binding is required.
        """
        if self.pid is not None:
            return
        check_ports_free(self.name, [("127.0.0.1", self.acme_port, "tcp"), ("127.0.0.1", self.management_port, "tcp")])
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.acme_port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.https_cert),
                "privateKey": str(self.https_key),
                # Targets of HTTP-01/TLS-ALPN-01 checks; the lab uses DNS-01, and every lab
                # name resolves (through the lab DNS) to loopback anyway.
                "httpPort": 5002,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": bool(eab_keys),
                "externalAccountMACKeys": dict(eab_keys or {}),
                "certificateValidityPeriod": validity,
            }
        }
        pki.write_file(self.conf, json.dumps(config, indent=2).encode())
        # A minimal environment: stray PEBBLE_* knobs in the caller's shell must not leak in.
        merged: dict[str, str | None] = {"PATH": SAFE_PATH, "PEBBLE_VA_NOSLEEP": "1", **(env or {})}
        clean = {k: v for k, v in merged.items() if v is not None}
        argv = [PEBBLE, "-config", str(self.conf), "-dnsserver", f"127.0.0.1:{self.dns_port}"]
        pid = spawn(argv, log=self.log, env=clean)
        self.pidfile.write_text(f"{pid}\n")
        ctx = ssl.create_default_context(cafile=str(self.https_ca))

        where = f"127.0.0.1:{self.acme_port} and :{self.management_port}"

        def ready() -> bool:
            if not pid_alive(pid):
                raise LabError(f"{self.name} exited during startup ({where}); log {self.log}:\n{tail(self.log)}")
            return https_get(self.directory, ctx) is not None and https_get(self._mgmt("/roots/0"), ctx) is not None

        try:
            if not wait_until(ready, 20.0, 0.05):
                raise LabError(f"{self.name} did not answer on {where} within 20s; log {self.log}:\n{tail(self.log)}")
            self._fetch_roots(ctx)
        except LabError:
            stop_tree(pid, str(self.conf))  # never leave a half-started daemon for `up` to skip
            raise
        shown = {k: v for k, v in clean.items() if k.startswith("PEBBLE_")}
        pki.write_file(self.state, json.dumps({"env": shown, "validity": validity}).encode())

    def _mgmt(self, path: str) -> str:
        return f"https://127.0.0.1:{self.management_port}{path}"

    def _fetch_roots(self, ctx: ssl.SSLContext) -> None:
        """Pebble makes a new hierarchy on every start: save its roots and intermediates afresh.

        Roots (trust anchors) and intermediates go to separate files, so a served chain
        missing its intermediate still fails verification against `roots.pem`.
        """
        for kind, dest in (("roots", self.roots), ("intermediates", self.intermediates)):
            pems: list[bytes] = []
            for i in range(64):  # /roots/1… exist only with PEBBLE_ALTERNATE_ROOTS
                body = https_get(self._mgmt(f"/{kind}/{i}"), ctx)
                if body is None:
                    break
                pems.append(body.strip() + b"\n")
            if kind == "roots" and not pems:
                raise LabError(f"{self.name}: management port {self.management_port} served no /roots/0")
            pki.write_file(dest, b"".join(pems))

    def stop(self) -> list[int]:
        pid = read_pid(self.pidfile)
        stopped = stop_tree(pid, str(self.conf)) if pid is not None else []
        self.pidfile.unlink(missing_ok=True)
        return stopped

    def info(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state.read_text())
        except (OSError, ValueError):
            state = {}
        return {
            "directory": self.directory,
            "management": self._mgmt(""),
            "acme_port": self.acme_port,
            "management_port": self.management_port,
            "pid": self.pid,
            "config": str(self.conf),
            "log": str(self.log),
            "roots": str(self.roots),
            "intermediates": str(self.intermediates),
            "https_ca": str(self.https_ca),
            "env": state.get("env", {}),
            "validity": state.get("validity"),
        }


def https_get(url: str, ctx: ssl.SSLContext) -> bytes | None:
    """GET over verified HTTPS on loopback; None on 404 or while the server is not up."""
    # An empty ProxyHandler: an http(s)_proxy in the environment must never see lab traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(url, timeout=2) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise LabError(f"GET {url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError):
        return None
