"""Doctor: check all a run will need — inventory, store, CAs, TSIG keys, POPs, nginx, timer — before it is needed.

Read-only: no DNS update, no reload, no ACME account is ever created; on a POP only empty temp files are
created and removed (to prove the cert root is writable, and that privkey_owner/privkey_group can be set).
Every check is a result; one failing stops nothing. One module per group of checks; `runner` runs them all.
"""

from __future__ import annotations

from certmgr.doctor.ca import check_ca
from certmgr.doctor.dns import check_dns_leftovers, check_provider_zone
from certmgr.doctor.hosts import CHOWN_SH, check_host
from certmgr.doctor.inventory import check_inventory, check_secrets, check_trust
from certmgr.doctor.model import GROUPS, Check, Connector, Prober, Report, Status, Timeouts, _one_line
from certmgr.doctor.render import iter_failures, render
from certmgr.doctor.runner import run
from certmgr.doctor.served import _check_served, served_check
from certmgr.doctor.store import check_store
from certmgr.doctor.sudo import FIND_SH, RUN_SH, _check_reload, _check_test, sudo_list_argv
from certmgr.doctor.timer import RUNS_PER_WINDOW, Lifetime, check_timer, interval_check, known_lifetimes, renewal_window

__all__ = [
    "CHOWN_SH",
    "FIND_SH",
    "GROUPS",
    "RUNS_PER_WINDOW",
    "RUN_SH",
    "Check",
    "Connector",
    "Lifetime",
    "Prober",
    "Report",
    "Status",
    "Timeouts",
    "_check_reload",
    "_check_served",
    "_check_test",
    "_one_line",
    "check_ca",
    "check_dns_leftovers",
    "check_host",
    "check_inventory",
    "check_provider_zone",
    "check_secrets",
    "check_store",
    "check_timer",
    "check_trust",
    "interval_check",
    "iter_failures",
    "known_lifetimes",
    "render",
    "renewal_window",
    "run",
    "served_check",
    "sudo_list_argv",
]
