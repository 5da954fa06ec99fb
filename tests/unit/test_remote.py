"""Unit tests for certmgr.remote against an in-process asyncssh server on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import asyncssh
import pytest

from certmgr.errors import HostKeyError
from certmgr.inventory import Host
from certmgr.remote import Timeouts, Unreachable, UploadError, connect

TIMEOUTS = Timeouts(connect=5, command=10, upload=10, verify=1)


class _Server(asyncssh.SSHServer):
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return dest_host == "127.0.0.1"  # a jump host that forwards to loopback only


async def _run_locally(process: asyncssh.SSHServerProcess[str]) -> None:
    """Run the client's command with the local sh, as sshd would with a POSIX login shell."""
    proc = await asyncio.create_subprocess_exec("sh", "-c", process.command or "true",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL)
    out, err = await proc.communicate()
    process.stdout.write(out.decode())
    process.stderr.write(err.decode())
    process.exit(proc.returncode or 0)


@dataclass
class FakeHost:
    host: Host
    key: asyncssh.SSHKey
    server: asyncssh.SSHAcceptor
    known_hosts: Path


@asynccontextmanager
async def fake_sshd(tmp: Path, name: str = "pop") -> AsyncIterator[FakeHost]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp / f"{name}-id"
    client_key.write_private_key(str(key_file))
    server = await asyncssh.create_server(
        _Server, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        process_factory=_run_locally, sftp_factory=True, allow_scp=False)
    port = server.sockets[0].getsockname()[1]
    kh = tmp / f"{name}-known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n")
    host = Host(name=name, address="127.0.0.1", port=port, user=os.environ.get("USER", "root"),
                ssh_key_file=key_file, known_hosts=kh, cert_root=str(tmp / "le"))
    try:
        yield FakeHost(host=host, key=host_key, server=server, known_hosts=kh)
    finally:
        server.close()
        await server.wait_closed()


def test_known_key_connects_and_runs_quoted_scripts(tmp_path: Path) -> None:
    """With the key in known_hosts, scripts run with their arguments passed literally."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh, connect(fh.host, timeouts=TIMEOUTS) as rem:
            res = await rem.run_script('say() { printf "%s\\n" "$*"; }; say "a=$1"; say "b=$2"', ["x y", "$(id)"],
                                       step="test")
            assert res.fields == {"a": ["x y"], "b": ["$(id)"]}

    asyncio.run(main())


def test_unknown_host_key_is_refused_with_its_fingerprint(tmp_path: Path) -> None:
    """A host absent from known_hosts is refused, naming the offered key and the file."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh:
            fh.known_hosts.write_text("")
            with pytest.raises(HostKeyError) as info:
                async with connect(fh.host, timeouts=TIMEOUTS):
                    pass
            assert info.value.message == (
                f"connect pop (127.0.0.1:{fh.host.port}): unknown host key ssh-ed25519 {fh.key.get_fingerprint()}, "
                f"not in {fh.known_hosts} (refused, nothing changed)")
            assert info.value.hint is not None and "--accept-new" in info.value.hint

    asyncio.run(main())


@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_is_refused_even_with_accept_new(tmp_path: Path, accept_new: bool) -> None:
    """A key that differs from the recorded one is always refused; known_hosts is left as it was."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh:
            other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            fh.known_hosts.write_text(f"[127.0.0.1]:{fh.host.port} {other}\n")
            before = fh.known_hosts.read_text()
            with pytest.raises(HostKeyError, match=r"host key changed: server offered ssh-ed25519 SHA256:\S+, which "
                                                   r".* does not list for \[127\.0\.0\.1\]:\d+ \(refused"):
                async with connect(fh.host, accept_new=accept_new, timeouts=TIMEOUTS):
                    pass
            assert fh.known_hosts.read_text() == before

    asyncio.run(main())


def test_accept_new_trusts_and_records_an_unknown_host(tmp_path: Path) -> None:
    """--accept-new connects to a host with no entry and appends its key, which is then trusted strictly."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh:
            fh.known_hosts.unlink()
            async with connect(fh.host, accept_new=True, timeouts=TIMEOUTS) as rem:
                assert (await rem.run_script("echo ok=1", [], step="t")).get("ok") == "1"
            line = f"[127.0.0.1]:{fh.host.port} {fh.key.export_public_key().decode().strip()}\n"
            assert fh.known_hosts.read_text() == line
            async with connect(fh.host, timeouts=TIMEOUTS):
                pass

    asyncio.run(main())


def test_accept_new_refuses_when_the_key_cannot_be_recorded(tmp_path: Path) -> None:
    """--accept-new with an unwritable known_hosts refuses the host instead of trusting it unrecorded."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh:
            fh.known_hosts.unlink()
            # absent, so it reads as empty; and nobody (root included) can create a file in /proc
            host = dataclasses.replace(fh.host, known_hosts=Path("/proc/self/certmgr-known_hosts"))
            with pytest.raises(HostKeyError, match=r"new host key SHA256:\S+ could not be recorded in "
                                                   r"/proc/self/certmgr-known_hosts: .* \(refused, nothing changed\)"):
                async with connect(host, accept_new=True, timeouts=TIMEOUTS):
                    pass

    asyncio.run(main())


def test_refused_connection_and_refused_key_are_unreachable(tmp_path: Path) -> None:
    """A closed port and an unauthorised client key are both Unreachable, with the cause spelled out."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh:
            port = fh.host.port
        with pytest.raises(Unreachable, match=rf"^connect pop \(127\.0\.0\.1:{port}\): Connection refused "
                                              r"\(nothing changed\)$"):
            async with connect(fh.host, timeouts=TIMEOUTS):
                pass
        async with fake_sshd(tmp_path, "other") as fh2:
            wrong = replace(fh2.host, ssh_key_file=fh.host.ssh_key_file)
            with pytest.raises(Unreachable, match=r"authentication as '\w+' refused"):
                async with connect(wrong, timeouts=TIMEOUTS):
                    pass

    asyncio.run(main())


def test_upload_dir_creates_files_with_final_modes(tmp_path: Path) -> None:
    """upload_dir makes the missing parents and the directory, and each file with its own mode."""
    async def main() -> None:
        async with fake_sshd(tmp_path) as fh, connect(fh.host, timeouts=TIMEOUTS) as rem:
            base = tmp_path / "le" / "archive"
            (tmp_path / "le").mkdir()
            target = f"{base}/n/.tmp-1-x"
            await rem.upload_dir(target, {"privkey.pem": (b"k", 0o600), "cert.pem": (b"c", 0o644)},
                                 ensure=[str(base), f"{base}/n"])
            assert stat.S_IMODE(os.stat(f"{target}/privkey.pem").st_mode) == 0o600
            assert stat.S_IMODE(os.stat(f"{target}/cert.pem").st_mode) == 0o644
            assert Path(f"{target}/cert.pem").read_bytes() == b"c"
            with pytest.raises(UploadError, match=r"^upload pop \(127\.0\.0\.1:\d+\): .*\.tmp-1-x: "):
                await rem.upload_dir(target, {"cert.pem": (b"c", 0o644)})  # exists: never overwritten

    asyncio.run(main())


def test_jump_host_tunnels_to_the_target(tmp_path: Path) -> None:
    """A host with a jump host is reached through it, both host keys checked."""
    async def main() -> None:
        async with fake_sshd(tmp_path, "bastion") as jump, fake_sshd(tmp_path, "pop") as target:
            host = replace(target.host, jump="bastion")
            async with connect(host, jump=jump.host, timeouts=TIMEOUTS) as rem:
                assert (await rem.run_script("echo via=1", [], step="t")).get("via") == "1"
            jump.known_hosts.write_text("")
            with pytest.raises(HostKeyError, match=r"^connect bastion .*unknown host key"):
                async with connect(host, jump=jump.host, timeouts=TIMEOUTS):
                    pass

    asyncio.run(main())
