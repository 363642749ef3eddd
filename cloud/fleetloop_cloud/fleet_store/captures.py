"""One capture read back from the fleet store: its signals, a min/max envelope per pixel column, state
bands, and every row (for exports).

The timeline draws a capture of a million samples in well under a second because the browser never
sees the million: for each plot column DuckDB keeps the lowest and the highest value and their times
(the envelope a line through every sample would paint), so at most two points per column travel. A
signal with fewer samples than that comes back whole, sample for sample. Enumerations (booleans, gears,
text states) are read as the runs of one value: a band per run, however many samples it holds.

Every read is bounded: columns (:data:`MAX_COLUMNS`), bands per signal (:data:`MAX_BANDS`, then the
rest is summarised as one band marked ``truncated``), rows of an export (:data:`MAX_EXPORT_ROWS`,
refused past it with the SQL to read it instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_shared.classification import FULL_VIEW, ClassView, SignalClass
from fleetloop_shared.errors import UserError

#: Plot columns a series may be reduced to (a wide screen is ~4,000 device pixels).
MAX_COLUMNS = 4000
#: Value changes returned per enumeration signal; past it the rest of the window is one band.
MAX_BANDS = 2000
#: Signals one series request may name.
MAX_SIGNALS = 64
#: Rows one export may hold (in memory while it is written); past it the export is refused.
MAX_EXPORT_ROWS = 5_000_000
#: The columns of ``samples``, in order: what an export holds.
SAMPLE_COLUMNS = (
    "device_id", "capture_id", "campaign", "signal", "t_ns", "value", "value_int", "value_str", "fleet",
    "date", "clock_offset_ns",
)  # fmt: skip
_OF_CAPTURE = "device_id = ? AND capture_id = ?"


@dataclass(frozen=True)
class SignalStats:
    """What one signal of a capture holds."""

    signal: str
    samples: int
    first_ns: int
    last_ns: int
    #: Rows with a number (``value``), an exact integer (``value_int``) and text (``value_str``).
    numbers: int
    integers: int
    texts: int
    #: Distinct exact values (integers and texts).
    distinct: int


#: A signal of integers or text with at most this many distinct values is drawn as state bands.
ENUM_LIMIT = 16


@dataclass(frozen=True)
class Envelope:
    """A numeric signal over a window: its points in time order (every sample, or the low and the high
    of each column when ``reduced``), and how many samples they stand for."""

    signal: str
    t_ns: list[int]
    values: list[float]
    samples: int
    reduced: bool


@dataclass(frozen=True)
class Band:
    from_ns: int
    to_ns: int
    value: str


@dataclass(frozen=True)
class Bands:
    """An enumeration over a window: one band per run of one value."""

    signal: str
    bands: list[Band]
    #: More changes than :data:`MAX_BANDS`: the last band covers the rest and says ``…``.
    truncated: bool


class CaptureReader:
    """Reads one capture's rows from the fleet store through the query engine."""

    def __init__(self, engine: QueryEngine) -> None:
        self._engine = engine

    def signals(self, device_id: str, capture_id: str, *, view: ClassView = FULL_VIEW) -> list[SignalStats]:
        """Every signal of the capture ``view`` lets through, by name (an empty list: no rows stored
        yet). Every read here takes the reader's view: the console and exports see what SQL would."""
        table = self._engine.read(
            f"""SELECT signal, count(*), min(t_ns), max(t_ns), count(value), count(value_int),
                       count(value_str), count(DISTINCT value_int) + count(DISTINCT value_str)
                FROM samples WHERE {_OF_CAPTURE} GROUP BY signal ORDER BY signal""",
            [device_id, capture_id],
            view=view,
        )
        return [SignalStats(str(r[0]), *(int(v) for v in r[1:])) for r in _rows(table)]

    def envelope(
        self, device_id: str, capture_id: str, signals: Sequence[str], from_ns: int, to_ns: int, columns: int
    ) -> list[Envelope]:
        """The numeric ``signals`` between ``from_ns`` and ``to_ns`` (inclusive), reduced to ``columns``
        plot columns."""
        return self.series(device_id, capture_id, signals, [], from_ns, to_ns, columns)[0]

    def bands(
        self, device_id: str, capture_id: str, signals: Sequence[str], from_ns: int, to_ns: int
    ) -> list[Bands]:
        """The enumeration ``signals`` between ``from_ns`` and ``to_ns`` as runs of one value; the value
        holding at ``from_ns`` (set before the window) starts the first band."""
        return self.series(device_id, capture_id, [], signals, from_ns, to_ns, 1)[1]

    def series(
        self,
        device_id: str,
        capture_id: str,
        lines: Sequence[str],
        states: Sequence[str],
        from_ns: int,
        to_ns: int,
        columns: int,
        *,
        view: ClassView = FULL_VIEW,
    ) -> tuple[list[Envelope], list[Bands]]:
        """:meth:`envelope` of ``lines`` and :meth:`bands` of ``states``, read on one connection."""
        _check_window([*lines, *states], from_ns, to_ns, columns)
        statements = []
        if lines:
            statements.append(_envelope_sql(device_id, capture_id, lines, from_ns, to_ns, columns))
        if states:
            statements.append(_bands_sql(device_id, capture_id, states, from_ns, to_ns))
        tables = self._engine.read_many(statements, view=view) if statements else []
        envelopes = _envelopes(lines, tables.pop(0)) if lines else []
        bands = _bands(states, tables.pop(0), from_ns, to_ns) if states else []
        return envelopes, bands

    def rows(
        self,
        device_id: str,
        capture_id: str,
        *,
        view: ClassView = FULL_VIEW,
        touched: set[SignalClass] | None = None,
    ) -> pa.Table:
        """Every row of the capture as ``samples`` has it, in time order (then by signal). UserError past
        :data:`MAX_EXPORT_ROWS` rows."""
        table = self._engine.read(
            f"""SELECT {", ".join(SAMPLE_COLUMNS)} FROM samples WHERE {_OF_CAPTURE}
                ORDER BY t_ns, signal LIMIT ?""",
            [device_id, capture_id, MAX_EXPORT_ROWS + 1],
            view=view,
            touched=touched,
        )
        if table.num_rows > MAX_EXPORT_ROWS:
            raise UserError(
                f"capture {capture_id} holds more than {MAX_EXPORT_ROWS:,} rows, more than one export "
                f"takes: read it with SQL (SELECT * FROM samples WHERE capture_id = '{capture_id}') "
                "or from the fleet store's Parquet files"
            )
        return table


def _check_window(signals: Sequence[str], from_ns: int, to_ns: int, columns: int) -> None:
    if len(signals) > MAX_SIGNALS:
        raise UserError(f"at most {MAX_SIGNALS} signals per request, got {len(signals)}")
    if to_ns < from_ns:
        raise UserError(f"the window ends ({to_ns}) before it starts ({from_ns})")
    if not 1 <= columns <= MAX_COLUMNS:
        raise UserError(f"columns must be from 1 to {MAX_COLUMNS}, got {columns}")


def _rows(table: pa.Table) -> list[tuple[Any, ...]]:
    columns = [c.to_pylist() for c in table.columns]
    return list(zip(*columns, strict=True)) if columns else []


def _envelope_sql(
    device_id: str, capture_id: str, signals: Sequence[str], from_ns: int, to_ns: int, columns: int
) -> tuple[str, list[object]]:
    marks = ", ".join("?" for _ in signals)
    return (
        f"""SELECT signal, count(*) AS n, min(value), max(value), arg_min(t_ns, value), arg_max(t_ns, value)
            FROM (SELECT signal, t_ns, value,
                         CAST(floor((t_ns - ?) * ? / (? - ? + 1.0)) AS BIGINT) AS col
                  FROM samples
                  WHERE {_OF_CAPTURE} AND signal IN ({marks}) AND t_ns BETWEEN ? AND ?
                        AND value IS NOT NULL AND isfinite(value))
            GROUP BY signal, col ORDER BY signal, col""",
        [from_ns, float(columns), to_ns, from_ns, device_id, capture_id, *signals, from_ns, to_ns],
    )


def _envelopes(signals: Sequence[str], table: pa.Table) -> list[Envelope]:
    out: dict[str, Envelope] = {s: Envelope(s, [], [], 0, False) for s in signals}
    for signal, n, low, high, t_low, t_high in _rows(table):
        env = out[signal]
        points = sorted({(int(t_low), float(low)), (int(t_high), float(high))})
        env.t_ns.extend(p[0] for p in points)
        env.values.extend(p[1] for p in points)
        out[signal] = Envelope(signal, env.t_ns, env.values, env.samples + int(n),
                               env.reduced or int(n) > len(points))  # fmt: skip
    return [out[s] for s in signals]


def _bands_sql(
    device_id: str, capture_id: str, signals: Sequence[str], from_ns: int, to_ns: int
) -> tuple[str, list[object]]:
    # Every change of value inside the window, and the last sample before it (the value holding
    # when the window starts), at most MAX_BANDS + 1 per signal.
    marks = ", ".join("?" for _ in signals)
    return (
        f"""SELECT signal, t_ns, v FROM (
                SELECT signal, t_ns, v, row_number() OVER (PARTITION BY signal ORDER BY t_ns) AS k
                FROM (SELECT signal, t_ns, v,
                             lag(v) OVER (PARTITION BY signal ORDER BY t_ns) AS before,
                             lead(t_ns) OVER (PARTITION BY signal ORDER BY t_ns) AS next_t
                      FROM (SELECT signal, t_ns, coalesce(value_str, CAST(value_int AS VARCHAR),
                                                          CAST(value AS VARCHAR)) AS v
                            FROM samples WHERE {_OF_CAPTURE} AND signal IN ({marks}) AND t_ns <= ?))
                WHERE (before IS DISTINCT FROM v AND t_ns >= ?)
                      OR (t_ns < ? AND (next_t IS NULL OR next_t >= ?)))
            WHERE k <= ? ORDER BY signal, t_ns""",
        [device_id, capture_id, *signals, to_ns, from_ns, from_ns, from_ns, MAX_BANDS + 1],
    )


def _bands(signals: Sequence[str], table: pa.Table, from_ns: int, to_ns: int) -> list[Bands]:
    changes: dict[str, list[tuple[int, str]]] = {s: [] for s in signals}
    for signal, t, value in _rows(table):  # the value holding before the window starts with it
        changes[signal].append((max(int(t), from_ns), "" if value is None else str(value)))
    out = []
    for signal in signals:
        runs = changes[signal]
        truncated = len(runs) > MAX_BANDS
        bands = [
            Band(t, runs[i + 1][0] if i + 1 < len(runs) else to_ns, value)
            for i, (t, value) in enumerate(runs[:MAX_BANDS])
        ]
        if truncated:
            bands[-1] = Band(bands[-1].from_ns, to_ns, "…")
        out.append(Bands(signal, bands, truncated))
    return out
