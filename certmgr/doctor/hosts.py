"""Host checks over SSH: login with a known host key, cert root writable, privkey owner settable; then the
command and served checks of `sudo` and `served`."""

from __future__ import annotations

import re
import secrets
import time

from certmgr import remote as remote_mod
from certmgr import sanitize
from certmgr.deploy import KEYOWN_SH
from certmgr.doctor.model import Check, Connector, Prober, Status, Timeouts, _one_line, _Remote
from certmgr.doctor.served import _check_served
from certmgr.doctor.sudo import _check_reload, _check_test
from certmgr.inventory import Host, Inventory
from certmgr.material import CertInfo
from certmgr.sshlib import asyncssh

# What deploy does to privkey.pem (deploy.KEYOWN_SH, with $2 as owner[:group] or :group), tried on an
# empty temp file in $1.
CHOWN_SH = r"""keyown=$2
""" + KEYOWN_SH + r"""
if ! t=$(mktemp -- "$1/.certmgr-doctor-chown-XXXXXXXX" 2>&1); then
  printf 'rc=create\nout=%s\n' "$(printf '%s' "$t" | base64 -w0)"; exit 0
fi
out=$(keyown "$t" 2>&1)
rc=$?
rm -f -- "$t"
printf 'rc=%s\nout=%s\n' "$rc" "$(printf '%s' "$out" | base64 -w0)"
"""


async def check_host(inv: Inventory, host: Host, out: list[Check], served: list[CertInfo], *,
                     timeouts: Timeouts, connector: Connector, prober: Prober) -> None:
    """SSH with a known host key, cert root writable, test command passes, reload allowed, nginx serves live/.

    Checks are appended to `out` as they finish, so a timeout still leaves the ones already done.
    """
    from certmgr.deploy import sni_names
    from certmgr.errors import DeployError, HostKeyError

    t0 = time.monotonic()
    jump = inv.hosts.get(host.jump) if host.jump else None
    target = f"{host.user}@{host.address}:{host.port}"
    step = ("host", "ssh", host.name)  # the check in progress: a lost connection is reported against it
    try:
        async with connector(host, jump=jump, accept_new=False, timeouts=timeouts.ssh) as rem:
            out.append(Check(group="host", name="ssh", subject=host.name, status=Status.OK,
                             message=f"{target}: logged in, host key known", elapsed=time.monotonic() - t0))
            step = ("host", "write", host.name)
            out.append(await _check_write(host, rem))
            if host.privkey_chown:
                step = ("host", "privkey-owner", host.name)
                out.append(await _check_key_owner(host, rem))
            step = ("host", "test-command", host.name)
            out.append(await _check_test(host, rem))
            step = ("host", "reload-command", host.name)
            out.append(await _check_reload(host, rem))
            for cert in (c for c in inv.certificates if host.name in c.hosts):
                step = ("nginx", "serves-live", f"{host.name} {cert.name}")
                out.append(await _check_served(host, cert, rem, served, sni_names(cert), prober))
    except HostKeyError as exc:
        out.append(Check(group="host", name="ssh", subject=host.name, status=Status.FAIL,
                         message=_strip_outcome(exc.message) + " (nothing else checked on this host)", hint=exc.hint,
                         elapsed=time.monotonic() - t0))
    except (DeployError, asyncssh.Error, OSError) as exc:
        text = exc.message if isinstance(exc, DeployError) else f"{step[1]} {host.name}: {remote_mod.describe_exc(exc)}"
        hint = exc.hint if isinstance(exc, DeployError) else None
        if step[1] == "ssh":
            out.append(Check(group="host", name="ssh", subject=host.name, status=Status.FAIL,
                             message=_strip_outcome(text) + " (nothing else checked on this host)",
                             hint=hint or f"is sshd running on {host.name}? check address and port",
                             elapsed=time.monotonic() - t0))
        else:
            out.append(Check(group=step[0], name=step[1], subject=step[2], status=Status.FAIL,
                             message=f"{_strip_outcome(text)} (later checks on this host not done)", hint=hint,
                             elapsed=time.monotonic() - t0))


def _strip_outcome(message: str) -> str:
    return re.sub(r" \((nothing changed|refused, nothing changed)\)$", "", message)


async def _check_write(host: Host, rem: _Remote) -> Check:
    root = remote_mod.check_remote_path(host.cert_root)
    t0 = time.monotonic()

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="host", name="write", subject=host.name, status=status, message=message, hint=hint,
                     elapsed=time.monotonic() - t0)

    sftp = await rem.sftp()
    where = f"{root}/archive"
    note = ""
    try:
        if not await sftp.isdir(where):
            if not await sftp.isdir(root):
                return result(Status.FAIL, f"cert_root {root} does not exist (deploy creates archive/ and live/ in it, "
                                           "not the root itself)", f"create {root}, owned by {host.user}")
            where, note = root, f"; {root}/archive does not exist yet (deploy creates it)"
        path = f"{where}/.certmgr-doctor-{secrets.token_hex(6)}"
        try:
            async with sftp.open(path, "xb", attrs=asyncssh.SFTPAttrs(permissions=0o600)):
                pass
        except asyncssh.SFTPError as exc:
            return result(Status.FAIL, f"{host.user} cannot create files in {where}: {sanitize.line(exc.reason)}",
                          f"make {where} writable by {host.user} (deploy writes new versions there)")
        try:
            await sftp.remove(path)
        except asyncssh.SFTPError as exc:
            return result(Status.FAIL, f"created {path} but cannot remove it: {sanitize.line(exc.reason)}",
                          f"remove {path} by hand; check permissions of {where}")
    except asyncssh.SFTPError as exc:
        return result(Status.FAIL, f"{where}: {sanitize.line(exc.reason)}")
    status = Status.WARNING if note else Status.OK
    return result(status, f"{host.user} can create and remove files in {where}{note}")


async def _check_key_owner(host: Host, rem: _Remote) -> Check:
    """privkey_owner/privkey_group: the deploy user can give a new file in archive/ that owner and group."""
    t0 = time.monotonic()
    root = remote_mod.check_remote_path(host.cert_root)
    want = host.privkey_chown

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="host", name="privkey-owner", subject=host.name, status=status, message=message,
                     hint=hint, elapsed=time.monotonic() - t0)

    res = await rem.run_script(CHOWN_SH, [f"{root}/archive", want], step="doctor privkey owner")
    text = _one_line(remote_mod.b64text(res.get("out") or ""))
    if res.get("rc") == "create":
        return result(Status.WARNING, f"not tried: no temp file in {root}/archive: \"{text}\"",
                      "see the write check; deploy creates archive/")
    if res.get("rc") == "0":
        return result(Status.OK, f"{host.user} can give privkey.pem to {want.lstrip(':')}")
    return result(Status.FAIL, f"{host.user} cannot give privkey.pem to {want.lstrip(':')}: \"{text}\" "
                               "(every deploy to this host would fail)",
                  "a deploy user that is not root can only give files to a group it belongs to: add it to that "
                  f"group, or change privkey_owner/privkey_group of {host.name}")
