"""A local HTTP chat receiver for tests: records every request, answers from a programmable script.

    with Receiver(port=0) as rx:            # 127.0.0.1, ephemeral port (or the lab's webhook port)
        rx.script(500, 200)                 # first request gets 500, the next 200, then the default
        ... send to rx.url("/discord") ...
        rx.wait_for(2)                      # bounded polling, never a fixed sleep
        rx.requests[0].json

Script entries: an int status, `Reply(status, body, headers)`, or `HANG` (hold the request open
until the receiver stops; clients must time out). Runs in its own thread, so it serves sync and
async tests alike.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG = "hang"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, default: Reply | int = 204) -> None:
        self.host = host
        self._port = port
        self.default = default if isinstance(default, Reply) else Reply(default)
        self.requests: list[Recorded] = []
        self._script: deque[Reply | str] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    receiver.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))
                    step = receiver._script.popleft() if receiver._script else receiver.default
                if step == HANG:
                    receiver._stopping.wait(60)
                    self.close_connection = True
                    return
                assert isinstance(step, Reply)
                self.send_response(step.status)
                for k, v in step.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(step.body)))
                self.end_headers()
                self.wfile.write(step.body)

            do_POST = do_PUT = do_GET = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, *steps: Reply | int | str) -> None:
        """Answer the next requests with these steps, in order; then `default`."""
        with self._lock:
            for s in steps:
                self._script.append(Reply(s) if isinstance(s, int) else s)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._script.clear()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Wait (polling every 10 ms, at most `timeout`) until `n` requests arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.01)
        with self._lock:
            raise AssertionError(f"receiver got {len(self.requests)} requests, wanted {n}")
