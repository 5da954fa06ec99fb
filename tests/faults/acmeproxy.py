"""A fault-injecting HTTPS proxy in front of the lab's real Pebble ACME endpoint.

Every request goes on to Pebble unchanged (the `Host` header is kept, so Pebble builds its URLs
and checks JWS `url`s against the proxy's address) unless a rule says otherwise. Rules are
programmable per request kind (new-order, challenge, finalize, …) and identifier:

* `fail(kind, status, typ, detail, times=N, retry_after=S)` — answer N requests with an ACME
  problem instead of forwarding them (503 + Retry-After, 429 rateLimited, a hostile detail…);
* `hold(kind, after=False|True)` — stop the request before it reaches Pebble (or after Pebble carried it out
  and answered, before the client sees the answer; an error answer is passed on) until `release()`: a test kills certmgr at
  exactly that step (`wait_held()` says when it got there);
* `rewrite_token(token)` — replace every dns-01 challenge token in authorization responses;
* `rewrite_certificate(fn)` — pass every certificate download (the default chain and each
  alternate, `/certZ/<id>/alternate/<n>`) through `fn(path, pem) -> pem`: a CA that issues the wrong thing.
* `slow(kind, seconds, times=N)` — forward N requests only after `seconds` (a CA answering slowly);
  `remove(rule)` takes one rule back (a fault that ends).

It records every request: its kind, the identifiers it concerns (learnt from new-order payloads
and from order/authorization responses), the status the client got and whether it was
forwarded, so tests can count "orders created for media.hachyderm.test" or "accounts created".
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.helpers import forward, https_server, reply

ERR = "urn:ietf:params:acme:error:"

# Pebble 2.4's resource paths → the kind of request (RFC 8555 §7.1 resource names, shortened).
_KINDS = (
    ("/dir", "directory"),
    ("/nonce-plz", "nonce"),
    ("/sign-me-up", "new-account"),
    ("/order-plz", "new-order"),
    ("/authZ/", "authz"),
    ("/chalZ/", "challenge"),
    ("/finalize-order/", "finalize"),
    ("/my-order/", "order"),
    ("/certZ/", "certificate"),
    ("/my-account/", "account"),
    ("/revoke-cert", "revoke"),
)


def kind_of(path: str) -> str:
    for prefix, kind in _KINDS:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return kind
    return "other"


@dataclass(frozen=True)
class Seen:
    """One request as the client experienced it."""

    time: float
    method: str
    path: str
    kind: str
    idents: frozenset[str]
    status: int
    forwarded: bool


@dataclass
class Rule:
    kind: str
    ident: str | None = None  # only requests concerning this identifier
    times: int | None = 1  # None: every matching request
    status: int = 0
    typ: str = ""
    detail: str = ""
    retry_after: str | None = None
    hold: str | None = None  # "before" | "after"
    lost: bool = False  # forward to Pebble first, then answer with the problem (the CA's answer is lost)
    drop: bool = True  # a held request is answered with a closed connection once released
    delay: float = 0.0  # forward (unchanged) only after this many seconds
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    hits: int = 0

    def matches(self, kind: str, idents: frozenset[str]) -> bool:
        if self.kind != kind or (self.times is not None and self.hits >= self.times):
            return False
        return self.ident is None or self.ident in idents


def _b64decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _jws_payload(body: bytes) -> dict[str, Any]:
    try:
        jws = json.loads(body)
        return json.loads(_b64decode(jws["payload"])) if jws.get("payload") else {}
    except (ValueError, KeyError, TypeError):
        return {}


class ACMEProxy:
    """`with ACMEProxy.running(upstream_port, cert, key, ca) as p:` — `p.directory` is certmgr's CA URL."""

    def __init__(self, upstream_port: int, cert: Path, key: Path, ca: Path, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []
        self.token_rewrite: str | None = None
        self.cert_rewrite: Callable[[str, bytes], bytes] | None = None
        self._idents: dict[str, frozenset[str]] = {}  # resource path → identifiers it concerns
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._upstream_ctx = ssl.create_default_context(cafile=str(ca))
        self.server, self._thread = https_server(self._handle, cert, key, port=port, name="acmeproxy")
        self.port = int(self.server.server_address[1])
        self.directory = f"https://127.0.0.1:{self.port}/dir"

    @classmethod
    @contextmanager
    def running(cls, upstream_port: int, cert: Path, key: Path, ca: Path, port: int = 0) -> Iterator[ACMEProxy]:
        proxy = cls(upstream_port, cert, key, ca, port)
        proxy._thread.start()
        try:
            yield proxy
        finally:
            proxy._stopping.set()
            proxy.release()
            proxy.server.shutdown()
            proxy.server.server_close()

    # ------------------------------------------------------------ programming it

    def fail(self, kind: str, status: int, typ: str, detail: str, *, ident: str | None = None,
             times: int | None = 1, retry_after: str | int | None = None, lost: bool = False) -> Rule:
        """Answer the next `times` matching requests with this ACME problem instead of forwarding them.

        With `lost`, the request does reach Pebble (which acts on it) and only its answer is replaced:
        a load balancer's 503 after the CA did the work.
        """
        rule = Rule(kind=kind, ident=ident, times=times, status=status, typ=typ, detail=detail,
                    retry_after=None if retry_after is None else str(retry_after), lost=lost)
        with self._lock:
            self.rules.append(rule)
        return rule

    def hold(self, kind: str, *, ident: str | None = None, after: bool = False, drop: bool = True) -> Rule:
        """Hold the next matching request before Pebble sees it (or, `after`, once Pebble carried it out:
        an error answer such as a random badNonce is passed on and the next request waited for).

        Once released, a held request is dropped (connection closed: the client was killed meanwhile)
        or, with `drop=False`, carried on as if nothing had happened.
        """
        rule = Rule(kind=kind, ident=ident, times=1, hold="after" if after else "before", drop=drop)
        with self._lock:
            self.rules.append(rule)
        return rule

    def slow(self, kind: str, seconds: float, *, ident: str | None = None, times: int | None = 1) -> Rule:
        """Forward the next `times` matching requests unchanged, each only after `seconds`."""
        rule = Rule(kind=kind, ident=ident, times=times, delay=seconds)
        with self._lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Take one rule back (a fault that ends); a request it holds is released."""
        rule.released.set()
        with self._lock:
            self.rules[:] = [r for r in self.rules if r is not rule]

    def rewrite_token(self, token: str) -> None:
        self.token_rewrite = token

    def rewrite_certificate(self, fn: Callable[[str, bytes], bytes]) -> None:
        self.cert_rewrite = fn

    def clear(self) -> None:
        """Drop every rule (releasing held requests) and everything recorded."""
        self.release()
        with self._lock:
            self.rules.clear()
            self.seen.clear()
            self.token_rewrite = None
            self.cert_rewrite = None

    def release(self) -> None:
        with self._lock:
            rules = list(self.rules)
        for r in rules:
            r.released.set()

    @staticmethod
    def wait_held(rule: Rule, timeout: float = 60.0) -> None:
        if not rule.reached.wait(timeout):
            raise AssertionError(f"no {rule.kind} request reached the proxy within {timeout:g}s")

    # ------------------------------------------------------------ what it saw

    def requests(self, kind: str, ident: str | None = None, *, status: int | None = None,
                 forwarded: bool | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.kind == kind and (ident is None or ident in s.idents)
                    and (status is None or s.status == status)
                    and (forwarded is None or s.forwarded == forwarded)]

    def idents_of(self, path: str) -> frozenset[str]:
        """The identifiers a resource path concerns (Pebble's alternate chain `/certZ/<id>/alternate/<n>`: those
        of `/certZ/<id>`)."""
        with self._lock:
            found = self._idents.get(path)
            if found is None and path.startswith("/certZ/"):
                found = self._idents.get("/".join(path.split("/")[:3]))
            return found or frozenset()

    def created(self, kind: str, ident: str | None = None) -> int:
        """How many resources Pebble created (201 responses): orders, accounts."""
        return len(self.requests(kind, ident, status=201))

    def reached_ca(self, kind: str, ident: str | None = None) -> int:
        """How many requests of this kind Pebble itself received (forwarded, whatever it answered)."""
        return len(self.requests(kind, ident, forwarded=True))

    # ------------------------------------------------------------ request handling

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        kind = kind_of(path)
        idents = self._idents_for(kind, path, body)
        rule = None
        with self._lock:
            for r in self.rules:
                if r.matches(kind, idents):
                    r.hits += 1
                    rule = r
                    break
        if rule is not None and rule.delay > 0:
            rule.released.wait(rule.delay)
            rule = None
        if rule is not None and rule.hold == "before":
            rule.reached.set()
            rule.released.wait(120)
            if rule.drop or self._stopping.is_set():
                self._record(h, kind, path, idents, 0, False)
                h.close_connection = True
                return
            rule = None
        if rule is not None and rule.hold is None:
            if rule.lost:
                try:
                    lost_status, lost_headers, lost_data = forward(h, body, self.upstream_port, self._upstream_ctx)
                    self._learn(kind, lost_headers, lost_data, idents)
                except OSError:
                    lost_status = 0
                if lost_status >= 400:
                    # the CA refused this one itself (Pebble's random badNonce, 5 %): nothing happened whose
                    # answer could be lost; pass its own answer on and lose the answer of the next one instead
                    with self._lock:
                        rule.hits -= 1
                    self._record(h, kind, path, idents, lost_status, True)
                    return reply(h, lost_status, lost_headers, lost_data)
            headers = [("Content-Type", "application/problem+json"), ("Cache-Control", "no-store")]
            nonce = self._fresh_nonce()
            if nonce:
                headers.append(("Replay-Nonce", nonce))
            if rule.retry_after is not None:
                headers.append(("Retry-After", rule.retry_after))
            doc = {"type": rule.typ if rule.typ.startswith("urn:") else ERR + rule.typ, "detail": rule.detail,
                   "status": rule.status}
            self._record(h, kind, path, idents, rule.status, rule.lost)
            return reply(h, rule.status, headers, json.dumps(doc).encode())
        try:
            status, headers, data = forward(h, body, self.upstream_port, self._upstream_ctx)
        except OSError:
            self._record(h, kind, path, idents, 0, True)
            h.close_connection = True
            return
        self._learn(kind, headers, data, idents)
        if kind == "authz" and status == 200 and self.token_rewrite is not None:
            data = self._rewrite(data)
        cert_rewrite = self.cert_rewrite
        if kind == "certificate" and status == 200 and cert_rewrite is not None:
            data = cert_rewrite(path, data)
        if rule is not None and rule.hold == "after" and status >= 400:
            # The CA refused this one (Pebble's random badNonce, 5 %): the step did not happen, so it
            # is not the moment to hold. Pass it on and wait for the request that the CA carries out.
            with self._lock:
                rule.hits -= 1
            rule = None
        if rule is not None and rule.hold == "after":
            if rule.drop:  # recorded before anyone is told: the CA did answer, the client never saw it
                self._record(h, kind, path, idents, status, True)
            rule.reached.set()
            rule.released.wait(120)
            if rule.drop or self._stopping.is_set():
                h.close_connection = True
                return
        self._record(h, kind, path, idents, status, True)
        reply(h, status, headers, data)

    def _record(self, h: BaseHTTPRequestHandler, kind: str, path: str, idents: frozenset[str], status: int,
                forwarded: bool) -> None:
        with self._lock:
            self.seen.append(Seen(time.time(), h.command, path, kind, idents, status, forwarded))

    def _idents_for(self, kind: str, path: str, body: bytes) -> frozenset[str]:
        if kind == "new-order":
            payload = _jws_payload(body)
            return frozenset(str(i.get("value")) for i in payload.get("identifiers", []) if isinstance(i, dict))
        with self._lock:
            return self._idents.get(path, frozenset())

    def _learn(self, kind: str, headers: list[tuple[str, str]], data: bytes, idents: frozenset[str]) -> None:
        """Remember which identifiers each order, authorization, challenge and certificate URL concerns."""
        try:
            doc = json.loads(data) if data[:1] == b"{" else {}
        except ValueError:
            return
        found: dict[str, frozenset[str]] = {}

        def path_of(url: str) -> str:
            return re.sub(r"^https://[^/]+", "", url)

        if kind in ("new-order", "order", "finalize") and isinstance(doc, dict):
            ids = frozenset(str(i.get("value")) for i in doc.get("identifiers", []) if isinstance(i, dict)) or idents
            location = dict((k.lower(), v) for k, v in headers).get("location")
            for url in [location, doc.get("finalize"), doc.get("certificate"), *doc.get("authorizations", [])]:
                if isinstance(url, str) and url:
                    found[path_of(url)] = ids
        if kind == "authz" and isinstance(doc, dict):
            ident = doc.get("identifier", {}).get("value")
            if ident:
                for ch in doc.get("challenges", []):
                    if isinstance(ch, dict) and ch.get("url"):
                        found[path_of(ch["url"])] = frozenset([str(ident)])
        if found:
            with self._lock:
                for p, ids in found.items():
                    self._idents[p] = self._idents.get(p, frozenset()) | ids

    def _rewrite(self, data: bytes) -> bytes:
        doc = json.loads(data)
        for ch in doc.get("challenges", []):
            if ch.get("type") == "dns-01":
                ch["token"] = self.token_rewrite
        return json.dumps(doc).encode()

    def _fresh_nonce(self) -> str | None:
        """A real Pebble nonce for an injected error, as a CA's own error responses carry one."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.upstream_port, context=self._upstream_ctx, timeout=10)
        try:
            conn.request("HEAD", "/nonce-plz")
            resp = conn.getresponse()
            resp.read()
            return resp.getheader("Replay-Nonce")
        except OSError:
            return None
        finally:
            conn.close()
