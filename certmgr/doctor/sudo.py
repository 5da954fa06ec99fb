"""Command checks on a POP: test_command passes; reload_command is allowed by sudo (checked with `sudo -n -l`,
never run)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from certmgr import remote as remote_mod
from certmgr.doctor.model import Check, Status, _label, _one_line, _Remote
from certmgr.inventory import Host

# Runs "$@" (an argv from the inventory, passed as positional parameters: never parsed as shell text).
RUN_SH = r"""out=$("$@" 2>&1 </dev/null); rc=$?
printf 'rc=%s\n' "$rc"
printf 'out=%s\n' "$(printf '%s' "$out" | base64 -w0)"
"""
FIND_SH = r"""if command -v -- "$1" >/dev/null 2>&1; then echo found=1; else echo found=0; fi
"""


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


async def _check_test(host: Host, rem: _Remote) -> Check:
    t0 = time.monotonic()
    argv = list(host.test_command)
    if not argv:
        return Check(group="host", name="test-command", subject=host.name, status=Status.FAIL,
                     message="test_command is empty: deploy cannot check the config before reloading",
                     hint=f"set test_command in [defaults] or [hosts.{host.name}]")
    res = await rem.run_script(RUN_SH, argv, step="doctor test_command")
    rc = res.get("rc")
    text = _one_line(remote_mod.b64text(res.get("out") or ""))
    if rc == "0":
        return Check(group="host", name="test-command", subject=host.name, status=Status.OK,
                     message=f"`{_label(argv)}` passes", elapsed=time.monotonic() - t0)
    hint = ("sudo needs a password or does not allow this exact argv: add a NOPASSWD sudoers rule for it"
            if "sudo" in text and ("password" in text or "not allowed" in text)
            else f"fix the web server config on {host.name}; deploy refuses to swap while this fails")
    return Check(group="host", name="test-command", subject=host.name, status=Status.FAIL,
                 message=f"`{_label(argv)}` failed (exit {rc}): \"{text}\"", hint=hint,
                 elapsed=time.monotonic() - t0)


async def _check_reload(host: Host, rem: _Remote) -> Check:
    t0 = time.monotonic()
    argv = list(host.reload_command)

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="host", name="reload-command", subject=host.name, status=status, message=message,
                     hint=hint, elapsed=time.monotonic() - t0)

    if not argv:
        return result(Status.FAIL, "reload_command is empty", f"set reload_command in [hosts.{host.name}]")
    listing = sudo_list_argv(argv)
    if listing is None:
        if argv[0].rsplit("/", 1)[-1] == "sudo":
            return result(Status.FAIL, f"`{' '.join(argv)}` names no command after sudo")
        res = await rem.run_script(FIND_SH, [argv[0]], step="doctor reload_command")
        if res.get("found") != "1":
            return result(Status.FAIL, f"`{argv[0]}` not found on {host.name}", "check reload_command")
        return result(Status.WARNING, f"`{_label(argv)}` is not run through sudo: it cannot be checked without "
                                      f"reloading (its program {argv[0]} exists)")
    res = await rem.run_script(RUN_SH, listing, step="doctor reload_command")
    text = _one_line(remote_mod.b64text(res.get("out") or ""))
    if res.get("rc") == "0":
        return result(Status.OK, f"sudo allows `{_label(argv)}` without a password (checked with sudo -l, "
                                 "not run)")
    return result(Status.FAIL, f"sudo does not allow `{_label(argv)}` without a password (sudo -n -l exit "
                               f"{res.get('rc')}: \"{text}\")",
                  f"add a NOPASSWD sudoers rule for {host.user} with exactly this argv: {' '.join(listing[3:])}")
