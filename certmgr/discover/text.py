"""Foreign text (nginx output, file and server names from a host) made safe to print: the one sanitizer."""

from __future__ import annotations

from certmgr import sanitize


def clean(text: str, limit: int = 500) -> str:
    """`text` as one inert line (certmgr.sanitize.line), cut to `limit` characters."""
    return sanitize.line(text, limit=limit)
