"""A discover Report as JSON (schema in docs/discover.md) and as tables for a terminal.

Every string that came from a host (names, paths, errors) goes through `clean`: no control
characters reach the operator's terminal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from certmgr.discover.model import Binding, Report
from certmgr.discover.text import clean
from certmgr.material import CertInfo

SCHEMA_VERSION = 1


def _cert(info: CertInfo | None, now: dt.datetime) -> dict[str, Any] | None:
    if info is None:
        return None
    return {"serial": info.serial, "sha256": info.sha256, "not_after": info.not_after.isoformat(),
            "days_left": round((info.not_after - now).total_seconds() / 86400, 1), "issuer": info.issuer,
            "subject": info.subject, "names": list(info.names)}


def _binding(b: Binding, now: dt.datetime) -> dict[str, Any]:
    return {"host": b.host, "port": b.port, "config": b.config, "file": b.certificate, "real_path": b.real_path,
            "status": b.status, "certificate": _cert(b.info, now), "managed": b.managed, "lineage": b.lineage,
            "served": b.served, "served_serial": b.served_serial, "served_error": b.served_error}


def to_json(r: Report) -> dict[str, Any]:
    """The whole report in the documented `--json` schema."""
    now = r.started
    names: dict[str, list[dict[str, Any]]] = {}
    for b in r.bindings:
        names.setdefault(b.name, []).append(_binding(b, now))
    return {
        "schema": SCHEMA_VERSION,
        "discovered_at": now.isoformat(),
        "elapsed_s": round(r.elapsed, 3),
        "hosts": list(r.hosts),
        "errors": [{"host": h, "error": e} for h, e in r.errors.items()],
        "problems": [{"host": h, "problem": p} for h, p in r.problems],
        "names": [{"name": n, "served_by": bs} for n, bs in names.items()],
        "unmanaged": [{**(_cert(u.info, now) or {}), "served_names": list(u.names), "hosts": list(u.hosts),
                       "files": list(u.paths), "where": [{"host": h, "file": f} for h, f in u.where],
                       "leaf_pem": u.leaf_pem} for u in r.unmanaged],
        "drift": {
            "partial_names": [{"name": p.name, "served_on": list(p.served_on), "missing_on": list(p.missing_on)}
                              for p in r.partial],
            "server_blocks": [{"name": d.name, "port": d.port, "variants": [
                {"hosts": list(hosts), "lines": list(lines)} for lines, hosts in d.variants]} for d in r.drift],
        },
        "orphans": [{"host": o.host, "file": o.path, "certificate": _cert(o.info, now)} for o in r.orphans],
        "key_mismatches": [{"host": k.host, "certificate": k.certificate, "key": k.key, "status": k.status,
                            "config": k.config} for k in r.key_problems],
        "not_served": [{"host": n.host, "name": n.name, "port": n.port, "file": n.certificate,
                        "configured_serial": n.configured_serial, "served_serial": n.served_serial, "error": n.error}
                       for n in r.not_served],
        "dynamic": [{"host": d.host, "names": list(d.names), "file": d.certificate, "config": d.config}
                    for d in r.dynamic],
        "exit_code": r.exit_code,
    }


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [[clean(c, 200) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(head)]
    widths[-1] = 0
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [list(head), *cells]]


def _days(info: CertInfo | None, now: dt.datetime) -> str:
    return "-" if info is None else f"{(info.not_after - now).total_seconds() / 86400:.1f}"


def table(r: Report) -> str:
    """Sections, most urgent first: host errors, unmanaged certificates by expiry, then the rest."""
    now = r.started
    out: list[str] = []
    for h, e in r.errors.items():
        out.append(f"ERROR {clean(h)}: {clean(e, 2000)}")
    if r.errors:
        out.append("")
    out.append(f"UNMANAGED CERTIFICATES ({len(r.unmanaged)}), soonest expiry first")
    out += _table(("DAYS", "NOT AFTER", "SERIAL", "NAMES", "HOSTS", "FILES"),
                  [(_days(u.info, now), f"{u.info.not_after:%Y-%m-%d %H:%M}", u.info.serial[:16], ",".join(u.names),
                    ",".join(u.hosts), ",".join(u.paths)) for u in r.unmanaged])
    out += ["", f"SERVED NAMES ({len({b.name for b in r.bindings})} names, {len(r.bindings)} host bindings)"]
    out += _table(("NAME", "PORT", "HOST", "MANAGED", "DAYS", "SERIAL", "SERVED", "FILE"),
                  [(b.name, str(b.port), b.host, b.lineage or "no", _days(b.info, now),
                    b.info.serial[:16] if b.info else "-", b.served, b.certificate or "-") for b in r.bindings])
    sections: list[tuple[str, list[str]]] = [
        ("NAMES ON SOME HOSTS ONLY", [f"{p.name}: on {','.join(p.served_on)}; not on {','.join(p.missing_on)}"
                                     for p in r.partial]),
        ("SERVER BLOCKS THAT DIFFER BETWEEN HOSTS", [
            f"{d.name}:{d.port}: " + " | ".join(f"{','.join(hosts)}: {'; '.join(lines) or '(common lines only)'}"
                                                for lines, hosts in d.variants) for d in r.drift]),
        ("CONFIGURED BUT NOT SERVED", [
            f"{n.host} {n.name}:{n.port}: {n.certificate} (serial {n.configured_serial or '?'}) → "
            + (f"served serial {n.served_serial}" if n.served_serial else f"handshake: {n.error}")
            for n in r.not_served]),
        ("KEY/CERTIFICATE PROBLEMS", [f"{k.host} {k.certificate}: key {k.key} {k.status} ({k.config})"
                                      for k in r.key_problems]),
        ("ORPHANED CERTIFICATE FILES (no configuration uses them)", [
            f"{o.host} {o.path}: serial {o.info.serial[:16]}, expires {o.info.not_after:%Y-%m-%d} "
            f"({_days(o.info, now)} days)" for o in r.orphans]),
        ("DYNAMIC CERTIFICATE PATHS (chosen per handshake; not read)", [
            f"{d.host} {','.join(d.names)}: {d.certificate} ({d.config})" for d in r.dynamic]),
        ("OTHER PROBLEMS", [f"{h}: {p}" for h, p in r.problems]),
    ]
    for title, lines in sections:
        if lines:
            out += ["", f"{title} ({len(lines)})", *(f"  {clean(line, 2000)}" for line in lines)]
    ok = len(r.hosts) - len(r.errors)
    out += ["", f"discover: {ok} of {len(r.hosts)} hosts in {r.elapsed:.2f}s; {len(r.unmanaged)} unmanaged "
                f"certificates, {len(r.drift) + len(r.partial)} drift findings, {len(r.orphans)} orphans, "
                f"{len(r.key_problems)} key problems, {len(r.not_served)} not served"]
    return "\n".join(out)
