"""One SSH channel for a host's transaction: inspect, then commit (and a rollback) run in turn by
scripts/session.sh, instead of a channel (open, exec request, login shell) per script.

`Session` is a RemoteSession: the scripts it was opened with run over its channel, any other goes
to the connection as before. A step is answered exactly as `Remote.run_script`/`run_streamed`
answer (the same Result, the same errors); after a step that leaves the channel in doubt (a timeout,
a lost connection, a streamed step whose upload was not read to its end) the next step opens a new
session.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from certmgr import remote as remote_mod
from certmgr.deploy.shell import SESSION_SH
from certmgr.remote import ConnectionLost, Remote, RemoteTimeout, Result, parse_kv, sh_command
from certmgr.sshlib import asyncssh

_READ_LINES = 32  # a step's arguments up to this many lines are read by session.sh's `read`, longer by `head -c`
# The end of a step's stderr: the channel's mark on a line. asyncssh's readuntil compiles a bytes separator
# at each call, and a fresh mark per channel missed re's cache every time (~0.15 ms per POP, and one entry of
# its 512 evicted per POP): one pattern for every mark, compiled once, and the match checked against ours.
_MARK_BYTES = 8
_ANY_MARK = re.compile(rb"\ncertmgr-step-end-[0-9a-f]{%d}\n" % (2 * _MARK_BYTES))
_MARK_LEN = len("\ncertmgr-step-end-\n") + 2 * _MARK_BYTES


class Session:
    """Steps over one `session.sh` channel of `remote`, for the scripts in `scripts`."""

    def __init__(self, remote: Remote, scripts: Sequence[str]) -> None:
        self.remote = remote
        self.scripts = list(scripts)
        self.proc: Any = None  # asyncssh.SSHClientProcess[bytes] while a session is open
        self.mark = b""
        self.steps = 0  # steps run over session channels (for tests and benchmarks)
        self.opened = 0  # session channels opened

    # -- RemoteSession

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result:
        if script not in self.scripts:
            return await self.remote.run_script(script, args, step=step, timeout=timeout)
        return await self._step(script, args, None, step=step, timeout=timeout)

    async def run_streamed(self, script: str, args: Sequence[str], data: bytes, *, step: str,
                           timeout: float | None = None) -> Result:
        if script not in self.scripts:
            return await self.remote.run_streamed(script, args, data, step=step, timeout=timeout)
        return await self._step(script, args, data, step=step, timeout=timeout)

    async def remove_tree_quietly(self, directory: str) -> None:
        await self.remote.remove_tree_quietly(directory)

    # -- the channel

    async def _open(self) -> Any:
        self.mark = f"certmgr-step-end-{secrets.token_hex(_MARK_BYTES)}".encode()
        cmd = sh_command(SESSION_SH, [self.mark.decode(), *self.scripts])
        self.proc = await self.remote.conn.create_process(cmd, encoding=None)
        self.opened += 1
        return self.proc

    def close(self) -> None:
        """End the session: the script reads the end of its input and exits (nothing is waited for)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.write_eof()
            except (asyncssh.Error, OSError):
                pass
            proc.close()

    async def _step(self, script: str, args: Sequence[str], data: bytes | None, *, step: str,
                    timeout: float | None) -> Result:
        words = shlex.join(args).encode()
        if b"\0" in words:
            sh_command(script, args)  # raises the usual DeployError
        limit = timeout if timeout is not None else self.remote.timeouts.command
        told = data is None  # a plain step has no `go` to wait for: a break is ConnectionLost
        clean = False
        status: int | None = None
        out = bytearray()
        err = b""
        try:
            async with asyncio.timeout(limit):
                proc = self.proc or await self._open()
                index = self.scripts.index(script) + 1
                # a few lines ("-": one), each read by the shell's `read` (no process on the POP); a longer text
                # (hundreds of certificates' sums) as a count of bytes, read by `head -c`: the shell's joining of
                # lines grows with the square of their number (bash: 9 s for 5000 lines)
                lines = words.count(b"\n") + 1
                stdin = 0 if data is None else 1
                if lines <= _READ_LINES:
                    head = f"{index} {stdin} {'-' if lines == 1 else f'={lines}'}\n".encode() + words + b"\n"
                else:
                    head = f"{index} {stdin} {len(words)}\n".encode() + words
                proc.stdin.write(head + (data or b""))
                self.steps += 1
                # read in chunks, not lines: an inspection is a hundred lines per POP
                end = b"\n" + self.mark + b"="
                while True:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        break
                    out += chunk
                    at = out.find(end)
                    if at >= 0:
                        nl = out.find(b"\n", at + len(end))
                        if nl < 0:
                            continue  # the status is still on its way
                        status = int(out[at + len(end):nl].strip() or b"-1")
                        del out[at:]  # the step's own output (the newline before the marker is session.sh's)
                        break
                    got = out.find(b"received=1\n")
                    if data is not None and not told and got >= 0 and (got == 0 or out[got - 1] == 0x0A):
                        proc.stdin.write(b"go\n")
                        told = True
                if status is not None:
                    err = b""
                    while not err.endswith(b"\n" + self.mark + b"\n"):  # another channel's mark: not ours
                        err += await proc.stderr.readuntil(_ANY_MARK, _MARK_LEN)
                    # a streamed step that ended without `received=1` may have left part of its upload
                    # unread on the channel: the next step gets a new session
                    clean = data is None or told
        except TimeoutError as exc:
            raise RemoteTimeout(f"{step} {remote_mod.where(self.remote.host)}: no answer within {limit:g}s") from exc
        except (asyncssh.Error, OSError, asyncio.IncompleteReadError) as exc:
            raise (self.remote.lost(step, exc) if told else self.remote.cut(step, exc)) from exc
        finally:
            if not clean:
                self.close()
        if status is None:  # the channel ended mid-step with no word on the script
            lost = ConnectionLost("closed without an exit status")
            raise (self.remote.lost(step, lost) if told else self.remote.cut(step, lost))
        text = bytes(out).decode("utf-8", "replace")
        errtext = err[:-len(self.mark) - 2].decode("utf-8", "replace")
        return Result(exit_status=status, stdout=text, stderr=errtext, fields=parse_kv(text))


@asynccontextmanager
async def over(remote: Any, scripts: Sequence[str]) -> AsyncIterator[Any]:
    """`remote` with `scripts` run over one session channel (a Remote), or `remote` itself (a test's fake)."""
    if not isinstance(remote, Remote):
        yield remote
        return
    s = Session(remote, scripts)
    try:
        yield s
    finally:
        s.close()
