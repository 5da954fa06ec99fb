"""The doctor run: every check concurrently, each task bounded, results in display order."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from certmgr import remote as remote_mod
from certmgr.dns import registry as dns_registry
from certmgr.doctor.ca import check_ca
from certmgr.doctor.dns import check_dns_leftovers, check_provider_zone
from certmgr.doctor.hosts import check_host
from certmgr.doctor.inventory import check_inventory, check_secrets, check_trust
from certmgr.doctor.model import GROUPS, Check, Connector, Prober, Report, Status, Timeouts
from certmgr.doctor.store import check_ha_store, check_store
from certmgr.doctor.systemd import Systemctl, installed_timer, run_systemctl
from certmgr.doctor.timer import check_timer
from certmgr.errors import CertmgrError
from certmgr.inventory import CA, DNSProvider, Host
from certmgr.log import event
from certmgr.material import CertInfo

logger = logging.getLogger(__name__)


def _default_connector(host: Host, *, jump: Host | None, accept_new: bool, timeouts: remote_mod.Timeouts) -> Any:
    return remote_mod.connect(host, jump=jump, accept_new=accept_new, timeouts=timeouts)


async def run(inventory_path: Path, state_dir: Path, *, now: dt.datetime, timer_interval_s: float | None = None,
              timer_files: Sequence[Path] | None = None, concurrency: int = 20, timeouts: Timeouts | None = None,
              connector: Connector | None = None, prober: Prober | None = None,
              systemctl: Systemctl | None = None) -> Report:
    """Every check, concurrently (at most `concurrency` tasks), each task under `timeouts.check`.

    `timer_files` None: ask systemd (`systemctl`, or the `systemctl` callable given) for the installed
    certmgr.timer and read the files it loaded; ignored when `timer_interval_s` is given.
    """
    from certmgr.scan import probe

    timeouts = timeouts or Timeouts()
    loop = asyncio.get_running_loop()
    start = loop.time()
    inv_check, inv = check_inventory(inventory_path)
    checks: list[Check] = [inv_check]
    if inv is None:
        return Report(checks=tuple(checks), elapsed=loop.time() - start)
    checks += check_trust(inv)
    checks += check_secrets(inv)
    if inv.store is not None:  # HA: the database is the store; the state directory is not used
        ha_checks, store = check_ha_store(inv)
        checks += ha_checks
    else:
        store_check, store = check_store(state_dir)
        checks.append(store_check)
    checks.append(check_dns_leftovers(store, now=now))

    async def default_prober(address: str, port: int, sni: str) -> Any:
        return await probe(address, port, sni, connect_timeout=timeouts.handshake,
                           handshake_timeout=timeouts.handshake)

    connector = connector or _default_connector
    prober = prober or default_prober
    sem = asyncio.Semaphore(concurrency)
    served: list[CertInfo] = []
    results: list[tuple[int, list[Check]]] = []
    executor = ThreadPoolExecutor(max_workers=min(8, max(1, len(inv.cas) * 2)), thread_name_prefix="doctor-acme")

    async def guarded(order: int, group: str, name: str, subject: str,
                      body: Callable[[list[Check]], Awaitable[None]]) -> None:
        out: list[Check] = []
        results.append((order, out))
        async with sem:
            t0 = loop.time()
            try:
                async with asyncio.timeout(timeouts.check):
                    await body(out)
            except TimeoutError:
                out.append(Check(group=group, name=name, subject=subject, status=Status.FAIL,
                                 message=f"no result within {timeouts.check:g}s ({len(out)} check(s) done before)",
                                 hint="something hangs: rerun with -vv, or raise --timeout",
                                 elapsed=loop.time() - t0))
            except CertmgrError as exc:  # an expected failure that escaped a finer check
                out.append(Check(group=group, name=name, subject=subject, status=Status.FAIL,
                                 message=exc.message, hint=exc.hint, elapsed=loop.time() - t0))

    def ca_body(ca: CA) -> Callable[[list[Check]], Awaitable[None]]:
        async def body(out: list[Check]) -> None:
            out.extend(await check_ca(ca, store, executor=executor, timeouts=timeouts))
        return body

    def zone_body(prov: DNSProvider, zone: str) -> Callable[[list[Check]], Awaitable[None]]:
        async def body(out: list[Check]) -> None:
            out.extend(await check_provider_zone(prov, zone, timeouts=timeouts))
        return body

    def host_body(host: Host) -> Callable[[list[Check]], Awaitable[None]]:
        async def body(out: list[Check]) -> None:
            await check_host(inv, host, out, served, timeouts=timeouts, connector=connector, prober=prober)
        return body

    try:
        async with asyncio.TaskGroup() as tg:
            order = 0
            for ca in inv.cas.values():
                tg.create_task(guarded(order, "ca", "directory", ca.name, ca_body(ca)))
                order += 1
            for prov in inv.dns.values():
                for zone in prov.zones:
                    tg.create_task(guarded(order, "dns", dns_registry.first_check(prov.type), f"dns.{prov.name} {zone}",
                                           zone_body(prov, zone)))
                    order += 1
            for host in inv.hosts.values():
                tg.create_task(guarded(order, "host", "ssh", host.name, host_body(host)))
                order += 1
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    for _, out in sorted(results, key=lambda r: r[0]):
        checks.extend(out)
    if timer_interval_s is None and timer_files is None:
        installed, timer = await asyncio.to_thread(installed_timer, systemctl or run_systemctl)
        checks.append(installed)
        timer_files = timer.files if timer is not None else ()
    checks.append(check_timer(inv, store, served, interval=timer_interval_s, timer_files=timer_files or (),
                              now=now))
    ordered = sorted(checks, key=lambda c: GROUPS.index(c.group))  # stable: task order kept within a group
    report = Report(checks=tuple(ordered), elapsed=loop.time() - start)
    for c in report.checks:
        if c.status != Status.OK:
            event(logger, logging.INFO, "doctor finding", check=c.name, subject=c.subject, status=c.status.value)
    return report
