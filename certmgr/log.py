"""Logging: one event per line as key=value, journald-friendly, with secrets redacted.

Secrets are wrapped in `Secret` (whose str/repr is `***`); every secret value
read at run time is also registered so that a stray formatting of the raw value
is masked by the handler's filter before it is written.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from certmgr import sanitize

_REDACT: set[str] = set()
_LOCK = threading.Lock()


class Secret:
    """A secret string that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def register_secret(value: str) -> None:
    """Mask `value` in every log line from now on (values shorter than 6 chars are not worth masking)."""
    if value and len(value) >= 6:
        with _LOCK:
            _REDACT.add(value)


def redact(text: str) -> str:
    with _LOCK:
        secrets = sorted(_REDACT, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def _fmt_value(value: Any) -> str:
    # One event per line whatever a value holds: newlines, ESC and other controls (a peer's text,
    # a traceback) are escaped, so a log line can neither be forged nor drive a terminal.
    s = str(value)
    if s == "" or not s.isprintable() or any(c in s for c in ' "='):
        return '"' + sanitize.line(s.replace("\\", "\\\\").replace('"', '\\"'), limit=None) + '"'
    return s


class KVFormatter(logging.Formatter):
    """`level=info event=renewed cert=media.hachyderm.io serial=…` — one line per event."""

    def __init__(self, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.timestamps:
            parts.append("time=" + self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        parts.append(f"msg={_fmt_value(record.getMessage())}")
        for key, value in getattr(record, "kv", {}).items():
            parts.append(f"{key}={_fmt_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + _fmt_value(self.formatException(record.exc_info))
        return redact(line)


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return True  # redaction happens in the formatter so every handler gets it


def setup(verbosity: int = 0, *, stream: Any = None, timestamps: bool | None = None) -> None:
    """Configure the root logger: WARNING by default, INFO with -v, DEBUG with -vv; ERROR with -q."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    if verbosity < -1:
        level = logging.CRITICAL
    handler = logging.StreamHandler(stream or sys.stderr)
    if timestamps is None:
        # journald stamps lines itself; JOURNAL_STREAM is set when stderr goes there
        import os

        timestamps = "JOURNAL_STREAM" not in os.environ
    handler.setFormatter(KVFormatter(timestamps=timestamps))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_certmgr", False):
            root.removeHandler(h)
    handler._certmgr = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # certbot's acme logs whole request bodies at DEBUG (nonces, JWS, CSRs): keep it quiet.
    logging.getLogger("acme").setLevel(logging.WARNING)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def event(logger: logging.Logger, level: int, msg: str, **kv: Any) -> None:
    """Log one structured event: `event(log, logging.INFO, "renewed", cert=name, serial=s)`."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"kv": kv})
