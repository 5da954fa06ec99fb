"""Process and port helpers for the lab: spawn, identify, wait for and stop daemons.

Every stop is by a recorded pid whose command line still names the lab's own
config file, so a recycled pid or another engineer's daemon is never signalled.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class LabError(RuntimeError):
    """A lab component could not be brought up or down; the message names it."""


# Popen objects of daemons this Python process started, kept so they are reaped
# (no zombies while e.g. pytest lives on) and never garbage-collected while running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `pred` every `interval` seconds until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 3, after the parenthesised comm (which may itself contain spaces).
    return stat.rsplit(")", 1)[1].split()[0]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (reaping it when it is our child)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def ours(pid: int | None, marker: str) -> bool:
    """True if `pid` is alive and its command line contains `marker` (a lab config path)."""
    return pid is not None and pid > 0 and pid_alive(pid) and marker in cmdline(pid)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def spawn(argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None) -> int:
    """Start a foreground daemon detached from our session, output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            # Own session: a Ctrl-C aimed at pytest or the CLI must not reach the daemons;
            # `down` (or the fixture's teardown) stops them explicitly.
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _start_time(pid: int) -> str | None:
    """The process start time (/proc/PID/stat field 22): with the pid, a unique identity."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_tree(pid: int, marker: str, *, timeout: float = 10.0, children_first: bool = False) -> list[int]:
    """Stop a lab daemon and everything it forked (nginx workers, sshd sessions); return the pids.

    Only acts when `pid` is still ours (see `ours`). The descendants are collected, with
    their start times, before signalling: they are known to be this daemon's even once
    reparented, and a pid recycled meanwhile by someone else's process is left alone.
    `children_first` (sshd) ends sessions while the listener still lives to reap them;
    never for nginx, whose master would respawn killed workers.
    """
    if not ours(pid, marker):
        return []
    tree = [(c, _start_time(c)) for c in descendants(pid)]

    def live(c: int, started: str | None) -> bool:
        return pid_alive(c) and _start_time(c) == started

    def signal_tree(sig: int) -> None:
        for c, started in tree:
            if live(c, started):
                _signal(c, sig)

    def tree_gone() -> bool:
        return not any(live(c, started) for c, started in tree)

    if children_first:
        signal_tree(signal.SIGTERM)
        wait_until(tree_gone, 2.0)
    _signal(pid, signal.SIGTERM)
    if not wait_until(lambda: not pid_alive(pid), timeout):
        _signal(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 5.0)
    # Session children of sshd outlive the listener; nginx workers exit with the master.
    signal_tree(signal.SIGTERM)
    if not wait_until(tree_gone, 3.0):
        signal_tree(signal.SIGKILL)
    if pid_alive(pid):
        raise LabError(f"pid {pid} ({cmdline(pid)[:80]}) did not exit")
    return [pid, *(c for c, _ in tree)]


def wait_vanished(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until dead `pids` are gone from /proc, zombies included.

    A daemon left by an earlier `up` process is init's child, and this machine's
    init reaps lazily (about every 2 s); waiting makes `pgrep` clean after `down`.
    """
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout, 0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def port_in_use(address: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """True if binding `address:port` fails because someone else holds it."""
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            # Lets us bind over TIME_WAIT leftovers, still fails on a live listener.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def check_ports_free(component: str, ports: Sequence[tuple[str, int, str]]) -> None:
    """Raise a LabError naming the first `(address, port, "tcp"|"udp")` already taken."""
    for address, port, proto in ports:
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        if port_in_use(address, port, kind):
            raise LabError(
                f"{component}: {proto} port {address}:{port} is already in use by a process this lab "
                f"did not start; pick another --port-base or stop that process"
            )


def tcp_open(address: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_tcp(component: str, address: str, port: int, *, pid: int | None, log: Path, timeout: float = 15.0) -> None:
    """Wait until `address:port` accepts connections; fail early if `pid` died."""

    def ready() -> bool:
        if pid is not None and not pid_alive(pid):
            raise LabError(f"{component} exited during startup (port {address}:{port}); log {log}:\n{tail(log)}")
        return tcp_open(address, port)

    if not wait_until(ready, timeout):
        raise LabError(f"{component} did not listen on {address}:{port} within {timeout:.0f}s; log {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command, raising a LabError with its output when it fails."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res
