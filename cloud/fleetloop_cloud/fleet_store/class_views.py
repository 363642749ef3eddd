"""What a role's SQL can reach: the ``samples`` rows of each signal class, withheld, coarsened or whole,
decided before DuckDB sees a single row.

The query engine (query.py) builds ``samples`` from the sources made here and nothing else: a pyarrow
dataset already filtered to the classes a role sees whole, and one filtered to the positions of the
classes it sees coarsened (read through :func:`coarsened_sql`, which rounds them in the projection of the
view), turned into DuckDB relations whose only name is the ``samples`` view. No table, view or file beneath it is nameable — the files are read by pyarrow, DuckDB's own file
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


def coarsened_sql(column: str) -> str:
    """A position column as SQL rounds it: the centre of its :data:`LOCATION_GRID_DEG` cell. Applied in
    the projection of the only name a query has, so a filter on ``value`` compares the rounded value
    (DuckDB cannot push it beneath the rounding), while filters on other columns still prune files."""
    grid = repr(LOCATION_GRID_DEG)
    return f"round((floor({column} / {grid}) + 0.5) * {grid}, 6)"


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


def class_sources(dataset: ds.Dataset, view: ClassView) -> list[tuple[Any, bool]]:
    """(pyarrow dataset, coarsened) for what ``view`` lets through: the rows of the classes it shows
    whole (the dataset itself when it shows all), and the positions of the classes it coarsens (to be
    read through :func:`coarsened_sql`). Both are datasets, so DuckDB pushes its filters into them and
    prunes files by fleet and date."""
    of_class = class_expression(view.classification.ordered())
    out: list[tuple[Any, bool]] = []
    full = frozenset(c for c in SignalClass if view.of(c) is Visibility.FULL)
    if len(full) == len(SignalClass):
        out.append((dataset, False))
    elif full:
        out.append((dataset.filter(pc.is_in(of_class, pa.array(sorted(c.value for c in full)))), False))
    coarse = frozenset(c for c in SignalClass if view.of(c) is Visibility.COARSENED)
    if coarse:
        positions = pc.scalar(False)
        for suffix in COARSENED_SUFFIXES:
            positions = positions | pc.ends_with(pc.field("signal"), suffix)
        rows = pc.is_in(of_class, pa.array(sorted(c.value for c in coarse))) & positions
        out.append((dataset.filter(rows), True))
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
