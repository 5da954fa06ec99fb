"""`certmgr check`: the monitoring-plugin line (status, text, perfdata) and exit status from a scan."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from certmgr import inventory, nagios
from certmgr.cli import main
from certmgr.material import CertInfo
from certmgr.scan import Endpoint, EndpointResult, ScanResult

NOW = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.UTC)
INV = inventory.load(Path(__file__).parents[2] / "domains.toml")
MEDIA = "media.hachyderm.io"
# Monitoring Plugins guidelines: 'label'=value[UOM];[warn];[crit];[min];[max]
PERF = re.compile(r"^'[^'=]+'=-?[0-9.]+(s|%|B|KB|MB|TB|c)?(;[0-9.:~@-]*){0,4}$")


def ep(host: str, days: float | None, severity: str = "ok", problem: str = "", error: str | None = None,
       name: str = MEDIA) -> EndpointResult:
    info = None if days is None else CertInfo(
        serial="1", sha256="ab", subject="CN=m", issuer="CN=ca", not_before=NOW - dt.timedelta(days=90 - days),
        not_after=NOW + dt.timedelta(days=days), names=(name,), key_type="ecdsa-p256")
    return EndpointResult(endpoint=Endpoint(cert=MEDIA, name=name, host=host, address="192.0.2.1", port=443),
                          severity=severity, info=info, error=error, problems=(problem,) if problem else ())


def result(*eps: EndpointResult) -> ScanResult:
    return ScanResult(started=NOW, elapsed=0.5, endpoints=tuple(eps), certificates=())


def perfdata(line: str) -> list[str]:
    return line.split(" | ", 1)[1].split(" ")


@pytest.mark.parametrize(("eps", "status", "line"), [
    ((ep("sally", 41.2), ep("esme", 60)), 0,
     "CERTMGR OK - 2 endpoints ok, soonest expiry media.hachyderm.io on sally in 41d | 'endpoints'=2;;;0 "
     "'ok'=2;;;0;2 'warning'=0;;;0;2 'critical'=0;;;0;2 'error'=0;;;0;2 'soonest_days'=41.2;22.5:;9:;; "
     "'time'=0.500s;;;0"),
    ((ep("sally", 20, "warning", "expires in 20.0d (warning below 22.5d, 1/4)"), ep("esme", 60)), 1,
     "CERTMGR WARNING - 1 warning of 2 endpoints: media.hachyderm.io on sally: expires in 20.0d (warning below "
     "22.5d, 1/4), soonest expiry media.hachyderm.io on sally in 20d | 'endpoints'=2;;;0 'ok'=1;;;0;2 "
     "'warning'=1;;;0;2 'critical'=0;;;0;2 'error'=0;;;0;2 'soonest_days'=20;22.5:;9:;; 'time'=0.500s;;;0"),
    ((ep("cdg", None, "error", error="tcp 192.0.2.1:443: connection refused"), ep("esme", 3, "critical", "x")), 2,
     "CERTMGR CRITICAL - 1 critical, 1 error of 2 endpoints: media.hachyderm.io on cdg: tcp 192.0.2.1:443: "
     "connection refused; media.hachyderm.io on esme: x, soonest expiry media.hachyderm.io on esme in 3d | "
     "'endpoints'=2;;;0 'ok'=0;;;0;2 'warning'=0;;;0;2 'critical'=1;;;0;2 'error'=1;;;0;2 "
     "'soonest_days'=3;22.5:;9:;; 'time'=0.500s;;;0"),
])
def test_status_line(eps: tuple[EndpointResult, ...], status: int, line: str) -> None:
    """OK / WARNING / CRITICAL (an unreachable endpoint is CRITICAL): status, text, perfdata, exit status."""
    out = nagios.check(result(*eps), INV)
    assert out.status == status
    assert out.lines[0] == line
    assert all(PERF.match(p) for p in perfdata(out.lines[0])), perfdata(out.lines[0])


def test_long_output_lists_every_problem_and_the_status_line_only_three() -> None:
    """Five bad endpoints: three named on the status line with "+2 more", all five in the long output."""
    eps = [ep(f"pop{i}", 2, "critical", f"problem {i}") for i in range(5)]
    out = nagios.check(result(*eps), INV)
    assert "; +2 more, soonest expiry" in out.lines[0]
    assert out.lines[1:] == tuple(f"CRITICAL: {MEDIA} on pop{i}: problem {i}" for i in range(5))


def test_foreign_text_cannot_break_the_line() -> None:
    """A `|` or line break in an error from the network cannot start perfdata early or add status lines."""
    out = nagios.check(result(ep("cdg", None, "error", error="bad | thing\nCERTMGR OK - fake")), INV)
    assert out.lines[0].count(" | ") == 1
    assert "bad / thing CERTMGR OK - fake" in out.lines[0]
    assert len(out.lines) == 2
    assert nagios.perf_label("a'b=c") == "'a''b_c'"


def test_unknown_when_nothing_to_check() -> None:
    """No endpoints, or an error before scanning, is UNKNOWN (3) with the error's first line as status."""
    assert nagios.check(result(), INV).lines == ("CERTMGR UNKNOWN - no endpoints to scan (no certificate has hosts)",)
    out = nagios.unknown("inventory x.toml: 1 problem\n  hosts.a.port: not a port")
    assert out.status == 3 and out.lines == ("CERTMGR UNKNOWN - inventory x.toml: 1 problem", "hosts.a.port: not a port")


def test_cli_check_bad_inventory_is_unknown(tmp_path: Path) -> None:
    """`certmgr check` with a broken inventory prints one UNKNOWN line and exits 3, not 2."""
    bad = tmp_path / "domains.toml"
    bad.write_text("[[certificates]]\nname = 1\n")
    res = CliRunner().invoke(main, ["--inventory", str(bad), "--state-dir", str(tmp_path / "s"), "check"])
    assert res.exit_code == 3, res.output
    assert res.output.startswith(f"CERTMGR UNKNOWN - inventory {bad}: ")
    res = CliRunner().invoke(main, ["--inventory", str(tmp_path / "none.toml"), "check"])
    assert res.exit_code == 3 and res.output.startswith("CERTMGR UNKNOWN - "), res.output


def test_an_unfinished_revocation_is_critical_and_named_first() -> None:
    """With the store readable, an unfinished `certmgr revoke` makes an all-ok scan CRITICAL, first on the line."""
    note = "revocation of media.hachyderm.io not finished (keyCompromise, asked 2026-01-01 00:00Z): version 4 " \
           "(serial 0A) still valid at the CA; `certmgr revoke media.hachyderm.io --reason keyCompromise` finishes it"
    out = nagios.check(result(ep("sally", 41.2)), INV, revoking=[note])
    assert out.status == 2
    assert out.lines[0].startswith(f"CERTMGR CRITICAL - {note}; 1 endpoints ok, soonest expiry ")
    assert out.lines[1] == f"CRITICAL: {note}"
    assert nagios.check(result(ep("sally", 41.2)), INV).status == 0
    alone = nagios.check(result(), INV, revoking=[note])  # no endpoint to scan: still CRITICAL, not UNKNOWN
    assert (alone.status, alone.lines) == (2, (f"CERTMGR CRITICAL - {note}", f"CRITICAL: {note}"))
