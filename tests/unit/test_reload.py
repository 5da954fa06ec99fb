"""Unit tests for the default reload and its fallback (deploy/reload.py): when the inventory gives a host a
fallback, which argv a verdict chooses, the kept verdict, the audit line once, and doctor's reload check."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from certmgr import doctor
from certmgr import inventory as inventory_mod
from certmgr.deploy import reload as reload_mod
from certmgr.deploy.host import Deployer
from certmgr.deploy.shell import RELOADPROBE_SH
from certmgr.doctor.model import Status as DStatus
from certmgr.model import DEFAULT_RELOAD, LEGACY_RELOAD, Host
from certmgr.remote import Result, parse_kv
from certmgr.store import Store
from tests import inv as invb

OLD = ("sudo", "-n", "/usr/sbin/nginx", "-s", "reload")
LINE = "certmgr ALL=(root) NOPASSWD: /usr/bin/pkill -HUP -F /run/nginx.pid -x nginx"


@pytest.mark.parametrize(("defaults", "host", "reload", "fallback"), [
    ({}, {}, DEFAULT_RELOAD, LEGACY_RELOAD),
    ({"reload_command": list(OLD)}, {}, OLD, ()),
    ({}, {"reload_command": list(OLD)}, OLD, ()),
    ({}, {"reload_command": list(DEFAULT_RELOAD)}, DEFAULT_RELOAD, ()),  # spelled out: explicit, never doubted
])
def test_only_a_reload_command_left_to_its_default_gets_the_old_default_as_fallback(
        defaults: dict[str, Any], host: dict[str, Any], reload: tuple[str, ...], fallback: tuple[str, ...]) -> None:
    """reload_command defaults to SIGHUP by pkill; the old `systemctl reload nginx` is its fallback only when
    neither [defaults] nor [hosts.X] sets reload_command."""
    text = invb.toml(defaults=defaults or None, hosts={"sally": {"address": "127.0.0.1", **host}},
                     certificates=[invb.cert("example.test", "sally", dns="x")])
    h = inventory_mod.loads(text).hosts["sally"]
    assert (h.reload_command, h.reload_fallback) == (reload, fallback)


def test_the_defaults_are_the_documented_argv() -> None:
    """The default and the old default, word for word (docs/deploy.md and docs/security.md show these)."""
    assert DEFAULT_RELOAD == ("sudo", "-n", "pkill", "-HUP", "-F", "/run/nginx.pid", "-x", "nginx")
    assert LEGACY_RELOAD == ("sudo", "-n", "systemctl", "reload", "nginx")


@pytest.mark.parametrize(("argv", "line"), [
    (DEFAULT_RELOAD, LINE),
    (LEGACY_RELOAD, "certmgr ALL=(root) NOPASSWD: /usr/bin/systemctl reload nginx"),
    (("sudo", "-n", "nginx", "-t"), "certmgr ALL=(root) NOPASSWD: /usr/sbin/nginx -t"),
    (("sudo", "-n", "-u", "root", "/usr/local/bin/pkill", "-HUP", "-F", "/x.pid", "-x", "nginx"),
     "certmgr ALL=(root) NOPASSWD: /usr/local/bin/pkill -HUP -F /x.pid -x nginx"),
])
def test_sudoers_line_names_the_program_by_full_path(argv: tuple[str, ...], line: str) -> None:
    """The recommended sudoers line spells the argv with its program's full path, as sudoers requires."""
    assert reload_mod.sudoers_line("certmgr", argv) == line


@pytest.mark.parametrize(("argv", "path"), [
    (DEFAULT_RELOAD, "/run/nginx.pid"), (("pkill", "--pidfile=/a.pid"), "/a.pid"),
    (("pkill", "--pidfile", "/b.pid"), "/b.pid"), (LEGACY_RELOAD, ""),
])
def test_pid_file_of_a_reload_argv(argv: tuple[str, ...], path: str) -> None:
    """The pid file a pkill argv signals through ("" for one that names none)."""
    assert reload_mod.pid_file(argv) == path


HOST = Host(name="sally", address="127.0.0.1", reload_command=DEFAULT_RELOAD, reload_fallback=LEGACY_RELOAD)


@pytest.mark.parametrize(("default_ok", "pid_ok", "fallback_ok", "argv", "why"), [
    (True, True, True, DEFAULT_RELOAD, None),
    (True, True, False, DEFAULT_RELOAD, None),
    (False, True, True, LEGACY_RELOAD, "sudo does not allow `pkill -HUP -F /run/nginx.pid -x nginx` without a "
                                       "password"),
    (True, False, True, LEGACY_RELOAD, "pid file /run/nginx.pid not found (another `pid` path in nginx.conf?)"),
    (False, True, False, DEFAULT_RELOAD, None),  # neither: the default fails at the reload, naming what to add
    (True, False, False, DEFAULT_RELOAD, None),
])
def test_choose(default_ok: bool, pid_ok: bool, fallback_ok: bool, argv: tuple[str, ...], why: str | None) -> None:
    """The default when sudo allows it and its pid file exists; else the old default when sudo allows that."""
    got, note = reload_mod.choose(HOST, reload_mod.Verdict(default_ok=default_ok, pid_file_ok=pid_ok,
                                                             fallback_ok=fallback_ok))
    assert got == argv
    assert note == (None if why is None else f"reloaded with the old default `systemctl reload nginx`: {why}; add "
                                              f"`{LINE}` to sudoers (docs/deploy.md, \"Reload\")")


class Pop:
    """A POP that answers the reload probe from what its sudo allows (argv joined by spaces) and its pid file."""

    def __init__(self, allowed: set[str], pid: bool = True) -> None:
        self.allowed, self.pid, self.calls = allowed, pid, 0

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result:
        assert script == RELOADPROBE_SH and step == "reload probe"
        self.calls += 1
        pidfile, default, fallback = args

        def rc(listing: str) -> str:  # `sudo -n -l CMD…` → 0 when CMD… is allowed
            words = shlex.split(listing)
            assert words[:3] == ["sudo", "-n", "-l"]
            return "0" if " ".join(words[3:]) in self.allowed else "1"

        out = f"pidfile={int(self.pid or not pidfile)}\ndefault_rc={rc(default)}\n"
        out += f"fallback_rc={rc(fallback)}\n" if fallback else ""
        return Result(exit_status=0, stdout=out, stderr="", fields=parse_kv(out))


def deployer(store: Store) -> Deployer:
    d = Deployer.__new__(Deployer)  # only what reload.resolve uses: the store and audit()
    d.store = store
    return d


NEW, OLDCMD = " ".join(DEFAULT_RELOAD[2:]), " ".join(LEGACY_RELOAD[2:])


def test_resolve_keeps_allowed_asks_again_while_falling_back_and_audits_changes(tmp_path: Path) -> None:
    """A kept "allowed" means no probe; a fallback is asked about on every deploy, noted each time, audited once;
    an explicit reload_command is never asked about."""
    store = Store.open(tmp_path / "state")
    d = deployer(store)

    async def go(pop: Pop, host: Host = HOST) -> tuple[tuple[str, ...], str | None]:
        return await reload_mod.resolve(d, pop, host)

    legacy_only = Pop({OLDCMD})
    for _ in range(2):
        argv, note = asyncio.run(go(legacy_only))
        assert argv == LEGACY_RELOAD and note is not None
    assert legacy_only.calls == 2
    both = Pop({NEW, OLDCMD})
    for _ in range(3):
        assert asyncio.run(go(both)) == (DEFAULT_RELOAD, None)
    assert both.calls == 1
    explicit = Pop(set())
    assert asyncio.run(go(explicit, Host(name="sally", address="127.0.0.1", reload_command=OLD))) == (OLD, None)
    assert explicit.calls == 0
    rows = [json.loads(ln) for ln in (Path(store.root) / "audit.log").read_text().splitlines()]
    assert [(r["action"], r["to"]) for r in rows] == [("reload fallback", " ".join(LEGACY_RELOAD)),
                                                       ("reload default", " ".join(DEFAULT_RELOAD))]
    kept = store.load_json("state/reload/sally.json")
    assert (kept["allowed"], kept["argv"]) == (True, list(DEFAULT_RELOAD))
    asyncio.run(reload_mod.forget(d, HOST))
    assert asyncio.run(go(both)) == (DEFAULT_RELOAD, None)
    assert both.calls == 2  # forgotten: asked again


def test_first_deploy_allowed_audits_nothing(tmp_path: Path) -> None:
    """A host that allows the default from the start is the normal case: kept, not audited."""
    store = Store.open(tmp_path / "state")
    assert asyncio.run(reload_mod.resolve(deployer(store), Pop({NEW}), HOST)) == (DEFAULT_RELOAD, None)
    assert not (Path(store.root) / "audit.log").exists() or "reload" not in (Path(store.root) / "audit.log").read_text()


@pytest.mark.parametrize(("pop", "status", "message", "hint"), [
    (Pop({NEW, OLDCMD}), DStatus.OK, "sudo allows `pkill -HUP nginx` without a password (checked with sudo -l, not "
                                     "run)", None),
    (Pop({OLDCMD}), DStatus.WARNING, "deploy reloads with the old default `systemctl reload nginx`: sudo does not "
                                     f"allow `{NEW}` without a password",
     f"add `{LINE}` to sudoers (docs/deploy.md, \"Reload\")"),
    (Pop({NEW, OLDCMD}, pid=False), DStatus.WARNING, "deploy reloads with the old default `systemctl reload nginx`: "
                                                     "pid file /run/nginx.pid not found (another `pid` path in "
                                                     "nginx.conf?)",
     "nginx is down, or its pid file is not /run/nginx.pid (the `pid` directive, or `nginx -V`'s --pid-path): set "
     "reload_command with that path and allow it in sudoers"),
    (Pop({NEW}, pid=False), DStatus.WARNING, "sudo allows `pkill -HUP nginx`, but pid file /run/nginx.pid not found "
                                             "(another `pid` path in nginx.conf?)",
     "nginx is down, or its pid file is not /run/nginx.pid (the `pid` directive, or `nginx -V`'s --pid-path): set "
     "reload_command with that path and allow it in sudoers"),
    (Pop(set()), DStatus.FAIL, "sudo allows neither `pkill -HUP nginx` nor the old default `systemctl reload nginx` "
                               "without a password (sudo -n -l): deploy's reload will fail and switch back",
     f"add `{LINE}` to sudoers (docs/deploy.md, \"Reload\")"),
])
def test_doctor_on_a_default_reload(pop: Pop, status: DStatus, message: str, hint: str | None) -> None:
    """doctor asks as deploy does (sudo -n -l, nothing run) and recommends the sudoers line for the default."""
    host = Host(name="sally", address="127.0.0.1", user="certmgr", reload_command=DEFAULT_RELOAD,
                reload_fallback=LEGACY_RELOAD)
    got = asyncio.run(doctor._check_reload(host, pop))  # type: ignore[arg-type]
    assert (got.status, got.message, got.hint) == (status, message, hint)


def test_state_time_is_utc(tmp_path: Path) -> None:
    """The kept verdict says when it was asked, in UTC."""
    store = Store.open(tmp_path / "state")
    asyncio.run(reload_mod.resolve(deployer(store), Pop({NEW}), HOST))
    at = dt.datetime.fromisoformat(store.load_json("state/reload/sally.json")["at"])
    assert at.utcoffset() == dt.timedelta(0)


# ---------------------------------------------------------------------------- discover: the pid path

_PID_DUMP = """# configuration file /etc/nginx/nginx.conf:
user www-data;
pid {pid};
events {{}}
http {{ server {{ server_name a.example.org; }} }}
"""


@pytest.mark.parametrize(("pid", "want"), [("/var/run/nginx/nginx.pid", "/var/run/nginx/nginx.pid"),
                                           ("logs/nginx.pid", "/etc/nginx/logs/nginx.pid")])
def test_discover_reads_the_pid_directive(pid: str, want: str) -> None:
    """The main context's `pid` directive, resolved against nginx's prefix like every relative path."""
    from certmgr.discover.nginxconf import parse_dump

    assert parse_dump(_PID_DUMP.format(pid=pid)).pid == want


def test_discover_has_no_pid_without_the_directive() -> None:
    """No `pid` directive: nginx's compiled-in path, which the dump does not show."""
    from certmgr.discover.nginxconf import parse_dump

    assert parse_dump(_PID_DUMP.replace("pid {pid};\n", "")).pid is None


def test_stub_keeps_a_default_reload_implicit_and_spells_out_another_pid_path() -> None:
    """The stub leaves a defaulted reload_command out (its fallback keeps working) unless the host's nginx writes its
    pid elsewhere: then the default argv with that file, a `# guess:` with the sudoers line; explicit ones as given."""
    from certmgr.discover import stub

    text = invb.toml(hosts={"a": {"address": "127.0.0.1"}, "b": {"address": "127.0.0.2"},
                            "c": {"address": "127.0.0.3", "reload_command": list(OLD)},
                            "d": {"address": "127.0.0.4"}},
                     certificates=[invb.cert("example.test", "a", dns="x")])
    inv = inventory_mod.loads(text)
    out = stub.render(inv, [stub.StubCert(name="example.test", domains=("example.test",), hosts=("a",))],
                      pids={"b": "/run/nginx/nginx.pid", "d": "/run/nginx.pid"})
    back = inventory_mod.loads(out)
    assert [(back.hosts[h].reload_command, back.hosts[h].reload_fallback) for h in "abcd"] == [
        (DEFAULT_RELOAD, LEGACY_RELOAD),
        (("sudo", "-n", "pkill", "-HUP", "-F", "/run/nginx/nginx.pid", "-x", "nginx"), ()),
        (OLD, ()), (DEFAULT_RELOAD, LEGACY_RELOAD)]
    assert ("# guess: reload_command: nginx on b writes its pid to /run/nginx/nginx.pid (its `pid` directive), not "
            "/run/nginx.pid: the default reload with that file; allow it in sudoers: `certmgr ALL=(root) NOPASSWD: "
            "/usr/bin/pkill -HUP -F /run/nginx/nginx.pid -x nginx` (set here, it has no fallback to `systemctl reload "
            "nginx`)\n[hosts.b]") in out
