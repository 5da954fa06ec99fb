"""A small HTTPS responder in front of the lab's real Pebble adding what Pebble 2.4 lacks: ARI and profiles.

Pebble from Debian (2.4.0) has neither `renewalInfo` (RFC 9773) nor `meta.profiles`. This proxy forwards
every request to Pebble unchanged, keeping the `Host` header so Pebble builds its URLs (and checks JWS
`url`s) against the proxy's address; it adds `renewalInfo` and `meta.profiles` to the directory, serves
renewal windows set by the test, and looks at newOrder payloads to record `replaces`/`profile` and to
answer 409 `alreadyReplaced` for a certificate already replaced — the parts a CA would enforce.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.helpers import forward, https_server, reply

PROFILES = {
    "classic": "The same profile you're accustomed to",
    "tlsserver": "Certificates for TLS servers only",
    "shortlived": "Six-day certificates",
}


@dataclass
class Window:
    start: dt.datetime
    end: dt.datetime
    retry_after: int = 3600
    explanation_url: str | None = "https://ca.example/incident/1"


@dataclass
class ProxyState:
    """What the test sets (windows) and what the proxy saw (orders)."""

    default_window: Window | None = None
    windows: dict[str, Window] = field(default_factory=dict)  # certID → window
    replaced: set[str] = field(default_factory=set)  # certIDs already replaced (→ 409 alreadyReplaced)
    orders: list[dict[str, Any]] = field(default_factory=list)  # newOrder payloads seen
    renewal_info_requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _b64decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ARIProxy:
    """`with ARIProxy.running(...) as proxy:` — `proxy.directory` is the URL to give certmgr."""

    def __init__(self, upstream_port: int, cert: Path, key: Path, ca: Path) -> None:
        self.upstream_port = upstream_port
        self.state = ProxyState()
        self._upstream_ctx = ssl.create_default_context(cafile=str(ca))
        self.server, self._thread = https_server(self._handle, cert, key, name="ariproxy")
        self.port = self.server.server_address[1]
        self.directory = f"https://127.0.0.1:{self.port}/dir"

    @classmethod
    @contextmanager
    def running(cls, upstream_port: int, cert: Path, key: Path, ca: Path) -> Iterator[ARIProxy]:
        proxy = cls(upstream_port, cert, key, ca)
        proxy._thread.start()
        try:
            yield proxy
        finally:
            proxy.server.shutdown()
            proxy.server.server_close()

    # ------------------------------------------------------------ request handling

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        if h.command == "GET" and path.startswith("/renewal-info/"):
            return self._renewal_info(h, path.removeprefix("/renewal-info/"))
        if h.command == "POST" and path == "/order-plz":
            refusal = self._inspect_order(body)
            if refusal is not None:
                return reply(h, *refusal)
        status, headers, data = forward(h, body, self.upstream_port, self._upstream_ctx)
        if h.command == "GET" and path == "/dir" and status == 200:
            directory = json.loads(data)
            directory["renewalInfo"] = f"https://{h.headers['Host']}/renewal-info"
            directory.setdefault("meta", {})["profiles"] = PROFILES
            data = json.dumps(directory).encode()
        if h.command == "POST" and path == "/order-plz" and status == 201:
            with self.state.lock:
                replaces = self.state.orders[-1].get("replaces")
                if replaces:
                    self.state.replaced.add(replaces)
        reply(h, status, headers, data)

    def _inspect_order(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        jws = json.loads(body)
        payload = json.loads(_b64decode(jws["payload"])) if jws.get("payload") else {}
        with self.state.lock:
            self.state.orders.append(payload)
            replaces = payload.get("replaces")
            profile = payload.get("profile")
            if replaces and replaces in self.state.replaced:
                return _problem(409, "alreadyReplaced", f"certificate {replaces} has already been replaced")
        if profile and profile not in PROFILES:
            return _problem(400, "invalidProfile", f"profile {profile!r} is not offered")
        return None

    def _renewal_info(self, h: BaseHTTPRequestHandler, cert_id: str) -> None:
        with self.state.lock:
            self.state.renewal_info_requests.append(cert_id)
            window = self.state.windows.get(cert_id, self.state.default_window)
        if window is None:
            return reply(h, *_problem(404, "malformed", "no such certificate"))
        doc: dict[str, Any] = {"suggestedWindow": {"start": _iso(window.start), "end": _iso(window.end)}}
        if window.explanation_url:
            doc["explanationURL"] = window.explanation_url
        reply(h, 200, [("Content-Type", "application/json"), ("Retry-After", str(window.retry_after))],
                   json.dumps(doc).encode())


def _problem(status: int, typ: str, detail: str) -> tuple[int, list[tuple[str, str]], bytes]:
    doc = {"type": f"urn:ietf:params:acme:error:{typ}", "detail": detail, "status": status}
    return status, [("Content-Type", "application/problem+json")], json.dumps(doc).encode()
