"""Doctor: check all a run will need — inventory, store, CAs, TSIG keys, POPs, nginx, timer — before it is needed.

Read-only: no DNS update, no reload, no ACME account is ever created; on a POP only empty temp files are
created and removed (to prove the cert root is writable, and that privkey_owner/privkey_group can be set).
Every check is a result; one failing stops nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import asyncssh
from cryptography import x509

from certmgr import remote as remote_mod
from certmgr import sanitize
from certmgr.deploy import KEYOWN_SH
from certmgr.dns import registry as dns_registry
from certmgr.errors import CertmgrError, InventoryError, StoreError
from certmgr.inventory import CA, Certificate, DNSProvider, Host, Inventory
from certmgr.log import event
from certmgr.material import CertInfo, split_pem
from certmgr.store_api import StateStore
from certmgr.timer import SYSTEMD_DIRS, TIMER_UNIT, find_timer_files, parse_timer, timer_interval

logger = logging.getLogger(__name__)

RUNS_PER_WINDOW = 4  # the timer must fire at least this often inside the shortest renewal window
GROUPS = ("inventory", "store", "ca", "dns", "host", "nginx", "timer")


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAIL = "fail"


_RANK = {Status.OK: 0, Status.WARNING: 1, Status.FAIL: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One finding: which check, about what, how it went, in one line, and what to do about it."""

    group: str  # one of GROUPS
    name: str  # e.g. "tsig", "ssh", "write", "test-command", "reload-command", "serves-live", "interval"
    subject: str  # what was checked: a CA, "dns.lab hachyderm.test", a host, "sally media.hachyderm.test"
    status: Status
    message: str
    hint: str | None = None
    elapsed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "subject": self.subject, "status": self.status.value,
                "message": self.message, "hint": self.hint, "elapsed_ms": round(self.elapsed * 1000, 1)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every check of one doctor run, in display order; exit 0 all ok, 1 warnings, 2 failures."""

    checks: tuple[Check, ...]
    elapsed: float = 0.0

    @property
    def status(self) -> Status:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=Status.OK)

    @property
    def exit_code(self) -> int:
        return _RANK[self.status]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for c in self.checks:
            out[c.status.value] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "exit_code": self.exit_code, "counts": self.counts(),
                "elapsed_ms": round(self.elapsed * 1000, 1), "checks": [c.to_json() for c in self.checks]}


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Every wait of a doctor run (seconds); `check` bounds one whole task (a CA, a zone, a host)."""

    check: float = 60.0
    acme_http: float = 10.0
    dns: float = 5.0
    ssh: remote_mod.Timeouts = field(default_factory=lambda: remote_mod.Timeouts(connect=10.0, command=30.0,
                                                                                  upload=15.0))
    handshake: float = 5.0


def _human(seconds: float) -> str:
    """`86400` → `24h`, `129600` → `1.5d`, `5400` → `1.5h`, `90` → `90s`."""
    if seconds >= 2 * 86400:
        v, u = seconds / 86400, "d"
    elif seconds >= 3600:
        v, u = seconds / 3600, "h"
    elif seconds >= 60:
        v, u = seconds / 60, "m"
    else:
        v, u = seconds, "s"
    return f"{v:.1f}".rstrip("0").rstrip(".") + u


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifetime:
    """How long one certificate lives, and where that was seen."""

    cert: str
    lifetime: dt.timedelta
    source: str  # "store", "last scan", "served"


def renewal_window(cert: Certificate, lifetime: dt.timedelta) -> float:
    """Seconds before expiry at which renewal starts (plan's rule: renew_before, else 1/3, 1/2 under 10 days)."""
    from certmgr.plan import renew_before_seconds

    return renew_before_seconds(cert, lifetime)[0]


def interval_check(interval: float | None, where: str, lifetimes: Sequence[Lifetime],
                   certs: Mapping[str, Certificate]) -> Check:
    """The timer rule: a run at least every min(1/4 lifetime, 1/4 renewal window) of every known certificate.

    1/4 of the lifetime alone would let a daily timer pass for a 6-day certificate (36 h), which then gets
    only 3 runs in its 3-day renewal window; four chances inside the window is what the rule is for.
    """
    if interval is None:
        return Check(group="timer", name="interval", subject=where, status=Status.FAIL,
                     message="the timer never repeats (no OnCalendar= or OnUnitActiveSec=)",
                     hint="give certmgr.timer an OnCalendar= (see systemd/certmgr.timer)")
    if not lifetimes:
        return Check(group="timer", name="interval", subject=where, status=Status.OK,
                     message=f"runs at least every {_human(interval)}; no certificate lifetime known yet "
                             "(nothing live in the store, no scan, nothing served)")
    worst: tuple[float, Lifetime, float] | None = None
    for lt in lifetimes:
        cert = certs.get(lt.cert)
        life = lt.lifetime.total_seconds()
        window = renewal_window(cert, lt.lifetime) if cert is not None else life / 3
        allowed = min(life, window) / RUNS_PER_WINDOW
        if worst is None or allowed < worst[0]:
            worst = (allowed, lt, min(life, window))
    assert worst is not None
    allowed, lt, window = worst
    what = (f"{lt.cert} lives {_human(lt.lifetime.total_seconds())} ({lt.source}) and renews in its last "
            f"{_human(window)}")
    if interval > allowed:
        return Check(group="timer", name="interval", subject=where, status=Status.FAIL,
                     message=f"interval {_human(interval)} is too long: {what}, which needs a run at least every "
                             f"{_human(allowed)} ({RUNS_PER_WINDOW} chances inside the window)",
                     hint="run certmgr more often: install systemd/certmgr.timer.d/twice-daily.conf (or a shorter "
                          "OnCalendar=) as a drop-in, then `systemctl daemon-reload`")
    return Check(group="timer", name="interval", subject=where, status=Status.OK,
                 message=f"runs at least every {_human(interval)}; {what}, which needs at most {_human(allowed)}")


# ============================================================================ served vs live (pure)


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


# ============================================================================ inventory, store


def check_inventory(path: Path) -> tuple[Check, Inventory | None]:
    """Load and validate the inventory; a failure lists every problem (the rest of doctor cannot run)."""
    from certmgr import inventory as inventory_mod

    try:
        inv = inventory_mod.load(path)
    except InventoryError as exc:
        return Check(group="inventory", name="inventory", subject=str(path), status=Status.FAIL,
                     message="; ".join(exc.problems),
                     hint="fix these, then rerun `certmgr doctor` (`certmgr inventory check` lists them too)"), None
    names = sum(len(c.domains) for c in inv.certificates)
    if inv.warnings:  # valid but risky settings, as `inventory check` prints them
        return Check(group="inventory", name="inventory", subject=str(path), status=Status.WARNING,
                     message="; ".join(inv.warnings),
                     hint="docs/inventory.md says why each matters (`certmgr inventory check` lists them too)"), inv
    return Check(group="inventory", name="inventory", subject=str(path), status=Status.OK,
                 message=f"{_n(len(inv.certificates), 'certificate')} ({_n(names, 'name')}), "
                         f"{_n(len(inv.hosts), 'host')}, {_n(len(inv.dns), 'DNS provider')}, {_n(len(inv.cas), 'CA')}, "
                         f"{_n(len(inv.channels), 'channel')}"), inv


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_secrets(inv: Inventory, env: Mapping[str, str] | None = None) -> list[Check]:
    """Channel and EAB secret references can be read (TSIG secrets are checked with their key)."""
    refs = []
    for ch in inv.channels.values():
        for r in (ch.url, ch.token):
            if r is not None:
                refs.append(r)
    for ca in inv.cas.values():
        if ca.eab_hmac_key is not None:
            refs.append(ca.eab_hmac_key)
    out = []
    for r in refs:
        try:
            r.read(env)
        except CertmgrError as exc:
            out.append(Check(group="inventory", name="secret", subject=r.key_path, status=Status.FAIL,
                             message=exc.message, hint=exc.hint))
            continue
        out.append(Check(group="inventory", name="secret", subject=r.key_path, status=Status.OK,
                         message=f"readable ({r.describe()})"))
    return out


def check_trust(inv: Inventory) -> list[Check]:
    """Every trust bundle the inventory names (for served chains, for each CA's endpoint) holds PEM certificates."""
    paths: dict[Path, str] = {p: "defaults.trust" for p in inv.trust}
    for ca in inv.cas.values():
        if ca.trust is not None:
            paths.setdefault(ca.trust, f"ca.{ca.name}.trust")
    out = []
    for path, key in paths.items():
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except OSError as exc:
            out.append(Check(group="inventory", name="trust", subject=key, status=Status.FAIL,
                             message=f"cannot read {path}: {exc.strerror}", hint=f"fix {key} in the inventory"))
            continue
        except ValueError:
            out.append(Check(group="inventory", name="trust", subject=key, status=Status.FAIL,
                             message=f"{path} holds no PEM certificate", hint=f"fix {key} in the inventory"))
            continue
        out.append(Check(group="inventory", name="trust", subject=key, status=Status.OK,
                         message=f"{path}: {len(certs)} certificate(s)"))
    return out


class _StoreLike(Protocol):
    root: Path

    def names(self) -> list[str]: ...

    def live_version(self, name: str) -> int | None: ...

    def read(self, name: str, version: int | None = None) -> Any: ...

    def load_json(self, relpath: str, default: Any = None) -> Any: ...

    def load_account_key(self, ca_id: str) -> bytes | None: ...


def check_store(root: Path) -> tuple[Check, Any]:
    """The state directory exists, is a store, and is writable by this user (never created here)."""
    from certmgr.store import Store

    subject = str(root)
    try:
        store = Store.open(root, create=False)
    except StoreError as exc:
        if not root.exists():
            return Check(group="store", name="store", subject=subject, status=Status.WARNING,
                         message="does not exist: no account key and no certificates yet (the first renewal "
                                 "creates it)",
                         hint="if certmgr has run before, --state-dir / CERTMGR_STATE_DIR points at the wrong "
                              "place"), None
        return Check(group="store", name="store", subject=subject, status=Status.FAIL, message=exc.message,
                     hint=exc.hint), None
    if not os.access(root, os.W_OK) or not os.access(root / "state", os.W_OK):
        return Check(group="store", name="store", subject=subject, status=Status.FAIL,
                     message=f"not writable by uid {os.getuid()}: renew and deploy cannot record anything",
                     hint="run doctor as the user the certmgr service runs as"), store
    live = sum(1 for n in store.names() if _live_or_none(store, n) is not None)
    return Check(group="store", name="store", subject=subject, status=Status.OK,
                 message=f"writable; {live} certificate(s) live"), store


def check_ha_store(inv: Inventory) -> tuple[list[Check], Any]:
    """[store]: PostgreSQL reachable, version ≥ 14, a real session (no transaction pooling), then the store opens.

    Returns the checks and the opened store (None if any check failed) for the checks that read it.
    """
    from certmgr import pgdoctor, storeopen

    assert inv.store is not None
    subject = inv.store.url.split("@")[-1]
    checks = [Check(group="store", name=f"postgres-{f.name}", subject=subject,
                    status=Status.FAIL if not f.ok else Status.WARNING if f.warning else Status.OK,
                    message=f.message, hint=f.hint) for f in pgdoctor.check(inv.store)]
    if any(c.status == Status.FAIL for c in checks):
        return checks, None
    try:
        store = storeopen.open_pg(inv.store)
        live = sum(1 for n in store.names() if store.live_version(n) is not None)
    except CertmgrError as exc:
        return [*checks, Check(group="store", name="store", subject=subject, status=Status.FAIL,
                               message=exc.message, hint=exc.hint)], None
    return [*checks, Check(group="store", name="store", subject=subject, status=Status.OK,
                           message=f"schema and store key ok; {live} certificate(s) live")], store


def check_dns_leftovers(store: StateStore, *, now: dt.datetime) -> Check:
    """The DNS journal is empty: no challenge TXT record certmgr wrote is waiting to be removed (warning if any)."""
    from certmgr.dns import journal as journal_mod

    def result(status: Status, message: str, hint: str | None = None) -> Check:
        return Check(group="dns", name="leftovers", subject=journal_mod.JOURNAL_PATH, status=status, message=message,
                     hint=hint)

    try:
        entries = journal_mod.read(store) if store is not None else []
    except CertmgrError as exc:
        return result(Status.FAIL, exc.message, exc.hint)
    if not entries:
        return result(Status.OK, "no challenge TXT record left behind")
    return result(Status.WARNING, *journal_mod.summary(entries, now))


def _live_or_none(store: _StoreLike, name: str) -> int | None:
    try:
        return store.live_version(name)
    except CertmgrError:
        return None


# ============================================================================ CA


async def check_ca(ca: CA, store: _StoreLike | None, *, executor: ThreadPoolExecutor,
                   timeouts: Timeouts) -> list[Check]:
    """Directory reachable; the stored account key's account valid (looked up with onlyReturnExisting), or
    none yet with agree_tos set. Never registers anything."""
    import josepy as jose

    from certmgr import issue, keys
    from certmgr.errors import ACMEError, LocalFileError

    out: list[Check] = []
    t0 = time.monotonic()
    try:
        client = await issue.ACMEClient.open(ca, executor=executor, timeouts=issue.Timeouts(http=timeouts.acme_http))
    except (ACMEError, LocalFileError) as exc:
        return [Check(group="ca", name="directory", subject=ca.name, status=Status.FAIL, message=exc.message,
                      hint=exc.hint, elapsed=time.monotonic() - t0)]
    out.append(Check(group="ca", name="directory", subject=ca.name, status=Status.OK,
                     message=f"{ca.directory} reachable ({(time.monotonic() - t0) * 1000:.0f} ms)",
                     elapsed=time.monotonic() - t0))
    t0 = time.monotonic()
    meta = getattr(client.directory, "meta", None)
    tos = getattr(meta, "terms_of_service", None) if meta is not None else None
    if meta is not None and getattr(meta, "external_account_required", False) and not ca.eab_kid:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                         message="the CA requires External Account Binding but no eab_kid is set",
                         hint=f"set eab_kid and eab_hmac_key_file in [ca.{ca.name}]"))
        return out
    ca_id = issue.account_id(ca)
    pem = None
    if store is not None:
        try:
            pem = store.load_account_key(ca_id)
        except CertmgrError as exc:
            out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL, message=exc.message,
                             hint=exc.hint))
            return out
    tos_text = f" ({tos})" if tos else ""
    if pem is None:
        if ca.agree_tos:
            out.append(Check(group="ca", name="account", subject=ca.name, status=Status.OK,
                             message=f"no account yet: the first renewal registers one (terms of service{tos_text} "
                                     "agreed)"))
        else:
            out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                             message="no account yet, and agree_tos is false: the first renewal cannot register one",
                             hint=f"read the terms of service{tos_text}, then set agree_tos = true in [ca.{ca.name}]"))
        return out
    try:
        key = keys.from_pem(pem)
        jwk = jose.jwk.JWKEC(key=key)
    except (ValueError, TypeError, CertmgrError) as exc:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                         message=f"account key accounts/{ca_id} cannot be read: {exc}",
                         hint="restore it from a backup; a new key means a new account"))
        return out
    client.account_key = jwk
    try:
        found = await client.find_account()  # onlyReturnExisting: never creates an account
    except ACMEError as exc:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL, message=exc.message,
                         hint=exc.hint, elapsed=time.monotonic() - t0))
        return out
    if found is None:
        status = Status.WARNING if ca.agree_tos else Status.FAIL
        then = ("the next renewal registers this key again" if ca.agree_tos
                else "agree_tos is false, so the next renewal cannot register it again")
        out.append(Check(group="ca", name="account", subject=ca.name, status=status,
                         message=f"the CA does not know the stored account key (accounts/{ca_id}): {then}",
                         hint="normal after a test CA restart; for a real CA, check the directory URL",
                         elapsed=time.monotonic() - t0))
        return out
    acct_status = found.body.status or "valid"
    url = found.uri or "?"
    if acct_status != "valid":
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                         message=f"account {url} is {acct_status}: the CA refuses orders from it",
                         hint=f"move accounts/{ca_id} aside so the next renewal registers a new account",
                         elapsed=time.monotonic() - t0))
    else:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.OK,
                         message=f"account {url} valid", elapsed=time.monotonic() - t0))
    return out


# ============================================================================ DNS


async def check_provider_zone(prov: DNSProvider, zone: str, *, timeouts: Timeouts) -> list[Check]:
    """The provider's own diagnosis of `zone` (its optional `diagnose` capability), as doctor's checks.

    A type without the capability still gets the provider-independent one: every listed nameserver
    answers the zone's SOA authoritatively.
    """
    from certmgr.dns import diagnosis, registry
    from certmgr.names import split_server

    diagnose = registry.diagnoser(prov.type)
    if diagnose is not None:
        findings = await diagnose(prov, zone, timeout=timeouts.dns)
    else:
        servers = [s for s in (split_server(ns, 53) for ns in prov.nameservers) if s is not None]
        findings = (await diagnosis.check_nameservers(zone, servers, timeout=timeouts.dns,
                                                      propagation_timeout=prov.propagation_timeout,
                                                      provider=prov.name),)
    status = {diagnosis.OK: Status.OK, diagnosis.WARNING: Status.WARNING, diagnosis.FAIL: Status.FAIL}
    return [Check(group="dns", name=f.name, subject=f"dns.{prov.name} {zone}", status=status[f.status],
                  message=f.message, hint=f.hint, elapsed=f.elapsed) for f in findings]


# ============================================================================ hosts


# Runs "$@" (an argv from the inventory, passed as positional parameters: never parsed as shell text).
RUN_SH = r"""out=$("$@" 2>&1 </dev/null); rc=$?
printf 'rc=%s\n' "$rc"
printf 'out=%s\n' "$(printf '%s' "$out" | base64 -w0)"
"""
FIND_SH = r"""if command -v -- "$1" >/dev/null 2>&1; then echo found=1; else echo found=0; fi
"""
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


def _one_line(text: str, limit: int = 300) -> str:
    return sanitize.flat(text, limit=limit)  # a POP's output is foreign text


class _Remote(Protocol):
    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> remote_mod.Result: ...

    async def sftp(self) -> asyncssh.SFTPClient: ...


Connector = Callable[..., Any]  # (host, *, jump, accept_new, timeouts) -> async context manager of _Remote
Prober = Callable[[str, int, str], Awaitable[Any]]


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


def _label(argv: Sequence[str]) -> str:
    from certmgr.deploy import command_label

    return command_label(argv)


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


# ============================================================================ timer


def check_timer(inv: Inventory, store: _StoreLike | None, served: Sequence[CertInfo], *,
                interval: float | None, timer_files: Sequence[Path], now: dt.datetime) -> Check:
    """The timer's worst-case interval against the shortest-lived certificate (store, last scan, served)."""
    if interval is not None:
        where = "--timer-interval"
    elif not timer_files:
        return Check(group="timer", name="interval", subject=TIMER_UNIT, status=Status.WARNING,
                     message=f"no {TIMER_UNIT} found in {', '.join(str(d) for d in SYSTEMD_DIRS[:1])} (or the "
                             "other unit directories): nothing runs certmgr on a schedule",
                     hint="install systemd/certmgr.timer and enable it, or pass --timer-interval if a different "
                          "scheduler runs certmgr")
    else:
        where = str(timer_files[0]) + (f" + {len(timer_files) - 1} drop-in(s)" if len(timer_files) > 1 else "")
        try:
            spec = parse_timer([(p, p.read_text()) for p in timer_files])
            interval = timer_interval(spec, today=now.date())
        except (OSError, ValueError) as exc:
            return Check(group="timer", name="interval", subject=where, status=Status.FAIL,
                         message=f"cannot read the timer: {exc}", hint="pass --timer-interval to say how often it runs")
    lifetimes = known_lifetimes(inv, store, served)
    return interval_check(interval, where, lifetimes, {c.name: c for c in inv.certificates})


def known_lifetimes(inv: Inventory, store: _StoreLike | None, served: Sequence[CertInfo]) -> list[Lifetime]:
    """Each inventory certificate's lifetime: the store's live version, else the last scan, else what was served."""
    out: list[Lifetime] = []
    for cert in inv.certificates:
        found: Lifetime | None = None
        if store is not None:
            try:
                if store.live_version(cert.name) is not None:
                    info = store.read(cert.name).info()
                    found = Lifetime(cert=cert.name, lifetime=info.lifetime, source="store")
            except (CertmgrError, ValueError):
                found = None
            if found is None:
                try:
                    state = store.load_json(f"state/scan/{cert.name}.json", default=None)
                except CertmgrError:
                    state = None
                lives = []
                for ep in (state or {}).get("endpoints", []) if isinstance(state, dict) else []:
                    try:
                        nb = dt.datetime.fromisoformat(ep["not_before"])
                        na = dt.datetime.fromisoformat(ep["not_after"])
                    except (KeyError, TypeError, ValueError):
                        continue
                    lives.append(na - nb)
                if lives:
                    found = Lifetime(cert=cert.name, lifetime=min(lives), source="last scan")
        if found is None:
            lives = [i.lifetime for i in served if set(cert.domains) & set(i.names)]
            if lives:
                found = Lifetime(cert=cert.name, lifetime=min(lives), source="served")
        if found is not None:
            out.append(found)
    return out


# ============================================================================ the run


def _default_connector(host: Host, *, jump: Host | None, accept_new: bool, timeouts: remote_mod.Timeouts) -> Any:
    return remote_mod.connect(host, jump=jump, accept_new=accept_new, timeouts=timeouts)


async def run(inventory_path: Path, state_dir: Path, *, now: dt.datetime, timer_interval_s: float | None = None,
              timer_files: Sequence[Path] | None = None, concurrency: int = 20, timeouts: Timeouts | None = None,
              connector: Connector | None = None, prober: Prober | None = None) -> Report:
    """Every check, concurrently (at most `concurrency` tasks), each task under `timeouts.check`.

    `timer_files` None: look for the installed certmgr.timer (then the repo's copy); ignored when
    `timer_interval_s` is given.
    """
    from certmgr.scan import probe

    timeouts = timeouts or Timeouts()
    loop = asyncio.get_running_loop()
    start = loop.time()
    inv_check, inv = check_inventory(inventory_path)
    checks: list[Check] = [inv_check]
    if inv is None:
        return Report(checks=tuple(checks), elapsed=loop.time() - start)
    checks += check_trust(inv)
    checks += check_secrets(inv)
    if inv.store is not None:  # HA: the database is the store; the state directory is not used
        ha_checks, store = check_ha_store(inv)
        checks += ha_checks
    else:
        store_check, store = check_store(state_dir)
        checks.append(store_check)
    checks.append(check_dns_leftovers(store, now=now))

    async def default_prober(address: str, port: int, sni: str) -> Any:
        return await probe(address, port, sni, connect_timeout=timeouts.handshake,
                           handshake_timeout=timeouts.handshake)

    connector = connector or _default_connector
    prober = prober or default_prober
    sem = asyncio.Semaphore(concurrency)
    served: list[CertInfo] = []
    results: list[tuple[int, list[Check]]] = []
    executor = ThreadPoolExecutor(max_workers=min(8, max(1, len(inv.cas) * 2)), thread_name_prefix="doctor-acme")

    async def guarded(order: int, group: str, name: str, subject: str,
                      body: Callable[[list[Check]], Awaitable[None]]) -> None:
        out: list[Check] = []
        results.append((order, out))
        async with sem:
            t0 = loop.time()
            try:
                async with asyncio.timeout(timeouts.check):
                    await body(out)
            except TimeoutError:
                out.append(Check(group=group, name=name, subject=subject, status=Status.FAIL,
                                 message=f"no result within {timeouts.check:g}s ({len(out)} check(s) done before)",
                                 hint="something hangs: rerun with -vv, or raise --timeout",
                                 elapsed=loop.time() - t0))
            except CertmgrError as exc:  # an expected failure that escaped a finer check
                out.append(Check(group=group, name=name, subject=subject, status=Status.FAIL,
                                 message=exc.message, hint=exc.hint, elapsed=loop.time() - t0))

    def ca_body(ca: CA) -> Callable[[list[Check]], Awaitable[None]]:
        async def body(out: list[Check]) -> None:
            out.extend(await check_ca(ca, store, executor=executor, timeouts=timeouts))
        return body

    def zone_body(prov: DNSProvider, zone: str) -> Callable[[list[Check]], Awaitable[None]]:
        async def body(out: list[Check]) -> None:
            out.extend(await check_provider_zone(prov, zone, timeouts=timeouts))
        return body

    def host_body(host: Host) -> Callable[[list[Check]], Awaitable[None]]:
        async def body(out: list[Check]) -> None:
            await check_host(inv, host, out, served, timeouts=timeouts, connector=connector, prober=prober)
        return body

    try:
        async with asyncio.TaskGroup() as tg:
            order = 0
            for ca in inv.cas.values():
                tg.create_task(guarded(order, "ca", "directory", ca.name, ca_body(ca)))
                order += 1
            for prov in inv.dns.values():
                for zone in prov.zones:
                    tg.create_task(guarded(order, "dns", dns_registry.first_check(prov.type), f"dns.{prov.name} {zone}",
                                           zone_body(prov, zone)))
                    order += 1
            for host in inv.hosts.values():
                tg.create_task(guarded(order, "host", "ssh", host.name, host_body(host)))
                order += 1
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    for _, out in sorted(results, key=lambda r: r[0]):
        checks.extend(out)
    if timer_interval_s is None and timer_files is None:
        timer_files = find_timer_files()
    checks.append(check_timer(inv, store, served, interval=timer_interval_s, timer_files=timer_files or (),
                              now=now))
    ordered = sorted(checks, key=lambda c: GROUPS.index(c.group))  # stable: task order kept within a group
    report = Report(checks=tuple(ordered), elapsed=loop.time() - start)
    for c in report.checks:
        if c.status != Status.OK:
            event(logger, logging.INFO, "doctor finding", check=c.name, subject=c.subject, status=c.status.value)
    return report


# ============================================================================ output

_SYMBOLS = {Status.OK: "✓", Status.WARNING: "!", Status.FAIL: "✗"}
_PLAIN = {Status.OK: "ok  ", Status.WARNING: "WARN", Status.FAIL: "FAIL"}
_TITLES = {"inventory": "Inventory", "store": "Local store", "ca": "ACME CAs", "dns": "DNS (TSIG keys, zones)",
           "host": "Hosts (SSH, cert root, commands)", "nginx": "nginx serves live/", "timer": "Timer"}


def render(report: Report, *, tty: bool = False, colour: bool = False) -> str:
    """The report grouped by area: `✓`/`!`/`✗` on a terminal, `ok`/`WARN`/`FAIL` otherwise; hints indented."""
    colours = {Status.OK: "\x1b[32m", Status.WARNING: "\x1b[33m", Status.FAIL: "\x1b[31m"}
    lines: list[str] = []
    width = max((len(c.name) for c in report.checks), default=0)
    for group in GROUPS:
        items = [c for c in report.checks if c.group == group]
        if not items:
            continue
        lines.append(_TITLES[group])
        for c in items:
            mark = _SYMBOLS[c.status] if tty else _PLAIN[c.status]
            if colour:
                mark = f"{colours[c.status]}{mark}\x1b[0m"
            lines.append(f"  {mark} {c.name:<{width}}  {c.subject}: {c.message}")
            if c.hint and c.status != Status.OK:
                lines.append(f"  {'':{len(_PLAIN[c.status]) if not tty else 1}} {'':<{width}}  hint: {c.hint}")
    n = report.counts()
    lines.append(f"doctor: {n['ok']} ok, {n['warning']} warning{'s' if n['warning'] != 1 else ''}, "
                 f"{n['fail']} failed ({report.elapsed:.1f}s)")
    return "\n".join(lines)


def iter_failures(report: Report) -> Iterable[Check]:
    return (c for c in report.checks if c.status != Status.OK)


__all__ = [
    "Check",
    "Lifetime",
    "Report",
    "Status",
    "Timeouts",
    "check_inventory",
    "check_provider_zone",
    "check_store",
    "check_timer",
    "check_trust",
    "interval_check",
    "known_lifetimes",
    "render",
    "run",
    "served_check",
    "sudo_list_argv",
]
