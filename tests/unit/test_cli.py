"""The command line: help, version, exit codes and redaction at the edge."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from certmgr import __version__, log
from certmgr.cli import main
from certmgr.errors import DNSError, LockLost, StoreUnavailable
from tests import inv

ROOT = Path(__file__).parents[2]


def test_console_script_installed() -> None:
    """`pip install` of the repo gives a working `certmgr` console script."""
    script = Path(sys.executable).with_name("certmgr")
    if not script.exists():
        pytest.skip("not running from an installed venv")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"certmgr, version {__version__}"


def test_help_lists_built_commands_only() -> None:
    """`certmgr --help` lists the command groups that exist, and nothing pretends."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "inventory" in result.output


def test_inventory_check_ok() -> None:
    """`inventory check` on the repo's example prints a summary and exits 0."""
    # --syntax-only: the example names /etc/certmgr/id_ed25519, which this machine need not have
    result = CliRunner().invoke(main, ["--inventory", str(ROOT / "domains.toml"), "inventory", "check",
                                       "--syntax-only"])
    assert result.exit_code == 0, result.output
    assert "2 certificates (3 names), 5 hosts" in result.output


def test_inventory_errors_exit_2(tmp_path: Path) -> None:
    """An invalid inventory exits 2 and names every key path on stderr."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[hosts.sally]\naddress = "1.2.3.4"\nprot = 22\n')
    result = CliRunner().invoke(main, ["--inventory", str(bad), "inventory", "check"])
    assert result.exit_code == 2
    assert "hosts.sally.prot: unknown key (did you mean 'port'?)" in result.output
    assert "certificates: no certificates defined" in result.output


def test_inventory_env_var(tmp_path: Path) -> None:
    """CERTMGR_INVENTORY selects the inventory when --inventory is not given."""
    result = CliRunner().invoke(main, ["inventory", "check"], env={"CERTMGR_INVENTORY": str(tmp_path / "x.toml")})
    assert result.exit_code == 2
    assert f"file not found: {tmp_path / 'x.toml'}" in result.output


def test_inventory_show_json_redacts() -> None:
    """`inventory show --json` shows secret references, never values."""
    result = CliRunner().invoke(main, ["--inventory", str(ROOT / "domains.toml"), "inventory", "show", "--json"])
    assert result.exit_code == 0
    assert '"tsig_secret": "<secret credential:tsig.key>"' in result.output


def test_secret_values_are_redacted_from_logs(caplog: pytest.LogCaptureFixture) -> None:
    """A registered secret never appears in a formatted log line, and Secret() prints as ***."""
    secret = log.Secret("https://discord.example/api/webhooks/123/abcdef")
    assert str(secret) == "***" and "abcdef" not in repr(secret)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "posting to %s", (secret.reveal(),), None)
    line = log.KVFormatter(timestamps=False).format(record)
    assert "abcdef" not in line and "***" in line


def test_inventory_defaults_to_cwd_then_etc(tmp_path: Path) -> None:
    """Without --inventory, ./domains.toml is used, else /etc/certmgr/domains.toml (what the unit uses)."""
    from certmgr.cli import resolve_inventory

    here, etc = tmp_path / "domains.toml", tmp_path / "etc" / "domains.toml"
    etc.parent.mkdir()
    etc.write_text("")
    assert resolve_inventory(None, (here, etc)) == etc
    here.write_text("")
    assert resolve_inventory(None, (here, etc)) == here
    assert resolve_inventory(tmp_path / "given.toml", (here, etc)) == tmp_path / "given.toml"


def test_missing_inventory_error_names_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no inventory in either place, the error names ./domains.toml and /etc/certmgr/domains.toml (exit 2)."""
    from certmgr.cli import base

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CERTMGR_INVENTORY", raising=False)
    monkeypatch.setattr(base, "DEFAULT_INVENTORIES", (Path("domains.toml"), tmp_path / "etc" / "domains.toml"))
    result = CliRunner().invoke(main, ["inventory", "check"])
    assert result.exit_code == 2
    assert result.output == (
        f"certmgr: error: inventory: neither {tmp_path}/domains.toml nor {tmp_path}/etc/domains.toml exists "
        "(nothing done)\nhint: pass --inventory FILE or set CERTMGR_INVENTORY\n")


def test_inventory_envvar_still_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CERTMGR_INVENTORY is used as given, even when ./domains.toml exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "domains.toml").write_text("this is not toml [")
    given = tmp_path / "given.toml"
    inv.write(given, certificates=[inv.cert("a", domains=["a.example.test"])])
    monkeypatch.setenv("CERTMGR_INVENTORY", str(given))
    monkeypatch.setenv("X", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=")
    result = CliRunner().invoke(main, ["inventory", "check"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{given}: ok")


def _group_raising(exc: BaseException) -> click.Group:
    from certmgr.cli.base import Group

    @click.group(cls=Group)
    def top() -> None:
        pass

    @top.command("boom")
    def boom() -> None:
        raise exc

    return top


@pytest.mark.parametrize(("exc", "code", "first_line"), [
    (ExceptionGroup("unhandled errors in a TaskGroup", [
        StoreUnavailable("store pg: save_state media: database connection lost: terminating connection "
                         "(not written)"),
        DNSError("renew static: cancelled")]),
     69, "certmgr: error: store pg: save_state media: database connection lost: terminating connection "
         "(not written)"),
    (ExceptionGroup("g", [ExceptionGroup("inner", [LockLost("store pg: activate media: lock lost (not written)")])]),
     69, "certmgr: error: store pg: activate media: lock lost (not written)"),
    (ExceptionGroup("g", [DNSError("renew a: x"), DNSError("renew b: y")]), 1, "certmgr: error: renew a: x"),
])
def test_a_group_of_our_errors_exits_with_the_gravest(exc: BaseException, code: int, first_line: str) -> None:
    """Errors raised together by concurrent tasks (a TaskGroup's ExceptionGroup) end like one CertmgrError: the
    gravest's message and exit code (69 when the shared store was lost), never 'internal error (a bug)'."""
    result = CliRunner().invoke(_group_raising(exc), ["boom"])
    assert result.exit_code == code, result.output
    assert result.output.splitlines()[0] == first_line
    assert "internal error" not in result.output


def test_a_group_with_a_bug_in_it_is_a_bug() -> None:
    """An ExceptionGroup holding anything but CertmgrErrors is a bug: traceback, exit 70."""
    result = CliRunner().invoke(_group_raising(ExceptionGroup("g", [DNSError("renew a: x"), KeyError("k")])),
                                ["boom"])
    assert result.exit_code == 70
    assert "certmgr: internal error (a bug)" in result.output
