"""The DNS journal (certmgr/dns/journal.py): dedupe, drop only on confirmation, crash safety, the leftover retry."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest

from certmgr.dns import TXTRecord, ZoneUpdate, first_error
from certmgr.dns.journal import JOURNAL_PATH, CertJournal, Entry, Journal, age_text, read, retry_leftovers, summary
from certmgr.errors import DNSAuthError, DNSError, StoreError
from certmgr.store import Store

T0 = dt.datetime(2026, 12, 3, 7, 0, tzinfo=dt.UTC)


def rec(name: str, value: str, zone: str = "hachyderm.test") -> TXTRecord:
    return TXTRecord(fqdn=f"_acme-challenge.{name}", zone=zone, value=value, domain=name)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


def on_disk(store: Store) -> list[dict[str, str]]:
    data: list[dict[str, str]] = json.loads((store.root / JOURNAL_PATH).read_text())
    return data


def test_entry_is_saved_with_every_field_before_written_returns(store: Store) -> None:
    """`written` saves zone, owner name, value, provider, cert and the first time before it returns (0600)."""
    j = Journal.load(store, clock=Clock())
    added = CertJournal(j, "media.hachyderm.test").written("lab", [rec("media.hachyderm.test", "v1")])
    assert added == {("hachyderm.test", "_acme-challenge.media.hachyderm.test", "v1")}
    assert on_disk(store) == [{"zone": "hachyderm.test", "fqdn": "_acme-challenge.media.hachyderm.test", "value": "v1",
                               "provider": "lab", "cert": "media.hachyderm.test", "domain": "media.hachyderm.test",
                               "first_written": "2026-12-03T07:00:00+00:00"}]
    assert (store.root / JOURNAL_PATH).stat().st_mode & 0o777 == 0o600


def test_the_same_zone_owner_value_is_journaled_once_with_its_first_time(store: Store) -> None:
    """A value written again (another order, another case of the name) keeps one entry and its first time."""
    clock = Clock()
    j = Journal.load(store, clock=clock)
    j.written("lab", "a", [rec("www.hachyderm.test", "v1")])
    clock.now = T0 + dt.timedelta(hours=2)
    again = j.written("lab", "b", [TXTRecord(fqdn="_ACME-challenge.WWW.hachyderm.test", zone="Hachyderm.test",
                                             value="v1", domain="www.hachyderm.test"),
                                   rec("www.hachyderm.test", "v2")])
    assert again == {("hachyderm.test", "_acme-challenge.www.hachyderm.test", "v2")}
    assert [(e["value"], e["cert"], e["first_written"]) for e in on_disk(store)] == [
        ("v1", "a", "2026-12-03T07:00:00+00:00"), ("v2", "b", "2026-12-03T09:00:00+00:00")]


def test_drop_forgets_only_the_confirmed_keys_and_survives_a_reload(store: Store) -> None:
    """`drop` removes exactly the given (zone, owner, value) keys; a new Journal reads what is left."""
    j = Journal.load(store, clock=Clock())
    j.written("lab", "a", [rec("www.hachyderm.test", "v1"), rec("www.hachyderm.test", "v2"),
                           rec("x.challenges.test", "v1", zone="challenges.test")])
    assert j.drop([rec("www.hachyderm.test", "v1").key, ("nozone", "noname", "v1")]) == 1
    assert j.drop([]) == 0
    again = Journal.load(store)
    assert [(e.zone, e.value) for e in again.entries()] == [("challenges.test", "v1"), ("hachyderm.test", "v2")]


@pytest.mark.parametrize(("content", "message"), [
    ('{"zone": "x"}', "store state/dns/journal.json: not a JSON list"),
    ('[{"zone": "x"}]', "store state/dns/journal.json: an entry is malformed (KeyError: 'first_written')"),
    ('[{"zone": "x", "fqdn": "y", "value": "v", "provider": "p", "cert": "c", "first_written": "soon"}]',
     "store state/dns/journal.json: an entry is malformed (ValueError: Invalid isoformat string: 'soon')"),
])
def test_a_damaged_journal_is_reported_not_emptied(store: Store, content: str, message: str) -> None:
    """A journal that is not a list of whole entries raises StoreError naming the file, and is left as it is."""
    path = store.root / JOURNAL_PATH
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(StoreError) as exc:
        read(store)
    assert exc.value.message == message
    assert path.read_text() == content


def test_pre_journal_pending_lists_are_carried_over_then_emptied(store: Store) -> None:
    """Entries in the old per-certificate state/renew/pending/NAME.json are listed, moved into the journal on its
    first save, and the old list emptied."""
    store.save_json("state/renew/pending/media.hachyderm.test.json", [
        {"provider": "lab", "fqdn": "_acme-challenge.media.hachyderm.test", "zone": "hachyderm.test",
         "value": "old", "domain": "media.hachyderm.test"}])
    [legacy] = read(store)
    assert (legacy.cert, legacy.value, legacy.provider) == ("media.hachyderm.test", "old", "lab")
    j = Journal.load(store, clock=Clock())
    j.written("lab", "www", [rec("www.hachyderm.test", "new")])
    assert sorted(e["value"] for e in on_disk(store)) == ["new", "old"]
    assert store.load_json("state/renew/pending/media.hachyderm.test.json") == []
    assert sorted(e.value for e in read(store)) == ["new", "old"]


def test_describe_and_age() -> None:
    """An entry reads as owner, shortened value, zone, provider, cert and age."""
    e = Entry(zone="hachyderm.test", fqdn="_acme-challenge.www.hachyderm.test", value="abcdefghijklmnopqrstuvwxyz",
              provider="lab", cert="www", domain="www.hachyderm.test", first_written=T0)
    assert e.describe(T0 + dt.timedelta(hours=3, minutes=5)) == (
        '_acme-challenge.www.hachyderm.test TXT "abcdefghij…" (zone hachyderm.test, provider lab, cert www) '
        "left 3h ago, since 2026-12-03 07:00Z")
    assert [age_text(dt.timedelta(seconds=s)) for s in (5, 125, 7200, 3 * 86400)] == ["5s", "2m", "2h", "3d"]


def test_first_error_prefers_a_servers_verdict() -> None:
    """Of a batch's failures the one the server answered is reported before a silent server's."""
    r = (rec("a.hachyderm.test", "v"),)
    silent = ZoneUpdate(zone="a", records=r, applied=None, error=DNSError("a: no answer"))
    refused = ZoneUpdate(zone="b", records=r, applied=False, error=DNSAuthError("b: REFUSED"))
    ok = ZoneUpdate(zone="c", records=r, applied=True)
    assert str(first_error([ok, silent, refused])) == "b: REFUSED"
    assert str(first_error([ok, silent])) == "a: no answer"
    assert first_error([ok]) is None


# ---------------------------------------------------------------- the leftover retry


class FakeProvider:
    """Answers each zone's delete as told: True (NOERROR), False (refused), None (no answer), "hang"."""

    on_change = None

    def __init__(self, name: str, answers: dict[str, bool | str | None]) -> None:
        self.name = name
        self.answers = answers
        self.asked: list[tuple[str, list[str]]] = []

    async def present(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        raise AssertionError("the retry never adds")

    async def cleanup(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        out = []
        for zone in sorted({r.zone for r in records}):
            recs = tuple(r for r in records if r.zone == zone)
            self.asked.append((zone, [r.value for r in recs]))
            answer = self.answers[zone]
            if answer == "hang":
                await asyncio.Event().wait()
            applied = answer if isinstance(answer, bool) or answer is None else None
            out.append(ZoneUpdate(zone=zone, records=recs, applied=applied,
                                  error=None if applied else DNSError(f"{zone}: failed")))
        return tuple(out)

    async def wait_propagated(self, records: Sequence[TXTRecord], *, timeout: float | None = None) -> None: ...

    async def cname_target(self, fqdn: str, zone: str) -> str | None:
        return None


def test_retry_drops_only_what_the_server_confirmed(store: Store) -> None:
    """Confirmed deletes leave the journal; refused, unanswered and provider-less entries stay for the next run."""
    j = Journal.load(store, clock=Clock())
    j.written("lab", "a", [rec("www.hachyderm.test", "ok1"), rec("x.challenges.test", "no", zone="challenges.test"),
                           rec("y.slow.test", "silent", zone="slow.test")])
    j.written("gone", "b", [rec("z.other.test", "orphan", zone="other.test")])
    prov = FakeProvider("lab", {"hachyderm.test": True, "challenges.test": False, "slow.test": None})
    done = asyncio.run(retry_leftovers(j, {"lab": prov}, timeout=5))
    assert done.removed == 1
    assert sorted(e.value for e in done.left) == ["no", "orphan", "silent"]
    assert sorted(e["value"] for e in on_disk(store)) == ["no", "orphan", "silent"]
    assert sorted(prov.asked) == [("challenges.test", ["no"]), ("hachyderm.test", ["ok1"]), ("slow.test", ["silent"])]


def test_retry_is_bounded_and_keeps_what_it_could_not_finish(store: Store) -> None:
    """A provider that never answers costs at most the bound; its entries stay, another provider's are removed."""
    j = Journal.load(store, clock=Clock())
    j.written("stuck", "a", [rec("www.hachyderm.test", "v1")])
    j.written("fine", "b", [rec("x.challenges.test", "v2", zone="challenges.test")])
    provs = {"stuck": FakeProvider("stuck", {"hachyderm.test": "hang"}),
             "fine": FakeProvider("fine", {"challenges.test": True})}
    done = asyncio.run(retry_leftovers(j, provs, timeout=0.2))
    assert done.removed == 1 and [e.value for e in done.left] == ["v1"]


def test_empty_journal_asks_nothing(store: Store) -> None:
    """With nothing journaled the retry sends nothing and writes nothing."""
    prov = FakeProvider("lab", {})
    done = asyncio.run(retry_leftovers(Journal.load(store), {"lab": prov}, timeout=5))
    assert (done.removed, done.left, prov.asked) == (0, (), [])
    assert not (store.root / JOURNAL_PATH).exists()


# ---------------------------------------------------------------- crash safety


def _churn(root: Path, out: int) -> None:
    """Child: journal value i, say `sent i` (as if the UPDATE went out); every other one say `dropping i`, drop it,
    say `gone i`."""
    j = Journal.load(Store(root))
    i = 0
    while True:
        j.written("lab", "c", [rec(f"c{i % 100:03d}.hachyderm.test", f"v{i}")])
        os.write(out, f"sent {i}\n".encode())
        if i % 2:
            os.write(out, f"dropping {i}\n".encode())
            j.drop([rec(f"c{i % 100:03d}.hachyderm.test", f"v{i}").key])
            os.write(out, f"gone {i}\n".encode())
        i += 1


def test_a_writer_killed_at_any_moment_leaves_a_whole_journal_with_every_sent_value(store: Store) -> None:
    """SIGKILLed 20 times mid-churn, the journal is always whole JSON, lists every value announced as sent and not
    being dropped (an entry is saved before its UPDATE), and none announced as dropped."""
    rng = random.Random(11)
    said: dict[str, set[str]] = {"sent": set(), "dropping": set(), "gone": set()}
    for _ in range(20):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                os.close(r)
                _churn(store.root, w)
            finally:
                os._exit(1)
        os.close(w)
        buf = b""
        want = rng.randint(1, 40)
        while buf.count(b"\n") < want:
            chunk = os.read(r, 4096)
            assert chunk, "the writer died by itself"
            buf += chunk
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(r, 4096):
            buf += chunk
        os.close(r)
        for line in buf.decode().splitlines():
            what, i = line.split()
            said[what].add(f"v{i}")
        values = {e.value for e in read(store)}  # whole, parseable, every entry complete
        kept = said["sent"] - said["dropping"]
        assert kept <= values, sorted(kept - values)
        assert not (said["gone"] & values), sorted(said["gone"] & values)
        # start the next child from a clean journal, so `v0…` are fresh values again
        (store.root / JOURNAL_PATH).unlink()
        for s in said.values():
            s.clear()


def test_summary_names_the_first_five_and_counts_the_rest() -> None:
    """Doctor's line shows at most five leftovers and says how many more there are."""
    entries = [Entry(zone="z.test", fqdn=f"_acme-challenge.n{i}.z.test", value=f"v{i}", provider="p", cert="c",
                     domain=f"n{i}.z.test", first_written=T0) for i in range(7)]
    message, hint = summary(entries, T0 + dt.timedelta(minutes=3))
    assert message.startswith('7 challenge TXT record(s) left behind, not yet confirmed removed: '
                              '_acme-challenge.n0.z.test TXT "v0" (zone z.test, provider p, cert c) left 3m ago')
    assert message.count("(zone z.test") == 5 and message.endswith("; and 2 more")
    assert hint.startswith("the next `certmgr renew`/`run` retries them first")
