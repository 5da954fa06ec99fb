"""plan.decide: renewal windows (lifetime fraction, renew_before, ARI), overdue, backoff — pure, `now` passed in."""

from __future__ import annotations

import datetime as dt

import pytest

from certmgr.inventory import Certificate, Threshold
from certmgr.material import CertInfo
from certmgr.plan import BACKOFF, Decision, RenewState, backoff_until, decide, spread_of

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def cert(**kw: object) -> Certificate:
    base: dict[str, object] = {"name": "media.hachyderm.test", "domains": ("media.hachyderm.test",), "dns": "lab",
                               "hosts": (), "ca": "pebble"}
    base.update(kw)
    return Certificate(**base)  # type: ignore[arg-type]


def info(days: float, *, names: tuple[str, ...] = ("media.hachyderm.test",), key_type: str = "ecdsa-p256",
         serial: str = "aa") -> CertInfo:
    return CertInfo(serial=serial, sha256="00", subject="", issuer="", not_before=T0, not_after=T0 + days * DAY,
                    names=names, key_type=key_type)


@pytest.mark.parametrize(("lifetime", "renew_at_day"), [
    (90, 60),      # 1/3 of 90 days left → renew at day 60
    (64, 64 - 64 / 3),
    (47, 47 - 47 / 3),
    (6, 3),        # under 10 days: 1/2 of lifetime
    (9.9, 4.95),
    (10, 10 - 10 / 3),
])
def test_default_window_is_a_fraction_of_lifetime(lifetime: float, renew_at_day: float) -> None:
    """Without ARI or renew_before, renewal starts when 1/3 of the lifetime is left (1/2 under 10 days)."""
    d = decide(cert(), info(lifetime), RenewState(), T0 + DAY)
    assert d.renew_at == T0 + renew_at_day * DAY
    assert not d.due and not d.overdue
    assert decide(cert(), info(lifetime), RenewState(), d.renew_at).due  # type: ignore[arg-type]


def test_renew_before_duration_and_fraction_override_the_default() -> None:
    """A per-certificate renew_before (duration or fraction) replaces the default rule."""
    d = decide(cert(renew_before=Threshold(seconds=7 * 86400, text="7d")), info(90), RenewState(), T0)
    assert d.renew_at == T0 + 83 * DAY and d.source == "renew_before"
    d = decide(cert(renew_before=Threshold(fraction=0.5, text="1/2")), info(90), RenewState(), T0)
    assert d.renew_at == T0 + 45 * DAY


def test_no_certificate_is_due() -> None:
    """A certificate with nothing live is due at once."""
    d = decide(cert(), None, RenewState(), T0)
    assert d.due and d.attempt and not d.overdue and d.reason == "no certificate yet"


@pytest.mark.parametrize(("live", "reason"), [
    (info(90, names=("media.hachyderm.test", "old.hachyderm.test")), "names changed (removed old.hachyderm.test)"),
    (info(90, names=()), "names changed (added media.hachyderm.test)"),
    (info(90, key_type="rsa-2048"), "key type changed (rsa-2048 → ecdsa-p256)"),
])
def test_changed_inventory_makes_it_due(live: CertInfo, reason: str) -> None:
    """Changed names or key type make a certificate due regardless of its expiry."""
    d = decide(cert(), live, RenewState(), T0 + DAY)
    assert d.due and d.reason == reason


def test_overdue_after_grace_or_after_a_failure() -> None:
    """Past the renewal time by a day (or after a failed attempt) the certificate is overdue."""
    c = cert()
    assert not decide(c, info(90), RenewState(), T0 + 60 * DAY + dt.timedelta(hours=23)).overdue
    assert decide(c, info(90), RenewState(), T0 + 61 * DAY).overdue
    failed = RenewState().failed(T0 + 60 * DAY, "boom")
    d = decide(c, info(90), failed, T0 + 60 * DAY + dt.timedelta(minutes=5))
    assert d.overdue and d.reason.startswith("overdue: ")
    d = decide(c, info(90), RenewState(), T0 + 91 * DAY)
    assert d.overdue and d.reason == "expired 24h00m ago"


def test_short_lived_overdue_grace_is_a_quarter_of_what_was_left() -> None:
    """A 6-day certificate is overdue 18 h after its renewal time, not a whole day."""
    d = decide(cert(), info(6), RenewState(), T0 + 3 * DAY)
    assert d.overdue_at == T0 + 3 * DAY + dt.timedelta(hours=18)


@pytest.mark.parametrize(("failures", "delay"), [(1, BACKOFF[0]), (2, BACKOFF[1]), (3, BACKOFF[2]), (4, BACKOFF[3]),
                                                 (9, BACKOFF[3])])
def test_backoff_grows_then_stays_daily(failures: int, delay: dt.timedelta) -> None:
    """Consecutive failures hold renewal back ~1 min, 10 min, 100 min, then daily."""
    state = RenewState(failures=failures, last_failure=T0, last_error="x")
    assert backoff_until(state) == T0 + delay
    d = decide(cert(), None, state, T0 + delay - dt.timedelta(seconds=1))
    assert d.due and not d.attempt and d.blocked_until == T0 + delay
    assert decide(cert(), None, state, T0 + delay).attempt


def test_retry_after_from_the_ca_extends_backoff() -> None:
    """A CA Retry-After later than the backoff table wins."""
    state = RenewState(failures=1, last_failure=T0, retry_after=T0 + 3 * DAY)
    assert backoff_until(state) == T0 + 3 * DAY


def test_ari_window_replaces_the_lifetime_rule() -> None:
    """With an ARI window for the live serial, renewal is at the chosen time in it and overdue after its end."""
    state = RenewState(ari_serial="aa", ari_start=T0 + 10 * DAY, ari_end=T0 + 12 * DAY, ari_renew_at=T0 + 11 * DAY)
    d = decide(cert(), info(90), state, T0 + 10.5 * DAY)
    assert not d.due and d.renew_at == T0 + 11 * DAY and d.source == "ari"
    d = decide(cert(), info(90), state, T0 + 11 * DAY)
    assert d.due and not d.overdue
    assert decide(cert(), info(90), state, T0 + 12 * DAY).overdue


def test_ari_window_of_another_serial_is_ignored() -> None:
    """A stored window that belongs to an older certificate does not apply to the live one."""
    state = RenewState(ari_serial="old", ari_start=T0 + DAY, ari_end=T0 + 2 * DAY)
    assert decide(cert(), info(90), state, T0 + 3 * DAY).source == "lifetime"


def test_state_round_trips_through_json() -> None:
    """RenewState survives to_json/from_json unchanged (it lives in state/renew/<name>.json)."""
    state = RenewState(failures=2, last_failure=T0, last_error="e", retry_after=T0 + DAY, ari_serial="ab",
                       ari_start=T0, ari_end=T0 + DAY, ari_renew_at=T0, ari_next_fetch=T0, ari_explanation="u")
    assert RenewState.from_json(state.to_json()) == state
    assert RenewState.from_json(None) == RenewState()


def test_success_resets_failures_and_ari() -> None:
    """A successful renewal clears the failure count, the CA's Retry-After and the old ARI window."""
    state = RenewState(failures=3, last_failure=T0, retry_after=T0, ari_serial="x", ari_start=T0, ari_end=T0)
    ok = state.succeeded(T0 + DAY)
    assert ok.failures == 0 and ok.retry_after is None and ok.ari_serial is None and ok.last_success == T0 + DAY


def test_naive_now_is_refused() -> None:
    """decide refuses a naive datetime rather than compare it wrongly."""
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(cert(), None, RenewState(), dt.datetime(2026, 1, 1))


def test_decision_json_shape() -> None:
    """Decision.to_json carries what scan/status show."""
    d: Decision = decide(cert(), info(90), RenewState(), T0)
    assert set(d.to_json()) == {"due", "overdue", "attempt", "reason", "renew_at", "overdue_at", "not_after",
                                "blocked_until", "source"}


SEC = dt.timedelta(seconds=1)


@pytest.mark.parametrize(("days_left", "failures", "delay"), [
    (2, 4, dt.timedelta(hours=4.8)),       # 2 days left: retried within hours, not after the table's day
    (60, 4, DAY),                          # plenty left: the table's daily step
    (60, 1, BACKOFF[0]),                   # the first step is already shorter than the cap
    (20 / 86400, 1, 2 * SEC),              # a lab certificate with 20 s left: within 2 s, not after a minute
    (-1, 4, 9 * DAY),                      # expired: capped by a tenth of the lifetime (90 d) → the table's day
])
def test_backoff_is_capped_by_a_fraction_of_what_remains(days_left: float, failures: int,
                                                         delay: dt.timedelta) -> None:
    """The backoff after failures never exceeds a tenth of the time left at the failure (of the lifetime once expired)."""
    live = CertInfo(serial="aa", sha256="00", subject="", issuer="", not_before=T0 - 90 * DAY + days_left * DAY,
                    not_after=T0 + days_left * DAY, names=("media.hachyderm.test",), key_type="ecdsa-p256")
    state = RenewState(failures=failures, last_failure=T0, last_error="x")
    assert backoff_until(state, live) == T0 + min(delay, BACKOFF[min(failures, len(BACKOFF)) - 1])
    d = decide(cert(), live, state, T0 + SEC / 2)
    assert d.blocked_until == (backoff_until(state, live) if d.due else None)


def test_ca_retry_after_is_not_capped() -> None:
    """The CA's Retry-After is honoured even when it is later than the capped backoff."""
    live = info(90)
    state = RenewState(failures=1, last_failure=T0 + 89 * DAY, retry_after=T0 + 89.5 * DAY)
    assert backoff_until(state, live) == T0 + 89.5 * DAY


def test_spread_moves_renewal_up_to_a_fifth_of_the_window_earlier() -> None:
    """A renewed certificate's spread makes it renew up to 20 % of its renewal window early, stably."""
    assert decide(cert(), info(90), RenewState(spread=0.0), T0).renew_at == T0 + 60 * DAY
    assert decide(cert(), info(90), RenewState(spread=1.0), T0).renew_at == T0 + 54 * DAY
    d = decide(cert(), info(90), RenewState(spread=0.5), T0)
    assert d.renew_at == T0 + 57 * DAY and "spread 10% early" in d.reason
    assert RenewState.from_json(RenewState(spread=0.25).to_json()).spread == 0.25
    assert RenewState().succeeded(T0, spread=0.75).spread == 0.75


def test_fifty_certificates_issued_together_do_not_renew_together() -> None:
    """50 certificates issued in the same minute get renewal times spread over hours, from their serials."""
    times = {decide(cert(), info(90, serial=f"{i:032x}"), RenewState(spread=spread_of(f"{i:032x}")), T0).renew_at
             for i in range(50)}
    assert len({t.replace(second=0, microsecond=0) for t in times if t}) >= 45
    span = max(t for t in times if t) - min(t for t in times if t)
    assert span > 4 * DAY
    assert spread_of("ab") == spread_of("ab") and 0 <= spread_of("ab") <= 1
