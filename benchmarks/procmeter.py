"""CPU per kind of process (certmgr, sshd, sudo, nginx, shells, openssl, ...) over phases of a benchmark.

Live processes are read from /proc/PID/stat (utime + stime, their own CPU); processes that exit
meanwhile (an SSH session's `sh`, `sudo`, `nginx -t`, an `openssl s_client`, a scan worker) come
from BSD process accounting (`acct(2)`, root only): the kernel appends one record per exiting
process with its name, pid, parent and CPU. The accounting file is split at each `mark()` by
its size, so a process is counted in the phase it exited in. Only processes descended from the
given roots (this process, and the lab's sshd and nginx masters) count: other jobs on the machine
do not. Caveat, from the kernel: an exited process's CPU is recorded in whole 10 ms ticks,
truncated, so many short processes (a `sudo` takes a few ms) read low; the `exited` column
says how many there were. `pop_total` (the live sshd and nginx processes' own CPU plus all they
reaped, from /proc) is set beside it; it misses processes reparented away from them before they
were reaped, and reads below the per-kind sum in some phases.
"""

from __future__ import annotations

import collections
import ctypes
import os
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
AHZ = 100  # acct(5): comp_t times are in 1/AHZ s
_REC = struct.Struct("<BBHIIIIIIf8H16s")  # struct acct_v3, 64 bytes


def _comp(c: int) -> int:
    """comp_t: 13-bit mantissa, 3-bit base-8 exponent."""
    return (c & 0x1FFF) << (3 * (c >> 13))


def kind(comm: str) -> str:
    """The row a process is counted under."""
    c = comm.lower()
    if c.startswith("python") or c.startswith("certmgr"):
        return "certmgr"
    if c.startswith("sshd"):
        return "sshd"
    if c in ("sh", "bash", "dash", "flock", "ln", "mv", "mkdir", "rm", "cat", "awk", "sha256sum", "stat", "chmod",
             "chown", "mktemp", "readlink", "find", "test", "env", "sleep", "ls", "sync", "cp", "tar"):
        return "shells"
    if c.startswith("nginx"):
        return "nginx"
    if c.startswith("wanproxy"):
        return "wanproxy"
    for k in ("sudo", "openssl", "scp", "ssh", "sftp-server"):
        if c.startswith(k):
            return "ssh/scp (loop)" if k in ("scp", "ssh") else k
    return "other"


_BOOT = next(int(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime "))
Stat = tuple[str, int, float, float, float]


def _stat(pid: int) -> Stat | None:
    """(comm, ppid, own CPU s, reaped children's CPU s, start time, epoch s) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    f = raw.rsplit(")", 1)[1].split()
    return comm, int(f[1]), (int(f[11]) + int(f[12])) / TICK, (int(f[13]) + int(f[14])) / TICK, \
        _BOOT + int(f[19]) / TICK


def _snapshot() -> dict[int, Stat]:
    out = {}
    for e in os.listdir("/proc"):
        if e.isdigit() and (s := _stat(int(e))) is not None:
            out[int(e)] = s
    return out


class Meter:
    """acct on for the meter's life; `mark(label)` closes a phase; `phases` holds {label: {kind: s}}."""

    def __init__(self, roots: Iterable[int] = ()) -> None:
        self.roots = {os.getpid(), *roots}
        self.started = int(time.time()) - 1  # acct's ac_btime: processes born before are not the benchmark's
        fd, name = tempfile.mkstemp(prefix="certmgr-bench-acct-")
        os.close(fd)
        self.path = Path(name)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.acct_ok = self.libc.acct(str(self.path).encode()) == 0
        # pid -> {start second: (end, ppid)}: every process seen, so a parent is looked up as it was at
        # the child's birth — other jobs reuse pids, and a reused pid must not make their processes ours
        self.life: dict[int, dict[int, tuple[float, int]]] = collections.defaultdict(dict)
        self.prev = _snapshot()
        self._learn(self.prev)
        self.offset = 0
        self.phases: dict[str, dict[str, float]] = {}
        self.exited: dict[str, collections.Counter[str]] = {}
        self.pop_total: dict[str, float] = {}

    def add_roots(self, pids: Iterable[int | None]) -> None:
        self.roots |= {p for p in pids if p}

    def _learn(self, snap: dict[int, Stat]) -> None:
        for pid, s in snap.items():
            self.life[pid][int(s[4])] = (float("inf"), s[1])

    def _parent_at(self, pid: int, t: float) -> int | None:
        """The parent of the process `pid` that was alive at time t (acct times are whole seconds)."""
        alive = [(start, ppid) for start, (end, ppid) in self.life.get(pid, {}).items()
                 if start <= t + 1 and end >= t - 1]
        return max(alive)[1] if alive else None

    def _ours(self, pid: int, t: float) -> bool:
        seen = 0
        cur: int | None = pid
        while cur is not None and cur > 1 and seen < 64:
            if cur in self.roots:
                return True
            cur, seen = self._parent_at(cur, t), seen + 1
        return False

    def _pop_side(self, snap: dict[int, Stat]) -> dict[int, float]:
        """Each live sshd and nginx of ours: its own CPU plus everything it reaped."""
        return {pid: s[2] + s[3] for pid, s in snap.items()
                if pid != os.getpid() and s[0].startswith(("sshd", "nginx")) and self._ours(pid, s[4])}

    def mark(self, label: str) -> dict[str, float]:
        """CPU seconds per kind since the last mark, recorded under `label`."""
        snap = _snapshot()
        self._learn(snap)
        data = self.path.read_bytes()[self.offset:] if self.acct_ok else b""
        usable = len(data) - len(data) % _REC.size
        self.offset += usable
        recs = [_REC.unpack_from(data, i) for i in range(0, usable, _REC.size)]
        for r in recs:
            self.life[r[6]].pop(r[8], None)  # the same process as seen alive (start rounded alike or not)
            self.life[r[6]][r[8]] = (r[8] + r[9], r[7])
        cpu: collections.Counter[str] = collections.Counter()
        exited: collections.Counter[str] = collections.Counter()
        for r in recs:
            pid = r[6]
            if r[1] != 3 or r[8] < self.started or not self._ours(pid, r[8]):
                continue
            comm = r[18].split(b"\0", 1)[0].decode(errors="replace")
            used = (_comp(r[10]) + _comp(r[11])) / AHZ
            if pid in self.prev and self.prev[pid][0][:15] == comm[:15]:
                used = max(0.0, used - self.prev[pid][2])  # its CPU up to the last mark was counted then
            cpu[kind(comm)] += used
            exited[comm] += 1
        for pid, (comm, _ppid, own, _kids, start) in snap.items():
            if pid == os.getpid() or not self._ours(pid, start):
                continue
            before = self.prev[pid][2] if pid in self.prev and self.prev[pid][0] == comm else 0.0
            cpu[kind(comm)] += own - before
        now_pop, prev_pop = self._pop_side(snap), self._pop_side(self.prev)
        # a process new since the last mark counts whole; one gone since is in its parent's reaped CPU
        self.pop_total[label] = sum(v - prev_pop.get(pid, 0.0) for pid, v in now_pop.items())
        self.prev = snap
        self.phases[label] = dict(cpu)
        self.exited[label] = exited
        return dict(cpu)

    def close(self) -> None:
        if self.acct_ok:
            self.libc.acct(None)
        self.path.unlink(missing_ok=True)


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


def _descendants(pids: Iterable[int]) -> list[int]:
    """`pids` and every live process descended from them."""
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for pid, s in _snapshot().items():
        kids[s[1]].append(pid)
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


class CpuGroups:
    """Exact CPU per kind of process, kernel time included, from cgroup v1 cpuacct groups (root only).

    Each kind (e.g. certmgr, sshd, nginx, wanproxy) is a group `certmgr-bench-TAG/KIND`; a process
    moved there (with its live descendants) takes every process it forks later with it, so short-lived
    ones (an SSH session's `sh`, `sudo`, `nginx -t`) count whether or not anyone reaps them, and other
    jobs on the machine never do. `read()` returns {kind: (user s, system s)} so far. `close()` moves
    every process back to the root group and removes the groups.
    """

    def __init__(self, tag: str, kinds: Iterable[str]) -> None:
        self.top = CPUACCT / f"certmgr-bench-{tag}"
        self.ok = os.access(CPUACCT / "cgroup.procs", os.W_OK)
        self.kinds = list(kinds)
        if self.ok:
            for k in self.kinds:
                (self.top / k).mkdir(parents=True, exist_ok=True)

    def procs_file(self, kind: str) -> Path:
        return self.top / kind / "cgroup.procs"

    def move(self, kind: str, pids: Iterable[int | None]) -> None:
        if not self.ok:
            return
        for pid in _descendants(p for p in pids if p):
            try:
                self.procs_file(kind).write_text(str(pid))
            except OSError:
                pass  # exited meanwhile

    def read(self) -> dict[str, tuple[float, float]]:
        out = {}
        for k in self.kinds:
            try:
                user = int((self.top / k / "cpuacct.usage_user").read_text()) / 1e9
                system = int((self.top / k / "cpuacct.usage_sys").read_text()) / 1e9
            except (OSError, ValueError):
                user = system = 0.0
            out[k] = (user, system)
        return out

    def close(self) -> None:
        if not self.ok:
            return
        for k in self.kinds:
            d = self.top / k
            for _ in range(50):
                try:
                    pids = (d / "cgroup.procs").read_text().split()
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        (CPUACCT / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            self.top.rmdir()
        except OSError:
            pass
