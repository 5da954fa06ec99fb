"""The glue behind `certmgr discover` and `certmgr import --inventory-stub` (the cli stays thin)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from certmgr.discover import render, state, stub
from certmgr.discover.collect import discover
from certmgr.discover.model import Report
from certmgr.errors import CertmgrError, UsageError
from certmgr.inventory import Host, Inventory

__all__ = ["discover", "import_stub", "output", "save_quietly", "select_hosts"]

logger = logging.getLogger(__name__)


def select_hosts(inv: Inventory, refs: Sequence[str]) -> list[Host]:
    """Hosts named or tagged (`tag:T`) in `refs`, in inventory order; all hosts when `refs` is empty."""
    if not refs:
        return list(inv.hosts.values())
    chosen: set[str] = set()
    unknown = []
    for ref in refs:
        if ref.startswith("tag:"):
            matched = {h.name for h in inv.hosts.values() if ref[4:] in h.tags}
            if not matched:
                unknown.append(ref)
            chosen |= matched
        elif ref in inv.hosts:
            chosen.add(ref)
        else:
            unknown.append(ref)
    if unknown:
        raise UsageError(f"discover --hosts: no host or tag {', '.join(map(repr, unknown))} in the inventory",
                         hint=f"hosts: {', '.join(inv.hosts) or '(none)'}")
    return [h for h in inv.hosts.values() if h.name in chosen]


def save_quietly(open_store: Callable[[], Any], report: Report) -> None:
    """Keep the report for `certmgr scan`; a store problem is a warning, the report is still printed."""
    try:
        state.save(open_store(), report)
    except CertmgrError as exc:
        logger.warning("discover: result not saved for `certmgr scan`: %s", exc)


def output(report: Report, inv: Inventory, *, as_json: bool, stub_wanted: bool = False) -> str:
    """The report as the operator asked for it: inventory stub, JSON, or tables."""
    if stub_wanted:
        return stub.render(inv, stub.from_report(report, inv), header=[
            f"inventory stub written by `certmgr discover` at {report.started:%Y-%m-%d %H:%M} UTC from "
            f"{len(report.hosts) - len(report.errors)} of {len(report.hosts)} hosts",
            "certificates are grouped as the fleet serves them today; review every `# guess:` line",
            *(f"host {h} could not be discovered: {e}" for h, e in report.errors.items())], pids=report.pids)
    if as_json:
        return json.dumps(render.to_json(report), indent=2)
    return render.table(report)


def import_stub(inv: Inventory, store: Any, results: Sequence[Any], src: Path) -> str:
    """The inventory stub for the lineages `import` adopted (those with a live version)."""
    lineages = []
    for r in results:
        if r.problem or store.live_version(r.name) is None:
            continue
        info = store.read(r.name).info()
        lineages.append((r.name, info.names, info.key_type))
    return stub.render(inv, stub.from_import(lineages, inv), header=[
        f"inventory stub written by `certmgr import {src}` for {len(lineages)} adopted lineages",
        "review every `# guess:` line"])
