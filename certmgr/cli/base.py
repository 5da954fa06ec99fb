"""The command line's core: the `main` group, its context, the one event loop, errors to exit codes and signals."""

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
        return self._closed_at_exit(readonly=False)

    def store_readonly(self) -> Any:
        """The store for reading only (dry runs, status): never creates or chmods anything."""
        return self._closed_at_exit(readonly=True)

    def _closed_at_exit(self, *, readonly: bool) -> Any:
        """Open the store; closed when the command ends, whatever way it ends (a PostgreSQL store's sessions and
        heartbeat would otherwise live as long as the process: a caller running commands in-process)."""
        from certmgr.storeopen import open_store

        store = open_store(self.state_dir, self.inventory_path, readonly=readonly)
        close = getattr(store, "close", None)
        ctx = click.get_current_context(silent=True)
        if close is not None and ctx is not None:
            ctx.call_on_close(close)
        return store


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


def certmgr_error_of(group: BaseExceptionGroup[Any]) -> CertmgrError | None:
    """The error to report for concurrent tasks that failed together, when every one of them failed with a
    CertmgrError (else None: a bug among them). The one that stops the most wins: the highest exit code
    (69, the shared store lost, over 1), the first raised among equals."""
    leaves: list[CertmgrError] = []

    def walk(g: BaseExceptionGroup[Any]) -> bool:
        for exc in g.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                if not walk(exc):
                    return False
            elif isinstance(exc, CertmgrError):
                leaves.append(exc)
            else:
                return False
        return True

    if not walk(group) or not leaves:
        return None
    return max(leaves, key=lambda e: e.exit_code)


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


def entry() -> NoReturn:
    """The console script (and `python -m certmgr`): `main`, whose exit after SIGINT/SIGTERM does not wait for a
    worker thread still blocked on the network. An ACME request holds its thread until the CA answers or its own
    timeout (20 s) passes, and the interpreter joins every such thread at exit: Ctrl-C would seem to hang. Its
    answer no longer matters (the work was cancelled and recorded), so the process ends once its output is out.
    In-process callers (tests' CliRunner) call `main` and are never ended this way."""
    import logging
    import threading

    try:
        main()
    except SystemExit as exc:
        blocked = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        if interrupt.state().signum is None or not blocked:
            raise
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    raise AssertionError("main() returns only by SystemExit")  # standalone click


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
        except ExceptionGroup as group:  # concurrent tasks (a TaskGroup) that failed: a bug unless all are ours
            leaf = certmgr_error_of(group)
            if leaf is None:
                traceback.print_exc()
                click.echo("certmgr: internal error (a bug): please report the traceback above", err=True)
                sys.exit(EXIT_BUG)
            fail(outbox.lost_error() or leaf)
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


def csv_list(value: str | None, option: str | None = None) -> list[str]:
    """The comma-separated items of an option's value ([] when the option was not given).

    With `option` (its name, e.g. "--hosts"), a value given but holding no item ("", ",") is a UsageError:
    an empty shell variable must not widen "these hosts" to every host.
    """
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if option is not None and value is not None and not items:
        raise UsageError(f"{option}: {value!r} names nothing (give names, comma-separated; leave {option} out for "
                         "all)")
    return items
