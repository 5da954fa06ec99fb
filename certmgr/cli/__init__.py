"""Command line: the only place that runs the event loop and turns CertmgrError into exit codes.

`base` holds the `main` group, its context and the error/signal handling; each `*_cmds` module adds one
family of commands to it. `certmgr.cli:entry` (which runs `main`) is the console script.
"""

from __future__ import annotations

from certmgr.cli import inventory_cmds, pipeline_cmds, watch_cmds  # noqa: F401  (registers the commands)
from certmgr.cli.base import (
    DEFAULT_INVENTORIES,
    DEFAULT_STATE_DIR,
    EXIT_BUG,
    EXIT_PIPE,
    EXIT_TERMINATED,
    Ctx,
    Group,
    emit_json,
    emit_result,
    entry,
    env_flag,
    fail,
    main,
    pass_ctx,
    resolve_inventory,
    run_async,
)
from certmgr.storecli import store_group

main.add_command(store_group)

__all__ = ["DEFAULT_INVENTORIES", "DEFAULT_STATE_DIR", "EXIT_BUG", "EXIT_PIPE", "EXIT_TERMINATED", "Ctx", "Group",
           "emit_json", "emit_result", "entry", "env_flag", "fail", "main", "pass_ctx", "resolve_inventory",
           "run_async"]
