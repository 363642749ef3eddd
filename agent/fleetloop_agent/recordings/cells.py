"""The one rule for reading a recorded time or a text cell as a typed value.

Every reader of recordings goes through here, and so do the replay sources, ``store import`` and
``rules test``: a cell means the same thing wherever it is read, so what an operator tries on a laptop is
what a device replays.

Times are exact: a number of seconds (or ms, µs) is read as a decimal, never as a binary float, and
rounded to the nearest nanosecond (ties to even); nanoseconds must be whole numbers; an ISO 8601 date and
time keeps up to nine fractional digits and is UTC unless it names an offset. Every time fits in int64.

A cell that was *quoted* is text, always (``"1.5"`` is the text 1.5). An unquoted cell, stripped of the
spaces around it, is ``true``/``false`` (any case), an integer, a number (``nan`` and ``inf`` included;
NaN is a missing value in the rule language), or else text. An empty unquoted cell is refused: it could
mean empty text or a missing number, so it must say which (``""`` or ``nan``).

A signal's datatype follows from all its cells: all true/false → BOOL, all integers → INT64, numbers
→ FLOAT64; any text, or true/false mixed with numbers, makes it STRING holding every cell's text as
written, with a note naming the lines (that is often a typo in a numeric signal). Given a datatype (a
catalog), each cell must be of it, or the error names the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import ConfigError

NS_PER_S: Final = 1_000_000_000
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: Units a recorded time may be in; ``datetime`` is ISO 8601 text.
TIME_UNITS: Final = ("ns", "us", "ms", "s", "datetime")
_SCALE: Final = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": NS_PER_S}
_UNIT_WORDS: Final = {"ns": "nanoseconds", "us": "microseconds", "ms": "milliseconds", "s": "seconds"}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_INT = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)
EMPTY_CELL: Final = 'empty value (write "" for empty text, nan for a missing number)'
_FRACTION = re.compile(r"(?<=\d\d:\d\d:\d\d)[.,](\d+)")
#: Integers longer than this are outside int64 whatever their digits (and never handed to ``int()``).
_MAX_INT_DIGITS: Final = 20


# ------------------------------------------------------------------------------------------ times


def parse_time(text: str, unit: str) -> int:
    """Integer ns since the epoch of one recorded time; ValueError saying why not."""
    cell = text.strip()
    if unit == "datetime":
        ns = _datetime_ns(cell)
    elif unit == "ns":
        if not _INT.fullmatch(cell):
            raise ValueError(f"time {text!r} is not a whole number of nanoseconds")
        ns = int(cell) if len(cell) <= _MAX_INT_DIGITS else INT64_MAX + 1
    elif unit in _SCALE:
        if not _DECIMAL.fullmatch(cell):
            raise ValueError(f"time {text!r} is not a number of {_UNIT_WORDS[unit]}")
        d = Decimal(cell)
        ns = (
            INT64_MAX + 1 if d.adjusted() > 30 else int((d * _SCALE[unit]).to_integral_value(ROUND_HALF_EVEN))
        )
    else:
        raise ValueError(f"time unit {unit!r} is not one of {', '.join(TIME_UNITS)}")
    if not INT64_MIN <= ns <= INT64_MAX:
        raise ValueError(f"time {text!r} is outside the int64 nanosecond range")
    return ns


def _datetime_ns(cell: str) -> int:
    fraction = _FRACTION.search(cell)
    frac_ns = 0
    if fraction is not None:
        digits = fraction.group(1)
        frac_ns = int((Decimal("0." + digits) * NS_PER_S).to_integral_value(ROUND_HALF_EVEN))
        cell = cell[: fraction.start()] + cell[fraction.end() :]
    try:
        moment = datetime.fromisoformat(cell)
    except ValueError:
        raise ValueError(f"time {cell!r} is not an ISO 8601 date and time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(seconds=1) * NS_PER_S + frac_ns


def float_seconds_to_ns(t: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Float seconds (numpy arrays of loggers that store time so) → int64 ns, rounded to the nearest."""
    return np.round(np.asarray(t, dtype=np.float64) * NS_PER_S).astype(np.int64)


def guess_time_unit(header: str, first_cell: str) -> str:
    """The unit of a time column nobody named: ISO text is ``datetime``; a number is seconds unless its
    header names a smaller unit (``t_ns``, ``time (ms)``, ``Timestamp_us``, ``µs``)."""
    if not _DECIMAL.fullmatch(first_cell.strip()):
        return "datetime"
    words = re.findall(r"[a-zµ]+", header.lower())
    for unit in ("ns", "us", "ms"):
        if unit in words or (unit == "us" and "µs" in words):
            return unit
    return "s"


# ------------------------------------------------------------------------------------------ cells

BOOL, INT, FLOAT, TEXT, WIDE_INT = range(5)
_KIND_WORDS: Final = {
    BOOL: "true/false",
    INT: "a number",
    FLOAT: "a number",
    TEXT: "text",
    WIDE_INT: "a number",
}
_NOTE_WORDS: Final = {BOOL: "the true/false value", TEXT: "the text"}
_WANTED: Final = {DataType.BOOL: "true/false", DataType.INT64: "an integer", DataType.FLOAT64: "a number"}
_ACCEPTS: Final = {DataType.BOOL: {BOOL}, DataType.INT64: {INT}, DataType.FLOAT64: {INT, FLOAT}}


def classify(text: str, quoted: bool) -> tuple[int, Any]:
    """(kind, value) of one cell; ValueError for an empty unquoted cell."""
    if quoted:
        return TEXT, text
    cell = text.strip()
    if not cell:
        raise ValueError(EMPTY_CELL)
    low = cell.lower()
    if low in ("true", "false"):
        return BOOL, low == "true"
    if _INT.fullmatch(cell):
        if len(cell) > _MAX_INT_DIGITS:
            return WIDE_INT, None
        number = int(cell)
        return (INT, number) if INT64_MIN <= number <= INT64_MAX else (WIDE_INT, None)
    if _NUMBER.fullmatch(cell):
        return FLOAT, float(cell)
    return TEXT, cell


@dataclass
class Cells:
    """The cells of one signal in file order: text, whether it was quoted, and its line."""

    texts: list[str] = field(default_factory=list)
    quoted: list[bool] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def add(self, text: str, quoted: bool, line: int) -> None:
        self.texts.append(text)
        self.quoted.append(quoted)
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, i: int) -> str:
        """The cell's text as a STRING signal holds it (quoted: as written; bare: stripped)."""
        return self.texts[i] if self.quoted[i] else self.texts[i].strip()


def _kinds(cells: Cells, source: str) -> list[tuple[int, Any]]:
    out = []
    for text, quoted, line in zip(cells.texts, cells.quoted, cells.lines, strict=True):
        try:
            out.append(classify(text, quoted))
        except ValueError as exc:
            raise ConfigError(f"{source}:{line}: {exc}") from None
    return out


def infer_type(name: str, cells: Cells, source: str) -> tuple[DataType, str | None]:
    """The datatype the cells of signal ``name`` make, and a note when text made a numeric one STRING."""
    kinds = _kinds(cells, source)
    present = {k for k, _ in kinds}
    if present == {BOOL}:
        return DataType.BOOL, None
    if present == {INT}:
        return DataType.INT64, None
    if present <= {INT, FLOAT, WIDE_INT}:
        return DataType.FLOAT64, None
    odd = next(i for i, (k, _) in enumerate(kinds) if k == TEXT) if TEXT in present else None
    if odd is None:  # true/false mixed with numbers
        odd = next(i for i, (k, _) in enumerate(kinds) if k == BOOL)
    other = next((i for i, (k, _) in enumerate(kinds) if k != kinds[odd][0]), None)
    if other is None:
        return DataType.STRING, None
    return DataType.STRING, (
        f"{source}:{cells.lines[odd]}: note: signal {name} has {_NOTE_WORDS[kinds[odd][0]]} "
        f"{cells.text(odd)!r} (and {cells.text(other)!r} at line {cells.lines[other]}): all its values are "
        "read as strings"
    )


def typed_column(name: str, cells: Cells, data_type: DataType, source: str) -> npt.NDArray[Any]:
    """The cells of ``name`` as a numpy column of ``data_type``; the first cell that is not one is a
    ConfigError naming its line."""
    if data_type is DataType.STRING:
        for i in range(len(cells)):  # an empty unquoted cell is refused here too
            if not cells.quoted[i] and not cells.texts[i].strip():
                raise ConfigError(f"{source}:{cells.lines[i]}: {EMPTY_CELL}")
        column = np.empty(len(cells), dtype=object)
        column[:] = [cells.text(i) for i in range(len(cells))]
        return column
    accepts = _ACCEPTS[data_type]
    values: list[Any] = []
    for i, (kind, value) in enumerate(_kinds(cells, source)):
        if kind == WIDE_INT:
            raise ConfigError(f"{source}:{cells.lines[i]}: integer {cells.text(i)} does not fit in 64 bits")
        if kind not in accepts:
            raise ConfigError(
                f"{source}:{cells.lines[i]}: signal {name} is {_WANTED[data_type]} in the catalog "
                f"({data_type.name}), the input has {_KIND_WORDS[kind]}: {cells.text(i)!r}"
            )
        values.append(value)
    return np.array(values, dtype=data_type.numpy_dtype)
