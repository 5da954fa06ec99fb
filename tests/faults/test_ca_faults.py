"""CA faults: a nonce-rejecting, unavailable, rate-limiting, authorization-reusing and multi-root Pebble.

Every case drives `certmgr run` (or `renew`) as a subprocess against this module's own lab, with
the fault-injecting proxy (tests/faults/acmeproxy.py) in front of the real Pebble, and checks the
store, what every POP serves (verifying handshakes), the audit log, the exit status and the chat.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import ssl
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import dns.message
import dns.query
import pytest
from cryptography import x509

from lab import Lab
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import (
    LINEAGES,
    SNI,
    assert_every_pop_serves_live,
    audit,
    certmgr,
    check_store_whole,
    write_inventory,
)
from tests.receiver import Receiver

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_POPS = 2
MEDIA = "media.hachyderm.test"
IDENTS = sorted({n for names in SNI.values() for n in names})


@contextlib.contextmanager
def pebble_env(flab: Lab, env: Mapping[str, str]) -> Iterator[None]:
    """Pebble restarted with `env` for the block, then back to the lab's defaults."""
    flab.restart_pebble(env=env)
    try:
        yield
    finally:
        flab.restart_pebble()


def soa_serial(flab: Lab, zone: str = "hachyderm.test") -> int:
    """The zone's SOA serial at the primary: every RFC 2136 UPDATE bumps it."""
    resp = dns.query.udp(dns.message.make_query(zone + ".", "SOA"), "127.0.0.1", port=flab.ports.dns, timeout=3)
    return int(resp.answer[0][0].serial)


def orders_created(proxy: ACMEProxy) -> dict[str, int]:
    return {lineage: proxy.created("new-order", SNI[lineage][0]) for lineage in LINEAGES}


def renewed_lineages(state: Path) -> list[str]:
    return sorted(e["object"] for e in audit(state) if e["action"] == "renewed")


def test_nonce_reject_50_succeeds(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """With Pebble rejecting 50% of valid nonces the run renews and deploys everything, one account, one order each."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    with pebble_env(fresh, {"PEBBLE_WFE_NONCEREJECT": "50"}):
        res = certmgr(inv, tmp_path / "state", "run")
        assert res.returncode == 0, res.stdout + res.stderr
        assert_every_pop_serves_live(fresh, tmp_path / "state")
    assert [s for s in proxy.seen if s.status == 400], "the fault was on: some requests were rejected as badNonce"
    assert proxy.created("new-account") == 1
    assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}
    assert renewed_lineages(tmp_path / "state") == sorted(LINEAGES)


def test_nonce_reject_90_bounded_and_clean(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """At 90% nonce rejection a run ends within its bound: each certificate renewed or failed cleanly as badNonce.

    Retries resend the same request with a fresh nonce: never a second account or a second order.
    """
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    with pebble_env(fresh, {"PEBBLE_WFE_NONCEREJECT": "90"}):
        t0 = time.monotonic()
        res = certmgr(inv, tmp_path / "state", "run", "--json", "--no-notify")
        elapsed = time.monotonic() - t0
        assert res.returncode in (0, 2), res.stdout + res.stderr
        report = json.loads(res.stdout)
        renewed = [r["name"] for r in report["renewals"] if r["status"] == "renewed"]
        assert_every_pop_serves_live(fresh, tmp_path / "state", renewed)
    assert elapsed < 90
    assert proxy.created("new-account") <= 1
    assert all(n <= 1 for n in orders_created(proxy).values()), orders_created(proxy)
    state = tmp_path / "state"
    live = check_store_whole(state)
    for r in report["renewals"]:
        if r["status"] != "failed":
            assert r["status"] == "renewed", r
            continue
        assert "badNonce" in r["error"] and r["retryable"], r
        assert r["name"] not in live
        failed_state = json.loads((state / "state" / "renew" / f"{r['name']}.json").read_text())
        assert failed_state["failures"] == 1, "recorded once, so the timer backs off"
        for pop in fresh.pop_names:
            for sni in SNI[r["name"]]:
                assert fresh.served_serial(pop, sni) == fresh.seed_serial(r["name"])
    assert (res.returncode == 0) == (len(renewed) == len(LINEAGES))
    assert renewed_lineages(state) == sorted(renewed)


@pytest.mark.parametrize(("kind", "ok"), [("new-order", 201), ("authz", 200), ("finalize", 200),
                                          ("certificate", 200)])
def test_503_retry_after_twice_then_success(fresh: Lab, proxy: ACMEProxy, tmp_path: Path, kind: str,
                                            ok: int) -> None:
    """Two 503s with `Retry-After: 3` (on new-order, an authorization, finalize or the download) are waited out
    (≥ 3 s each) and the third attempt goes through: one order, renewed and live on every POP."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    proxy.fail(kind, 503, "serverInternal", "service busy (injected)", ident=MEDIA, times=2, retry_after=3)
    res = certmgr(inv, tmp_path / "state", "renew", MEDIA)
    assert res.returncode == 0, res.stdout + res.stderr
    attempts = [s for s in proxy.requests(kind, MEDIA) if s.status != 400]  # 400: Pebble's own badNonce
    assert [s.status for s in attempts[:3]] == [503, 503, ok]
    assert attempts[1].time - attempts[0].time >= 2.9 and attempts[2].time - attempts[1].time >= 2.9
    assert proxy.created("new-order", MEDIA) == 1
    [entry] = [e for e in audit(tmp_path / "state") if e["action"] == "renewed"]
    assert entry["object"] == MEDIA and entry["timings"]["total"] >= 5.8
    assert_every_pop_serves_live(fresh, tmp_path / "state", [MEDIA])


def test_pebble_restart_forgets_the_account(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """A CA that lost its accounts (Pebble restarted) gets the stored key registered once per run, not once per
    certificate; every certificate renews and deploys."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    first = certmgr(inv, state, "run", "--no-notify")
    assert first.returncode == 0, first.stdout + first.stderr
    key = next((state / "accounts").rglob("key.pem")).read_bytes()
    fresh.restart_pebble()
    proxy.clear()
    second = certmgr(inv, state, "renew", *LINEAGES, "--force")
    assert second.returncode == 0, second.stdout + second.stderr
    assert proxy.created("new-account") == 1
    assert next((state / "accounts").rglob("key.pem")).read_bytes() == key, "the same key, registered again"
    assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}
    assert_every_pop_serves_live(fresh, state)


def test_new_order_answer_lost_behind_a_503(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """A 503 replacing the answer to a new-order the CA did create: ACME has no idempotency key, so the retry makes
    a second order — at most one extra, and still exactly one certificate issued."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    proxy.fail("new-order", 503, "serverInternal", "upstream timed out (injected)", ident=MEDIA, retry_after=1,
               lost=True)
    res = certmgr(inv, tmp_path / "state", "renew", MEDIA)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [s.status for s in proxy.requests("new-order", MEDIA) if s.status != 400] == [503, 201]
    assert len(proxy.requests("finalize", MEDIA, status=200)) == 1, "one certificate"
    assert_every_pop_serves_live(fresh, tmp_path / "state", [MEDIA])


def test_finalize_answer_lost_behind_a_503(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """A 503 replacing the answer to a finalize the CA did process: the retry learns the order is already finalized,
    polls it and downloads that certificate — one order, one certificate, live on every POP."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    proxy.fail("finalize", 503, "serverInternal", "upstream timed out (injected)", ident=MEDIA, retry_after=1,
               lost=True)
    res = certmgr(inv, tmp_path / "state", "renew", MEDIA)
    assert res.returncode == 0, res.stdout + res.stderr
    finalizes = proxy.requests("finalize", MEDIA)
    assert finalizes[0].status == 503 and finalizes[0].forwarded
    assert len([s for s in finalizes if s.status != 400]) <= 3, "a bounded number of retries"
    assert proxy.created("new-order", MEDIA) == 1
    assert len(proxy.requests("certificate", MEDIA, status=200)) == 1
    assert_every_pop_serves_live(fresh, tmp_path / "state", [MEDIA])


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_rate_limited_certificate_waits_until_retry_after(fresh: Lab, proxy: ACMEProxy, chat: Receiver,
                                                         tmp_path: Path, form: str) -> None:
    """429 rateLimited with a 1 h Retry-After (delay-seconds or HTTP-date) on one certificate: the others renew and
    deploy; the alert gives the retry time; later runs send no order for it before then (persisted in its state)."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    t0 = dt.datetime.now(dt.UTC)
    retry_after = "3600" if form == "seconds" else email.utils.format_datetime(t0 + dt.timedelta(seconds=3600),
                                                                               usegmt=True)
    proxy.fail("new-order", 429, "rateLimited", f"too many certificates already issued for {MEDIA}", ident=MEDIA,
               times=None, retry_after=retry_after)
    first = certmgr(inv, state, "run")
    assert first.returncode == 2, first.stdout + first.stderr
    assert proxy.requests("new-order", MEDIA) and proxy.created("new-order", MEDIA) == 0
    assert len(proxy.requests("new-order", MEDIA)) == 1, "a long Retry-After is not waited out in-run"
    others = [lineage for lineage in LINEAGES if lineage != MEDIA]
    assert renewed_lineages(state) == sorted(others)
    assert_every_pop_serves_live(fresh, state, others)
    for pop in fresh.pop_names:
        assert fresh.served_serial(pop, MEDIA) == fresh.seed_serial(MEDIA)
    assert MEDIA not in check_store_whole(state)

    renew_state = json.loads((state / "state" / "renew" / f"{MEDIA}.json").read_text())
    retry_at = dt.datetime.fromisoformat(renew_state["retry_after"])
    assert t0 + dt.timedelta(seconds=3590) <= retry_at <= t0 + dt.timedelta(seconds=3700), retry_at

    failures = [r.json for r in chat.requests if r.json.get("kind") == "failure"]
    assert [f["title"] for f in failures] == [f"FAILED renewal of {MEDIA}"]
    text = "\n".join(failures[0]["lines"])
    assert "rate limited" in text and f"no new order before {retry_at.isoformat()}" in text, text

    before = len(proxy.requests("new-order", MEDIA))
    second = certmgr(inv, state, "run")
    assert len(proxy.requests("new-order", MEDIA)) == before, "no order before the CA's Retry-After"
    assert f"backoff  {MEDIA}" in second.stdout, second.stdout
    assert f"{retry_at:%Y-%m-%d %H:%M}Z" in second.stdout
    again = certmgr(inv, state, "renew", "--due")
    assert len(proxy.requests("new-order", MEDIA)) == before
    assert f"backoff  {MEDIA}" in again.stdout, again.stdout


@pytest.mark.parametrize(("reuse", "solved"), [("100", 0), ("0", len(IDENTS))])
def test_authz_reuse(fresh: Lab, proxy: ACMEProxy, tmp_path: Path, reuse: str, solved: int) -> None:
    """With valid authorizations reused (100%) the second order makes no DNS update and answers no challenge;
    with none reused (0%) every authorization is solved again. Both deploy everywhere."""
    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml")
    state = tmp_path / "state"
    with pebble_env(fresh, {"PEBBLE_AUTHZREUSE": reuse}):
        first = certmgr(inv, state, "run", "--no-notify")
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(proxy.requests("challenge", status=200)) == len(IDENTS)
        proxy.clear()
        serial = soa_serial(fresh)
        second = certmgr(inv, state, "renew", *LINEAGES, "--force")
        assert second.returncode == 0, second.stdout + second.stderr
        assert orders_created(proxy) == {lineage: 1 for lineage in LINEAGES}
        assert_every_pop_serves_live(fresh, state)
    # every identifier's challenge answered (and carried to Pebble) again, or none: counted per identifier, since
    # a loaded machine may make the client repeat an answer (a timeout) that Pebble already took
    answered = {i for s in proxy.requests("challenge", forwarded=True) for i in s.idents}
    assert answered == (set(IDENTS) if solved else set()), answered
    if solved:
        assert soa_serial(fresh) > serial
        assert "reused" not in second.stdout
    else:
        assert soa_serial(fresh) == serial, "no DNS update for already-valid authorizations"
        assert second.stdout.count("note: all authorizations already valid (reused)") == len(LINEAGES)
    assert [e["object"] for e in audit(state) if e["action"] == "renewed"].count(MEDIA) == 2


def _root_cn(flab: Lab, index: int) -> str:
    ctx = ssl.create_default_context(cafile=str(flab.https_ca))
    url = f"https://127.0.0.1:{flab.ports.management}/roots/{index}"
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        root = x509.load_pem_x509_certificate(resp.read())
    return str(root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_alternate_roots_and_long_chain(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """With 3 roots and chains of 3, the preferred issuer's chain is stored whole (every intermediate), verifies
    against Pebble's roots, and is what every POP serves."""
    state = tmp_path / "state"
    with pebble_env(fresh, {"PEBBLE_ALTERNATE_ROOTS": "2", "PEBBLE_CHAIN_LENGTH": "3"}):
        preferred = _root_cn(fresh, 2)
        default = _root_cn(fresh, 0)
        assert preferred != default
        inv = write_inventory(fresh, proxy, tmp_path / "domains.toml",
                              cert_extra={"preferred_chain": json.dumps(preferred)})
        res = certmgr(inv, state, "run", "--no-notify")
        assert res.returncode == 0, res.stdout + res.stderr
        roots = x509.load_pem_x509_certificates(fresh.pebble.roots.read_bytes())
        assert len(roots) == 3
        from cryptography.x509.verification import PolicyBuilder, Store

        for lineage in LINEAGES:
            d = (state / "live" / lineage).resolve()
            chain = x509.load_pem_x509_certificates((d / "fullchain.pem").read_bytes())
            assert len(chain) >= 3, f"{lineage}: the long chain is kept, not cut to leaf + one intermediate"
            top_issuer = chain[-1].issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            assert top_issuer == preferred
            verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName(SNI[lineage][0]))
            path = verifier.verify(chain[0], chain[1:])
            assert path[:-1] == chain, "every stored certificate is on the path to the root, in order"
            assert path[-1].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == preferred
        assert_every_pop_serves_live(fresh, state)


def test_revoke_through_a_lost_answer_and_a_refusal(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """revokeCert as the CA may answer it. A 503 after Pebble revoked (the answer lost): the retry finds it
    `alreadyRevoked`, and revoke is done. The CA refusing: `failed: …`, exit 1, the replacement stays live and
    served, the request stays pending (status exit 2); once the CA accepts again, the plain rerun revokes the
    same certificate without a new order."""
    from tests.integration.lifecycle import cert_status, live, serial_of

    inv = write_inventory(fresh, proxy, tmp_path / "domains.toml", certs=[MEDIA])
    state = tmp_path / "state"
    first = certmgr(inv, state, "renew", MEDIA)
    assert first.returncode == 0, first.stdout + first.stderr

    v1 = serial_of(state, 1)
    proxy.fail("revoke", 503, "serverInternal", "answer lost (injected)", lost=True, retry_after=1)
    lost = certmgr(inv, state, "revoke", MEDIA, "--reason", "superseded", "--version", "1", "--no-notify")
    assert lost.returncode == 0, lost.stdout + lost.stderr
    assert f"already revoked  {MEDIA} version 1 serial {v1} (superseded)" in lost.stdout
    assert [s.status for s in proxy.requests("revoke") if s.status != 400][:1] == [503]
    assert cert_status(fresh, v1)["Status"] == "Revoked"

    v2 = serial_of(state, 2)
    orders = proxy.created("new-order", MEDIA)
    refusal = proxy.fail("revoke", 403, "unauthorized", "not today (injected)", times=None)
    refused = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "failed: " in refused.stdout and "not today (injected)" in refused.stdout
    assert f"revoke {MEDIA}: INCOMPLETE in " in refused.stdout
    assert live(state) == 3 and cert_status(fresh, v2)["Status"] == "Valid"
    assert_every_pop_serves_live(fresh, state, [MEDIA])
    status = certmgr(inv, state, "status", MEDIA)
    assert status.returncode == 2 and f"version 2 (serial {v2}) still valid at the CA" in status.stdout

    proxy.remove(refusal)
    rerun = certmgr(inv, state, "revoke", MEDIA, "--reason", "keyCompromise", "--no-notify")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"revoked          {MEDIA} version 2 serial {v2} (keyCompromise)" in rerun.stdout
    assert proxy.created("new-order", MEDIA) == orders + 1, "one replacement in all, none on the rerun"
    assert live(state) == 3 and cert_status(fresh, v2)["Status"] == "Revoked"
    assert cert_status(fresh, serial_of(state, 3))["Status"] == "Valid"
    assert "revocation" not in certmgr(inv, state, "status", MEDIA).stdout
