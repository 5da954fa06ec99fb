"""Deploy's types: per-(certificate, host) outcomes, and the typed records the POP scripts' output is read into.

A script prints `key=value` lines; a line `cert=<name>` opens one certificate's section and `cert=`
returns to the script's own keys (scripts/common.sh). `sections` splits them; the `parse_*`
functions turn them into frozen records, so no caller reads a dict of strings.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from certmgr.remote import Result, b64bytes, b64text


class Status(StrEnum):
    SKIPPED = "skipped"  # already live and served: nothing touched
    DEPLOYED = "deployed"  # new version live, tested, reloaded, served
    ROLLED_BACK = "rolled back"  # the new version failed; the previous one is live and served again
    FAILED = "failed"  # could not deploy (nothing changed), or could not restore cleanly
    UNREACHABLE = "unreachable"  # no SSH session: nothing touched
    HELD = "held"  # not attempted: a canary did not verify, or the host was left alone after a timeout
    UNKNOWN = "unknown"  # a remote script timed out and may still run there: state unknown, host left alone


OK_STATUSES = (Status.SKIPPED, Status.DEPLOYED)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostOutcome:
    """What happened to one certificate on one host."""

    cert: str
    host: str
    status: Status
    new_serial: str
    old_serial: str | None = None  # what the host had live before (None: nothing, or unknown)
    version: int | None = None  # the host's archive version live at the end (None: unknown/none)
    previous_version: int | None = None
    converted: bool = False  # certbot's live/<name>/ directory was converted to a symlink
    error: str | None = None  # "step subject: cause (outcome)"; nginx's own text where it has one
    hint: str | None = None
    timings: tuple[tuple[str, float], ...] = ()
    elapsed: float = 0.0
    note: str | None = None  # said whatever the status, e.g. the reload fallback (deploy/reload.py)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def line(self) -> str:
        """One line for the terminal: status, cert → host, serials, timings, error."""
        if self.status == Status.SKIPPED:
            serials = f"serial {self.new_serial} (already live)"
        else:
            serials = f"serial {self.old_serial or '-'} → {self.new_serial}"
        ver = f" v{self.version}" if self.version is not None else ""
        conv = " (converted from certbot layout)" if self.converted else ""
        steps = " ".join(f"{k} {v:.2f}" for k, v in self.timings if v >= 0.005)
        took = f"{self.elapsed:.2f}s" + (f" [{steps}]" if steps else "")
        text = f"{self.status.value:<11} {self.cert} → {self.host}{ver} {serials} {took}{conv}"
        if self.error:
            text += f"\n            {self.error}"
        if self.note:
            text += f"\n            note: {self.note}"
        return text

    def lines(self, indent: str = "  ") -> list[str]:
        """line(), then its hint right under it when it did not go well (never under another host's line)."""
        hint = [f"{indent}            hint: {self.hint}"] if self.hint and not self.ok else []
        return [indent + self.line(), *hint]

    def to_json(self) -> dict[str, Any]:
        return {
            "cert": self.cert, "host": self.host, "status": self.status.value, "ok": self.ok,
            "new_serial": self.new_serial, "old_serial": self.old_serial, "version": self.version,
            "previous_version": self.previous_version, "converted": self.converted, "error": self.error,
            "hint": self.hint, "timings": dict(self.timings), "elapsed": round(self.elapsed, 3),
            "note": self.note,
        }


# ---------------------------------------------------------------------------- script output


def sections(res: Result) -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]]]:
    """Split a script's `key=value` lines into its own keys and one mapping per `cert=<name>` section."""
    own: dict[str, list[str]] = {}
    per: dict[str, dict[str, list[str]]] = {}
    cur = own
    # lines end at "\n" only, as the scripts' `say` writes them: splitlines() would also end one at a "\r",
    # "\v", "\x1c"… inside a value read from the POP's file system (a link's target), and forge a key
    for line in res.stdout.split("\n"):
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
            continue
        if key == "cert":
            cur = per.setdefault(value, {}) if value else own
            continue
        cur.setdefault(key, []).append(value)
    return own, per


def _last(fields: Mapping[str, list[str]], key: str) -> str | None:
    values = fields.get(key)
    return values[-1] if values else None


def _int(fields: Mapping[str, list[str]], key: str) -> int | None:
    value = _last(fields, key)
    return int(value) if value is not None and re.fullmatch(r"-?[0-9]{1,9}", value) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class CertState:
    """One certificate's lineage on a POP, as inspect.sh found it."""

    name: str
    layout: str  # link | certbot | other | none
    target: str | None  # the live link's target (layout "link")
    versions: frozenset[int]  # archive/<name>/N/ directories
    missing: frozenset[str]  # of "live", "archive", "lineage"
    fullchain: bytes | None = field(default=None, repr=False)  # the live fullchain.pem
    key_owner: str | None = None  # "user:group:uid:gid" of the live privkey.pem, when asked for
    last_commit: str | None = None  # archive/.last-commit-<name>: the upload of the last commit that switched it
    fields: Mapping[str, list[str]] = field(default_factory=dict, repr=False)  # certbot links, numbers


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspection:
    """inspect.sh's answer: every certificate asked about, and the preflight test's verdict."""

    certs: Mapping[str, CertState]
    test_rc: int | None  # None: the script did not get that far (unexpected output)
    test_out: str
    preflight: bool  # the test ran; False: skipped, the commit can undo its swaps (scripts/inspect.sh)
    restored: tuple[str, ...]  # certbot directories put back after an interrupted conversion
    raw: Result


MAX_FULLCHAIN = 1 << 20  # a live fullchain.pem larger than this is not read (a few KB is usual)


def fullchains_from_tar(value: str | None, names: Iterable[str]) -> dict[str, bytes]:
    """inspect.sh's one tar of every live fullchain (members `<name>/fullchain.pem`), read in memory only:
    the regular members of the names asked about, up to MAX_FULLCHAIN each; nothing from a malformed one."""
    data = b64bytes(value)
    if not data:
        return {}
    wanted = {f"{n}/fullchain.pem": n for n in names}
    got: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                name = wanted.get(member.name)
                if name is None or not member.isfile() or not 0 < member.size <= MAX_FULLCHAIN:
                    continue
                f = tf.extractfile(member)
                if f is not None:
                    got[name] = f.read()
    except (tarfile.TarError, OSError, EOFError):
        return {}
    return got


def parse_inspection(res: Result) -> Inspection:
    own, per = sections(res)
    chains = fullchains_from_tar(_last(own, "fullchains_tar_b64"), per)
    certs = {}
    for name, f in per.items():
        certs[name] = CertState(
            name=name, layout=_last(f, "layout") or "none", target=_last(f, "target"),
            versions=frozenset(int(v) for v in f.get("version", []) if v.isdigit()),
            missing=frozenset(f.get("missing", [])),
            fullchain=chains.get(name) or b64bytes(_last(f, "fullchain_b64")),
            key_owner=_last(f, "key_owner"), last_commit=_last(f, "last_commit") or None, fields=f)
    return Inspection(certs=certs, test_rc=_int(own, "test_rc"), test_out=b64text(_last(own, "test_out") or ""),
                      preflight=_last(own, "preflight") != "skipped", restored=tuple(res.all("restored")), raw=res)


@dataclass(frozen=True, slots=True, kw_only=True)
class CertCommit:
    """One certificate's part of commit.sh: stored, swapped (and maybe switched back), or failed at a step."""

    name: str
    failed_step: str | None  # verify | chown | sync | aside | rename | convert | swap
    failed_out: str
    aside: str | None  # the name archive/<name>/N/ of other content was moved to
    converted: str | None  # certbot's version K, when live/<name>/ was converted
    convdir: str | None
    swapped: bool
    prev: str  # the target live/<name> pointed at before ("" none; a converted certbot copy)
    rolled_back: bool | None  # after a failed test/reload: switched back (None: not attempted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """commit.sh's answer for the whole transaction."""

    certs: Mapping[str, CertCommit]
    test_rc: int | None
    test_out: str
    reload_rc: int | None
    reload_out: str
    retest_rc: int | None
    retest_out: str
    rereload_rc: int | None
    rereload_out: str
    done: bool  # tested, reloaded, leftovers swept
    raw: Result


def parse_commit(res: Result) -> Commit:
    own, per = sections(res)
    certs = {}
    for name, f in per.items():
        rb = _last(f, "rolled_back")
        certs[name] = CertCommit(
            name=name, failed_step=_last(f, "failed_step"), failed_out=b64text(_last(f, "failed_out") or ""),
            aside=_last(f, "aside"), converted=_last(f, "converted"), convdir=_last(f, "convdir"),
            swapped=_last(f, "swapped") == "1", prev=_last(f, "prev") or "",
            rolled_back=None if rb is None else rb == "1")
    return Commit(certs=certs, test_rc=_int(own, "test_rc"), test_out=b64text(_last(own, "test_out") or ""),
                  reload_rc=_int(own, "reload_rc"), reload_out=b64text(_last(own, "reload_out") or ""),
                  retest_rc=_int(own, "retest_rc"), retest_out=b64text(_last(own, "retest_out") or ""),
                  rereload_rc=_int(own, "rereload_rc"), rereload_out=b64text(_last(own, "rereload_out") or ""),
                  done=_last(own, "done") == "1", raw=res)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollback:
    """rollback.sh's answer: which certificates were switched back, the test and the reload."""

    rolled_back: Mapping[str, bool]
    retest_rc: int | None
    retest_out: str
    reload_rc: int | None
    reload_out: str
    raw: Result


def parse_rollback(res: Result) -> Rollback:
    own, per = sections(res)
    return Rollback(rolled_back={n: _last(f, "rolled_back") == "1" for n, f in per.items()},
                    retest_rc=_int(own, "retest_rc"), retest_out=b64text(_last(own, "retest_out") or ""),
                    reload_rc=_int(own, "reload_rc"), reload_out=b64text(_last(own, "reload_out") or ""), raw=res)
