"""Which reload argv a deploy runs on a host: its `reload_command`, or — when that is the built-in default
(SIGHUP by pkill) and the host's sudo refuses it — the old default (`Host.reload_fallback`), so a POP whose
sudoers allows only `systemctl reload nginx` keeps deploying after an upgrade. An explicit reload_command is
never second-guessed.

Asked with `sudo -n -l ARGV` (its exit status, not its localized text), on the POP, only before a commit. A
"default allowed" verdict is kept per host (`state/reload/<host>.json`) for that exact argv: the steady state
costs no extra process. A fallback is not kept: while it lasts each deploy asks again (one `sudo -l`), so the
deploy after the sudoers line is added uses the default; it is audited once, when it starts or ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from certmgr.deploy.shell import RELOADPROBE_SH
from certmgr.errors import CertmgrError
from certmgr.log import event
from certmgr.model import Host
from certmgr.remote import Result

if TYPE_CHECKING:
    from certmgr.deploy.host import Deployer

logger = logging.getLogger(__name__)

STATE_DIR = "state/reload"


class Runner(Protocol):
    """Runs one script on the host (deploy's session, doctor's connection)."""

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result: ...


def sudo_list_argv(argv: Sequence[str]) -> list[str] | None:
    """`sudo [opts] CMD ARGS` → `sudo -n -l [-u U] [-g G] CMD ARGS` (asks whether it is allowed, runs nothing).

    None when `argv` is not a sudo command or has no command after the options.
    """
    if not argv or argv[0].rsplit("/", 1)[-1] != "sudo":
        return None
    with_arg = {"-C", "-D", "-g", "-h", "-p", "-R", "-r", "-t", "-T", "-U", "-u"}
    keep: list[str] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            if name in ("--user", "--group"):
                if not eq:
                    i += 1
                    val = argv[i] if i < len(argv) else ""
                keep += ["-u" if name == "--user" else "-g", val]
            elif name in ("--close-from", "--chdir", "--host", "--prompt", "--chroot", "--role", "--type",
                          "--command-timeout", "--other-user") and not eq:
                i += 1
            i += 1
            continue
        if a.startswith("-") and len(a) > 1:
            if a in with_arg:
                if a in ("-u", "-g") and i + 1 < len(argv):
                    keep += [a, argv[i + 1]]
                i += 2
                continue
            if len(a) > 2 and a[:2] in with_arg:  # -uroot
                if a[:2] in ("-u", "-g"):
                    keep += [a[:2], a[2:]]
            i += 1
            continue
        break
    cmd = list(argv[i:])
    if not cmd:
        return None
    return [argv[0], "-n", "-l", *keep, *cmd]


def pid_file(argv: Sequence[str]) -> str:
    """The pid file a `pkill -F FILE` / `--pidfile FILE` argv signals through ("" when it names none)."""
    for i, a in enumerate(argv):
        if a in ("-F", "--pidfile") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--pidfile="):
            return a.partition("=")[2]
    return ""


def sudoers_line(user: str, argv: Sequence[str]) -> str:
    """The sudoers line that allows `argv` (a `sudo … CMD ARGS` argv) to `user`; sudoers wants CMD's full path:
    pkill and systemctl are in /usr/bin, nginx in /usr/sbin (Debian, Ubuntu, RHEL)."""
    listing = sudo_list_argv(argv)
    cmd = list(listing[3:] if listing else argv)
    while cmd and cmd[0] in ("-u", "-g"):
        cmd = cmd[2:]
    if cmd and "/" not in cmd[0]:
        cmd[0] = {"nginx": "/usr/sbin/nginx"}.get(cmd[0], f"/usr/bin/{cmd[0]}")
    return f"{user} ALL=(root) NOPASSWD: {' '.join(cmd)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What `sudo -n -l` said on a host about its default reload and its fallback."""

    default_ok: bool
    pid_file_ok: bool  # the pid file the default signals exists (False: nginx down, or another pid path)
    fallback_ok: bool | None  # None: not asked

    def why_not(self, host: Host) -> str:
        """Why the default is not used (only meaningful when it is not)."""
        argv = " ".join(host.reload_command[2:])
        if not self.default_ok:
            return f"sudo does not allow `{argv}` without a password"
        return f"pid file {pid_file(host.reload_command)} not found (another `pid` path in nginx.conf?)"


def choose(host: Host, v: Verdict) -> tuple[tuple[str, ...], str | None]:
    """The argv to reload with, and the note when it is the fallback (None: the configured/default one)."""
    if (v.default_ok and v.pid_file_ok) or not v.fallback_ok:
        # allowed; or neither is allowed: the default fails at the reload, switched back, naming the argv to add
        return host.reload_command, None
    return host.reload_fallback, (f"reloaded with the old default `{' '.join(host.reload_fallback[2:])}`: "
                                  f"{v.why_not(host)}; add `{sudoers_line(host.user, host.reload_command)}` to "
                                  "sudoers (docs/deploy.md, \"Reload\")")


async def probe(rem: Runner, host: Host) -> Verdict:
    """Ask the host's sudo (`sudo -n -l`, runs nothing) about its default reload and its fallback."""
    default = sudo_list_argv(host.reload_command)
    fallback = sudo_list_argv(host.reload_fallback)
    if default is None:  # the built-in default is a sudo argv; a bare one is never second-guessed
        return Verdict(default_ok=True, pid_file_ok=True, fallback_ok=None)
    res = await rem.run_script(RELOADPROBE_SH, [pid_file(host.reload_command), shlex.join(default),
                                                shlex.join(fallback) if fallback else ""], step="reload probe")
    fb = res.get("fallback_rc")
    return Verdict(default_ok=res.get("default_rc") == "0", pid_file_ok=res.get("pidfile") != "0",
                   fallback_ok=None if fb is None else fb == "0")


def _path(host: Host) -> str:
    return f"{STATE_DIR}/{host.name}.json"


def _load(d: Deployer, host: Host) -> dict[str, Any]:
    if d.store is None:
        return {}
    try:
        doc = d.store.load_json(_path(host), default={})
    except CertmgrError as exc:
        logger.warning("reload state %s: %s (asking the host again)", host.name, exc)
        return {}
    return doc if isinstance(doc, dict) else {}


def _save(d: Deployer, host: Host, doc: dict[str, Any]) -> None:
    if d.store is None:
        return
    try:
        d.store.save_json(_path(host), doc)
    except CertmgrError as exc:
        logger.warning("reload state %s: %s", host.name, exc)


async def resolve(d: Deployer, rem: Runner, host: Host) -> tuple[tuple[str, ...], str | None]:
    """The reload argv for this host's commit, and the note to report when it is the fallback.

    No fallback (an explicit reload_command): that argv, nothing asked. Else the kept verdict when it says this
    exact default is allowed; else the host is asked, and a change of verdict audited.
    """
    if not host.reload_fallback:
        return host.reload_command, None
    kept = await asyncio.to_thread(_load, d, host)
    if kept.get("allowed") is True and kept.get("argv") == list(host.reload_command):
        return host.reload_command, None
    verdict = await probe(rem, host)
    argv, note = choose(host, verdict)
    allowed = note is None and verdict.default_ok and verdict.pid_file_ok
    doc = {"argv": list(host.reload_command), "allowed": allowed, "using": list(argv), "note": note,
           "at": dt.datetime.now(dt.UTC).isoformat()}
    await asyncio.to_thread(_save, d, host, doc)
    if note is not None:
        event(logger, logging.WARNING, "reload fallback", host=host.name, why=note)
    if kept.get("using") != doc["using"] and (note is not None or kept):
        what = "reload fallback" if note is not None else "reload default"
        summary = (f"{host.name}: {note}" if note is not None else
                   f"{host.name}: reloads with the default `{' '.join(host.reload_command[2:])}` (sudo allows it)")
        await d.audit(what, host.name, host=host.name, to=" ".join(argv), summary=summary)
    return argv, note


async def forget(d: Deployer, host: Host) -> None:
    """The kept "default allowed" verdict no longer holds (the default's reload failed): ask on the next deploy."""
    if not host.reload_fallback:
        return
    kept = await asyncio.to_thread(_load, d, host)
    if kept.get("allowed") is True:
        kept["allowed"] = False
        await asyncio.to_thread(_save, d, host, kept)
