"""Deploy intents: written durably before a commit may switch a POP's `live/<name>`, removed once audited.

A run killed or interrupted while its commit script runs on a POP (the script runs on without it)
leaves the intent behind. The next deploy that inspects that POP settles it from what the POP's
live link shows: exactly one audit line for a switch that happened, none for one that did not.
Audit lines written for an intent carry its id, so a kill between the audit line and the removal
of the intent never makes a second line.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from certmgr.errors import CertmgrError
from certmgr.log import event
from certmgr.store_api import StateStore, batched

logger = logging.getLogger(__name__)

INTENT_DIR = "state/intents"
# audit actions that record a switch of a POP's live link (a rollback line covers the switch and its undoing)
SWITCH_ACTIONS = ("deployed", "rolled back", "rollback failed")
QUIET = 5.0  # seconds after its start by which a commit has switched or never will (its pre-swap steps are fast)


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    """One commit about to run: on `host`, `live/<cert>` goes from `from_target` to `to_target`."""

    id: str
    cert: str
    host: str
    version: int  # the POP archive version the commit stores
    layout: str  # the POP's live layout before: link | certbot | none
    from_target: str  # the live link's target before ("" when not a link)
    back_target: str  # where a rollback points the link (certbot's converted version, or from_target)
    to_target: str
    from_serial: str | None
    to_serial: str
    at: str  # when the commit started (ISO 8601, UTC)
    # the commit's upload temp dir: commit.sh names it in archive/.last-commit-<cert> just before it switches,
    # what tells "switched and switched back" from "never switched" when both leave the same link (None: older)
    tmp: str | None = None

    @property
    def relpath(self) -> str:
        return f"{INTENT_DIR}/{self.cert}/{self.host}.{self.id}.json"

    @classmethod
    def new(cls, *, cert: str, host: str, version: int, layout: str, from_target: str, back_target: str,
            from_serial: str | None, to_serial: str, now: dt.datetime, tmp: str | None = None) -> Intent:
        return cls(id=secrets.token_hex(8), cert=cert, host=host, version=version, layout=layout,
                   from_target=from_target, back_target=back_target,
                   to_target=f"../archive/{cert}/{version}", from_serial=from_serial, to_serial=to_serial,
                   at=now.astimezone(dt.UTC).isoformat(), tmp=tmp)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Intent:
        return cls(**{k: data.get(k) for k in cls.__slots__})  # type: ignore[arg-type]


def write(store: StateStore, intent: Intent) -> None:
    """Durably record `intent` (atomic write, fsynced) before its commit starts."""
    store.save_json(intent.relpath, {f.name: getattr(intent, f.name) for f in fields(intent)})  # flat: no asdict copy


def write_all(store: StateStore, made: Sequence[Intent]) -> dict[str, CertmgrError]:
    """write() each of a host transaction's intents, all in one store transaction (one thread hop, one durable
    commit); the errors by certificate (with PostgreSQL one failure fails them all: nothing written)."""
    try:
        with batched(store, f"record {len(made)} deploy intent(s)"):
            for intent in made:
                write(store, intent)
    except CertmgrError as exc:
        return {intent.cert: exc for intent in made}
    return {}


def remove(store: StateStore, intent: Intent) -> None:
    store.remove_json(intent.relpath)


def pending(store: StateStore, cert: str | None = None, host: str | None = None) -> list[Intent]:
    """Intents left by runs that did not finish their commit, oldest first (unreadable ones are skipped)."""
    out = []
    # one host's: only its own files are read (`<host>.<id>.json`), not those of the POPs deploying beside it
    found = (store.list_json(INTENT_DIR) if cert is None else
             store.list_json(f"{INTENT_DIR}/{cert}", f"{host}." if host is not None else ""))
    for data in found:
        try:
            intent = Intent.from_json(data)
        except (TypeError, AttributeError):  # not an intent written by this version: leave it alone
            logger.warning("deploy intent in %s/ does not parse (skipped)", INTENT_DIR)
            continue
        if host is None or intent.host == host:
            out.append(intent)
    return sorted(out, key=lambda i: i.at)


def verdict(intent: Intent, *, layout: str | None, target: str | None, versions: set[int],
            last_commit: str | None = None) -> str:
    """What the POP's live link says happened: deployed | rolled back | not switched | unknown.

    `last_commit`: the upload named by archive/.last-commit-<cert>, which commit.sh writes just before it
    switches. The version being stored is no proof the commit ran when it was on the POP already (a
    rollback's, or a redeploy's): a link back where it was is "rolled back" only if that commit got there.
    """
    t = target or ""
    if layout == "link" and t == intent.to_target:
        return "deployed"
    stored = intent.version in versions
    unchanged = (layout, t) == (intent.layout, intent.from_target)
    if stored and t == intent.back_target and (layout == "link" or not intent.back_target):
        if not (unchanged and intent.tmp is not None and last_commit != intent.tmp):
            return "rolled back"  # switched, then switched back (the test or the reload failed)
    if unchanged:
        return "not switched"
    return "unknown"


def recheck_in(intents: list[Intent], *, layout: str | None, target: str | None, versions: set[int],
               now: dt.datetime, last_commit: str | None = None) -> float:
    """Seconds to wait before inspecting again, so that a commit still running on the POP is not taken as none.

    The script of a run killed mid-commit runs on; one begun less than QUIET seconds ago that has not
    switched yet may be just before its swap. Past that age "not switched" is what happened.
    """
    ages = [(now - dt.datetime.fromisoformat(i.at)).total_seconds() for i in intents
            if verdict(i, layout=layout, target=target, versions=versions, last_commit=last_commit) == "not switched"]
    return max(0.0, QUIET - min(ages)) if ages else 0.0


def audited_ids(store: StateStore) -> set[str]:
    """Intent ids that already have a switch line in the audit log."""
    return {str(e["intent"]) for e in store.read_audit() if e.get("intent") and e.get("action") in SWITCH_ACTIONS}


def settle(store: StateStore, intents: list[Intent], *, layout: str | None, target: str | None,
           versions: set[int], last_commit: str | None = None) -> list[tuple[Intent, str]]:
    """Write the audit line (once) for each intent whose switch happened, record the state, drop the intents.

    Each intent's audit line, deploy state and removal in one store transaction (`batch`: with PostgreSQL
    all or nothing; the directory store writes them in that order, and a line already written is not
    written again). Blocking (fsyncs): call it in a thread. Returns (intent, verdict) pairs.
    """
    if not intents:
        return []
    done = audited_ids(store)
    out = []
    for intent in intents:
        what = verdict(intent, layout=layout, target=target, versions=versions, last_commit=last_commit)
        name, host = intent.cert, intent.host
        with batched(store, f"settle the deploy of {name} to {host}"):
            if intent.id not in done:
                if what == "deployed":
                    store.audit("deployed", name, frm=intent.from_serial, to=intent.to_serial, host=host,
                                version=intent.version, intent=intent.id, settled=True, at=intent.at,
                                summary=f"deployed {name} to {host}: live/{name} switched to version "
                                        f"{intent.version}, serial {intent.from_serial or '-'} → {intent.to_serial} "
                                        "(settled after interrupt: the run that switched it stopped before "
                                        "verifying and recording it; not verified by handshake here)")
                    _record_state(store, intent)
                elif what == "rolled back":
                    store.audit("rolled back", name, frm=intent.to_serial, to=intent.from_serial, host=host,
                                failed_version=intent.version, intent=intent.id, settled=True, at=intent.at,
                                summary=f"rolled back {name} on {host} from version {intent.version} "
                                        "(settled after interrupt: its commit switched and switched back)")
                elif what == "unknown":
                    store.audit("deploy unsettled", name, frm=intent.from_target, to=intent.to_target, host=host,
                                intent=intent.id, seen=target, at=intent.at,
                                summary=f"interrupted deploy of {name} to {host}: live/{name} is now "
                                        f"{target or '(no link)'}, neither before nor after: changed outside certmgr?")
            remove(store, intent)
        event(logger, logging.WARNING if what != "not switched" else logging.INFO, "settled interrupted deploy",
              cert=name, host=host, intent=intent.id, verdict=what)
        out.append((intent, what))
    return out


def _record_state(store: StateStore, intent: Intent) -> None:
    """The deploy state the interrupted run never saved: this host serves the new version since `intent.at`.

    Not caught here: inside `settle`'s transaction an error ends it (nothing of the settlement written)."""
    path = f"state/deploy/{intent.cert}.json"
    state = store.load_json(path, default={}) or {}
    entry = state.setdefault("hosts", {}).setdefault(intent.host, {})
    entry.update({"status": "deployed", "at": intent.at, "deployed_at": intent.at, "error": None,
                  "serial": intent.to_serial, "version": intent.version, "wanted_serial": intent.to_serial,
                  "verified": False})
    entry.pop("serial_at", None)  # the link switched; no handshake saw what is served (status reads the scan)
    store.save_json(path, state)
