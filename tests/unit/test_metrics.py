"""`certmgr run`'s Prometheus textfile: names, values, escaping, the carried-over last success, the atomic write."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from certmgr import metrics
from certmgr.deploy import HostOutcome, Status
from certmgr.material import CertInfo
from certmgr.pipeline import RunReport
from certmgr.plan import Decision, RenewState
from certmgr.renew import RenewOutcome
from certmgr.scan import CertSummary, Endpoint, EndpointResult, ScanResult

NOW = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.UTC)
T = int(NOW.timestamp())
DAY = 86400
promtool = shutil.which("promtool")


def info(sha: str, *, days: int, lifetime: int = 90) -> CertInfo:
    return CertInfo(serial=sha, sha256=sha, subject="CN=m", issuer="CN=ca",
                    not_before=NOW - dt.timedelta(days=lifetime - days), not_after=NOW + dt.timedelta(days=days),
                    names=("m.test",), key_type="ecdsa-p256")


def ep(host: str, name: str = "m.test", cert: str = "m") -> Endpoint:
    return Endpoint(cert=cert, name=name, host=host, address="127.0.0.1", port=443)


def scan() -> ScanResult:
    eps = (
        EndpointResult(endpoint=ep("sally"), severity="ok", info=info("new", days=80)),
        EndpointResult(endpoint=ep("sally", "www.m.test"), severity="ok", info=info("new", days=80)),
        EndpointResult(endpoint=ep("esme"), severity="critical", info=info("old", days=3)),
        EndpointResult(endpoint=ep("esme", "www.m.test"), severity="ok", info=info("new", days=80)),
        EndpointResult(endpoint=ep("dead"), severity="error", error="refused"),
        EndpointResult(endpoint=ep('we"ird\\host\nx'), severity="ok", info=info("new", days=80)),
    )
    summary = CertSummary(name="m", severity="error", endpoints=len(eps), hosts_by_severity={}, live_sha256="new")
    return ScanResult(started=NOW, elapsed=0.5, endpoints=eps, certificates=(summary,), severity="error")


def run_report(*renew: str, deploy_ok: bool = True, dry_run: bool = False) -> RunReport:
    decision = Decision(due=True, overdue=False, reason="test")
    outs = tuple(RenewOutcome(name="m", status=s, decision=decision) for s in renew)
    deploys = (HostOutcome(cert="m", host="esme", status=Status.DEPLOYED if deploy_ok else Status.FAILED,
                           new_serial="new"),)
    return RunReport(started=NOW, dry_run=dry_run, scan_before=scan(), renewals=outs, deploy_plan=(),
                     deploys=deploys, scan_after=scan(), elapsed=12.3456)


def cert_state(**kw: object) -> metrics.CertState:
    base: dict[str, object] = {
        "name": "m", "not_before": NOW - dt.timedelta(days=10), "not_after": NOW + dt.timedelta(days=80),
        "renew": RenewState(failures=2, last_attempt=NOW - dt.timedelta(hours=1),
                            last_failure=NOW - dt.timedelta(hours=1), last_success=NOW - dt.timedelta(days=10)),
        "deploys": {"esme": ("rolled back", NOW - dt.timedelta(hours=1)), "sally": ("deployed", NOW)},
    }
    base.update(kw)
    return metrics.CertState(**base)  # type: ignore[arg-type]


def textfile(report: RunReport | None = None, certs: tuple[metrics.CertState, ...] | None = None,
             record: metrics.RunRecord | None = None) -> str:
    report = report or run_report("renewed")
    record = record or metrics.next_record(metrics.RunRecord(), report)
    lines = metrics.lines(scan=report.final_scan, report=report, certs=certs or (cert_state(),), record=record)
    return "\n".join(lines) + "\n"


def samples(text: str) -> dict[str, str]:
    return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines() if not line.startswith("#")}


def test_every_family_has_help_and_type_and_a_unit_suffix_where_it_is_a_time() -> None:
    """Each family appears once with HELP and TYPE, is `certmgr_`-prefixed, and times end in `_seconds`."""
    text = textfile()
    for name, typ, _ in metrics.FAMILIES:
        assert name.startswith("certmgr_")
        assert text.count(f"# HELP {name} ") == 1 and f"# TYPE {name} {typ}\n" in text
        if "timestamp" in name or "duration" in name:
            assert name.endswith("_seconds"), name
    names = {re.split(r"[{ ]", line)[0] for line in text.splitlines() if not line.startswith("#")}
    assert names <= {n for n, _, _ in metrics.FAMILIES}


def test_served_per_certificate_and_host() -> None:
    """Per certificate × host: the soonest notAfter over its names with its notBefore, up, current, severity."""
    s = samples(textfile())
    assert s['certmgr_served_not_after_timestamp_seconds{certificate="m",host="esme"}'] == str(T + 3 * DAY)
    assert s['certmgr_served_not_before_timestamp_seconds{certificate="m",host="esme"}'] == str(T - 87 * DAY)
    assert s['certmgr_served_not_after_timestamp_seconds{certificate="m",host="sally"}'] == str(T + 80 * DAY)
    assert s['certmgr_served_current{certificate="m",host="sally"}'] == "1"
    assert s['certmgr_served_current{certificate="m",host="esme"}'] == "0"
    assert s['certmgr_served_severity{certificate="m",host="esme"}'] == "2"
    assert s['certmgr_served_up{certificate="m",host="dead"}'] == "0"
    assert s['certmgr_served_current{certificate="m",host="dead"}'] == "0"
    assert 'certmgr_served_not_after_timestamp_seconds{certificate="m",host="dead"}' not in s


def test_label_values_are_escaped() -> None:
    """A backslash, double quote or line feed in a label value is escaped as the exposition format requires."""
    text = textfile()
    assert 'certmgr_served_up{certificate="m",host="we\\"ird\\\\host\\nx"} 1' in text
    assert metrics.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert all(line.count("\n") == 0 for line in text.splitlines())


def test_store_state_per_certificate_and_deploy_per_host() -> None:
    """Live validity, consecutive failures, last attempt failed, and the last deploy outcome per host come out."""
    s = samples(textfile())
    assert s['certmgr_certificate_not_after_timestamp_seconds{certificate="m"}'] == str(T + 80 * DAY)
    assert s['certmgr_certificate_not_before_timestamp_seconds{certificate="m"}'] == str(T - 10 * DAY)
    assert s['certmgr_certificate_renewal_consecutive_failures{certificate="m"}'] == "2"
    assert s['certmgr_certificate_renewal_last_attempt_success{certificate="m"}'] == "0"
    assert s['certmgr_certificate_renewal_last_attempt_timestamp_seconds{certificate="m"}'] == str(T - 3600)
    assert s['certmgr_certificate_renewal_last_success_timestamp_seconds{certificate="m"}'] == str(T - 10 * DAY)
    assert s['certmgr_deploy_last_success{certificate="m",host="esme"}'] == "0"
    assert s['certmgr_deploy_last_outcome{certificate="m",host="esme",outcome="rolled back"}'] == "1"
    assert s['certmgr_deploy_last_success{certificate="m",host="sally"}'] == "1"
    assert s['certmgr_deploy_last_timestamp_seconds{certificate="m",host="sally"}'] == str(T)


def test_never_attempted_and_nothing_live() -> None:
    """A certificate with no live version and no attempt has no validity or last-attempt samples, 0 failures."""
    s = samples(textfile(certs=(cert_state(not_before=None, not_after=None, renew=RenewState(), deploys={}),)))
    assert 'certmgr_certificate_not_after_timestamp_seconds{certificate="m"}' not in s
    assert 'certmgr_certificate_renewal_last_attempt_success{certificate="m"}' not in s
    assert s['certmgr_certificate_renewal_consecutive_failures{certificate="m"}'] == "0"


def test_never_succeeded_is_zero() -> None:
    """With no clean run ever, the last-success time is 0, so the "no successful run" alert fires at once."""
    record = metrics.RunRecord(last_run=NOW, last_success=None, last_exit_code=2)
    assert samples(textfile(run_report("failed"), record=record))["certmgr_run_last_success_timestamp_seconds"] == "0"


def test_run_family() -> None:
    """The run's duration, exit code, renewals by result and success flag."""
    s = samples(textfile(run_report("renewed", "failed")))
    assert s["certmgr_run_duration_seconds"] == "12.346"
    assert s["certmgr_run_exit_code"] == "2"
    assert s["certmgr_run_success"] == "0"
    assert s['certmgr_run_renewals{result="renewed"}'] == "1"
    assert s['certmgr_run_renewals{result="failed"}'] == "1"
    assert s['certmgr_run_renewals{result="backoff"}'] == "0"


@pytest.mark.parametrize(("renew", "deploy_ok", "succeeded"), [
    (("renewed", "not-due"), True, True),
    (("backoff",), True, True),
    (("failed",), True, False),
    (("renewed",), False, False),
])
def test_last_success_is_carried_over_a_failed_run(renew: tuple[str, ...], deploy_ok: bool, succeeded: bool) -> None:
    """A failed renewal or deploy keeps the previous last-success time; a clean run moves it to this run."""
    before = metrics.RunRecord(last_run=NOW - dt.timedelta(days=1), last_success=NOW - dt.timedelta(days=2),
                               last_exit_code=0)
    after = metrics.next_record(before, run_report(*renew, deploy_ok=deploy_ok))
    assert after.last_run == NOW
    assert after.last_success == (NOW if succeeded else NOW - dt.timedelta(days=2))
    s = samples(textfile(run_report(*renew, deploy_ok=deploy_ok), record=after))
    assert s["certmgr_run_last_timestamp_seconds"] == str(T)
    assert s["certmgr_run_last_success_timestamp_seconds"] == str(T if succeeded else T - 2 * DAY)


def test_run_record_survives_json_and_garbage() -> None:
    """state/run.json round-trips; anything unreadable in it starts afresh instead of failing the run."""
    rec = metrics.RunRecord(last_run=NOW, last_success=NOW - dt.timedelta(hours=3), last_exit_code=2)
    assert metrics.RunRecord.from_json(rec.to_json()) == rec
    assert metrics.RunRecord.from_json(["x"]) == metrics.RunRecord()
    assert metrics.RunRecord.from_json({"last_run": "yesterday", "last_exit_code": "2"}) == metrics.RunRecord()


def test_write_is_atomic_and_world_readable(tmp_path: Path) -> None:
    """The file is replaced whole, 0644 under any umask, and no temp file is left behind."""
    path = tmp_path / "certmgr.prom"
    path.write_text("old\n")
    metrics.write(path, ["a 1", "b 2"])
    assert path.read_text() == "a 1\nb 2\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["certmgr.prom"]


def test_publish_reports_an_unwritable_path_without_raising(tmp_path: Path) -> None:
    """A missing textfile directory is one error line naming the path; the run's own outcome is untouched."""
    class Store:
        def __init__(self) -> None:
            self.saved: dict[str, object] = {}

        def load_json(self, relpath: str, default: object = None) -> object:
            return self.saved.get(relpath, default)

        def save_json(self, relpath: str, obj: object) -> None:
            self.saved[relpath] = obj

        def live_version(self, name: str) -> None:
            return None

    from certmgr import inventory
    inv = inventory.load(Path(__file__).parents[2] / "domains.toml")
    path = tmp_path / "missing" / "certmgr.prom"
    store = Store()
    problem = metrics.publish(inv, store, run_report("renewed"), path)
    assert problem == f"run --prometheus {path}: cannot write: No such file or directory (previous file kept)"
    assert store.saved["state/run.json"] == {"last_run": NOW.isoformat(), "last_success": NOW.isoformat(),
                                             "last_exit_code": 3}


class FakeStore:
    """The few store reads `gather` makes, from a dict of relpath → JSON."""

    def __init__(self, saved: dict[str, object]) -> None:
        self.saved = saved

    def load_json(self, relpath: str, default: object = None) -> object:
        return self.saved.get(relpath, default)

    def live_version(self, name: str) -> None:
        return None


def test_gather_reads_renew_and_deploy_state_and_skips_garbage() -> None:
    """Renewal failures and last deploys come from the store; a deploy state of the wrong shape is skipped."""
    from certmgr import inventory
    inv = inventory.load(Path(__file__).parents[2] / "domains.toml")
    media = inv.certificate("media.hachyderm.io")
    store = FakeStore({
        "state/renew/media.hachyderm.io.json": {"failures": 3, "last_attempt": NOW.isoformat(),
                                                "last_failure": NOW.isoformat(), "last_error": "BADSIG"},
        "state/deploy/media.hachyderm.io.json": {"hosts": {
            media.hosts[0]: {"status": "failed", "at": NOW.isoformat()},
            "gone-host": {"status": "deployed"},  # no longer in the inventory
            media.hosts[1]: ["not", "a", "dict"]}},
        "state/deploy/hachyderm.io.json": ["garbage"],
        "state/revoking/media.hachyderm.io.json": {"reason": "keyCompromise", "versions": [4], "serials": ["0A"],
                                                   "now_first": False, "at": NOW.isoformat()},
        "state/revoking/hachyderm.io.json": {},  # a revocation that finished
    })
    by_name = {c.name: c for c in metrics.gather(inv, store, now=NOW)}
    m = by_name["media.hachyderm.io"]
    assert (m.renew.failures, m.overdue, m.not_after, m.revoking) == (3, True, None, True)
    assert m.deploys == {media.hosts[0]: ("failed", NOW)}
    assert by_name["hachyderm.io"].deploys == {} and not by_name["hachyderm.io"].revoking
    s = samples(textfile(certs=tuple(by_name.values())))
    assert s['certmgr_certificate_revocation_pending{certificate="media.hachyderm.io"}'] == "1"
    assert s['certmgr_certificate_revocation_pending{certificate="hachyderm.io"}'] == "0"


@pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics_accepts_the_file() -> None:
    """`promtool check metrics` finds no problem in the textfile (names, units, HELP, escaping)."""
    proc = subprocess.run([promtool or "", "check", "metrics"], input=textfile(), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
