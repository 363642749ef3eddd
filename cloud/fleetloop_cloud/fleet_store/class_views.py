"""What a role's SQL can reach: the ``samples`` rows of each signal class, withheld, coarsened or whole,
decided before DuckDB sees a single row.

The query engine (query.py) builds ``samples`` from the relations made here and nothing else: each is a
pyarrow dataset already filtered to one class (and, for a coarsened class, a scanner whose projection
has already rounded the positions), turned into one DuckDB relation whose only name is the ``samples``
view. No table, view or file beneath it is nameable — the files are read by pyarrow, DuckDB's own file
access is switched off — so a viewer's ``SELECT *``, join, subquery, CTE, ``UNION``, cast or
``read_parquet(...)`` can only ever see what the view holds. The rules are the classification's, in its
first-match order (fleetloop_shared.classification), evaluated on each row's ``fleet`` and ``signal``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from fleetloop_cloud.fleet_store.parquet import COMPACTED_FILE, SAMPLES_SCHEMA
from fleetloop_shared.classification import (
    DEFAULT_CLASS,
    ClassRule,
    ClassView,
    SignalClass,
    Visibility,
    like_pattern,
)

#: Degrees of the grid a coarsened position snaps to (the centre of its cell): 0.01° is ≈ 1.1 km
#: north–south, and ≈ 0.75 km east–west at 48° latitude — a district, not a street.
LOCATION_GRID_DEG = 0.01
#: Location signals that can be coarsened (the rest of a coarsened class is withheld).
COARSENED_SUFFIXES = (".Latitude", ".Longitude")
#: The columns of ``samples``, in order.
SAMPLE_COLUMNS = (
    "device_id", "capture_id", "campaign", "signal", "t_ns", "value", "value_int", "value_str", "fleet",
    "date", "clock_offset_ns",
)  # fmt: skip
#: The full table's schema: the files' columns and the Hive partitions.
FULL_SCHEMA = SAMPLES_SCHEMA.append(pa.field("fleet", pa.string())).append(pa.field("date", pa.date32()))


def class_expression(rules: Iterable[ClassRule]) -> Any:
    """A pyarrow expression: the class of a row's (fleet, signal), first matching rule wins."""
    expr: Any = pc.scalar(DEFAULT_CLASS.value)
    for rule in reversed(list(rules)):
        matched = pc.match_like(pc.field("signal"), like_pattern(rule.signal))
        if rule.fleet != "*":
            matched = matched & pc.match_like(pc.field("fleet"), like_pattern(rule.fleet))
        expr = pc.if_else(matched, pc.scalar(rule.signal_class.value), expr)
    return expr


def _coarse(column: Any) -> Any:
    cells = pc.floor(pc.divide(column, LOCATION_GRID_DEG))
    return pc.round(pc.multiply(pc.add(cells, 0.5), LOCATION_GRID_DEG), 6)


def _coarsened_columns() -> dict[str, Any]:
    """The projection a coarsened class is read through: positions to their cell's centre, the exact
    integer and text forms withheld (they cannot be rounded)."""
    cols: dict[str, Any] = {name: pc.field(name) for name in SAMPLE_COLUMNS}
    cols["value"] = _coarse(pc.field("value"))
    cols["value_int"] = pc.scalar(pa.scalar(None, pa.int64()))
    cols["value_str"] = pc.scalar(pa.scalar(None, pa.string()))
    return cols


def class_code_sql(rules: Iterable[ClassRule]) -> str:
    """The same classification as :func:`class_expression`, as a DuckDB SQL expression over a row's
    ``fleet`` and ``signal`` giving the class's :attr:`~SignalClass.strictness` (a TINYINT: cheap to hand
    to the access record's counter, where a text per row would cost a copy)."""
    whens = []
    for rule in rules:
        cond = f"signal LIKE {_literal(like_pattern(rule.signal))} ESCAPE '\\'"
        if rule.fleet != "*":
            cond += f" AND fleet LIKE {_literal(like_pattern(rule.fleet))} ESCAPE '\\'"
        whens.append(f"WHEN {cond} THEN {rule.signal_class.strictness}")
    default = str(DEFAULT_CLASS.strictness)
    body = f"CASE {' '.join(whens)} ELSE {default} END" if whens else default
    return f"CAST({body} AS TINYINT)"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def class_sources(dataset: ds.Dataset, view: ClassView) -> list[Any]:
    """The pyarrow sources of what ``view`` lets through: one filtered dataset for every class
    it shows whole (DuckDB still pushes its filters into it and prunes files; no filter when every class
    is whole), and one scanner for the coarsened classes, whose projection rounded the positions."""
    of_class = class_expression(view.classification.ordered())
    out: list[Any] = []
    full = frozenset(c for c in SignalClass if view.of(c) is Visibility.FULL)
    if len(full) == len(SignalClass):
        out.append(dataset)
    elif full:
        out.append(dataset.filter(pc.is_in(of_class, pa.array(sorted(c.value for c in full)))))
    coarse = frozenset(c for c in SignalClass if view.of(c) is Visibility.COARSENED)
    if coarse:
        positions = pc.scalar(False)
        for suffix in COARSENED_SUFFIXES:
            positions = positions | pc.ends_with(pc.field("signal"), suffix)
        rows = pc.is_in(of_class, pa.array(sorted(c.value for c in coarse))) & positions
        out.append(dataset.scanner(columns=_coarsened_columns(), filter=rows))
    return out


def parquet_files(
    root: Path, absorbed: Callable[[str, int], tuple[str, ...]]
) -> list[tuple[str, str, _dt.date]]:
    """(path, fleet, date) of every file of the Parquet layout below ``root`` (``samples``) a reader
    reads now: segment files and compacted files, less the segment files a compacted file present now
    absorbed (their rows are in it). ``absorbed(path, mtime_ns)`` names those (cached by the caller)."""
    out: list[tuple[str, str, _dt.date]] = []
    for partition in sorted(root.glob("fleet=*/date=*")):
        try:
            fleet = partition.parent.name.removeprefix("fleet=")
            date = _dt.date.fromisoformat(partition.name.removeprefix("date="))
            entries = {e.name: e for e in os.scandir(partition) if e.name.endswith(".parquet")}
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        gone: set[str] = set()
        for name, entry in entries.items():
            if COMPACTED_FILE.match(name):
                try:
                    gone.update(absorbed(entry.path, entry.stat().st_mtime_ns))
                except FileNotFoundError:
                    gone.add(name)
        out.extend((entries[n].path, fleet, date) for n in sorted(entries) if n not in gone)
    return out
