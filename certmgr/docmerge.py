"""State documents written without a lock both controllers share, merged into the stored copy, never blindly replaced.

`scan` and `notify` take no lock (a scan must never wait for a renewal), so with two controllers on one
database both may write the same document at once; and a renewal's failure state written after the
database was lost goes to the spool and is replayed later, when the other controller may have written
since. A plain replace would let the older write win. Each such document names a merger instead:

- `notify` (`state/notify/NAME.json`): this run's own changes per channel (an alert sent, or resolved),
  laid over the stored channels; another controller's entries are kept, and a channel entry sent after
  this run's time is never undone by it. Two controllers' runs converge on the same document.
- `scan` (`state/scan/NAME.json`), `discover` (`state/discover.json`), `renew` (`state/renew/NAME.json`): the
  newer observation wins (`scanned_at`, `discovered_at`, `last_attempt`); an older write arriving late changes
  nothing.

`PgStore.merge_json` reads, merges and writes in one transaction under a transaction-scoped advisory lock
on the path (two controllers' merges of one document are serialized); the directory store (one controller)
reads and writes (`merge_json` below). Replaying a merge twice gives the same document.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any, Protocol

# pg_advisory_xact_lock(int4, int4) class for documents: apart from pglocks.KINDS (session locks)
DOC_LOCK_CLASS = 0x43D0010


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()  # a merger's answer when the stored document stands as it is


class JsonStore(Protocol):
    def load_json(self, relpath: str, default: Any = None) -> Any: ...

    def save_json(self, relpath: str, obj: Any, mode: int = ...) -> None: ...


# an ISO 8601 time with its offset, as certmgr writes them (PostgreSQL's timestamptz reads it the same)
ISO_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"


def is_time(value: object) -> bool:
    """An ISO time with an offset that both Python and PostgreSQL compare alike."""
    return isinstance(value, str) and re.match(ISO_RE, value) is not None


def parse_time(value: object) -> dt.datetime | None:
    """A stored ISO timestamp as an aware datetime (naive ones are UTC); None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def notify(stored: Any, delta: Any) -> Any:
    """`delta` = {"at": ISO time of this run, "channels": {channel: entry, or None for resolved}} over `stored`."""
    chans = dict(stored.get("channels") or {}) if isinstance(stored, dict) else {}
    at = parse_time(delta.get("at"))
    for ch, entry in dict(delta.get("channels") or {}).items():
        there = chans.get(ch)
        sent = parse_time(there.get("sent_at")) if isinstance(there, dict) else None
        if sent is not None and at is not None and sent > at:
            continue  # another controller delivered on this channel after this run decided: its entry stands
        if entry is None:
            chans.pop(ch, None)
        else:
            chans[ch] = entry
    out = {"channels": chans}
    return UNCHANGED if isinstance(stored, dict) and stored == out else out


def newer(field: str) -> Callable[[Any, Any], Any]:
    """The document whose `field` (an ISO time) is later wins; `new` on a tie or when either has none."""
    def merge(stored: Any, new: Any) -> Any:
        if isinstance(stored, dict) and isinstance(new, dict):
            a, b = parse_time(stored.get(field)), parse_time(new.get(field))
            if a is not None and b is not None and a > b:
                return UNCHANGED
            if stored == new:
                return UNCHANGED
        return new
    return merge


# mergers where the newer document wins whole, by this field: PgStore does them in one conditional upsert
NEWER_FIELDS = {"scan": "scanned_at", "renew": "last_attempt", "discover": "discovered_at"}

MERGERS: dict[str, Callable[[Any, Any], Any]] = {
    "notify": notify,
    **{name: newer(field) for name, field in NEWER_FIELDS.items()},
}


def apply(merger: str, stored: Any, new: Any) -> Any:
    """The document to store (or UNCHANGED) when `new` is merged into `stored` by `merger`."""
    return MERGERS[merger](stored, new)


def merge_json(store: Any, relpath: str, new: Any, merger: str) -> None:
    """Merge `new` into the document at `relpath`: atomically where the store can (PgStore, and the spooling
    wrapper, which spools the merge when the database is lost), else read, merge, write."""
    own = getattr(store, "merge_json", None)
    if callable(own):
        own(relpath, new, merger)
        return
    doc = apply(merger, store.load_json(relpath, default=None), new)
    if doc is not UNCHANGED:
        store.save_json(relpath, doc)
