"""asyncssh is imported without starting a compiler: its library lookups read one `ldconfig -p` listing."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from certmgr import sshlib

REPO = Path(__file__).resolve().parents[2]

LISTING = b"""3 libs found in cache `/etc/ld.so.cache'
\tlibnettle.so.8 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnettle.so.8
\tlibnettle.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libnettle.so
\tlibnettle.so.8 (libc6) => /lib/i386-linux-gnu/libnettle.so.8
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the listing above is x86-64's")
def test_names_are_answered_from_one_listing_as_ctypes_reads_it() -> None:
    """A name in the listing gives its first soname for this ABI; a name not in it gives None; the listing is read once."""
    reads: list[int] = []

    def listing() -> bytes:
        reads.append(1)
        return LISTING

    find = sshlib.ldconfig_finder(listing)
    assert [find("nettle"), find("oqs"), find("liboqs"), find("nettle")] == ["libnettle.so.8", None, None,
                                                                               "libnettle.so.8"]
    assert reads == [1]


@pytest.mark.skipif(not os.path.exists("/sbin/ldconfig"), reason="needs glibc's ldconfig")
def test_answers_match_ctypes_for_libraries_in_the_loader_cache() -> None:
    """For libraries the dynamic loader's cache lists (and one it does not), the answer is ctypes.util.find_library's."""
    find = sshlib.ldconfig_finder()
    for name in ("c", "m", "ssl", "crypto", "nettle", "z"):
        assert find(name) == ctypes.util.find_library(name), name
    assert find("certmgr-no-such-library") is None


@pytest.mark.skipif(not os.path.exists("/sbin/ldconfig"), reason="needs glibc's ldconfig")
def test_importing_remote_runs_ldconfig_once_and_no_compiler() -> None:
    """A fresh process that imports certmgr.remote (hence asyncssh) starts one `ldconfig -p` and no gcc or ld."""
    code = ("import subprocess\n"
            "seen = []\n"
            "init = subprocess.Popen.__init__\n"
            "def record(self, args, *a, **k):\n"
            "    seen.append(args[0] if isinstance(args, (list, tuple)) else args)\n"
            "    init(self, args, *a, **k)\n"
            "subprocess.Popen.__init__ = record\n"
            "import certmgr.remote\n"
            "print(seen)\n")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['/sbin/ldconfig']"
