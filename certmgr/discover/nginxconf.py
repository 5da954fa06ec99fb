"""The effective nginx configuration of one host, from `nginx -T` output, parsed with crossplane.

`nginx -T` prints every file it loaded, each after a `# configuration file PATH:` line; the
dump is split on those lines (nginx's own framing, not nginx syntax), each file is parsed by
crossplane from a private temp file, and `include`s are followed within the dump only: nothing
here ever opens a path named by the host's configuration on this machine.
"""

from __future__ import annotations

import fnmatch
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crossplane

MAX_FILES = 2000  # files in one dump
MAX_INCLUDE_DEPTH = 16
_HEADER = "# configuration file "


class DumpError(Exception):
    """The dump cannot be used at all (empty, no file sections, main file does not parse)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    """One `listen` directive: the port, whether TLS is on, and the address as written ("" for any)."""

    address: str
    port: int
    ssl: bool
    default_server: bool = False

    def shape(self) -> str:
        """Port and flags only: each POP listens on its own address, so drift ignores it."""
        return f"{self.port}{' ssl' if self.ssl else ''}{' default_server' if self.default_server else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CertRef:
    """One `ssl_certificate` (with its `ssl_certificate_key`) as configured, and where."""

    certificate: str  # as written, resolved against nginx's prefix when relative
    key: str | None
    dynamic: bool  # contains a $variable: nginx picks the file per handshake
    file: str  # the configuration file holding the ssl_certificate directive
    line: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerBlock:
    """One `server { }` of the http context, includes followed, with what it inherits from `http`."""

    file: str
    line: int
    listens: tuple[Listen, ...]
    names: tuple[str, ...]
    certs: tuple[CertRef, ...]
    tls: tuple[tuple[str, tuple[str, ...]], ...]  # every ssl_* directive, in order (for drift)
    includes: tuple[str, ...]  # files included into this block, in order

    @property
    def ssl_ports(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(lst.port for lst in self.listens if lst.ssl))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The parse of one dump: server blocks, the files seen, and per-file parse problems."""

    main: str
    prefix: str  # directory of the main file: nginx resolves relative paths against it
    files: tuple[str, ...]
    servers: tuple[ServerBlock, ...]
    problems: tuple[str, ...] = ()
    pid: str | None = None  # the main context's `pid` directive (None: nginx's compiled-in --pid-path)


def split_dump(text: str) -> list[tuple[str, str]]:
    """`nginx -T` output → [(path, content)], in dump order; text before the first header is dropped."""
    files: list[tuple[str, str]] = []
    path: str | None = None
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if stripped.startswith(_HEADER) and stripped.endswith(":"):
            if path is not None:
                files.append((path, "".join(lines)))
            path = stripped[len(_HEADER):-1]
            lines = []
            if len(files) >= MAX_FILES:
                raise DumpError(f"more than {MAX_FILES} configuration files in the dump")
        elif path is not None:
            lines.append(line)
    if path is not None:
        files.append((path, "".join(lines)))
    return files


def _parse_one(content: str, tmpdir: Path, index: int) -> tuple[list[dict[str, Any]], list[str]]:
    # Our own file name, never the host's: a hostile path cannot point crossplane anywhere.
    tmp = tmpdir / f"{index}.conf"
    tmp.write_text(content, encoding="utf-8", errors="surrogateescape")
    # single: includes are followed by us, within the dump; no context or arity checks: nginx
    # itself accepted this configuration, and third-party directives are unknown to crossplane.
    payload = crossplane.parse(str(tmp), single=True, catch_errors=True, check_ctx=False, check_args=False)
    cfg = payload["config"][0]
    problems = [f"line {e.get('line')}: {e.get('error')}" for e in cfg.get("errors", [])]
    return cfg.get("parsed", []), problems


def _glob_match(pattern: str, path: str) -> bool:
    """glob(3) semantics for an include pattern: wildcards do not cross '/'."""
    pp, cp = pattern.split("/"), path.split("/")
    return len(pp) == len(cp) and all(fnmatch.fnmatchcase(c, p) for p, c in zip(pp, cp, strict=True))


def _listen(args: Sequence[str]) -> Listen | None:
    if not args:
        return None
    spec = args[0]
    if spec.startswith("unix:"):
        return None
    address, port_s = "", spec
    if spec.startswith("["):  # [::]:443 or [::1]
        end = spec.find("]")
        address, rest = spec[: end + 1], spec[end + 1:]
        port_s = rest[1:] if rest.startswith(":") else "80"
    elif ":" in spec:
        address, _, port_s = spec.rpartition(":")
    elif not spec.isdigit():
        address, port_s = spec, "80"
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        return None
    flags = set(args[1:])
    return Listen(address=address, port=int(port_s), ssl="ssl" in flags,
                  default_server="default_server" in flags or "default" in flags)


def parse_dump(text: str) -> Config:
    """Parse a whole `nginx -T` dump; raises DumpError only when there is nothing usable."""
    files = split_dump(text)
    if not files:
        raise DumpError("no '# configuration file' sections (not nginx -T output)")
    main = files[0][0]
    prefix = posixpath.dirname(main) or "/"
    parsed: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="certmgr-discover-") as td:
        for i, (path, content) in enumerate(files):
            if path in parsed:
                continue
            try:
                stmts, errs = _parse_one(content, Path(td), i)
            except (UnicodeError, OSError) as exc:
                stmts, errs = [], [str(exc)]
            parsed[path] = stmts
            problems += [f"{path}: {e}" for e in errs]
    if not parsed[main] and problems:
        raise DumpError(f"main file {main} does not parse: {problems[0]}")
    order = list(parsed)

    def resolve(p: str) -> str:
        return p if p.startswith("/") else posixpath.normpath(posixpath.join(prefix, p))

    def expand(stmts: list[dict[str, Any]], file: str, depth: int,
               trail: list[str]) -> Iterator[tuple[str, dict[str, Any], tuple[str, ...]]]:
        """Statements with includes replaced by the included files' statements: (file, stmt, via)."""
        for st in stmts:
            if st.get("directive") == "include" and st.get("args"):
                pattern = resolve(st["args"][0])
                targets = [f for f in order if _glob_match(pattern, f)] if any(c in pattern for c in "*?[") \
                    else ([pattern] if pattern in parsed else [])
                if not targets and not any(c in pattern for c in "*?["):
                    problems.append(f"{file}:{st.get('line')}: include {pattern} is not in the dump")
                for t in targets:
                    if depth >= MAX_INCLUDE_DEPTH or t in trail:
                        problems.append(f"{file}:{st.get('line')}: include {t} nested too deep or in a loop")
                        continue
                    for f, s, via in expand(parsed[t], t, depth + 1, [*trail, t]):
                        yield f, s, (t, *via)
            else:
                yield file, st, ()

    servers: list[ServerBlock] = []
    pid: str | None = None
    for file, st, _ in expand(parsed[main], main, 0, [main]):
        if st.get("directive") == "pid" and st.get("args"):
            pid = resolve(st["args"][0])  # the reload signals through it (deploy/reload.py)
        if st.get("directive") != "http":
            continue
        inherited: list[tuple[str, dict[str, Any]]] = []
        http_servers: list[tuple[str, dict[str, Any]]] = []
        for f, s, _ in expand(st.get("block", []), file, 0, [file]):
            if s.get("directive") == "server":
                http_servers.append((f, s))
            elif str(s.get("directive", "")).startswith("ssl_"):
                inherited.append((f, s))
        for f, s in http_servers:
            servers.append(_server(f, s, inherited, expand, resolve))
    return Config(main=main, prefix=prefix, files=tuple(order), servers=tuple(servers), problems=tuple(problems),
                  pid=pid)


def _server(file: str, st: dict[str, Any], inherited: list[tuple[str, dict[str, Any]]], expand: Any,
            resolve: Any) -> ServerBlock:
    listens: list[Listen] = []
    names: list[str] = []
    own: list[tuple[str, dict[str, Any]]] = []
    includes: list[str] = []
    for f, s, via in expand(st.get("block", []), file, 0, [file]):
        for v in via:
            if v not in includes:
                includes.append(v)
        d = s.get("directive")
        args = [str(a) for a in s.get("args", [])]
        if d == "listen":
            lst = _listen(args)
            if lst is not None:
                listens.append(lst)
        elif d == "server_name":
            names += [a for a in args if a not in names]
        elif str(d).startswith("ssl_"):
            own.append((f, s))
    if not listens:
        listens.append(Listen(address="", port=80, ssl=False))  # nginx's default for a server without listen
    # ssl_certificate* set in the server replace the http-level ones; other ssl_* merge per directive
    own_dirs = {s["directive"] for _, s in own}
    effective = [(f, s) for f, s in inherited if s["directive"] not in own_dirs] + own
    certs_at = [(f, s) for f, s in effective if s["directive"] == "ssl_certificate" and s.get("args")]
    keys = [str(s["args"][0]) for _, s in effective if s["directive"] == "ssl_certificate_key" and s.get("args")]
    certs = []
    for i, (f, s) in enumerate(certs_at):
        path = str(s["args"][0])
        key = keys[i] if i < len(keys) else None
        dynamic = "$" in path
        certs.append(CertRef(certificate=path if dynamic else resolve(path),
                             key=None if key is None else (key if "$" in key or key.startswith("data:")
                                                           else resolve(key)),
                             dynamic=dynamic, file=f, line=int(s.get("line", 0))))
    tls = tuple((str(s["directive"]), tuple(str(a) for a in s.get("args", []))) for _, s in effective)
    return ServerBlock(file=file, line=int(st.get("line", 0)), listens=tuple(listens), names=tuple(names),
                       certs=tuple(certs), tls=tls, includes=tuple(includes))
