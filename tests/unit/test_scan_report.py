"""Scan output: the urgency table, the Prometheus textfile, and the JSON schema's stable keys."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from certmgr import report
from certmgr.material import CertInfo
from certmgr.scan import CertSummary, Endpoint, EndpointResult, ScanResult, result_json

NOW = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)


def _result() -> ScanResult:
    info = CertInfo(serial="abc", sha256="ff", subject="CN=m", issuer="CN=ca", not_before=NOW - dt.timedelta(days=85),
                    not_after=NOW + dt.timedelta(days=5), names=("m.test",), key_type="ecdsa-p256")

    def ep(host: str) -> Endpoint:
        return Endpoint(cert="m", name="m.test", host=host, address="127.0.0.1", port=443)

    eps = (
        EndpointResult(endpoint=ep("dead"), severity="error", error="refused", problems=("refused",)),
        EndpointResult(endpoint=ep('we"ird'), severity="critical", info=info, chain="ok", drift=True,
                       problems=("expires in 5.0d (critical below 9.0d, 1/10)",)),
    )
    summary = CertSummary(name="m", severity="error", endpoints=2,
                          hosts_by_severity={"error": ("dead",), "critical": ('we"ird',)}, days_left=5.0,
                          command="certmgr renew m")
    return ScanResult(started=NOW, elapsed=0.25, endpoints=eps, certificates=(summary,), severity="error")


def test_table_is_plain_when_piped_and_coloured_on_a_tty() -> None:
    """Without colour the table has no escape codes; with colour only the severity cell is coloured."""
    plain = report.table(_result())
    assert "\x1b[" not in plain
    lines = plain.splitlines()
    assert lines[0].split() == ["SEVERITY", "CERTIFICATE", "NAME", "HOST", "DAYS", "NOT", "AFTER", "SERIAL", "CHAIN",
                                "PROBLEMS"]
    assert lines[1].startswith("error ") and lines[1].endswith("refused")
    assert "2 endpoints in 0.25s: 1 critical, 1 error — overall ERROR" in plain
    assert "ERROR    m: dead, we\"ird → certmgr renew m" in plain
    coloured = report.table(_result(), colour=True)
    assert coloured.splitlines()[1].startswith("\x1b[35;1merror   \x1b[0m")


def test_prometheus_textfile(tmp_path: Path) -> None:
    """The textfile has HELP/TYPE per family, escaped labels, expiry only where a certificate was read."""
    path = tmp_path / "certmgr.prom"
    report.write_prometheus(_result(), path)
    text = path.read_text()
    labels = 'certificate="m",name="m.test",host="we\\"ird",address="127.0.0.1",port="443"'
    assert f"certmgr_scan_endpoint_success{{{labels}}} 1" in text
    assert f"certmgr_scan_endpoint_expiry_timestamp_seconds{{{labels}}} {int(NOW.timestamp()) + 5 * 86400}" in text
    assert f"certmgr_scan_endpoint_days_left{{{labels}}} 5.000" in text
    assert f"certmgr_scan_endpoint_drift{{{labels}}} 1" in text
    assert 'certmgr_scan_endpoint_success{certificate="m",name="m.test",host="dead",' in text
    assert text.count("certmgr_scan_endpoint_expiry_timestamp_seconds{") == 1
    assert 'certmgr_scan_certificate_severity{certificate="m"} 3' in text
    assert "# TYPE certmgr_scan_duration_seconds gauge\ncertmgr_scan_duration_seconds 0.250\n" in text
    assert [p.name for p in tmp_path.iterdir()] == ["certmgr.prom"]


def test_json_schema_keys_are_stable() -> None:
    """The documented `--json` keys (docs/scan.md) are all present, in this order."""
    data = result_json(_result())
    assert list(data) == ["schema", "scanned_at", "elapsed_s", "severity", "exit_code", "counts", "certificates",
                          "endpoints"]
    assert list(data["endpoints"][1]) == [
        "certificate", "name", "host", "address", "port", "severity", "problems", "error", "drift", "serial",
        "sha256", "subject", "issuer", "not_before", "not_after", "days_left", "key_type", "names", "chain",
        "chain_length", "elapsed_ms"]
    assert list(data["certificates"][0]) == ["name", "severity", "endpoints", "hosts", "days_left", "live_version",
                                             "live_sha256", "command"]
    assert data["exit_code"] == 3


def test_progress_bar_only_on_a_tty() -> None:
    """The progress bar draws on a terminal and stays silent when stderr is piped."""
    buf = io.StringIO()
    p = report.Progress(buf)
    p(5, 10)
    assert buf.getvalue() == ""
    p = report.Progress(buf, enabled=True)
    p(10, 10)
    p.close()
    assert "scanning [##############################] 10/10" in buf.getvalue()


def test_table_shows_the_whole_serial() -> None:
    """The table's serial is whole (a Let's Encrypt serial is 36 digits), so it greps against `openssl x509 -serial`."""
    import dataclasses

    r = _result()
    long_serial = "0A3ADF5C0B7D1B3A0F05E2A1D9C4F1E2B3C4"
    info = dataclasses.replace(r.endpoints[1].info, serial=long_serial)  # type: ignore[type-var]
    ep = dataclasses.replace(r.endpoints[1], info=info)
    table = report.table(dataclasses.replace(r, endpoints=(r.endpoints[0], ep)))
    assert f" {long_serial} " in table
