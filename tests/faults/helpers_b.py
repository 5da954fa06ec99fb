"""Helpers for the DNS, POP, hostile-input and notification fault cases (tests/faults/test_*_faults.py).

The real CLI runs as a subprocess (`certmgr …`), so stdout, stderr, exit status and logging are the
operator's; the lab's own logs (Pebble, sshd, named) count what reached each service.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lab import Lab
from lab.inventory import toml_value
from lab.named import CHALLENGE_KEY, LAB_KEY
from lab.pop import CERTIFICATES, DEPLOY_USER
from tests.helpers import tree_digest  # noqa: F401  (re-exported for the fault tests)

REPO = Path(__file__).resolve().parents[2]
SNI: dict[str, tuple[str, ...]] = {name: domains for name, domains in CERTIFICATES}


# ---------------------------------------------------------------- inventory and CLI


def _table(header: str, items: Mapping[str, Any]) -> str:
    return "\n".join([header, *(f"{k} = {toml_value(v)}" for k, v in items.items())]) + "\n"


def inventory_text(lab: Lab, *, certs: Sequence[str] = ("media.hachyderm.test",), hosts: Sequence[str] | None = None,
                   host_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   dns_overrides: Mapping[str, Any] | None = None,
                   channel_url_file: Path | None = None, extra_certs: Sequence[Mapping[str, Any]] = (),
                   extra: str = "") -> str:
    """The lab's inventory, narrowed to `certs` on `hosts` (default: every POP), with per-case overrides."""
    hosts = list(lab.pop_names if hosts is None else hosts)
    parts = [
        _table("[defaults]", {"ca": "pebble", "ssh_user": DEPLOY_USER, "ssh_key_file": str(lab.ssh_key),
                              "known_hosts": str(lab.known_hosts), "https_port": lab.ports.https,
                              "trust": [str(lab.seed_ca), str(lab.pebble.roots)]}),
        _table("[ca.pebble]", {"directory": lab.pebble.directory, "contact": ["mailto:ops@hachyderm.test"],
                               "agree_tos": True, "trust": str(lab.https_ca)}),
    ]
    for table, zone, key in (("lab", "hachyderm.test", LAB_KEY), ("challenges", "challenges.test", CHALLENGE_KEY)):
        dns: dict[str, Any] = {"type": "rfc2136", "zones": [zone], "server": "127.0.0.1", "port": lab.ports.dns,
                               "nameservers": ["127.0.0.1"], "propagation_timeout": "5s", "tsig_key": key,
                               "tsig_algorithm": "hmac-sha256", "tsig_secret_file": str(lab.dns_dir / f"{key}.key")}
        if table == "lab":
            dns.update(dns_overrides or {})
        parts.append(_table(f"[dns.{table}]", dns))
    for name in hosts:
        p = lab.pop_paths(name)
        h: dict[str, Any] = {"address": p.address, "port": lab.ports.ssh, "https_port": lab.ports.https,
                             "tags": ["cdn", "canary"] if name == lab.pop_names[0] else ["cdn"],
                             "cert_root": str(p.cert_root), "test_command": p.test_command,
                             "reload_command": p.reload_command}
        h.update((host_overrides or {}).get(name, {}))
        parts.append(_table(f"[hosts.{name}]", h))
    for name in certs:
        parts.append(_table("[[certificates]]", {"name": name, "domains": list(SNI[name]), "dns": "lab",
                                                 "hosts": hosts}))
    for c in extra_certs:
        parts.append(_table("[[certificates]]", {"dns": "lab", "hosts": [], **c}))
    if channel_url_file is not None:
        parts.append(_table("[channels.ops]", {"type": "webhook", "url_file": str(channel_url_file),
                                               "min_severity": "warning"}))
    return "\n".join(parts) + extra


def write_inventory(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def certmgr(inventory: Path, state: Path, *args: str, verbose: bool = True, timeout: float = 180,
            prefix: Sequence[str] = (), env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (`python -m certmgr`, -vv unless told otherwise) and capture everything it printed."""
    argv = [*prefix, sys.executable, "-m", "certmgr", "--inventory", str(inventory), "--state-dir", str(state)]
    if verbose:
        argv.append("-vv")
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", **(env or {})}
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(REPO))


def audit(state: Path) -> list[dict[str, Any]]:
    path = state / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def actions(state: Path, action: str) -> list[dict[str, Any]]:
    return [e for e in audit(state) if e.get("action") == action]


def everything_written(state: Path) -> str:
    """The text of every file under the state dir except private keys (audit log, state JSON, certificates)."""
    out = []
    for p in sorted(state.rglob("*")) if state.exists() else ():
        if p.is_file() and not p.is_symlink() and p.name not in ("privkey.pem", "key.pem"):
            out.append(p.read_text(errors="replace"))
    return "\n".join(out)


# ---------------------------------------------------------------- what the POPs and services saw


def served(lab: Lab, pops: Sequence[str] | None = None, certs: Sequence[str] = tuple(SNI)) -> dict[tuple[str, str], int]:
    """(POP, SNI) → serial of the leaf served right now, by TLS handshake."""
    return {(pop, sni): lab.served_serial(pop, sni) for pop in (pops or lab.pop_names)
            for c in certs for sni in SNI[c]}


class LogMark:
    """Remembers a log file's size; `new()` is what was appended since (the service's own record)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")

    def count(self, needle: str) -> int:
        return self.new().count(needle)


def pebble_mark(lab: Lab) -> LogMark:
    return LogMark(lab.pebble.log)


def sshd_marks(lab: Lab) -> dict[str, LogMark]:
    return {pop: LogMark(lab.pop_paths(pop).sshd_log) for pop in lab.pop_names}


def lab_secrets(lab: Lab) -> list[str]:
    """The TSIG secrets and the webhook URL of a lab: none may ever appear in output or logs."""
    import re

    out = []
    for key in (LAB_KEY, CHALLENGE_KEY):
        m = re.search(r'secret "([^"]+)"', (lab.dns_dir / f"{key}.key").read_text())
        assert m
        out.append(m.group(1))
    return out


def private_key_bodies(*roots: Path) -> list[str]:
    """The base64 body lines of every PEM private key under `roots` (a leak shows at least one line)."""
    bodies = []
    for root in roots:
        for p in root.rglob("*.pem") if root.exists() else ():
            if p.is_symlink() or not p.is_file():
                continue
            text = p.read_text(errors="replace")
            if "PRIVATE KEY" in text:
                lines = [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]
                bodies.extend(lines[:2])
    return bodies


# ---------------------------------------------------------------- fault injectors


class SilentListener:
    """A TCP listener that accepts and never says a word (a hung sshd or nginx); counts connections."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.accepted = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self._conns.append(conn)  # held open, never read or written

    def __enter__(self) -> SilentListener:
        self._sock.bind((self.address, self.port))
        self._sock.listen(64)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        for c in self._conns:
            c.close()
        self._sock.close()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "64k", owner: str = DEPLOY_USER, fill_to_free: int = 0) -> Iterator[Path]:
    """Mount a tiny tmpfs over `where` (its files copied in, owner kept), filled until `fill_to_free` bytes are free.

    Unmounted (and the original directory visible again) on exit, whatever happened.
    """
    import pwd
    import shutil

    saved = Path(tempfile.mkdtemp(prefix="certmgr-fault-tmpfs-"))
    for item in where.iterdir():
        shutil.copy2(item, saved / item.name, follow_symlinks=False)
    st = where.stat()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={st.st_mode & 0o777:o}", "tmpfs", str(where)],
                   check=True)
    try:
        pw = pwd.getpwnam(owner)
        os.chown(where, pw.pw_uid, pw.pw_gid)
        for item in saved.iterdir():
            shutil.copy2(item, where / item.name, follow_symlinks=False)
            os.chown(where / item.name, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
        filler = where / ".filler"
        with open(filler, "wb") as fh:
            with contextlib.suppress(OSError):
                while True:
                    vfs = os.statvfs(where)
                    free = vfs.f_bavail * vfs.f_frsize
                    if free <= fill_to_free:
                        break
                    fh.write(b"\0" * min(4096, free - fill_to_free))
                    fh.flush()
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(saved, ignore_errors=True)


@contextlib.contextmanager
def loopback_resolver() -> Iterator[list[str]]:
    """An argv prefix that runs a command with /etc/resolv.conf → 127.0.0.1 in a private mount namespace.

    The machine's own resolver is off the machine: a name that must fail to resolve (*.invalid) is
    looked up only on loopback, where nothing answers on port 53, so no query ever leaves the host.
    """
    d = Path(tempfile.mkdtemp(prefix="certmgr-fault-resolv-"))
    conf = d / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    conf.chmod(0o644)
    try:
        script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        yield ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(conf)]
    finally:
        conf.unlink(missing_ok=True)
        d.rmdir()
