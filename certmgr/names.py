"""DNS names, addresses and URLs the inventory accepts: pure rules, each returning why a value is refused."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from certmgr import sanitize

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def dns_name_problem(name: object, *, wildcard_ok: bool = True) -> str | None:
    """Why `name` is not an acceptable DNS name, or None.

    Accepts IDNA (converted names must already be in A-label form to avoid
    confusables: a U-label is rejected with its punycode spelled out).
    """
    if not isinstance(name, str):
        return f"must be a string, not {type_name(name)}"
    if not name:
        return "empty DNS name"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in ".-*_"))})
    if bad:
        if all(not c.isascii() for c in bad):
            try:
                alabel = name.encode("idna").decode()
            except UnicodeError:
                return f"{name!r} is not a valid internationalised name"
            return f"{name!r} contains non-ASCII characters; write the A-label form {alabel!r}"
        shown = sanitize.line("".join(bad), limit=None)
        return f"{name!r} contains characters not allowed in a DNS name: '{shown}'"
    if name != name.lower():
        return f"{name!r} must be lower case"
    if name.endswith("."):
        return f"{name!r} must not end with a dot"
    if len(name) > 253:
        return f"{name!r} is longer than 253 characters"
    if is_ip(name):
        return f"{name!r} is an IP address, not a DNS name"
    labels = name.split(".")
    if len(labels) < 2:
        return f"{name!r} is not a fully qualified name"
    if labels[-1].isdigit():
        return f"{name!r}: the last label must not be all digits (it would read as an IP address)"
    for i, label in enumerate(labels):
        if label == "*":
            if i != 0 or not wildcard_ok:
                return f"{name!r}: a wildcard is only allowed as the leftmost label"
            continue
        if "*" in label:
            return f"{name!r}: '*' must be a whole label"
        if not label:
            return f"{name!r} has an empty label"
        if "_" in label:
            return f"{name!r}: label {label!r} contains '_'"
        if not _LABEL.fullmatch(label):
            if len(label) > 63:
                return f"{name!r}: label {label[:20]!r}… is longer than 63 characters"
            return f"{name!r}: label {label!r} must not start or end with '-'"
        if label.startswith("xn--"):
            try:
                label.encode().decode("idna")
            except UnicodeError:
                return f"{name!r}: label {label!r} is not valid punycode"
    return None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a chat endpoint, or None; never quotes the URL (webhook URLs are secrets).

    https:// anywhere; http:// only to a loopback address, where nothing crosses a network in clear.
    """
    if any(not c.isprintable() or c.isspace() for c in url):
        return "contains a space or control character"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 — raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an https:// URL"
    if parts.scheme == "http" and not _loopback(host):
        return "is http:// to a host that is not loopback: use https:// (the token or URL would cross the " \
               "network in clear text)"
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def ip_or_hostname_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    problem = dns_name_problem(value, wildcard_ok=False)
    if problem and value in ("localhost",):
        return None
    return problem


def type_name(value: object) -> str:
    """How an error names a TOML value's type: "a string", "an integer", "an array", "a table"…"""
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def split_server(value: str, default_port: int) -> tuple[str, int] | None:
    """`ADDRESS`, `ADDRESS:PORT` or `[IPv6]:PORT` → (address, port); None when it is none of those."""
    if is_ip(value):
        return value, default_port
    m = re.fullmatch(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p6>\d{1,5})|(?P<v4>[0-9.]+):(?P<p4>\d{1,5})", value)
    if m is None:
        return None
    addr, port = (m.group("v6"), m.group("p6")) if m.group("v6") else (m.group("v4"), m.group("p4"))
    if not is_ip(addr) or not 1 <= int(port) <= 65535:
        return None
    return addr, int(port)
