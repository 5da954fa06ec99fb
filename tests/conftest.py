"""Shared pytest fixtures for certmgr.

`lab` is the session-wide local lab (Pebble, bind9, CDN POPs) for tests marked
`integration`; other fixtures go here as the suite grows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# `lab/` lives at the repo root, next to `certmgr/`; make it importable however pytest is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import Lab
from lab.proc import LabError, port_in_use

LAB_PORT_BASE = 20000
LAB_PORT_STRIDE = 1000  # a lab uses base … base+11; one block per xdist worker


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers it too; this keeps `--strict-markers` happy if run without it.
    if not any(str(m).startswith("integration:") for m in config.getini("markers")):
        config.addinivalue_line("markers", "integration: needs the local lab (root, Pebble, bind9, sshd, nginx)")


def _lab_port_base() -> int:
    """20000 + 1000 × xdist worker index; CERTMGR_TEST_PORT_BASE moves the whole block (parallel checkouts)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", … under pytest-xdist
    index = int(worker[2:]) if worker.startswith("gw") else 0
    base = int(os.environ.get("CERTMGR_TEST_PORT_BASE", LAB_PORT_BASE))
    return base + LAB_PORT_STRIDE * index


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A lab in a fresh temporary dir, torn down (even after failures) when the session ends.

    Set CERTMGR_LAB_KEEP=1 to keep the directory (logs, configs) for a post-mortem.
    """
    # Not pytest's tmp_path: that lives under a 0700 dir the deploy user cannot traverse.
    path = Path(tempfile.mkdtemp(prefix=f"certmgr-lab-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"))
    instance = Lab(path, _lab_port_base())
    try:
        instance.up()
        yield instance
    finally:
        instance.down()
        if not os.environ.get("CERTMGR_LAB_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


_SLOTS_IN_USE: set[int] = set()
PRIVATE_SLOT_STRIDE = 100  # a lab uses base … base+11; the session lab is slot 0 of this worker's block


@contextlib.contextmanager
def private_lab(tag: str, **kwargs: object) -> Iterator[Lab]:
    """A lab of a test module's own (fault tests restart Pebble, break POPs, run 20 POPs…).

    It gets a free 100-port slot inside this worker's 1000-port block, so it never collides
    with the session `lab` or another worker's labs; it is stopped and removed on exit.
    """
    def ports_free(slot: int) -> bool:
        # A block inside the kernel's ephemeral range (32768-60999, when CERTMGR_TEST_PORT_BASE puts it
        # there) may hold other programs' outgoing connections: skip a slot whose loopback ports are taken.
        base = _lab_port_base() + PRIVATE_SLOT_STRIDE * slot
        return not any(port_in_use("127.0.0.1", base + i) for i in range(7))

    free = [i for i in range(1, 10) if i not in _SLOTS_IN_USE]
    slot = next((i for i in free if ports_free(i)), None)
    if slot is None:
        raise LabError(f"private_lab {tag}: every free port slot of this worker has a port in use (slots {free})")
    _SLOTS_IN_USE.add(slot)
    path = Path(tempfile.mkdtemp(prefix=f"certmgr-lab-{tag}-"))
    instance = Lab(path, _lab_port_base() + PRIVATE_SLOT_STRIDE * slot, **kwargs)  # type: ignore[arg-type]
    try:
        instance.up()
        yield instance
    finally:
        instance.down()
        _SLOTS_IN_USE.discard(slot)
        if not os.environ.get("CERTMGR_LAB_KEEP"):
            shutil.rmtree(path, ignore_errors=True)



def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line counting the fault cases (tests marked `faults`) by outcome, e.g. `fault cases: 67 passed, …`.

    It lives here, not in tests/faults/, because under pytest-xdist the controller loads only this conftest.
    """
    counts = {"passed": 0, "failed": 0, "xfailed": 0}
    seen: set[tuple[str, str]] = set()
    for key, reports in terminalreporter.stats.items():
        for rep in reports:
            keywords = getattr(rep, "keywords", None) or {}
            nodeid = getattr(rep, "nodeid", None)
            if "faults" not in keywords or nodeid is None:
                continue
            if key == "passed" and rep.when == "call":
                outcome = "passed"
            elif key in ("failed", "error"):
                outcome = "failed"
            elif key == "xfailed":
                outcome = "xfailed"
            else:
                continue
            if (nodeid, outcome) not in seen:
                seen.add((nodeid, outcome))
                counts[outcome] += 1
    if any(counts.values()):
        terminalreporter.write_line(
            f"fault cases: {counts['passed']} passed, {counts['failed']} failed, {counts['xfailed']} xfailed")
