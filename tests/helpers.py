"""Small helpers shared by test modules and the test proxies (no fixtures here: see conftest.py)."""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests import inv

# The least an inventory needs besides hosts and certificates: one CA and one DNS provider, never contacted
# (tests/inv.py builds whole inventories; these heads are for text that goes on with hand-written tables).
MINIMAL_CA_DNS = inv.toml(blank=False)


# The lab's CA and DNS provider as an inventory head (the TSIG secret from $X, read only when used).
PEBBLE_LAB_HEAD = inv.toml(ca={"pebble": {"directory": "https://127.0.0.1:14000/dir", "agree_tos": True}},
                           dns={"lab": {"type": "rfc2136", "zones": ["hachyderm.test"], "server": "127.0.0.1",
                                        "tsig_key": "certmgr-lab", "tsig_secret_env": "X"}})[1:]


def tree_digest(root: Path) -> str:
    """Names, modes, link targets and contents of everything under root: what "changed nothing" means."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(dirs + files):
            p = Path(d) / n
            st = os.lstat(p)
            h.update(f"{p.relative_to(root)} {st.st_mode:o}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def forward(h: BaseHTTPRequestHandler, body: bytes, port: int,
            ctx: ssl.SSLContext) -> tuple[int, list[tuple[str, str]], bytes]:
    """Pass one request on to the ACME server at 127.0.0.1:port; its status, headers and body.

    The Host header is kept: Pebble builds its URLs from it and checks each JWS `url` against it.
    """
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "content-length")}
        conn.request(h.command, h.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = [(k, v) for k, v in resp.getheaders()
               if k.lower() not in ("connection", "content-length", "transfer-encoding")]
        return resp.status, out, data
    finally:
        conn.close()


def reply(h: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
    """Answer the client; a client killed meanwhile (the crash tests do that) is not an error."""
    try:
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
    except OSError:
        h.close_connection = True


def https_server(handle: Callable[[BaseHTTPRequestHandler], None], cert: Path, key: Path, *, port: int = 0,
                 name: str = "proxy") -> tuple[ThreadingHTTPServer, threading.Thread]:
    """A TLS HTTP/1.1 server on 127.0.0.1 passing every GET/HEAD/POST to `handle`; start the thread yourself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            handle(self)

        do_HEAD = do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
    return server, thread


def read_pty(master: int) -> bytes:
    """Everything a child wrote to the pseudo-terminal `master` until it closed its side; closes `master`."""
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks)
