"""ARI (RFC 9773) and ACME profiles, against tests/ariproxy.py in front of the real Pebble.

Pebble 2.4 (Debian) has neither `renewalInfo` nor `meta.profiles`: the proxy adds both and enforces
`alreadyReplaced`; issuance itself still happens at the real Pebble with real DNS-01 through bind.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_renew import _seed_live, inventory_text, load, rlab, run_renew  # noqa: F401 - rlab is a fixture

from certmgr.issue import ari_cert_id
from certmgr.store import Store
from lab import Lab
from tests.ariproxy import ARIProxy, Window

pytestmark = pytest.mark.integration

NAME = "media.hachyderm.test"


@pytest.fixture
def proxy(rlab: Lab) -> Iterator[ARIProxy]:  # noqa: F811
    with ARIProxy.running(rlab.ports.acme, rlab.https_cert, rlab.https_key, rlab.https_ca) as p:
        yield p


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


def _inv(rlab: Lab, proxy: ARIProxy, tmp_path: Path, **cert: object):  # type: ignore[no-untyped-def]  # noqa: F811
    return load(tmp_path, inventory_text(rlab, [{"name": NAME, "domains": [NAME], **cert}], directory=proxy.directory))


def test_ari_window_in_the_past_renews_with_replaces(rlab: Lab, proxy: ARIProxy, store: Store,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """Inside the CA's window the certificate renews, and the new order names the old one in `replaces`."""
    inv = _inv(rlab, proxy, tmp_path)
    [first] = run_renew(inv, store)
    assert first.status == "renewed" and not first.replaced  # nothing to replace yet
    old_id = ari_cert_id(store.read(NAME).leaf)
    now = dt.datetime.now(dt.UTC)
    proxy.state.default_window = Window(start=now - dt.timedelta(hours=2), end=now - dt.timedelta(hours=1))
    [out] = run_renew(inv, store)
    assert out.status == "renewed", out.error
    assert out.decision.source == "ari" and out.decision.overdue  # the window's end has passed
    assert out.replaced and proxy.state.orders[-1]["replaces"] == old_id
    assert old_id in proxy.state.renewal_info_requests


def test_ari_window_in_the_future_holds_renewal_and_is_persisted(rlab: Lab, proxy: ARIProxy, store: Store,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """A future window overrides the lifetime rule; the chosen time and Retry-After are kept in the store."""
    _seed_live(store, NAME)  # 5 days left of 90: the lifetime rule alone would renew now
    now = dt.datetime.now(dt.UTC)
    start, end = now + dt.timedelta(days=2), now + dt.timedelta(days=3)
    proxy.state.default_window = Window(start=start, end=end, retry_after=7200)
    inv = _inv(rlab, proxy, tmp_path)
    [out] = run_renew(inv, store, now=now)
    assert out.status == "not-due" and out.decision.source == "ari"
    assert out.decision.renew_at is not None and start <= out.decision.renew_at <= end
    state = store.load_json(f"state/renew/{NAME}.json")
    assert dt.datetime.fromisoformat(state["ari_renew_at"]) == out.decision.renew_at
    assert dt.datetime.fromisoformat(state["ari_next_fetch"]) == now + dt.timedelta(seconds=7200)
    assert state["ari_explanation"] == "https://ca.example/incident/1"
    # before Retry-After the window is not fetched again, and the random time stays put
    asked = len(proxy.state.renewal_info_requests)
    [again] = run_renew(inv, store, now=now + dt.timedelta(minutes=30))
    assert len(proxy.state.renewal_info_requests) == asked and again.decision.renew_at == out.decision.renew_at
    # after it, a window moved earlier by the CA (e.g. revocation) makes it due at once
    proxy.state.default_window = Window(start=now - dt.timedelta(hours=1), end=now + dt.timedelta(hours=1))
    [moved] = run_renew(inv, store, now=now + dt.timedelta(hours=3))
    assert moved.status == "renewed", moved.error


def test_already_replaced_retries_without_replaces(rlab: Lab, proxy: ARIProxy, store: Store,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """409 alreadyReplaced makes one retry without `replaces`, which succeeds and says why."""
    inv = _inv(rlab, proxy, tmp_path)
    run_renew(inv, store)
    old_id = ari_cert_id(store.read(NAME).leaf)
    proxy.state.replaced.add(old_id)
    now = dt.datetime.now(dt.UTC)
    proxy.state.default_window = Window(start=now - dt.timedelta(hours=2), end=now - dt.timedelta(minutes=1))
    [out] = run_renew(inv, store)
    assert out.status == "renewed", out.error
    assert not out.replaced
    # the refused order carried `replaces`; every order after it (one, or more if Pebble's random
    # badNonce made the client resend it) carries none
    sent = [o.get("replaces") for o in proxy.state.orders]
    last = len(sent) - 1 - sent[::-1].index(old_id)
    assert sent[last + 1:] and set(sent[last + 1:]) == {None}, sent
    assert any("rejected `replaces`" in n and "alreadyReplaced" in n for n in out.notes), out.notes


def test_profile_is_sent(rlab: Lab, proxy: ARIProxy, store: Store, tmp_path: Path) -> None:  # noqa: F811
    """A profile offered in meta.profiles is sent in the new order."""
    [out] = run_renew(_inv(rlab, proxy, tmp_path, profile="shortlived"), store)
    assert out.status == "renewed", out.error
    assert proxy.state.orders[-1]["profile"] == "shortlived"


def test_unknown_profile_is_a_clear_error(rlab: Lab, proxy: ARIProxy, store: Store, tmp_path: Path) -> None:  # noqa: F811
    """A profile the CA does not offer fails before any order, listing the offered ones."""
    [out] = run_renew(_inv(rlab, proxy, tmp_path, profile="bogus"), store)
    assert out.status == "failed" and not out.retryable
    assert out.error == ("acme order media.hachyderm.test: CA pebble has no profile 'bogus'; it offers classic, "
                         "shortlived, tlsserver (order not placed)")
    assert proxy.state.orders == []


def test_plain_pebble_has_no_profiles(rlab: Lab, store: Store, tmp_path: Path) -> None:  # noqa: F811
    """Against Pebble 2.4 itself (no meta.profiles) a profile is refused with a clear error."""
    inv = load(tmp_path, inventory_text(rlab, [{"name": NAME, "domains": [NAME], "profile": "shortlived"}]))
    [out] = run_renew(inv, store)
    assert out.error == ("acme order media.hachyderm.test: profile 'shortlived' requested but CA pebble offers no "
                         "profiles (order not placed)")
