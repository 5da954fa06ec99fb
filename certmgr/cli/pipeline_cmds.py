"""The commands that change certificates: `renew`, `deploy`, `run`, `test-order`, `rollback`, `revoke`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from certmgr import interrupt
from certmgr.cli.base import (
    Ctx,
    csv_list,
    emit_json,
    emit_result,
    main,
    pass_ctx,
    run_async,
)
from certmgr.errors import UsageError
from certmgr.store_api import StateStore

# ---------------------------------------------------------------- renew


@main.command("renew")
@click.argument("names", nargs=-1)
@click.option("--due", is_flag=True, help="Consider every certificate; renew those inside their renewal window.")
@click.option("--force", is_flag=True, help="Renew even when not due, and ignore the backoff after failures.")
@click.option("--dry-run", is_flag=True, help="Plan only: show what would be renewed and why; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@click.option("--concurrency", type=click.IntRange(1, 200), default=10, show_default=True,
              envvar="CERTMGR_RENEW_CONCURRENCY", help="Orders in flight at once [env: CERTMGR_RENEW_CONCURRENCY].")
@click.option("--no-deploy", is_flag=True, help="Do not push renewed certificates to their hosts (see `deploy`).")
@pass_ctx
def renew_cmd(c: Ctx, names: tuple[str, ...], due: bool, force: bool, dry_run: bool, as_json: bool,
              concurrency: int, no_deploy: bool) -> None:
    """Renew certificates over ACME DNS-01 (RFC 2136): NAME... or --due; exit 1 if any failed."""
    import contextlib
    import datetime as dt

    from certmgr import halocks, progress
    from certmgr.errors import UsageError
    from certmgr.renew import renew

    if bool(names) == due:
        raise UsageError("renew: give certificate NAMEs or --due (not both)",
                         hint="`certmgr renew --due` renews every certificate inside its renewal window")
    inv = c.inventory()
    certs = inv.select(list(names)) if names else inv.certificates
    store = c.store_readonly() if dry_run else c.store()  # a plan never creates or changes the store
    # NAMEs on two controllers: only their certificates' locks (halocks), live versions read before waiting
    seen = halocks.live_versions(store, names) if names and not dry_run and halocks.per_name(store) else None
    lock = (contextlib.nullcontext() if dry_run else
            halocks.oncall(store, names, "renew") if names else store.lock("renew"))
    tally = interrupt.tally()
    tally.deploy_follows = not no_deploy and not dry_run
    tally.renew_command = "certmgr renew --force" if force else "certmgr renew"
    with lock:
        outcomes = run_async(renew(inv, store, certs, now=dt.datetime.now(dt.UTC), force=force, dry_run=dry_run,
                                   concurrency=concurrency, release_pins=bool(names), seen=seen))
        if not as_json:
            for line in progress.renew_lines(outcomes, quiet=c.verbosity < 0):
                click.echo(line)
        deployed: list[Any] = []
        renewed = [o.name for o in outcomes if o.status == "renewed"]
        if renewed and not no_deploy and not dry_run:
            from certmgr.deploy import deploy

            shown = None if as_json else progress.start(inv, inv.select(renewed), c.verbosity)
            try:
                deployed = run_async(deploy(inv, store, inv.select(renewed), keep=inv.keep_versions,
                                            now=dt.datetime.now(dt.UTC),
                                            on_outcome=shown))
            except BaseException:
                if shown is not None:
                    shown.abort()
                raise
            if shown is not None:
                shown.close(progress.expiry_of(store, renewed))
    if as_json:
        emit_json([o.to_json() | ({"deploy": [d.to_json() for d in deployed if d.cert == o.name]}
                                  if o.status == "renewed" and not no_deploy else {}) for o in outcomes])
    if any(o.status == "failed" for o in outcomes) or not all(d.ok for d in deployed):
        sys.exit(1)


# ---------------------------------------------------------------- deploy

def _unpin(c: Ctx, store: StateStore, certs: Any, *, named: bool) -> None:
    """`deploy NAME` clears a rollback pin (the newest usable version goes live again); `--all` keeps pins."""
    import datetime as dt

    from certmgr import pins
    from certmgr.rollback import roll_forward

    for cert in certs:
        if named:
            line = roll_forward(store, c.inventory(), cert, now=dt.datetime.now(dt.UTC))
            if line:
                click.echo(line)
        else:
            pin = pins.holding_pin(store, cert.name)
            if pin is not None:
                click.echo(f"note: {pin.note(cert.name)}")


@main.command("deploy")
@click.argument("names", nargs=-1)
@click.option("--all", "all_certs", is_flag=True, help="Deploy every certificate in the inventory.")
@click.option("--hosts", "hosts_csv", metavar="H,...", help="Only these hosts (comma-separated names).")
@click.option("--canary", "canary_csv", metavar="H,...",
              help="Treat these hosts as canaries too (hosts tagged `canary` always are): they go first, "
                   "the rest only if every canary verified.")
@click.option("--parallel", type=click.IntRange(1, 500), default=20, show_default=True,
              envvar="CERTMGR_DEPLOY_PARALLEL", help="Hosts worked on at once [env: CERTMGR_DEPLOY_PARALLEL].")
@click.option("--accept-new", is_flag=True,
              help="Trust and record the key of a host absent from known_hosts (OpenSSH accept-new); "
                   "a changed key is still refused.")
@click.option("--prune", type=click.IntRange(1, None), metavar="K",
              help="Afterwards remove archive versions older than the newest K on each host (never the live one nor "
                   "the one before it). Without it, hosts that got a new version are pruned to the inventory's "
                   "keep_versions (3).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@pass_ctx
def deploy_cmd(c: Ctx, names: tuple[str, ...], all_certs: bool, hosts_csv: str | None, canary_csv: str | None,
               parallel: int, accept_new: bool, prune: int | None, as_json: bool) -> None:
    """Push the live version of NAME... (or --all) to its hosts over SSH; exit 1 unless every host serves it."""
    import datetime as dt

    from certmgr import halocks, progress
    from certmgr.deploy import deploy
    from certmgr.errors import UsageError

    if bool(names) == all_certs:
        raise UsageError("deploy: give certificate NAMEs or --all (not both)")
    hosts, canary = csv_list(hosts_csv, "--hosts") or None, csv_list(canary_csv, "--canary")
    inv = c.inventory()
    certs = inv.select(list(names)) if names else inv.certificates
    store = c.store()
    with halocks.oncall(store, names, "deploy") if names else store.lock("deploy"):
        _unpin(c, store, certs, named=bool(names))
        shown = None if as_json else progress.start(inv, certs, c.verbosity, hosts=hosts, canary=canary)
        try:
            outcomes = run_async(deploy(inv, store, certs, hosts=hosts, parallel=parallel, accept_new=accept_new,
                                        canary=canary, prune=prune,
                                        keep=inv.keep_versions,
                                        now=dt.datetime.now(dt.UTC), on_outcome=shown))
        except BaseException:
            if shown is not None:
                shown.abort()
            raise
    if shown is None:
        emit_json([o.to_json() for o in outcomes])
    else:
        shown.close(progress.expiry_of(store, [cert.name for cert in certs]))
        if not outcomes and c.verbosity >= 0:
            click.echo("deploy: nothing to do (no certificate has a host here)")
    if not all(o.ok for o in outcomes):
        sys.exit(1)

# ---------------------------------------------------------------- run and status (issue 6)


@main.command("run")
@click.option("--dry-run", is_flag=True, help="Plan only: print what would renew and where it would deploy, and why; "
              "nothing is ordered, deployed, written or sent (`certmgr test-order NAME` tests a real order).")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@click.option("--no-notify", is_flag=True, help="Send nothing to chat.")
@click.option("--wait-lock", type=click.FloatRange(0, 3600), default=0, show_default=True,
              envvar="CERTMGR_WAIT_LOCK", help="Seconds to wait for another certmgr holding the store lock "
              "[env: CERTMGR_WAIT_LOCK].")
@click.option("--prometheus", "prom_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="CERTMGR_PROMETHEUS", help="Also write Prometheus textfile metrics here, atomically "
              "(docs/monitoring.md) [env: CERTMGR_PROMETHEUS].")
@pass_ctx
def run_cmd(c: Ctx, dry_run: bool, as_json: bool, no_notify: bool, wait_lock: float,
            prom_path: Path | None) -> None:
    """The daily job: scan every POP → renew what is due → deploy → verify → one chat summary.

    Exit status: 0 all served certificates ok, 1 warnings remain, 2 a renewal or deploy failed or a
    critical problem remains, 3 endpoints unreachable.
    """
    import contextlib
    import datetime as dt

    from certmgr import pipeline, progress

    inv = c.inventory()
    click.get_current_context().meta["certmgr.finish"] = "certmgr run"
    interrupt.tally().deploy_follows = not dry_run
    shown: list[progress.DeployProgress] = []

    def on_deploy(certs: Any, hosts: Any) -> Any:
        if shown:  # the run's deploys follow one another (pipeline.run): the last one's bar and closing lines end here
            shown[-1].close(progress.expiry_of(store, {o.cert for o in shown[-1].outcomes}))
        shown.append(progress.start(inv, certs, c.verbosity, hosts=hosts))
        return shown[-1]

    if dry_run:
        store = c.store_readonly()
        lock: Any = contextlib.nullcontext()
    else:
        store = c.store()
        lock = store.lock("certmgr run", wait=wait_lock or None)
    with lock:
        # the clock is read once the lock is ours: after --wait-lock, certificates the previous
        # holder issued meanwhile must not look "not yet valid" to a run that started earlier
        now = dt.datetime.now(dt.UTC)
        report = run_async(pipeline.run(inv, store, now=now, dry_run=dry_run, notify=not no_notify,
                                        on_deploy=None if as_json else on_deploy))
        problem = None
        if prom_path is not None and not dry_run:  # a dry run writes nothing, metrics included
            from certmgr import metrics

            problem = metrics.publish(inv, store, report, prom_path)
    if as_json:
        emit_json(report.to_json())
    else:
        if shown:
            shown[-1].close(progress.expiry_of(store, {o.cert for o in shown[-1].outcomes}))
        for line in pipeline.render(report, deploys_shown=bool(shown)):
            click.echo(line)
    if problem:
        click.echo(f"certmgr: error: {problem}", err=True)
    sys.exit(report.exit_code)

@main.command("test-order")
@click.argument("names", nargs=-1, required=True)
@click.option("--directory", metavar="URL",
              help="ACME directory to order from [default: the CA's staging twin; required for other CAs].")
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@pass_ctx
def test_order_cmd(c: Ctx, names: tuple[str, ...], directory: str | None, as_json: bool) -> None:
    """A real order for NAME... against the CA's staging directory: DNS-01 validated, issued, then discarded.

    What certbot calls --dry-run: nothing is stored or deployed, renewal state is untouched. Exit 1 if any failed.
    """
    from certmgr.testorder import test_orders

    inv = c.inventory()
    store = c.store()
    with store.lock("test-order"):
        results = run_async(test_orders(inv, store, inv.select(list(names)), directory=directory))
    if as_json:
        emit_json([r.to_json() for r in results])
    else:
        for r in results:
            click.echo(r.line())
            if r.hint and not r.ok:
                click.echo(f"        hint: {r.hint}")
    if not all(r.ok for r in results):
        sys.exit(1)

# ---------------------------------------------------------------- rollback and revoke (issue 13)


@main.command("rollback")
@click.argument("name")
@click.option("--to", "to", type=click.IntRange(1, None), metavar="VERSION",
              help="The stored version to go back to [default: the one below the live version].")
@click.option("--hosts", "hosts_csv", metavar="H,...|tag:T", help="Only these hosts now (the others follow the pin).")
@click.option("--dry-run", is_flag=True, help="Check the version and show what would happen; change nothing.")
@click.option("--parallel", type=click.IntRange(1, 500), default=20, show_default=True, help="Hosts at once.")
@click.option("--no-notify", is_flag=True, help="Send nothing to chat.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def rollback_cmd(c: Ctx, name: str, to: int | None, hosts_csv: str | None, dry_run: bool, parallel: int,
                 no_notify: bool, as_json: bool) -> None:
    """Make an earlier version of NAME live in the store and on its POPs, and pin it; exit 1 unless all serve it.

    Refuses a version that is expired, revoked by certmgr, or whose key does not match its certificate.
    `run` keeps the pinned version (and says so) until `certmgr deploy NAME` or `certmgr renew NAME`.
    """
    import contextlib
    import datetime as dt

    from certmgr import halocks
    from certmgr.rollback import rollback

    hosts = csv_list(hosts_csv, "--hosts")
    inv = c.inventory()
    [cert] = inv.select([name])
    store = c.store_readonly() if dry_run else c.store()
    lock: Any = contextlib.nullcontext() if dry_run else halocks.oncall(store, [name], "certmgr rollback")
    with lock:
        result = run_async(rollback(inv, store, cert, to=to, hosts=hosts, dry_run=dry_run,
                                    now=dt.datetime.now(dt.UTC), parallel=parallel,
                                    channels=() if dry_run or no_notify else list(inv.channels.values())))
    emit_result(result, as_json)


@main.command("revoke")
@click.argument("name")
@click.option("--reason", required=True, type=click.Choice(["keyCompromise", "superseded", "cessationOfOperation",
                                                            "affiliationChanged"]),
              help="RFC 5280 revocation reason; keyCompromise revokes every stored version sharing the key.")
@click.option("--version", "version", type=click.IntRange(1, None), metavar="N",
              help="Revoke this stored version [default: the live one].")
@click.option("--serial", metavar="HEX", help="Revoke the stored version with this serial.")
@click.option("--now", "now_first", is_flag=True,
              help="Revoke first, then replace and deploy (clients see errors until the replacement is served).")
@click.option("--parallel", type=click.IntRange(1, 500), default=20, show_default=True, help="Hosts at once.")
@click.option("--dry-run", is_flag=True, help="Show what would be revoked and replaced; change nothing.")
@click.option("--no-notify", is_flag=True, help="Send nothing to chat.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def revoke_cmd(c: Ctx, name: str, reason: str, version: int | None, serial: str | None, now_first: bool,
               parallel: int, dry_run: bool, no_notify: bool, as_json: bool) -> None:
    """Replace NAME with a new key on every POP, verify, then revoke the old certificate(s) at the CA.

    With --now the old certificate is revoked first. An interrupted or incomplete revoke is resumed by
    running it again. Exit 1 unless everything was replaced and revoked.
    """
    import datetime as dt

    from certmgr import halocks
    from certmgr.revoke import plan, revoke

    if version is not None and serial is not None:
        raise UsageError("revoke: give --version or --serial (not both)")
    inv = c.inventory()
    [cert] = inv.select([name])
    if dry_run:
        lines = plan(c.store_readonly(), cert, reason=reason, version=version, serial=serial, now_first=now_first,
                     now=dt.datetime.now(dt.UTC))
        click.echo(json.dumps({"name": name, "dry_run": True, "lines": lines}) if as_json else "\n".join(lines))
        return
    store = c.store()
    with halocks.oncall(store, [name], "certmgr revoke"):
        result = run_async(revoke(inv, store, cert, reason=reason, version=version, serial=serial,
                                  now_first=now_first, now=dt.datetime.now(dt.UTC), parallel=parallel,
                                  channels=() if no_notify else list(inv.channels.values())))
    emit_result(result, as_json)
