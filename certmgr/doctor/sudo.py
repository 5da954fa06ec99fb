"""Command checks on a POP: test_command passes; reload_command is allowed by sudo (checked with `sudo -n -l`,
never run)."""

from __future__ import annotations

import time
from collections.abc import Callable

from certmgr import remote as remote_mod
from certmgr.deploy import reload as reload_mod
from certmgr.deploy.reload import sudo_list_argv as sudo_list_argv  # its home is deploy now
from certmgr.doctor.model import Check, Status, _label, _one_line, _Remote
from certmgr.inventory import Host

# Runs "$@" (an argv from the inventory, passed as positional parameters: never parsed as shell text).
RUN_SH = r"""out=$("$@" 2>&1 </dev/null); rc=$?
printf 'rc=%s\n' "$rc"
printf 'out=%s\n' "$(printf '%s' "$out" | base64 -w0)"
"""
FIND_SH = r"""if command -v -- "$1" >/dev/null 2>&1; then echo found=1; else echo found=0; fi
"""


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
    if host.reload_fallback and listing is not None:
        return await _check_default_reload(host, rem, result)
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
                  f"add `{reload_mod.sudoers_line(host.user, argv)}` to sudoers (it matches the argv exactly)")


async def _check_default_reload(host: Host, rem: _Remote, result: Callable[..., Check]) -> Check:
    """reload_command is the built-in default (SIGHUP by pkill): is it allowed, or does deploy fall back to the
    old default (`systemctl reload nginx`) on this host? Asked as deploy asks (deploy/reload.py), nothing run."""
    v = await reload_mod.probe(rem, host)
    label, old = _label(list(host.reload_command)), _label(list(host.reload_fallback))
    line = reload_mod.sudoers_line(host.user, host.reload_command)
    if v.default_ok and v.pid_file_ok:
        return result(Status.OK, f"sudo allows `{label}` without a password (checked with sudo -l, not run)")
    _, note = reload_mod.choose(host, v)
    pid = reload_mod.pid_file(host.reload_command)
    pid_hint = (f"nginx is down, or its pid file is not {pid} (the `pid` directive, or `nginx -V`'s --pid-path): "
                "set reload_command with that path and allow it in sudoers")
    if note is not None:
        hint = f"add `{line}` to sudoers (docs/deploy.md, \"Reload\")" if not v.default_ok else pid_hint
        return result(Status.WARNING, f"deploy reloads with the old default `{old}`: {v.why_not(host)}", hint)
    if v.default_ok:  # allowed, but the pid file is missing and the old default is not allowed either
        return result(Status.WARNING, f"sudo allows `{label}`, but {v.why_not(host)}", pid_hint)
    return result(Status.FAIL, f"sudo allows neither `{label}` nor the old default `{old}` without a password "
                               "(sudo -n -l): deploy's reload will fail and switch back",
                  f"add `{line}` to sudoers (docs/deploy.md, \"Reload\")")
