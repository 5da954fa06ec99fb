"""The daily job: scan every POP → renew what is due → deploy where behind → verify → notify.

`run` strings the steps together and owns nothing else: each step is its module's public
function, and typed results flow from one to the next. The caller holds the store lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from certmgr import deploy as deploy_mod
from certmgr import intents as intents_mod
from certmgr import log, pins, rundeploys
from certmgr import notify as notify_mod
from certmgr import renew as renew_mod
from certmgr import revoke as revoke_mod
from certmgr import scan as scan_mod
from certmgr.errors import CertmgrError, StoreError
from certmgr.inventory import Certificate, Inventory
from certmgr.rundeploys import DeployPlan
from certmgr.scan import SEVERITY_RANK, ScanResult
from certmgr.store_api import StateStore

_log = logging.getLogger(__name__)
OnOutcome = Callable[[deploy_mod.HostOutcome], None]

# Exit status of `certmgr run`: the worst outcome wins.
EXIT_OK, EXIT_WARNING, EXIT_FAILED, EXIT_ERROR = 0, 1, 2, 3
LOG_EXAMPLES = 3  # a repeated failure is logged once with this many examples, never once per endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    """Everything one `certmgr run` saw and did."""

    started: dt.datetime
    dry_run: bool
    scan_before: ScanResult
    renewals: tuple[renew_mod.RenewOutcome, ...]
    deploy_plan: tuple[DeployPlan, ...]
    deploys: tuple[deploy_mod.HostOutcome, ...] = ()
    scan_after: ScanResult | None = None
    messages: tuple[tuple[str, notify_mod.Message, notify_mod.Delivery], ...] = ()
    elapsed: float = 0.0
    notes: tuple[str, ...] = field(default=())
    revoking: tuple[str, ...] = field(default=())  # of `notes`: unfinished revocations (the summary is critical)

    @property
    def final_scan(self) -> ScanResult:
        return self.scan_after or self.scan_before

    @property
    def renew_failed(self) -> tuple[renew_mod.RenewOutcome, ...]:
        return tuple(o for o in self.renewals if o.status == "failed")

    @property
    def deploy_failed(self) -> tuple[deploy_mod.HostOutcome, ...]:
        return tuple(o for o in self.deploys if not o.ok)

    @property
    def changed(self) -> bool:
        return any(o.status == "renewed" for o in self.renewals) or any(
            o.status == deploy_mod.Status.DEPLOYED for o in self.deploys)

    @property
    def exit_code(self) -> int:
        if self.renew_failed or self.deploy_failed:
            return EXIT_FAILED
        severity = self.final_scan.severity
        if self.dry_run:
            return EXIT_OK
        code = {"ok": EXIT_OK, "warning": EXIT_WARNING, "critical": EXIT_FAILED}.get(severity, EXIT_ERROR)
        # an unfinished revocation is critical (a leaked key may still be valid at the CA), as status says
        return max(code, EXIT_FAILED) if self.revoking else code

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started.isoformat(),
            "dry_run": self.dry_run,
            "elapsed": round(self.elapsed, 3),
            "exit_code": self.exit_code,
            "scan_before": {"severity": self.scan_before.severity,
                            "certificates": [scan_mod.certificate_json(c) for c in self.scan_before.certificates]},
            "renewals": [o.to_json() for o in self.renewals],
            "deploy_plan": [{"cert": p.cert, "hosts": list(p.hosts), "reason": p.reason} for p in self.deploy_plan],
            "deploys": [o.to_json() for o in self.deploys],
            "final": {"severity": self.final_scan.severity,
                      "certificates": [scan_mod.certificate_json(c) for c in self.final_scan.certificates]},
            "messages": [{"channel": ch, "kind": m.kind, "severity": m.severity, "title": m.title, "ok": d.ok,
                          "error": d.error} for ch, m, d in self.messages],
            "notes": list(self.notes),
        }


def plan_deploys(inv: Inventory, scan: ScanResult, renewals: Sequence[renew_mod.RenewOutcome],
                 dry_run: bool, unsettled: Iterable[tuple[str, str]] = ()) -> list[DeployPlan]:
    """Renewed certificates go to all their hosts; others only to hosts not serving the local live version.

    `run` calls this before renewing, with no `renewals` (rundeploys.py): what is behind then is deployed
    at once, whether or not that certificate's renewal later fails (it is still the newest good version).

    `unsettled` (cert, host) pairs have an interrupted deploy to settle (intents.py): they are deployed
    to as well, which settles them (and skips the host when it already serves the live version).
    """
    renewed = {o.name for o in renewals if o.status in (("renewed", "planned") if dry_run else ("renewed",))}
    failed = {o.name for o in renewals if o.status == "failed"}
    live = {c.name: c.live_sha256 for c in scan.certificates}
    behind: dict[str, dict[str, str]] = {}
    for r in scan.iter_endpoints():
        sha = r.info.sha256 if r.info else None
        want = live.get(r.endpoint.cert)
        if want is not None and sha != want:
            why = r.error or ("serves an older certificate" if r.info else "serves nothing")
            behind.setdefault(r.endpoint.cert, {}).setdefault(r.endpoint.host, why)
    for cert_name, host in unsettled:
        if cert_name in live:
            behind.setdefault(cert_name, {}).setdefault(host, "an interrupted deploy to settle")
    plans = []
    for cert in inv.certificates:
        if not cert.hosts:
            continue
        if cert.name in renewed:
            plans.append(DeployPlan(cert=cert.name, hosts=cert.hosts,
                                    reason="planned renewal" if dry_run else "renewed"))
        elif cert.name in behind and cert.name not in failed:
            hosts = tuple(h for h in cert.hosts if h in behind[cert.name])
            reasons = sorted(set(behind[cert.name].values()))
            plans.append(DeployPlan(cert=cert.name, hosts=hosts, reason="behind the local live version: "
                                    + "; ".join(reasons)))
    return plans


def prune_store(store: Any, certs: Iterable[Certificate], keep: int) -> None:
    """Remove local versions beyond the retention; a failure is logged (the next run tries again), never raised."""
    for cert in certs:
        try:
            if len(store.versions(cert.name)) > keep:
                store.prune(cert.name, keep)
        except StoreError as exc:
            log.event(_log, logging.WARNING, "prune: store", cert=cert.name, error=str(exc))


def log_grouped(step: str, items: Iterable[tuple[str, str]]) -> None:
    """Log (subject, error) pairs once per distinct error with a count and a few examples."""
    groups: dict[str, list[str]] = {}
    for subject, error in items:
        groups.setdefault(error, []).append(subject)
    for error, subjects in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        more = len(subjects) - LOG_EXAMPLES
        log.event(_log, logging.WARNING, f"{step}: {error}", count=len(subjects),
                  examples=",".join(subjects[:LOG_EXAMPLES]) + (f",+{more} more" if more > 0 else ""))


def failure_messages(report_renewals: Sequence[renew_mod.RenewOutcome],
                     deploys: Sequence[deploy_mod.HostOutcome]) -> list[notify_mod.Message]:
    """One immediate alert per certificate that failed to renew and per host that failed to deploy."""
    msgs = []
    for o in report_renewals:
        if o.status == "failed":
            lines = [o.error or "renewal failed"]
            if o.hint:
                lines.append(f"Hint: {o.hint}")
            msgs.append(notify_mod.Message(kind="failure", severity="critical", certificate=o.name,
                                           title=f"FAILED renewal of {o.name}", lines=tuple(lines),
                                           command=f"certmgr renew {o.name}"))
    by_host: dict[str, list[deploy_mod.HostOutcome]] = {}
    for d in deploys:
        if not d.ok and d.status != deploy_mod.Status.HELD:
            by_host.setdefault(d.host, []).append(d)
    for host, outs in by_host.items():
        certs = tuple(dict.fromkeys(o.cert for o in outs))
        lines = [o.error or f"{o.status.value}" for o in outs[:5]]
        if outs[0].hint:
            lines.append(f"Hint: {outs[0].hint}")
        msgs.append(notify_mod.Message(
            kind="failure", severity="critical", certificate=certs[0] if len(certs) == 1 else None, hosts=(host,),
            title=f"FAILED deploy to {host}: {', '.join(certs)} ({outs[0].status.value})", lines=tuple(lines),
            command=f"certmgr deploy {' '.join(certs)} --hosts {host}"))
    held = [d for d in deploys if d.status == deploy_mod.Status.HELD]
    if held:
        hosts = tuple(dict.fromkeys(d.host for d in held))
        msgs.append(notify_mod.Message(kind="failure", severity="critical", hosts=hosts,
                                       title=f"HELD deploy to {len(hosts)} hosts: a canary did not verify",
                                       lines=(held[0].error or "",)))
    return msgs


def summary_message(report: RunReport, alerts: Sequence[notify_mod.Alert]) -> notify_mod.Message:
    """The one end-of-run message: what was renewed and deployed, what failed, what is still wrong."""
    renewed = [o for o in report.renewals if o.status == "renewed"]
    deployed = [o for o in report.deploys if o.status == deploy_mod.Status.DEPLOYED]
    lines = []
    for o in renewed:
        exp = o.new_not_after.date().isoformat() if o.new_not_after else "?"
        lines.append(f"renewed {o.name}: serial {o.new_serial} (expires {exp})")
        if o.unpinned is not None:
            lines.append(f"unpinned {o.name}: renewal could wait no longer; rolled-back version {o.unpinned} "
                         f"replaced by version {o.version} ({o.decision.reason})")
    lines += list(report.notes)
    per_cert = Counter(o.cert for o in deployed)
    for cert, n in per_cert.items():
        lines.append(f"deployed {cert} to {n} host{'s' if n != 1 else ''}")
    for o in report.renew_failed:
        lines.append(f"FAILED renewal {o.name}: {o.error}")
    for d in report.deploy_failed:
        lines.append(f"{d.status.value.upper()} {d.cert} → {d.host}")
    for a in alerts:
        m = a.message
        lines.append(f"{a.severity.upper()} {a.certificate}: {m.title}" + (f" → {m.command}" if m.command else ""))
    final = report.final_scan
    worst = max([final.severity] + ["critical" for _ in report.renew_failed + report.deploy_failed + report.revoking],
                key=SEVERITY_RANK.__getitem__)
    title = (f"certmgr run: {len(renewed)} renewed, {len(deployed)} deployed, "
             f"{len(report.renew_failed) + len(report.deploy_failed)} failed; "
             f"{sum(c.endpoints for c in final.certificates)} endpoints now {final.severity}")
    return notify_mod.Message(kind="summary", severity=worst, title=title, lines=tuple(lines[:40]))


async def run(inv: Inventory, store: StateStore, *, now: dt.datetime, dry_run: bool = False,
              renew_concurrency: int = renew_mod.DEFAULT_CONCURRENCY, deploy_parallel: int = 20,
              scan_concurrency: int = 100, notify: bool = True,
              retry: notify_mod.Retry | None = None,
              on_deploy: Callable[[Sequence[Certificate], Sequence[str]], OnOutcome | None] | None = None,
              ) -> RunReport:
    """One daily run. With `dry_run`, nothing is written locally, on a POP, in DNS or to chat.

    `on_deploy(certs, hosts)`, called as each of the run's deploys starts (they run one after another,
    beside the renewals: rundeploys.py), may return a listener for each (cert, host) outcome as it is
    known (progress display)."""
    t0 = time.monotonic()
    certs: tuple[Certificate, ...] = inv.certificates
    channels = list(inv.channels.values()) if notify and not dry_run else []

    # 1. scan: what every POP really serves, against the local live versions
    before = await scan_mod.scan(inv, store, now=now, concurrency=scan_concurrency)
    log.event(_log, logging.INFO, "run: scanned", endpoints=before.endpoint_count, severity=before.severity)
    log_grouped("scan", ((f"{r.endpoint.host}/{r.endpoint.name}", r.error or "; ".join(r.problems))
                         for r in before.iter_endpoints() if r.severity != "ok"))

    # A rolled-back certificate stays on its pinned version (plan.pin_hold); say so, every run
    # and so does a revocation asked for and not finished (a killed `certmgr revoke`)
    revoking = [(c.name, note) for c in certs if (note := pins.pending_note(store, c.name))]
    named = [(c.name, pin.note(c.name)) for c in certs if (pin := _pin(store, c.name)) is not None] + revoking
    for name, note in named:
        log.event(_log, logging.WARNING, "run: " + note, cert=name)
    notes = tuple(note for _, note in named)

    messages: list[tuple[str, notify_mod.Message, notify_mod.Delivery]] = []
    client_retry = retry or notify_mod.Retry()

    down: dict[str, notify_mod.Delivery] = {}  # channels that failed every attempt in this run

    async def alert(msgs: Sequence[notify_mod.Message]) -> None:
        for msg in msgs:
            # as notify_scan does: a channel that just failed every attempt does not get the whole
            # retry budget again per message (a hung webhook would add ~50 s to the run each time)
            for name, d in down.items():
                messages.append((name, msg, notify_mod.Delivery(
                    channel=name, ok=False, attempts=0, status=d.status,
                    error=f"skipped: channel failed earlier in this run ({d.error})")))
            live = [ch for ch in channels if ch.name not in down]
            for d in await notify_mod.send(live, msg, store=store, retry=client_retry) if live else []:
                messages.append((d.channel, msg, d))
                if not d.ok and d.attempts > 1:
                    down[d.channel] = d

    async def renewed(outs: Sequence[renew_mod.RenewOutcome]) -> None:
        for o in outs:
            if o.status in ("renewed", "failed", "planned"):
                log.event(_log, logging.WARNING if o.status == "failed" else logging.INFO, f"run: {o.status}",
                          cert=o.name, error=o.error or "", reason=o.decision.reason)
        if channels:
            await alert(failure_messages(outs, ()))

    # 2. renew what is due (plan.decide: ARI window, renew_before, backoff, pins), and 3. deploy meanwhile
    #    (rundeploys.py): at once where a POP lacks a version already stored (or an interrupted run may
    #    have switched live/ without recording it), each renewed certificate as soon as its renewal ends
    deploys: tuple[deploy_mod.HostOutcome, ...] = ()
    if dry_run:
        renewals = tuple(await renew_mod.renew(inv, store, certs, now=now, dry_run=True,
                                               concurrency=renew_concurrency))
        await renewed(renewals)
        plans = plan_deploys(inv, before, renewals, dry_run)
    else:
        unsettled = [(i.cert, i.host) for i in intents_mod.pending(store)]
        renewals, queue = await rundeploys.renew_and_deploy(
            inv, store, certs, plan_deploys(inv, before, (), False, unsettled), now=now,
            renew_concurrency=renew_concurrency, deploy_parallel=deploy_parallel, on_deploy=on_deploy,
            on_renewed=renewed)
        plans, deploys = queue.plans, queue.deploys
        log_grouped("deploy", ((f"{o.cert}@{o.host}", o.error or o.status.value) for o in deploys if not o.ok))
        if channels:
            await alert(failure_messages((), deploys))

    # retention: the store keeps the newest `keep_versions` per certificate (never the live one nor the one
    # before it); POPs are pruned by the deploy above, on the connection it already has
    if not dry_run:
        prune_store(store, certs, inv.keep_versions)

    # 4. verify: a fresh scan of what changed is the state we report and remember
    after = None
    if not dry_run:
        touched = sorted({o.name for o in renewals if o.status == "renewed"} | {o.cert for o in deploys})
        # A fresh clock: certificates issued during this run are not yet valid at its start time.
        later = max(now, dt.datetime.now(dt.UTC))
        after = before if not touched else await scan_mod.scan(inv, store, now=later, concurrency=scan_concurrency)
        scan_mod.save_state(store, after)
        # a revocation done in all but its record (every leaked serial revoked, the replacement served on every
        # host as this run's scan shows: say, a `revoke --now` killed before its deploy, then this run's): finished
        if revoking:
            served = [r for _, group in after.by_certificate() for r in group]
            finished = {name: line for name, _ in revoking
                        if (line := revoke_mod.finish_confirmed(store, inv.certificate(name), served)) is not None}
            notes = tuple(n for n in notes if n not in {note for name, note in revoking if name in finished})
            notes += tuple(finished.values())
            revoking = [(name, note) for name, note in revoking if name not in finished]

    report = RunReport(started=now, dry_run=dry_run, scan_before=before, renewals=renewals,
                       deploy_plan=tuple(plans), deploys=deploys, scan_after=after, notes=notes,
                       revoking=tuple(note for _, note in revoking))

    # 5. notify: one summary when anything happened, else only deduplicated expiry alerts
    if channels and after is not None:
        # an unfinished revocation (a leaked key still valid at the CA) is said on chat every run until it is done
        if report.changed or report.renew_failed or report.deploy_failed or revoking:
            names = [c.name for c in after.certificates]
            state = notify_mod.load_state(store, names)
            loaded = {name: dict(chans) for name, chans in state.items()}  # save_state writes only the changes
            alerts = notify_mod.alerts_for(after, state, after.started, channels)
            summary = summary_message(report, alerts)
            await alert([summary])
            delivered = {ch for ch, m, d in messages if m is summary and d.ok}
            for a in alerts:
                if a.channel in delivered:
                    notify_mod.apply(state, a, now)
            notify_mod.save_state(store, loaded, state, names, now)
        else:
            outcome = await notify_mod.notify_scan(after, channels, store=store, now=now, retry=client_retry)
            messages.extend(outcome.deliveries)
        log_grouped("notify", ((ch, d.error or "failed") for ch, _, d in messages if not d.ok))

    return RunReport(started=now, dry_run=dry_run, scan_before=before, renewals=renewals,
                     deploy_plan=tuple(plans), deploys=deploys, scan_after=after, messages=tuple(messages),
                     elapsed=time.monotonic() - t0, notes=notes, revoking=tuple(note for _, note in revoking))


def _pin(store: StateStore, name: str) -> pins.Pin | None:
    try:
        return pins.holding_pin(store, name) if store is not None else None
    except CertmgrError as exc:
        log.event(_log, logging.WARNING, "run: pin unreadable, ignored", cert=name, error=str(exc))
        return None


def render(report: RunReport, *, deploys_shown: bool = False) -> list[str]:
    """Lines for the terminal (and the journal): plan or outcome per step, then one verdict.

    `deploys_shown`: the deploy outcomes were already printed as they happened (progress), so not again."""
    out = []
    head = "plan only (--dry-run: nothing ordered, nothing deployed, nothing sent)" if report.dry_run else "run"
    out.append(f"{head}: scanned {report.scan_before.endpoint_count} endpoints "
               f"({report.scan_before.severity})")
    out += [f"  {note}" for note in report.notes]
    for o in report.renewals:
        if report.dry_run:
            verb = "would renew" if o.status == "planned" else o.status
            out.append(f"  {verb:<12} {o.name}: {o.decision.reason}")
        elif o.status != "not-due":
            out.append("  " + o.line())
            if o.status == "failed" and o.hint:
                out.append(f"           hint: {o.hint}")
    for p in report.deploy_plan:
        if report.dry_run:
            out.append(f"  would deploy {p.cert} → {', '.join(p.hosts)} ({p.reason})")
    for d in () if deploys_shown else report.deploys:
        out += d.lines()
    if report.scan_after is not None:
        f = report.scan_after
        out.append(f"verify: {f.endpoint_count} endpoints {f.severity}")
        for c in f.certificates:
            if c.severity == "ok":
                continue
            # one line per severity, worst first: a host only warning must not be listed as critical
            by_sev = sorted(((sev, hs) for sev, hs in c.hosts_by_severity.items() if sev != "ok" and hs),
                            key=lambda item: -SEVERITY_RANK[item[0]])
            for i, (sev, hs) in enumerate(by_sev):
                tail = f" → {c.command}" if c.command and i == 0 else ""
                out.append(f"  {sev:<8} {c.name} on {', '.join(hs)}{tail}")
    sent = sum(1 for _, _, d in report.messages if d.ok)
    failed = sum(1 for _, _, d in report.messages if not d.ok)
    if report.messages:
        out.append(f"notify: {sent} sent" + (f", {failed} failed" if failed else ""))
    if report.dry_run:
        out.append("plan only: no order was placed; `certmgr test-order NAME` places a real one against the CA's "
                   "staging directory (issued, then discarded)")
    out.append(f"run: exit {report.exit_code} in {report.elapsed:.1f}s")
    return out
