"""issue._retrying: which ACME failures are retried in-run, how long it waits, and the error it finally raises."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from acme import messages

from certmgr.errors import ACMEError, RateLimited
from certmgr.issue import Timeouts, _retrying

TIMEOUTS = Timeouts(http=5, short_wait=0.2)


class FakeResponse:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        self.headers = headers or {}


class FakeNet:
    last_response: Any = None


def script(net: FakeNet, steps: list[tuple[Any, FakeResponse | None]]) -> Any:
    """A blocking call that raises (or returns) each step in turn, setting net.last_response like _Net does."""
    calls = iter(steps)

    def fn() -> Any:
        outcome, resp = next(calls)
        net.last_response = resp
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return fn


def err(code: str, detail: str = "d") -> messages.Error:
    return messages.Error(typ=f"urn:ietf:params:acme:error:{code}", detail=detail)


def run(steps: list[tuple[Any, FakeResponse | None]]) -> Any:
    net = FakeNet()
    with ThreadPoolExecutor(2) as pool:
        return asyncio.run(_retrying("acme new-order x", net, pool, TIMEOUTS, script(net, steps),  # type: ignore[arg-type]
                                     outcome="order not placed"))


def test_bad_nonce_is_retried_at_once() -> None:
    """badNonce several times in a row (beyond the library's single retry) still ends in success."""
    bad = (err("badNonce"), FakeResponse(400))
    assert run([bad, bad, bad, ("ok", FakeResponse(201))]) == "ok"


def test_bad_nonce_gives_up_eventually() -> None:
    """Eleven rejected nonces in a row become an ACMEError, not an endless loop."""
    bad = (err("badNonce", "JWS has an invalid anti-replay nonce"), FakeResponse(400))
    with pytest.raises(ACMEError) as e:
        run([bad] * 11)
    assert str(e.value) == ("acme new-order x: badNonce: JWS has an invalid anti-replay nonce (order not placed)")


def test_short_retry_after_on_429_is_waited_out() -> None:
    """A 429 whose Retry-After is within short_wait is waited out and the call repeated."""
    assert run([(err("rateLimited"), FakeResponse(429, {"Retry-After": "0"})), ("ok", FakeResponse(201))]) == "ok"


def test_long_retry_after_becomes_rate_limited() -> None:
    """A 429 asking for longer than short_wait fails with RateLimited carrying the time, for the backoff state."""
    with pytest.raises(RateLimited) as e:
        run([(err("rateLimited", "too many new orders"), FakeResponse(429, {"Retry-After": "3600"}))])
    assert str(e.value) == "acme new-order x: rate limited: too many new orders (order not placed)"
    assert e.value.retry_after is not None and e.value.retryable


def test_5xx_is_retried_then_reported_as_retryable() -> None:
    """Server errors are retried three times with short pauses, then reported as a retryable ACMEError."""
    five = (err("serverInternal", "boom"), FakeResponse(500, {"Retry-After": "0"}))
    assert run([five, five, ("ok", FakeResponse(200))]) == "ok"
    with pytest.raises(ACMEError) as e:
        run([five] * 4)
    assert str(e.value) == "acme new-order x: serverInternal: boom (order not placed)" and e.value.retryable


@pytest.mark.parametrize(("code", "status"), [("unauthorized", 403), ("rejectedIdentifier", 400),
                                               ("malformed", 400)])
def test_client_errors_are_not_retried(code: str, status: int) -> None:
    """A 4xx problem other than badNonce/rateLimited fails at once and is not retryable."""
    with pytest.raises(ACMEError) as e:
        run([(err(code, "no"), FakeResponse(status))])
    assert str(e.value) == f"acme new-order x: {code}: no (order not placed)" and not e.value.retryable
    assert e.value.typ == f"urn:ietf:params:acme:error:{code}"


def test_connection_errors_become_ca_unreachable() -> None:
    """Connection failures are tried three times in all, then reported as "CA unreachable"."""
    req = requests.Request("POST", "https://127.0.0.1:1/order").prepare()
    down = (requests.exceptions.ConnectionError("refused", request=req), None)
    with pytest.raises(ACMEError) as e:
        run([down, down, down])
    assert str(e.value) == ("acme new-order x: CA unreachable: connection failed (https://127.0.0.1:1/order) "
                            "(order not placed)")
    assert e.value.retryable
    assert run([down, ("ok", FakeResponse(200))]) == "ok"
