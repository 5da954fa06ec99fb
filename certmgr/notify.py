"""Chat notifications: Discord, Slack, Matrix and generic JSON webhooks over httpx, with dedupe state.

`alerts_for` (pure, `now` passed in) decides what to say from a scan and the saved state; `send`
delivers one message to channels with bounded retries; a channel that is down is a `Delivery`
result, never an exception. URLs and tokens are registered as secrets and never shown.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from certmgr import docmerge, log, sanitize
from certmgr.docmerge import parse_time
from certmgr.errors import CertmgrError, NotifyError, SecretError
from certmgr.inventory import Channel
from certmgr.names import url_problem
from certmgr.scan import SEVERITY_RANK, CertSummary, EndpointResult, ScanResult

_log = logging.getLogger(__name__)

KINDS = ("problem", "worse", "repeat", "resolved", "test", "digest", "summary", "failure", "rollback",
         "revoke")
DIGEST_AFTER = 5  # more alerts than this for one channel in one run become one digest message
_COLOURS = {"ok": 0x2ECC71, "warning": 0xF1C40F, "critical": 0xE74C3C, "error": 0x8E44AD}
_ICONS = {"ok": "✅", "warning": "⚠️", "critical": "🔴", "error": "❌"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One chat message, service-neutral; each channel type renders it in its own payload format."""

    kind: str  # one of KINDS
    severity: str  # ok | warning | critical | error
    title: str
    lines: tuple[str, ...] = ()  # body, one fact per line
    certificate: str | None = None
    hosts: tuple[str, ...] = ()
    days_left: float | None = None
    command: str | None = None  # what on-call should run
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # idempotency key (Matrix txnId)

    @property
    def text(self) -> str:
        """Plain text, one fact per line; each part inert (`sanitize.line`), so none can forge a line."""
        parts = [f"{_ICONS.get(self.severity, '')} {sanitize.line(self.title)}".strip(),
                 *(sanitize.line(line) for line in self.lines)]
        if self.command:
            parts.append(f"Run: {sanitize.line(self.command)}")
        return "\n".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """What happened when one message went to one channel."""

    channel: str
    ok: bool
    attempts: int
    status: int | None = None  # last HTTP status seen
    error: str | None = None  # why it failed (never contains the URL or token)
    elapsed: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Bounded retries: `attempts` tries, sleeping `backoff[i]` between them, each try under `timeout`."""

    attempts: int = 4
    backoff: tuple[float, ...] = (0.5, 2.0, 5.0)
    timeout: float = 10.0
    max_retry_after: float = 60.0  # honour a 429's Retry-After up to this long


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """A decision of `alerts_for`: tell `channel` about `certificate` (and the state to record once sent)."""

    channel: str
    certificate: str
    kind: str  # problem | worse | repeat | resolved
    severity: str
    message: Message


class NotifyStore(Protocol):
    def load_json(self, relpath: str, default: Any = None) -> Any: ...
    def save_json(self, relpath: str, obj: Any, mode: int = ...) -> None: ...


# ---------------------------------------------------------------- what to say


def _fmt_days(days: float | None) -> str:
    if days is None:
        return "unknown"
    if days < 0:
        return f"expired {-days:.1f} days ago"
    if days >= 1:
        return f"{days:.1f} days left"
    seconds = days * 86400
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours left"
    return f"{seconds / 60:.1f} minutes left" if seconds >= 60 else f"{seconds:.0f} seconds left"


def message_for(summary: CertSummary, endpoints: Sequence[EndpointResult], kind: str) -> Message:
    """The message on-call needs for one certificate: which POPs, how long left, what to run."""
    bad = [r for r in endpoints if r.severity != "ok"]
    hosts = tuple(dict.fromkeys(r.endpoint.host for r in bad))
    if kind == "resolved":
        return Message(kind=kind, severity="ok", certificate=summary.name,
                       title=f"RESOLVED {summary.name}: all {summary.endpoints} endpoints ok",
                       lines=(f"Time left: {_fmt_days(summary.days_left)}",), days_left=summary.days_left)
    label = {"problem": "", "worse": "WORSE ", "repeat": "STILL "}.get(kind, "")
    # the title counts only the POPs at the certificate's severity: a POP merely warning is not "critical"
    by_sev: dict[str, list[str]] = {}
    for r in sorted(bad, key=lambda r: -SEVERITY_RANK[r.severity]):
        if r.endpoint.host not in by_sev.setdefault(r.severity, []):
            by_sev[r.severity].append(r.endpoint.host)
    worst_hosts = by_sev.get(summary.severity, list(hosts))
    pops = (", ".join(hosts) if len(by_sev) <= 1 else
            "; ".join(f"{sev}: {', '.join(hs)}" for sev, hs in by_sev.items())) or "(none)"
    lines = [f"POPs: {pops}", f"Time left: {_fmt_days(summary.days_left)}"]
    seen: set[str] = set()
    for r in bad:
        for p in r.problems:
            line = f"- {r.endpoint.host} {r.endpoint.name}: {p}"
            if p not in seen and len(seen) < 8:
                seen.add(p)
                lines.append(line)
    return Message(kind=kind, severity=summary.severity, certificate=summary.name, hosts=hosts,
                   title=f"{label}{summary.severity.upper()} {summary.name} on {len(worst_hosts)} of "
                         f"{len({r.endpoint.host for r in endpoints})} POPs",
                   lines=tuple(lines), days_left=summary.days_left, command=summary.command)


def digest(alerts: Sequence[Alert]) -> Message:
    """Many alerts for one channel in one run become one message (chat rate limits, on-call sanity)."""
    sev = max((a.severity for a in alerts if a.kind != "resolved"), key=SEVERITY_RANK.__getitem__, default="ok")
    lines = []
    for a in alerts:
        m = a.message
        cmd = f" → {m.command}" if m.command else ""
        lines.append(f"- {a.severity.upper()} {a.certificate}: {_fmt_days(m.days_left)}"
                     f"{' on ' + ', '.join(m.hosts) if m.hosts else ''}{cmd}")
    return Message(kind="digest", severity=sev, title=f"certmgr: {len(alerts)} certificates changed state",
                   lines=tuple(lines))


def alerts_for(result: ScanResult, state: Mapping[str, Mapping[str, Any]], now: dt.datetime,
               channels: Iterable[Channel]) -> list[Alert]:
    """What to send, per (certificate, channel), given what was sent before. Pure; `now` passed in.

    `state[cert][channel]` is `{"severity": s, "sent_at": iso}` for the last problem sent.
    Notify when the severity reaches the channel's `min_severity` for the first time, when it
    rises, when `repeat` has passed since the last message, and once ("resolved") when it falls
    below `min_severity` again. A lower but still notifiable severity says nothing.
    """
    out: list[tuple[int, str, str, str]] = []  # (certificate index, channel, kind, severity)
    chans = list(channels)
    for i, summary in enumerate(result.certificates):
        rank = SEVERITY_RANK[summary.severity]
        for ch in chans:
            prev = state.get(summary.name, {}).get(ch.name)
            kind: str | None = None
            if rank >= SEVERITY_RANK.get(ch.min_severity, 1):
                if not prev:
                    kind = "problem"
                elif rank > SEVERITY_RANK.get(str(prev.get("severity")), 0):
                    kind = "worse"
                else:
                    sent = parse_time(prev.get("sent_at"))
                    if sent is None or (now - sent).total_seconds() >= ch.repeat:
                        kind = "repeat"
            elif prev:
                kind = "resolved"
            if kind is not None:
                out.append((i, ch.name, kind, "ok" if kind == "resolved" else summary.severity))
    # Messages need each alerting certificate's endpoints: one pass over them (a large scan's are on disk).
    wanted = {result.certificates[i].name for i, _, _, _ in out}
    by_cert: dict[str, list[EndpointResult]] = {}
    if wanted:
        by_cert = {name: eps for name, eps in result.by_certificate() if name in wanted}
    return [Alert(channel=ch, certificate=result.certificates[i].name, kind=kind, severity=sev,
                  message=message_for(result.certificates[i], by_cert.get(result.certificates[i].name, []), kind))
            for i, ch, kind, sev in out]


def apply(state: dict[str, dict[str, Any]], alert: Alert, now: dt.datetime) -> None:
    """Record a delivered alert in `state` (in place): resolved clears, anything else remembers."""
    per_cert = state.setdefault(alert.certificate, {})
    if alert.kind == "resolved":
        per_cert.pop(alert.channel, None)
    else:
        per_cert[alert.channel] = {"severity": alert.severity, "sent_at": now.isoformat(), "kind": alert.kind}


def load_state(store: NotifyStore, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`state/notify/<cert>.json` for each certificate: {channel: {severity, sent_at, kind}}."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        data = store.load_json(f"state/notify/{name}.json", default={}) or {}
        chans = data.get("channels", {}) if isinstance(data, dict) else {}
        out[name] = dict(chans) if isinstance(chans, dict) else {}
    return out


def save_state(store: NotifyStore, before: Mapping[str, Mapping[str, Any]], state: Mapping[str, Mapping[str, Any]],
               names: Iterable[str], now: dt.datetime) -> None:
    """Write what this run changed (`before` → `state`), per channel, merged into the stored copy
    (certmgr.docmerge `notify`): scan takes no lock, and another controller may have notified meanwhile.
    A certificate this run changed nothing for is not written."""
    for name in names:
        old, new = before.get(name, {}), state.get(name, {})
        delta = {ch: new.get(ch) for ch in sorted(set(old) | set(new)) if old.get(ch) != new.get(ch)}
        if delta:
            docmerge.merge_json(store, f"state/notify/{name}.json", {"at": now.isoformat(), "channels": delta},
                                "notify")


# ---------------------------------------------------------------- payloads, per service


def payload(channel: Channel, message: Message, url: str | None,
            token: str | None) -> tuple[str, str, dict[str, str], dict[str, Any]]:
    """(method, url, headers, JSON body) in the channel's documented format.

    Every message carries foreign text (certificate fields, a CA's or a POP's words): it is plain
    and inert already (`Message.text`); here each service's markup is neutralized, so a `**`,
    `<b>` or `@everyone` in it shows as written and pings nobody (docs/security.md).
    """
    text = message.text
    title = sanitize.line(message.title)
    if channel.type == "discord":
        # Discord "Execute Webhook": content ≤ 2000 chars; embeds coloured by severity; no pings
        # (markdown escaped, "@" defused, and allowed_mentions parses none).
        body: dict[str, Any] = {
            "username": "certmgr",
            "content": _clip(sanitize.discord(text), 2000),
            "embeds": [{"title": _clip(sanitize.discord(title), 256), "color": _COLOURS.get(message.severity, 0)}],
            "allowed_mentions": {"parse": []},
        }
        return "POST", _need(url, channel), {}, body
    if channel.type == "slack":
        # Slack incoming webhook: `text` is the notification fallback; one mrkdwn section block.
        mrkdwn = sanitize.slack(text)
        body = {"text": _clip(sanitize.slack(title), 3000),
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": _clip(mrkdwn, 3000)}}]}
        return "POST", _need(url, channel), {}, body
    if channel.type == "matrix":
        # Client-server API v3: PUT /rooms/{roomId}/send/m.room.message/{txnId}; the txnId makes
        # retries idempotent. Bots send m.notice (spec: clients never auto-reply to notices). An
        # empty m.mentions (spec v1.7 intentional mentions) turns off the body-matching push rules.
        assert channel.homeserver is not None and channel.room is not None
        target = (f"{channel.homeserver.rstrip('/')}/_matrix/client/v3/rooms/{quote(channel.room, safe='')}"
                  f"/send/m.room.message/{quote(message.key, safe='')}")
        body = {"msgtype": "m.notice", "body": sanitize.matrix_body(text), "format": "org.matrix.custom.html",
                "formatted_body": sanitize.matrix_html(text), "m.mentions": {}}
        if token is None:
            raise SecretError(f"notify {channel.name}: no access token")
        return "PUT", target, {"Authorization": f"Bearer {token}"}, body
    body = {
        "source": "certmgr", "version": 1, "kind": message.kind, "severity": message.severity,
        "title": title, "text": text, "certificate": message.certificate, "hosts": list(message.hosts),
        "days_left": round(message.days_left, 3) if message.days_left is not None else None,
        "command": message.command, "lines": [sanitize.line(line) for line in message.lines], "id": message.key,
    }
    return "POST", _need(url, channel), {}, body


def _need(url: str | None, channel: Channel) -> str:
    if not url:
        raise SecretError(f"notify {channel.name}: no webhook URL")
    return url


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _secrets(channel: Channel) -> tuple[str | None, str | None]:
    url = channel.url.read() if channel.url else None
    token = channel.token.read() if channel.token else None
    for s in (url, token):
        if s:
            log.register_secret(s)
    return url, token


# ---------------------------------------------------------------- delivery


def _retry_after(resp: httpx.Response, limit: float) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        try:
            data = resp.json()
            value = data.get("retry_after") if isinstance(data, dict) else None  # Discord puts it in the body
        except ValueError:
            value = None
    try:
        return min(max(float(value), 0.0), limit) if value is not None else None
    except (TypeError, ValueError):
        return None


def _check_url(channel: Channel, url: str) -> None:
    """A URL httpx cannot send to, or http:// off loopback, is a NotifyError that never shows the URL."""
    problem = url_problem(url)
    if problem is None:
        try:
            httpx.URL(url)
        except httpx.InvalidURL:
            problem = "is not a valid URL"
    if problem is not None:
        where = ("homeserver" if channel.type == "matrix" else
                 channel.url.key_path if channel.url is not None else "url")
        raise NotifyError(f"notify {channel.name}: {where}: the URL {problem} (not sent)",
                          hint=f"fix [channels.{channel.name}] and run `certmgr inventory check`")


async def deliver(client: httpx.AsyncClient, channel: Channel, message: Message, *,
                  retry: Retry = Retry()) -> Delivery:
    """Send `message` to one channel: retries transport errors, 408, 429 and 5xx with backoff; never raises."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        method, url, headers, body = payload(channel, message, *_secrets(channel))
        _check_url(channel, url)
    except (SecretError, NotifyError) as exc:
        return Delivery(channel=channel.name, ok=False, attempts=0, error=log.redact(exc.message))
    status: int | None = None
    error = "not attempted"
    attempt = 0
    for attempt in range(1, retry.attempts + 1):
        wait: float | None = None
        try:
            async with asyncio.timeout(retry.timeout):
                resp = await client.request(method, url, headers=headers, json=body, timeout=retry.timeout)
            status = resp.status_code
            if 200 <= status < 300:
                return Delivery(channel=channel.name, ok=True, attempts=attempt, status=status,
                                elapsed=loop.time() - start)
            error = f"HTTP {status}"
            if status not in (408, 429) and status < 500:
                break  # 4xx: the URL/token/payload is wrong; retrying will not fix it
            if status == 429:
                wait = _retry_after(resp, retry.max_retry_after)
        except TimeoutError:
            error = f"timeout after {retry.timeout:g}s"
        except httpx.HTTPError as exc:
            # httpx messages can embed the URL: keep only the exception type and a redacted cause
            error = log.redact(f"{type(exc).__name__}: {exc}")
        except httpx.InvalidURL:  # not an HTTPError; _check_url should have caught it: never retry it
            error = f"notify {channel.name}: the URL is not valid (not sent)"
            break
        if attempt < retry.attempts:
            if wait is None:
                wait = retry.backoff[min(attempt - 1, len(retry.backoff) - 1)] if retry.backoff else 0.0
            log.event(_log, logging.INFO, "notify retry", channel=channel.name, attempt=attempt, error=error,
                      wait=wait)
            await asyncio.sleep(wait)
    log.event(_log, logging.WARNING, "notify failed", channel=channel.name, attempts=attempt, error=error)
    return Delivery(channel=channel.name, ok=False, attempts=attempt, status=status,
                    error=f"{error} ({attempt} attempt{'s' if attempt != 1 else ''}, gave up)",
                    elapsed=loop.time() - start)


async def send(channels: Sequence[Channel], message: Message, *, store: Any = None,
               client: httpx.AsyncClient | None = None, retry: Retry = Retry()) -> list[Delivery]:
    """Send one message to every channel concurrently; one Delivery per channel, in channel order.

    With a store, each delivery is written to the audit log (`notify`, channel, ok/failed).
    """
    own = client is None
    c = client or httpx.AsyncClient(follow_redirects=False)
    try:
        results: list[Delivery | None] = [None] * len(channels)

        async def one(i: int, ch: Channel) -> None:
            results[i] = await deliver(c, ch, message, retry=retry)

        async with asyncio.TaskGroup() as tg:
            for i, ch in enumerate(channels):
                tg.create_task(one(i, ch))
    finally:
        if own:
            await c.aclose()
    out = [d for d in results if d is not None]
    if store is not None:
        for d in out:
            try:
                store.audit("notify", d.channel, to="sent" if d.ok else "failed", kind=message.kind,
                            severity=message.severity, certificate=message.certificate, attempts=d.attempts,
                            error=d.error)
            except CertmgrError as exc:
                log.event(_log, logging.WARNING, "notify: audit failed", error=exc.message)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One run of scan notifications: what was decided and how each delivery went."""

    alerts: tuple[Alert, ...]
    deliveries: tuple[tuple[str, Message, Delivery], ...]  # (channel, message sent, delivery)

    @property
    def failed(self) -> tuple[Delivery, ...]:
        return tuple(d for _, _, d in self.deliveries if not d.ok)


async def notify_scan(result: ScanResult, channels: Sequence[Channel], *, store: NotifyStore, now: dt.datetime,
                      client: httpx.AsyncClient | None = None, retry: Retry = Retry()) -> Outcome:
    """Dedupe against `state/notify/`, send what is due (a digest when many), record what was delivered.

    A failed delivery leaves the state as it was, so the next run tries again.
    """
    names = [c.name for c in result.certificates]
    state = load_state(store, names)
    before = {name: dict(chans) for name, chans in state.items()}
    alerts = alerts_for(result, state, now, channels)
    by_channel: dict[str, list[Alert]] = {}
    for a in alerts:
        by_channel.setdefault(a.channel, []).append(a)
    chan_map = {c.name: c for c in channels}
    deliveries: list[tuple[str, Message, Delivery]] = []
    own = client is None
    c = client or httpx.AsyncClient(follow_redirects=False)
    try:
        async def one(ch: Channel, items: list[Alert]) -> None:
            msgs: list[tuple[Message, list[Alert]]]
            if len(items) > DIGEST_AFTER:
                msgs = [(digest(items), items)]
            else:
                msgs = [(a.message, [a]) for a in items]
            down: Delivery | None = None
            for msg, covered in msgs:
                if down is not None:
                    # the channel just failed every attempt: do not spend the retry budget again per message
                    d = Delivery(channel=ch.name, ok=False, attempts=0, status=down.status,
                                 error=f"skipped: channel failed earlier in this run ({down.error})")
                else:
                    d = await deliver(c, ch, msg, retry=retry)
                    if not d.ok and d.attempts > 1:
                        down = d
                deliveries.append((ch.name, msg, d))
                if d.ok:
                    for a in covered:
                        apply(state, a, now)

        async with asyncio.TaskGroup() as tg:
            for name, items in by_channel.items():
                tg.create_task(one(chan_map[name], items))
    finally:
        if own:
            await c.aclose()
    save_state(store, before, state, names, now)
    audit = getattr(store, "audit", None)
    if audit is not None:
        for ch_name, msg, d in deliveries:
            try:
                audit("notify", ch_name, to="sent" if d.ok else "failed", kind=msg.kind, severity=msg.severity,
                      certificate=msg.certificate, attempts=d.attempts, error=d.error)
            except CertmgrError as exc:
                log.event(_log, logging.WARNING, "notify: audit failed", error=exc.message)
    return Outcome(alerts=tuple(alerts), deliveries=tuple(deliveries))


def ping_message(now: dt.datetime) -> Message:
    """What `certmgr notify test` sends."""
    return Message(kind="test", severity="ok", title="certmgr test message",
                   lines=(f"Sent at {now:%Y-%m-%d %H:%M:%S}Z by `certmgr notify test`: this channel works.",))


__all__ = [
    "Alert",
    "Delivery",
    "Message",
    "Outcome",
    "Retry",
    "alerts_for",
    "apply",
    "deliver",
    "digest",
    "load_state",
    "message_for",
    "notify_scan",
    "payload",
    "ping_message",
    "save_state",
    "send",
]
