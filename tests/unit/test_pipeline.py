"""The daily job's own decisions: where to deploy, which alerts to send, and bounded logs."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from certmgr import inventory, pipeline
from certmgr.deploy import HostOutcome, Status
from certmgr.material import CertInfo
from certmgr.plan import Decision
from certmgr.renew import RenewOutcome
from certmgr.scan import CertSummary, Endpoint, EndpointResult, ScanResult

NOW = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.UTC)
INV = inventory.load(Path(__file__).parents[2] / "domains.toml")
MEDIA = "media.hachyderm.io"


def info(sha: str) -> CertInfo:
    return CertInfo(serial=sha[:8], sha256=sha, subject="CN=x", issuer="CN=ca", not_before=NOW,
                    not_after=NOW + dt.timedelta(days=90), names=(MEDIA,), key_type="ecdsa-p256")


def scan_result(served: dict[str, str | None], live: str | None) -> ScanResult:
    eps = tuple(EndpointResult(endpoint=Endpoint(cert=MEDIA, name=MEDIA, host=h, address="192.0.2.1", port=443),
                               severity="ok" if sha == live else "critical", info=info(sha) if sha else None,
                               error=None if sha else "refused")
                for h, sha in served.items())
    summary = CertSummary(name=MEDIA, severity="ok", endpoints=len(eps), hosts_by_severity={}, live_sha256=live)
    return ScanResult(started=NOW, elapsed=0.1, endpoints=eps, certificates=(summary,))


def outcome(name: str, status: str) -> RenewOutcome:
    return RenewOutcome(name=name, status=status, decision=Decision(due=status != "not-due", overdue=False,
                                                                     reason="test"))


def test_deploy_plan_renewed_goes_everywhere() -> None:
    """A renewed certificate is deployed to all of its hosts."""
    plans = pipeline.plan_deploys(INV, scan_result({"sally": "a"}, "a"), [outcome(MEDIA, "renewed")], dry_run=False)
    assert [(p.cert, p.hosts, p.reason) for p in plans] == [(MEDIA, INV.certificate(MEDIA).hosts, "renewed")]


def test_deploy_plan_only_lagging_hosts() -> None:
    """Without a renewal, only the hosts that do not serve the local live version are deployed to."""
    scan = scan_result({"cdn-frankfurt-1": "new", "cdn-fremont-1": "old", "sally": None, "esme": "new"}, "new")
    [plan] = pipeline.plan_deploys(INV, scan, [outcome(MEDIA, "not-due")], dry_run=False)
    assert plan.hosts == ("cdn-fremont-1", "sally")
    assert plan.reason == "behind the local live version: refused; serves an older certificate"


def test_deploy_plan_nothing_when_current_or_failed() -> None:
    """Every host current → no deploy; a failed renewal is not pushed anywhere."""
    scan = scan_result({"sally": "a", "esme": "a"}, "a")
    assert pipeline.plan_deploys(INV, scan, [outcome(MEDIA, "not-due")], dry_run=False) == []
    stale = scan_result({"sally": "old"}, "a")
    assert pipeline.plan_deploys(INV, stale, [outcome(MEDIA, "failed")], dry_run=False) == []


def test_failure_messages_one_per_host() -> None:
    """Deploy failures are grouped: one alert per failed host, naming every certificate and the command to run."""
    outs = [HostOutcome(cert=c, host="esme", status=Status.FAILED, new_serial="b",
                        error=f"deploy {c} → esme: nginx -t failed (nothing changed)", hint="fix nginx")
            for c in ("hachyderm.io", MEDIA)]
    outs.append(HostOutcome(cert=MEDIA, host="sally", status=Status.DEPLOYED, new_serial="b"))
    [msg] = pipeline.failure_messages([], outs)
    assert msg.title == f"FAILED deploy to esme: hachyderm.io, {MEDIA} (failed)"
    assert msg.command == f"certmgr deploy hachyderm.io {MEDIA} --hosts esme"
    assert msg.lines[-1] == "Hint: fix nginx"


def test_repeated_errors_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 endpoints failing the same way make one log line with a count and three examples."""
    with caplog.at_level(logging.WARNING, logger="certmgr.pipeline"):
        pipeline.log_grouped("scan", ((f"pop-{i}/x", "refused") for i in range(10_000)))
        pipeline.log_grouped("scan", [("a/x", "timeout")])
    assert len(caplog.records) == 2
    first = caplog.records[0]
    assert first.getMessage() == "scan: refused"
    assert first.kv == {"count": 10_000, "examples": "pop-0/x,pop-1/x,pop-2/x,+9997 more"}  # type: ignore[attr-defined]


def test_not_due_line_says_what_on_call_can_do() -> None:
    """`renew NAME` on a certificate that is not due says how to force it and when deploy is the answer."""
    line = outcome(MEDIA, "not-due").line()
    assert line == (f"not due  {MEDIA}: test (--force renews now; a POP serving something else needs "
                    f"`certmgr deploy {MEDIA}`)")


def test_unreadable_secret_fails_without_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A *_credential read outside systemd fails that renewal clearly, and records no backoff for the timer."""
    import asyncio

    from certmgr.renew import renew
    from certmgr.store import Store

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    store = Store.open(tmp_path / "state")
    with store.lock("test"):
        [out] = asyncio.run(renew(INV, store, [INV.certificate(MEDIA)], now=NOW, force=True))
    assert out.status == "failed"
    assert out.error == ("dns.hachyderm.tsig_secret_credential: systemd credential 'tsig.key' requested but "
                         "$CREDENTIALS_DIRECTORY is not set")
    assert store.load_json(f"state/renew/{MEDIA}.json", default=None) is None


def test_render_lists_each_host_under_its_own_severity() -> None:
    """The run summary puts a warning-level host on a `warning` line, never under `critical`."""
    summary = CertSummary(name=MEDIA, severity="critical", endpoints=3,
                          hosts_by_severity={"warning": ("sally",), "critical": ("kara",)},
                          command=f"certmgr renew {MEDIA}")
    final = ScanResult(started=NOW, elapsed=0.1, endpoints=(), certificates=(summary,), severity="critical")
    report = pipeline.RunReport(started=NOW, dry_run=False, scan_before=final, renewals=(), deploy_plan=(),
                                scan_after=final)
    lines = pipeline.render(report)
    assert f"  critical {MEDIA} on kara → certmgr renew {MEDIA}" in lines
    assert f"  warning  {MEDIA} on sally" in lines
    assert not any("critical" in line and "sally" in line for line in lines)
