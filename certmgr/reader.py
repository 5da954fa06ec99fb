"""Reading typed values out of parsed TOML tables, collecting every problem (and warning) with its key path.

The inventory parser (`certmgr.inventory`) is built on `Reader`; durations and thresholds are parsed here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

from certmgr.model import SecretRef, Threshold
from certmgr.model import suggest as _suggest
from certmgr.names import type_name as _tname

T = TypeVar("T")


class Reader:
    """Collects problems while reading typed values out of nested tables."""

    def __init__(self, base: Path) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.base = base

    def err(self, keypath: str, msg: str) -> None:
        self.problems.append(f"{keypath}: {msg}")

    def warn(self, keypath: str, msg: str) -> None:
        self.warnings.append(f"{keypath}: {msg}")

    def table(self, data: object, keypath: str, allowed: set[str], secrets: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
        if not isinstance(data, dict):
            self.err(keypath, f"must be a table, not {_tname(data)}")
            return {}
        known = allowed | {f"{s}_{k}" for s in secrets for k in ("file", "credential", "env")}
        for key in data:
            if key in secrets:
                self.err(f"{keypath}.{key}" if keypath else key,
                         f"secrets must not be written inline; use {key}_file, {key}_credential or {key}_env")
            elif key not in known:
                self.err(f"{keypath}.{key}" if keypath else key, f"unknown key{_suggest(key, sorted(known))}")
        return data

    def get(self, data: dict[str, Any], key: str, keypath: str, typ: type[T] | tuple[type, ...],
            default: Any = None, required: bool = False) -> Any:
        kp = f"{keypath}.{key}" if keypath else key
        if key not in data:
            if required:
                self.err(kp, "required key is missing")
            return default
        value = data[key]
        # bool is an int subclass: never accept it where a number is wanted
        if isinstance(value, bool) and typ is not bool and not (isinstance(typ, tuple) and bool in typ):
            self.err(kp, f"must be {_typname(typ)}, not a boolean")
            return default
        if not isinstance(value, typ):
            self.err(kp, f"must be {_typname(typ)}, not {_tname(value)}")
            return default
        return value

    def strlist(self, data: dict[str, Any], key: str, keypath: str, default: tuple[str, ...] = (),
                required: bool = False, nonempty: bool = False) -> tuple[str, ...] | None:
        kp = f"{keypath}.{key}" if keypath else key
        value = self.get(data, key, keypath, list, required=required)
        if value is None:
            return default if key not in data else None
        out = []
        ok = True
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.err(f"{kp}[{i}]", f"must be a string, not {_tname(item)}")
                ok = False
            else:
                out.append(item)
        if nonempty and not value:
            self.err(kp, "must not be empty")
            return None
        return tuple(out) if ok else None

    def secret(self, data: dict[str, Any], key: str, keypath: str, required: bool) -> SecretRef | None:
        refs = [(k, data[f"{key}_{k}"]) for k in ("file", "credential", "env") if f"{key}_{k}" in data]
        if len(refs) > 1:
            self.err(f"{keypath}.{key}_*", f"give exactly one of {key}_file, {key}_credential, {key}_env")
            return None
        if not refs:
            if required and key not in data:  # inline secrets are reported by table()
                self.err(f"{keypath}.{key}_file", f"required: the {key} must come from {key}_file, "
                         f"{key}_credential or {key}_env")
            return None
        kind, where = refs[0]
        kp = f"{keypath}.{key}_{kind}"
        if not isinstance(where, str) or not where:
            self.err(kp, f"must be a non-empty string, not {_tname(where)}")
            return None
        if kind == "file":
            where = str(self.path(where))
        elif kind == "credential" and ("/" in where or where.startswith(".")):
            self.err(kp, f"{where!r} is not a credential name (no '/' or leading '.')")
            return None
        elif kind == "env" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", where):
            self.err(kp, f"{where!r} is not an environment variable name")
            return None
        return SecretRef(kind, where, kp)

    def path(self, value: str) -> Path:
        """A local path: `~` and `${VAR}` expanded (e.g. `${CREDENTIALS_DIRECTORY}/id_ed25519` under systemd),
        relative paths taken from the inventory's directory. A variable that is not set leaves the path
        as written, so the step that opens it fails naming it."""
        if "$" in value:
            expanded = os.path.expandvars(value)
            if "$" in expanded:
                return Path(value)
            value = expanded
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def duration(self, data: dict[str, Any], key: str, keypath: str, default: float) -> float:
        return self._parsed(data, key, keypath, default, parse_duration,
                            "is not a duration (e.g. \"90s\", \"15m\", \"12h\", \"30d\")")

    def threshold(self, data: dict[str, Any], key: str, keypath: str, default: Threshold | None) -> Threshold | None:
        return self._parsed(data, key, keypath, default, parse_threshold,
                            "is neither a duration (\"30d\") nor a fraction of the lifetime (\"1/3\", \"0.25\")")

    def _parsed(self, data: dict[str, Any], key: str, keypath: str, default: T,
                parse: Callable[[str], T | None], wanted: str) -> T:
        """A string value through `parse`; `default` when absent, an error (`VALUE wanted`) when it does not parse."""
        value = self.get(data, key, keypath, str)
        if value is None:
            return default
        parsed = parse(value)
        if parsed is None:
            self.err(f"{keypath}.{key}" if keypath else key, f"{value!r} {wanted}")
            return default
        return parsed

    def choice(self, data: dict[str, Any], key: str, keypath: str, choices: tuple[str, ...], default: str | None,
               required: bool = False) -> str | None:
        value = self.get(data, key, keypath, str, required=required)
        if value is None:
            return default
        if value not in choices:
            self.err(f"{keypath}.{key}" if keypath else key,
                     f"{value!r} is not one of {', '.join(choices)}{_suggest(value, list(choices))}")
            return default
        return value  # type: ignore[no-any-return]

    def argv(self, data: dict[str, Any], key: str, keypath: str, default: tuple[str, ...]) -> tuple[str, ...]:
        kp = f"{keypath}.{key}" if keypath else key
        if key in data and isinstance(data[key], str):
            self.err(kp, "must be a list of arguments (argv), e.g. [\"sudo\", \"-n\", \"nginx\", \"-t\"]; "
                     "certmgr never runs a shell string")
            return default
        value = self.strlist(data, key, keypath, default=default)
        if value is None:
            return default
        if key in data and not value:
            self.err(kp, "must not be empty")
            return default
        for i, arg in enumerate(value):
            if "\x00" in arg or "\n" in arg:
                self.err(f"{kp}[{i}]", "contains a NUL or newline")
        return value

    def port(self, data: dict[str, Any], key: str, keypath: str, default: int) -> int:
        value = self.get(data, key, keypath, int, default=default)
        if not 1 <= value <= 65535:
            self.err(f"{keypath}.{key}", f"{value} is not a port number (1-65535)")
            return default
        return int(value)


def parse_duration(text: str) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*", text)
    if not m:
        return None
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_threshold(text: str) -> Threshold | None:
    secs = parse_duration(text)
    if secs is not None:
        return Threshold(seconds=secs, text=text)
    try:
        frac = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        return None
    if not 0 < frac < 1:
        return None
    return Threshold(fraction=frac, text=text.strip())


def _typname(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(_typname(t) for t in typ)
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
            dict: "a table"}.get(typ, typ.__name__)
