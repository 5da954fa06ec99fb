"""SSH to POPs with asyncssh: strict host keys, fixed-argv quoted commands (data on a script's stdin), SFTP.

The network edge of `deploy`: asyncssh and OS errors are mapped to DeployError subclasses here,
and every remote shell script is a constant that receives its inputs only as quoted arguments.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shlex
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certmgr import sanitize
from certmgr.errors import DeployError, HostKeyError
from certmgr.inventory import Host
from certmgr.sshlib import asyncssh

logger = logging.getLogger(__name__)

DEFAULT_KEY = Path("~/.ssh/id_ed25519")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")

# Remote paths are built only from validated pieces: an absolute cert_root and a lineage name.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./@+*-]*")
_SAFE_NAME = re.compile(r"[a-z0-9*][a-z0-9*._-]{0,199}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds allowed per step; one object so every network call has a bound."""

    connect: float = 10.0  # TCP + SSH handshake + auth (per hop)
    command: float = 60.0  # one remote script (includes nginx -t / reload)
    upload: float = 60.0  # an SFTP session opening + all files of one upload_dir (doctor); deploy's ride on `command`
    verify: float = 10.0  # polling TLS handshakes until the new serial is served
    handshake: float = 5.0  # one TLS handshake


class Unreachable(DeployError):
    """TCP connect, SSH handshake or authentication failed: nothing on the host was touched."""

    retryable = True


class ConnectionLost(DeployError):
    """The SSH connection broke after it was established."""

    retryable = True


class StreamCut(ConnectionLost):
    """The connection broke before a streamed script was told `go`: it switched nothing (see run_streamed)."""


class RemoteCommandError(DeployError):
    """A remote script could not be run or produced output we cannot understand."""


class RemoteTimeout(RemoteCommandError):
    """A remote script did not answer in time: it may still be running there (it ignores HUP), state unknown."""


class UploadError(DeployError):
    """SFTP could not write a file (disk full, permissions, connection lost)."""


def check_remote_path(path: str) -> str:
    """Return `path` if it is an absolute path of safe characters without '..', else raise DeployError."""
    if not _SAFE_PATH.fullmatch(path) or "/../" in path + "/" or "//" in path:
        raise DeployError(f"deploy: remote path {path!r} is not acceptable (absolute, letters, digits, ._-/@+*)")
    return path


def check_name(name: str) -> str:
    """Return `name` if it is a valid lineage name (the store's rule), else raise DeployError."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise DeployError(f"deploy: {name!r} is not a valid certificate name")
    return name


def sh_command(script: str, args: Sequence[str]) -> str:
    """The command line `sh -c SCRIPT certmgr ARGS...`, every element quoted.

    The script is a constant of this module; everything variable arrives as a positional
    parameter, so no value can ever be parsed as shell syntax.
    """
    for a in args:
        if "\0" in a:
            raise DeployError("deploy: NUL byte in a remote argument")
    return shlex.join(["sh", "-c", script, "certmgr", *args])


_KEY = re.compile(r"[a-z_][a-z0-9_]*")


def parse_kv(text: str) -> dict[str, list[str]]:
    """`key=value` lines (ended by "\n" only: a "\r" inside a value is no line end) → {key: [values...]}; lines
    without '=' are ignored."""
    out: dict[str, list[str]] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep and _KEY.fullmatch(key):
            out.setdefault(key, []).append(value)
    return out


def b64text(value: str) -> str:
    """Decode a base64 field written by a remote script (lossy UTF-8)."""
    try:
        return base64.b64decode(value, validate=False).decode("utf-8", "replace").strip()
    except ValueError:
        return value


def b64bytes(value: str | None) -> bytes | None:
    """Decode a base64 field written by a remote script; None when absent or malformed."""
    try:
        return base64.b64decode(value, validate=True) if value else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """A finished remote command."""

    exit_status: int
    stdout: str
    stderr: str
    fields: Mapping[str, list[str]] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        values = self.fields.get(key)
        return values[-1] if values else default

    def all(self, key: str) -> list[str]:
        return list(self.fields.get(key, ()))


def where(host: Host) -> str:
    return f"{host.name} ({host.address}:{host.port})"


def _hostport(host: Host) -> str:
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


# AES-GCM first: one AEAD call per packet in asyncssh, where chacha20-poly1305 costs several;
# every one of these is in OpenSSH's default server list.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes128-ctr", "aes256-ctr")

_KEY_CACHE: dict[str, asyncssh.SSHKey] = {}


def _client_key(host: Host) -> asyncssh.SSHKey:
    path = (host.ssh_key_file or DEFAULT_KEY).expanduser()
    key = _KEY_CACHE.get(str(path))
    if key is None:
        try:
            key = asyncssh.read_private_key(str(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise DeployError(
                f"connect {host.name}: cannot read SSH key {path}: {getattr(exc, 'strerror', None) or exc} "
                "(nothing changed)",
                hint="set ssh_key_file in [defaults] or [hosts.*]; the key must not need a passphrase",
            ) from exc
        _KEY_CACHE[str(path)] = key
    return key


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


class _QuickAck(asyncio.Protocol):
    """asyncssh's protocol on a direct TCP connection, with every received segment ACKed at once.

    OpenSSH's sshd leaves Nagle on for sessions without a pty and writes small messages back to
    back: after auth a debug message and `hostkeys-00@openssh.com`, then, on the first channel, a
    second debug message and the confirmation. The confirmation waits for the ACK of the first pair,
    which the client's delayed ACK holds back 40 ms (Linux's minimum; 200 ms on other systems):
    every connection's first command stalled that long. TCP_QUICKACK after each read (one cheap
    setsockopt; the kernel drops quick-ack mode on its own) sends the ACK at once.
    """

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.sock: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sock = transport.get_extra_info("socket")
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                self.sock = None  # not TCP after all: stop trying

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _DirectTCP:
    """A `tunnel=` for asyncssh that is plain TCP from here, through `_QuickAck`."""

    async def create_connection(self, factory: Any, host: str, port: int) -> tuple[asyncio.BaseTransport, Any]:
        made: list[Any] = []

        def wrapped() -> asyncio.Protocol:
            made.append(factory())
            return _QuickAck(made[0])

        transport, _ = await asyncio.get_running_loop().create_connection(wrapped, host, port)
        return transport, made[0]


class _HostKeyPolicy(asyncssh.SSHClient):
    """Records the key the server offered; accepts an unknown key only under accept-new."""

    def __init__(self, accept_unknown: bool) -> None:
        self.accept_unknown = accept_unknown
        self.offered: asyncssh.SSHKey | None = None
        self.accepted_new = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # asyncssh calls this only when the key is not among the known ones.
        self.offered = key
        self.accepted_new = self.accept_unknown
        return self.accept_unknown


def _known_keys(host: Host) -> tuple[Path, list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
    path = (host.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise HostKeyError(
            f"connect {where(host)}: cannot read known_hosts {path}: {exc.strerror} (refused, nothing changed)"
        ) from exc
    kh = _KH_CACHE.get(str(path))
    if kh is None or kh[0] != text:
        try:
            kh = (text, asyncssh.import_known_hosts(text))
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise HostKeyError(f"connect {where(host)}: known_hosts {path} does not parse: {exc} (refused)") from exc
        _KH_CACHE[str(path)] = kh  # parsed once per content: a fleet shares one file
    host_keys, ca_keys, revoked, *_ = kh[1].match(host.address, host.address, host.port)
    return path, list(host_keys), list(ca_keys), list(revoked)


_KH_LOCK = asyncio.Lock()
_KH_CACHE: dict[str, tuple[str, asyncssh.SSHKnownHosts]] = {}


async def _remember_host_key(path: Path, host: Host, key: asyncssh.SSHKey) -> None:
    line = f"{_hostport(host)} {key.export_public_key('openssh').decode().strip()}\n"
    async with _KH_LOCK:

        def append() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(append)
    logger.warning("connect %s: accepted new host key %s (added to %s)", host.name, key.get_fingerprint(), path)


@dataclass(frozen=True, slots=True)
class AcceptedKey:
    """A host key trusted on first use (--accept-new) and appended to known_hosts."""

    host: str
    fingerprint: str  # "ssh-ed25519 SHA256:…"
    known_hosts: Path


OnAccept = Callable[[AcceptedKey], Awaitable[None]]


async def _open(host: Host, *, accept_new: bool, timeouts: Timeouts, tunnel: asyncssh.SSHClientConnection | None,
                on_accept: OnAccept | None) -> asyncssh.SSHClientConnection:
    path, host_keys, ca_keys, revoked = _known_keys(host)
    unknown = not host_keys and not ca_keys
    policy = _HostKeyPolicy(accept_unknown=accept_new and unknown)
    key = _client_key(host)
    try:
        async with asyncio.timeout(timeouts.connect):
            conn = await asyncssh.connect(
                host.address, host.port, tunnel=tunnel or (_DirectTCP() if _TCP_QUICKACK else ()),
                username=host.user, client_keys=[key],
                known_hosts=(host_keys, ca_keys, revoked), client_factory=lambda: policy,
                agent_path=None, config=None, preferred_auth="publickey", password=None,
                kbdint_auth=False, gss_host=None, connect_timeout=timeouts.connect,
                keepalive_interval=15, keepalive_count_max=3, encryption_algs=_CIPHERS,
            )
    except asyncssh.HostKeyNotVerifiable as exc:
        offered = policy.offered
        fp = f"{offered.get_algorithm()} {offered.get_fingerprint()}" if offered else "a key"
        if unknown:
            raise HostKeyError(
                f"connect {where(host)}: unknown host key {fp}, not in {path} (refused, nothing changed)",
                hint=f"check the fingerprint out of band, then add it (ssh-keyscan -p {host.port} {host.address} "
                     f">> {path}), or rerun with --accept-new to trust it on first use",
            ) from exc
        raise HostKeyError(
            f"connect {where(host)}: host key changed: server offered {fp}, which {path} does not list for "
            f"{_hostport(host)} (refused, nothing changed)",
            hint=f"if {host.name} was legitimately re-keyed, verify the new fingerprint out of band and replace "
                 f"its entry (ssh-keygen -R '{_hostport(host)}' -f {path}); otherwise treat it as an attack",
        ) from exc
    except TimeoutError as exc:
        raise Unreachable(f"connect {where(host)}: timed out after {timeouts.connect:g}s (nothing changed)") from exc
    except asyncssh.PermissionDenied as exc:
        raise Unreachable(
            f"connect {where(host)}: authentication as {host.user!r} refused: {sanitize.line(exc.reason)} "
            "(nothing changed)",
            hint="check the user and that its authorized_keys holds certmgr's public key",
        ) from exc
    except asyncssh.Error as exc:
        raise Unreachable(f"connect {where(host)}: ssh: {sanitize.line(exc.reason)} (nothing changed)") from exc
    except OSError as exc:
        # asyncio's "Connect call failed (addr, port)" hides the errno's text; show the text
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise Unreachable(f"connect {where(host)}: {reason} (nothing changed)") from exc
    if policy.accepted_new and policy.offered is not None:
        try:
            await _remember_host_key(path, host, policy.offered)
        except OSError as exc:
            # Trust on first use that is not written down would be trust on every use: refuse.
            conn.close()
            raise HostKeyError(
                f"connect {where(host)}: new host key {policy.offered.get_fingerprint()} could not be recorded "
                f"in {path}: {exc.strerror} (refused, nothing changed)",
                hint=f"make {path} writable by this user, or add the key yourself after checking its fingerprint",
            ) from exc
        if on_accept is not None:  # told now: a later failure (the target after a jump host) must not hide it
            offered = policy.offered
            await on_accept(AcceptedKey(host.name, f"{offered.get_algorithm()} {offered.get_fingerprint()}", path))
    return conn


class Remote:
    """One SSH connection to one host: scripts run over it (deploy's uploads on the commit's stdin); SFTP
    for doctor's checks (and upload_dir, which deploy no longer uses)."""

    def __init__(self, host: Host, conn: asyncssh.SSHClientConnection, timeouts: Timeouts) -> None:
        self.host = host
        self.conn = conn
        self.timeouts = timeouts
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_task: asyncio.Task[asyncssh.SFTPClient] | None = None

    def lost(self, step: str, exc: BaseException) -> DeployError:
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__  # the peer's words
        return ConnectionLost(f"{step} {where(self.host)}: connection lost: {sanitize.line(str(reason))}")

    def cut(self, step: str, exc: BaseException) -> StreamCut:
        return StreamCut(self.lost(step, exc).message)

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result:
        """Run `sh -c SCRIPT certmgr ARGS...`; its `key=value` output lines are parsed into `fields`."""
        cmd = sh_command(script, args)
        limit = timeout if timeout is not None else self.timeouts.command
        try:
            async with asyncio.timeout(limit):
                proc = await self.conn.run(cmd, check=False, stdin=asyncssh.DEVNULL)
        except TimeoutError as exc:
            raise RemoteTimeout(f"{step} {where(self.host)}: no answer within {limit:g}s") from exc
        except (asyncssh.Error, OSError) as exc:
            raise self.lost(step, exc) from exc
        out = proc.stdout if isinstance(proc.stdout, str) else (proc.stdout or b"").decode("utf-8", "replace")
        err = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode("utf-8", "replace")
        status = proc.exit_status if proc.exit_status is not None else -1
        return Result(exit_status=status, stdout=out, stderr=err, fields=parse_kv(out))

    async def run_streamed(self, script: str, args: Sequence[str], data: bytes, *, step: str,
                           timeout: float | None = None) -> Result:
        """Like run_script, with `data` on the script's stdin, then a `go` line once it says `received=1`.

        The script acts on the data only after `go`; `go` is sent only after the script has read all of
        `data`. So a connection that breaks before `go` was written (StreamCut) changed nothing, for sure;
        after it, ConnectionLost as for any script. A script that ends without `received=1` (the POP lock
        busy, a write that failed) is answered as run_script answers.
        """
        cmd = sh_command(script, args)
        limit = timeout if timeout is not None else self.timeouts.command
        told = False
        try:
            async with asyncio.timeout(limit):
                proc = await self.conn.create_process(cmd, encoding=None)
                try:
                    proc.stdin.write(data)
                    out = bytearray()
                    while line := await proc.stdout.readline():
                        out += line
                        if line == b"received=1\n":
                            proc.stdin.write(b"go\n")
                            told = True
                            break
                    if told:
                        proc.stdin.write_eof()
                    out += await proc.stdout.read()
                    err = await proc.stderr.read()
                    await proc.wait_closed()
                finally:
                    proc.close()
        except TimeoutError as exc:
            raise RemoteTimeout(f"{step} {where(self.host)}: no answer within {limit:g}s") from exc
        except (asyncssh.Error, OSError) as exc:
            raise (self.lost(step, exc) if told else self.cut(step, exc)) from exc
        if proc.exit_status is None and proc.exit_signal is None:  # the channel closed with no word on the script
            lost = ConnectionLost("closed without an exit status")
            raise (self.lost(step, lost) if told else self.cut(step, lost))
        text = bytes(out).decode("utf-8", "replace")
        status = proc.exit_status if proc.exit_status is not None else -1
        return Result(exit_status=status, stdout=text, stderr=err.decode("utf-8", "replace"), fields=parse_kv(text))

    def prefetch_sftp(self) -> None:
        """Start opening the SFTP session in the background (it needs no decision yet)."""
        if self._sftp_task is None:
            self._sftp_task = asyncio.ensure_future(self.conn.start_sftp_client())

    async def sftp(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            self.prefetch_sftp()
            assert self._sftp_task is not None
            try:
                async with asyncio.timeout(self.timeouts.upload):
                    self._sftp = await asyncio.shield(self._sftp_task)
            except TimeoutError as exc:
                raise UploadError(f"upload {where(self.host)}: SFTP session did not open in time") from exc
            except asyncssh.SFTPError as exc:
                raise UploadError(f"upload {where(self.host)}: SFTP unavailable: {sanitize.line(exc.reason)}") from exc
            except (asyncssh.Error, OSError) as exc:
                raise self.lost("upload", exc) from exc
        return self._sftp

    async def upload_dir(self, directory: str, files: Mapping[str, tuple[bytes, int]], *,
                         dir_mode: int = 0o755, ensure: Sequence[str] = (), fsync: bool = True) -> None:
        """Create `directory` (must not exist) and write each file with its mode from creation on.

        Each file is fsynced unless `fsync` is False (deploy's commit script syncs the files itself,
        before the rename, in the same round trip that verifies their SHA-256).
        `ensure` lists parent directories to create first (mode 0700) when missing, outermost first.
        Files are opened with O_EXCL and the mode in the open request, so a private key is never
        readable by others even briefly; all writes run concurrently over one SFTP session.
        """
        check_remote_path(directory)
        for d in ensure:
            check_remote_path(d)
        sftp = await self.sftp()

        async def ensure_dir(path: str) -> None:
            try:
                await sftp.mkdir(path, asyncssh.SFTPAttrs(permissions=0o700))
            except asyncssh.SFTPFailure:
                if not await sftp.isdir(path):  # OpenSSH answers a plain "failure" when it exists
                    raise

        async def put(name: str, data: bytes, mode: int) -> None:
            path = f"{directory}/{name}"
            async with sftp.open(path, "xb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
                await f.write(data)
                if fsync:
                    await f.fsync()  # fsync@openssh.com

        try:
            async with asyncio.timeout(self.timeouts.upload):
                for d in ensure:
                    await ensure_dir(d)
                await sftp.mkdir(directory, asyncssh.SFTPAttrs(permissions=dir_mode))
                results = await asyncio.gather(*(put(n, d, m) for n, (d, m) in files.items()),
                                               return_exceptions=True)
        except TimeoutError as exc:
            raise UploadError(f"upload {where(self.host)}: not finished within {self.timeouts.upload:g}s") from exc
        except asyncssh.SFTPError as exc:
            raise UploadError(f"upload {where(self.host)}: {directory}: {sanitize.line(exc.reason)}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise self.lost("upload", exc) from exc
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if isinstance(err, asyncssh.SFTPError):
                raise UploadError(f"upload {where(self.host)}: {directory}: {sanitize.line(err.reason)}") from err
        for err in errors:
            if isinstance(err, (asyncssh.Error, OSError)):
                raise self.lost("upload", err) from err
            raise err

    async def remove_tree_quietly(self, directory: str) -> None:
        """Best effort: remove an upload directory we created (errors are logged, never raised)."""
        try:
            check_remote_path(directory)
            async with asyncio.timeout(self.timeouts.command):
                await self.conn.run(shlex.join(["rm", "-rf", "--", directory]), check=False,
                                    stdin=asyncssh.DEVNULL)
        except (DeployError, TimeoutError, asyncssh.Error, OSError) as exc:
            logger.info("cleanup %s: could not remove %s: %s", self.host.name, directory, exc)

    async def close(self) -> None:
        if self._sftp_task is not None:
            if not self._sftp_task.done():
                self._sftp_task.cancel()
            elif not self._sftp_task.cancelled():
                self._sftp_task.exception()  # retrieved: a session that failed to open is not news here
        if self._sftp is not None:
            self._sftp.exit()
        self.conn.close()
        try:
            async with asyncio.timeout(2.0):
                await self.conn.wait_closed()
        except (TimeoutError, asyncssh.Error, OSError):
            pass


@asynccontextmanager
async def connect(host: Host, *, jump: Host | None = None, accept_new: bool = False,
                  timeouts: Timeouts | None = None, on_accept: OnAccept | None = None) -> AsyncIterator[Remote]:
    """Open an SSH connection to `host` (through `jump` if given) with strict host-key checking.

    Raises HostKeyError (unknown/changed key; never accepted silently), Unreachable (TCP, SSH
    handshake, auth, timeout). `accept_new` trusts and records a key only for a host that has
    no entry at all in its known_hosts, like OpenSSH's StrictHostKeyChecking=accept-new.
    """
    timeouts = timeouts or Timeouts()
    tunnel = None
    if jump is not None:
        tunnel = await _open(jump, accept_new=accept_new, timeouts=timeouts, tunnel=None, on_accept=on_accept)
    try:
        conn = await _open(host, accept_new=accept_new, timeouts=timeouts, tunnel=tunnel, on_accept=on_accept)
        remote = Remote(host, conn, timeouts)
        try:
            yield remote
        finally:
            await remote.close()
    finally:
        if tunnel is not None:
            tunnel.close()


def describe_exc(exc: BaseException) -> str:
    """A one-line description of an unexpected asyncssh/OS error (for results)."""
    reason: Any = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {sanitize.line(str(reason))}"  # an SSH peer's reason is foreign text
