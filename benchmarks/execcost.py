"""Benchmark: what one process start costs on this machine, and how much of it is the C library's start-up.

    .venv/bin/python benchmarks/execcost.py [--runs 500]

A deploy starts ~24 processes per POP (sshd's re-exec, shells, coreutils, sudo, `nginx -t`), so what a
process start costs bounds what a POP pays per deploy however few steps the scripts take. This starts,
`--runs` times each and one at a time, three programs that do nothing and exit 0, and prints the CPU
each start costs (the children's user + system time, getrusage) and its wall time:

- a static x86-64 program of three instructions (written here as a 129-byte ELF file): fork, exec, exit;
  the kernel's share of any start;
- the same built statically against glibc (`gcc -static`, when gcc and glibc's static library are
  there): the kernel's share plus glibc's start-up (CPU features, caches), no dynamic loader;
- /usr/bin/true: what a coreutils program costs (glibc's start-up, the dynamic loader, its libraries).

On a virtual machine glibc's start-up runs CPUID dozens of times (init_cpu_features, and
intel_check_word per cache level on Intel), and each CPUID leaves the guest for the hypervisor: `perf
record -a` of a deploy shows those functions by name. Nothing here is asserted; it prints figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# mov eax, 60 (exit); xor edi, edi; syscall
_CODE = bytes.fromhex("b83c00000031ff0f05")
_BASE = 0x400000


def tiny_elf() -> bytes:
    """A static x86-64 Linux ELF executable that exits 0 at once: one header, one loadable segment."""
    ehsize, phsize = 64, 56
    entry = _BASE + ehsize + phsize
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1, System V
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    size = ehsize + phsize + len(_CODE)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + program + _CODE


def static_glibc(tmp: Path) -> Path | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    src, out = tmp / "nothing.c", tmp / "nothing-glibc"
    src.write_text("int main(void) { return 0; }\n")
    done = subprocess.run([gcc, "-O2", "-static", "-o", str(out), str(src)], capture_output=True)
    return out if done.returncode == 0 else None


def cost(argv: list[str], runs: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per start of argv, children's getrusage over `runs` starts one after another."""
    for _ in range(min(20, runs)):  # warm the page cache
        subprocess.run(argv, check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    for _ in range(runs):
        pid = os.posix_spawn(argv[0], argv, {})
        os.waitpid(pid, 0)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu * 1000 / runs, wall * 1000 / runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=500)
    args = ap.parse_args()
    if platform.machine() != "x86_64" or sys.platform != "linux":
        raise SystemExit("execcost: x86-64 Linux only")
    virt = "a virtual machine (cpuinfo's hypervisor flag)" if "hypervisor" in Path("/proc/cpuinfo").read_text() \
        else "no hypervisor flag in cpuinfo"
    print(f"process starts, {args.runs} each, one at a time; {os.cpu_count()} CPUs, {virt}")
    with tempfile.TemporaryDirectory(prefix="certmgr-execcost-") as d:
        tmp = Path(d)
        tiny = tmp / "nothing-nolibc"
        tiny.write_bytes(tiny_elf())
        tiny.chmod(0o755)
        rows: list[tuple[str, Path | None]] = [
            ("static, no C library (kernel: fork, exec, exit)", tiny),
            ("static glibc (adds glibc's start-up, no loader)", static_glibc(tmp)),
            ("/usr/bin/true (glibc, dynamic loader, coreutils)", Path("/usr/bin/true")),
        ]
        base = None
        for label, path in rows:
            if path is None:
                print(f"  {label:52s} skipped (no gcc or no static glibc)")
                continue
            cpu, wall = cost([str(path)], args.runs)
            base = cpu if base is None else base
            extra = f"; {cpu - base:+.3f} ms CPU over the kernel's share" if path != tiny else ""
            print(f"  {label:52s} {cpu:6.3f} ms CPU, {wall:6.3f} ms wall per start{extra}")


if __name__ == "__main__":
    main()
