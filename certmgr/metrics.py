"""Prometheus textfile metrics of `certmgr run`, for node_exporter's textfile collector.

`lines` is pure: (final scan, run report, what the store holds, run record) → exposition-format lines.
`gather` reads the store, `record_run` keeps the last-success time across runs, `write` replaces the file atomically.
The alerting rules and dashboard that read these names live in monitoring/ (docs/monitoring.md).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certmgr import pins
from certmgr import plan as plan_mod
from certmgr import renew as renew_mod
from certmgr.docmerge import parse_time
from certmgr.errors import StoreError
from certmgr.fsutil import atomic_write
from certmgr.inventory import Inventory
from certmgr.material import MaterialError
from certmgr.pipeline import RunReport
from certmgr.plan import RenewState
from certmgr.scan import SEVERITY_RANK, EndpointResult, ScanResult
from certmgr.store_api import StateStore

RUN_STATE = "state/run.json"

# (name, type, help): the order of the file. Units in names, per the Prometheus naming guide.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("certmgr_run_last_timestamp_seconds", "gauge", "When the last certmgr run started (Unix time)."),
    ("certmgr_run_last_success_timestamp_seconds", "gauge",
     "When the last run that completed with no failed renewal or deploy started (Unix time; 0: never)."),
    ("certmgr_run_success", "gauge", "1 if the last run completed with no failed renewal or deploy, else 0."),
    ("certmgr_run_exit_code", "gauge", "Exit status of the last run (0 ok, 1 warnings, 2 failed/critical, 3 error)."),
    ("certmgr_run_duration_seconds", "gauge", "Wall time of the last run."),
    ("certmgr_run_renewals", "gauge", "Renewal outcomes of the last run, by result."),
    ("certmgr_certificate_not_after_timestamp_seconds", "gauge",
     "notAfter of the certificate live in the local store (Unix time)."),
    ("certmgr_certificate_not_before_timestamp_seconds", "gauge",
     "notBefore of the certificate live in the local store (Unix time)."),
    ("certmgr_certificate_renewal_overdue", "gauge",
     "1 if the certificate is past its renewal time (plus grace) and still not renewed."),
    ("certmgr_certificate_revocation_pending", "gauge",
     "1 while a `certmgr revoke` of the certificate is not finished (a leaked key may still be valid at the CA)."),
    ("certmgr_certificate_renewal_consecutive_failures", "gauge",
     "Renewal attempts that failed in a row (0 after a success)."),
    ("certmgr_certificate_renewal_last_attempt_success", "gauge",
     "1 if the last renewal attempt succeeded, 0 if it failed (absent: never attempted by certmgr)."),
    ("certmgr_certificate_renewal_last_attempt_timestamp_seconds", "gauge",
     "When renewal was last attempted (Unix time)."),
    ("certmgr_certificate_renewal_last_success_timestamp_seconds", "gauge",
     "When the certificate was last renewed successfully (Unix time)."),
    ("certmgr_served_not_after_timestamp_seconds", "gauge",
     "Soonest notAfter served by the host over the certificate's names, as seen by the run's last scan."),
    ("certmgr_served_not_before_timestamp_seconds", "gauge",
     "notBefore of that same served certificate (lifetime = notAfter - notBefore)."),
    ("certmgr_served_up", "gauge", "1 if every name of the certificate answered a TLS handshake on the host."),
    ("certmgr_served_current", "gauge",
     "1 if the host serves the store's live certificate for every name (absent: nothing live locally)."),
    ("certmgr_served_severity", "gauge", "Worst scan severity on the host: 0 ok, 1 warning, 2 critical, 3 error."),
    ("certmgr_deploy_last_success", "gauge",
     "1 if the last deploy of the certificate to the host ended deployed or already live, else 0."),
    ("certmgr_deploy_last_outcome", "gauge", "1 for the outcome of the last deploy of the certificate to the host."),
    ("certmgr_deploy_last_timestamp_seconds", "gauge", "When the certificate was last deployed to the host."),
)

RENEW_RESULTS = ("renewed", "failed", "backoff", "not-due")
DEPLOY_OK = ("deployed", "skipped")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """What outlives one run (`state/run.json`): the dead-man's switch needs the last success of *earlier* runs."""

    last_run: dt.datetime | None = None
    last_success: dt.datetime | None = None
    last_exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"last_run": _iso(self.last_run), "last_success": _iso(self.last_success),
                "last_exit_code": self.last_exit_code}

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        if not isinstance(data, dict):
            return cls()
        code = data.get("last_exit_code")
        return cls(last_run=parse_time(data.get("last_run")), last_success=parse_time(data.get("last_success")),
                   last_exit_code=code if isinstance(code, int) else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class CertState:
    """What the store holds for one certificate: live validity, renewal memory, last deploy per host."""

    name: str
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    overdue: bool = False
    renew: RenewState = field(default_factory=RenewState)
    deploys: Mapping[str, tuple[str, dt.datetime | None]] = field(default_factory=dict)  # host → (status, at)
    revoking: bool = False  # an unfinished `certmgr revoke` (certmgr.pins.PendingRevocation), or its record unreadable


def run_succeeded(report: RunReport) -> bool:
    """A run counts as successful when it completed with no failed renewal and no failed deploy."""
    return not report.dry_run and not report.renew_failed and not report.deploy_failed


def next_record(previous: RunRecord, report: RunReport) -> RunRecord:
    """The record after `report`: last run now, last success carried over unless this run succeeded."""
    return RunRecord(last_run=report.started, last_exit_code=report.exit_code,
                     last_success=report.started if run_succeeded(report) else previous.last_success)


def record_run(store: StateStore, report: RunReport) -> RunRecord:
    """Load `state/run.json`, fold in this run, save it (the caller holds the store lock)."""
    try:
        previous = RunRecord.from_json(store.load_json(RUN_STATE, default=None))
    except StoreError:
        previous = RunRecord()  # unreadable: start afresh rather than lose this run's record too
    record = next_record(previous, report)
    store.save_json(RUN_STATE, record.to_json())
    return record


def gather(inv: Inventory, store: StateStore, *, now: dt.datetime) -> list[CertState]:
    """One CertState per inventory certificate, read from the store (nothing on the network)."""
    out = []
    for cert in inv.certificates:
        # A part of the store that cannot be read leaves its metrics out; the run's own report already said why.
        info = None
        try:
            if store.live_version(cert.name) is not None:
                info = store.read(cert.name).info()
        except (StoreError, MaterialError):
            info = None
        try:
            rstate = renew_mod.load_state(store, cert.name)
        except StoreError:
            rstate = RenewState()
        try:
            saved = store.load_json(f"state/deploy/{cert.name}.json", default={})
        except StoreError:
            saved = {}
        hosts = saved.get("hosts") if isinstance(saved, dict) else None
        if not isinstance(hosts, dict):
            hosts = {}
        deploys = {h: (str(d.get("status")), parse_time(d.get("at"))) for h, d in sorted(hosts.items())
                   if isinstance(d, dict) and d.get("status") and h in cert.hosts}
        decision = plan_mod.decide(cert, info, rstate, now, pinned=renew_mod.pinned_version(store, cert.name),
                                   revoked=renew_mod.revoked_reason(store, cert.name, info))
        out.append(CertState(name=cert.name, not_before=info.not_before if info else None,
                             not_after=info.not_after if info else None, overdue=decision.overdue,
                             renew=rstate, deploys=deploys,
                             revoking=pins.pending_note(store, cert.name) is not None))
    return out


# ---------------------------------------------------------------- exposition format


def escape_label(value: str) -> str:
    """A label value per the text exposition format: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in kv.items()) + "}"


def _num(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"metric value {value} is not finite")
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def _ts(t: dt.datetime) -> str:
    return _num(t.timestamp())


def lines(*, scan: ScanResult, report: RunReport, certs: Sequence[CertState], record: RunRecord) -> Iterator[str]:
    """The whole textfile, one family at a time: HELP, TYPE, then its samples (certificate/host order)."""
    samples: dict[str, list[str]] = {name: [] for name, _, _ in FAMILIES}

    def add(name: str, value: float, **labels: str) -> None:
        samples[name].append(f"{name}{_labels(**labels) if labels else ''} {_num(value)}")

    if record.last_run is not None:
        add("certmgr_run_last_timestamp_seconds", record.last_run.timestamp())
    # 0 for "never": the dead-man's switch must fire for an installation that never succeeded
    add("certmgr_run_last_success_timestamp_seconds", record.last_success.timestamp() if record.last_success else 0)
    add("certmgr_run_success", 1 if run_succeeded(report) else 0)
    add("certmgr_run_exit_code", report.exit_code)
    add("certmgr_run_duration_seconds", round(report.elapsed, 3))
    for result in RENEW_RESULTS:
        add("certmgr_run_renewals", sum(1 for o in report.renewals if o.status == result), result=result)

    for c in certs:
        if c.not_after is not None and c.not_before is not None:
            add("certmgr_certificate_not_after_timestamp_seconds", c.not_after.timestamp(), certificate=c.name)
            add("certmgr_certificate_not_before_timestamp_seconds", c.not_before.timestamp(), certificate=c.name)
        add("certmgr_certificate_renewal_overdue", 1 if c.overdue else 0, certificate=c.name)
        add("certmgr_certificate_revocation_pending", 1 if c.revoking else 0, certificate=c.name)
        r = c.renew
        add("certmgr_certificate_renewal_consecutive_failures", r.failures, certificate=c.name)
        if r.last_attempt is not None:
            add("certmgr_certificate_renewal_last_attempt_success", 1 if r.failures == 0 else 0,
                certificate=c.name)
            add("certmgr_certificate_renewal_last_attempt_timestamp_seconds", r.last_attempt.timestamp(),
                certificate=c.name)
        if r.last_success is not None:
            add("certmgr_certificate_renewal_last_success_timestamp_seconds", r.last_success.timestamp(),
                certificate=c.name)
        for host, (status, at) in c.deploys.items():
            add("certmgr_deploy_last_success", 1 if status in DEPLOY_OK else 0, certificate=c.name, host=host)
            add("certmgr_deploy_last_outcome", 1, certificate=c.name, host=host, outcome=status)
            if at is not None:
                add("certmgr_deploy_last_timestamp_seconds", at.timestamp(), certificate=c.name, host=host)

    live = {c.name: c.live_sha256 for c in scan.certificates}
    # every endpoint (ScanResult.endpoints holds only the most urgent 1,000 of a large scan)
    for (cert, host), group in _by_cert_host(scan.iter_endpoints()):
        read = [r for r in group if r.info is not None]
        if read:
            soonest = min(read, key=lambda r: r.info.not_after if r.info else dt.datetime.max)
            assert soonest.info is not None
            add("certmgr_served_not_after_timestamp_seconds", soonest.info.not_after.timestamp(),
                certificate=cert, host=host)
            add("certmgr_served_not_before_timestamp_seconds", soonest.info.not_before.timestamp(),
                certificate=cert, host=host)
        add("certmgr_served_up", 1 if len(read) == len(group) else 0, certificate=cert, host=host)
        want = live.get(cert)
        if want is not None:
            current = len(read) == len(group) and all(r.info is not None and r.info.sha256 == want for r in group)
            add("certmgr_served_current", 1 if current else 0, certificate=cert, host=host)
        add("certmgr_served_severity", max(SEVERITY_RANK[r.severity] for r in group), certificate=cert, host=host)

    for name, typ, help_text in FAMILIES:
        yield f"# HELP {name} {help_text}"
        yield f"# TYPE {name} {typ}"
        yield from samples[name]


def _by_cert_host(eps: Iterable[EndpointResult]) -> list[tuple[tuple[str, str], list[EndpointResult]]]:
    groups: dict[tuple[str, str], list[EndpointResult]] = {}
    for r in eps:
        groups.setdefault((r.endpoint.cert, r.endpoint.host), []).append(r)
    return sorted(groups.items())


def publish(inv: Inventory, store: StateStore, report: RunReport, path: Path) -> str | None:
    """Record the run and write the textfile at `path`; the error line when that failed, else None.

    A failure here never changes the run's outcome: the file keeps its previous content, and the
    "no successful run" alert fires from the stale timestamp (docs/monitoring.md).
    """
    try:
        record = record_run(store, report)
        certs = gather(inv, store, now=report.started)
        write(path, lines(scan=report.final_scan, report=report, certs=certs, record=record))
    except StoreError as exc:
        return f"run --prometheus {path}: {exc} (metrics not written)"
    except OSError as exc:
        return f"run --prometheus {path}: cannot write: {exc.strerror or exc} (previous file kept)"
    return None


def write(path: Path, text_lines: Iterable[str]) -> None:
    """Replace `path` atomically, 0644 (node_exporter reads only `*.prom`; the hidden temp file is not one)."""
    atomic_write(path, ("\n".join(text_lines) + "\n").encode(), 0o644)


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None
