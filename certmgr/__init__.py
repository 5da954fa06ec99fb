"""certmgr: TLS certificate lifecycle manager (inventory → scan → plan → issue → store → deploy → verify → notify)."""

__version__ = "0.1.0"
