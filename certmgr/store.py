"""The local store: versioned certificate archive, one-symlink live switch, lock, state and audit log.

Layout (certbot's paths, one atomic switch per lineage instead of four):

    <root>/archive/<name>/<N>/{fullchain,privkey,cert,chain}.pem
    <root>/live/<name> -> ../archive/<name>/<N>
    <root>/accounts/<ca-id>/key.pem, account.json
    <root>/state/<name>.json, state/_global.json
    <root>/audit.log, <root>/lock

Concurrency: readers need no lock and always see whole versions; every writer of archive/ and
live/ holds `Store.lock()` (enforced), which also makes it the one to sweep what a killed writer
left behind. See docs/store.md.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import glob
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certmgr import auditlog
from certmgr.errors import LockHeld, StoreError
from certmgr.fsutil import (
    TEMP_MARK,
    atomic_symlink,
    atomic_write,
    create_file,
    fsync_dir,
    make_dir,
    remove_temps,
)
from certmgr.material import FILES, CertMaterial

if TYPE_CHECKING:
    from certmgr.certbot import ImportResult

logger = logging.getLogger(__name__)

DIR_MODE = 0o700  # archive/, live/, accounts/, state/ and everything below: keys live there
KEY_MODE = 0o600  # privkey.pem, account keys, state, lock, audit log
PEM_MODE = 0o644  # cert.pem, chain.pem, fullchain.pem

# A lineage name becomes a directory name here and on every host. Same alphabet as the inventory
# plus "*"; the first character is never ".", "-" or "_" (no hidden names, no option-like argv,
# and "_global" stays free for state/_global.json). 200 leaves room for "state/<name>.json".
_NAME = re.compile(r"[a-z0-9*][a-z0-9*._-]{0,199}")
_CA_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_REL_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}")
_REL_ROOTS = ("state", "accounts")  # load_json/save_json never reach archive/, live/, lock or audit.log
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
PEM_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_AUDIT_KEYS = ("time", "actor", "action", "object", "from", "to")
_STALE_TEMP_SECONDS = 3600.0  # state/ and accounts/ writers may run unlocked: leave fresh temps alone


def check_name(name: str) -> str:
    """Return `name` if it is a valid lineage name, else raise StoreError (before any path is built)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise StoreError(
            f"store: {name!r} is not a valid certificate name",
            hint="use lower-case letters, digits, '*', '.', '-', '_'; no leading '.', '-' or '_', no '..'",
        )
    return name


def _check_ca_id(ca_id: str) -> str:
    if not isinstance(ca_id, str) or not _CA_ID.fullmatch(ca_id) or ".." in ca_id:
        raise StoreError(f"store: {ca_id!r} is not a valid CA name", hint="use the [ca.<name>] name from the inventory")
    return ca_id


def _check_version(version: int) -> int:
    if type(version) is not int or version < 1:
        raise ValueError(f"version must be a positive int, not {version!r}")
    return version


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def os_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def json_default(obj: object) -> object:
    if isinstance(obj, dt.datetime):
        return _iso(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")




class Store:
    """A certmgr state directory. Construct with `Store.open`; cheap, holds no resources until `lock()`."""

    def __init__(self, root: Path, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.root = Path(root)
        self._clock = clock
        self._archive = self.root / "archive"
        self._live = self.root / "live"
        self._lock_fd: int | None = None
        self._actor: str | None = None
        self.audit_max_bytes = auditlog.AUDIT_MAX_BYTES  # audit.log rotates to audit.log.1 past this

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ------------------------------------------------------------------ layout

    @classmethod
    def open(cls, root: Path, *, create: bool = True, clock: Callable[[], dt.datetime] = _utcnow) -> Store:
        """Open the store at `root`, creating the layout with its modes when `create` (idempotent).

        Concurrency: safe to call from several processes at once; creation only adds missing
        directories and tightens modes of existing ones.
        """
        store = cls(root, clock=clock)
        if not create:
            if not (store._archive.is_dir() and store._live.is_dir()):
                raise StoreError(
                    f"store {store.root}: not a certmgr state directory (no archive/ or live/)",
                    hint="check --state-dir / CERTMGR_STATE_DIR (default /var/lib/certmgr)",
                )
            return store
        try:
            store.root.mkdir(parents=True, exist_ok=True)
            for sub in ("archive", "live", "accounts", "state"):
                path = store.root / sub
                if not make_dir(path, DIR_MODE) and (path.stat().st_mode & 0o7777) != DIR_MODE:
                    logger.warning("store: tightening %s to mode %o", path, DIR_MODE)
                    os.chmod(path, DIR_MODE)
            for fname in ("lock", "audit.log"):
                if not os.path.lexists(store.root / fname):  # existing ones need no write access
                    os.close(os.open(store.root / fname, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, KEY_MODE))
            fsync_dir(store.root)
        except OSError as exc:
            raise StoreError(
                f"store {store.root}: cannot create the state directory: {os_error_text(exc)}",
                hint="run as the certmgr user, or check the path and its permissions",
            ) from exc
        return store

    # ------------------------------------------------------------------ lock

    per_name_locks = False  # one flock for the whole directory: lock_cert/lock_pop add nothing (docs/ha.md)

    @contextmanager
    def lock_cert(self, name: str, actor: str, *, wait: float | None = None) -> Iterator[int | None]:
        """No per-certificate lock here: the caller's lock() covers it; no epoch (None)."""
        yield None

    @contextmanager
    def lock_pop(self, host: str, actor: str, *, wait: float | None = None) -> Iterator[int | None]:
        """No per-POP lock here: the caller's lock() and the POP's flock cover it; no epoch, so no POP fencing."""
        yield None

    @property
    def held(self) -> dict[str, int]:
        """No epochs: the directory store has none."""
        return {}

    @contextmanager
    def lock(self, actor: str, *, wait: float | None = None) -> Iterator[None]:
        """Hold the store's exclusive lock for the `with` block; raise LockHeld if another process has it.

        `wait` seconds (None: don't wait) are spent polling before giving up. The lock is a
        flock(2) on `<root>/lock`, so the kernel releases it when its holder dies, even by
        SIGKILL; the file records pid, start time and `actor` only to name the holder in the
        error. The fd is close-on-exec: children we exec (ssh) never keep the lock alive.
        After acquiring, temporaries left by a killed writer are removed.

        Concurrency: one holder per store across processes; not re-entrant (a nested call from
        the same Store is a bug and raises RuntimeError).
        """
        if self._lock_fd is not None:
            raise RuntimeError(f"{self!r}: lock() is already held by this Store (not re-entrant)")
        path = self.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, KEY_MODE)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot open {path}: {os_error_text(exc)}") from exc
        try:
            self._acquire(fd, wait)
            started = _iso(self._clock())
            record = json.dumps({"pid": os.getpid(), "started": started, "actor": actor}).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            self._lock_fd, self._actor = fd, actor
            try:
                self._sweep_temps()
                yield
            finally:
                self._lock_fd = self._actor = None
                try:
                    os.ftruncate(fd, 0)  # a released lock names no holder
                except OSError:
                    logger.warning("store: could not clear %s", path)
        finally:
            os.close(fd)  # releases the flock

    def _acquire(self, fd: int, wait: float | None) -> None:
        deadline = time.monotonic() + wait if wait else None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic() if deadline is not None else 0.0
                if remaining <= 0:
                    raise self._lock_held(fd, wait) from None
                time.sleep(min(0.05, remaining))  # bounded by `wait`: flock has no timed wait
            except OSError as exc:
                raise StoreError(f"store {self.root}: cannot lock: {os_error_text(exc)}") from exc

    def _lock_held(self, fd: int, wait: float | None) -> LockHeld:
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            pid, started, actor = int(holder["pid"]), str(holder["started"]), str(holder["actor"])
        except (OSError, ValueError, KeyError, TypeError):
            # the holder is between flock() and writing its record, or it is not certmgr
            return LockHeld(f"store {self.root} is locked by another process (holder not recorded)")
        waited = f" (gave up after {wait:g}s)" if wait else ""
        return LockHeld(
            f"store {self.root} is locked by pid {pid} ({actor}, started {started}){waited}", pid=pid, started=started
        )

    def _require_lock(self, what: str) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"Store.{what} writes archive/ or live/: call it inside `with store.lock(actor):`")

    def _sweep_temps(self) -> None:
        removed: list[str] = []
        # deploy intents (state/intents/<name>/) are written only by deploys, which hold this lock
        intents = self.root / "state" / "intents"
        for directory in (self._archive, *self._subdirs(self._archive), self._live, *self._subdirs(intents)):
            removed += [str(directory / n) for n in remove_temps(directory)]
        accounts = self.root / "accounts"
        for directory in (self.root / "state", accounts, *self._subdirs(accounts)):
            removed += [str(directory / n) for n in remove_temps(directory, older_than=_STALE_TEMP_SECONDS)]
        for path in removed:
            logger.info("store: removed %s left by an interrupted writer", path)

    @staticmethod
    def _subdirs(directory: Path) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ reading versions

    def names(self) -> list[str]:
        """Lineage names with an archive directory, sorted.

        Concurrency: lock-free; a lineage being created concurrently may or may not be listed.
        """
        try:
            entries = os.scandir(self._archive)
        except FileNotFoundError:
            return []
        with entries:
            return sorted(
                e.name
                for e in entries
                if e.is_dir(follow_symlinks=False) and _NAME.fullmatch(e.name) and ".." not in e.name
            )

    def versions(self, name: str) -> list[int]:
        """Whole versions of `name` (final directories only, never a writer's temporary), ascending.

        Concurrency: lock-free; a version renamed into place is listed whole or not at all.
        """
        try:
            entries = os.scandir(self._archive / check_name(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return sorted(
                int(e.name) for e in entries if _VERSION.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            )

    def live_version(self, name: str) -> int | None:
        """The version `live/<name>` points at, or None when nothing is live yet.

        Concurrency: lock-free; one readlink(2), so it is the old or the new version, never neither.
        """
        link = self._live / check_name(name)
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL and link.is_dir():
                raise StoreError(
                    f"store {name}: live/{name} is a certbot-style directory, not a symlink",
                    hint="convert it once with certmgr.certbot.convert_certbot_live "
                         "(docs/store.md, 'Converting a certbot live/')",
                ) from exc
            raise StoreError(f"store {name}: cannot read live/{name}: {os_error_text(exc)}") from exc
        prefix = f"../archive/{name}/"
        if not target.startswith(prefix) or not _VERSION.fullmatch(target[len(prefix) :]):
            raise StoreError(
                f"store {name}: live/{name} points at {target!r}, not at a version in archive/{name}/",
                hint=f"point it at a whole version N atomically: `ln -s ../archive/{name}/N {link}.new && "
                     f"mv -T {link}.new {link}`",
            )
        return int(target[len(prefix) :])

    def read(self, name: str, version: int | None = None) -> CertMaterial:
        """The material of `version` (the live one when None); StoreError if absent or incomplete.

        The live link is resolved once and the files are read from the version directory, so a
        concurrent `activate` cannot hand out fullchain and privkey from different versions.
        Concurrency: lock-free; a concurrent `prune` of that very version makes it fail cleanly.
        """
        check_name(name)
        if version is None:
            version = self.live_version(name)
            if version is None:
                raise StoreError(f"store {name}: no live version", hint="issue or import the certificate first")
        vdir = self._archive / name / str(_check_version(version))
        files: dict[str, bytes] = {}
        for fname in FILES:
            try:
                files[fname] = (vdir / fname).read_bytes()
            except FileNotFoundError:
                what = "does not exist" if not vdir.is_dir() else f"is incomplete (no {fname})"
                raise StoreError(f"store {name}: version {version} {what}") from None
            except OSError as exc:
                raise StoreError(f"store {name}: cannot read version {version}/{fname}: {os_error_text(exc)}") from exc
        material = CertMaterial(cert=files["cert.pem"], chain=files["chain.pem"], privkey=files["privkey.pem"])
        if files["fullchain.pem"] != material.fullchain:
            raise StoreError(f"store {name}: version {version} is inconsistent (fullchain.pem is not cert + chain)")
        return material

    # ------------------------------------------------------------------ writing versions

    def add_version(self, name: str, material: CertMaterial) -> int:
        """Store `material` (checked first) as the next version, max + 1; it is not made live.

        The four files are written with their final modes into `archive/<name>/.tmp-<N>-<rnd>/`,
        fsynced, and the directory is renamed to `<N>`: a crash leaves no partial version.
        Concurrency: writer; hold `lock()` (enforced).
        """
        self._require_lock("add_version")
        check_name(name)
        material.check()
        existing = self.versions(name)
        version = existing[-1] + 1 if existing else 1
        self.write_version(name, version, material)
        info = material.info()
        self.audit("add_version", name, to=version, serial=info.serial, sha256=info.sha256, not_after=info.not_after)
        return version

    def write_version(self, name: str, version: int, material: CertMaterial) -> None:
        try:
            if make_dir(self._archive / name, DIR_MODE):
                fsync_dir(self._archive)
            write_version_dir(self._archive / name, version, material)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise StoreError(
                    f"store {name}: version {version} appeared while writing it (live version unchanged)",
                    hint="another writer is using the store without the lock; stop it",
                ) from exc
            raise StoreError(
                f"store {name}: cannot write version {version}: {os_error_text(exc)} (live version unchanged)"
            ) from exc

    def activate(self, name: str, version: int) -> int | None:
        """Make `version` live with one rename(2) of a temp symlink over `live/<name>`; return the previous one.

        nginx opening `live/<name>/fullchain.pem` and `privkey.pem` resolves both through the same
        link, so it never pairs files from two versions. Activating the live version is a no-op.
        Concurrency: writer; hold `lock()` (enforced). Readers see the old or the new version.
        """
        self._require_lock("activate")
        check_name(name)
        vdir = self._archive / name / str(_check_version(version))
        missing = [f for f in FILES if not (vdir / f).is_file()]
        if missing:
            what = "does not exist" if not vdir.is_dir() else f"is incomplete (no {', '.join(missing)})"
            raise StoreError(f"store {name}: cannot activate version {version}: it {what} (live version unchanged)")
        previous = self.live_version(name)
        if previous == version:
            return previous
        try:
            atomic_symlink(f"../archive/{name}/{version}", self._live / name)
        except OSError as exc:
            raise StoreError(
                f"store {name}: cannot switch live/{name} to version {version}: {os_error_text(exc)} "
                f"(live version {previous} unchanged)"
            ) from exc
        self.audit("activate", name, frm=previous, to=version)
        return previous

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete all but the `keep` newest versions, never the live one nor the one before it; return those removed.

        Each doomed version is first renamed to a temporary name, so a crash mid-delete never
        leaves a partial directory under a version number.
        Concurrency: writer; hold `lock()` (enforced). A reader of a pruned version gets StoreError.
        """
        self._require_lock("prune")
        check_name(name)
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        versions = self.versions(name)
        kept = set(versions[-keep:] if keep else [])
        live = self.live_version(name)
        if live is not None:
            kept.add(live)
            below = [v for v in versions if v < live]
            if below:
                kept.add(below[-1])  # the previous version: what a rollback goes back to
        doomed = [v for v in versions if v not in kept]
        if not doomed:
            return []
        lineage = self._archive / name
        graves: list[Path] = []
        try:
            for v in doomed:
                grave = lineage / f"{TEMP_MARK}prune-{v}-{secrets.token_hex(4)}"
                os.rename(lineage / str(v), grave)
                graves.append(grave)
            fsync_dir(lineage)
        except OSError as exc:
            raise StoreError(f"store {name}: cannot prune: {os_error_text(exc)}") from exc
        finally:
            for grave in graves:
                shutil.rmtree(grave, ignore_errors=True)
        self.audit("prune", name, removed=doomed, kept=sorted(kept))
        return doomed

    # ------------------------------------------------------------------ JSON state

    def load_state(self, name: str) -> dict[str, Any]:
        """The per-certificate state dict of `name` (`state/<name>.json`), {} when none was saved.

        Concurrency: lock-free; sees the last whole `save_state`.
        """
        state = self.load_json(f"state/{check_name(name)}.json", default={})
        if not isinstance(state, dict):
            raise StoreError(f"store {name}: state/{name}.json does not hold a JSON object")
        return state

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Replace the state of `name` atomically (0600). The schema belongs to the callers.

        Concurrency: atomic replace, last writer wins; hold `lock()` for read-modify-write.
        """
        self.save_json(f"state/{check_name(name)}.json", state)

    def load_json(self, relpath: str, default: Any = None) -> Any:
        """Parse `<root>/<relpath>` (under state/ or accounts/), `default` when it does not exist.

        Concurrency: lock-free; sees the last whole `save_json`.
        """
        path = self._json_path(relpath)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return default
        except OSError as exc:
            raise StoreError(f"store {relpath}: cannot read: {os_error_text(exc)}") from exc
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(
                f"store {relpath}: not valid JSON: {exc}",
                hint=f"restore {path} from a backup, or move it aside to start afresh",
            ) from exc

    def save_json(self, relpath: str, obj: Any, mode: int = KEY_MODE) -> None:
        """Write `obj` as JSON to `<root>/<relpath>` (under state/ or accounts/) atomically with `mode`.

        Missing parent directories are created 0700. Never put key material in `obj` unless the
        path is meant for it and `mode` is 0600.
        Concurrency: atomic replace, last writer wins; hold `lock()` for read-modify-write.
        """
        path = self._json_path(relpath)
        data = json.dumps(obj, indent=2, sort_keys=True, default=json_default).encode() + b"\n"
        try:
            self._make_parents(path)
            atomic_write(path, data, mode)
        except OSError as exc:
            raise StoreError(f"store {relpath}: cannot write: {os_error_text(exc)} (previous content kept)") from exc

    def remove_json(self, relpath: str) -> None:
        """Remove `<root>/<relpath>` (under state/ or accounts/) durably; absent is fine.

        Concurrency: hold `lock()`.
        """
        path = self._json_path(relpath)
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"store {relpath}: cannot remove: {os_error_text(exc)}") from exc

    def list_json(self, reldir: str, prefix: str = "") -> list[Any]:
        """The parsed `*.json` files anywhere under `<root>/<reldir>`, by path; unreadable ones are skipped.
        With `prefix`, only the files right in `<reldir>` whose names start with it (the others are not read).

        Concurrency: lock-free; sees whole files only (writers replace atomically).
        """
        base = self._json_path(reldir)
        found = base.glob(glob.escape(prefix) + "*.json") if prefix else base.rglob("*.json")
        out = []
        for path in sorted(found) if base.is_dir() else []:
            if path.name.startswith("."):
                continue  # a writer's temporary
            try:
                out.append(json.loads(path.read_bytes()))
            except (OSError, ValueError) as exc:
                logger.warning("store: %s: %s (skipped)", path, exc)
        return out

    def _json_path(self, relpath: str) -> Path:
        parts = relpath.split("/")
        if (
            parts[0] not in _REL_ROOTS
            or len(parts) < 2
            or not all(_REL_PART.fullmatch(p) and ".." not in p for p in parts[1:])
        ):
            raise StoreError(
                f"store: {relpath!r} is not a state path",
                hint=f"use a relative path under {' or '.join(_REL_ROOTS)}/ without '..' or hidden names",
            )
        return self.root.joinpath(*parts)

    def _make_parents(self, path: Path) -> None:
        parent = path.parent
        missing: list[Path] = []
        while parent != self.root and not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            make_dir(directory, DIR_MODE)
            fsync_dir(directory.parent)

    # ------------------------------------------------------------------ ACME account keys

    def account_key_path(self, ca_id: str) -> Path:
        """Where the ACME account key of CA `ca_id` lives (`accounts/<ca-id>/key.pem`, 0600)."""
        return self.root / "accounts" / _check_ca_id(ca_id) / "key.pem"

    def load_account_key(self, ca_id: str) -> bytes | None:
        """The account key PEM for `ca_id`, None when no account was created yet.

        Concurrency: lock-free.
        """
        try:
            return self.account_key_path(ca_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"store accounts/{ca_id}: cannot read the account key: {os_error_text(exc)}") from exc

    def save_account_key(self, ca_id: str, pem: bytes, *, replace: bool = False) -> None:
        """Save the account key for `ca_id` atomically with mode 0600.

        Refuses to overwrite an existing key unless `replace`: losing it orphans the ACME account.
        Concurrency: hold `lock()`; the existence check and the write are not one step.
        """
        path = self.account_key_path(ca_id)
        if not replace and path.exists():
            raise StoreError(
                f"store accounts/{ca_id}: an account key already exists (kept)",
                hint=f"move {path} aside first if you really mean to start a new account",
            )
        try:
            self._make_parents(path)
            atomic_write(path, pem, KEY_MODE)
        except OSError as exc:
            raise StoreError(f"store accounts/{ca_id}: cannot write the account key: {os_error_text(exc)}") from exc

    # ------------------------------------------------------------------ audit log

    def audit(
        self,
        action: str,
        obj: str,
        *,
        frm: Any = None,
        to: Any = None,
        actor: str | None = None,
        **extra: Any,
    ) -> None:
        """Append one JSON line to `audit.log`: time, actor (default: the lock's), action, object, from, to, extra.

        One write(2) on an O_APPEND descriptor, then fsync. Refuses (ValueError) a line that
        contains a PEM private key: key material never enters the audit log.
        Concurrency: safe from any number of processes without the lock; lines never interleave.
        """
        clash = sorted(set(extra) & set(_AUDIT_KEYS))
        if clash:
            raise ValueError(f"audit(): reserved keys {clash}")
        entry = {
            "time": _iso(self._clock()),
            "actor": actor if actor is not None else self._actor,
            "action": action,
            "object": obj,
            "from": frm,
            "to": to,
            **extra,
        }
        line = json.dumps(entry, sort_keys=False, default=json_default, ensure_ascii=False)
        if PEM_PRIVATE_KEY.search(line):
            raise ValueError("audit(): refusing to log private key material")
        data = line.encode() + b"\n"
        auditlog.rotate_if_large(self.root / "audit.log", self.audit_max_bytes)
        try:
            fd = os.open(self.root / "audit.log", os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, KEY_MODE)
            try:
                # a writer killed mid-line left no newline: start ours on a fresh line
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot append to audit.log: {os_error_text(exc)}") from exc

    def read_audit(self) -> Iterator[dict[str, Any]]:
        """The audit log's entries, oldest first; a line torn by a crash is skipped with a warning.

        Concurrency: lock-free; a line being appended concurrently may or may not be included.
        """
        for path in auditlog.generations(self.root / "audit.log"):
            yield from self._read_audit_file(path)

    def _read_audit_file(self, path: Path) -> Iterator[dict[str, Any]]:
        try:
            fh = open(path, "rb")  # closed by the `with` below
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot read {path.name}: {os_error_text(exc)}") from exc
        with fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    break  # being written right now, or torn by a crash
                try:
                    entry = json.loads(raw)
                except ValueError:
                    logger.warning("store: %s line %d is not JSON (torn by a crash?); skipped", path.name, lineno)
                    continue
                if isinstance(entry, dict):
                    yield entry


    def import_certbot(self, src: Path) -> list[ImportResult]:
        """Adopt the lineages of a certbot tree (certmgr.certbot.import_lineages). Writer: hold `lock()` (enforced)."""
        from certmgr.certbot import import_lineages

        self._require_lock("import_certbot")
        return import_lineages(self, Path(src))


def write_version_dir(lineage: Path, version: int, material: CertMaterial) -> None:
    """Write `material` as `lineage/<version>/` whole or not at all (temp dir, fsyncs, one rename).

    Raises OSError (ENOTEMPTY/EEXIST) when that version already exists; the temp dir is removed.
    """
    tmp = lineage / f"{TEMP_MARK}{_check_version(version)}-{secrets.token_hex(4)}"
    try:
        os.mkdir(tmp, DIR_MODE)
        os.chmod(tmp, DIR_MODE)
        for fname, data in material.files().items():
            create_file(tmp / fname, data, KEY_MODE if fname == "privkey.pem" else PEM_MODE)
        fsync_dir(tmp)
        os.rename(tmp, lineage / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(lineage)
