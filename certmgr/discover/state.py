"""The last discover result in the store (`state/discover.json`), and what `certmgr scan` takes from it.

Only plain data crosses here: scan turns `UnmanagedSeen` into its own results (it imports this
module, never the other way round).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from certmgr import docmerge
from certmgr.discover.model import Report
from certmgr.discover.render import to_json
from certmgr.material import CertInfo

STATE_PATH = "state/discover.json"


class _Store(Protocol):
    def save_json(self, relpath: str, obj: Any, mode: int = ...) -> None: ...
    def load_json(self, relpath: str, default: Any = None) -> Any: ...


def save(store: _Store, report: Report) -> None:
    """Replace the last discover result (atomic, via the store; raises StoreError) — unless the stored one is
    newer (`discover` takes no lock: another controller's later run stands; certmgr.docmerge)."""
    docmerge.merge_json(store, STATE_PATH, to_json(report), "discover")


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmanagedSeen:
    """An unmanaged certificate the last discover saw served, with where."""

    info: CertInfo
    names: tuple[str, ...]
    hosts: tuple[str, ...]
    files: tuple[str, ...]
    where: tuple[tuple[str, str], ...]  # (host, file)
    discovered_at: str


def unmanaged(store: _Store | None) -> list[UnmanagedSeen]:
    """The unmanaged certificates of the last discover (none when never run or unreadable)."""
    if store is None:
        return []
    try:
        data = store.load_json(STATE_PATH, default=None)
    except Exception:  # a broken state file must never stop a scan; the next discover rewrites it
        return []
    if not isinstance(data, dict) or data.get("schema") != 1:
        return []
    out = []
    for u in data.get("unmanaged", []):
        try:
            info = CertInfo.from_cert(x509.load_pem_x509_certificate(str(u["leaf_pem"]).encode()))
            out.append(UnmanagedSeen(info=info, names=tuple(map(str, u["served_names"])),
                                     hosts=tuple(map(str, u["hosts"])), files=tuple(map(str, u["files"])),
                                     where=tuple((str(w["host"]), str(w["file"])) for w in u.get("where", [])),
                                     discovered_at=str(data.get("discovered_at", "?"))))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def age(discovered_at: str, now: dt.datetime) -> str:
    try:
        seconds = (now - dt.datetime.fromisoformat(discovered_at)).total_seconds()
    except (TypeError, ValueError):
        return "at an unknown time"
    return f"{seconds / 86400:.1f} days ago" if seconds >= 86400 else f"{seconds / 3600:.1f} hours ago"
