"""A stand-in chat service for the demo: records every webhook POST as one JSON line.

    python -m lab.chat --port P+3 --out DIR/chat.jsonl

Only for the lab: it answers 204 to anything on 127.0.0.1 and keeps nothing but the bodies.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.chat", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out: Path = args.out

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                record = json.loads(body)
            except ValueError:
                record = {"raw": body.decode("utf-8", "replace")}
            with out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.send_response(204)
            self.end_headers()

        do_PUT = do_POST

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    print(f"chat: listening on 127.0.0.1:{args.port}, writing {out}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
