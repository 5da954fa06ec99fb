"""Guards for deploy's work on a POP: the POP lock shared by every controller, this controller's
tag on its uploads, and what a failed upload means (SFTP reports a full disk as a bare "Failure").
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import secrets
import socket
from collections.abc import Mapping

from certmgr.inventory import Host
from certmgr.remote import Result, b64text

LOCK_FILE = "archive/.certmgr.lock"  # under cert_root; the deploy user owns archive/ (docs/deploy.md)

def _script(name: str) -> str:
    # read directly (not through certmgr.deploy, which imports this module)
    return importlib.resources.files("certmgr").joinpath("deploy", "scripts", name).read_text(encoding="utf-8")


# One certmgr script at a time per POP, whichever controller (state dir) runs it: flock(1) on
# archive/.certmgr.lock (LOCK_FILE), held until the script exits. See deploy/scripts/lock.sh.
LOCK_SH = _script("lock.sh")
# Free space at the nearest existing directory of $1.
FREE_SH = _script("free.sh")


def controller_tag(store: object) -> str:
    """8 hex digits naming this controller (machine + state dir): its upload temp dirs carry it.

    Only one run per state dir at a time (the store lock), so a temp dir with our own tag is an
    earlier, dead run's and may be swept at once; another tag's only once it is old.
    """
    root = getattr(store, "root", None)
    if root is None:
        return secrets.token_hex(4)
    seed = f"{socket.gethostname()}\0{os.path.realpath(root)}"
    return hashlib.sha256(seed.encode()).hexdigest()[:8]


def lock_wait(command_timeout: float) -> int:
    """Seconds a script waits for the POP lock: half the command timeout, so it gives up before the client does."""
    return max(1, int(command_timeout / 2))


def lock_error(res: Result, host: Host, root: str) -> str | None:
    """The cause when a script could not take the POP lock, else None."""
    if res.get("lock_busy") is not None:
        return (f"another deploy holds the lock on {host.name} ({root}/{LOCK_FILE}) for more than "
                f"{res.get('lock_busy')}s")
    if res.get("lock_failed") is not None:
        return f"cannot take the lock {root}/{LOCK_FILE} on {host.name}: {b64text(res.get('lock_failed') or '')}"
    return None


LOCK_HINT = ("another certmgr (another state dir, or a script of an earlier run that timed out) is working on "
             "this POP; rerun later, or look for `sh -c … certmgr` processes there")


def upload_failure(host: Host, path: str, free: Result, files: Mapping[str, tuple[bytes, int]]) -> str | None:
    """'no space left on POP:<path> (N KB free)' when the free space explains a failed upload, else None."""
    kb, inodes = free.get("free_kb"), free.get("free_inodes")
    where = free.get("dir") or path
    if kb is None or not kb.isdigit():
        return None
    need = sum(len(data) for data, _ in files.values()) + 4096 * (len(files) + 1)  # a block per file and dir
    if int(kb) * 1024 < need:
        return f"no space left on {host.name}:{where} ({kb} KB free)"
    if inodes is not None and inodes.isdigit() and int(inodes) <= len(files):
        return f"no space left on {host.name}:{where} ({inodes} inodes free)"
    return None
