"""Pure per-certificate decisions from a POP's inspection (skip, convert, refuse, upload as version N),
and the small helpers they use: no I/O here.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509

from certmgr import sanitize
from certmgr.deploy.model import CertState
from certmgr.inventory import Certificate
from certmgr.material import CertMaterial, serial_text
from certmgr.probe import Probe

FILE_ORDER = ("fullchain.pem", "privkey.pem", "cert.pem", "chain.pem")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do with one certificate on one host, from its inspection."""

    old_serial: str | None  # the serial live there now
    prev_version: int | None  # the archive version live there now (certbot's K for its layout)
    version: int  # the number the new version gets on the POP
    conv: str = ""  # certbot's version to convert from ("": not certbot's layout)
    maybe_skip: bool = False  # this exact version is live: skip if every name serves it
    refused: str | None = None  # why nothing can be done ("... (nothing changed)")
    hint: str | None = None


def decide(state: CertState, *, name: str, root: str, fullchain: bytes, local_version: int | None,
           keyown: str) -> Decision:
    """Decide for one certificate: refuse (a layout certmgr cannot handle), maybe skip, or deploy as a version."""
    old_serial = serial_of_pem(state.fullchain)
    prev_version = version_of_target(state.target, name)
    # The store's version number names this certificate on every POP (falls back to the POP's
    # next free number only without a store version, as with a bare CertMaterial in tests).
    version = local_version if local_version is not None else next_version(state.fields)
    maybe_skip = (state.fullchain == fullchain and (state.layout != "link" or prev_version == version)
                  and key_owner_matches(keyown, state.key_owner))
    base = Decision(old_serial=old_serial, prev_version=prev_version, version=version, maybe_skip=maybe_skip)
    if state.layout == "certbot":
        k, why = certbot_version(state.fields, name)
        if k is None:
            return Decision(old_serial=old_serial, prev_version=prev_version, version=version,
                            maybe_skip=maybe_skip, refused=f"cannot convert certbot layout: {why} (nothing changed)",
                            hint="repair live/<name>/ so its four links name the same version")
        return Decision(old_serial=old_serial, prev_version=k, version=version, conv=str(k), maybe_skip=maybe_skip)
    if state.layout == "other":
        return Decision(old_serial=old_serial, prev_version=prev_version, version=version, maybe_skip=maybe_skip,
                        refused=f"{root}/live/{name} is neither a symlink nor certbot's directory (nothing changed)")
    return base


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
    if prog == "pkill" and len(args) >= 3:
        return f"{prog} {args[1]} {args[-1]}"  # `pkill -HUP -F /run/nginx.pid -x nginx` → pkill -HUP nginx
    return prog


@functools.lru_cache(maxsize=1024)
def serial_of_pem(pem: bytes | None) -> str | None:
    """Serial of the first certificate in `pem` (a fullchain's leaf), or None.

    Only the serial, and cached by the bytes: a deploy asks for the same few certificates' serials
    on every POP, and a full CertInfo (names, key type, …) per handshake was about a fifth of certmgr's CPU.
    """
    if not pem:
        return None
    try:
        return serial_text(x509.load_pem_x509_certificate(pem).serial_number)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _serial_of_der(der: bytes) -> str | None:
    try:
        return serial_text(x509.load_der_x509_certificate(der).serial_number)
    except ValueError:
        return None


def serial_of_probe(p: Probe) -> str | None:
    """Serial of the leaf a handshake was served, or None (no handshake, no certificate, unparsable)."""
    if not p.ok or not p.chain:
        return None
    return _serial_of_der(p.chain[0])


def served_text(seen: Mapping[str, Probe]) -> str:
    """`name: serial` per handshake (or why there was none)."""
    return ", ".join(f"{n}: {serial_of_probe(p) or p.error or 'no certificate'}" for n, p in seen.items()) or "nothing"


def verify_failure(serial: str, seen: Mapping[str, Probe], limit: float) -> str:
    """Why verify failed: the new serial never answered on some name, or it answered on every name but the
    confirmation rounds (an old worker may still answer) did not finish within the limit."""
    if seen and all(serial_of_probe(p) == serial for p in seen.values()):
        return (f"new serial {serial} served on every name but not confirmed within {limit:g}s "
                f"(confirmation rounds cut by the verify timeout: {served_text(seen)})")
    return f"new serial {serial} not served after {limit:g}s ({served_text(seen)})"


def quote_text(text: str, limit: int = 600) -> str:
    # A POP's output (nginx -t, stderr) is foreign text: one inert line (no ESC, no forged line).
    return '"' + sanitize.flat(text, limit=limit).replace('"', "'") + '"'
