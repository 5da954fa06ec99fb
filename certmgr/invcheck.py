"""`inventory check` beyond the file itself: the local files it names are there, chat URLs it reads are sane.

`inventory.load` only parses (it must work on a machine that has none of the files, and under systemd
before credentials are mounted); this module looks at this machine and says plainly what only a run can check.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certmgr.errors import SecretError
from certmgr.inventory import Inventory, SecretRef
from certmgr.names import url_problem


@dataclass(frozen=True, slots=True, kw_only=True)
class FileReport:
    """Problems (the inventory cannot work on this machine) and notes (what only a run can check)."""

    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _secrets(inv: Inventory) -> Iterator[tuple[SecretRef, bool]]:
    """Every secret reference, and whether its value is a chat URL."""
    for ca in inv.cas.values():
        if ca.eab_hmac_key is not None:
            yield ca.eab_hmac_key, False
    for prov in inv.dns.values():
        for ref in prov.config.secrets():  # each provider type declares its own
            yield ref, False
    for ch in inv.channels.values():
        if ch.url is not None:
            yield ch.url, True
        if ch.token is not None:
            yield ch.token, False


def _unexpanded(path: Path) -> bool:
    """A `${VAR}` left as written because VAR is not set here (e.g. CREDENTIALS_DIRECTORY outside systemd)."""
    return "$" in str(path)


def _file_problem(path: Path, *, pem: bool = False) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if pem:
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            return f"{path} holds no PEM certificate"
    return None


def check_files(inv: Inventory) -> FileReport:
    """Every `*_file` secret, trust bundle, SSH key and known_hosts the inventory names, looked at on this machine."""
    problems: list[str] = []
    later: list[str] = []
    for ref, is_url in _secrets(inv):
        if ref.kind != "file" or _unexpanded(Path(ref.where)):
            later.append(ref.key_path)
            continue
        try:
            value = ref.read()
        except SecretError as exc:
            problems.append(exc.message)
            continue
        if is_url and (p := url_problem(value)) is not None:
            problems.append(f"{ref.key_path}: the URL in {ref.where} {p}")  # never the URL itself
    trust: list[tuple[str, Path]] = [(f"defaults.trust[{i}]", p) for i, p in enumerate(inv.trust)]
    trust += [(f"ca.{ca.name}.trust", ca.trust) for ca in inv.cas.values() if ca.trust is not None]
    for key, path in trust:
        if _unexpanded(path):
            later.append(key)
        elif (p := _file_problem(path, pem=True)) is not None:
            problems.append(f"{key}: {p}")
    # SSH key and known_hosts usually come from [defaults]: one line per path, naming the hosts using it
    by_path: dict[tuple[str, Path], list[str]] = {}
    for host in inv.hosts.values():
        for key, where in (("ssh_key_file", host.ssh_key_file), ("known_hosts", host.known_hosts)):
            if where is not None:
                by_path.setdefault((key, where), []).append(host.name)
    for (key, path), hosts in by_path.items():
        if len(hosts) == 1:
            first = f"hosts.{hosts[0]}.{key}"
        elif len(hosts) == len(inv.hosts):
            first = f"hosts.*.{key} (all {len(hosts)} hosts, from [defaults] or each host)"
        else:
            first = f"hosts.{hosts[0]}.{key} (and {len(hosts) - 1} more hosts)"
        if _unexpanded(path):
            later.append(first)
        elif (p := _file_problem(path)) is not None:
            if key == "known_hosts" and not path.exists():
                p += (f" (create it with the POPs' keys, or `touch {path}` and run `certmgr deploy --accept-new`"
                      " once to record them)")
            problems.append(f"{first}: {p}")
    notes = []
    if later:
        notes.append(f"{', '.join(later)}: systemd credentials, environment variables and ${{VAR}} paths are "
                     "read at run time, not here (`certmgr doctor` under the service's environment reads them)")
    return FileReport(problems=tuple(problems), notes=tuple(notes))
