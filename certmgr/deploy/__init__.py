"""Deploy: push the store's live version of each certificate to its hosts, all at once, bounded.

Per host, one transaction for every certificate due there, over one SSH channel: one inspect (and
preflight test), one commit under the POP lock that reads every new version from its stdin (swap
each `live/<name>` with one rename(2), ONE test, ONE reload — or all switched back), then every name
verified by handshake; certificates that do not verify are rolled back together with one more reload.

  model.py      Status, HostOutcome, and the typed records the scripts' output is read into
  scripts/*.sh  the shell run on POPs (shell.py composes them)
  plan.py       pure per-certificate decisions from an inspection
  handshake.py  verify by TLS handshake
  host.py       the connection seam, intents, settling, pruning
  session.py    the transaction's scripts in turn over one SSH channel (scripts/session.sh)
  txn.py        one host's transaction, step by step; steps.py its commit/rollback halves
  run.py        deploy(): fan-out, canaries, state
"""

from certmgr.deploy.handshake import CONFIRM_INTERVAL, CONFIRM_ROUNDS, PER_HOST, Prober
from certmgr.deploy.host import Connector, RemoteSession
from certmgr.deploy.model import OK_STATUSES, HostOutcome, Status
from certmgr.deploy.plan import (
    FILE_ORDER,
    certbot_version,
    command_label,
    key_owner_matches,
    next_version,
    sha256sums,
    sni_names,
    version_of_target,
)
from certmgr.deploy.plan import quote_text as _quote_text
from certmgr.deploy.run import deploy
from certmgr.deploy.shell import COMMIT_SH, INSPECT_SH, KEYOWN_SH, PRUNE_SH, ROLLBACK_SH

__all__ = [
    "COMMIT_SH", "CONFIRM_INTERVAL", "CONFIRM_ROUNDS", "FILE_ORDER", "INSPECT_SH", "KEYOWN_SH", "OK_STATUSES",
    "PER_HOST", "PRUNE_SH", "ROLLBACK_SH", "Connector", "HostOutcome", "Prober", "RemoteSession", "Status",
    "_quote_text",
    "certbot_version", "command_label", "deploy", "key_owner_matches", "next_version", "sha256sums", "sni_names",
    "version_of_target",
]
