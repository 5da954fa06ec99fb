"""The systemd units: hardened (exposure ≤ 1.5), valid, and passing secrets as credentials."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "systemd"
analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze not installed")


def exposure(unit: Path) -> float:
    out = subprocess.run([analyze or "", "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, check=False).stdout
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert m, out[-500:]
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", ["certmgr.service", "certmgr-failure@.service"])
def test_exposure_at_most_1_5(unit: str) -> None:
    """`systemd-analyze security --offline=true` rates each certmgr service at 1.5 or better."""
    assert exposure(UNITS / unit) <= 1.5


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the service, timer and failure units (ExecStart pointed at this certmgr)."""
    certmgr = Path(sys.executable).with_name("certmgr")
    if not certmgr.exists():
        pytest.skip("certmgr console script not installed next to this python")
    for name in ("certmgr.service", "certmgr.timer", "certmgr-failure@.service"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/certmgr", str(certmgr))
        (tmp_path / name).write_text(text)
    proc = subprocess.run([analyze or "", "verify", "--man=false", str(tmp_path / "certmgr.service"),
                           str(tmp_path / "certmgr.timer")], capture_output=True, text=True, check=False)
    problems = [line for line in proc.stderr.splitlines()
                if "certmgr" in line and "Failed to put bus name" not in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_secrets_are_credentials_not_environment() -> None:
    """Secrets reach the service through LoadCredential=, never Environment=."""
    text = (UNITS / "certmgr.service").read_text()
    assert "LoadCredential=tsig.key:" in text
    assert not re.search(r"^Environment(File)?=", text, re.M)


def test_timer_is_daily_randomised_and_persistent() -> None:
    """The timer runs daily with a random delay and catches up after downtime; a twice-daily drop-in exists."""
    text = (UNITS / "certmgr.timer").read_text()
    assert "OnCalendar=daily" in text and "RandomizedDelaySec=" in text and "Persistent=true" in text
    assert "OnCalendar=*-*-* 00,12:00:00" in (UNITS / "certmgr.timer.d" / "twice-daily.conf").read_text()


def success_statuses() -> set[int]:
    [line] = [x for x in (UNITS / "certmgr.service").read_text().splitlines() if x.startswith("SuccessExitStatus=")]
    return {int(v) for v in line.split("=", 1)[1].split()}


def test_a_failed_renewal_fails_the_unit() -> None:
    """Exit 2 (a renewal or deploy failed) and 70 (a bug) are unit failures that OnFailure= reports; 1, 3, 75 are not."""
    from certmgr import cli, pipeline
    from certmgr.errors import LockHeld

    text = (UNITS / "certmgr.service").read_text()
    assert "OnFailure=certmgr-failure@%n.service" in text
    ok = success_statuses()
    assert pipeline.EXIT_FAILED == 2 and pipeline.EXIT_FAILED not in ok
    assert cli.EXIT_BUG not in ok and cli.EXIT_TERMINATED not in ok
    assert {pipeline.EXIT_WARNING, pipeline.EXIT_ERROR, LockHeld.exit_code} == ok


def test_prometheus_dropin_writes_where_node_exporter_reads() -> None:
    """The drop-in replaces ExecStart with `run --prometheus` into Debian's textfile dir and makes only it writable."""
    text = (UNITS / "certmgr.service.d" / "prometheus.conf").read_text()
    starts = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    assert starts[0] == "ExecStart="  # reset, else a oneshot unit would run both command lines
    assert starts[1].endswith(" run --prometheus /var/lib/prometheus/node-exporter/certmgr.prom")
    assert starts[1].split(" run ")[0] in (UNITS / "certmgr.service").read_text()
    assert "ReadWritePaths=-/var/lib/prometheus/node-exporter\n" in text  # "-": a missing dir never blocks renewals


@needs_analyze
def test_dropin_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` reads the service with the Prometheus drop-in and finds nothing wrong."""
    certmgr = Path(sys.executable).with_name("certmgr")
    if not certmgr.exists():
        pytest.skip("certmgr console script not installed next to this python")
    (tmp_path / "certmgr.service.d").mkdir()
    for name in ("certmgr.service", "certmgr-failure@.service", "certmgr.service.d/prometheus.conf"):
        (tmp_path / name).write_text((UNITS / name).read_text().replace("/usr/local/bin/certmgr", str(certmgr)))
    proc = subprocess.run([analyze or "", "verify", "--man=false", str(tmp_path / "certmgr.service")],
                          capture_output=True, text=True, check=False)
    problems = [line for line in proc.stderr.splitlines()
                if "certmgr" in line and "Failed to put bus name" not in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_an_unreachable_shared_store_fails_the_unit() -> None:
    """Exit 69 (the PostgreSQL store cannot be reached, or a lock was lost) is a unit failure, never a success."""
    from certmgr.errors import LockLost, StoreUnavailable

    assert StoreUnavailable.exit_code == LockLost.exit_code == 69
    assert 69 not in success_statuses()


HA_DROPIN = UNITS / "certmgr.service.d" / "ha.conf"


def test_ha_dropin_loads_the_store_secrets_and_keeps_69_a_failure() -> None:
    """The HA drop-in loads pg-password and store-key as credentials (no environment), waits for the network, keeps OnFailure= and resets SuccessExitStatus= to the main unit's list, without 69."""
    from certmgr.errors import StoreUnavailable

    text = HA_DROPIN.read_text()
    creds = dict(x.split("=", 1)[1].split(":", 1) for x in text.splitlines() if x.startswith("LoadCredential="))
    assert creds == {"pg-password": "/etc/certmgr/pg-password", "store-key": "/etc/certmgr/store-key"}
    assert not re.search(r"^Environment(File)?=", text, re.M)
    assert "Wants=network-online.target\n" in text and "After=network-online.target\n" in text
    assert "OnFailure=certmgr-failure@%n.service\n" in text
    lists = [x.split("=", 1)[1] for x in text.splitlines() if x.startswith("SuccessExitStatus=")]
    assert lists[0] == "" and {int(v) for v in lists[1].split()} == success_statuses()
    assert StoreUnavailable.exit_code == 69 and "69" not in lists[1].split()


def test_ha_set_up_names_the_dropin_and_its_credentials() -> None:
    """docs/ha.md's set-up installs the shipped drop-in and names the credentials its [store] reads."""
    doc = (UNITS.parent / "docs" / "ha.md").read_text()
    assert "systemd/certmgr.service.d/ha.conf" in doc
    assert 'password_credential = "pg-password"' in doc and 'key_credential = "store-key"' in doc


@needs_analyze
def test_ha_dropin_verifies_and_systemd_merges_it(tmp_path: Path) -> None:
    """`systemd-analyze verify` reads the service with the HA drop-in (and the Prometheus one) and finds nothing wrong (an unknown key or a bad exit status in the drop-in would be reported)."""
    certmgr = Path(sys.executable).with_name("certmgr")
    if not certmgr.exists():
        pytest.skip("certmgr console script not installed next to this python")
    (tmp_path / "certmgr.service.d").mkdir()
    for name in ("certmgr.service", "certmgr-failure@.service", "certmgr.service.d/prometheus.conf",
                 "certmgr.service.d/ha.conf"):
        (tmp_path / name).write_text((UNITS / name).read_text().replace("/usr/local/bin/certmgr", str(certmgr)))
    proc = subprocess.run([analyze or "", "verify", "--man=false", str(tmp_path / "certmgr.service")],
                          capture_output=True, text=True, check=False)
    problems = [line for line in proc.stderr.splitlines()
                if "certmgr" in line and "Failed to put bus name" not in line]
    assert proc.returncode == 0 and not problems, proc.stderr
