"""The DNS journal: every challenge TXT value certmgr wrote and has not yet seen the server remove.

An entry is saved before the UPDATE that adds it (so a kill between send and save still leaves it) and
dropped only when the server confirmed the delete, or refused the add that created it (nothing written).
Every renew run retries what is left first; `status` and `doctor` list it. One file, replaced atomically.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from certmgr.dns import Provider, TXTRecord
from certmgr.errors import StoreError
from certmgr.log import event
from certmgr.store_api import batched

log = logging.getLogger(__name__)

JOURNAL_PATH = "state/dns/journal.json"
LEGACY_DIR = ("state", "renew", "pending")  # before the journal: one list per certificate, no times

Key = tuple[str, str, str]  # (zone, owner name, value), names case-folded: TXTRecord.key


class JournalStore(Protocol):
    def load_json(self, relpath: str, default: Any = None) -> Any: ...

    def save_json(self, relpath: str, obj: Any, mode: int = ...) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One TXT value certmgr wrote (or was about to write) and has not seen removed."""

    zone: str
    fqdn: str  # the owner name, absolute without the trailing dot
    value: str
    provider: str  # the inventory's [dns.NAME] that wrote it
    cert: str  # the certificate whose order wrote it
    domain: str  # the identifier it validates
    first_written: dt.datetime  # when it was first journaled (before the first UPDATE that adds it)
    # the challenge token and key authorization, kept only for providers that need them to clean up (exec, raw)
    token: str | None = None
    key_authorization: str | None = None

    @property
    def key(self) -> Key:
        return self.record().key

    def record(self) -> TXTRecord:
        return TXTRecord(fqdn=self.fqdn, zone=self.zone, value=self.value, domain=self.domain, token=self.token,
                         key_authorization=self.key_authorization)

    def to_json(self) -> dict[str, str]:
        out = {"zone": self.zone, "fqdn": self.fqdn, "value": self.value, "provider": self.provider,
               "cert": self.cert, "domain": self.domain, "first_written": self.first_written.isoformat()}
        if self.token is not None and self.key_authorization is not None:
            out |= {"token": self.token, "key_authorization": self.key_authorization}
        return out

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> Entry:
        try:
            when = dt.datetime.fromisoformat(obj["first_written"])
            return cls(zone=str(obj["zone"]), fqdn=str(obj["fqdn"]), value=str(obj["value"]),
                       provider=str(obj["provider"]), cert=str(obj["cert"]), domain=str(obj.get("domain", "")),
                       first_written=when if when.tzinfo else when.replace(tzinfo=dt.UTC),
                       token=_opt(obj.get("token")), key_authorization=_opt(obj.get("key_authorization")))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"store {where}: an entry is malformed ({type(exc).__name__}: {exc})",
                             hint="the file lists challenge TXT records to remove; fix the entry by hand "
                                  "(zone, fqdn, value, provider, cert, first_written)") from exc

    def describe(self, now: dt.datetime) -> str:
        """`_acme-challenge.x TXT "abcd…" (zone z, provider p, cert c) left 3h ago, since 2026-12-03 07:01Z`."""
        short = self.value if len(self.value) <= 12 else self.value[:10] + "…"
        return (f'{self.fqdn} TXT "{short}" (zone {self.zone}, provider {self.provider}, cert {self.cert}) '
                f"left {age_text(now - self.first_written)} ago, since {self.first_written:%Y-%m-%d %H:%M}Z")


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def age_text(age: dt.timedelta) -> str:
    s = max(age.total_seconds(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


def summary(entries: Sequence[Entry], now: dt.datetime, *, shown: int = 5) -> tuple[str, str]:
    """One line about leftover entries (the first `shown` described) and the next step: for doctor."""
    text = "; ".join(e.describe(now) for e in entries[:shown])
    more = f"; and {len(entries) - shown} more" if len(entries) > shown else ""
    return (f"{len(entries)} challenge TXT record(s) left behind, not yet confirmed removed: {text}{more}",
            "the next `certmgr renew`/`run` retries them first; if they stay, the DNS server refuses or times out "
            "the delete — see `certmgr status` and docs/troubleshooting.md")


def read(store: JournalStore) -> list[Entry]:
    """The journal's entries, oldest first (read-only: for status and doctor; lock-free)."""
    raw = store.load_json(JOURNAL_PATH, default=[])
    if not isinstance(raw, list):
        raise StoreError(f"store {JOURNAL_PATH}: not a JSON list",
                         hint="restore it from a backup, or move it aside (its TXT records are then forgotten)")
    entries = [Entry.from_json(obj, where=JOURNAL_PATH) for obj in raw]
    return sorted(entries, key=lambda e: (e.first_written, e.key)) + _legacy(store, known={e.key for e in entries})


def _stored(store: JournalStore) -> list[Entry]:
    """The entries of the journal document as stored now; a malformed one is skipped (read() reports it)."""
    raw = store.load_json(JOURNAL_PATH, default=[])
    out = []
    for obj in raw if isinstance(raw, list) else []:
        try:
            out.append(Entry.from_json(obj, where=JOURNAL_PATH))
        except StoreError:
            continue
    return out


def _legacy(store: JournalStore, *, known: set[Key]) -> list[Entry]:
    """Entries from the pre-journal per-certificate lists (state/renew/pending/NAME.json), file mtime as age."""
    out: list[Entry] = []
    directory = _legacy_dir(store)
    if directory is None:
        return out
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise StoreError(f"store {'/'.join(LEGACY_DIR)}: cannot list: {exc.strerror}") from exc
    for path in files:
        rel = "/".join((*LEGACY_DIR, path.name))
        items = store.load_json(rel, default=[]) or []
        when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
        for obj in items if isinstance(items, list) else []:
            entry = Entry.from_json({**obj, "cert": path.stem, "first_written": when.isoformat()}, where=rel)
            if entry.key not in known:
                known.add(entry.key)
                out.append(entry)
    return out


def _legacy_dir(store: JournalStore) -> Path | None:
    """Where pre-journal lists live: only a directory store (one with a `root`) can have them."""
    root = getattr(store, "root", None)
    return root.joinpath(*LEGACY_DIR) if isinstance(root, Path) else None


class Journal:
    """The run's journal (the caller holds the store lock); every change is saved before it returns.

    Concurrency: one event loop — each method reads, changes and saves with no await in between.
    """

    def __init__(self, store: JournalStore, *, clock: Callable[[], dt.datetime]) -> None:
        self._store = store
        self._clock = clock
        self._entries: dict[Key, Entry] = {}
        self._dropped: set[Key] = set()  # confirmed gone by this run: never merged back from the stored copy
        self._mine: set[Key] = set()  # added by this run (or carried from legacy lists): kept on every save
        self._legacy_files: list[str] = []

    @classmethod
    def load(cls, store: JournalStore, *, clock: Callable[[], dt.datetime] | None = None) -> Journal:
        journal = cls(store, clock=clock or (lambda: dt.datetime.now(dt.UTC)))
        for entry in read(store):
            journal._entries.setdefault(entry.key, entry)
        journal._mine = set(journal._entries) - {e.key for e in _stored(store)}  # legacy entries, to carry over
        directory = _legacy_dir(store)
        if directory is not None and directory.is_dir():
            journal._legacy_files = ["/".join((*LEGACY_DIR, p.name)) for p in sorted(directory.iterdir())
                                     if p.suffix == ".json" and not p.name.startswith(".")]
        return journal

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: (e.first_written, e.key))

    def written(self, provider: str, cert: str, records: Sequence[TXTRecord]) -> set[Key]:
        """Record `records` as about to be written (call before the UPDATE); the keys this call added.

        A value already journaled keeps its entry and its first time (dedupe by zone, owner name, value).
        """
        now = self._clock()
        added: set[Key] = set()
        for r in records:
            self._dropped.discard(r.key)
            self._mine.add(r.key)
            if r.key not in self._entries:
                self._entries[r.key] = Entry(zone=r.zone, fqdn=r.fqdn, value=r.value, provider=provider, cert=cert,
                                             domain=r.domain, first_written=now, token=r.token,
                                             key_authorization=r.key_authorization)
                added.add(r.key)
        if added:
            self._save()
        return added

    def drop(self, keys: Iterable[Key]) -> int:
        """Forget `keys`: the server confirmed they are gone (or refused the add that made them). How many."""
        gone = [k for k in set(keys) if self._entries.pop(k, None) is not None]
        self._dropped.update(gone)
        self._mine.difference_update(gone)
        if gone:
            # Not waited for on the disk (PgStore.batch durable=False): only a database crash can lose it, and
            # what it loses is re-derived — the entries come back, the next run deletes them again (the server
            # answers NOERROR for a value already gone) and drops them then. Any later durable commit flushes it.
            with batched(self._store, "drop removed challenge records from the DNS journal", durable=False):
                self._save()
        return len(gone)

    def _save(self) -> None:
        # The stored copy is the truth about other runs' entries: another controller (per-certificate locks,
        # docs/ha.md) may have journaled records since this run loaded it, or seen some removed. Keep what is
        # stored now (less what this run saw removed) plus this run's own; never lose another run's record.
        merged = {e.key: e for e in _stored(self._store) if e.key not in self._dropped}
        merged |= {k: e for k, e in self._entries.items() if k in self._mine}
        self._entries = merged
        self._store.save_json(JOURNAL_PATH, [e.to_json() for e in self.entries()])
        # the pre-journal lists are now carried here: empty them (after the save, so nothing is ever lost)
        for rel in self._legacy_files:
            self._store.save_json(rel, [])
        self._legacy_files = []


class CertJournal:
    """One certificate's view of the run's journal, as `issue` uses it."""

    def __init__(self, journal: Journal, cert: str) -> None:
        self._journal = journal
        self.cert = cert

    def written(self, provider: str, records: Sequence[TXTRecord]) -> set[Key]:
        return self._journal.written(provider, self.cert, records)

    def drop(self, keys: Iterable[Key]) -> int:
        return self._journal.drop(keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class Retried:
    """What one retry of the journal's leftovers did."""

    removed: int  # entries the server confirmed gone (now out of the journal)
    left: tuple[Entry, ...]  # still listed: the server did not confirm, or their provider is unavailable


async def retry_leftovers(journal: Journal, providers: Mapping[str, Provider], *, timeout: float,
                          only: Callable[[Entry], bool] | None = None) -> Retried:
    """Delete every journaled value (each provider's zones concurrently), dropping only what the server confirmed.

    Bounded by `timeout` in all: a DNS server that is down costs each run at most that, and its entries stay.
    `only` keeps the entries this run may remove (with two controllers: not those of a certificate whose
    order another live controller is running, which holds that certificate's lock).
    """
    entries = [e for e in journal.entries() if only is None or only(e)]
    if not entries:
        return Retried(removed=0, left=())
    groups: dict[str, list[TXTRecord]] = {}
    for e in entries:
        groups.setdefault(e.provider, []).append(e.record())
    missing = sorted(name for name in groups if name not in providers)
    if missing:
        event(log, logging.WARNING, "challenge records left behind by a provider that is unavailable",
              providers=",".join(missing), records=sum(len(groups[n]) for n in missing),
              hint="restore the [dns.*] entry (or its secret) so certmgr can remove them, or remove them by hand")
    removed = 0

    async def one(prov: Provider, recs: list[TXTRecord]) -> None:
        nonlocal removed
        for u in await prov.cleanup(recs):
            if u.applied:
                removed += journal.drop(r.key for r in u.records)

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one(providers[n], recs) for n, recs in groups.items() if n in providers))
    except TimeoutError:
        event(log, logging.WARNING, "retry of left-behind challenge records cut short", seconds=f"{timeout:g}")
    left = tuple(e for e in journal.entries() if only is None or only(e))
    if removed:
        event(log, logging.INFO, "removed challenge records left by an interrupted run", records=removed)
    if left:
        event(log, logging.WARNING, "challenge records still left behind (kept in the journal for the next run)",
              records=len(left), oldest=left[0].first_written.isoformat())
    return Retried(removed=removed, left=left)
