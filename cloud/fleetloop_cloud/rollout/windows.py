"""Maintenance windows: cron expressions with a duration, in a time zone, as absolute time intervals.

hawkBit and AWS IoT Jobs describe a maintenance window the way operators think of one — "every night at
02:00 for two hours, Berlin time" — as a five-field cron expression, a duration and a zone. Devices and
the planner need the other form: the concrete intervals ``[start, end)`` in Unix seconds during the next
days. This module turns one into the other, purely (``now`` passed in), so the planner can compute each
device's windows in the device's own zone and ship them with the job; the device then installs only
inside one of them with nothing but its clock (it may be offline when the window opens).

Cron fields are minute, hour, day of month, month, day of week (0 or 7 = Sunday), each ``*``, a number,
a range ``a-b``, a step ``*/n`` or ``a-b/n``, a list of those, or a month / weekday name (``jan``,
``mon``). As in Vixie cron, when both day of month and day of week are restricted a day matching either
one matches. Local times that do not exist (a spring-forward gap) start at the first instant after it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleetloop_shared.errors import UserError

#: How far ahead windows are computed for a job (the device installs in one of these).
WINDOW_HORIZON_S = 14 * 86400.0
#: Most windows shipped with one job (merged overlapping windows count once); overflow policy: the
#: later ones are left out — the earliest are the ones that matter.
MAX_WINDOWS = 64

_NAMES = {
    3: {
        m: i + 1
        for i, m in enumerate(
            ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
        )
    },
    4: {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")
_ITEM = re.compile(r"^(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?$")


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression: the allowed values of each field."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Monday … 6 = Sunday (Python's numbering)
    any_day: bool
    any_weekday: bool

    def matches_date(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom, dow = day.day in self.days, day.weekday() in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _value(token: str, index: int, expr: str) -> int:
    names = _NAMES.get(index, {})
    if token in names:
        return names[token]
    if not token.isdigit():
        raise UserError(f"cron {expr!r}: {_FIELD_NAMES[index]} {token!r} is not a number")
    return int(token)


def _field(text: str, index: int, expr: str) -> tuple[set[int], bool]:
    lo, hi = _BOUNDS[index]
    out: set[int] = set()
    for item in text.lower().split(","):
        match = _ITEM.match(item)
        if match is None:
            raise UserError(f"cron {expr!r}: cannot read {_FIELD_NAMES[index]} {item!r}")
        span, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if step < 1:
            raise UserError(f"cron {expr!r}: step must be at least 1 in {item!r}")
        if span == "*":
            first, last = lo, hi
        elif "-" in span:
            a, b = span.split("-", 1)
            first, last = _value(a, index, expr), _value(b, index, expr)
        else:
            first = _value(span, index, expr)
            last = hi if step_text else first
        if not (lo <= first <= hi and lo <= last <= hi) or first > last:
            raise UserError(f"cron {expr!r}: {_FIELD_NAMES[index]} {item!r} is outside {lo}-{hi}")
        out.update(range(first, last + 1, step))
    return out, text == "*"


@lru_cache(maxsize=256)
def parse_cron(expr: str) -> Cron:
    """UserError naming the field that is wrong."""
    parts = expr.split()
    if len(parts) != 5:
        raise UserError(
            f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    minutes, _ = _field(parts[0], 0, expr)
    hours, _ = _field(parts[1], 1, expr)
    days, any_day = _field(parts[2], 2, expr)
    months, _ = _field(parts[3], 3, expr)
    cron_weekdays, any_weekday = _field(parts[4], 4, expr)
    # cron: 0 and 7 are Sunday, 1 Monday; Python: 0 Monday … 6 Sunday
    weekdays = frozenset((d - 1) % 7 for d in cron_weekdays)
    return Cron(
        expr,
        tuple(sorted(minutes)),
        tuple(sorted(hours)),
        frozenset(days),
        frozenset(months),
        weekdays,
        any_day,
        any_weekday,
    )


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; UserError for one this machine does not know."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"unknown time zone {name!r} (expected an IANA name like Europe/Berlin)") from None


def check_zone(name: str) -> bool:
    """Whether ``name`` is a zone this machine knows (a device may report anything)."""
    try:
        zone(name)
    except UserError:
        return False
    return True


def _starts(cron: Cron, tz: ZoneInfo, since: float, until: float) -> Iterable[float]:
    """Start instants (Unix seconds) of ``cron`` in ``tz`` within ``[since, until]``, in order."""
    day = dt.datetime.fromtimestamp(since, tz).date() - dt.timedelta(days=1)
    last = dt.datetime.fromtimestamp(until, tz).date() + dt.timedelta(days=1)
    while day <= last:
        if cron.matches_date(day):
            for hour in cron.hours:
                for minute in cron.minutes:
                    start = _instant(dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz))
                    if since <= start <= until:
                        yield start
        day += dt.timedelta(days=1)


def _instant(local: dt.datetime) -> float:
    """Unix seconds of the wall time ``local``; for one inside a spring-forward gap, the instant the gap
    ends (the first moment the clock shows a time at or after it), whatever the gap's length."""
    early, late = local.replace(fold=1).timestamp(), local.timestamp()
    if early == late or local.tzinfo is None:
        return late
    # fold=1 reads the wall time with the offset after the change (an instant before the gap), fold=0
    # with the one before it (an instant after): the change lies between; find it to the second
    lo, hi = int(early), int(late)
    offset_after = dt.datetime.fromtimestamp(hi, local.tzinfo).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, local.tzinfo).utcoffset() == offset_after:
            hi = mid
        else:
            lo = mid
    return float(hi)


def windows_between(
    specs: Sequence[tuple[str, float, str]], since: float, until: float, *, limit: int = MAX_WINDOWS
) -> tuple[tuple[float, float], ...]:
    """The merged intervals ``[start, end)`` of windows ``(cron, duration_s, zone)`` that overlap
    ``[since, until)``, earliest first, at most ``limit`` of them (an interval open at ``since`` is
    included with its real start)."""
    raw: list[tuple[float, float]] = []
    for expr, duration, tz_name in specs:
        cron, tz = parse_cron(expr), zone(tz_name)
        for start in _starts(cron, tz, since - duration, until):
            if start + duration > since and start < until:
                raw.append((start, start + duration))
    raw.sort()
    merged: list[tuple[float, float]] = []
    for start, end in raw:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
            continue
        if len(merged) == limit:
            break
        merged.append((start, end))
    return tuple(merged)


def inside(windows: Sequence[tuple[float, float]], now: float) -> bool:
    """Whether ``now`` lies in one of ``windows`` (``[start, end)``)."""
    return any(start <= now < end for start, end in windows)
