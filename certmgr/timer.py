"""systemd timers, read without systemd: time spans, OnCalendar= expressions, unit + drop-in merging.

Pure: `doctor` uses it to learn how often `certmgr run` really fires (the worst gap between two
runs plus RandomizedDelaySec) and compare that with the shortest certificate lifetime.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SYSTEMD_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"), Path("/usr/local/lib/systemd/system"),
                Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
REPO_SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
TIMER_UNIT = "certmgr.timer"


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 7 * 86400, "week": 7 * 86400, "weeks": 7 * 86400,
    "M": 2629800, "month": 2629800, "months": 2629800,
    "y": 31557600, "year": 31557600, "years": 31557600,
}


def parse_timespan(text: str) -> float:
    """systemd.time(7) time span: `1h 30min`, `90`, `2d`, `5m` (minutes) → seconds; ValueError otherwise."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)  # a bare number is seconds
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", "", s).strip():
        raise ValueError(f"{text!r} is not a time span")
    total = 0.0
    for num, unit in parts:
        if unit not in _SPAN_UNITS:
            raise ValueError(f"{text!r}: unknown time unit {unit!r}")
        total += float(num) * _SPAN_UNITS[unit]
    return total


_SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
}
_DOW = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


@dataclass(frozen=True, slots=True)
class CalendarSpec:
    """One parsed `OnCalendar=` expression: the sets of values each field matches."""

    text: str
    weekdays: frozenset[int]
    years: frozenset[int] | None  # None: every year
    months: frozenset[int]
    days: frozenset[int]
    times: tuple[int, ...]  # seconds after midnight, sorted

    def matches(self, day: dt.date) -> bool:
        return (day.weekday() in self.weekdays and day.month in self.months and day.day in self.days
                and (self.years is None or day.year in self.years))


def _field(text: str, lo: int, hi: int, what: str, spec: str) -> frozenset[int]:
    """One calendar field: `*`, `5`, `1,3`, `1..5`, `*/2`, `0/15`, `8..18/2`."""
    out: set[int] = set()
    for item in text.split(","):
        base, _, step_s = item.partition("/")
        try:
            step = int(step_s) if step_s else 1
            if base == "*":
                start, end = lo, hi
            elif ".." in base:
                a, b = base.split("..", 1)
                start, end = int(a), int(b)
            else:
                start = int(base)
                end = hi if step_s else start
        except ValueError:
            raise ValueError(f"OnCalendar={spec!r}: {what} {item!r} is not understood") from None
        if step < 1 or start < lo or end > hi or start > end:
            raise ValueError(f"OnCalendar={spec!r}: {what} {item!r} is out of range {lo}..{hi}")
        out.update(range(start, end + 1, step))
    return frozenset(out)


def _weekdays(text: str, spec: str) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        names = item.split("..", 1)
        try:
            idx = [_DOW[n.strip().lower()[:3]] for n in names]
        except KeyError:
            raise ValueError(f"OnCalendar={spec!r}: weekday {item!r} is not understood") from None
        if len(idx) == 1:
            out.add(idx[0])
        else:
            a, b = idx
            out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


def parse_calendar(text: str) -> CalendarSpec:
    """A systemd.time(7) calendar expression (the common subset) → CalendarSpec; ValueError if unsupported."""
    spec = text.strip()
    tokens = spec.split()
    if len(tokens) > 1 and (tokens[-1].upper() in ("UTC", "Z") or ("/" in tokens[-1] and tokens[-1][0].isupper())):
        tokens = tokens[:-1]  # a time zone shifts the times, not the gaps between them
    tokens = _SHORTHANDS.get(" ".join(tokens).lower(), " ".join(tokens)).split()
    weekdays = frozenset(range(7))
    if tokens and re.match(r"[A-Za-z]", tokens[0]):
        weekdays = _weekdays(tokens.pop(0), spec)
    date_s, time_s = "*-*-*", "00:00:00"
    for tok in tokens:
        if ":" in tok:
            time_s = tok
        elif "-" in tok:
            date_s = tok
        else:
            raise ValueError(f"OnCalendar={spec!r}: {tok!r} is not understood")
    if "~" in date_s:
        raise ValueError(f"OnCalendar={spec!r}: '~' (days from the end of the month) is not supported")
    dparts = date_s.split("-")
    if len(dparts) == 2:
        dparts = ["*", *dparts]
    if len(dparts) != 3:
        raise ValueError(f"OnCalendar={spec!r}: date {date_s!r} is not understood")
    years = None if dparts[0] == "*" else _field(dparts[0], 1970, 2199, "year", spec)
    months = _field(dparts[1], 1, 12, "month", spec)
    days = _field(dparts[2], 1, 31, "day", spec)
    tparts = time_s.split(":")
    if len(tparts) == 2:
        tparts.append("00")
    if len(tparts) != 3 or "." in tparts[2]:
        raise ValueError(f"OnCalendar={spec!r}: time {time_s!r} is not understood")
    hours = _field(tparts[0], 0, 23, "hour", spec)
    minutes = _field(tparts[1], 0, 59, "minute", spec)
    seconds = _field(tparts[2], 0, 59, "second", spec)
    times = tuple(sorted(h * 3600 + m * 60 + s for h in hours for m in minutes for s in seconds))
    return CalendarSpec(text=spec, weekdays=weekdays, years=years, months=months, days=days, times=times)


def calendar_max_gap(specs: Sequence[CalendarSpec], *, start: dt.date, days: int = 800) -> float | None:
    """The longest time between consecutive elapses of the union of `specs`, over `days` from `start`.

    None when they elapse at most once in that horizon (the timer does not repeat).
    """
    cache: dict[frozenset[int], tuple[int, int, int]] = {}  # matching specs → (first, last, widest inner gap)
    prev_last: int | None = None
    widest = 0
    for i in range(days):
        day = start + dt.timedelta(days=i)
        matching = frozenset(j for j, s in enumerate(specs) if s.matches(day))
        if not matching:
            continue
        if matching not in cache:
            times = sorted({t for j in matching for t in specs[j].times})
            inner = max((b - a for a, b in itertools.pairwise(times)), default=0)
            cache[matching] = (times[0], times[-1], inner)
        first, last, inner = cache[matching]
        base = i * 86400
        if prev_last is not None:
            widest = max(widest, base + first - prev_last)
        widest = max(widest, inner)
        prev_last = base + last
    if prev_last is None or widest == 0:
        return None
    return float(widest)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerSpec:
    """What a `certmgr.timer` (with drop-ins) says about when it fires."""

    sources: tuple[Path, ...]
    on_calendar: tuple[str, ...] = ()
    on_unit_active: float | None = None  # OnUnitActiveSec= / OnUnitInactiveSec= (the shortest)
    randomized_delay: float = 0.0
    fixed_random_delay: bool = False


def parse_timer(texts: Sequence[tuple[Path, str]]) -> TimerSpec:
    """Merge a unit file and its drop-ins (in order) as systemd does: list keys accumulate, an empty value resets."""
    cal: list[str] = []
    mono: list[float] = []
    delay = 0.0
    fixed = False
    for path, text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            if section != "Timer" or "=" not in line:
                continue
            key, value = (s.strip() for s in line.split("=", 1))
            try:
                if key == "OnCalendar":
                    if value:
                        cal.append(value)
                    else:
                        cal.clear()
                elif key in ("OnUnitActiveSec", "OnUnitInactiveSec"):
                    if value:
                        mono.append(parse_timespan(value))
                    else:
                        mono.clear()
                elif key == "RandomizedDelaySec":
                    delay = parse_timespan(value) if value else 0.0
                elif key == "FixedRandomDelay":
                    fixed = value.lower() in ("1", "yes", "true", "on")
            except ValueError as exc:
                raise ValueError(f"{path}: {key}={value}: {exc}") from None
    return TimerSpec(sources=tuple(p for p, _ in texts), on_calendar=tuple(cal),
                     on_unit_active=min(mono) if mono else None, randomized_delay=delay, fixed_random_delay=fixed)


def timer_interval(spec: TimerSpec, *, today: dt.date) -> float | None:
    """Worst-case seconds between two runs (calendar gap + RandomizedDelaySec), None when it does not repeat."""
    gaps: list[float] = []
    if spec.on_calendar:
        g = calendar_max_gap([parse_calendar(c) for c in spec.on_calendar], start=today)
        if g is not None:
            gaps.append(g)
    if spec.on_unit_active is not None:
        gaps.append(spec.on_unit_active)
    if not gaps:
        return None
    # Each elapse is delayed by a random 0…RandomizedDelaySec: one early and the next late is the worst case.
    return min(gaps) + (0.0 if spec.fixed_random_delay else spec.randomized_delay)


def find_timer_files(dirs: Sequence[Path] = SYSTEMD_DIRS, *, fallback: Path | None = REPO_SYSTEMD_DIR,
                     unit: str = TIMER_UNIT) -> list[Path]:
    """The installed unit and its drop-ins (systemd's search order), else the repo's copy; [] if none."""
    def collect(search: Sequence[Path]) -> list[Path]:
        main = next((d / unit for d in search if (d / unit).is_file()), None)
        if main is None:
            return []
        dropins: dict[str, Path] = {}
        for d in search:  # higher-priority directories first: the first file of a name wins
            try:
                for p in sorted((d / f"{unit}.d").glob("*.conf")):
                    dropins.setdefault(p.name, p)
            except OSError:
                continue
        return [main, *(dropins[n] for n in sorted(dropins))]

    found = collect(dirs)
    if not found and fallback is not None:
        found = collect([fallback])
    return found
