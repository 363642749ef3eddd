"""Durations as operators write them: ``500ms 1s 2m 1h``.

One parser for both places a duration appears (window arguments inside an expression and the
``min_interval``/``pre``/``post`` fields of a campaign), so the two can never disagree about what ``1.5s``
means. Results are whole nanoseconds; a duration that does not land on a whole nanosecond is refused
rather than rounded, because a silently rounded window is a rule that does something other than written.
"""

from __future__ import annotations

import re
from fractions import Fraction

from fleetloop_shared.errors import RuleError

#: Nanoseconds per unit. Deliberately few units: ``m`` is minutes, there is no month or microsecond.
UNIT_NS: dict[str, int] = {
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")


def is_duration_unit(suffix: str) -> bool:
    """Whether ``suffix`` (the letters right after a number) is a duration unit."""
    return suffix in UNIT_NS


def parse_duration(text: str) -> int:
    """``text`` (e.g. ``"1.5s"``) in nanoseconds.

    Raises :class:`RuleError` without a location; callers know where the text sits and re-raise with it.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise RuleError(f"{text!r} is not a duration (write e.g. 500ms, 1s, 2m, 1h)")
    ns = Fraction(match[1]) * UNIT_NS[match[2]]
    if ns.denominator != 1:
        raise RuleError(f"duration {text!r} is not a whole number of nanoseconds")
    return int(ns)


def format_duration(ns: int) -> str:
    """The shortest exact spelling of ``ns`` in the largest unit that divides it (for messages)."""
    for unit in ("h", "m", "s", "ms"):
        if ns and ns % UNIT_NS[unit] == 0:
            return f"{ns // UNIT_NS[unit]}{unit}"
    return f"{ns}ns"
