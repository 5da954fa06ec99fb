"""Gather one host's findings over SSH (nginx -T, the certificate-reading script) and by handshakes.

Every host is one task: an expected failure (unreachable, `nginx -T` failing, garbage or a huge
dump) becomes that host's `HostScan.error`, so one bad POP never affects another. Every wait is
bounded; every byte read from a host is bounded too.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import importlib.resources
import logging
import posixpath
import shlex
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from certmgr import remote as remote_mod
from certmgr.discover.model import FileRead, HostScan, Report, Served, analyze, handshake_targets, read_pem
from certmgr.discover.nginxconf import Config, DumpError, parse_dump
from certmgr.discover.text import clean
from certmgr.errors import DeployError
from certmgr.inventory import Host, Inventory
from certmgr.material import CertInfo
from certmgr.sshlib import asyncssh

logger = logging.getLogger(__name__)

SCRIPT = importlib.resources.files("certmgr.discover").joinpath("readcerts.sh").read_text()
KEY_SCRIPT = importlib.resources.files("certmgr.discover").joinpath("checkkeys.sh").read_text()


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on what one host may send and make us do."""

    dump_bytes: int = 8 * 1024 * 1024  # nginx -T output
    file_bytes: int = 64 * 1024  # one certificate file
    certs: int = 2000  # distinct ssl_certificate paths per host
    found_files: int = 500  # certificate files looked at for orphans per host
    stderr_bytes: int = 16 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect: float = 10.0
    dump: float = 30.0  # nginx -T
    read: float = 30.0  # the certificate-reading script
    handshake: float = 5.0


class _TooLarge(Exception):
    pass


async def run_bounded(remote: remote_mod.Remote, command: str, *, limit: int, stderr_limit: int,
                      timeout: float, step: str) -> tuple[int, bytes, bytes]:
    """Run `command` (already quoted); (exit status, stdout, stderr), stdout at most `limit` bytes.

    Raises _TooLarge when stdout exceeds `limit` (the channel is closed at once: nothing more is
    read), RemoteTimeout, or ConnectionLost.
    """
    where = f"{remote.host.name} ({remote.host.address}:{remote.host.port})"
    try:
        async with asyncio.timeout(timeout):
            proc = await remote.conn.create_process(command, stdin=asyncssh.DEVNULL, encoding=None)
            try:
                async def drain(stream: asyncssh.SSHReader[bytes], cap: int, hard: bool) -> bytes:
                    buf = bytearray()
                    while True:
                        chunk = await stream.read(65536)
                        if not chunk:
                            return bytes(buf)
                        if len(buf) + len(chunk) > cap:
                            if hard:
                                raise _TooLarge
                            buf += chunk[: cap - len(buf)]
                            continue  # keep draining stderr so the command is not blocked
                        buf += chunk

                out, err = await asyncio.gather(drain(proc.stdout, limit, True), drain(proc.stderr, stderr_limit,
                                                                                         False))
                await proc.wait()
            finally:
                proc.close()
    except TimeoutError as exc:
        raise remote_mod.RemoteTimeout(f"{step} {where}: no answer within {timeout:g}s") from exc
    except (asyncssh.Error, OSError) as exc:
        raise remote_mod.ConnectionLost(f"{step} {where}: connection lost: {remote_mod.describe_exc(exc)}") from exc
    status = proc.exit_status if proc.exit_status is not None else -1
    return status, out, err


def _first_line(data: bytes) -> str:
    """The line that says why: nginx's first [emerg]/[alert]/[crit] line, else the last line."""
    text = data.decode("utf-8", "replace").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    why = next((ln for ln in lines if any(f"[{lv}]" in ln for lv in ("emerg", "alert", "crit"))), None)
    return clean(why or (lines[-1] if lines else ""), 300)


async def _dump(remote: remote_mod.Remote, host: Host, limits: Limits, timeouts: Timeouts) -> Config:
    argv = host.dump_command
    shown = clean(" ".join(argv), 200)
    try:
        status, out, err = await run_bounded(remote, shlex.join(argv), limit=limits.dump_bytes,
                                             stderr_limit=limits.stderr_bytes, timeout=timeouts.dump, step="discover")
    except _TooLarge:
        raise DeployError(f"discover {host.name}: `{shown}` printed more than {limits.dump_bytes // 1024} KiB "
                          "(stopped reading; nothing parsed)",
                          hint="raise the limit only if the configuration really is that large") from None
    if status != 0:
        raise DeployError(f"discover {host.name}: `{shown}` exited {status}: {_first_line(err) or '(no output)'} "
                          "(nothing parsed)",
                          hint="run it by hand as the deploy user; sudoers must allow it without a password "
                               "(dump_command in [hosts.*] or [defaults])")
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        text = out.decode("utf-8", "replace")
    try:
        # crossplane is pure Python (about 2 s per MiB here): off the event loop, so other hosts' SSH
        # sessions and handshakes keep moving while a large configuration is parsed
        return await asyncio.to_thread(parse_dump, text)
    except DumpError as exc:
        raise DeployError(f"discover {host.name}: `{shown}` output is not an nginx configuration dump: "
                          f"{clean(str(exc), 300)} (nothing parsed)") from exc


def _usable_path(p: str) -> bool:
    return p.startswith("/") and "\0" not in p and len(p) <= 4096


async def _read_files(remote: remote_mod.Remote, host: Host, cfg: Config, limits: Limits,
                      timeouts: Timeouts) -> tuple[dict[str, FileRead], dict[tuple[str, str], str],
                                                  tuple[FileRead, ...], list[str]]:
    problems: list[str] = []
    pairs: dict[tuple[str, str], None] = {}
    for sb in cfg.servers:
        for ref in sb.certs:
            if ref.dynamic or not _usable_path(ref.certificate):
                continue
            key = ref.key if ref.key is not None and _usable_path(ref.key) else ""
            pairs[(ref.certificate, key)] = None
    pair_list = list(pairs)
    if len(pair_list) > limits.certs:
        problems.append(f"{len(pair_list)} certificate/key pairs configured; only the first {limits.certs} read")
        pair_list = pair_list[: limits.certs]
    cert_list = list(dict.fromkeys(c for c, _ in pair_list))
    dirs = list(dict.fromkeys(posixpath.dirname(c) for c in cert_list))
    args = [str(limits.file_bytes), str(limits.found_files), str(len(cert_list)), host.cert_root.rstrip("/") + "/live",
            *cert_list, *dirs]
    budget = (len(cert_list) + limits.found_files) * (limits.file_bytes * 2 + 8192) + 65536
    try:
        status, out, err = await run_bounded(remote, remote_mod.sh_command(SCRIPT, args), limit=budget,
                                             stderr_limit=limits.stderr_bytes, timeout=timeouts.read,
                                             step="discover")
    except _TooLarge:
        raise DeployError(f"discover {host.name}: reading certificate files printed more than expected "
                          "(stopped reading)") from None
    tokens = out.split(b"\0")
    if status != 0 or len(tokens) < 2 or tokens[-2] != b"done":
        raise DeployError(f"discover {host.name}: reading certificate files failed (exit {status}): "
                          f"{_first_line(err) or '(no output)'}")
    certs: list[tuple[str, str, str]] = []  # (configured path, status, real path)
    candidates: list[str] = []
    contents: dict[str, bytes] = {}
    reals: list[str] | None = None  # the real paths of the ok files, in order (one readlink on the host)
    i = 0
    while i < len(tokens) - 2:
        kind = tokens[i]
        if kind == b"cert" and i + 3 < len(tokens):
            idx, st_b, real_b = tokens[i + 1:i + 4]
            i += 4
            if idx.isdigit() and int(idx) < len(cert_list):
                certs.append((cert_list[int(idx)], st_b.decode("ascii", "replace"), _path(real_b)))
        elif kind == b"reals":
            try:
                end = tokens.index(b"endreals", i + 1)
            except ValueError:
                raise DeployError(f"discover {host.name}: reading certificate files: unexpected output "
                                  "(no end of the real paths)") from None
            reals = [_path(t) for t in tokens[i + 1:end]]
            i = end + 1
        elif kind == b"file" and i + 1 < len(tokens):
            candidates.append(_path(tokens[i + 1]))
            i += 2
        elif kind == b"pem" and i + 1 < len(tokens):
            contents = _pem_blocks(tokens[i + 1], limits)
            i += 2
        else:
            raise DeployError(f"discover {host.name}: reading certificate files: unexpected output "
                              f"{clean(kind.decode('utf-8', 'replace'), 40)!r}")
    ok = [k for k, (_, st, real) in enumerate(certs) if st == "ok" and not real]
    if reals is not None and len(reals) == len(ok):  # else (a file gone meanwhile) each keeps its own path
        for k, real in zip(ok, reals, strict=True):
            certs[k] = (certs[k][0], certs[k][1], real)
    files: dict[str, FileRead] = {}
    for c, st, real in certs:
        if st == "ok" and c not in contents:
            st = "not-a-certificate"
        files[c] = read_pem(c, real or c, st, contents.get(c))
    found: dict[str, FileRead] = {}
    for path in candidates:
        fr = read_pem(path, path, "ok", contents.get(path))
        if fr.info is not None:
            found.setdefault(path, fr)
    keys = await _check_keys(remote, host, [(c, k) for c, k in pair_list if k], files, limits, timeouts)
    return files, keys, tuple(found.values()), problems


async def _check_keys(remote: remote_mod.Remote, host: Host, pairs: list[tuple[str, str]],
                      files: dict[str, FileRead], limits: Limits, timeouts: Timeouts) -> dict[tuple[str, str], str]:
    """Each key checked on the host against the public key of the certificate read with it."""
    keys: dict[tuple[str, str], str] = {}
    todo = []
    for c, k in pairs:
        fr = files.get(c)
        if fr is None or not fr.public_key_pem:
            keys[(c, k)] = "unchecked"
        else:
            todo.append((c, k, fr.public_key_pem))
    if not todo:
        return keys
    args = [str(len(todo))]
    for _, k, pem in todo:
        args += [k, pem]
    # the certificate paths last: one openssl checks every pair when they all match (checkkeys.sh)
    args += [c for c, _, _ in todo]
    try:
        status, out, err = await run_bounded(remote, remote_mod.sh_command(KEY_SCRIPT, args),
                                             limit=64 * len(todo) + 1024, stderr_limit=limits.stderr_bytes,
                                             timeout=timeouts.read, step="discover")
    except _TooLarge:
        raise DeployError(f"discover {host.name}: checking keys printed more than expected (stopped reading)") from None
    tokens = out.split(b"\0")
    if status != 0 or len(tokens) < 2 or tokens[-2] != b"done":
        raise DeployError(f"discover {host.name}: checking keys failed (exit {status}): "
                          f"{_first_line(err) or '(no output)'}")
    for j in range(0, len(tokens) - 2, 3):
        kind, idx, st = tokens[j:j + 3]
        if kind == b"key" and idx.isdigit() and int(idx) < len(todo) and st in _KEY_STATUSES:
            c, k, _ = todo[int(idx)]
            keys[(c, k)] = st.decode()
    return keys


_KEY_STATUSES = {b"match", b"mismatch", b"unreadable", b"missing", b"unchecked"}


def _path(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pem_blocks(b64: bytes, limits: Limits) -> dict[str, bytes]:
    """The script's `pem` field → {path: certificate lines}: "F<escaped path>" starts a file, "|" a line."""
    try:
        text = base64.b64decode(b"".join(b64.split()), validate=True)
    except ValueError:
        return {}
    out: dict[str, bytearray] = {}
    current: bytearray | None = None
    for line in text.split(b"\n"):
        if line.startswith(b"F"):
            name = _path(line[1:]).replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")
            current = out[name] = bytearray()  # a file read twice (configured and found) counts once
        elif line.startswith(b"|") and current is not None and len(current) <= limits.file_bytes:
            current += line[1:] + b"\n"
    return {k: bytes(v) for k, v in out.items() if v}


async def _handshakes(host: Host, cfg: Config, sem: asyncio.Semaphore, timeout: float) -> dict[tuple[int, str], Served]:
    from certmgr.scan import probe

    async def one(port: int, sni: str) -> tuple[tuple[int, str], Served]:
        async with sem:
            p = await probe(host.address, port, sni, connect_timeout=timeout, handshake_timeout=timeout)
        if not p.ok:
            return (port, sni), Served(error=p.error or "no certificate")
        info = CertInfo.from_der(p.chain[0])
        pem = ssl.DER_cert_to_PEM_cert(p.chain[0])
        return (port, sni), Served(sha256=info.sha256, serial=info.serial, info=info, leaf_pem=pem)

    results = await asyncio.gather(*(one(port, sni) for port, sni in handshake_targets(cfg)))
    return dict(results)


async def discover_host(host: Host, *, jump: Host | None, accept_new: bool, limits: Limits, timeouts: Timeouts,
                        handshake_sem: asyncio.Semaphore) -> HostScan:
    """One host's findings; every expected failure is returned as `HostScan.error`, never raised."""
    rt = remote_mod.Timeouts(connect=timeouts.connect, command=max(timeouts.dump, timeouts.read))
    try:
        async with remote_mod.connect(host, jump=jump, accept_new=accept_new, timeouts=rt) as remote:
            cfg = await _dump(remote, host, limits, timeouts)
            reads, served = await asyncio.gather(
                _read_files(remote, host, cfg, limits, timeouts),
                _handshakes(host, cfg, handshake_sem, timeouts.handshake))
    except DeployError as exc:
        logger.info("discover %s: %s", host.name, clean(exc.message, 300))
        return HostScan(host=host.name, address=host.address, cert_root=host.cert_root,
                        error=clean(exc.message, 2000))
    files, keys, found, notes = reads
    logger.info("discover %s: %d files, %d server blocks, %d certificate files, %d handshakes", host.name,
                len(cfg.files), len(cfg.servers), len(files), len(served))
    return HostScan(host=host.name, address=host.address, cert_root=host.cert_root, config=cfg, files=files,
                    keys=keys, found=found, served=served, notes=tuple(notes))


async def discover(inventory: Inventory, hosts: Sequence[Host], *, now: dt.datetime, parallel: int = 20,
                   accept_new: bool = False, limits: Limits = Limits(), timeouts: Timeouts = Timeouts()) -> Report:
    """Discover every host in `hosts` (at most `parallel` at once) and analyse the fleet."""
    t0 = time.monotonic()
    sem = asyncio.Semaphore(parallel)
    handshake_sem = asyncio.Semaphore(200)
    scans: list[HostScan | None] = [None] * len(hosts)

    async def one(i: int, host: Host) -> None:
        async with sem:
            jump = inventory.hosts.get(host.jump) if host.jump else None
            scans[i] = await discover_host(host, jump=jump, accept_new=accept_new, limits=limits,
                                           timeouts=timeouts, handshake_sem=handshake_sem)

    async with asyncio.TaskGroup() as tg:
        for i, h in enumerate(hosts):
            tg.create_task(one(i, h))
    done = [s for s in scans if s is not None]
    return analyze(done, lineages=[c.name for c in inventory.certificates], now=now, elapsed=time.monotonic() - t0)
