"""Foreign text made inert: one rule for every string certmgr did not write itself.

Foreign text is whatever a peer chose: a CA's error detail, a DNS server's answer or error, a POP's
command output or SSH disconnect reason, the fields of a served certificate, a file name found on
disk. `line` is applied once, where such text enters certmgr, so the terminal, the log, `--json`,
the audit log and chat all carry the same single inert line. Chat services then get their own
markup neutralized (`discord`, `slack`, `matrix_body`, `matrix_html`): `**`, `<b>` and `@everyone`
mean something there and nothing on a terminal.
"""

from __future__ import annotations

import html
import re

LIMIT = 512  # characters of one foreign string shown (an escape counts its full width)
ELLIPSIS = "…"
ZWSP = "\u200b"  # zero-width space: breaks a chat service's pattern without changing what a reader sees

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(c: str) -> str:
    """One character as its visible escape: `\\n`, `\\x1b`, `\\u202e`, `\\U000e0001` (Python's spelling)."""
    if c in _SHORT:
        return _SHORT[c]
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def line(text: str, *, limit: int | None = LIMIT) -> str:
    """`text` as one inert terminal line of at most `limit` characters (the last an ellipsis when cut).

    Every character that `str.isprintable` refuses is shown as its escape: C0 and C1 controls
    (ESC, CR, LF, TAB, DEL, NEL…), format characters (bidi overrides and isolates U+202A–U+202E,
    U+2066–U+2069, zero-width U+200B–U+200F, U+2060, U+FEFF, soft hyphen), line and paragraph
    separators (U+2028, U+2029), non-ASCII spaces, surrogates, private-use and unassigned code
    points. Backslashes stay as they are, so `line(line(s)) == line(s)`: applying it again where
    text is passed on (chat, status) changes nothing. An escape is never cut in half.
    """
    if text.isprintable():
        if limit is None or len(text) <= limit:
            return text
        return text[: max(limit - 1, 0)] + ELLIPSIS
    pieces = [c if c.isprintable() else escape(c) for c in text]
    if limit is None or sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    out: list[str] = []
    used = 0
    for p in pieces:
        if used + len(p) > limit - 1:
            break
        out.append(p)
        used += len(p)
    return "".join(out) + ELLIPSIS


def flat(text: str, *, limit: int | None = LIMIT) -> str:
    """Multi-line foreign output (`nginx -t`, a remote script's stderr) as one inert line.

    Runs of whitespace, newlines included, become one space (the line structure of command output
    carries no meaning worth a `\\n` in a one-line error); everything else as `line`.
    """
    return line(" ".join(text.split()), limit=limit)


def quoted(text: str, *, limit: int | None = LIMIT) -> str:
    """`text` as `line` inside double quotes (inner `"` shown as `'`), for error messages."""
    return '"' + line(text, limit=limit).replace('"', "'") + '"'


# ---------------------------------------------------------------- chat markup, per service
#
# The text given here is already inert (`line` per line of the message); these functions only
# take away what each service's renderer would make of it: formatting, links, mentions.

# Discord markdown: a backslash before any of these shows it literally.
_DISCORD_SPECIAL = re.compile(r"([\\*_~`|>#\[\]<])")
# "@everyone", "@here", "<@123>", "<@&role>", "@room", "@channel": a zero-width space after "@"
# stops every service from resolving a mention (discord.py's `escape_mentions` does the same).
_AT = re.compile(r"@(?=\S)")
# Slack mrkdwn has no escape character: a formatting mark only counts at a word boundary, so a
# zero-width space on both sides of a mark that is not inside a word breaks it.
_SLACK_MARK = re.compile(r"(?<![0-9A-Za-z])[*_~`]|[*_~`](?![0-9A-Za-z])")


def _no_mentions(text: str) -> str:
    return _AT.sub("@" + ZWSP, text)


def discord(text: str) -> str:
    """Discord content or embed text: markdown shown literally, no mention resolves."""
    return _no_mentions(_DISCORD_SPECIAL.sub(r"\\\1", text))


def slack(text: str) -> str:
    """Slack mrkdwn: `&`, `<`, `>` as entities (Slack's own rule, which also kills `<!channel>`,
    `<@U…>` and `<url|label>`); `*`, `_`, `~` and backticks at a word boundary fenced with
    zero-width spaces; no `@channel`/`@here`."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _no_mentions(_SLACK_MARK.sub(lambda m: ZWSP + m.group(0) + ZWSP, text))


def matrix_body(text: str) -> str:
    """Matrix plain `body`: no `@room` (nor a user ID) for the legacy body-matching push rules."""
    return _no_mentions(text)


def matrix_html(text: str) -> str:
    """Matrix `formatted_body` (org.matrix.custom.html): every line HTML-escaped, joined with `<br>`."""
    return "<br>".join(html.escape(_no_mentions(part)) for part in text.split("\n"))


__all__ = ["ELLIPSIS", "LIMIT", "ZWSP", "discord", "escape", "flat", "line", "matrix_body", "matrix_html", "quoted",
           "slack"]
