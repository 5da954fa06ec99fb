"""Unit tests for certmgr.doctor's pure parts: timer parsing, the interval rule, served-vs-live, sudo -l, output."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmgr import doctor
from certmgr.cli import main
from certmgr.doctor import Check, Lifetime, Report, Status, interval_check, served_check, sudo_list_argv
from certmgr.inventory import Certificate, Host, Threshold
from certmgr.material import CertInfo
from certmgr.remote import Result, parse_kv
from certmgr.timer import (
    REPO_SYSTEMD_DIR,
    calendar_max_gap,
    find_timer_files,
    parse_calendar,
    parse_timer,
    parse_timespan,
    timer_interval,
)

TODAY = dt.date(2026, 11, 27)  # a Friday
H = 3600.0
D = 86400.0


# ---------------------------------------------------------------- time spans and calendar expressions


@pytest.mark.parametrize(("text", "seconds"), [
    ("1h", H), ("90", 90.0), ("5m", 300.0), ("30min", 1800.0), ("1h 30min", 5400.0), ("2d", 2 * D),
    ("1w", 7 * D), ("500ms", 0.5), ("12hours", 12 * H),
])
def test_parse_timespan(text: str, seconds: float) -> None:
    """systemd time spans: bare numbers are seconds, `m` is minutes, units add up."""
    assert parse_timespan(text) == seconds


@pytest.mark.parametrize(("text", "error"), [
    ("soon", "'soon' is not a time span"),
    ("3 parsecs", "'3 parsecs': unknown time unit 'parsecs'"),
])
def test_parse_timespan_rejects(text: str, error: str) -> None:
    """Unparseable spans name themselves in the error."""
    with pytest.raises(ValueError) as exc:
        parse_timespan(text)
    assert str(exc.value) == error


@pytest.mark.parametrize(("specs", "gap"), [
    (["daily"], D),
    (["hourly"], H),
    (["minutely"], 60.0),
    (["weekly"], 7 * D),
    (["*-*-* 00,12:00:00"], 12 * H),
    (["*-*-* 00/6:00"], 6 * H),
    (["*-*-* 08..18/2:00"], 14 * H),  # last run 18:00, next 08:00
    (["*-*-* 03:00", "*-*-* 15:30"], 12.5 * H),  # union of two lines
    (["Mon..Fri 09:00"], 3 * D),  # Friday 09:00 → Monday 09:00
    (["Sat,Sun *-*-* 00:00:00"], 6 * D),
    (["*-*-01 00:00:00"], 31 * D),
    (["monthly"], 31 * D),
    (["*:0/15"], 15 * 60.0),
    (["daily UTC"], D),
    (["*-*-* 06:00:00 Europe/Berlin"], D),
])
def test_calendar_max_gap(specs: list[str], gap: float) -> None:
    """The worst gap between consecutive elapses of the union of OnCalendar= expressions."""
    assert calendar_max_gap([parse_calendar(s) for s in specs], start=TODAY) == gap


def test_calendar_that_never_repeats() -> None:
    """A calendar that elapses once in the horizon does not repeat (None)."""
    assert calendar_max_gap([parse_calendar("2027-03-01 00:00")], start=TODAY) is None


@pytest.mark.parametrize(("text", "error"), [
    ("*-*-~1", "OnCalendar='*-*-~1': '~' (days from the end of the month) is not supported"),
    ("*-*-* 25:00", "OnCalendar='*-*-* 25:00': hour '25' is out of range 0..23"),
    ("Funday 10:00", "OnCalendar='Funday 10:00': weekday 'Funday' is not understood"),
    ("*-*-* 10:00:00.5", "OnCalendar='*-*-* 10:00:00.5': time '10:00:00.5' is not understood"),
    ("every day", "OnCalendar='every day': weekday 'every' is not understood"),
])
def test_parse_calendar_rejects(text: str, error: str) -> None:
    """Unsupported or malformed calendar expressions fail with the expression and the part not understood."""
    with pytest.raises(ValueError) as exc:
        parse_calendar(text)
    assert str(exc.value) == error


REPO_TIMER = """[Unit]
Description=Daily certmgr run

[Timer]
OnCalendar=daily
RandomizedDelaySec=1h
Persistent=true
"""
TWICE_DAILY = """[Timer]
OnCalendar=
OnCalendar=*-*-* 00,12:00:00
"""


@pytest.mark.parametrize(("texts", "interval"), [
    ([REPO_TIMER], 25 * H),  # 24 h plus the worst random delay
    ([REPO_TIMER, TWICE_DAILY], 13 * H),  # the drop-in resets OnCalendar=
    ([REPO_TIMER, "[Timer]\nOnCalendar=*-*-* 06:00\n"], 19 * H),  # without a reset the lines add up
    ([REPO_TIMER, "[Timer]\nFixedRandomDelay=yes\n"], 24 * H),  # a fixed delay does not widen the gap
    ([REPO_TIMER, "[Timer]\nRandomizedDelaySec=\n"], 24 * H),
    (["[Timer]\nOnBootSec=5min\nOnUnitActiveSec=6h\n"], 6 * H),
    (["[Timer]\nOnCalendar=daily\nOnUnitActiveSec=2h\n"], 2 * H),  # the union fires at least every 2 h
    (["[Timer]\nOnBootSec=5min\n"], None),  # fires once after boot
    (["[Install]\nOnCalendar=hourly\n"], None),  # keys outside [Timer] are not timer settings
])
def test_timer_interval_from_unit_and_dropins(texts: list[str], interval: float | None) -> None:
    """A unit and its drop-ins merge as systemd merges them; the interval is the worst case."""
    spec = parse_timer([(Path(f"/x/{i}.conf"), t) for i, t in enumerate(texts)])
    assert timer_interval(spec, today=TODAY) == interval


def test_parse_timer_names_the_file_on_error() -> None:
    """A bad value in a drop-in names the file and the line's key."""
    with pytest.raises(ValueError) as exc:
        parse_timer([(Path("/etc/systemd/system/certmgr.timer.d/x.conf"), "[Timer]\nRandomizedDelaySec=lots\n")])
    assert str(exc.value) == "/etc/systemd/system/certmgr.timer.d/x.conf: RandomizedDelaySec=lots: 'lots' is not a time span"


def test_find_timer_files_prefers_installed_units_and_overrides_dropins_by_name(tmp_path: Path) -> None:
    """The first unit directory holding certmgr.timer wins; a drop-in name in a higher directory masks a lower one."""
    etc, lib, repo = tmp_path / "etc", tmp_path / "lib", tmp_path / "repo"
    for d in (etc, lib, repo):
        (d / "certmgr.timer.d").mkdir(parents=True)
        (d / "certmgr.timer").write_text(REPO_TIMER)
    (etc / "certmgr.timer.d" / "b.conf").write_text("")
    (lib / "certmgr.timer.d" / "b.conf").write_text("")
    (lib / "certmgr.timer.d" / "a.conf").write_text("")
    assert find_timer_files([etc, lib], fallback=repo) == [
        etc / "certmgr.timer", lib / "certmgr.timer.d" / "a.conf", etc / "certmgr.timer.d" / "b.conf"]
    assert find_timer_files([tmp_path / "none"], fallback=repo) == [repo / "certmgr.timer"]
    assert find_timer_files([tmp_path / "none"], fallback=None) == []


def test_repo_timer_files_parse() -> None:
    """The repo's own systemd/certmgr.timer and its drop-in parse, and together run at least every 13 h."""
    files = find_timer_files([], fallback=REPO_SYSTEMD_DIR)
    assert [p.name for p in files] == ["certmgr.timer", "twice-daily.conf"]
    assert timer_interval(parse_timer([(p, p.read_text()) for p in files]), today=TODAY) == 13 * H


# ---------------------------------------------------------------- the interval rule


def cert(name: str = "media.hachyderm.test", renew_before: Threshold | None = None) -> Certificate:
    return Certificate(name=name, domains=(name,), dns="lab", hosts=(), ca="pebble", renew_before=renew_before)


@pytest.mark.parametrize(("interval", "days", "renew_before", "status", "message"), [
    (24 * H, 6, None, Status.FAIL,
     "interval 24h is too long: c lives 6d (store) and renews in its last 3d, which needs a run at least every 18h "
     "(4 chances inside the window)"),
    (25 * H, 90, None, Status.OK, "runs at least every 25h; c lives 90d (store) and renews in its last 30d, which "
                                  "needs at most 7.5d"),
    (13 * H, 6, None, Status.OK, "runs at least every 13h; c lives 6d (store) and renews in its last 3d, which needs "
                                 "at most 18h"),
    (8 * D, 90, None, Status.FAIL,
     "interval 8d is too long: c lives 90d (store) and renews in its last 30d, which needs a run at least every 7.5d "
     "(4 chances inside the window)"),
    (24 * H, 90, Threshold(seconds=3 * D, text="3d"), Status.FAIL,
     "interval 24h is too long: c lives 90d (store) and renews in its last 3d, which needs a run at least every 18h "
     "(4 chances inside the window)"),
    (7 * H, 1, None, Status.FAIL,
     "interval 7h is too long: c lives 24h (store) and renews in its last 12h, which needs a run at least every 3h "
     "(4 chances inside the window)"),
])
def test_interval_rule(interval: float, days: int, renew_before: Threshold | None, status: Status,
                       message: str) -> None:
    """The timer must fire 4 times inside the shortest renewal window (so a daily run fails 6-day certificates)."""
    c = cert("c", renew_before)
    got = interval_check(interval, "t", [Lifetime(cert="c", lifetime=dt.timedelta(days=days), source="store")],
                         {"c": c})
    assert (got.status, got.message) == (status, message)


def test_interval_rule_uses_the_shortest_lived_certificate() -> None:
    """With several certificates the one needing the most frequent runs decides."""
    lts = [Lifetime(cert="long", lifetime=dt.timedelta(days=90), source="store"),
           Lifetime(cert="short", lifetime=dt.timedelta(days=6), source="last scan")]
    got = interval_check(24 * H, "t", lts, {"long": cert("long"), "short": cert("short")})
    assert got.status == Status.FAIL and "short lives 6d (last scan)" in got.message


def test_interval_rule_without_lifetimes_or_repeats() -> None:
    """No known lifetime is ok (nothing to compare); a timer that never repeats fails."""
    assert interval_check(24 * H, "t", [], {}).status == Status.OK
    never = interval_check(None, "t", [], {})
    assert (never.status, never.message) == (Status.FAIL, "the timer never repeats (no OnCalendar= or "
                                                          "OnUnitActiveSec=)")


# ---------------------------------------------------------------- served vs live


def _cert(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    c = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False).sign(key, hashes.SHA256()))
    return c.public_bytes(serialization.Encoding.DER)


@dataclass
class FakeProbe:
    chain: tuple[bytes, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chain)


HOST = Host(name="sally", address="127.0.1.4", https_port=443, cert_root="/etc/letsencrypt")
LIVE = "/etc/letsencrypt/live/hachyderm.test/fullchain.pem"


def test_served_check_ok_when_every_name_serves_the_live_leaf() -> None:
    """Every SNI name serving the live fullchain's leaf is ok."""
    der = _cert("hachyderm.test")
    info = CertInfo.from_der(der)
    got = served_check(HOST, cert("hachyderm.test"), LIVE, info,
                       {"hachyderm.test": FakeProbe((der,)), "www.hachyderm.test": FakeProbe((der,))})
    assert (got.status, got.message) == (Status.OK, f"serves {LIVE} (serial {info.serial}) for hachyderm.test, "
                                                    "www.hachyderm.test")


def test_served_check_names_each_name_serving_another_certificate() -> None:
    """A name served with another leaf fails, listing that name and its serial (a partial match still fails)."""
    der, other = _cert("hachyderm.test"), _cert("other")
    info, oinfo = CertInfo.from_der(der), CertInfo.from_der(other)
    got = served_check(HOST, cert("hachyderm.test"), LIVE, info,
                       {"hachyderm.test": FakeProbe((der,)), "www.hachyderm.test": FakeProbe((other,))})
    assert got.status == Status.FAIL
    assert got.message == (f"nginx serves another certificate than {LIVE} (serial {info.serial}): "
                           f"www.hachyderm.test: serial {oinfo.serial}; it reads another path, or was not reloaded")
    assert got.subject == "sally hachyderm.test"


@pytest.mark.parametrize(("live", "probes", "status", "message"), [
    (False, {"a.test": FakeProbe(error="refused")}, Status.WARNING,
     f"{LIVE} does not exist yet: nothing to compare what nginx serves with"),
    (True, {"a.test": FakeProbe(error="refused")}, Status.FAIL, "no handshake with 127.0.1.4:443 (a.test: refused)"),
])
def test_served_check_without_file_or_handshake(live: bool, probes: dict[str, FakeProbe], status: Status,
                                                message: str) -> None:
    """No live file yet is a warning (deploy once); no handshake at all is a failure."""
    info = CertInfo.from_der(_cert("a.test")) if live else None
    got = served_check(HOST, cert("a.test"), LIVE, info, probes)
    assert (got.status, got.message) == (status, message)


# ---------------------------------------------------------------- sudo -l


@pytest.mark.parametrize(("argv", "listing"), [
    (["sudo", "-n", "/usr/sbin/nginx", "-s", "reload"], ["sudo", "-n", "-l", "/usr/sbin/nginx", "-s", "reload"]),
    (["sudo", "systemctl", "reload", "nginx"], ["sudo", "-n", "-l", "systemctl", "reload", "nginx"]),
    (["/usr/bin/sudo", "-n", "-u", "www", "nginx", "-s", "reload"],
     ["/usr/bin/sudo", "-n", "-l", "-u", "www", "nginx", "-s", "reload"]),
    (["sudo", "--non-interactive", "--user=www", "--", "nginx"], ["sudo", "-n", "-l", "-u", "www", "nginx"]),
    (["sudo", "-n", "-p", "pw:", "nginx"], ["sudo", "-n", "-l", "nginx"]),
    (["systemctl", "reload", "nginx"], None),
    (["sudo", "-n"], None),
    ([], None),
])
def test_sudo_list_argv(argv: list[str], listing: list[str] | None) -> None:
    """A sudo reload command becomes `sudo -n -l [-u U] CMD…`, which asks whether it is allowed and runs nothing."""
    assert sudo_list_argv(argv) == listing


# ---------------------------------------------------------------- report and output


def _report(*statuses: Status) -> Report:
    return Report(checks=tuple(Check(group="host", name="ssh", subject=f"h{i}", status=s, message="m",
                                     hint="do x" if s != Status.OK else None)
                               for i, s in enumerate(statuses)))


@pytest.mark.parametrize(("statuses", "code"), [
    ((), 0), ((Status.OK, Status.OK), 0), ((Status.OK, Status.WARNING), 1), ((Status.WARNING, Status.FAIL), 2),
])
def test_exit_code(statuses: tuple[Status, ...], code: int) -> None:
    """Exit 0 when all ok, 1 with warnings, 2 with any failure."""
    assert _report(*statuses).exit_code == code


def test_render_plain_and_tty() -> None:
    """Plain text marks ok/WARN/FAIL; a TTY gets ✓ ! ✗; hints follow non-ok lines; a summary ends it."""
    r = _report(Status.OK, Status.WARNING, Status.FAIL)
    assert doctor.render(r).splitlines() == [
        "Hosts (SSH, cert root, commands)",
        "  ok   ssh  h0: m",
        "  WARN ssh  h1: m",
        "            hint: do x",
        "  FAIL ssh  h2: m",
        "            hint: do x",
        "doctor: 1 ok, 1 warning, 1 failed (0.0s)",
    ]
    assert [ln[:3] for ln in doctor.render(r, tty=True).splitlines()[1:5] if not ln.strip().startswith("hint")] == ["  ✓", "  !", "  ✗"]


def test_json_shape() -> None:
    """--json carries the overall status, exit code, counts and each check's fields."""
    data = _report(Status.OK, Status.FAIL).to_json()
    assert (data["status"], data["exit_code"], data["counts"]) == ("fail", 2, {"ok": 1, "warning": 0, "fail": 1})
    assert set(data["checks"][0]) == {"group", "name", "subject", "status", "message", "hint", "elapsed_ms"}


# ---------------------------------------------------------------- inventory, store, CLI


def test_invalid_inventory_is_one_failed_check(tmp_path: Path) -> None:
    """An inventory that does not validate is a single failure listing its problems; nothing else runs (exit 2)."""
    inv = tmp_path / "domains.toml"
    inv.write_text("[defaults]\nbogus = 1\n")
    result = CliRunner().invoke(main, ["--inventory", str(inv), "--state-dir", str(tmp_path / "s"), "doctor",
                                       "--json"])
    assert result.exit_code == 2
    data = json.loads(result.output)
    assert [(c["name"], c["status"]) for c in data["checks"]] == [("inventory", "fail")]
    assert "defaults.bogus" in data["checks"][0]["message"]


def test_missing_store_is_a_warning(tmp_path: Path) -> None:
    """A state directory that does not exist is a warning (first run, or a wrong --state-dir); it is not created."""
    chk, store = doctor.check_store(tmp_path / "nope")
    assert (chk.status, store) == (Status.WARNING, None)
    assert not (tmp_path / "nope").exists()


def test_bad_timer_interval_is_a_usage_error(tmp_path: Path) -> None:
    """--timer-interval takes an inventory duration; anything else is a usage error (exit 2)."""
    result = CliRunner().invoke(main, ["--inventory", str(tmp_path / "x.toml"), "doctor", "--timer-interval", "daily"])
    assert result.exit_code == 2
    assert "doctor --timer-interval 'daily': not a duration (e.g. 12h, 1d, 90m)" in result.output


# ---------------------------------------------------------------- host checks with a fake connection


@dataclass
class FakeRemote:
    """Answers run_script by the argv it was given; SFTP always succeeds (real SFTP is lab-tested)."""

    answers: dict[str, tuple[int, str]] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result:
        import base64

        self.calls.append(list(args))
        if script == doctor.FIND_SH:
            out = f"found={1 if args[0] in self.answers else 0}\n"
        else:
            rc, text = self.answers.get(" ".join(args), (127, "not found"))
            out = f"rc={rc}\nout={base64.b64encode(text.encode()).decode()}\n"
        return Result(exit_status=0, stdout=out, stderr="", fields=parse_kv(out))

    async def sftp(self) -> Any:
        return FakeSFTP()


class FakeSFTP:
    """Every directory exists and every file can be created and removed."""

    async def isdir(self, path: str) -> bool:
        return True

    def open(self, path: str, mode: str, attrs: Any = None) -> Any:
        @contextlib.asynccontextmanager
        async def cm() -> AsyncIterator[None]:
            yield None
        return cm()

    async def remove(self, path: str) -> None:
        return None


@pytest.mark.parametrize(("reload", "answers", "status", "message"), [
    (("sudo", "-n", "nginx", "-s", "reload"), {"sudo -n -l nginx -s reload": (0, "/usr/sbin/nginx -s reload")},
     Status.OK, "sudo allows `nginx -s reload` without a password (checked with sudo -l, not run)"),
    (("sudo", "-n", "nginx", "-s", "reload"), {"sudo -n -l nginx -s reload": (1, "sudo: a password is required")},
     Status.FAIL, "sudo does not allow `nginx -s reload` without a password (sudo -n -l exit 1: \"sudo: a password "
                  "is required\")"),
    (("/usr/local/bin/reload-web",), {"/usr/local/bin/reload-web": (0, "")}, Status.WARNING,
     "`reload-web` is not run through sudo: it cannot be checked without reloading (its program "
     "/usr/local/bin/reload-web exists)"),
    (("/usr/local/bin/reload-web",), {}, Status.FAIL, "`/usr/local/bin/reload-web` not found on sally"),
])
def test_reload_command_is_never_run(reload: tuple[str, ...], answers: dict[str, tuple[int, str]], status: Status,
                                     message: str) -> None:
    """The reload command is only asked about (sudo -n -l) or looked up (command -v), never executed."""
    import asyncio

    remote = FakeRemote(answers)
    host = Host(name="sally", address="127.0.1.4", reload_command=reload)
    got = asyncio.run(doctor._check_reload(host, remote))
    assert (got.status, got.message) == (status, message)
    assert all(call[:3] == ["sudo", "-n", "-l"] or len(call) == 1 for call in remote.calls)


@pytest.mark.parametrize(("answer", "status", "message"), [
    ((0, "nginx: configuration file ok"), Status.OK, "`nginx -t` passes"),
    ((1, 'nginx: [emerg] unknown directive "bogus"\nnginx: configuration file test failed'), Status.FAIL,
     '`nginx -t` failed (exit 1): "nginx: [emerg] unknown directive "bogus" nginx: configuration file test failed"'),
])
def test_test_command_must_pass(answer: tuple[int, str], status: Status, message: str) -> None:
    """The test command is run, and anything but exit 0 fails with its output on one line."""
    import asyncio

    host = Host(name="sally", address="127.0.1.4", test_command=("sudo", "-n", "nginx", "-t"))
    got = asyncio.run(doctor._check_test(host, FakeRemote({"sudo -n nginx -t": answer})))
    assert (got.status, got.message) == (status, message)


def test_unreachable_host_is_one_failure_and_others_continue(tmp_path: Path) -> None:
    """A connector raising Unreachable for one host yields one ssh failure; another host's checks still run."""
    import asyncio

    from certmgr.inventory import Inventory
    from certmgr.remote import Unreachable

    good = Host(name="good", address="127.0.1.2", test_command=("t",), reload_command=("r",))
    dead = Host(name="dead", address="127.0.1.9", port=2222, test_command=("t",), reload_command=("r",))
    inv = Inventory(path=tmp_path / "i.toml", cas={}, dns={}, hosts={"good": good, "dead": dead}, certificates=(),
                    channels={})

    @contextlib.asynccontextmanager
    async def connector(host: Host, **_: Any) -> AsyncIterator[Any]:
        if host.name == "dead":
            raise Unreachable("connect dead (127.0.1.9:2222): Connection refused (nothing changed)")
        yield FakeRemote({"t": (0, ""), "r": (0, "")})

    async def go() -> list[Check]:
        out: list[Check] = []
        for h in (dead, good):
            await doctor.check_host(inv, h, out, [], timeouts=doctor.Timeouts(), connector=connector,
                                    prober=None)  # type: ignore[arg-type]
        return out

    got = asyncio.run(go())
    assert [(c.subject, c.name, c.status.value) for c in got] == [
        ("dead", "ssh", "fail"), ("good", "ssh", "ok"), ("good", "write", "ok"), ("good", "test-command", "ok"),
        ("good", "reload-command", "warning")]
    assert got[0].message == "connect dead (127.0.1.9:2222): Connection refused (nothing else checked on this host)"


# ---------------------------------------------------------------- docs/doctor.md


DOC = Path(__file__).resolve().parents[2] / "docs" / "doctor.md"


def test_docs_name_every_check() -> None:
    """docs/doctor.md documents every check name doctor emits."""
    text = DOC.read_text()
    for name in ("inventory", "trust", "secret", "store", "directory", "account", "tsig", "api", "program",
                 "nameservers", "ssh", "write", "test-command", "reload-command", "serves-live", "interval"):
        assert f"| `{name}` |" in text, name


@pytest.mark.parametrize(("lifetime", "daily", "twice"), [
    (dt.timedelta(days=90), Status.OK, Status.OK),
    (dt.timedelta(days=6), Status.FAIL, Status.OK),
    (dt.timedelta(hours=160), Status.FAIL, Status.OK),
])
def test_docs_timer_table(lifetime: dt.timedelta, daily: Status, twice: Status) -> None:
    """The timer table in docs/doctor.md holds: the shipped daily timer (25 h) and twice-daily (13 h) per lifetime."""
    lts = [Lifetime(cert="c", lifetime=lifetime, source="store")]
    assert interval_check(25 * H, "t", lts, {"c": cert("c")}).status == daily
    assert interval_check(13 * H, "t", lts, {"c": cert("c")}).status == twice


def test_connection_lost_mid_host_is_reported_against_the_step(tmp_path: Path) -> None:
    """A connection lost during one host check fails that check (not `ssh`) and says later ones were not done."""
    import asyncio

    from certmgr.inventory import Inventory
    from certmgr.remote import ConnectionLost

    host = Host(name="h", address="127.0.1.2", test_command=("t",), reload_command=("sudo", "r"))
    inv = Inventory(path=tmp_path / "i.toml", cas={}, dns={}, hosts={"h": host}, certificates=(), channels={})

    class Dropping(FakeRemote):
        async def run_script(self, script: str, args: Sequence[str], *, step: str,
                             timeout: float | None = None) -> Result:
            raise ConnectionLost("doctor test_command h (127.0.1.2:22): connection lost: reset")

    @contextlib.asynccontextmanager
    async def connector(host: Host, **_: Any) -> AsyncIterator[Any]:
        yield Dropping()

    async def go() -> list[Check]:
        out: list[Check] = []
        await doctor.check_host(inv, host, out, [], timeouts=doctor.Timeouts(), connector=connector,
                                prober=None)  # type: ignore[arg-type]
        return out

    got = asyncio.run(go())
    assert [(c.name, c.status.value) for c in got] == [("ssh", "ok"), ("write", "ok"), ("test-command", "fail")]
    assert got[-1].message == ("doctor test_command h (127.0.1.2:22): connection lost: reset (later checks on this "
                               "host not done)")


def test_ca_check_fails_cleanly_on_missing_trust_file(tmp_path: Path) -> None:
    """doctor reports an unreadable `[ca.X] trust` as a failed directory check naming key and path (no traceback)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from certmgr.inventory import CA

    ca = CA(name="pebble", directory="https://127.0.0.1:1/dir", trust=tmp_path / "nope.pem")
    with ThreadPoolExecutor(1) as executor:
        [check] = asyncio.run(doctor.check_ca(ca, None, executor=executor, timeouts=doctor.Timeouts()))
    assert (check.status, check.subject) == (Status.FAIL, "pebble")
    assert check.message == (f"acme directory pebble: [ca.pebble] trust {tmp_path / 'nope.pem'}: cannot read: "
                             "No such file or directory (nothing ordered)")


def test_inventory_warnings_are_a_doctor_warning(tmp_path: Path) -> None:
    """An inventory that loads with warnings (here hmac-sha1) is a WARN check carrying them, not ok."""
    text = (Path(__file__).parents[2] / "domains.toml").read_text()
    text = text.replace('tsig_algorithm = "hmac-sha256"', 'tsig_algorithm = "hmac-sha1"')
    assert 'tsig_algorithm = "hmac-sha1"' in text
    path = tmp_path / "domains.toml"
    path.write_text(text)
    check, inv = doctor.check_inventory(path)
    assert inv is not None and check.status == Status.WARNING
    assert check.message == "dns.hachyderm.tsig_algorithm: hmac-sha1 is deprecated (RFC 8945 §6); generate a hmac-sha256 key"
