"""Foreign text (nginx output, file and server names from a host) made safe to print: bounded, no control chars.

TODO(unify): another change adds certmgr/sanitize.py for the same job; use it here once both are merged.
"""

from __future__ import annotations


def clean(text: str, limit: int = 500) -> str:
    """`text` with control and other non-printable characters escaped (\\n, \\x1b, …), cut to `limit` chars."""
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 1] + "…"
