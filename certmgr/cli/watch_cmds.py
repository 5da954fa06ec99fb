"""The commands that look and tell: `scan`, `check`, `notify`, `status`, `doctor`, `as-service`."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from certmgr import log
from certmgr.cli.base import (
    Ctx,
    emit_json,
    main,
    pass_ctx,
    run_async,
)
from certmgr.errors import CertmgrError, UsageError

# ---------------------------------------------------------------- scan and notify (issue 3)



def handshake_timeouts(f: Any) -> Any:
    """`--connect-timeout` and `--handshake-timeout`, the same for `scan` and `check`."""
    f = click.option("--handshake-timeout", type=click.FloatRange(0.01, 120), default=5.0, show_default=True,
                     help="Seconds to wait for the TLS handshake once connected.")(f)
    return click.option("--connect-timeout", type=click.FloatRange(0.01, 120), default=5.0, show_default=True,
                        help="Seconds to wait for TCP connect.")(f)


@main.command("scan")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (schema in docs/scan.md).")
@click.option("--prometheus", "prom_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a node_exporter textfile here (atomic replace).")
@click.option("--concurrency", type=click.IntRange(1, 20000), default=100, show_default=True,
              envvar="CERTMGR_SCAN_CONCURRENCY", help="Handshakes in flight at most [env: CERTMGR_SCAN_CONCURRENCY].")
@click.option("--per-address", type=click.IntRange(1, 1000), default=16, show_default=True,
              envvar="CERTMGR_SCAN_PER_ADDRESS",
              help="Handshakes in flight per POP address at most, all workers together "
                   "[env: CERTMGR_SCAN_PER_ADDRESS].")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes to shard handshakes across [default: 1 below 400 endpoints, else one per CPU].")
@click.option("--full-handshake", is_flag=True,
              help="Always complete the TLS handshake; do not read the chain from a TLS 1.2 first flight.")
@click.option("--public", is_flag=True, help="Also resolve each name in DNS and scan the addresses it points to.")
@click.option("--resolver", metavar="IP[:PORT]", help="DNS server for --public [default: the system resolver].")
@click.option("--public-port", type=click.IntRange(1, 65535), default=443, show_default=True,
              help="TLS port scanned on the addresses --public finds.")
@handshake_timeouts
@click.option("--no-notify", is_flag=True, help="Do not send chat warnings for this scan.")
@pass_ctx
def scan_cmd(c: Ctx, names: tuple[str, ...], as_json: bool, prom_path: Path | None, concurrency: int,
             per_address: int, workers: int | None, full_handshake: bool, public: bool, resolver: str | None,
             public_port: int, connect_timeout: float, handshake_timeout: float, no_notify: bool) -> None:
    """Handshake with every POP for every name and report what is really served.

    Exit status follows the monitoring convention: 0 ok, 1 warning, 2 critical, 3 error (unreachable).
    """
    import datetime as dt

    from certmgr import report
    from certmgr import scan as scan_mod
    from certmgr.errors import StoreError, UsageError

    inv = c.inventory()
    resolver_addr: tuple[str, int] | None = None
    if resolver:
        host, _, port = resolver.rpartition(":") if resolver.count(":") == 1 else (resolver, "", "53")
        if not port.isdigit():
            raise UsageError(f"scan --resolver {resolver!r}: not IP or IP:PORT")
        resolver_addr = (host or resolver, int(port))
    store = None
    try:
        store = c.store()
    except StoreError as exc:
        click.echo(f"certmgr: warning: {exc} (scanning without the store: no drift against live/, "
                   "no saved state, no notifications)", err=True)
    progress = report.Progress(enabled=None if not as_json else False)
    now = dt.datetime.now(dt.UTC)
    try:
        result = run_async(scan_mod.scan(
            inv, store, names, now=now, concurrency=concurrency, per_address=per_address, workers=workers,
            peek=not full_handshake, public=public,
            public_resolver=resolver_addr, public_port=public_port,
            timeouts=scan_mod.Timeouts(connect=connect_timeout, handshake=handshake_timeout),
            on_progress=progress))
    finally:
        progress.close()
    if store is not None:
        try:
            scan_mod.save_state(store, result)
        except StoreError as exc:
            click.echo(f"certmgr: warning: {exc}", err=True)
    if prom_path is not None:
        try:
            report.write_prometheus(result, prom_path)
        except OSError as exc:
            click.echo(f"certmgr: error: scan --prometheus {prom_path}: {exc.strerror} (not written)", err=True)
    deliveries: list[dict[str, Any]] = []
    if store is not None and not no_notify and inv.channels:
        from certmgr.notify import notify_scan

        outcome = run_async(notify_scan(result, list(inv.channels.values()), store=store, now=now))
        for ch, msg, d in outcome.deliveries:
            deliveries.append({"channel": ch, "kind": msg.kind, "certificate": msg.certificate, "ok": d.ok,
                               "attempts": d.attempts, "error": d.error})
            if not d.ok:
                click.echo(f"certmgr: warning: notify {ch}: {d.error} (will retry next run)", err=True)
    if as_json:
        # The same text as emit_json(result_json(...)), streamed: 100,000 endpoints are ~100 MB as dicts.
        for piece in scan_mod.json_text(result, {"notifications": deliveries}):
            click.echo(piece, nl=False)
        click.echo()
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        click.echo(report.table(result, colour=colour))
        for d in deliveries:
            if d["ok"]:
                click.echo(f"  notified {d['channel']}: {d['kind']} {d['certificate'] or ''}".rstrip())
    sys.exit(result.exit_code)


@main.command("check")
@click.argument("names", nargs=-1)
@click.option("--concurrency", type=click.IntRange(1, 20000), default=100, show_default=True,
              help="Handshakes in flight at most.")
@handshake_timeouts
@pass_ctx
def check_cmd(c: Ctx, names: tuple[str, ...], concurrency: int, connect_timeout: float,
              handshake_timeout: float) -> None:
    """Monitoring-plugin mode (Nagios, Icinga): scan, print one status line with perfdata, exit 0/1/2/3.

    Read-only: saves no state and sends no chat message. 0 OK, 1 WARNING, 2 CRITICAL (an endpoint
    expiring, wrong or unreachable), 3 UNKNOWN (the check could not run). See docs/monitoring.md.
    """
    import datetime as dt

    from certmgr import nagios, pins
    from certmgr import scan as scan_mod

    try:
        inv = c.inventory()
        # the monitoring user usually cannot read the store (0700): then no drift against live/
        store = c.store_readonly() if os.access(c.state_dir, os.R_OK | os.X_OK) else None
        result = run_async(scan_mod.scan(
            inv, store, names, now=dt.datetime.now(dt.UTC), concurrency=concurrency,
            timeouts=scan_mod.Timeouts(connect=connect_timeout, handshake=handshake_timeout)))
        revoking = [n for cert in inv.select(list(names)) if store is not None
                    and (n := pins.pending_note(store, cert.name))]
        out = nagios.check(result, inv, revoking=revoking)
    except CertmgrError as exc:
        out = nagios.unknown(log.redact(str(exc)))
    except Exception:  # a bug: the traceback goes to stderr, the monitoring system still gets UNKNOWN
        traceback.print_exc()
        out = nagios.unknown("internal error (a bug): see the traceback on stderr")
    click.echo(out.text)
    sys.exit(out.status)


@main.group("notify")
def notify_group() -> None:
    """Chat channels from the inventory ([channels.*])."""


@notify_group.command("test")
@click.option("--channel", "only", multiple=True, help="Only this channel (repeatable).")
@pass_ctx
def notify_test_cmd(c: Ctx, only: tuple[str, ...]) -> None:
    """Send a test message to each channel; exit 1 if any could not be reached."""
    import datetime as dt

    from certmgr.errors import StoreError, UsageError
    from certmgr.notify import ping_message, send

    inv = c.inventory()
    unknown = [n for n in only if n not in inv.channels]
    if unknown:
        raise UsageError(f"notify test: no channel named {', '.join(map(repr, unknown))}",
                         hint=f"channels: {', '.join(inv.channels) or '(none)'}")
    channels = [ch for n, ch in inv.channels.items() if not only or n in only]
    if not channels:
        raise UsageError("notify test: the inventory has no [channels.*]")
    try:
        store = c.store()
    except StoreError:
        store = None
    deliveries = run_async(send(channels, ping_message(dt.datetime.now(dt.UTC)), store=store))
    for d in deliveries:
        if d.ok:
            click.echo(f"{d.channel}: ok (HTTP {d.status}, {d.attempts} attempt{'s' if d.attempts != 1 else ''})")
        else:
            click.echo(f"{d.channel}: FAILED: {d.error}")
    if not all(d.ok for d in deliveries):
        sys.exit(1)


@notify_group.command("failure")
@click.argument("unit")
@pass_ctx
def notify_failure_cmd(c: Ctx, unit: str) -> None:
    """Tell every channel that the systemd UNIT failed (used by certmgr-failure@.service's OnFailure=)."""
    from certmgr.notify import Message, send

    inv = c.inventory()
    if not inv.channels:
        raise UsageError("notify failure: the inventory has no [channels.*]")
    msg = Message(kind="failure", severity="critical", title=f"certmgr job {unit} failed",
                  lines=("The daily run failed (exit 2: a renewal or deploy failed, or a critical problem remains), "
                         "or crashed, was killed or timed out; certificates may not be renewed.",
                         f"Look at: journalctl -u {unit} -n 100"),
                  command=f"systemctl status {unit}")
    deliveries = run_async(send(list(inv.channels.values()), msg))
    for d in deliveries:
        click.echo(f"{d.channel}: {'ok' if d.ok else 'FAILED: ' + str(d.error)}")
    if not any(d.ok for d in deliveries):
        sys.exit(1)

@main.command("status")
@click.argument("names", nargs=-1)
@click.option("--scan", "fresh", is_flag=True,
              help="Scan the POPs first (and save it) instead of showing the last scan.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def status_cmd(c: Ctx, names: tuple[str, ...], fresh: bool, as_json: bool) -> None:
    """Per certificate (NAME... or all): live version and expiry, renewal window, last outcomes, what each POP serves.

    A POP whose last deploy verified the live serial counts as current until a later scan says otherwise.
    Exit status: 0 nothing needs a human, 1 warning, 2 needs action now (overdue, expired, a POP behind or
    critical).
    """
    import datetime as dt

    from certmgr import scan as scan_mod
    from certmgr import status as status_mod

    inv = c.inventory()
    certs = inv.select(list(names))
    store = c.store_readonly()
    now = dt.datetime.now(dt.UTC)
    if fresh:
        result = run_async(scan_mod.scan(inv, store, names, now=now))
        scan_mod.save_state(c.store(), result)
    views = status_mod.gather(inv, store, now=now, certs=certs)
    leftovers = status_mod.dns_leftovers(store)
    code = status_mod.exit_code(views)
    if as_json:
        emit_json({"time": now.isoformat(), "exit_code": code, "certificates": [v.to_json() for v in views],
                   "dns_leftovers": status_mod.leftovers_json(leftovers, now)})
    else:
        for line in (status_mod.render(views, now) + status_mod.render_leftovers(leftovers, now)
                     + [status_mod.verdict(views)]):
            click.echo(line)
    sys.exit(code)

# ---------------------------------------------------------------- doctor (issue 6)


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--timer-interval", metavar="DURATION",
              help="Assume certmgr runs this often (e.g. 12h) instead of reading certmgr.timer.")
@click.option("--concurrency", type=click.IntRange(1, 200), default=20, show_default=True,
              help="Checks (CAs, zones, hosts) in flight at once.")
@click.option("--timeout", type=click.FloatRange(1, 600), default=60.0, show_default=True,
              help="Seconds allowed for each CA, zone or host.")
@pass_ctx
def doctor_cmd(c: Ctx, as_json: bool, timer_interval: str | None, concurrency: int, timeout: float) -> None:
    """Check everything a run needs (inventory, store, CAs, TSIG keys, POPs, nginx, timer); change nothing.

    Exit status: 0 all ok, 1 warnings, 2 failures.
    """
    import dataclasses
    import datetime as dt

    from certmgr import doctor
    from certmgr.errors import UsageError
    from certmgr.inventory import parse_duration

    interval = None
    if timer_interval is not None:
        interval = parse_duration(timer_interval)
        if interval is None or interval <= 0:
            raise UsageError(f"doctor --timer-interval {timer_interval!r}: not a duration (e.g. 12h, 1d, 90m)")
    timeouts = dataclasses.replace(doctor.Timeouts(), check=timeout)
    report = run_async(doctor.run(c.inventory_path, c.state_dir, now=dt.datetime.now(dt.UTC),
                                  timer_interval_s=interval, concurrency=concurrency, timeouts=timeouts))
    if as_json:
        emit_json(report.to_json())
    else:
        tty = sys.stdout.isatty()
        click.echo(doctor.render(report, tty=tty, colour=tty and "NO_COLOR" not in os.environ))
    sys.exit(report.exit_code)

@main.command("as-service", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--print", "show", is_flag=True, help="Print the systemd-run command instead of running it.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
@pass_ctx
def as_service_cmd(c: Ctx, show: bool, args: tuple[str, ...]) -> None:
    """Run `certmgr ARGS` as the installed certmgr.service runs (its user, state, credentials): for on-call.

    E.g. `sudo certmgr as-service renew NAME`: the inventory's *_credential secrets work as in the daily
    run. Built from `systemctl cat certmgr.service`; runs `systemd-run --wait --collect`. Exit status: the
    command's.
    """
    import shlex
    import subprocess

    from certmgr import oncall
    from certmgr.doctor.systemd import run_systemctl

    settings = oncall.service_settings(run_systemctl)
    forwarded = [*(["--inventory", str(c.inventory_given.absolute())] if c.inventory_given else []),
                 *(["-v"] * c.verbosity if c.verbosity > 0 else ["-q"] * -c.verbosity)]
    argv = oncall.systemd_run_argv(settings, [*forwarded, *args], tty=sys.stdin.isatty() and sys.stdout.isatty())
    if show:
        click.echo(shlex.join(argv))
        return
    try:
        sys.exit(subprocess.run(argv, check=False).returncode)
    except FileNotFoundError:
        raise UsageError("as-service: systemd-run not found (nothing run)") from None
