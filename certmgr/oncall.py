"""On-call: run one certmgr command as the installed service runs it — its user, its state directory, its credentials.

An inventory that reads secrets with `*_credential` needs systemd's `$CREDENTIALS_DIRECTORY`, which only a
unit has. `certmgr as-service renew NAME` reads the installed certmgr.service (`systemctl cat`), takes its
User=, Group=, StateDirectory= and LoadCredential= lines, and runs the command in a transient unit with the
same settings (`systemd-run --wait --collect`). Nothing is copied out of the credential store and nothing in
the state directory ends up owned by root.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from certmgr.errors import UsageError

SERVICE = "certmgr.service"
# the [Service] settings a transient unit needs to act as the service does, and how they are passed on
_KEYS = ("User", "Group", "StateDirectory", "ConfigurationDirectory", "LoadCredential", "LoadCredentialEncrypted",
         "SetCredential", "SetCredentialEncrypted", "Environment", "UMask")
_LISTS = ("LoadCredential", "LoadCredentialEncrypted", "SetCredential", "SetCredentialEncrypted", "Environment")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """What `certmgr as-service` copies from the installed unit: (key, value) in file order, and its ExecStart."""

    properties: tuple[tuple[str, str], ...]
    exec_start: str | None  # first word of ExecStart=: the certmgr the service runs

    @property
    def credentials(self) -> tuple[str, ...]:
        return tuple(v.split(":", 1)[0] for k, v in self.properties if "Credential" in k)


def parse_unit(text: str) -> ServiceSettings:
    """`systemctl cat` output (unit file, then drop-ins): the [Service] settings of _KEYS, later ones winning
    for single values, list values accumulating (an empty assignment resets a list, as in systemd)."""
    single: dict[str, str] = {}
    lists: dict[str, list[str]] = {k: [] for k in _LISTS}
    exec_start: str | None = None
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, eq, value = line.partition("=")
        if section != "Service" or not eq:
            continue
        key, value = key.strip(), value.strip()
        if key == "ExecStart" and value:
            exec_start = value.lstrip("-@:+!").split()[0]
        elif key in _LISTS:
            if value:
                lists[key].append(value)
            else:
                lists[key].clear()
        elif key in _KEYS:
            single[key] = value
    props = [(k, v) for k, v in single.items() if v] + [(k, v) for k in _LISTS for v in lists[k]]
    order = {k: i for i, k in enumerate(_KEYS)}
    return ServiceSettings(properties=tuple(sorted(props, key=lambda kv: order[kv[0]])), exec_start=exec_start)


def systemd_run_argv(settings: ServiceSettings, args: Sequence[str], *, tty: bool,
                     fallback_exe: str = "certmgr") -> list[str]:
    """`systemd-run --wait --collect --quiet --pty|--pipe -p KEY=VALUE… -- CERTMGR ARGS…` (no shell anywhere)."""
    argv = ["systemd-run", "--wait", "--collect", "--quiet", "--pty" if tty else "--pipe",
            "--unit", "certmgr-oncall", "--description", "certmgr on-call command (certmgr as-service)"]
    for key, value in settings.properties:
        argv += ["-p", f"{key}={value}"]
    return [*argv, "--", settings.exec_start or fallback_exe, *args]


def service_settings(systemctl: Callable[[Sequence[str]], tuple[int, str, str]]) -> ServiceSettings:
    """The installed certmgr.service, as systemd has it (`systemctl cat`); a UsageError when there is none."""
    try:
        rc, out, err = systemctl(["cat", SERVICE, "--no-pager"])
    except FileNotFoundError:
        raise UsageError("as-service: systemctl not found: no systemd here (nothing run)",
                         hint="set the secrets with *_file or *_env instead of *_credential on this host") from None
    if rc != 0 or not out.strip():
        why = " ".join((err or out or f"exit {rc}").split())[:200]
        raise UsageError(f"as-service: cannot read the installed {SERVICE}: {why} (nothing run)",
                         hint="install systemd/certmgr.service (docs/systemd.md), or run doctor on the host "
                              "where it runs")
    settings = parse_unit(out)
    if not any(k == "User" for k, _ in settings.properties):
        raise UsageError(f"as-service: {SERVICE} sets no User= (nothing run)",
                         hint="certmgr.service should run as its own user (see systemd/certmgr.service)")
    return settings
