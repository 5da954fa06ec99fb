"""One SSH channel per host transaction (deploy/session.py, scripts/session.sh): the scripts run in turn
over one channel and answer exactly as each would over a channel of its own."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shlex
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from certmgr.deploy import COMMIT_SH, session
from certmgr.deploy.model import parse_commit
from certmgr.inventory import Host
from certmgr.remote import ConnectionLost, Remote, RemoteTimeout, StreamCut, Timeouts, connect
from certmgr.sshlib import asyncssh
from tests.unit.test_deploy_stream import streamed, temps
from tests.unit.test_deploy_txn import NAMES, multi_root

TIMEOUTS = Timeouts(connect=5, command=10, upload=10, verify=1)
SAY = 'printf "a=%s\\n" "$1"; printf "b=%s\\n" "$2"; printf "to stderr" >&2; printf "no newline"; exit "$3"'
READ = 'IFS= read -r l; printf "line=%s\\n" "$l"'


async def _run_streaming(process: asyncssh.SSHServerProcess[bytes], started: list[asyncio.subprocess.Process]) -> None:
    """The client's command under the local sh, its stdin and output streamed both ways (as sshd does).

    Each command runs in a process group of its own, listed in `started`, so that fake_pop can end what a
    test left running (a `sleep 5` past its step's timeout) before the test's event loop closes."""
    local = await asyncio.create_subprocess_exec("sh", "-c", process.command or "true", stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 start_new_session=True)
    started.append(local)
    assert local.stdin is not None and local.stdout is not None and local.stderr is not None

    async def feed() -> None:
        try:
            while data := await process.stdin.read(65536):
                local.stdin.write(data)  # type: ignore[union-attr]
                await local.stdin.drain()  # type: ignore[union-attr]
        except (asyncssh.Error, OSError):
            pass  # the client closed the channel: as sshd, close the command's stdin
        local.stdin.close()  # type: ignore[union-attr]

    async def drain(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
        while data := await src.read(65536):
            try:
                dst.write(data)
            except (asyncssh.Error, OSError):
                pass  # nobody reads any more: the command runs on (the scripts ignore SIGPIPE)

    feeding = asyncio.ensure_future(feed())
    await asyncio.gather(drain(local.stdout, process.stdout), drain(local.stderr, process.stderr))
    rc = await local.wait()
    feeding.cancel()
    try:
        process.exit(rc if rc >= 0 else 128 - rc)  # killed by a signal: as the login shell would say it
    except (asyncssh.Error, OSError):
        pass


@asynccontextmanager
async def fake_pop(tmp: Path) -> AsyncIterator[Remote]:
    started: list[asyncio.subprocess.Process] = []
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp / "id"
    client_key.write_private_key(str(key_file))
    server = await asyncssh.create_server(
        asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key], encoding=None,
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        process_factory=functools.partial(_run_streaming, started=started))
    port = server.sockets[0].getsockname()[1]
    kh = tmp / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n")
    host = Host(name="pop", address="127.0.0.1", port=port, user=os.environ.get("USER", "root"),
                ssh_key_file=key_file, known_hosts=kh, cert_root=str(tmp / "le"))
    try:
        async with connect(host, timeouts=TIMEOUTS) as rem:
            yield rem
    finally:
        server.close()
        await server.wait_closed()
        for local in started:  # reaped, its pipes closed, while the loop still runs
            if local.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(local.pid, signal.SIGKILL)
                await local.wait()
            local._transport.close()  # type: ignore[attr-defined]  # no public way; else GC closes it on a dead loop


def test_steps_answer_as_scripts_of_their_own_over_one_channel(tmp_path: Path) -> None:
    """Two steps (quoted arguments, stdout without a last newline, stderr, exit status) give the Results of
    two run_script calls, over one session channel."""
    args = [["x y", "$(touch pwned)\n'q'", "3"], ["", "", "0"]]

    async def main() -> None:
        async with fake_pop(tmp_path) as rem:
            alone = [await rem.run_script(SAY, a, step="say") for a in args]
            async with session.over(rem, [READ, SAY]) as s:
                assert isinstance(s, session.Session)
                together = [await s.run_script(SAY, a, step="say") for a in args]
                assert (s.opened, s.steps) == (1, 2)
            assert together == alone
            assert alone[0].stdout == "a=x y\nb=$(touch pwned)\n'q'\nno newline" and alone[0].exit_status == 3
            assert alone[0].stderr == "to stderr"

    asyncio.run(main())
    assert not (tmp_path / "pwned").exists()


def test_a_streamed_commit_in_the_session_stores_and_swaps_as_alone(tmp_path: Path) -> None:
    """commit.sh's upload on the session's stdin, `go` after `received=1`: every version stored and swapped, no temp."""
    root, log = multi_root(tmp_path), tmp_path / "log"
    args, data = streamed(root, log)

    async def main() -> None:
        async with fake_pop(tmp_path) as rem, session.over(rem, [COMMIT_SH, READ]) as s:
            c = parse_commit(await s.run_streamed(COMMIT_SH, args, data, step="commit"))
            assert c.done and c.raw.get("received") == "1", c.raw.stdout + c.raw.stderr
            # the session reads its next step right after the upload: nothing of it is left over
            assert (await s.run_script(READ, [], step="read")).get("line") == ""
            assert (s.opened, s.steps) == (1, 2)

    asyncio.run(main())
    assert log.read_text() == "test\nreload\n"
    assert all(os.readlink(root / "live" / n) == f"../archive/{n}/2" for n in NAMES)
    assert temps(root) == []


def test_a_streamed_step_that_leaves_its_upload_unread_ends_the_session(tmp_path: Path) -> None:
    """A step that exits before reading its stdin (a busy POP lock) does not leave the upload to be read as the
    next step: that one runs in a new session."""
    async def main() -> None:
        async with fake_pop(tmp_path) as rem, session.over(rem, ["exit 5", READ]) as s:
            res = await s.run_streamed("exit 5", [], b"1 0 9\n'garbage'", step="commit")
            assert res.exit_status == 5
            assert (await s.run_script(READ, [], step="read")).get("line") == ""
            assert (s.opened, s.steps) == (2, 2)

    asyncio.run(main())


def test_scripts_not_in_the_session_run_on_channels_of_their_own(tmp_path: Path) -> None:
    """A script the session was not opened with (prune, free space) runs as before, and opens no session."""
    async def main() -> None:
        async with fake_pop(tmp_path) as rem, session.over(rem, [READ]) as s:
            assert (await s.run_script(SAY, ["1", "2", "0"], step="say")).get("a") == "1"
            assert (s.opened, s.steps) == (0, 0)

    asyncio.run(main())


@pytest.mark.parametrize("when", ["before-go", "after-go"])
def test_a_channel_that_ends_mid_step_is_a_cut_before_go_and_lost_after(tmp_path: Path, when: str) -> None:
    """The session channel closing before the step's `go` is StreamCut (nothing switched); after it ConnectionLost;
    a plain step's is ConnectionLost."""
    # $$ in the step's subshell is session.sh itself: killed, it never writes the step's end
    script = 'printf "received=1\\n"; IFS= read -r go; kill -9 $$' if when == "after-go" else "kill -9 $$"

    async def main() -> None:
        async with fake_pop(tmp_path) as rem, session.over(rem, [script]) as s:
            with pytest.raises(ConnectionLost) as info:
                await s.run_streamed(script, [], b"", step="commit")
            assert isinstance(info.value, StreamCut) == (when == "before-go")
            with pytest.raises(ConnectionLost) as plain:
                await s.run_script(script, [], step="inspect")
            assert not isinstance(plain.value, StreamCut)

    asyncio.run(main())


def test_a_step_that_does_not_answer_in_time_is_a_timeout_and_ends_the_session(tmp_path: Path) -> None:
    """A step past its timeout raises RemoteTimeout and the next step gets a new session."""
    async def main() -> None:
        async with fake_pop(tmp_path) as rem, session.over(rem, ["sleep 5", READ]) as s:
            with pytest.raises(RemoteTimeout, match=r"^slow pop \(127\.0\.0\.1:\d+\): no answer within 0\.3s$"):
                await s.run_script("sleep 5", [], step="slow", timeout=0.3)
            assert (await s.run_script(READ, [], step="read")).get("line") == ""
            assert s.opened == 2

    asyncio.run(main())


@pytest.mark.parametrize("line", ["1 0", "x 0 3", "1 2 3", "9 0 0", "1 0 3 4", " 1 0 3", "0 0 0", "1 0 --",
                                  "1 0 -3", "1 0 3-", "1 0 - ", "x 0 -", "9 0 -", "1 0 =0", "1 0 =100",
                                  "1 0 =x", "1 0 =", "1 0 =-1"])
def test_the_session_script_ends_on_a_step_line_it_does_not_expect(line: str) -> None:
    """session.sh runs nothing for a malformed step line (or an index out of range) and exits 2."""
    drv = session.SESSION_SH
    p = subprocess.run(["sh", "-c", drv, "certmgr", "M", "echo ran"], input=f"{line}\n''".encode(),
                       capture_output=True, timeout=10, check=False)
    assert (p.returncode, p.stdout) == (2, b"")


def test_the_session_script_runs_each_step_with_its_own_arguments_and_stdin() -> None:
    """Each step sees exactly its argv (quotes, newlines, `$(…)` inert), /dev/null or the stream as stdin, its exit status."""
    drv = session.SESSION_SH

    def step(i: int, stdin: int, args: list[str]) -> bytes:
        words = shlex.join(args).encode()
        return f"{i} {stdin} {len(words)}\n".encode() + words

    def lines(i: int, stdin: int, args: list[str]) -> bytes:
        words = shlex.join(args).encode()
        return f"{i} {stdin} ={words.count(10) + 1}\n".encode() + words + b"\n"

    def line(i: int, stdin: int, args: list[str]) -> bytes:
        return f"{i} {stdin} -\n".encode() + shlex.join(args).encode() + b"\n"

    s1 = 'printf "%s|" "$@"; IFS= read -r l || printf "eof"; exit 3'
    data = step(1, 0, ["a b", "c\nd", "$(echo x)"]) + step(1, 1, ["z"]) + b"from stdin\n"
    data += line(1, 0, ["a  b", "\\n\\", "$(echo x)", "'", "", " "]) + line(1, 1, ["y"]) + b"more\n"
    data += lines(1, 0, ["a\n", "\nb", "c\r\nd", ""]) + lines(1, 1, ["w\nx"]) + b"last\n"
    p = subprocess.run(["sh", "-c", drv, "certmgr", "M", s1], input=data, capture_output=True, timeout=10,
                       check=False)
    assert p.stdout == (b"a b|c\nd|$(echo x)|eof\nM=3\nz|\nM=3\n"
                        b"a  b|\\n\\|$(echo x)|'|| |eof\nM=3\ny|\nM=3\n"
                        b"a\n|\nb|c\r\nd||eof\nM=3\nw\nx|\nM=3\n")
    assert (p.returncode, p.stderr) == (0, b"\nM\n\nM\n" * 3)


@pytest.mark.parametrize("cut", range(1, 9))  # every cut after the step line, inside its 8 bytes of arguments
def test_a_multi_line_step_cut_before_its_last_line_runs_nothing(cut: int) -> None:
    """The counted-lines form: arguments cut anywhere before their last newline (the stream ends) run no step."""
    data = b"1 0 =3\n'a\nb\nc'\n"
    p = subprocess.run(["sh", "-c", session.SESSION_SH, "certmgr", "M", "echo ran"], input=data[:len(data) - cut],
                       capture_output=True, timeout=10, check=False)
    assert (p.returncode, p.stdout) == (2, b"")


def test_a_step_line_cut_before_its_end_runs_nothing() -> None:
    """The one-line form read by the shell: arguments that end without their newline (the stream cut) run no step."""
    p = subprocess.run(["sh", "-c", session.SESSION_SH, "certmgr", "M", "echo ran"], input=b"1 0 -\n'a' 'b",
                       capture_output=True, timeout=10, check=False)
    assert (p.returncode, p.stdout) == (2, b"")


def test_an_output_of_many_chunks_is_read_whole(tmp_path: Path) -> None:
    """A step whose output spans many SSH packets answers whole, as alone; `received=1` inside a line is not the
    script's word: `go` is sent only for the line itself."""
    big = 'i=0; while [ $i -lt 20000 ]; do printf "k_%s=not received=1 here\\n" $i; i=$((i + 1)); done; printf "x"'
    ask = big.replace('printf "x"', 'printf "\\nreceived=1\\n"; IFS= read -r go; printf "go=%s\\n" "$go"')

    async def main() -> None:
        async with fake_pop(tmp_path) as rem:
            alone = await rem.run_script(big, [], step="big")
            async with session.over(rem, [big, ask, READ]) as s:
                assert await s.run_script(big, [], step="big") == alone
                res = await s.run_streamed(ask, [], b"", step="ask")
                assert res.get("go") == "go" and res.get("k_19999") == "not received=1 here"
                assert (await s.run_script(READ, [], step="read")).get("line") == ""
                assert (s.opened, s.steps) == (1, 3)
            assert len(alone.stdout) > 400_000 and alone.stdout.endswith("here\nx")

    asyncio.run(main())


def test_a_step_end_mark_on_stderr_that_is_not_the_channels_own_does_not_end_the_step(tmp_path: Path) -> None:
    """A line on a step's stderr shaped like a step-end mark (another channel's) is part of its stderr: the step
    answers whole, as alone, and the next step still runs on the same channel."""
    fake = 'printf "before\\ncertmgr-step-end-%s\\nafter" 0123456789abcdef >&2; printf "a=1\\n"'

    async def main() -> None:
        async with fake_pop(tmp_path) as rem:
            alone = await rem.run_script(fake, [], step="fake")
            async with session.over(rem, [fake, SAY]) as s:
                assert await s.run_script(fake, [], step="fake") == alone
                assert (await s.run_script(SAY, ["1", "2", "0"], step="say")).get("b") == "2"
                assert (s.opened, s.steps) == (1, 2)
            assert alone.stderr == "before\ncertmgr-step-end-0123456789abcdef\nafter" and alone.get("a") == "1"

    asyncio.run(main())


@pytest.mark.parametrize("lines", [1, 3, session._READ_LINES, session._READ_LINES + 1, 400])
def test_arguments_of_any_number_of_lines_arrive_whole(tmp_path: Path, lines: int) -> None:
    """A few lines go as counted lines read by the shell, a long text (past _READ_LINES, where the shell's joining
    would grow with its square) as counted bytes read by `head -c`: either way each argument arrives whole."""
    show = 'printf "n=%s\\n" "$#"; for a in "$@"; do printf "arg=%s\\n" "$(printf %s "$a" | od -An -tx1 | tr -d " \\n")"; done'
    args = ["\n".join(f"l{i}" for i in range(lines)), "", "tail\n"]

    async def main() -> None:
        async with fake_pop(tmp_path) as rem, session.over(rem, [show, READ]) as s:
            res = await s.run_script(show, args, step="show")
            assert res.get("n") == "3"
            assert res.all("arg") == [a.encode().hex() for a in args]
            assert (await s.run_script(READ, [], step="read")).get("line") == ""  # nothing of it left on stdin
            assert s.opened == 1

    asyncio.run(main())
