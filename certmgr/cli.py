"""Command line: the only place that runs the event loop and turns CertmgrError into exit codes."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click

from certmgr import __version__, interrupt, log
from certmgr import inventory as inventory_mod
from certmgr.errors import CertmgrError, UsageError
from certmgr.inventory import Inventory
from certmgr.store_api import StateStore

DEFAULT_STATE_DIR = "/var/lib/certmgr"
# Without --inventory: ./domains.toml, else the file the systemd unit uses.
DEFAULT_INVENTORIES = (Path("domains.toml"), Path("/etc/certmgr/domains.toml"))
EXIT_BUG = 70  # EX_SOFTWARE
EXIT_TERMINATED = 143  # 128 + SIGTERM (interrupt.exit_code)
EXIT_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away


def resolve_inventory(given: Path | None, candidates: tuple[Path, ...] | None = None) -> Path:
    """`given` if set; else ./domains.toml, else /etc/certmgr/domains.toml; an error naming both when neither exists."""
    if given is not None:
        return given
    candidates = candidates or DEFAULT_INVENTORIES
    for path in candidates:
        if path.exists():
            return path
    raise UsageError(f"inventory: neither {' nor '.join(str(c.absolute()) for c in candidates)} exists "
                     "(nothing done)",
                     hint="pass --inventory FILE or set CERTMGR_INVENTORY")


@dataclass
class Ctx:
    """What every command needs, loaded lazily so `--help` never touches the disk."""

    inventory_given: Path | None  # --inventory / CERTMGR_INVENTORY; None: look in DEFAULT_INVENTORIES
    state_dir: Path
    verbosity: int
    _inventory: Inventory | None = field(default=None, repr=False)

    @property
    def inventory_path(self) -> Path:
        """The inventory file: as given, else the first of DEFAULT_INVENTORIES that exists (UsageError if none)."""
        return resolve_inventory(self.inventory_given)

    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = inventory_mod.load(self.inventory_path)
        return self._inventory


    def store(self) -> Any:
        """The state directory, or the PostgreSQL store when the inventory has [store] (docs/ha.md)."""
        from certmgr.storeopen import open_store

        return open_store(self.state_dir, self.inventory_path, readonly=False)

    def store_readonly(self) -> Any:
        """The store for reading only (dry runs, status): never creates or chmods anything."""
        from certmgr.storeopen import open_store

        return open_store(self.state_dir, self.inventory_path, readonly=True)


pass_ctx = click.make_pass_decorator(Ctx)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def emit_result(result: Any, as_json: bool) -> None:
    """A rollback's or revoke's result as JSON or its lines; exit 1 unless it is ok."""
    if as_json:
        emit_json(result.to_json())
    else:
        for line in result.lines():
            click.echo(line)
    if not result.ok:
        sys.exit(1)


def fail(exc: CertmgrError) -> NoReturn:
    click.echo(f"certmgr: error: {log.redact(str(exc))}", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)
    sys.exit(exc.exit_code)


def _stdout_gone() -> NoReturn:
    """The reader of our stdout went away (`certmgr status | head -1`): stop quietly, like SIGPIPE would.

    Python's recommended handling (library/signal.html, "Note on SIGPIPE"): point stdout at /dev/null so
    the interpreter's final flush cannot raise again, and exit 141 (128 + SIGPIPE), what a shell reports
    for any program a pipe's reader stops early; `set -o pipefail` scripts see the cut-off for what it is.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or replaced (tests): nothing left to protect
        pass
    sys.exit(EXIT_PIPE)


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM outside the event loop: no POP commit runs there (deploys run inside it), so stop now."""
    interrupt.note(signum)
    raise interrupt.Interrupted(signum)


def interrupted(signum: int, finish: str | None = None) -> NoReturn:
    """Exit 130 (SIGINT) or 143 (SIGTERM) with the one line saying what was done and what was not."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # exiting now: a further signal must not cut the line
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:
            break
    click.echo(interrupt.summary(interrupt.state(), finish=finish), err=True)
    sys.exit(interrupt.exit_code(signum))


class Group(click.Group):
    """Maps CertmgrError to its message and exit code; anything else is a bug and keeps its traceback.

    SIGINT and SIGTERM end a command with exit 130/143 and one summary line, never click's `Aborted!`.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """The console script's entry: signals end with one summary line; a closed stdout ends quietly."""
        import signal

        interrupt.reset()
        saved: dict[signal.Signals, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                saved[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (in-process tests): keep the defaults
            pass
        from certmgr import outbox  # after the handlers: a signal during imports still ends the command cleanly

        outbox.reset()
        try:
            try:
                return super().main(*args, **kwargs)
            finally:
                # buffered output meets the closed pipe here at the latest, not in the interpreter's shutdown
                if sys.stdout is not None and not sys.stdout.closed:
                    sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()
        except interrupt.Interrupted as exc:  # after the command, while click exits (which would say Aborted!)
            interrupted(exc.signum)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:  # --help and --version print while the arguments are parsed
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            _stdout_gone()

    def invoke(self, ctx: click.Context) -> Any:
        import signal

        from certmgr import outbox

        try:
            result = super().invoke(ctx)
        except CertmgrError as exc:
            fail(outbox.lost_error() or exc)  # the database lost mid-run: exit 69 with what was spooled
        except BrokenPipeError:
            _stdout_gone()  # before click's own EPIPE handling, which would exit 1
        except interrupt.Interrupted as exc:
            interrupted(exc.signum, ctx.meta.get("certmgr.finish"))
        except (KeyboardInterrupt, click.Abort):
            interrupt.note(signal.SIGINT)
            interrupted(signal.SIGINT, ctx.meta.get("certmgr.finish"))
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            if (lost := outbox.lost_error()) is not None:
                fail(lost)
            raise
        except Exception:
            # Not a CertmgrError: a bug. Keep the traceback, and exit with EX_SOFTWARE (70) so that
            # systemd's OnFailure= tells chat, while 1-3 (outcomes already reported) do not.
            traceback.print_exc()
            click.echo("certmgr: internal error (a bug): please report the traceback above", err=True)
            sys.exit(EXIT_BUG)
        if (lost := outbox.lost_error()) is not None:
            fail(lost)
        return result


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="certmgr")
@click.option("--inventory", "inventory_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, envvar="CERTMGR_INVENTORY",
              help="Inventory file [env: CERTMGR_INVENTORY; default: ./domains.toml, else "
                   "/etc/certmgr/domains.toml].")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, envvar=["CERTMGR_STATE_DIR", "STATE_DIRECTORY"],
              help="Local store: archive/, live/, accounts, state, audit log "
                   "[env: CERTMGR_STATE_DIR, or systemd's STATE_DIRECTORY].")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", count=True, help="Less output: errors only.")
@click.pass_context
def main(ctx: click.Context, inventory_path: Path | None, state_dir: Path, verbose: int, quiet: int) -> None:
    """certmgr: scan, renew (ACME DNS-01 over RFC 2136), deploy and watch TLS certificates.

    The pipeline: inventory → scan → plan → issue → store → deploy → verify → notify.
    """
    # systemd may pass several colon-separated StateDirectory= paths; the first is ours
    state_dir = Path(str(state_dir).split(":")[0])
    log.setup(verbose - quiet)
    ctx.obj = Ctx(inventory_given=inventory_path, state_dir=state_dir, verbosity=verbose - quiet)


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


def run_async(coro: Any) -> Any:
    """The one asyncio.run; SIGINT/SIGTERM cancel the work and raise interrupt.Interrupted for Group to report.

    Cancelling runs every `finally` (challenge records are removed) and starts nothing new; a POP
    commit already running is waited for (deploy.py, at most interrupt.GRACE seconds) so that its
    outcome is audited; a second signal stops that wait too (the next deploy settles it).
    """
    import asyncio
    import signal

    async def wrapper() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None

        def on_signal(signum: int) -> None:
            running = len(interrupt.tally().committing)
            if interrupt.note(signum) == 1 and running and sys.stderr.isatty():
                click.echo(f"certmgr: {signal.Signals(signum).name}: stopping; waiting for {running} POP "
                           f"commit{'s' if running != 1 else ''} already running (at most {interrupt.GRACE:g}s; "
                           "again to stop at once)", err=True)
            task.cancel()

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        return await coro

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = asyncio.run(wrapper())
    except (asyncio.CancelledError, KeyboardInterrupt):
        signum = interrupt.state().signum
        if signum is None:
            raise
        raise interrupt.Interrupted(signum) from None
    finally:
        # closing the loop put back the default handlers; Group's (which raise Interrupted) apply again
        try:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        except (ValueError, TypeError):
            pass
    signum = interrupt.state().signum
    if signum is not None:
        raise interrupt.Interrupted(signum)  # came as the work ended
    return result


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


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

    from certmgr import progress
    from certmgr.errors import UsageError
    from certmgr.renew import renew

    if bool(names) == due:
        raise UsageError("renew: give certificate NAMEs or --due (not both)",
                         hint="`certmgr renew --due` renews every certificate inside its renewal window")
    inv = c.inventory()
    certs = inv.select(list(names)) if names else inv.certificates
    store = c.store_readonly() if dry_run else c.store()  # a plan never creates or changes the store
    lock = contextlib.nullcontext() if dry_run else store.lock("renew")
    tally = interrupt.tally()
    tally.deploy_follows = not no_deploy and not dry_run
    tally.renew_command = "certmgr renew --force" if force else "certmgr renew"
    with lock:
        outcomes = run_async(renew(inv, store, certs, now=dt.datetime.now(dt.UTC), force=force, dry_run=dry_run,
                                   concurrency=concurrency, release_pins=bool(names)))
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


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


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
            pin = pins.load_pin(store, cert.name)
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

    from certmgr import progress
    from certmgr.deploy import deploy
    from certmgr.errors import UsageError

    if bool(names) == all_certs:
        raise UsageError("deploy: give certificate NAMEs or --all (not both)")
    inv = c.inventory()
    certs = inv.select(list(names)) if names else inv.certificates
    store = c.store()
    with store.lock("deploy"):
        _unpin(c, store, certs, named=bool(names))
        shown = None if as_json else progress.start(inv, certs, c.verbosity, hosts=_csv(hosts_csv) or None,
                                                    canary=_csv(canary_csv))
        try:
            outcomes = run_async(deploy(inv, store, certs, hosts=_csv(hosts_csv) or None, parallel=parallel,
                                        accept_new=accept_new, canary=_csv(canary_csv), prune=prune,
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


# ---------------------------------------------------------------- scan and notify (issue 3)


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
@click.option("--connect-timeout", type=click.FloatRange(0.01, 120), default=5.0, show_default=True,
              help="Seconds to wait for TCP connect.")
@click.option("--handshake-timeout", type=click.FloatRange(0.01, 120), default=5.0, show_default=True,
              help="Seconds to wait for the TLS handshake once connected.")
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
@click.option("--connect-timeout", type=click.FloatRange(0.01, 120), default=5.0, show_default=True,
              help="Seconds to wait for TCP connect.")
@click.option("--handshake-timeout", type=click.FloatRange(0.01, 120), default=5.0, show_default=True,
              help="Seconds to wait for the TLS handshake once connected.")
@pass_ctx
def check_cmd(c: Ctx, names: tuple[str, ...], concurrency: int, connect_timeout: float,
              handshake_timeout: float) -> None:
    """Monitoring-plugin mode (Nagios, Icinga): scan, print one status line with perfdata, exit 0/1/2/3.

    Read-only: saves no state and sends no chat message. 0 OK, 1 WARNING, 2 CRITICAL (an endpoint
    expiring, wrong or unreachable), 3 UNKNOWN (the check could not run). See docs/monitoring.md.
    """
    import datetime as dt

    from certmgr import nagios
    from certmgr import scan as scan_mod

    try:
        inv = c.inventory()
        # the monitoring user usually cannot read the store (0700): then no drift against live/
        store = c.store_readonly() if os.access(c.state_dir, os.R_OK | os.X_OK) else None
        result = run_async(scan_mod.scan(
            inv, store, names, now=dt.datetime.now(dt.UTC), concurrency=concurrency,
            timeouts=scan_mod.Timeouts(connect=connect_timeout, handshake=handshake_timeout)))
        out = nagios.check(result, inv)
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
        for p in shown:
            p.close(progress.expiry_of(store, {o.cert for o in report.deploys}))
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
    report = run_async(command.discover(inv, command.select_hosts(inv, _csv(hosts_csv)), now=dt.datetime.now(dt.UTC),
                                        parallel=parallel, accept_new=accept_new))
    command.save_quietly(c.store, report)
    click.echo(command.output(report, inv, as_json=as_json, stub_wanted=stub))
    sys.exit(report.exit_code)


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

    from certmgr.rollback import rollback

    inv = c.inventory()
    [cert] = inv.select([name])
    store = c.store_readonly() if dry_run else c.store()
    lock: Any = contextlib.nullcontext() if dry_run else store.lock("certmgr rollback")
    with lock:
        result = run_async(rollback(inv, store, cert, to=to, hosts=_csv(hosts_csv), dry_run=dry_run,
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
@click.option("--no-notify", is_flag=True, help="Send nothing to chat.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def revoke_cmd(c: Ctx, name: str, reason: str, version: int | None, serial: str | None, now_first: bool,
               parallel: int, no_notify: bool, as_json: bool) -> None:
    """Replace NAME with a new key on every POP, verify, then revoke the old certificate(s) at the CA.

    With --now the old certificate is revoked first. Exit 1 unless everything was replaced and revoked.
    """
    import datetime as dt

    from certmgr.revoke import revoke

    if version is not None and serial is not None:
        raise UsageError("revoke: give --version or --serial (not both)")
    inv = c.inventory()
    [cert] = inv.select([name])
    store = c.store()
    with store.lock("certmgr revoke"):
        result = run_async(revoke(inv, store, cert, reason=reason, version=version, serial=serial,
                                  now_first=now_first, now=dt.datetime.now(dt.UTC), parallel=parallel,
                                  channels=() if no_notify else list(inv.channels.values())))
    emit_result(result, as_json)


def _add_store_group() -> None:
    from certmgr.storecli import store_group

    main.add_command(store_group)


_add_store_group()
