"""Adopting certbot: import its lineages into the store, and convert a POP's certbot `live/<name>/` in place.

certbot keeps `archive/<name>/{cert,chain,fullchain,privkey}K.pem` and a `live/<name>/` directory of
per-file links; certmgr keeps `archive/<name>/<K>/` and `live/<name> -> ../archive/<name>/<K>`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from certmgr import sanitize
from certmgr.errors import StoreError
from certmgr.fsutil import TEMP_MARK, exchange, fsync_dir, temp_name
from certmgr.material import CertMaterial, MaterialError
from certmgr.store import Store, check_name, os_error_text, write_version_dir

logger = logging.getLogger(__name__)

_CERTBOT_FILE = re.compile(r"(cert|chain|fullchain|privkey)([1-9][0-9]{0,8})\.pem")

@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """What `Store.import_certbot` did with one certbot lineage."""

    name: str
    imported: tuple[int, ...] = ()  # versions copied in by this call
    present: tuple[int, ...] = ()  # already in the store with identical bytes (re-import)
    skipped: tuple[tuple[int, str], ...] = ()  # (version, reason) left out
    certbot_live: int | None = None  # the version certbot's live/<name>/ points at
    activated: int | None = None  # the version this call made live, None if live was left alone
    problem: str | None = None  # why the lineage (or its activation) was not handled


def import_lineages(store: Store, src: Path) -> list[ImportResult]:
    """Adopt the lineages of a certbot tree (`/etc/letsencrypt`), keeping certbot's version numbers.

    Lineages come from `renewal/*.conf` and `live/*/`; every `archive/<name>/{cert,chain,
    fullchain,privkey}K.pem` becomes version K unless it fails `material.check()` (skipped and
    reported). certbot's current version is made live when everything in our lineage came
    from certbot; once certmgr has added versions of its own, live is left alone. The source
    is only read. Re-importing skips versions already present with identical bytes.
    Concurrency: writer; the caller holds `lock()` (Store.import_certbot enforces it).
    """
    src = Path(src)
    names: set[str] = set()
    renewal = src / "renewal"
    if renewal.is_dir():
        names.update(p.name[: -len(".conf")] for p in renewal.iterdir() if p.name.endswith(".conf"))
    if (src / "live").is_dir():
        names.update(p.name for p in (src / "live").iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise StoreError(
            f"import {src}: no certbot lineages (no renewal/*.conf, no live/*/)",
            hint="point it at certbot's config directory, usually /etc/letsencrypt",
        )
    return [_import_lineage(store, src, name) for name in sorted(names)]

def _import_lineage(store: Store, src: Path, name: str) -> ImportResult:
    try:
        check_name(name)
    except StoreError as exc:  # a file name found on disk is foreign text: shown inert
        return ImportResult(name=sanitize.line(name), problem=str(exc))
    archive = _certbot_archive_dir(src, name)
    if archive is None:
        return ImportResult(name=name, problem=f"import {name}: no archive directory in {src}")
    imported: list[int] = []
    present: list[int] = []
    skipped: list[tuple[int, str]] = []
    have = set(store.versions(name))
    try:
        found = _certbot_versions(archive)
    except OSError as exc:
        return ImportResult(name=name, problem=f"import {name}: cannot list {sanitize.line(str(archive))}: "
                                              f"{os_error_text(exc)}")
    for version, paths in sorted(found.items()):
        material, reason = _certbot_material(version, paths)
        if material is None:
            skipped.append((version, reason))
        elif version in have:
            try:
                same = _same(store.read(name, version), material)
            except StoreError:
                same = False
            if same:
                present.append(version)
            else:
                skipped.append((version, f"version {version} already in the store with different content"))
        else:
            store.write_version(name, version, material)
            imported.append(version)
    for version, reason in skipped:
        logger.warning("import %s: version %d skipped: %s", name, version, reason)
    certbot_live, problem = _certbot_live_version(src / "live" / name)
    activated = None
    ours = set(imported) | set(present)
    if certbot_live is not None and problem is None:
        if certbot_live not in ours:
            problem = f"import {name}: certbot's live version {certbot_live} was not imported; live left alone"
        elif not set(store.versions(name)) <= ours:
            problem = f"import {name}: certmgr has versions of its own; live left alone"
        elif store.live_version(name) != certbot_live:
            store.activate(name, certbot_live)
            activated = certbot_live
    elif certbot_live is None and problem is None and ours and store.live_version(name) is None:
        # No certbot live/<name>/ to follow (a copied archive): the newest whole version is the
        # best guess, and leaving nothing live would make the next run order a new certificate.
        activated = max(ours)
        store.activate(name, activated)
        logger.warning("import %s: no certbot live/%s/; made the newest version %d live", name, name, activated)
    if imported:
        store.audit("import", name, to=activated or certbot_live, source=str(src.resolve()), versions=imported,
                   skipped=skipped)
    return ImportResult(
        name=name,
        imported=tuple(imported),
        present=tuple(present),
        skipped=tuple(skipped),
        certbot_live=certbot_live,
        activated=activated,
        problem=problem,
    )


def _same(a: CertMaterial, b: CertMaterial) -> bool:
    return a.cert == b.cert and a.chain == b.chain and a.privkey == b.privkey


def _certbot_archive_dir(src: Path, name: str) -> Path | None:
    """`<src>/archive/<name>`, or the renewal conf's `archive_dir` when the tree was copied from elsewhere."""
    default = src / "archive" / name
    if default.is_dir():
        return default
    conf = src / "renewal" / f"{name}.conf"
    try:
        text = conf.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            break  # [renewalparams] and later sections hold no paths
        key, sep, value = line.partition("=")
        if sep and key.strip() == "archive_dir" and Path(value.strip()).is_dir():
            return Path(value.strip())
    return None


def _certbot_versions(archive: Path) -> dict[int, dict[str, Path]]:
    versions: dict[int, dict[str, Path]] = {}
    for path in archive.iterdir():
        m = _CERTBOT_FILE.fullmatch(path.name)
        if m:
            versions.setdefault(int(m.group(2)), {})[m.group(1)] = path
    return versions


def _certbot_material(version: int, paths: dict[str, Path]) -> tuple[CertMaterial | None, str]:
    missing = [f"{kind}{version}.pem" for kind in ("cert", "chain", "privkey") if kind not in paths]
    if missing:
        return None, f"missing {', '.join(missing)}"
    try:
        data = {kind: path.read_bytes() for kind, path in paths.items()}
    except OSError as exc:
        return None, f"unreadable: {os_error_text(exc)}"
    material = CertMaterial(cert=data["cert"], chain=data["chain"], privkey=data["privkey"])
    if "fullchain" in data and data["fullchain"] != material.fullchain:
        return None, f"fullchain{version}.pem is not cert{version}.pem + chain{version}.pem"
    try:
        material.check()
    except MaterialError as exc:
        return None, exc.message
    return material, ""


def _certbot_live_version(live_dir: Path) -> tuple[int | None, str | None]:
    """The K that certbot's `live/<name>/*.pem` links point at, or (None, why not)."""
    if not live_dir.is_dir() or live_dir.is_symlink():
        return None, None if not live_dir.exists() else f"live/{live_dir.name} is not a certbot live directory"
    targets: dict[str, int] = {}
    for kind in ("cert", "chain", "fullchain", "privkey"):
        try:
            m = _CERTBOT_FILE.fullmatch(os.path.basename(os.readlink(live_dir / f"{kind}.pem")))
        except OSError:
            m = None
        if m is None or m.group(1) != kind:
            return None, f"live/{live_dir.name}/{kind}.pem is not a link to archive/{live_dir.name}/{kind}K.pem"
        targets[kind] = int(m.group(2))
    if len(set(targets.values())) != 1:
        shown = ", ".join(f"{k}→{v}" for k, v in targets.items())
        return None, f"certbot's live/{live_dir.name} links disagree ({shown}); live left alone"
    return targets["fullchain"], None


def convert_certbot_live(cert_root: Path, name: str) -> int:
    """Once, in place: turn certbot's `live/<name>/` (four per-file links) into `live/<name> -> ../archive/<name>/<K>`.

    Copies certbot's current version K to `archive/<name>/<K>/` (certbot's flat files stay), then
    swaps the directory for the symlink with renameat2(RENAME_EXCHANGE) — atomic — or, where
    that is unsupported, two back-to-back renames (a window of microseconds without
    `live/<name>`; a crash inside it is undone by the next call). Idempotent; returns K.
    Concurrency: nothing else (certbot included) may touch the lineage meanwhile.
    """
    check_name(name)
    live_root = Path(cert_root) / "live"
    live_dir = live_root / name
    backup = live_root / f".{name}.certbot-old"  # not a temp name: it must survive until recovered
    for leftover in os.listdir(live_root) if live_root.is_dir() else []:
        if leftover.startswith(f".{name}{TEMP_MARK}"):  # an earlier call died before cleaning up
            path = live_root / leftover
            if path.is_symlink():
                os.unlink(path)
            else:
                shutil.rmtree(path)
    if not os.path.lexists(live_dir) and backup.is_dir():
        os.rename(backup, live_dir)  # crashed between the two fallback renames: put certbot's dir back
        fsync_dir(live_root)
    if live_dir.is_symlink():
        version = Store(Path(cert_root)).live_version(name)
        if version is None:
            raise StoreError(f"convert {name}: live/{name} is a dangling symlink")
        if backup.is_dir():
            shutil.rmtree(backup)
        return version
    version, problem = _certbot_live_version(live_dir)
    if version is None:
        raise StoreError(f"convert {name}: {problem or f'no live/{name} in {cert_root}'}")
    lineage = Path(cert_root) / "archive" / name
    if not lineage.is_dir():
        raise StoreError(f"convert {name}: no archive/{name} in {cert_root} (nothing changed)")
    material, reason = _certbot_material(version, _certbot_versions(lineage).get(version, {}))
    if material is None:
        raise StoreError(f"convert {name}: certbot's live version {version} is unusable: {reason} (nothing changed)")
    vdir = lineage / str(version)
    if not vdir.is_dir():
        write_version_dir(lineage, version, material)
    elif not _same(Store(Path(cert_root)).read(name, version), material):
        raise StoreError(f"convert {name}: archive/{name}/{version}/ exists with other content (nothing changed)")
    tmp = live_root / temp_name(name)
    os.symlink(f"../archive/{name}/{version}", tmp)
    try:
        if exchange(tmp, live_dir):
            shutil.rmtree(tmp)  # now certbot's old directory of links
        else:
            os.rename(live_dir, backup)  # window opens: live/<name> is missing ...
            try:
                os.rename(tmp, live_dir)  # ... and closes, one syscall later
            except BaseException:
                os.rename(backup, live_dir)
                raise
            fsync_dir(live_root)
            shutil.rmtree(backup)
    except BaseException:
        if tmp.is_symlink():
            os.unlink(tmp)
        raise
    fsync_dir(live_root)
    logger.info("convert %s: live/%s -> ../archive/%s/%d", name, name, name, version)
    return version
