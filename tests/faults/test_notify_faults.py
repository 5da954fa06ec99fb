"""Notification faults: a webhook that hangs, answers 500, or whose host name does not resolve.

The daily job (`certmgr run -vv`, the real CLI) renews one certificate and deploys it to two POPs
while a second certificate fails (its name is outside the zone's update-policy), so the run has
an alert and a summary to send. Whatever the webhook does, the run's outcome and exit status are
those of the healthy control, the attempts are bounded per run, and nothing the run printed,
logged or stored contains the webhook URL, a TSIG secret or a private key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from tests.faults.helpers_b import (
    certmgr,
    everything_written,
    inventory_text,
    lab_secrets,
    loopback_resolver,
    private_key_bodies,
    served,
    write_inventory,
)
from tests.receiver import HANG, Receiver, Reply

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MEDIA = "media.hachyderm.test"
NOPE = "nope.hachyderm.test"  # REFUSED by bind's update-policy: fails fast, and gives the run an alert to send
POPS = ("cdn-frankfurt-1", "cdn-fremont-1")
ATTEMPTS = 4  # notify.Retry().attempts: the most one channel may be tried in one run once it is down
INVALID_HOST = "hook.certmgr-fault.invalid"


@pytest.fixture()
def seeded(lab: Lab) -> Lab:
    lab.reseed()
    return lab


@pytest.fixture()
def rx(lab: Lab) -> Iterator[Receiver]:
    """A fresh receiver per case: stopping it releases requests held by HANG."""
    with Receiver(port=lab.ports.webhook) as receiver:
        yield receiver


def outcome(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run report that must not depend on the chat channel."""
    return {
        "exit_code": report["exit_code"],
        "renewals": sorted((o["name"], o["status"], o["error"]) for o in report["renewals"]),
        "deploys": sorted((d["cert"], d["host"], d["status"]) for d in report["deploys"]),
        "final": report["final"]["severity"],
    }


EXPECTED_OUTCOME = {
    "renewals": [(MEDIA, "renewed", None)],
    "deploys": sorted((MEDIA, pop, "deployed") for pop in POPS),
}


@pytest.mark.parametrize("fault", ["none", "hang", "http-500", "unresolvable"])
def test_webhook_fault_changes_neither_outcome_nor_exit_status(seeded: Lab, rx: Receiver, tmp_path: Path,
                                                               fault: str) -> None:
    """A webhook that hangs, answers 500 or does not resolve: same outcome and exit status as with a working one, at most 4 attempts, no URL, TSIG secret or key in any output."""
    url_file = tmp_path / "webhook-url"
    url = rx.url("/hook")
    prefix: list[str] = []
    resolver = loopback_resolver()
    if fault == "hang":
        rx.script(*[HANG] * 20)
    elif fault == "http-500":
        rx.default = Reply(500, b"{\"error\": \"boom\"}")
    elif fault == "unresolvable":
        url = f"http://{INVALID_HOST}:{seeded.ports.webhook}/hook"
        prefix = resolver.__enter__()
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        seeded, certs=(MEDIA,), hosts=POPS, channel_url_file=url_file,
        extra_certs=[{"name": NOPE, "domains": [NOPE]}]))
    state = tmp_path / "state"
    try:
        started = time.monotonic()
        proc = certmgr(inv, state, "run", "--json", prefix=prefix, timeout=240)
        elapsed = time.monotonic() - started
    finally:
        if prefix:
            resolver.__exit__(None, None, None)

    report = json.loads(proc.stdout)
    got = outcome(report)
    assert got["renewals"][0][:2] == (MEDIA, "renewed") and got["renewals"][1][:2] == (NOPE, "failed")
    assert "REFUSED" in got["renewals"][1][2]
    assert got["deploys"] == EXPECTED_OUTCOME["deploys"]
    assert proc.returncode == report["exit_code"] == 2, proc.stderr[-3000:]
    live = (state / "live" / MEDIA / "cert.pem").read_bytes()
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(live).serial_number
    assert set(served(seeded, POPS, certs=(MEDIA,)).values()) == {serial}

    messages = report["messages"]
    kinds = [m["kind"] for m in messages]
    if fault == "none":
        assert kinds == ["failure", "summary"] and all(m["ok"] for m in messages)
        assert len(rx.requests) == 2
    else:
        assert messages and not any(m["ok"] for m in messages), messages
        if fault != "unresolvable":
            # every try reached the receiver: that is the count of attempts this run made
            assert 1 <= len(rx.requests) <= ATTEMPTS, f"{len(rx.requests)} attempts at a dead channel in one run"
        notified = [e for e in _audit(state) if e["action"] == "notify"]
        assert sum(int(e["attempts"]) for e in notified) <= ATTEMPTS, notified
        # bounded in time too: 4 tries of at most 10 s each, plus the backoff between them
        assert elapsed < 120, f"run took {elapsed:.0f}s"

    # nothing printed, logged (-vv) or stored names the webhook URL, a TSIG secret or a private key
    text = proc.stdout + proc.stderr + everything_written(state)
    for secret in [url, url.split("//", 1)[1], INVALID_HOST, *lab_secrets(seeded)]:
        assert secret not in text, f"leaked: {secret[:12]}…"
    for body in private_key_bodies(state / "archive", *(seeded.pop_paths(p).cert_root for p in POPS)):
        assert body not in text
    assert "PRIVATE KEY" not in text
    for r in rx.requests:  # what the chat service itself received
        assert not any(s in r.body.decode() for s in lab_secrets(seeded))


def _audit(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "audit.log").read_text().splitlines() if line.strip()]


def test_scan_alerts_lost_to_a_failing_webhook_are_sent_next_time(seeded: Lab, rx: Receiver, tmp_path: Path) -> None:
    """`certmgr scan` with a webhook answering 500: same exit status, at most 4 attempts for all its alerts, nothing leaked; the next scan with the webhook back sends them, the one after stays quiet."""
    url_file = tmp_path / "webhook-url"
    url_file.write_text(rx.url("/hook") + "\n")
    url_file.chmod(0o600)
    inv = write_inventory(tmp_path / "domains.toml", inventory_text(
        seeded, certs=("hachyderm.test", MEDIA, "static.hachyderm.test"), hosts=POPS, channel_url_file=url_file))
    state = tmp_path / "state"
    rx.default = Reply(500, b"{}")
    failing = certmgr(inv, state, "scan", "--json")
    # the seeds have 5 of 90 days left: critical (exit 2), whatever the webhook does
    assert failing.returncode == 2, failing.stderr[-2000:]
    report = json.loads(failing.stdout)
    assert report["notifications"] and not any(n["ok"] for n in report["notifications"])
    assert 1 <= len(rx.requests) <= ATTEMPTS, f"{len(rx.requests)} attempts at a dead channel in one scan"
    text = failing.stdout + failing.stderr + everything_written(state)
    for secret in [rx.url("/hook"), *lab_secrets(seeded)]:
        assert secret not in text

    rx.clear()
    rx.default = Reply(204)
    back = certmgr(inv, state, "scan", "--json")
    assert back.returncode == 2
    sent = json.loads(back.stdout)["notifications"]
    assert sent and all(n["ok"] for n in sent)
    told = {r.json["certificate"] for r in rx.requests}
    assert told == {"hachyderm.test", MEDIA, "static.hachyderm.test"}, told

    rx.clear()
    again = certmgr(inv, state, "scan", "--json")
    assert again.returncode == 2 and json.loads(again.stdout)["notifications"] == [] and rx.requests == []
