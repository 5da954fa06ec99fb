"""The soak's fault scheduler bounds outages so that a correct controller can always keep up (no lab needed)."""

from __future__ import annotations

import random

import pytest

from tests.soak.harness import fits, outage_bounds

# 90-second certificates, twice-daily cadence (7.5 s): blocked stretches of at most 15 s, clear ones of at least 15 s
MAX_BLOCK, MIN_CLEAR = outage_bounds(90, 7.5)


def test_outage_bounds_leave_two_timer_periods_inside_the_shortest_renewal_window() -> None:
    """With 90-s certificates renewed 45 s before expiry and a run every 7.5 s, a stretch blocks at most 15 s and 15 s stay clear."""
    assert (MAX_BLOCK, MIN_CLEAR) == (15.0, 15.0)


@pytest.mark.parametrize(("spans", "start", "end", "ok"), [
    ([], 0.0, 15.0, True),  # one outage as long as allowed
    ([], 0.0, 15.5, False),  # one outage too long
    ([(0.0, 10.0)], 25.0, 40.0, True),  # a second one a whole clear stretch later
    ([(0.0, 10.0)], 24.0, 30.0, False),  # too soon after: the two join into a 30-s stretch
    ([(0.0, 8.0)], 12.0, 15.0, True),  # too soon after, but the joined stretch is still only 15 s
    ([(0.0, 10.0), (30.0, 40.0)], 20.0, 21.0, False),  # between two: joins both
    ([(0.0, 5.0)], 2.0, 4.0, True),  # inside one already blocked
])
def test_fits_joins_outages_closer_than_a_clear_stretch(spans: list[tuple[float, float]], start: float, end: float,
                                                        ok: bool) -> None:
    """An outage is allowed only if, joined with every outage less than a clear stretch away, it blocks no longer than allowed."""
    assert fits(spans, start, end, max_block=MAX_BLOCK, min_clear=MIN_CLEAR) is ok


def test_any_schedule_fits_accepts_leaves_a_clear_stretch_in_every_renewal_window() -> None:
    """Whatever outages `fits` lets in, every 45-s renewal window holds a whole clear stretch of two timer periods."""
    rng = random.Random(12)
    for _ in range(200):
        spans: list[tuple[float, float]] = []
        t = 0.0
        while t < 600:
            t += rng.expovariate(1 / 6)
            d = rng.uniform(1, 20)
            if fits(spans, t, t + d, max_block=MAX_BLOCK, min_clear=MIN_CLEAR):
                spans.append((t, t + d))
        for w0 in range(0, 600, 1):
            w1 = w0 + 45.0
            inside = sorted((max(a, w0), min(b, w1)) for a, b in spans if b > w0 and a < w1)
            clear, edge = 0.0, float(w0)
            for a, b in inside:
                clear, edge = max(clear, a - edge), max(edge, b)
            clear = max(clear, w1 - edge)
            assert clear >= MIN_CLEAR, (w0, inside)


def test_audit_lost_matches_certmgr_s_own_log_line_of_an_unwritten_switch_row() -> None:
    """The soak's `audit-lost` pattern finds the line certmgr logs when a POP switch's audit row is not written
    (as its log formatter writes it), and not the row of a refusal, which switched nothing."""
    import logging

    from certmgr.log import KVFormatter
    from tests.soak.harness import AUDIT_LOST

    def line(msg: str) -> bytes:
        rec = logging.LogRecord("certmgr.deploy.host", logging.ERROR, __file__, 1, "audit: %s", (msg,), None)
        return KVFormatter().format(rec).encode()

    lost = line("store 127.0.0.1:1/certmgr: audit deployed media.example: this controller no longer holds pop:b "
                "(not written)")
    fenced = line("store 127.0.0.1:1/certmgr: audit fenced media.example: lock session ended (not written)")
    text = b"\n".join([b"time=x level=info msg=deployed", lost, fenced])
    assert AUDIT_LOST.findall(text) == [lost]
