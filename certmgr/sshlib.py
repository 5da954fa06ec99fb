"""asyncssh, imported without starting a compiler: certmgr's modules take `asyncssh` from here.

At import, asyncssh looks for two optional C libraries with `ctypes.util.find_library` (nettle
for its UMAC MACs; liboqs, tried as `oqs` and `liboqs`, for sntrup761 key exchange). On Linux each
lookup runs `/sbin/ldconfig -p`, and a library the cache lacks then `gcc` (with collect2 and ld) and
`ld`: 28 processes and about 50 ms of CPU at every certmgr start. Here those lookups read one
`ldconfig -p` listing, the first and decisive step of CPython's own search, with CPython's pattern;
the compiler steps are skipped (a library the dynamic loader's cache does not list is not what the
loader would find by name anyway). With LD_LIBRARY_PATH set, CPython's full search runs unchanged.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["asyncssh", "ldconfig_finder"]


def _abi_type() -> str:
    """ldconfig's ABI tag for this interpreter (as ctypes.util computes it)."""
    machine = os.uname().machine + ("-32" if struct.calcsize("l") == 4 else "-64")
    return {"x86_64-64": "libc6,x86-64", "ppc64-64": "libc6,64bit", "sparc64-64": "libc6,64bit",
            "s390x-64": "libc6,64bit", "ia64-64": "libc6,IA-64"}.get(machine, "libc6")


def ldconfig_finder(listing: Callable[[], bytes] | None = None) -> Callable[[str], str | None]:
    """A find_library that answers every name from one `ldconfig -p` listing (read at the first lookup)."""
    cached: list[bytes] = []

    def run() -> bytes:
        try:
            return subprocess.run(["/sbin/ldconfig", "-p"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, env={"LC_ALL": "C", "LANG": "C"}, check=False).stdout
        except OSError:
            return b""

    def find(name: str) -> str | None:
        if not cached:
            cached.append((listing or run)())
        m = re.search(os.fsencode(rf"\s+(lib{re.escape(name)}\.[^\s]+)\s+\({_abi_type()}"), cached[0])
        return os.fsdecode(m.group(1)) if m else None

    return find


@contextmanager
def _quiet_find_library() -> Iterator[None]:
    if os.environ.get("LD_LIBRARY_PATH") or not os.path.exists("/sbin/ldconfig"):
        yield  # CPython's search reads LD_LIBRARY_PATH through ld: keep it whole
        return
    original = ctypes.util.find_library
    ctypes.util.find_library = ldconfig_finder()  # type: ignore[assignment]  # for the import below only
    try:
        yield
    finally:
        ctypes.util.find_library = original


with _quiet_find_library():
    import asyncssh
