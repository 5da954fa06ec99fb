"""`certmgr inventory check|show`, `import` and `discover`: reading the fleet as it is."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from certmgr import inventory as inventory_mod
from certmgr.cli.base import (
    Ctx,
    csv_list,
    emit_json,
    main,
    pass_ctx,
    run_async,
)

# ---------------------------------------------------------------- inventory


@main.group("inventory")
def inventory_group() -> None:
    """Validate and show the inventory (domains.toml)."""


@inventory_group.command("check")
@click.option("--syntax-only", is_flag=True,
              help="Validate the file only; do not look for the files it names (CI on another machine).")
@pass_ctx
def inventory_check(c: Ctx, syntax_only: bool) -> None:
    """Validate the inventory and the local files it names; every problem names its key path (exit 2).

    Warnings (valid but risky settings) are printed and exit 0.
    """
    from certmgr.errors import InventoryError
    from certmgr.invcheck import FileReport, check_files

    inv = c.inventory()
    files = FileReport() if syntax_only else check_files(inv)
    if files.problems:
        raise InventoryError(list(files.problems), path=str(inv.path))
    names = sum(len(cert.domains) for cert in inv.certificates)
    click.echo(
        f"{inv.path}: ok — {len(inv.certificates)} certificates ({names} names), {len(inv.hosts)} hosts, "
        f"{len(inv.dns)} DNS providers, {len(inv.cas)} CAs, {len(inv.channels)} channels"
        + (f", {len(inv.warnings)} warning{'s' if len(inv.warnings) != 1 else ''}" if inv.warnings else "")
    )
    for w in inv.warnings:
        click.echo(f"warning: {w}")
    for n in files.notes:
        click.echo(f"note: {n}")
    if syntax_only:
        click.echo("note: --syntax-only: the files the inventory names were not looked at")


@inventory_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def inventory_show(c: Ctx, as_json: bool) -> None:
    """Print the resolved inventory (tags expanded, defaults applied, secrets redacted)."""
    data = inventory_mod.redacted(c.inventory())
    if as_json:
        emit_json(data)
        return
    for cert in data["certificates"]:
        click.echo(f"certificate {cert['name']}: {', '.join(cert['domains'])}")
        click.echo(f"  ca={cert['ca']} dns={cert['dns']} key={cert['key_type']} renew_before={cert['renew_before']}")
        click.echo(f"  hosts: {', '.join(cert['hosts']) or '(none)'}")
    for name, h in data["hosts"].items():
        tags = f" [{', '.join(h['tags'])}]" if h["tags"] else ""
        click.echo(f"host {name}: {h['user']}@{h['address']}:{h['port']} https:{h['https_port']}{tags}")
    for name, p in data["dns"].items():
        extra = " ".join(f"{k}={v}" for k, v in p.items()
                         if k not in ("type", "zones", "nameservers", "propagation_timeout") and v is not None)
        click.echo(f"dns {name}: {p['type']} zones={','.join(p['zones'])} {extra}".rstrip())
    for name, ch in data["channels"].items():
        click.echo(f"channel {name}: {ch['type']} min={ch['min_severity']} {ch['url'] or ch['token']}")


@main.command("import")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path), default="/etc/letsencrypt")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--inventory-stub", "stub", is_flag=True,
              help="Print an inventory (TOML) with a [[certificates]] entry per adopted lineage instead.")
@pass_ctx
def import_cmd(c: Ctx, src: Path, as_json: bool, stub: bool) -> None:
    """Adopt certbot lineages from SRC (default /etc/letsencrypt): every archived version, the current one live.

    SRC is never modified; re-running is safe (versions already present are skipped).
    """
    store = c.store()
    with store.lock("certmgr import"):
        results = store.import_certbot(src)
    if stub:
        from certmgr.discover.command import import_stub

        click.echo(import_stub(c.inventory(), store, results, src))
    elif as_json:
        emit_json([{"name": r.name, "imported": list(r.imported), "present": list(r.present),
                    "skipped": [{"version": v, "reason": why} for v, why in r.skipped],
                    "certbot_live": r.certbot_live, "activated": r.activated, "problem": r.problem}
                   for r in results])
    else:
        for r in results:
            parts = [f"imported {len(r.imported)}"]
            if r.present:
                parts.append(f"{len(r.present)} already present")
            if r.skipped:
                parts.append("skipped " + ", ".join(f"v{v} ({why})" for v, why in r.skipped))
            parts.append(f"live: v{r.activated}" if r.activated else "live unchanged")
            if r.problem:
                parts.append(f"problem: {r.problem}")
            click.echo(f"{r.name}: " + "; ".join(parts))
        if not results:
            click.echo(f"no certbot lineages found under {src}")
    if any(r.problem for r in results):
        sys.exit(1)

# ---------------------------------------------------------------- discover (issue 14)


@main.command("discover")
@click.option("--hosts", "hosts_csv", metavar="H,...|tag:T",
              help="Only these hosts (names and tag:T, comma-separated).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema in docs/discover.md).")
@click.option("--inventory-stub", "stub", is_flag=True,
              help="Print an inventory (TOML) grouping certificates as the fleet does today, `# guess:` comments "
                   "where it had to guess.")
@click.option("--parallel", type=click.IntRange(1, 500), default=20, show_default=True, help="Hosts at once.")
@click.option("--accept-new", is_flag=True, help="Trust and record the key of a host absent from known_hosts.")
@pass_ctx
def discover_cmd(c: Ctx, hosts_csv: str | None, as_json: bool, stub: bool, parallel: int, accept_new: bool) -> None:
    """What every POP's nginx really serves: names, files, certificates, managed or not, drift, orphans.

    Reads `nginx -T` and certificate files over SSH (private keys never leave the host) and
    handshakes each name. Exit 0 when every host was discovered, 1 when some could not be.
    """
    import datetime as dt

    from certmgr.discover import command

    inv = c.inventory()
    hosts = command.select_hosts(inv, csv_list(hosts_csv, "--hosts"))
    report = run_async(command.discover(inv, hosts, now=dt.datetime.now(dt.UTC), parallel=parallel,
                                        accept_new=accept_new))
    command.save_quietly(c.store, report)
    click.echo(command.output(report, inv, as_json=as_json, stub_wanted=stub))
    sys.exit(report.exit_code)
