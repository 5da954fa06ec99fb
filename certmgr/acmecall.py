"""One ACME request, retried as RFC 8555 allows, and the helpers it shares with `issue`: timeouts, Retry-After, CA text.

Split from `certmgr.issue` (which re-exports these names) so the order record and resume (`certmgr.orders`)
and issuance share one retry policy without growing `issue`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from acme import errors, messages
from acme.client import ClientNetwork

from certmgr import sanitize
from certmgr.errors import ACMEError, RateLimited
from certmgr.log import event

log = logging.getLogger(__name__)
T = TypeVar("T")

ERR = "urn:ietf:params:acme:error:"
CA_TEXT_LIMIT = 1000  # an RFC 7807 detail is free text; enough for subproblems, bounded all the same


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Every ACME wait in one place (seconds)."""

    http: float = 20.0  # one HTTP request (requests' connect+read timeout)
    authorizations: float = 180.0  # all authorizations of one order valid
    finalize: float = 120.0  # order valid and certificate downloaded after finalize
    short_wait: float = 15.0  # Retry-After up to this long is waited out in-run; longer → RateLimited
    poll_intervals: tuple[float, ...] = (0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)  # then the last, repeated


class Net(ClientNetwork):
    """ClientNetwork that remembers the last response, for Retry-After and status codes on errors."""

    last_response: requests.Response | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        self.last_response = None
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_response = response
        return response


def parse_retry_after(value: str | None, now: dt.datetime) -> dt.datetime | None:
    """RFC 9110 §10.2.3 Retry-After: delay-seconds or an HTTP-date; None when absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return now + dt.timedelta(seconds=int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def shown(text: str | None) -> str | None:
    """CA-supplied text made safe to print (`sanitize.line`): controls (newlines, ESC…) become visible escapes.

    An error detail is the CA's words, shown verbatim, but it must not forge a line of our output
    or drive the operator's terminal (RFC 7807 details are free text).
    """
    if text is None:
        return None
    return sanitize.line(text, limit=CA_TEXT_LIMIT)


def short_type(typ: str | None) -> str:
    return (typ or "error").removeprefix(ERR)


async def retrying(step: str, net: Net, executor: ThreadPoolExecutor, timeouts: Timeouts,
                    fn: Callable[..., T], *args: Any, outcome: str) -> T:
    """Run one blocking acme call in the pool, retrying what RFC 8555 says is retryable.

    badNonce (RFC 8555 §6.5): again at once with a fresh nonce — Pebble rejects a share of valid nonces.
    429/rateLimited and 5xx: wait out a short Retry-After (else back off 1, 2, 4 s), a few times, then fail.
    Connection errors: twice more after short pauses, then "CA unreachable".
    """
    loop = asyncio.get_running_loop()
    nonce_retries = 0
    attempts = 0
    while True:
        try:
            # requests' own timeout bounds the thread; this bounds our wait even if it misbehaves
            async with asyncio.timeout(timeouts.http * 2 + 5):
                return await loop.run_in_executor(executor, functools.partial(fn, *args))
        except TimeoutError as exc:
            raise ACMEError(f"{step}: CA unreachable: no answer within {timeouts.http * 2 + 5:g}s ({outcome})",
                            hint="is the ACME server up? check [ca.*] directory and trust") from exc
        except messages.Error as err:
            resp = net.last_response
            status = resp.status_code if resp is not None else None
            now = dt.datetime.now(dt.UTC)
            if err.code == "badNonce" and nonce_retries < 10:
                nonce_retries += 1
                continue
            retry_at = parse_retry_after(resp.headers.get("Retry-After") if resp is not None else None, now)
            if err.code == "rateLimited" or status == 429:
                wait = (retry_at - now).total_seconds() if retry_at else None
                if wait is not None and wait <= timeouts.short_wait and attempts < 3:
                    attempts += 1
                    event(log, logging.INFO, "rate limited, waiting", step=step, seconds=f"{wait:.1f}")
                    await asyncio.sleep(max(wait, 0.0))
                    continue
                raise RateLimited(f"{step}: rate limited: {shown(err.detail)} ({outcome})", retry_after=retry_at,
                                  detail=shown(err.detail)) from err
            if (status is not None and status >= 500) or err.code == "serverInternal":
                if attempts < 3:
                    wait = (retry_at - now).total_seconds() if retry_at else 2.0 ** attempts
                    attempts += 1
                    await asyncio.sleep(min(max(wait, 0.0), timeouts.short_wait))
                    continue
            raise ACMEError(f"{step}: {shown(short_type(err.typ))}: {shown(err.detail) or 'no detail'} ({outcome})",
                            typ=err.typ, detail=shown(err.detail),
                            retryable=(status or 0) >= 500 or err.code in ("rateLimited", "serverInternal",
                                                                           "badNonce")) from err
        except errors.ConflictError:
            raise
        except requests.exceptions.SSLError as exc:  # before ConnectionError, its base class: never retried
            raise ACMEError(f"{step}: TLS to the CA failed: {shown(str(exc))} ({outcome})",
                            hint="check [ca.*] trust: the bundle must contain the CA of the ACME endpoint",
                            retryable=False) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            if attempts < 2:
                attempts += 1
                await asyncio.sleep(0.5 * attempts)
                continue
            url = getattr(exc.request, "url", None) if getattr(exc, "request", None) is not None else None
            kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
            raise ACMEError(f"{step}: CA unreachable: {kind}{f' ({shown(url)})' if url else ''} ({outcome})",
                            hint="is the ACME server up? check [ca.*] directory and trust") from exc
        except errors.ClientError as exc:
            resp = net.last_response
            status = resp.status_code if resp is not None else None
            if status is not None and status >= 500 and attempts < 3:
                attempts += 1
                await asyncio.sleep(2.0 ** (attempts - 1))
                continue
            raise ACMEError(f"{step}: unexpected response{f' (HTTP {status})' if status else ''}: {shown(str(exc))} "
                            f"({outcome})") from exc
        except errors.Error as exc:
            raise ACMEError(f"{step}: {shown(str(exc))} ({outcome})") from exc
