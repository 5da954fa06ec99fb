"""The two-controller soak's observer of the database and the POPs' transaction traces; shares no code with certmgr.

It reads what certmgr wrote straight from PostgreSQL with psycopg (the audit rows, the stored
versions' certificates) and each POP's lab-only trace file (`archive/.certmgr-trace`: one line
per transaction `begin|end|fenced holder=H epoch=E pid=P time=T`, appended under the POP's
flock while the file exists), and states the invariants:

- issuances per name (`add_version` audit rows) ≤ the renewals the elapsed time needs + forced
  renewals + the crashes and pauses injected;
- every stored version's serial has its `add_version` audit row;
- never two transactions on one POP at once; the epochs of a POP's transactions never decrease.

Only psycopg, cryptography and the standard library are used, never `certmgr` or `lab` (a test asserts this).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from cryptography import x509

TRACE = "archive/.certmgr-trace"


@dataclass(frozen=True)
class Stored:
    name: str
    version: int
    serial: str  # lower-case hex without padding


def read_database(conninfo: str, password: str) -> tuple[list[dict[str, Any]], list[Stored]]:
    """(audit entries in insertion order, stored versions) read with a plain psycopg connection."""
    with psycopg.connect(conninfo, password=password, autocommit=True, connect_timeout=10) as conn:
        audit = [r[0] for r in conn.execute("SELECT entry FROM certmgr_audit ORDER BY id") if isinstance(r[0], dict)]
        stored = []
        for name, version, cert in conn.execute("SELECT name, version, cert FROM certmgr_versions ORDER BY name, version"):
            leaf = x509.load_pem_x509_certificates(bytes(cert))[0]
            stored.append(Stored(name, int(version), f"{leaf.serial_number:x}"))
    return audit, stored


def hexserial(value: object) -> str:
    """A serial in one form whatever the writer's (`0A:1B`, `0A1B`, `a1b`)."""
    try:
        return format(int(str(value).replace(":", ""), 16), "x")
    except ValueError:
        return str(value)


def issuances(audit: Iterable[dict[str, Any]]) -> Counter[str]:
    """Certificates issued and stored, per name: one `add_version` audit row each."""
    return Counter(str(e.get("object")) for e in audit if e.get("action") == "add_version")


def renewals_needed(elapsed: float, lifetime: float, earliest_left: float) -> int:
    """Most renewals a name can need in `elapsed` seconds: the first (the seed certificate is due at once), then one
    each time a certificate reaches its earliest renewal point (`earliest_left` of its lifetime left)."""
    return 1 + math.floor(elapsed / ((1 - earliest_left) * lifetime))


def unaudited_versions(audit: Iterable[dict[str, Any]], stored: Iterable[Stored]) -> list[Stored]:
    """Stored versions without an `add_version` audit row naming their serial."""
    audited = {(str(e.get("object")), hexserial(e.get("serial"))) for e in audit if e.get("action") == "add_version"}
    return [s for s in stored if (s.name, s.serial) not in audited]


@dataclass(frozen=True)
class TraceLine:
    word: str  # begin | end | fenced
    holder: str
    epoch: int | None
    pid: int
    time: str


def read_trace(cert_root: Path) -> list[TraceLine] | None:
    """A POP's trace (None: no trace file); a line that does not parse is kept as word '?'."""
    try:
        text = (cert_root / TRACE).read_text()
    except FileNotFoundError:
        return None
    out = []
    for raw in text.splitlines():
        word, *fields = raw.split() or [""]
        kv = dict(f.split("=", 1) for f in fields if "=" in f)
        try:
            out.append(TraceLine(word, kv.get("holder", ""), int(kv["epoch"]) if kv.get("epoch") else None,
                                 int(kv.get("pid", "0")), kv.get("time", "")))
        except ValueError:
            out.append(TraceLine("?", raw, None, 0, ""))
    return out


def trace_violations(lines: list[TraceLine]) -> list[str]:
    """What one POP's trace shows against: one transaction at a time (a `begin` is followed by its own `end`
    before the next `begin`), and the epochs of the transactions the POP accepted never decrease."""
    bad: list[str] = []
    open_: TraceLine | None = None
    last: TraceLine | None = None
    for i, ln in enumerate(lines, 1):
        if ln.word == "begin":
            if open_ is not None:
                bad.append(f"line {i}: {ln.holder} (epoch {ln.epoch}) began while {open_.holder} "
                           f"(epoch {open_.epoch}, since {open_.time}) had not ended")
            open_ = ln
            if ln.epoch is not None:
                if last is not None and last.epoch is not None and ln.epoch < last.epoch:
                    bad.append(f"line {i}: epoch {ln.epoch} from {ln.holder} accepted after epoch {last.epoch} "
                               f"from {last.holder}")
                last = ln
        elif ln.word == "end":
            if open_ is None or open_.pid != ln.pid:
                bad.append(f"line {i}: end of pid {ln.pid} ({ln.holder}) without its begin")
            open_ = None
        elif ln.word != "fenced":
            bad.append(f"line {i}: unreadable trace line {ln.holder!r}")
    return bad
