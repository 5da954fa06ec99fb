"""Notify: payload per service, dedupe across runs, resolved, retries and secrecy, against the local receiver."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import pytest

from certmgr import log
from certmgr.inventory import Channel, SecretRef
from certmgr.material import CertInfo
from certmgr.notify import Alert, Message, Retry, alerts_for, apply, message_for, notify_scan, ping_message, send
from certmgr.scan import CertSummary, Endpoint, EndpointResult, ScanResult
from tests import inv as inv_builder
from tests.receiver import HANG, Receiver, Reply

NOW = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)
FAST = Retry(attempts=3, backoff=(0.01, 0.02), timeout=0.5)


class MemStore:
    """The slice of Store that notify uses, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}
        self.audits: list[tuple[str, str, dict[str, Any]]] = []

    def load_json(self, relpath: str, default: Any = None) -> Any:
        return self.files.get(relpath, default)

    def save_json(self, relpath: str, obj: Any, mode: int = 0o600) -> None:
        self.files[relpath] = obj

    def audit(self, action: str, obj: str, **kw: Any) -> None:
        self.audits.append((action, obj, kw))


def channel(kind: str, name: str | None = None, *, min_severity: str = "warning", repeat: float = 86400,
            rx: Receiver | None = None) -> Channel:
    name = name or kind
    if kind == "matrix":
        return Channel(name=name, type="matrix", homeserver=rx.url("") if rx else "http://127.0.0.1:9",
                       room="!room:example.test", token=SecretRef("env", "TEST_MATRIX_TOKEN", "t"),
                       min_severity=min_severity, repeat=repeat)
    return Channel(name=name, type=kind, url=SecretRef("env", f"TEST_URL_{name.upper().replace('-', '_')}", "u"),
                   min_severity=min_severity, repeat=repeat)


def result(severity: str, *, hosts: tuple[str, ...] = ("sally", "esme"), days: float = 4.0,
           cert: str = "media.example.test") -> ScanResult:
    info = CertInfo(serial="1", sha256="ab", subject="CN=m", issuer="CN=ca", not_before=NOW - dt.timedelta(days=80),
                    not_after=NOW + dt.timedelta(days=days), names=(cert,), key_type="ecdsa-p256")
    eps = tuple(
        EndpointResult(endpoint=Endpoint(cert=cert, name=cert, host=h, address="127.0.0.1", port=443),
                       severity=severity, info=info, chain="ok",
                       problems=() if severity == "ok" else (f"expires in {days:.1f}d (critical below 9.0d, 1/10)",))
        for h in hosts
    )
    summary = CertSummary(name=cert, severity=severity, endpoints=len(eps),
                          hosts_by_severity={} if severity == "ok" else {severity: hosts}, days_left=days,
                          command=None if severity == "ok" else f"certmgr renew {cert}")
    return ScanResult(started=NOW, elapsed=0.1, endpoints=eps, certificates=(summary,), severity=severity)


@pytest.fixture
def rx() -> Any:
    with Receiver() as r:
        yield r


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, rx: Receiver) -> dict[str, str]:
    urls = {
        "TEST_URL_DISCORD": rx.url("/discord/api/webhooks/123/s3cr3t-discord-token"),
        "TEST_URL_SLACK": rx.url("/slack/services/T000/B000/s3cr3t-slack-token"),
        "TEST_URL_WEBHOOK": rx.url("/hook/s3cr3t-webhook-path"),
        "TEST_MATRIX_TOKEN": "syt_s3cr3t_matrix_token",
    }
    for k, v in urls.items():
        monkeypatch.setenv(k, v)
    return urls


def test_payload_shape_per_service(rx: Receiver, env: dict[str, str]) -> None:
    """Each service gets its documented format: Discord content+embeds, Slack text+blocks, Matrix PUT m.notice."""
    chans = [channel("discord"), channel("slack"), channel("matrix", rx=rx), channel("webhook")]
    msg = Message(kind="problem", severity="critical", title="CRITICAL media on 2 of 4 POPs",
                  lines=("POPs: sally, esme", "Time left: 4.0 days left"), certificate="media",
                  hosts=("sally", "esme"), days_left=4.0, command="certmgr renew media", key="txn-1")
    deliveries = asyncio.run(send(chans, msg, retry=FAST))
    assert [d.ok for d in deliveries] == [True] * 4
    reqs = {r.path.split("/")[1]: r for r in rx.wait_for(4)}
    d = reqs["discord"]
    assert d.method == "POST"
    assert d.json["content"].startswith("🔴 CRITICAL media on 2 of 4 POPs\nPOPs: sally, esme")
    assert d.json["content"].endswith("Run: certmgr renew media")
    assert d.json["allowed_mentions"] == {"parse": []}
    assert d.json["embeds"][0]["color"] == 0xE74C3C
    s = reqs["slack"]
    assert s.json["text"] == "CRITICAL media on 2 of 4 POPs"
    assert s.json["blocks"][0]["text"]["type"] == "mrkdwn"
    assert "Run: certmgr renew media" in s.json["blocks"][0]["text"]["text"]
    m = reqs["_matrix"]
    assert m.method == "PUT"
    assert m.path == "/_matrix/client/v3/rooms/%21room%3Aexample.test/send/m.room.message/txn-1"
    assert m.headers["Authorization"] == "Bearer syt_s3cr3t_matrix_token"
    assert m.json["msgtype"] == "m.notice" and m.json["format"] == "org.matrix.custom.html"
    assert m.json["body"].endswith("Run: certmgr renew media")
    w = reqs["hook"]
    assert {k: w.json[k] for k in ("source", "version", "kind", "severity", "certificate", "hosts", "days_left",
                                   "command")} == {
        "source": "certmgr", "version": 1, "kind": "problem", "severity": "critical", "certificate": "media",
        "hosts": ["sally", "esme"], "days_left": 4.0, "command": "certmgr renew media"}


@pytest.mark.parametrize("prev,severity,min_sev,age_h,kind", [
    (None, "ok", "warning", 0, None),
    (None, "warning", "warning", 0, "problem"),
    (None, "warning", "critical", 0, None),
    ("warning", "warning", "warning", 1, None),
    ("warning", "warning", "warning", 25, "repeat"),
    ("warning", "critical", "warning", 1, "worse"),
    ("critical", "warning", "warning", 1, None),
    ("critical", "ok", "warning", 1, "resolved"),
    ("warning", "error", "warning", 1, "worse"),
])
def test_alert_decisions(prev: str | None, severity: str, min_sev: str, age_h: int, kind: str | None) -> None:
    """Notify on first problem, on a rise, after `repeat`, and once when resolved; otherwise stay quiet."""
    state = {} if prev is None else {
        "media.example.test": {"c": {"severity": prev, "sent_at": (NOW - dt.timedelta(hours=age_h)).isoformat()}}}
    alerts = alerts_for(result(severity), state, NOW, [channel("webhook", "c", min_severity=min_sev)])
    assert [a.kind for a in alerts] == ([kind] if kind else [])


def test_apply_records_and_resolves() -> None:
    """A delivered alert is remembered; a delivered "resolved" forgets the problem."""
    state: dict[str, dict[str, Any]] = {}
    msg = Message(kind="problem", severity="warning", title="t")
    apply(state, Alert(channel="c", certificate="x", kind="problem", severity="warning", message=msg), NOW)
    assert state == {"x": {"c": {"severity": "warning", "sent_at": NOW.isoformat(), "kind": "problem"}}}
    apply(state, Alert(channel="c", certificate="x", kind="resolved", severity="ok", message=msg), NOW)
    assert state == {"x": {}}


def test_dedupe_across_runs_and_resolved(rx: Receiver, env: dict[str, str]) -> None:
    """Two identical scans send one message; the fixed scan sends "resolved" once; then nothing."""
    store = MemStore()
    chans = [channel("webhook")]

    def run(res: ScanResult, now: dt.datetime) -> Any:
        return asyncio.run(notify_scan(res, chans, store=store, now=now, retry=FAST))

    o1 = run(result("critical"), NOW)
    o2 = run(result("critical"), NOW + dt.timedelta(hours=1))
    assert [a.kind for a in o1.alerts] == ["problem"] and o2.alerts == ()
    o3 = run(result("ok", days=89), NOW + dt.timedelta(hours=2))
    assert [a.kind for a in o3.alerts] == ["resolved"]
    o4 = run(result("ok", days=89), NOW + dt.timedelta(hours=3))
    assert o4.alerts == ()
    reqs = rx.wait_for(2)
    assert [r.json["kind"] for r in reqs] == ["problem", "resolved"]
    assert reqs[1].json["title"] == "RESOLVED media.example.test: all 2 endpoints ok"
    assert store.files["state/notify/media.example.test.json"] == {"channels": {}}


def test_500_then_200_is_retried(rx: Receiver, env: dict[str, str]) -> None:
    """A receiver answering 500 then 200 gets the message on the second attempt."""
    rx.script(500, 200)
    (d,) = asyncio.run(send([channel("webhook")], ping_message(NOW), retry=FAST))
    assert (d.ok, d.attempts, d.status) == (True, 2, 200)
    assert len(rx.wait_for(2)) == 2


def test_failed_delivery_keeps_state_for_next_run(rx: Receiver, env: dict[str, str]) -> None:
    """When every attempt fails the problem is not recorded, so the next run sends it again."""
    store = MemStore()
    rx.script(503, 503, 503)
    o1 = asyncio.run(notify_scan(result("critical"), [channel("webhook")], store=store, now=NOW, retry=FAST))
    (d,) = o1.failed
    assert d.error == "HTTP 503 (3 attempts, gave up)"
    o2 = asyncio.run(notify_scan(result("critical"), [channel("webhook")], store=store, now=NOW, retry=FAST))
    assert [a.kind for a in o2.alerts] == ["problem"] and not o2.failed
    assert [a[2]["to"] for a in store.audits] == ["failed", "sent"]


@pytest.mark.parametrize("steps,ok,attempts,error", [
    ((404,), False, 1, "HTTP 404 (1 attempt, gave up)"),
    ((HANG, 200), True, 2, None),
    ((Reply(429, b'{"retry_after": 0.01}'), 204), True, 2, None),
    ((500, 502, 503), False, 3, "HTTP 503 (3 attempts, gave up)"),
])
def test_retry_policy(rx: Receiver, env: dict[str, str], steps: tuple[Any, ...], ok: bool, attempts: int,
                      error: str | None) -> None:
    """4xx is final, a hang is cut by the timeout and retried, 429 waits as told, 5xx retries a bounded number."""
    rx.script(*steps)
    (d,) = asyncio.run(send([channel("webhook")], ping_message(NOW),
                            retry=Retry(attempts=3, backoff=(0.01,), timeout=0.3)))
    assert (d.ok, d.attempts, d.error) == (ok, attempts, error)


def test_unreachable_channel_is_a_result(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel whose receiver is down gives a failed Delivery; other channels still get the message."""
    monkeypatch.setenv("TEST_URL_DEAD", "http://127.0.0.1:9/s3cr3t-dead")
    ds = asyncio.run(send([channel("webhook", "dead"), channel("webhook")], ping_message(NOW), retry=FAST))
    assert [d.ok for d in ds] == [False, True]
    assert ds[0].attempts == 3 and ds[0].error is not None and ds[0].error.startswith("ConnectError")


def test_secrets_never_logged(rx: Receiver, env: dict[str, str], caplog: pytest.LogCaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Webhook URLs and Matrix tokens never appear in log lines or delivery errors."""
    monkeypatch.setenv("TEST_URL_DEAD", "http://127.0.0.1:9/s3cr3t-dead-url")
    rx.script(500, 500, 500, 500, 500, 500, 500, 500, 500, 500, 500, 500)
    caplog.set_level(logging.DEBUG)
    formatter = log.KVFormatter(timestamps=False)
    ds = asyncio.run(send([channel("webhook"), channel("matrix", rx=rx), channel("webhook", "dead")],
                          ping_message(NOW), retry=FAST))
    text = "\n".join(formatter.format(r) for r in caplog.records) + "\n".join(str(d) for d in ds)
    assert "notify failed" in text
    for secret in ("s3cr3t", "syt_"):
        assert secret not in text


def test_many_alerts_become_one_digest(rx: Receiver, env: dict[str, str]) -> None:
    """More than five certificates changing state at once reach a channel as one digest message."""
    results = [result("warning", cert=f"c{i}.example.test") for i in range(7)]
    merged = ScanResult(started=NOW, elapsed=0.1, endpoints=tuple(e for r in results for e in r.endpoints),
                        certificates=tuple(c for r in results for c in r.certificates), severity="warning")
    out = asyncio.run(notify_scan(merged, [channel("webhook")], store=MemStore(), now=NOW, retry=FAST))
    assert len(out.alerts) == 7 and len(out.deliveries) == 1
    (req,) = rx.wait_for(1)
    assert req.json["kind"] == "digest"
    assert req.json["title"] == "certmgr: 7 certificates changed state"


def test_down_channel_is_tried_once_per_run(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """After one message used up its retries on a dead channel, the run's other messages skip it."""
    monkeypatch.setenv("TEST_URL_DEAD", "http://127.0.0.1:9/s3cr3t-dead")
    results = [result("critical", cert=f"c{i}.example.test") for i in range(3)]
    merged = ScanResult(started=NOW, elapsed=0.1, endpoints=tuple(e for r in results for e in r.endpoints),
                        certificates=tuple(c for r in results for c in r.certificates), severity="critical")
    out = asyncio.run(notify_scan(merged, [channel("webhook", "dead")], store=MemStore(), now=NOW, retry=FAST))
    assert [d.attempts for _, _, d in out.deliveries] == [3, 0, 0]
    assert out.deliveries[1][2].error is not None
    assert out.deliveries[1][2].error.startswith("skipped: channel failed earlier in this run (ConnectError")


def test_notify_test_command(rx: Receiver, tmp_path: Any) -> None:
    """`certmgr notify test` reaches each channel, prints one line per channel, and exits 1 if one failed."""
    from click.testing import CliRunner

    from certmgr.cli import main

    (tmp_path / "good").write_text(rx.url("/hook/s3cr3t-good") + "\n")
    gone = Receiver(default=404).start()  # a deleted webhook: 404, final at once
    (tmp_path / "dead").write_text(gone.url("/s3cr3t-dead") + "\n")
    inv = tmp_path / "inv.toml"
    inv.write_text(inv_builder.toml(certificates=[inv_builder.cert("a", domains=["a.example.test"])],
                                    channels={"good": {"type": "webhook", "url_file": "good"},
                                              "dead": {"type": "slack", "url_file": "dead"}}))
    args = ["--inventory", str(inv), "--state-dir", str(tmp_path / "state"), "notify", "test"]
    res = CliRunner().invoke(main, [*args, "--channel", "good"])
    assert (res.exit_code, res.stdout) == (0, "good: ok (HTTP 204, 1 attempt)\n")
    assert rx.wait_for(1)[0].json["kind"] == "test"
    try:
        res = CliRunner().invoke(main, args)
    finally:
        gone.stop()
    assert res.exit_code == 1
    assert res.stdout == "good: ok (HTTP 204, 1 attempt)\ndead: FAILED: HTTP 404 (1 attempt, gave up)\n"
    assert "s3cr3t" not in res.output


BAD_URLS = [
    ("http://[::1/s3cr3t", "u: the URL is not a valid URL (Invalid IPv6 URL)"),
    ("https://hooks.example.test/\ts3cr3t", "u: the URL contains a space or control character"),
    ("hooks.example.test/s3cr3t", "u: the URL must be an https:// URL"),
    ("ftp://hooks.example.test/s3cr3t", "u: the URL must be an https:// URL"),
    ("http://hooks.example.test/s3cr3t", "u: the URL is http:// to a host that is not loopback: use https:// "
                                         "(the token or URL would cross the network in clear text)"),
    ("https://hooks.example.test:99999/s3cr3t", "u: the URL is not a valid URL (Port out of range 0-65535)"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS, ids=[w.split(":")[1].strip()[:30] for _, w in BAD_URLS])
def test_malformed_url_is_a_failed_delivery(url: str, why: str, env: dict[str, str], rx: Receiver,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A webhook URL httpx cannot send to fails that channel with a NotifyError message (URL not shown); others still get the message."""
    monkeypatch.setenv("TEST_URL_BAD", url)
    ds = asyncio.run(send([channel("webhook", "bad"), channel("webhook")], ping_message(NOW), retry=FAST))
    assert [d.ok for d in ds] == [False, True]
    assert (ds[0].attempts, ds[0].error) == (0, f"notify bad: {why} (not sent)")
    assert "s3cr3t" not in (ds[0].error or "")


def test_mixed_severities_are_not_all_called_critical() -> None:
    """A critical certificate with one POP only warning counts only the critical POP in the title and lists each POP under its severity."""
    crit, warn = result("critical", hosts=("kara",)), result("warning", hosts=("sally",))
    eps = crit.endpoints + warn.endpoints + result("ok", hosts=("esme",)).endpoints
    msg = message_for(crit.certificates[0], eps, "problem")
    assert msg.title == "CRITICAL media.example.test on 1 of 3 POPs"
    assert msg.lines[0] == "POPs: critical: kara; warning: sally"
    same = message_for(crit.certificates[0], result("critical", hosts=("kara", "esme")).endpoints, "problem")
    assert (same.title, same.lines[0]) == ("CRITICAL media.example.test on 2 of 2 POPs", "POPs: kara, esme")


def test_alerts_escalate_with_the_remaining_fraction_and_resolve_once_at_minute_scale() -> None:
    """A 48-second certificate: warning at 1/4 left, critical at 1/10, one resolved after renewal — nothing assumes days."""
    from certmgr.inventory import Threshold
    from certmgr.notify import _fmt_days
    from certmgr.scan import expiry_problem

    life, warn, crit = 48.0, Threshold(fraction=0.25, text="1/4"), Threshold(fraction=0.1, text="1/10")
    ch = channel("discord", repeat=60)
    state: dict[str, dict[str, Any]] = {}
    said: list[tuple[str, str, float]] = []
    timeline = [30 - i * 0.5 for i in range(56)] + [48 - i for i in range(10)]  # down to 2.5 s left, then renewed
    for step, left in enumerate(timeline):
        now = NOW + dt.timedelta(seconds=step * 0.5)
        info = CertInfo(serial="1", sha256="ab", subject="", issuer="", not_before=now - dt.timedelta(seconds=life - left),
                        not_after=now + dt.timedelta(seconds=left), names=("media.example.test",), key_type="ecdsa-p256")
        severity, _ = expiry_problem(info, now, warn=warn, critical=crit)
        for a in alerts_for(result(severity, days=left / 86400), state, now, [ch]):
            apply(state, a, now)
            said.append((a.kind, a.severity, left))
    assert [(k, s) for k, s, _ in said] == [("problem", "warning"), ("worse", "critical"), ("resolved", "ok")]
    assert said[0][2] < 12 <= said[0][2] + 0.5 and said[1][2] < 4.8 <= said[1][2] + 0.5
    assert expiry_problem(CertInfo(serial="1", sha256="ab", subject="", issuer="", not_before=NOW,
                                   not_after=NOW + dt.timedelta(seconds=48), names=(), key_type="ecdsa-p256"),
                          NOW + dt.timedelta(seconds=40), warn=warn, critical=crit)[1] == \
        "expires in 8s (warning below 12s, 1/4)"
    assert _fmt_days(8 / 86400) == "8 seconds left" and _fmt_days(600 / 86400) == "10.0 minutes left"
