"""The inventory's `[store]` table: where state lives when it is not the local directory (docs/ha.md).

    [store]
    url = "postgresql://certmgr@db.internal:5432/certmgr"   # no password here
    password_credential = "pg-password"                      # or password_file / password_env
    key_credential = "store-key"                              # sealing key file (`certmgr store keygen`)
    idle_timeout = 30                                         # seconds: frees a paused controller's locks
"""

from __future__ import annotations

from typing import Any

from certmgr.model import StoreConfig
from certmgr.reader import Reader


def parse(r: Reader, data: dict[str, Any]) -> StoreConfig | None:
    """The `[store]` table, or None when absent (the directory store, the default)."""
    if "store" not in data:
        return None
    t = r.table(data["store"], "store", {"url", "idle_timeout", "connect_timeout"}, secrets={"password", "key"})
    url = r.get(t, "url", "store", str, required=True)
    if isinstance(url, str) and not url.startswith(("postgresql://", "postgres://")):
        r.err("store.url", f"{url.split('@')[-1]!r} is not a postgresql:// URL")
    elif isinstance(url, str) and _has_password(url):
        r.err("store.url", "must not contain a password; give it as password_credential, password_file or "
              "password_env")
    password = r.secret(t, "password", "store", required=False)
    key = r.secret(t, "key", "store", required=True)
    idle = r.get(t, "idle_timeout", "store", (int, float), default=30.0)
    if isinstance(idle, (int, float)) and not 5 <= idle <= 3600:
        r.err("store.idle_timeout", f"must be between 5 and 3600 seconds, not {idle}")
    connect = r.get(t, "connect_timeout", "store", (int, float), default=10.0)
    if url is None or key is None:
        return None
    return StoreConfig(url=str(url), password=password, key=key, idle_timeout=float(idle),
                       connect_timeout=float(connect))


def _has_password(url: str) -> bool:
    authority = url.split("//", 1)[1].split("/", 1)[0]
    return "password=" in url.lower() or ("@" in authority and ":" in authority.rsplit("@", 1)[0])
