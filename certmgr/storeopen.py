"""Which store a command uses: the state directory (default) or `[store] url` (PostgreSQL), never both.

A store that was migrated away carries a mark naming where it went; opening it is refused, so a
controller left with an old configuration cannot carry on from stale state (split-brain).
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certmgr import inventory as inventory_mod
from certmgr.errors import StoreError
from certmgr.model import StoreConfig
from certmgr.store import Store

if TYPE_CHECKING:
    from certmgr.pgstore import PgStore

DIR_MARK = "MOVED-TO"  # <state-dir>/MOVED-TO: JSON {"to", "at"} written by `certmgr store migrate`
DB_MARK = "state/store-moved-to.json"  # the same, as a document in the database


def configured(inventory_path: Path) -> StoreConfig | None:
    """The inventory's [store], or None; only an inventory that has a [store] table is loaded whole here."""
    try:
        data = tomllib.loads(inventory_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # the command's own inventory load reports it, as before
    if "store" not in data:
        return None
    return inventory_mod.load(inventory_path).store


def moved_mark(to: str, at: dt.datetime) -> dict[str, str]:
    return {"to": to, "at": at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def check_dir_not_moved(root: Path) -> None:
    try:
        mark = json.loads((root / DIR_MARK).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise StoreError(f"store {root}: unreadable {DIR_MARK} mark ({exc}); not used") from exc
    raise StoreError(f"store {root}: moved to {mark.get('to')} on {mark.get('at')} (not used)",
                     hint="add that [store] to the inventory (docs/ha.md), or move back with "
                          f"`certmgr store migrate --from URL --to {root}`")


def check_db_not_moved(store: PgStore) -> None:
    mark = store.load_json(DB_MARK)
    if mark is not None:
        raise StoreError(f"store {store.where}: moved to {mark.get('to')} on {mark.get('at')} (not used)",
                         hint="remove [store] from the inventory to use that directory, or migrate back "
                              "(docs/ha.md, 'Going back')")


def open_pg(cfg: StoreConfig, *, url: str | None = None, check_moved: bool = True, **kw: Any) -> PgStore:
    """Connect to the configured PostgreSQL store (StoreUnavailable, exit 69, when it is down)."""
    try:
        from certmgr.pgstore import PgStore
    except ImportError as exc:
        raise StoreError(f"store {cfg.url.split('@')[-1]}: the PostgreSQL driver is not installed ({exc.name})",
                         hint="install the extra: pip install 'certmgr[postgres]'") from exc
    from certmgr.sealing import Sealer

    sealer = Sealer.from_text(cfg.key.read(), where=cfg.key.key_path)
    password = cfg.password.read() if cfg.password else None
    store = PgStore.open(url or cfg.url, password=password, sealer=sealer, timeout=cfg.connect_timeout,
                         idle_timeout=cfg.idle_timeout, **kw)
    if check_moved:
        try:
            check_db_not_moved(store)
        except BaseException:
            store.close()
            raise
    return store


def open_store(state_dir: Path, inventory_path: Path, *, readonly: bool) -> Any:
    """The store this controller uses: PostgreSQL when the inventory has [store], else the state directory."""
    cfg = configured(inventory_path)
    if cfg is not None:
        if readonly:
            return open_pg(cfg)
        from certmgr import outbox  # a writer replays what a run spooled when the database was lost, then guards

        return outbox.wrap(open_pg(cfg), state_dir)
    check_dir_not_moved(state_dir)
    if not readonly:
        return Store.open(state_dir)
    try:
        return Store.open(state_dir, create=False)
    except StoreError:
        return Store(state_dir)  # nothing stored yet: reads find nothing
