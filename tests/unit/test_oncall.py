"""`certmgr as-service ARGS`: the systemd-run argv built from the installed certmgr.service, never a shell string."""

from __future__ import annotations

import json
import shlex
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from certmgr.cli import main
from certmgr.errors import UsageError
from certmgr.oncall import parse_unit, service_settings, systemd_run_argv

REPO_UNIT = (Path(__file__).parents[2] / "systemd" / "certmgr.service").read_text()
EXPECTED = [
    "systemd-run", "--wait", "--collect", "--quiet", "--pty", "--unit", "certmgr-oncall",
    "--description", "certmgr on-call command (certmgr as-service)",
    "-p", "User=certmgr", "-p", "Group=certmgr", "-p", "StateDirectory=certmgr",
    "-p", "ConfigurationDirectory=certmgr", "-p", "LoadCredential=tsig.key:/etc/certmgr/tsig.key",
    "-p", "LoadCredential=discord-webhook:/etc/certmgr/discord-webhook",
    "-p", "LoadCredential=id_ed25519:/etc/certmgr/id_ed25519", "-p", "UMask=0077",
    "--", "/usr/local/bin/certmgr", "renew", "media.hachyderm.io",
]


def test_argv_from_the_shipped_unit() -> None:
    """The shipped unit gives its user, state and configuration directories, umask and every LoadCredential."""
    argv = systemd_run_argv(parse_unit(f"# /etc/systemd/system/certmgr.service\n{REPO_UNIT}"),
                            ["renew", "media.hachyderm.io"], tty=True)
    assert argv == EXPECTED


def test_dropins_override_and_reset() -> None:
    """A drop-in's User= wins; an empty LoadCredential= resets the list, as systemd does; piped → --pipe."""
    text = REPO_UNIT + "\n# /etc/systemd/system/certmgr.service.d/x.conf\n[Service]\nUser=certbot\nLoadCredential=\n" \
                       "LoadCredential=tsig.key:/srv/tsig.key\nExecStart=\nExecStart=/opt/certmgr/bin/certmgr run\n"
    s = parse_unit(text)
    assert ("User", "certbot") in s.properties and s.credentials == ("tsig.key",)
    argv = systemd_run_argv(s, ["status"], tty=False)
    assert "--pipe" in argv and argv[-2:] == ["/opt/certmgr/bin/certmgr", "status"]


def test_hostile_arguments_stay_single_argv_elements() -> None:
    """Arguments reach systemd-run as separate argv elements: nothing is parsed by a shell."""
    argv = systemd_run_argv(parse_unit(REPO_UNIT), ["renew", "x; rm -rf /", "$(id)"], tty=False)
    assert argv[-2:] == ["x; rm -rf /", "$(id)"]


@pytest.mark.parametrize(("answer", "message"), [
    ((1, "", "No files found for certmgr.service.\n"),
     "as-service: cannot read the installed certmgr.service: No files found for certmgr.service. (nothing run)"),
    ((0, "[Service]\nExecStart=/usr/bin/certmgr run\n", ""), "as-service: certmgr.service sets no User= (nothing run)"),
])
def test_missing_or_userless_unit_is_refused(answer: tuple[int, str, str], message: str) -> None:
    """No installed unit, or one without User=, is a usage error that names the cause; nothing is run."""
    def systemctl(args: Sequence[str]) -> tuple[int, str, str]:
        assert list(args) == ["cat", "certmgr.service", "--no-pager"]
        return answer
    with pytest.raises(UsageError) as exc:
        service_settings(systemctl)
    assert exc.value.message == message


def fake(bindir: Path, name: str, body: str) -> None:
    exe = bindir / name
    exe.write_text(f"#!{sys.executable}\n{body}")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_cli_runs_systemd_run_with_forwarded_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`certmgr --inventory F -v as-service renew NAME` runs systemd-run (a fake on PATH here) with the unit's settings,
    forwards --inventory and -v, and exits with its status; --print shows the command instead."""
    (tmp_path / "unit").write_text(REPO_UNIT)
    fake(tmp_path, "systemctl", f"import sys\nprint(open({str(tmp_path / 'unit')!r}).read())\n")
    fake(tmp_path, "systemd-run", f"import json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv')!r}, 'w'))\n"
                                  "sys.exit(3)\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    inv = tmp_path / "domains.toml"
    res = CliRunner().invoke(main, ["--inventory", str(inv), "-v", "as-service", "renew", "media.hachyderm.io"])
    assert res.exit_code == 3, res.output
    got = json.loads((tmp_path / "argv").read_text())
    piped = ["--pipe" if a == "--pty" else a for a in EXPECTED[1:-2]]  # CliRunner is not a terminal
    assert got == [*piped, "--inventory", str(inv), "-v", "renew", "media.hachyderm.io"]
    shown = CliRunner().invoke(main, ["as-service", "--print", "renew", "--force", "media.hachyderm.io"])
    assert shown.exit_code == 0
    assert shlex.split(shown.output)[-4:] == ["/usr/local/bin/certmgr", "renew", "--force", "media.hachyderm.io"]
