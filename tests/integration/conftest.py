"""Fixtures shared by the lab's integration test modules (the lab itself is started in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import Lab
from tests.receiver import Receiver


@pytest.fixture()
def seeded(lab: Lab) -> Iterator[Lab]:
    """Every POP back on its near-expiry certbot-layout seed (5 of 90 days left), conf.d empty."""
    lab.reseed()
    yield lab
    for pop in lab.pop_names:
        for f in lab.pop_paths(pop).conf_d.glob("*.conf"):
            f.unlink()


@pytest.fixture()
def receiver(lab: Lab) -> Iterator[Receiver]:
    """The chat webhook receiver on the lab's webhook port."""
    with Receiver(port=lab.info["webhook"]["port"]) as rx:
        yield rx
