"""DNS-01 through a program, with lego's exec-provider contract, so hooks written for lego work unchanged.

Default mode: `PROGRAM present _acme-challenge.NAME. VALUE` and `PROGRAM cleanup _acme-challenge.NAME. VALUE`.
Raw mode (lego's `EXEC_MODE=RAW`): `PROGRAM present DOMAIN TOKEN KEY_AUTHORIZATION` (and cleanup).
argv only, never a shell; a minimal environment plus the declared secrets (never on the command line);
bounded time (the whole process group is killed); output bounded, made inert and secrets masked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from certmgr import sanitize
from certmgr.dns import DNSChange, TXTRecord, ZoneUpdate, log_failed_cleanups, typed_config
from certmgr.dns.diagnosis import FAIL, OK, Finding, Timer, check_nameservers
from certmgr.dns.static import StaticNameservers, servers
from certmgr.errors import CertmgrError, DNSError
from certmgr.log import Secret, event
from certmgr.model import DNSProvider, SecretRef, duration_text
from certmgr.reader import Reader

log = logging.getLogger(__name__)

KEYS = frozenset({"program", "mode", "timeout", "env"})
SECRET_KEYS: frozenset[str] = frozenset()
FIRST_CHECK = "program"  # the name of diagnose()'s first finding
NEEDS_NAMESERVERS = True
MODES = ("default", "raw")
OUTPUT_LIMIT = 16 * 1024  # bytes kept of each of stdout and stderr (the rest is read and dropped)
PARALLEL = 8  # programs running at once per provider
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_SECRET_SUFFIXES = ("_file", "_credential", "_env")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecConfig:
    """`[dns.NAME]` with `type = "exec"`: the program (argv), the mode, its time limit and its environment."""

    program: tuple[str, ...]
    mode: str = "default"
    timeout: float = 30.0
    env: tuple[tuple[str, str], ...] = ()  # literal values (not secret)
    secret_env: tuple[tuple[str, SecretRef], ...] = ()  # NAME → where its value is read from

    def secrets(self) -> tuple[SecretRef, ...]:
        return tuple(ref for _, ref in self.secret_env)

    def shown(self) -> dict[str, object]:
        return {"program": list(self.program), "mode": self.mode, "timeout": self.timeout,
                "env": {**dict(self.env), **{n: ref.shown() for n, ref in self.secret_env}}}

    def toml(self) -> tuple[tuple[str, object], ...]:
        env = {**dict(self.env), **{f"{n}_{ref.kind}": ref.where for n, ref in self.secret_env}}
        return (("program", list(self.program)), ("mode", self.mode), ("timeout", duration_text(self.timeout)),
                ("env", env or None))


def parse_config(r: Reader, t: dict[str, Any], kp: str) -> ExecConfig:
    """`program` (argv, absolute path), `mode`, `timeout`, and `[dns.NAME.env]`: NAME = "literal", or
    NAME_file / NAME_credential / NAME_env = where a secret value comes from."""
    program = r.argv(t, "program", kp, ())
    if "program" not in t:
        r.err(f"{kp}.program", 'required: the hook as argv, e.g. ["/usr/local/bin/dns-hook"]')
    elif program and not program[0].startswith("/"):
        r.err(f"{kp}.program[0]", f"{program[0]!r} must be an absolute path (no $PATH search)")
    if isinstance(t.get("mode"), str):  # lego spells it EXEC_MODE=RAW
        t = {**t, "mode": t["mode"].lower()}
    mode = r.choice(t, "mode", kp, MODES, "default") or "default"
    timeout = r.duration(t, "timeout", kp, 30.0)
    env: list[tuple[str, str]] = []
    secret_env: list[tuple[str, SecretRef]] = []
    table = r.get(t, "env", kp, dict, default={})
    for key, value in table.items():
        ekp = f"{kp}.env.{key}"
        suffix = next((s for s in _SECRET_SUFFIXES if key.endswith(s)), None)
        name = key.removesuffix(suffix) if suffix else key
        if not _ENV_NAME.fullmatch(name):
            r.err(ekp, f"{name!r} is not an environment variable name (A-Z, 0-9, _)")
            continue
        if suffix:
            ref = r.secret(table, name, f"{kp}.env", required=False)
            if ref is not None:
                secret_env.append((name, ref))
        elif not isinstance(value, str):
            r.err(ekp, f"must be a string, not {type(value).__name__}")
        elif "\x00" in value or "\n" in value:
            r.err(ekp, "contains a NUL or newline")
        else:
            env.append((name, value))
    names = [n for n, _ in env] + [n for n, _ in secret_env]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        r.err(f"{kp}.env.{dup}", "given more than once")
    return ExecConfig(program=program, mode=mode, timeout=timeout, env=tuple(env), secret_env=tuple(secret_env))


def config_of(cfg: DNSProvider) -> ExecConfig:
    return typed_config(cfg, ExecConfig, "exec")


def build(cfg: DNSProvider) -> ExecProvider:
    """Validated now: every secret read, the program present and executable."""
    conf = config_of(cfg)
    secrets = tuple((name, Secret(ref.read())) for name, ref in conf.secret_env)
    prog = conf.program[0]
    if not os.path.isfile(prog) or not os.access(prog, os.X_OK):
        raise DNSError(f"dns provider {cfg.name}: program {prog} is not an executable file (nothing run)",
                       hint=f"check program = [...] in [dns.{cfg.name}]")
    return ExecProvider(cfg, secrets)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ran:
    """One run of the program: exit status (None: killed at the time limit) and its output, secrets masked."""

    status: int | None
    stdout: str
    stderr: str

    def tail(self) -> str:
        """The last lines it printed (stderr, else stdout), as one inert line."""
        lines = [ln for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        return sanitize.line(" | ".join(ln.strip() for ln in lines[-3:]), limit=300)


class ExecProvider(StaticNameservers):
    """Runs the program once per record; safe for concurrent use (at most PARALLEL runs at a time)."""

    def __init__(self, cfg: DNSProvider, secrets: Sequence[tuple[str, Secret]]) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.conf = config_of(cfg)
        self._secrets = tuple(secrets)
        self._sem = asyncio.Semaphore(PARALLEL)
        self.on_change: DNSChange | None = None

    def __repr__(self) -> str:
        return f"ExecProvider({self.name!r}, program={self.conf.program[0]!r}, mode={self.conf.mode!r})"

    def argv(self, action: str, r: TXTRecord) -> tuple[str, ...] | None:
        if self.conf.mode == "raw":
            if r.token is None or r.key_authorization is None:
                return None
            return (*self.conf.program, action, r.domain.removeprefix("*."), r.token, r.key_authorization)
        return (*self.conf.program, action, r.fqdn.rstrip(".") + ".", r.value)

    def environment(self) -> dict[str, str]:
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", **dict(self.conf.env)}
        env.update((n, s.reveal()) for n, s in self._secrets)
        return env

    def mask(self, text: str) -> str:
        """Secret values the program was given, masked whatever their length (it may print them)."""
        for _, s in sorted(self._secrets, key=lambda p: -len(p[1].reveal())):
            if s.reveal():
                text = text.replace(s.reveal(), "***")
        return text

    async def run(self, argv: Sequence[str]) -> Ran:
        """Run `argv` (no shell) in its own process group; at the time limit the whole group is killed.

        The output pipes are ours, not asyncio's: asyncio's `Process.wait()` also waits for its pipes
        to close, so a background child holding stdout would make a finished program look hung.
        """
        async with self._sem:
            loop = asyncio.get_running_loop()
            fds = [*os.pipe(), *os.pipe()]  # out_r, out_w, err_r, err_w
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fds[1], stderr=fds[3], env=self.environment(),
                    start_new_session=True, cwd="/")
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            os.close(fds[1])
            os.close(fds[3])
            readers: list[asyncio.StreamReader] = []
            transports: list[asyncio.BaseTransport] = []
            for fd in (fds[0], fds[2]):
                reader = asyncio.StreamReader()
                read_end, _ = await loop.connect_read_pipe(functools.partial(asyncio.StreamReaderProtocol, reader),
                                                           os.fdopen(fd, "rb", 0))
                readers.append(reader)
                transports.append(read_end)
            reading = [asyncio.ensure_future(_bounded(r)) for r in readers]
            status: int | None = None
            try:
                async with asyncio.timeout(self.conf.timeout):
                    status = await proc.wait()
            except TimeoutError:
                status = None
            finally:
                _kill_group(proc.pid)  # the hung program, or whatever it left running in its group
                if proc.returncode is None:
                    await proc.wait()
            try:
                async with asyncio.timeout(2.0):  # EOF comes once the group is gone
                    out, err = await asyncio.gather(*reading)
            except TimeoutError:  # something that left the group (setsid) still holds the pipes
                for t in reading:
                    t.cancel()
                out, err = b"", b""
            finally:
                for pipe in transports:
                    pipe.close()
        return Ran(status=status, stdout=self._inert(out), stderr=self._inert(err))

    def _inert(self, data: bytes) -> str:
        """Decoded with the secrets masked; made inert (sanitize.line) where it is shown."""
        return self.mask(data.decode("utf-8", "replace"))

    async def present(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        """`PROGRAM present …` once per record, concurrently; one result per record."""
        return tuple(await asyncio.gather(*(self._one("present", r) for r in records)))

    async def cleanup(self, records: Sequence[TXTRecord]) -> tuple[ZoneUpdate, ...]:
        """`PROGRAM cleanup …` once per record; failures are logged, never raised."""
        done = tuple(await asyncio.gather(*(self._one("cleanup", r) for r in records)))
        log_failed_cleanups(log, self.name, done)
        return done

    async def _one(self, action: str, r: TXTRecord) -> ZoneUpdate:
        add = action == "present"
        outcome = "(TXT not written)" if add else "(TXT may be left behind)"
        prog = os.path.basename(self.conf.program[0])
        step = f"dns {action} {r.fqdn} via {prog}"
        argv = self.argv(action, r)
        if argv is None:
            return ZoneUpdate(zone=r.zone, records=(r,), applied=False, error=DNSError(
                f"{step}: raw mode needs the challenge token and key authorization, and this record has none "
                f"(nothing run) {outcome}", hint="remove the record by hand; later runs journal both"))
        try:
            ran = await self.run(argv)
        except OSError as exc:  # nothing ran
            return ZoneUpdate(zone=r.zone, records=(r,), applied=False, error=DNSError(
                f"{step}: cannot run {self.conf.program[0]}: {exc.strerror} {outcome}",
                hint=f"check program = [...] in [dns.{self.name}]"))
        if ran.status == 0:
            event(log, logging.DEBUG, f"challenge TXT {action}", provider=self.name, zone=r.zone, name=r.fqdn)
            if self.on_change is not None:
                self.on_change("dns published" if add else "dns removed", r.zone, (r,))
            return ZoneUpdate(zone=r.zone, records=(r,), applied=True)
        said = f": {ran.tail()}" if ran.tail() else ""
        # A program that failed or was killed may have changed DNS before it stopped: the outcome is unknown,
        # so the record stays journaled and is cleaned up.
        if ran.status is None:
            why = f"still running after {self.conf.timeout:g}s, killed"
            hint = f"the program hangs; raise timeout in [dns.{self.name}] only if it is merely slow"
        else:
            why = f"exited with status {ran.status}" if ran.status > 0 else f"killed by signal {-ran.status}"
            hint = "run the program by hand with the same arguments to see why"
        unknown = "(TXT may have been written; it is removed again)" if add else outcome
        return ZoneUpdate(zone=r.zone, records=(r,), applied=None,
                          error=DNSError(f"{step}: {why}{said} {unknown}", hint=hint))


async def _bounded(stream: asyncio.StreamReader) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < OUTPUT_LIMIT:
            kept += chunk[:OUTPUT_LIMIT - len(kept)]
    return bytes(kept)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def diagnose(cfg: DNSProvider, zone: str, *, timeout: float) -> tuple[Finding, ...]:
    """The program is there and executable and its secrets readable; every nameserver answers the zone."""
    result = Timer("program")
    try:
        build(cfg)
    except CertmgrError as exc:
        program = result(FAIL, exc.message, exc.hint)
    else:
        conf = config_of(cfg)
        program = result(OK, f"{conf.program[0]} is executable ({conf.mode} mode, {len(conf.secret_env)} "
                             f"secret(s) readable); whether it can change {zone} shows only on a run")
    return program, await check_nameservers(zone, servers(cfg), timeout=timeout,
                                            propagation_timeout=cfg.propagation_timeout, provider=cfg.name)
