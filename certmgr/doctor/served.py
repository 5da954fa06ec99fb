"""Served vs live: nginx serves, for every SNI name, the leaf in `<cert_root>/live/<name>/fullchain.pem`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from cryptography import x509

from certmgr import remote as remote_mod
from certmgr import sanitize
from certmgr.doctor.model import Check, Prober, Status, _Remote
from certmgr.inventory import Certificate, Host
from certmgr.material import CertInfo, split_pem
from certmgr.sshlib import asyncssh


class _ProbeLike(Protocol):
    @property
    def ok(self) -> bool: ...

    chain: tuple[bytes, ...]
    error: str | None


def served_check(host: Host, cert: Certificate, live_path: str, live: CertInfo | None,
                 probes: Mapping[str, _ProbeLike]) -> Check:
    """Does nginx on `host` serve, for every SNI name, the leaf in `<cert_root>/live/<name>/fullchain.pem`?"""
    subject = f"{host.name} {cert.name}"
    if live is None:
        return Check(group="nginx", name="serves-live", subject=subject, status=Status.WARNING,
                     message=f"{live_path} does not exist yet: nothing to compare what nginx serves with",
                     hint=f"run `certmgr deploy {cert.name}` once")
    bad: list[str] = []
    unreachable: list[str] = []
    for sni, p in probes.items():
        if not p.ok:
            unreachable.append(f"{sni}: {p.error or 'no certificate'}")
            continue
        try:
            served = CertInfo.from_der(p.chain[0])
        except ValueError:
            bad.append(f"{sni}: unparseable certificate")
            continue
        if served.sha256 != live.sha256:
            bad.append(f"{sni}: serial {served.serial}")
    if unreachable:
        return Check(group="nginx", name="serves-live", subject=subject, status=Status.FAIL,
                     message=f"no handshake with {host.address}:{host.https_port} ({'; '.join(unreachable)})",
                     hint=f"is nginx running on {host.name} and listening on port {host.https_port}?")
    if bad:
        return Check(group="nginx", name="serves-live", subject=subject, status=Status.FAIL,
                     message=f"nginx serves another certificate than {live_path} (serial {live.serial}): "
                             f"{', '.join(bad)}; it reads another path, or was not reloaded",
                     hint=f"on {host.name}, point ssl_certificate/ssl_certificate_key for {', '.join(probes)} at "
                          f"{live_path} and {live_path.rsplit('/', 1)[0]}/privkey.pem (check with `nginx -T`), "
                          "then reload")
    return Check(group="nginx", name="serves-live", subject=subject, status=Status.OK,
                 message=f"serves {live_path} (serial {live.serial}) for {', '.join(probes)}")


async def _check_served(host: Host, cert: Certificate, rem: _Remote, served: list[CertInfo],
                        names: Sequence[str], prober: Prober) -> Check:
    t0 = time.monotonic()
    root = remote_mod.check_remote_path(host.cert_root)
    live_path = f"{root}/live/{remote_mod.check_name(cert.name)}/fullchain.pem"
    probes_task = asyncio.ensure_future(asyncio.gather(*(prober(host.address, host.https_port, n) for n in names)))
    live: CertInfo | None = None
    problem: str | None = None
    try:
        sftp = await rem.sftp()
        try:
            async with sftp.open(live_path, "rb") as f:
                data = await f.read(1 << 20)
            pems = split_pem(data if isinstance(data, bytes) else data.encode())
            if not pems:
                problem = f"{live_path} holds no PEM certificate"
            else:
                live = CertInfo.from_cert(x509.load_pem_x509_certificate(pems[0]))
        except asyncssh.SFTPNoSuchFile:
            live = None
        except asyncssh.SFTPError as exc:
            problem = f"cannot read {live_path}: {sanitize.line(exc.reason)}"
        except ValueError as exc:
            problem = f"{live_path} does not parse: {sanitize.line(str(exc))}"
        probes = await probes_task
    finally:
        if not probes_task.done():
            probes_task.cancel()
    for p in probes:
        if p.ok:
            try:
                served.append(CertInfo.from_der(p.chain[0]))
            except ValueError:
                pass
    if problem is not None:
        return Check(group="nginx", name="serves-live", subject=f"{host.name} {cert.name}", status=Status.FAIL,
                     message=problem, elapsed=time.monotonic() - t0)
    chk = served_check(host, cert, live_path, live, dict(zip(names, probes, strict=True)))
    return Check(group=chk.group, name=chk.name, subject=chk.subject, status=chk.status, message=chk.message,
                 hint=chk.hint, elapsed=time.monotonic() - t0)
