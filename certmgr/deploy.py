"""Deploy: push the store's live version of each certificate to its hosts, all at once, bounded.

Per host: preflight test, upload a new archive version over SFTP, swap `live/<name>` with one
rename(2), test, reload, verify by TLS handshake — and roll back with one rename when any step fails.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import hashlib
import logging
import re
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from cryptography import x509

from certmgr import certcheck, interrupt, popguard, sanitize
from certmgr import intents as intents_mod
from certmgr import remote as remote_mod
from certmgr.errors import CertmgrError, DeployError, UsageError
from certmgr.inventory import Certificate, Host, Inventory
from certmgr.log import event
from certmgr.material import CertInfo, CertMaterial
from certmgr.popguard import LOCK_SH
from certmgr.remote import Result, Timeouts, b64bytes, b64text
from certmgr.scan import Probe, probe

logger = logging.getLogger(__name__)

PEM_MODE = 0o644
KEY_MODE = 0o600
DIR_MODE = 0o755
FILE_ORDER = ("fullchain.pem", "privkey.pem", "cert.pem", "chain.pem")
CONFIRM_ROUNDS = 3  # handshake rounds in a row that must all show the new serial
CONFIRM_INTERVAL = 0.1
# the intent of the commit this task is running: audit lines written for it carry its id (intents.py)
_INTENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("certmgr_deploy_intent", default=None)


class Status(StrEnum):
    SKIPPED = "skipped"  # already live and served: nothing touched
    DEPLOYED = "deployed"  # new version live, tested, reloaded, served
    ROLLED_BACK = "rolled back"  # the new version failed; the previous one is live and served again
    FAILED = "failed"  # could not deploy (nothing changed), or could not restore cleanly
    UNREACHABLE = "unreachable"  # no SSH session: nothing touched
    HELD = "held"  # not attempted: a canary did not verify, or the host was left alone after a timeout
    UNKNOWN = "unknown"  # a remote script timed out and may still run there: state unknown, host left alone


OK_STATUSES = (Status.SKIPPED, Status.DEPLOYED)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostOutcome:
    """What happened to one certificate on one host."""

    cert: str
    host: str
    status: Status
    new_serial: str
    old_serial: str | None = None  # what the host had live before (None: nothing, or unknown)
    version: int | None = None  # the host's archive version live at the end (None: unknown/none)
    previous_version: int | None = None
    converted: bool = False  # certbot's live/<name>/ directory was converted to a symlink
    error: str | None = None  # "step subject: cause (outcome)"; nginx's own text where it has one
    hint: str | None = None
    timings: tuple[tuple[str, float], ...] = ()
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def line(self) -> str:
        """One line for the terminal: status, cert → host, serials, timings, error."""
        if self.status == Status.SKIPPED:
            serials = f"serial {self.new_serial} (already live)"
        else:
            serials = f"serial {self.old_serial or '-'} → {self.new_serial}"
        ver = f" v{self.version}" if self.version is not None else ""
        conv = " (converted from certbot layout)" if self.converted else ""
        steps = " ".join(f"{k} {v:.2f}" for k, v in self.timings if v >= 0.005)
        took = f"{self.elapsed:.2f}s" + (f" [{steps}]" if steps else "")
        text = f"{self.status.value:<11} {self.cert} → {self.host}{ver} {serials} {took}{conv}"
        if self.error:
            text += f"\n            {self.error}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "cert": self.cert, "host": self.host, "status": self.status.value, "ok": self.ok,
            "new_serial": self.new_serial, "old_serial": self.old_serial, "version": self.version,
            "previous_version": self.previous_version, "converted": self.converted, "error": self.error,
            "hint": self.hint, "timings": dict(self.timings), "elapsed": round(self.elapsed, 3),
        }


# ---------------------------------------------------------------------------- remote scripts
#
# POSIX sh + coreutils + sha256sum only. Constants: all inputs arrive as positional parameters
# ($1…) quoted by shlex; commands from the inventory arrive as one shlex.join'ed string and are
# run with `eval`, which re-parses exactly the quoted argv (that is what the quoting is for).
# Multi-line text (nginx's messages) is returned base64-encoded on one `key=value` line.

_COMMON_SH = r"""
set -u
say() { printf '%s\n' "$*"; }
b64() { printf '%s' "$1" | base64 -w0; }
live=$root/live/$name
arch=$root/archive/$name
"""

INSPECT_SH = r"""root=$1 name=$2 test=$3 keyown=$4 lockwait=${5:-30} waitlock=${6:-}
""" + _COMMON_SH + LOCK_SH + r"""
# Settling an interrupted deploy: wait for a commit that may still run here (it holds the lock to its end).
if [ -n "$waitlock" ]; then lock; fi
# The host died between the two renames of a certbot conversion (COMMIT_SH): put certbot's
# directory back before nginx -t looks at the config. Every lineage, not just $name: the test
# covers the whole host. Under the POP lock: a commit of another controller may be mid-way.
for bak in "$root"/live/.*.certbot-old; do
  [ -d "$bak" ] || continue
  lock
  [ -d "$bak" ] || continue
  n=${bak##*/}; n=${n#.}; n=${n%.certbot-old}
  if [ ! -e "$root/live/$n" ] && [ ! -L "$root/live/$n" ]; then
    mv -T -- "$bak" "$root/live/$n" && say "restored=$n"
  fi
done
# certbot's directory is read under the POP lock: another controller's commit may be converting it
# (live/<name> renamed away, then a link put in its place), and its links must be read whole. A
# commit creates the lock file before converting, so without one there is nothing to wait for (and
# a POP never deployed to is left exactly as it was).
if [ -d "$live" ] && [ ! -L "$live" ] && [ -e "$root/archive/.certmgr.lock" ]; then lock; fi
if [ -L "$live" ]; then
  say layout=link
  say "target=$(readlink -- "$live")"
elif [ -d "$live" ]; then
  say layout=certbot
  for k in cert chain fullchain privkey; do
    t=$(readlink -- "$live/$k.pem" 2>/dev/null) || t=
    say "certbot_$k=${t##*/}"
  done
elif [ -e "$live" ]; then
  say layout=other
else
  say layout=none
fi
[ -d "$root/live" ] || say missing=live
[ -d "$root/archive" ] || say missing=archive
if [ ! -d "$arch" ]; then
  say missing=lineage
else
  for e in "$arch"/*; do
    b=${e##*/}
    case $b in
      ''|*[!0-9]*) ;;
      *) if [ -d "$e" ] && [ ! -L "$e" ]; then say "version=$b"; fi ;;
    esac
    case $b in
      fullchain[0-9]*.pem) n=${b#fullchain}; n=${n%.pem}
        case $n in *[!0-9]*) ;; *) say "certbot_version=$n" ;; esac ;;
    esac
  done
fi
# the live fullchain itself (a few KB): certmgr hashes it and reads the serial of its leaf
if [ -r "$live/fullchain.pem" ]; then
  say "fullchain_b64=$(base64 -w0 < "$live/fullchain.pem")"
fi
if [ -n "$keyown" ] && [ -e "$live/privkey.pem" ]; then
  say "key_owner=$(stat -L -c '%U:%G:%u:%g' -- "$live/privkey.pem" 2>/dev/null)"
fi
if [ -n "$test" ]; then
  out=$(eval "$test" 2>&1 </dev/null 9>&-); rc=$?
  say "test_rc=$rc"
  [ "$rc" -eq 0 ] || say "test_out=$(b64 "$out")"
else
  say test_rc=0
  say test_skipped=1
fi
"""

# Shared by commit and rollback: point live/<name> at $1 (a relative target) with one rename(2).
_POINT_SH = r"""
point() {
  tl=$root/live/.$name.tmp-$$-$2
  if [ -z "$1" ]; then rm -f -- "$live"; return $?; fi
  # -T: a leftover of a dead run with the same PID, a link to a directory, is replaced, never entered
  ln -sfT -- "$1" "$tl" || return 1
  if ! mv -T -- "$tl" "$live"; then rm -f -- "$tl"; return 1; fi
  sync -- "$root/live" 2>/dev/null || :
}
retest() {
  out=$(eval "$test" 2>&1 </dev/null 9>&-); rc=$?
  say "retest_rc=$rc"
  say "retest_out=$(b64 "$out")"
}
"""

# Give file $1 to $keyown: owner[:group] or :group (privkey_owner/privkey_group); mode stays 0600.
# Shared with doctor, which tries it on a temp file.
KEYOWN_SH = r"""
keyown() {
  [ -n "$keyown" ] || return 0
  case $keyown in
    :*) chgrp -- "${keyown#:}" "$1" ;;
    *) chown -- "$keyown" "$1" ;;
  esac
}
"""

# A client that vanishes mid-script (killed, network cut) must not leave an untested link live:
# ignoring HUP and PIPE lets the script run to its end (test, rollback or reload) with nobody
# reading its output; the next run's INSPECT sees where it got to.
_DETACH_SH = r"""
trap '' HUP PIPE
"""

# COMMIT arguments beyond the ninth: ${10} this controller's tag (its own upload temp dirs are
# `.tmp-up-<tag>-…`), ${11} a UTC stamp for names set aside, ${12} seconds to wait for the POP lock.
COMMIT_SH = r"""root=$1 name=$2 tmp=$3 ver=$4 sums=$5 conv=$6 test=$7 reload=$8 keyown=$9
ctl=${10:-} stamp=${11:-0} lockwait=${12:-30}
""" + _DETACH_SH + _COMMON_SH + LOCK_SH + _POINT_SH + KEYOWN_SH + r"""
umask 077
fail() { say "failed_step=$1"; say "failed_out=$(b64 "$2")"; exit 3; }
sumsok() { (cd -- "$1" 2>&1 && sha256sum --strict --quiet -c - 2>&1 <<SUMS
$sums
SUMS
) }
lock
o=$(sumsok "$arch/$tmp") || fail verify "$o"
if [ -n "$keyown" ]; then o=$(keyown "$arch/$tmp/privkey.pem" 2>&1) || fail chown "$o"; fi
o=$(cd -- "$arch/$tmp" 2>&1 && sync -- fullchain.pem privkey.pem cert.pem chain.pem . 2>&1) || fail sync "$o"
# The store's number names this version on every POP. archive/<name>/N/ may exist already: this
# very certificate (a rolled-back attempt, another controller's upload) is used as it is; other
# content (a certbot-era or hand-made N/) is set aside as N.certmgr-aside-<stamp>/, never lost.
if [ -d "$arch/$ver" ] && [ ! -L "$arch/$ver" ] && sumsok "$arch/$ver" >/dev/null; then
  if [ -n "$keyown" ]; then o=$(keyown "$arch/$ver/privkey.pem" 2>&1) || fail chown "$o"; fi
  rm -rf -- "${arch:?}/$tmp"
  say "reused=$ver"
else
  if [ -e "$arch/$ver" ] || [ -L "$arch/$ver" ]; then
    aside=$ver.certmgr-aside-$stamp
    cur=
    if [ -L "$live" ]; then cur=$(readlink -- "$live"); fi
    if [ "$cur" = "../archive/$name/$ver" ]; then
      # live reads N/: copy it aside, point live at the copy, then remove N/ — live never dangles
      o=$(cp -a -- "$arch/$ver" "$arch/$aside" 2>&1) || fail aside "$o"
      point "../archive/$name/$aside" aside || fail aside "cannot point live at $aside"
      o=$(rm -rf -- "${arch:?}/$ver" 2>&1) || fail aside "$o"
    else
      o=$(mv -T -- "$arch/$ver" "$arch/$aside" 2>&1) || fail aside "$o"
    fi
    say "aside=$aside"
  fi
  o=$(mv -T -- "$arch/$tmp" "$arch/$ver" 2>&1) || fail rename "$o"
fi
sync -- "$arch" 2>/dev/null || :
say "stored=$ver"
prev=
if [ -n "$conv" ]; then
  # certbot layout: copy its live version K into archive/<name>/K/ once; rollback goes there.
  # K/ holding other content (or K being the store's number) puts certbot's copy aside instead.
  cdir=$conv
  if [ "$conv" = "$ver" ]; then
    cdir=$conv.certmgr-aside-$stamp
  elif [ -e "$arch/$conv" ] && ! cmp -s -- "$arch/$conv/fullchain.pem" "$arch/fullchain$conv.pem"; then
    cdir=$conv.certmgr-aside-$stamp
  fi
  if [ ! -d "$arch/$cdir" ]; then
    ct=$arch/.tmp-$conv-conv$$
    o=$(mkdir -m 755 -- "$ct" 2>&1) || fail convert "$o"
    for k in cert chain fullchain privkey; do
      o=$(cp -- "$arch/$k$conv.pem" "$ct/$k.pem" 2>&1) || { rm -rf -- "$ct"; fail convert "$o"; }
    done
    chmod 644 -- "$ct/cert.pem" "$ct/chain.pem" "$ct/fullchain.pem"
    chmod 600 -- "$ct/privkey.pem"
    if [ -n "$keyown" ]; then o=$(keyown "$ct/privkey.pem" 2>&1) || { rm -rf -- "$ct"; fail convert "$o"; }; fi
    sync -- "$ct/cert.pem" "$ct/chain.pem" "$ct/fullchain.pem" "$ct/privkey.pem" "$ct" 2>/dev/null || :
    o=$(mv -T -- "$ct" "$arch/$cdir" 2>&1) || { rm -rf -- "$ct"; fail convert "$o"; }
  fi
  prev=../archive/$name/$cdir
  tl=$root/live/.$name.tmp-$$-new
  bak=$root/live/.$name.certbot-old
  rm -f -- "$tl"
  o=$(ln -s -- "../archive/$name/$ver" "$tl" 2>&1) || fail swap "$o"
  # rename(2) cannot replace a directory by a symlink: two renames, microseconds apart
  o=$(mv -T -- "$live" "$bak" 2>&1) || { rm -f -- "$tl"; fail swap "$o"; }
  if ! o=$(mv -T -- "$tl" "$live" 2>&1); then mv -T -- "$bak" "$live"; rm -f -- "$tl"; fail swap "$o"; fi
  sync -- "$root/live" 2>/dev/null || :
  rm -rf -- "$bak"
  say "converted=$conv"
  say "convdir=$cdir"
else
  if [ -L "$live" ]; then prev=$(readlink -- "$live"); fi
  point "../archive/$name/$ver" new || fail swap ""
fi
say "prev=$prev"
say swapped=1
out=$(eval "$test" 2>&1 </dev/null 9>&-); rc=$?
say "test_rc=$rc"
if [ "$rc" -ne 0 ]; then
  say "test_out=$(b64 "$out")"
  if point "$prev" back; then say rolled_back=1; else say rolled_back=0; fi
  retest
  exit 4
fi
out=$(eval "$reload" 2>&1 </dev/null 9>&-); rc=$?
say "reload_rc=$rc"
if [ "$rc" -ne 0 ]; then
  say "reload_out=$(b64 "$out")"
  # The failed reload may have loaded the new files anyway: switch back, test, reload again.
  if point "$prev" back; then say rolled_back=1; else say rolled_back=0; exit 4; fi
  retest
  [ "$rc" -eq 0 ] || exit 4
  out=$(eval "$reload" 2>&1 </dev/null 9>&-); rc=$?
  say "rereload_rc=$rc"
  say "rereload_out=$(b64 "$out")"
  exit 4
fi
# Leftovers, swept under the lock. Scripts make their temporaries under the lock, so any such
# is a dead script's. Uploads are made without it: only this controller's own (its earlier run
# is over — the store lock) or one untouched for an hour (its controller is gone) is removed.
for d in "$arch"/.tmp-* "$root/live/.$name.tmp-"*; do
  [ -e "$d" ] || [ -L "$d" ] || continue
  case ${d##*/} in
    .tmp-up-"$ctl"-*) [ -n "$ctl" ] || continue ;;
    .tmp-up-*) [ -n "$(find "$d" -maxdepth 0 -mmin +60 2>/dev/null)" ] || continue ;;
  esac
  rm -rf -- "$d"
done
say done=1
"""

ROLLBACK_SH = r"""root=$1 name=$2 prev=$3 test=$4 reload=$5 lockwait=${6:-30}
""" + _DETACH_SH + _COMMON_SH + LOCK_SH + _POINT_SH + r"""
lock
if point "$prev" back; then say rolled_back=1; else say rolled_back=0; exit 3; fi
retest
if [ "$rc" -ne 0 ]; then exit 4; fi
out=$(eval "$reload" 2>&1 </dev/null 9>&-); rc=$?
say "reload_rc=$rc"
say "reload_out=$(b64 "$out")"
"""

PRUNE_SH = r"""root=$1 name=$2 keep=$3 lockwait=${4:-30}
""" + _COMMON_SH + LOCK_SH + r"""
[ -d "$root/archive" ] || { say "kept_live="; exit 0; }
lock
cur=
if [ -L "$live" ]; then t=$(readlink -- "$live"); cur=${t##*/}; fi
vs=
for e in "$arch"/*; do
  b=${e##*/}
  case $b in ''|*[!0-9]*) continue ;; esac
  if [ -d "$e" ] && [ ! -L "$e" ]; then vs="$vs $b"; fi
done
case $cur in ''|*[!0-9]*) cur= ;; esac
prev=
for v in $(printf '%s\n' $vs | sort -n); do
  if [ -n "$cur" ] && [ "$v" -lt "$cur" ]; then prev=$v; fi
done
for v in $(printf '%s\n' $vs | sort -n | head -n "-$keep"); do
  [ "$v" = "$cur" ] && continue
  [ "$v" = "$prev" ] && continue
  g=$arch/.tmp-prune-$v-$$
  if mv -T -- "$arch/$v" "$g" && rm -rf -- "$g"; then say "removed=$v"; else say "prune_failed=$v"; fi
done
say "kept_live=$cur"
"""

# ---------------------------------------------------------------------------- seams for tests


class RemoteSession(Protocol):
    """What deploy needs from a connection (remote.Remote; fakes in unit tests)."""

    def prefetch_sftp(self) -> None: ...

    async def run_script(self, script: str, args: Sequence[str], *, step: str,
                         timeout: float | None = None) -> Result: ...

    async def upload_dir(self, directory: str, files: Mapping[str, tuple[bytes, int]], *,
                         dir_mode: int = ..., ensure: Sequence[str] = ..., fsync: bool = ...) -> None: ...

    async def remove_tree_quietly(self, directory: str) -> None: ...


Connector = Callable[..., AbstractAsyncContextManager[RemoteSession]]
Prober = Callable[[str, int, str], Any]  # async (address, port, sni) -> Probe


def _default_connector(host: Host, *, jump: Host | None, accept_new: bool, timeouts: Timeouts,
                       on_accept: remote_mod.OnAccept | None = None) -> AbstractAsyncContextManager[RemoteSession]:
    return remote_mod.connect(host, jump=jump, accept_new=accept_new, timeouts=timeouts, on_accept=on_accept)


# ---------------------------------------------------------------------------- planning helpers


def certbot_version(fields: Mapping[str, list[str]], name: str) -> tuple[int | None, str | None]:
    """The K that all four of certbot's `live/<name>/*.pem` links point at, or (None, why not)."""
    ks: dict[str, int] = {}
    for kind in ("cert", "chain", "fullchain", "privkey"):
        base = (fields.get(f"certbot_{kind}") or [""])[-1]
        m = re.fullmatch(rf"{kind}([1-9][0-9]{{0,8}})\.pem", base)
        if m is None:
            return None, f"live/{name}/{kind}.pem is not a link to archive/{name}/{kind}K.pem"
        ks[kind] = int(m.group(1))
    if len(set(ks.values())) != 1:
        shown = ", ".join(f"{k}→{v}" for k, v in ks.items())
        return None, f"certbot's live/{name} links disagree ({shown})"
    return ks["fullchain"], None


def key_owner_matches(want: str, seen: str | None) -> bool:
    """Does `seen` ("user:group:uid:gid" from stat) satisfy `want` ("owner:group", "owner", ":group", "")?"""
    if not want:
        return True
    parts = (seen or "").split(":")
    if len(parts) != 4:
        return False
    user, group, uid, gid = parts
    owner, _, grp = want.partition(":")
    return (not owner or owner in (user, uid)) and (not grp or grp in (group, gid))


def next_version(fields: Mapping[str, list[str]]) -> int:
    """One more than any version directory or certbot file number already in archive/<name>/."""
    nums = [int(v) for v in fields.get("version", []) + fields.get("certbot_version", []) if v.isdigit()]
    return max(nums, default=0) + 1


def version_of_target(target: str | None, name: str) -> int | None:
    if not target:
        return None
    m = re.fullmatch(rf"(?:\.\./archive/|.*/archive/){re.escape(name)}/([1-9][0-9]{{0,8}})/?", target)
    return int(m.group(1)) if m else None


def sha256sums(material: CertMaterial) -> str:
    files = material.files()
    return "".join(f"{hashlib.sha256(files[f]).hexdigest()}  {f}\n" for f in FILE_ORDER)


def sni_names(cert: Certificate) -> tuple[str, ...]:
    """The names to verify by handshake: the inventory's `verify_names` (by default the certificate's
    non-wildcard names, names a POP's nginx lists in server_name); with none, a wildcard is checked with
    a label of our own, which only a wildcard server_name (or the default server) answers."""
    if cert.verify_names:
        return cert.verify_names
    return tuple(dict.fromkeys(n.replace("*.", "certmgr-verify.", 1) if n.startswith("*.") else n
                               for n in cert.domains))


def command_label(argv: Sequence[str]) -> str:
    """A short name for a configured command: `sudo -n /usr/sbin/nginx -p … -t` → `nginx -t`."""
    args = list(argv)
    while args and (args[0] == "sudo" or args[0].startswith("-")):
        args.pop(0)
    if not args:
        return "command"
    prog = args[0].rsplit("/", 1)[-1]
    if len(args) >= 3 and args[-2] == "-s":
        return f"{prog} -s {args[-1]}"
    if len(args) >= 2 and args[-1].startswith("-"):
        return f"{prog} {args[-1]}"
    if prog == "systemctl" and len(args) >= 2:
        return " ".join([prog, *args[1:3]])
    return prog


def _serial_of_pem(pem: bytes | None) -> str | None:
    """Serial of the first certificate in `pem` (a fullchain's leaf), or None."""
    if not pem:
        return None
    try:
        return CertInfo.from_cert(x509.load_pem_x509_certificate(pem)).serial
    except ValueError:
        return None


def _serial_of_probe(p: Probe) -> str | None:
    if not p.ok:
        return None
    try:
        return CertInfo.from_der(p.chain[0]).serial
    except ValueError:
        return None


def _served_text(seen: Mapping[str, Probe]) -> str:
    """`name: serial` per handshake (or why there was none)."""
    return ", ".join(f"{n}: {_serial_of_probe(p) or p.error or 'no certificate'}" for n, p in seen.items()) or "nothing"


def _quote_text(text: str, limit: int = 600) -> str:
    # A POP's output (nginx -t, stderr) is foreign text: one inert line (no ESC, no forged line).
    return '"' + sanitize.flat(text, limit=limit).replace('"', "'") + '"'


# ---------------------------------------------------------------------------- one (cert, host)


@dataclass(kw_only=True)
class _Job:
    cert: Certificate
    host: Host
    material: CertMaterial
    info: CertInfo
    local_version: int | None
    timings: dict[str, float] = field(default_factory=dict)
    intent: intents_mod.Intent | None = None  # written before the commit; removed once its outcome is audited


class _Deployer:
    def __init__(self, *, inventory: Inventory, store: Any, timeouts: Timeouts, accept_new: bool,
                 connector: Connector, prober: Prober, prune: int | None, now: dt.datetime,
                 keep: int | None = None) -> None:
        self.inventory = inventory
        self.store = store
        self.timeouts = timeouts
        self.accept_new = accept_new
        self.connector = connector
        self.prober = prober
        self.prune = prune
        self.keep = keep
        self.now = now
        self.loop = asyncio.get_running_loop()
        self.tag = popguard.controller_tag(store)  # marks this controller's upload temp dirs on POPs
        self.lock_wait = str(popguard.lock_wait(timeouts.command))
        self.produced: list[HostOutcome] = []  # every outcome so far: what a cancelled deploy still saves

    # -- audit: one JSON line per change, written in a thread (it fsyncs)

    async def audit(self, action: str, obj: str, **kw: Any) -> None:
        if self.store is None:
            return
        if (intent_id := _INTENT_ID.get()) is not None:
            kw.setdefault("intent", intent_id)
        try:
            await asyncio.to_thread(self.store.audit, action, obj, **kw)
        except CertmgrError as exc:
            logger.error("audit: %s", exc)

    async def audit_accepted(self, k: remote_mod.AcceptedKey) -> None:
        await self.audit("host key accepted", k.host, to=k.fingerprint, known_hosts=str(k.known_hosts),
                         summary=f"trusted {k.host}'s host key {k.fingerprint} on first use (--accept-new), "
                                 f"added to {k.known_hosts}")

    # -- handshakes

    async def served(self, host: Host, names: Sequence[str]) -> dict[str, Probe]:
        probes = await asyncio.gather(*(self.prober(host.address, host.https_port, n) for n in names))
        return dict(zip(names, probes, strict=True))

    async def wait_served(self, host: Host, names: Sequence[str], serial: str) -> tuple[bool, dict[str, Probe]]:
        """Poll handshakes until every name serves `serial` in CONFIRM_ROUNDS rounds in a row, or time runs out.

        One good round is not proof: between `nginx -s reload` returning and the old workers closing
        their listeners, both generations accept, so a lucky handshake can precede stale ones. After
        a good round the confirming rounds start CONFIRM_INTERVAL apart (the first no sooner than
        the good round ended) without waiting for each other: a far POP's handshake takes two round
        trips, which then add no sleep, and the samples stay spread in time.
        """
        deadline = self.loop.time() + self.timeouts.verify
        delay = 0.01  # the master takes a few ms to start new workers after `reload` returns

        def new(seen: Mapping[str, Probe]) -> bool:
            return all(_serial_of_probe(p) == serial for p in seen.values())

        async def round_at(when: float) -> dict[str, Probe]:
            await asyncio.sleep(max(0.0, when - self.loop.time()))
            return await self.served(host, names)

        while True:
            began = self.loop.time()
            seen = await self.served(host, names)
            if new(seen):
                first = max(began + CONFIRM_INTERVAL, self.loop.time())
                if first + (CONFIRM_ROUNDS - 2) * CONFIRM_INTERVAL > deadline:
                    return False, seen
                rounds = await asyncio.gather(*(round_at(first + k * CONFIRM_INTERVAL)
                                                for k in range(CONFIRM_ROUNDS - 1)))
                stale = [r for r in rounds if not new(r)]
                if not stale:
                    return True, rounds[-1] if rounds else seen
                seen = stale[0]
            pause = max(0.0, began + delay - self.loop.time())
            delay = min(delay * 2, 0.5)
            if self.loop.time() + pause > deadline:
                return False, seen
            await asyncio.sleep(pause)  # bounded polling: old workers drain within a few hundred ms

    # -- the per-host task

    async def host_task(self, host: Host, jobs: Sequence[_Job]) -> list[HostOutcome]:
        outcomes: list[HostOutcome] = []
        start = self.loop.time()
        jump = self.inventory.hosts.get(host.jump) if host.jump else None
        try:
            async with self.connector(host, jump=jump, accept_new=self.accept_new, timeouts=self.timeouts,
                                      on_accept=self.audit_accepted) as rem:
                connected = self.loop.time() - start
                tested_ok = False
                for job in jobs:
                    job.timings["connect"] = connected
                    if interrupt.stopping():
                        outcomes.append(self.not_started(job, start=self.loop.time()))
                        continue
                    outcome = await self.one(rem, job, preflight=not tested_ok)
                    outcomes.append(outcome)
                    if outcome.status == Status.UNKNOWN:
                        outcomes.extend(self.left_alone(jobs, outcomes, outcome, start=start))
                        return outcomes
                    # Each of these ends with the test command just seen passing on this connection,
                    # which is the next certificate's preflight: one nginx -t per host saved per cert.
                    tested_ok = outcome.status in (Status.SKIPPED, Status.DEPLOYED, Status.ROLLED_BACK)
                    connected = 0.0
                # --prune K: every certificate on this host; retention (keep): only where a version was added
                deployed = {o.cert for o in outcomes if o.status == Status.DEPLOYED}
                for job in jobs:
                    if self.prune is not None:
                        await self.prune_one(rem, job, self.prune)
                    elif self.keep is not None and job.cert.name in deployed:
                        await self.prune_one(rem, job, self.keep)
        except (remote_mod.Unreachable, DeployError) as exc:
            status = Status.UNREACHABLE if isinstance(exc, remote_mod.Unreachable) else Status.FAILED
            done = {o.cert for o in outcomes}
            for job in jobs:
                if job.cert.name not in done:
                    outcomes.append(self.outcome(job, status, error=f"deploy {job.cert.name} → {host.name}: "
                                                 f"{exc.message}", hint=exc.hint, start=start))
        return outcomes

    def left_alone(self, jobs: Sequence[_Job], done: Sequence[HostOutcome], cause: HostOutcome, *,
                   start: float) -> list[HostOutcome]:
        """After a timeout the host's state is unknown (its script may run on): its other jobs wait for the next run."""
        seen = {o.cert for o in done}
        return [self.outcome(job, Status.HELD, start=start,
                             error=f"deploy {job.cert.name} → {job.host.name}: held: {job.host.name} left alone for "
                                   f"this run after {cause.cert} timed out (not touched)",
                             hint="the next run inspects the host afresh") for job in jobs if job.cert.name not in seen]

    def outcome(self, job: _Job, status: Status, *, start: float, **kw: Any) -> HostOutcome:
        elapsed = self.loop.time() - start
        interrupt.tally().outcome(job.cert.name, job.host.name, status.value)
        o = HostOutcome(cert=job.cert.name, host=job.host.name, status=status, new_serial=job.info.serial,
                        timings=tuple((k, round(v, 4)) for k, v in job.timings.items()), elapsed=elapsed, **kw)
        self.produced.append(o)
        return o

    def not_started(self, job: _Job, *, start: float) -> HostOutcome:
        """The outcome of a job a signal stopped before its commit: nothing on the host was switched."""
        name = job.cert.name
        return self.outcome(job, Status.HELD, start=start, hint=f"run `certmgr deploy {name}` to finish",
                            error=f"deploy {name} → {job.host.name}: not started: interrupted (live unchanged)")

    async def intend(self, job: _Job, *, version: int, layout: str | None, target: str | None, conv: str,
                     old_serial: str | None) -> None:
        """Record durably, before the commit starts, the switch it may make (settled by a later run if we die)."""
        intent = intents_mod.Intent.new(
            cert=job.cert.name, host=job.host.name, version=version, layout=layout or "none",
            from_target=target or "", back_target=f"../archive/{job.cert.name}/{conv}" if conv else (target or ""),
            from_serial=old_serial, to_serial=job.info.serial, now=dt.datetime.now(dt.UTC))
        if self.store is not None:
            try:
                await asyncio.to_thread(intents_mod.write, self.store, intent)
            except CertmgrError as exc:
                raise DeployError(f"cannot record the deploy intent: {exc.message} (live unchanged)",
                                  hint=exc.hint) from exc
        job.intent = intent
        _INTENT_ID.set(intent.id)
        interrupt.tally().committing.add((job.cert.name, job.host.name))

    async def settle(self, rem: RemoteSession, job: _Job, state: Result, inspect: Sequence[str]) -> Result:
        """Settle what interrupted runs left for this certificate on this host, from its live link as inspected.

        Returns the inspection to go on with: a fresh one when an intent was too young to tell "never
        switched" from "its commit is still running there" (intents.recheck_in), else `state`.
        """
        if self.store is None:
            return state
        try:
            left = await asyncio.to_thread(intents_mod.pending, self.store, job.cert.name, job.host.name)
            if not left:
                return state
            wait = intents_mod.recheck_in(left, layout=state.get("layout"), target=state.get("target"),
                                          versions=_versions(state), now=dt.datetime.now(dt.UTC))
            if wait > 0:
                # young: its commit may still be starting or running on the POP. Look again once the POP
                # lock is free — a running commit holds it until it ends, so what we read then is final.
                await asyncio.sleep(wait)
                state = await rem.run_script(INSPECT_SH, [*inspect, "1"], step="inspect")
                if (locked_out := popguard.lock_error(state, job.host, inspect[0])) is not None:
                    raise DeployError(locked_out, hint=popguard.LOCK_HINT)  # wrapped just below
            await asyncio.to_thread(intents_mod.settle, self.store, left, layout=state.get("layout"),
                                    target=state.get("target"), versions=_versions(state))
        except CertmgrError as exc:  # switching again before the last switch is audited would lose it
            raise DeployError(f"cannot settle an interrupted deploy: {exc.message} (nothing changed)",
                              hint=exc.hint) from exc
        return state

    async def one(self, rem: RemoteSession, job: _Job, *, preflight: bool = True) -> HostOutcome:
        """Deploy one job; when cancelled (SIGINT/SIGTERM) while its commit runs, let it finish and audit first.

        The commit script runs on on the POP whatever happens here; waiting (at most interrupt.GRACE, cut by a
        second cancellation) lets its outcome be audited now rather than settled from its intent next run.
        """
        work = asyncio.ensure_future(self._one_audited(rem, job, preflight=preflight))  # own context: _INTENT_ID
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # polled: a task group cancels its tasks only once, so the second signal arrives as a count
            deadline = self.loop.time() + interrupt.GRACE
            while job.intent is not None and not work.done() and interrupt.state().count < 2:
                if self.loop.time() >= deadline:
                    break
                await asyncio.wait([work], timeout=0.05)
            if not work.done():
                work.cancel()  # and let it unwind before the connection it uses is closed
                await asyncio.wait([work], timeout=self.timeouts.connect)
            if work.done() and not work.cancelled():
                work.exception()  # retrieved: its outcome is in the tally and the audit log already
            raise

    async def _one_audited(self, rem: RemoteSession, job: _Job, *, preflight: bool) -> HostOutcome:
        start = self.loop.time() - job.timings.get("connect", 0.0)
        try:
            outcome = await self._one(rem, job, start, preflight=preflight)
            if job.intent is not None and self.store is not None:
                # its outcome is audited (or nothing was switched): the intent has done its job
                try:
                    await asyncio.to_thread(intents_mod.remove, self.store, job.intent)
                except CertmgrError as exc:  # harmless: the next deploy finds its audit line and drops it
                    logger.error("deploy intent %s: %s", job.intent.relpath, exc)
            return outcome
        except remote_mod.RemoteTimeout as exc:
            event(logger, logging.ERROR, "remote script timed out; host left alone", cert=job.cert.name,
                  host=job.host.name)
            return self.outcome(job, Status.UNKNOWN, start=start,
                                hint=f"the script may still be running on {job.host.name} (it holds the POP lock "
                                     "until it ends); the next run inspects the host afresh",
                                error=f"deploy {job.cert.name} → {job.host.name}: {exc.message} (state unknown; "
                                      "host left alone for the rest of this run)")
        except remote_mod.ConnectionLost as exc:
            return self.outcome(job, Status.FAILED, start=start, hint=exc.hint,
                                error=f"deploy {job.cert.name} → {job.host.name}: {exc.message}")
        except DeployError as exc:
            return self.outcome(job, Status.FAILED, start=start, hint=exc.hint,
                                error=f"deploy {job.cert.name} → {job.host.name}: {exc.message}")

    async def _one(self, rem: RemoteSession, job: _Job, start: float, *, preflight: bool) -> HostOutcome:
        host, cert, name = job.host, job.cert, job.cert.name
        subject = f"deploy {name} → {host.name}"
        root = remote_mod.check_remote_path(host.cert_root)
        remote_mod.check_name(name)
        test = _argv(host.test_command, "test_command", host)
        reload = _argv(host.reload_command, "reload_command", host)
        names = sni_names(cert)
        t = self.loop.time()

        # 0. preflight + state in one script
        rem.prefetch_sftp()
        keyown = host.privkey_chown
        inspect = [root, name, test if preflight else "", keyown, self.lock_wait]
        state = await rem.run_script(INSPECT_SH, inspect, step="inspect")
        job.timings["inspect"] = self.loop.time() - t
        locked_out = popguard.lock_error(state, host, root)
        if locked_out:
            return self.outcome(job, Status.FAILED, start=start, error=f"{subject}: {locked_out} (nothing changed)",
                                hint=popguard.LOCK_HINT)
        if state.get("test_rc") is None:
            raise remote_mod.RemoteCommandError(
                f"inspect {host.name}: unexpected output (exit {state.exit_status}): "
                f"{_quote_text(state.stderr or state.stdout, 300)} (nothing changed)",
                hint="the login shell of the deploy user must be POSIX sh compatible, with coreutils")
        state = await self.settle(rem, job, state, inspect)
        f = state.fields
        for restored in state.all("restored"):
            event(logger, logging.WARNING, "restored certbot's live directory left by an interrupted conversion",
                  cert=restored, host=host.name)
        live_fullchain = b64bytes(state.get("fullchain_b64"))
        old_serial = _serial_of_pem(live_fullchain)
        layout = state.get("layout")
        target = state.get("target")
        prev_version = version_of_target(target, name)
        if state.get("test_rc") != "0":
            text = b64text(state.get("test_out") or "") or f"exit status {state.get('test_rc')}, no output"
            if text.startswith("sudo:") or state.get("test_rc") in ("126", "127"):
                return self.outcome(
                    job, Status.FAILED, start=start, old_serial=old_serial, version=prev_version,
                    error=f"{subject}: {command_label(host.test_command)} cannot run: {_quote_text(text)} "
                          "(nothing changed)",
                    hint="check test_command and the deploy user's sudoers lines (docs/deploy.md)")
            return self.outcome(
                job, Status.FAILED, start=start, old_serial=old_serial, version=prev_version,
                error=f"{subject}: config was already broken before deploy: {_quote_text(text)} (nothing changed)",
                hint=f"fix the web server config on {host.name} first; its test command fails without certmgr")
        # The store's version number names this certificate on every POP (falls back to the POP's
        # next free number only without a store version, as with a bare CertMaterial in tests).
        version = job.local_version if job.local_version is not None else next_version(f)
        # 2. skip: this exact fullchain is live under the store's number (a certbot directory has
        #    none), its key owned as configured, and every name serves it (handshakes only when it might be)
        if (live_fullchain == job.material.fullchain and (layout != "link" or prev_version == version)
                and key_owner_matches(keyown, state.get("key_owner"))
                and all(_serial_of_probe(p) == job.info.serial for p in (await self.served(host, names)).values())):
            return self.outcome(job, Status.SKIPPED, start=start, old_serial=old_serial, version=prev_version,
                                previous_version=prev_version)

        conv = ""
        if layout == "certbot":
            k, why = certbot_version(f, name)
            if k is None:
                return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial,
                                    error=f"{subject}: cannot convert certbot layout: {why} (nothing changed)",
                                    hint="repair live/<name>/ so its four links name the same version")
            conv = str(k)
            prev_version = k
        elif layout == "other":
            return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial,
                                error=f"{subject}: {root}/live/{name} is neither a symlink nor certbot's "
                                      "directory (nothing changed)")
        if interrupt.stopping():
            return self.not_started(job, start=start)

        # 3. upload into a temp dir; the commit script verifies SHA-256 before anything is renamed
        t = self.loop.time()
        tmp = f".tmp-up-{self.tag}-{version}-{secrets.token_hex(6)}"
        tmpdir = f"{root}/archive/{name}/{tmp}"
        files = {fname: (data, KEY_MODE if fname == "privkey.pem" else PEM_MODE)
                 for fname, data in job.material.files().items()}
        try:
            missing = set(state.all("missing"))
            ensure = [d for d, key in ((f"{root}/archive", "archive"), (f"{root}/live", "live"),
                                       (f"{root}/archive/{name}", "lineage")) if key in missing]
            await rem.upload_dir(tmpdir, files, dir_mode=DIR_MODE, ensure=ensure, fsync=False)
        except remote_mod.UploadError as exc:
            full = await self._no_space(rem, host, f"{root}/archive/{name}", files)
            await rem.remove_tree_quietly(tmpdir)
            return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial, version=prev_version,
                                error=f"{subject}: {full or exc.message} (live unchanged)",
                                hint="check free space and that the deploy user owns "
                                     f"{root}/archive/{name}/ and {root}/live/")
        except remote_mod.ConnectionLost as exc:
            return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial, version=prev_version,
                                error=f"{subject}: {exc.message} during upload (live unchanged)",
                                hint="rerun deploy; the partial upload is a hidden temp dir swept by the next run")
        job.timings["upload"] = self.loop.time() - t
        if interrupt.stopping():
            await rem.remove_tree_quietly(tmpdir)
            return self.not_started(job, start=start)
        try:
            await self.intend(job, version=version, layout=layout, target=target, conv=conv, old_serial=old_serial)
        except DeployError:
            await rem.remove_tree_quietly(tmpdir)
            raise

        # 4-6. verify sums, store, swap, test, reload — or swap back — in one script
        t = self.loop.time()
        stamp = self.now.strftime("%Y%m%dT%H%M%SZ")
        res = await rem.run_script(COMMIT_SH, [root, name, tmp, str(version), sha256sums(job.material), conv,
                                               test, reload, keyown, self.tag, stamp, self.lock_wait], step="commit")
        job.timings["commit"] = self.loop.time() - t
        locked_out = popguard.lock_error(res, host, root)
        if locked_out:
            await rem.remove_tree_quietly(tmpdir)
            return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial, version=prev_version,
                                error=f"{subject}: {locked_out} (live unchanged)", hint=popguard.LOCK_HINT)
        if res.get("aside") is not None:
            aside = res.get("aside")
            event(logger, logging.WARNING, "set aside a version directory of other content", cert=name,
                  host=host.name, version=version, to=aside)
            await self.audit("set aside", name, host=host.name, version=version, to=f"archive/{name}/{aside}",
                             summary=f"archive/{name}/{version}/ on {host.name} held other content: moved to "
                                     f"archive/{name}/{aside}/ so that {version} names the store's version")
        converted = res.get("converted") is not None
        if converted:
            cdir = res.get("convdir") or conv
            await self.audit("converted", name, frm="certbot live/ directory", to=f"live/{name} symlink",
                             host=host.name, version=int(conv),
                             summary=f"converted {name} on {host.name} from certbot's layout "
                                     f"(its version {conv} kept as archive/{name}/{cdir}/)")
        if res.get("failed_step") is not None:
            step = res.get("failed_step")
            text = b64text(res.get("failed_out") or "") or res.stderr.strip()
            if step in ("verify", "chown", "sync", "aside", "rename"):
                await rem.remove_tree_quietly(tmpdir)
            what = {"verify": "uploaded files do not match their SHA-256", "sync": "fsync failed",
                    "rename": "cannot store the version", "chown": f"cannot give privkey.pem to {keyown}",
                    "convert": "cannot convert certbot's layout",
                    "aside": f"cannot set aside archive/{name}/{version}/ (other content)",
                    "swap": "cannot switch the live link"}.get(step or "", f"step {step} failed")
            hint = None
            if step == "chown" or (step == "convert" and keyown and ("chown" in text or "chgrp" in text)):
                hint = (f"a deploy user that is not root can only give files to a group it belongs to: check "
                        f"privkey_owner/privkey_group of {host.name}")
            return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial, version=prev_version,
                                error=f"{subject}: {what}: {_quote_text(text)} (live unchanged)", hint=hint)
        if res.get("swapped") != "1":
            raise remote_mod.RemoteCommandError(
                f"commit {host.name}: unexpected output (exit {res.exit_status}): "
                f"{_quote_text(res.stderr or res.stdout, 300)} (state unknown: rerun deploy)")
        prev_target = res.get("prev") or ""
        prev_version = version_of_target(prev_target, name)
        if res.get("done") != "1":
            return await self._after_failed_test(job, res, start=start, old_serial=old_serial,
                                                 version=version, prev_version=prev_version, converted=converted)

        # 7. verify by handshake for every name
        t = self.loop.time()
        ok, seen = await self.wait_served(host, names, job.info.serial)
        job.timings["verify"] = self.loop.time() - t
        if ok:
            event(logger, logging.INFO, "deployed", cert=name, host=host.name, version=version,
                  serial=job.info.serial, old_serial=old_serial)
            await self.audit("deployed", name, frm=old_serial, to=job.info.serial, host=host.name,
                             version=version, previous_version=prev_version,
                             summary=f"deployed {name} to {host.name}: serial {old_serial or '-'} → {job.info.serial}")
            return self.outcome(job, Status.DEPLOYED, start=start, old_serial=old_serial, version=version,
                                previous_version=prev_version, converted=converted)
        cause = f"new serial {job.info.serial} not served after {self.timeouts.verify:g}s ({_served_text(seen)})"
        return await self._rollback_after_verify(rem, job, root, test, reload, prev_target, cause,
                                                 start=start, old_serial=old_serial, version=version,
                                                 prev_version=prev_version, converted=converted)

    async def _no_space(self, rem: RemoteSession, host: Host, path: str,
                        files: Mapping[str, tuple[bytes, int]]) -> str | None:
        """After a failed upload: "no space left on POP:<path> (N KB free)" when that is the cause, else None."""
        try:
            free = await rem.run_script(popguard.FREE_SH, [path], step="free space")
        except DeployError as exc:
            logger.info("free space on %s: %s", host.name, exc)
            return None
        return popguard.upload_failure(host, path, free, files)

    async def _after_failed_test(self, job: _Job, res: Result, *, start: float, old_serial: str | None,
                                 version: int, prev_version: int | None, converted: bool) -> HostOutcome:
        name, host = job.cert.name, job.host
        subject = f"deploy {name} → {host.name}"
        reload_failed = res.get("reload_rc") is not None
        if reload_failed:
            step, text = f"{command_label(host.reload_command)} failed", b64text(res.get("reload_out") or "")
        else:
            step, text = f"{command_label(host.test_command)} failed", b64text(res.get("test_out") or "")
        retest_ok = res.get("retest_rc") == "0" and res.get("rolled_back") == "1"
        back = f"version {prev_version}" if prev_version is not None else "the previous version"
        status = Status.FAILED
        if not retest_ok:
            again = b64text(res.get("retest_out") or "")
            outcome = (f"rollback to {back} done but the test still fails: {_quote_text(again, 300)}"
                       if res.get("rolled_back") == "1" else f"could NOT switch back to {back}")
        elif not reload_failed:
            outcome = f"rolled back to {back}, not reloaded"  # nginx never loaded the new files
            status = Status.ROLLED_BACK
        else:
            # The failed reload may have loaded the new files all the same: COMMIT_SH switched back,
            # tested and reloaded again; only a handshake shows which certificate is served now.
            again = ("reloaded again" if res.get("rereload_rc") == "0" else
                     f"reload failed again: {_quote_text(b64text(res.get('rereload_out') or ''), 300)}")
            restored, seen = ((await self.wait_served(host, sni_names(job.cert), old_serial))
                              if old_serial is not None else (res.get("rereload_rc") == "0", {}))
            if restored:
                outcome = f"rolled back to {back}, {again}" + (f": old serial {old_serial} served"
                                                                  if old_serial else "")
                status = Status.ROLLED_BACK
            else:
                outcome = f"switched back to {back}, {again}, but {host.name} serves {_served_text(seen)}"
        if status == Status.ROLLED_BACK:
            await self.audit("rolled back", name, frm=job.info.serial, to=old_serial, host=host.name,
                             version=prev_version, failed_version=version,
                             summary=f"rolled back {name} on {host.name} to {back}: {step}")
        else:
            await self.audit("rollback failed", name, frm=job.info.serial, to=old_serial, host=host.name,
                             summary=f"{subject}: {step}; {outcome}")
        ok = status == Status.ROLLED_BACK
        return self.outcome(job, status, start=start, old_serial=old_serial, previous_version=prev_version,
                            version=prev_version if ok else None, converted=converted,
                            error=f"{subject}: {step}: {_quote_text(text)} ({outcome})",
                            hint=None if ok else f"log in to {host.name} and repair the web server config now")

    async def _rollback_after_verify(self, rem: RemoteSession, job: _Job, root: str, test: str, reload: str,
                                     prev_target: str, cause: str, *, start: float, old_serial: str | None,
                                     version: int, prev_version: int | None, converted: bool) -> HostOutcome:
        name, host = job.cert.name, job.host
        subject = f"deploy {name} → {host.name}"
        back = f"version {prev_version}" if prev_version is not None else "the previous version"
        res = await rem.run_script(ROLLBACK_SH, [root, name, prev_target, test, reload, self.lock_wait],
                                   step="rollback")
        locked_out = popguard.lock_error(res, host, root)
        if locked_out:
            outcome = f"could NOT switch back to {back}: {locked_out}"
        elif res.get("rolled_back") != "1":
            outcome = f"could NOT switch back to {back}"
        elif res.get("retest_rc") != "0":
            outcome = f"switched back to {back} but the test fails: {_quote_text(b64text(res.get('retest_out') or ''))}"
        elif res.get("reload_rc") != "0":
            outcome = f"switched back to {back} but reload fails: {_quote_text(b64text(res.get('reload_out') or ''))}"
        else:
            restored = True
            if old_serial is not None:
                restored, _ = await self.wait_served(host, sni_names(job.cert), old_serial)
            if restored:
                await self.audit("rolled back", name, frm=job.info.serial, to=old_serial, host=host.name,
                                 version=prev_version, failed_version=version,
                                 summary=f"rolled back {name} on {host.name} to {back}: {cause}")
                return self.outcome(job, Status.ROLLED_BACK, start=start, old_serial=old_serial,
                                    version=prev_version, previous_version=prev_version, converted=converted,
                                    error=f"{subject}: {cause} (rolled back to {back}, reloaded)")
            outcome = f"switched back to {back} and reloaded, but serial {old_serial} is not served either"
        await self.audit("rollback failed", name, frm=job.info.serial, to=old_serial, host=host.name,
                         summary=f"{subject}: {cause}; {outcome}")
        return self.outcome(job, Status.FAILED, start=start, old_serial=old_serial, previous_version=prev_version,
                            converted=converted, error=f"{subject}: {cause} ({outcome})",
                            hint=f"log in to {host.name} and check what nginx serves")

    async def prune_one(self, rem: RemoteSession, job: _Job, keep: int) -> None:
        root = remote_mod.check_remote_path(job.host.cert_root)
        try:
            res = await rem.run_script(PRUNE_SH, [root, job.cert.name, str(keep), self.lock_wait], step="prune")
        except DeployError as exc:
            logger.warning("prune %s on %s: %s", job.cert.name, job.host.name, exc)
            return
        locked_out = popguard.lock_error(res, job.host, root)
        if locked_out:
            logger.warning("prune %s on %s: %s (nothing removed)", job.cert.name, job.host.name, locked_out)
            return
        removed = [int(v) for v in res.all("removed")]
        if removed:
            await self.audit("pruned", job.cert.name, host=job.host.name, removed=removed,
                             kept_live=res.get("kept_live"), keep=keep)
        for v in res.all("prune_failed"):
            logger.warning("prune %s on %s: could not remove version %s", job.cert.name, job.host.name, v)


def _argv(argv: Sequence[str], key: str, host: Host) -> str:
    if not argv:
        raise DeployError(f"deploy {host.name}: {key} is empty", hint=f"set {key} in [defaults] or [hosts.{host.name}]")
    return shlex.join(argv)


# ---------------------------------------------------------------------------- entry point


async def deploy(
    inventory: Inventory,
    store: Any,
    certs: Sequence[Certificate],
    *,
    hosts: Sequence[str] | None = None,
    parallel: int = 20,
    accept_new: bool = False,
    canary: Sequence[str] = (),
    prune: int | None = None,
    keep: int | None = None,
    now: dt.datetime,
    timeouts: Timeouts | None = None,
    connector: Connector | None = None,
    prober: Prober | None = None,
    on_outcome: Callable[[HostOutcome], None] | None = None,
) -> list[HostOutcome]:
    """Push the store's live version of each of `certs` to its hosts; one outcome per (cert, host).

    `on_outcome` is called with each outcome as soon as it is known (a host's outcomes when its task ends),
    for progress display; it must not raise.

    `hosts` limits the targets (names; unknown ones are a UsageError). Hosts tagged `canary` or
    named in `canary` go first; the rest only when every canary outcome is skipped/deployed
    (else they are HELD). At most `parallel` hosts at once; each host gets one SSH connection
    and its certificates in order. Expected failures become outcomes; the caller holds the store
    lock. Per-certificate state is saved to `state/deploy/<name>.json`; every change is audited.
    `prune` K prunes every deployed-to certificate on each host to its newest K versions; `keep`
    (retention, the inventory's keep_versions) does the same only where this call deployed a version.
    """
    if parallel < 1:
        raise UsageError(f"deploy: --parallel must be at least 1, not {parallel}")
    if prune is not None and prune < 1:
        raise UsageError(f"deploy: --prune must keep at least 1 version, not {prune}")
    wanted = set(hosts) if hosts else None
    if wanted is not None:
        unknown = sorted(wanted - set(inventory.hosts))
        if unknown:
            raise UsageError(f"deploy: no host named {', '.join(map(repr, unknown))} in the inventory")
    bad_canary = sorted(set(canary) - set(inventory.hosts))
    if bad_canary:
        raise UsageError(f"deploy: canary {', '.join(map(repr, bad_canary))} is not a host in the inventory")

    timeouts = timeouts or Timeouts()
    deployer = _Deployer(inventory=inventory, store=store, timeouts=timeouts, accept_new=accept_new,
                         connector=connector or _default_connector, prober=prober or _probe_with(timeouts),
                         prune=prune, keep=keep, now=now)
    outcomes: list[HostOutcome] = []
    by_host: dict[str, list[_Job]] = {}
    roots: list[tuple[x509.Certificate, ...]] = []  # certcheck's trust anchors, loaded once
    for cert in certs:
        targets = [h for h in cert.hosts if wanted is None or h in wanted]
        if not targets:
            continue
        try:
            material = store.read(cert.name)
            material.check()
            local_version = store.live_version(cert.name)
            if not roots:
                roots.append(certcheck.load_roots(inventory.trust, outcome="nothing changed"))
            # The same checks as before the version was stored (the lifetime bound aside: it was applied then)
            refused = certcheck.problems(material, certcheck.Expected(
                names=cert.domains, roots=roots[0], preferred_issuer=cert.preferred_chain, max_validity=None), now=now)
        except CertmgrError as exc:
            for h in targets:
                outcomes.append(HostOutcome(cert=cert.name, host=h, status=Status.FAILED, new_serial="-",
                                            error=f"deploy {cert.name} → {h}: {exc.message} (nothing changed)",
                                            hint=exc.hint))
            continue
        if refused:
            for h in targets:
                outcomes.append(HostOutcome(
                    cert=cert.name, host=h, status=Status.FAILED, new_serial=_serial_of_pem(material.cert) or "-",
                    error=f"deploy {cert.name} → {h}: version {local_version} refused: {'; '.join(refused)} "
                          "(nothing uploaded)", hint=certcheck.DEPLOY_HINT.format(name=cert.name)))
            continue
        info = material.info()
        interrupt.tally().plan(cert.name, targets)
        for h in targets:
            by_host.setdefault(h, []).append(_Job(cert=cert, host=inventory.hosts[h], material=material,
                                                  info=info, local_version=local_version))

    def told(outs: list[HostOutcome]) -> list[HostOutcome]:
        if on_outcome is not None:
            for o in outs:
                on_outcome(o)
        return outs

    told(list(outcomes))  # refused or unreadable before any host was touched
    canaries = [h for h in by_host if inventory.hosts[h].canary or h in canary]
    rest = [h for h in by_host if h not in canaries]
    sem = asyncio.Semaphore(parallel)

    async def bounded(h: str) -> list[HostOutcome]:
        async with sem:
            if interrupt.stopping():  # a signal asked to start nothing new
                return told([deployer.not_started(job, start=deployer.loop.time()) for job in by_host[h]])
            return told(await deployer.host_task(inventory.hosts[h], by_host[h]))

    async def wave(names: Sequence[str]) -> list[HostOutcome]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(bounded(h)) for h in names]
        return [o for t in tasks for o in t.result()]

    try:
        first = await wave(canaries) if canaries else []
        outcomes.extend(first)
        bad = [] if interrupt.stopping() else [o for o in first if not o.ok]  # stopped: rest is "not started"
        if not bad:
            outcomes.extend(await wave(rest))
    except asyncio.CancelledError:
        # a signal: keep what finished (commits under way were waited for); intents cover the rest
        _save_state(store, deployer.produced, by_host, now)
        raise
    if bad:
        why = ", ".join(sorted({o.host for o in bad}))
        for h in rest:
            for job in by_host[h]:
                outcomes.extend(told([HostOutcome(
                    cert=job.cert.name, host=h, status=Status.HELD, new_serial=job.info.serial,
                    error=f"deploy {job.cert.name} → {h}: held: canary {why} did not verify (not touched)",
                    hint="fix the canary, then rerun deploy")]))

    await asyncio.to_thread(_save_state, store, outcomes, by_host, now)
    return outcomes


def _versions(state: Result) -> set[int]:
    return {int(v) for v in state.all("version") if v.isdigit()}


def _probe_with(timeouts: Timeouts) -> Prober:
    async def p(address: str, port: int, sni: str) -> Probe:
        return await probe(address, port, sni, connect_timeout=timeouts.handshake,
                           handshake_timeout=timeouts.handshake)

    return p


def _save_state(store: Any, outcomes: Sequence[HostOutcome], by_host: Mapping[str, list[_Job]],
                now: dt.datetime) -> None:
    """Merge this run's outcomes into `state/deploy/<name>.json` ({"hosts": {host: {...}}})."""
    if store is None:
        return
    local_versions = {j.cert.name: j.local_version for jobs in by_host.values() for j in jobs}
    per_cert: dict[str, list[HostOutcome]] = {}
    for o in outcomes:
        per_cert.setdefault(o.cert, []).append(o)
    for name, outs in per_cert.items():
        path = f"state/deploy/{name}.json"
        try:
            state = store.load_json(path, default={}) or {}
        except CertmgrError as exc:
            logger.error("deploy state %s: %s (starting afresh)", name, exc)
            state = {}
        hosts_state = state.setdefault("hosts", {})
        for o in outs:
            entry = hosts_state.setdefault(o.host, {})
            entry.update({"status": o.status.value, "at": now.isoformat(), "error": o.error,
                          "wanted_serial": o.new_serial, "local_version": local_versions.get(name)})
            if o.status == Status.DEPLOYED:
                entry["deployed_at"] = now.isoformat()
            if o.status in (Status.DEPLOYED, Status.SKIPPED):
                entry.update({"serial": o.new_serial, "version": o.version})
            elif o.status == Status.ROLLED_BACK:
                entry.update({"serial": o.old_serial, "version": o.version})
        try:
            store.save_json(path, state)
        except CertmgrError as exc:
            logger.error("deploy state %s: %s", name, exc)
