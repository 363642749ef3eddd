"""What a role's SQL can reach: the ``samples`` rows of each signal class, withheld, coarsened or whole,
decided before DuckDB sees a single row.

The query engine (query.py) builds ``samples`` from the sources made here and nothing else: a pyarrow
dataset already filtered to the classes a role sees whole, and one filtered to the positions of the
classes it sees coarsened (read through :func:`coarsened_sql`, which rounds them in the view's
projection), turned into DuckDB relations whose only name is the ``samples`` view. No table, view or
file beneath it is nameable — the files are read by pyarrow, DuckDB's own file access is switched off —
so a viewer's ``SELECT *``, join, subquery, CTE, ``UNION``, cast or ``read_parquet(...)`` can only ever
see what the view holds. Classes are the classification's (fleetloop_shared.classification), decided
once per (fleet, signal) present in the files.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from fleetloop_cloud.fleet_store.parquet import COMPACTED_FILE, SAMPLES_SCHEMA
from fleetloop_shared.classification import (
    ClassView,
    SignalClass,
    Visibility,
)

#: Degrees of the grid a coarsened position snaps to (the centre of its cell): 0.01° is ≈ 1.1 km
#: north–south, and ≈ 0.75 km east–west at 48° latitude — a district, not a street.
LOCATION_GRID_DEG = 0.01
#: Location signals that can be coarsened (the rest of a coarsened class is withheld).
COARSENED_SUFFIXES = (".Latitude", ".Longitude")
#: The full table's schema: the files' columns and the Hive partitions.
FULL_SCHEMA = SAMPLES_SCHEMA.append(pa.field("fleet", pa.string())).append(pa.field("date", pa.date32()))


def coarsened_sql(column: str) -> str:
    """A position column as SQL rounds it: the centre of its :data:`LOCATION_GRID_DEG` cell. Applied in
    the projection of the only name a query has, so a filter on ``value`` compares the rounded value
    (DuckDB cannot push it beneath the rounding), while filters on other columns still prune files."""
    grid = repr(LOCATION_GRID_DEG)
    return f"round((floor({column} / {grid}) + 0.5) * {grid}, 6)"


#: Classes read apart from the rest even where a role sees them whole, so that an access record names
#: them exactly when a query read their rows (the others: when it read rows of the relation they are in).
RECORDED_APART = (SignalClass.PERSONAL, SignalClass.SENSITIVE)


@dataclass(frozen=True)
class ClassSource:
    """One relation beneath ``samples``: a filtered pyarrow dataset, whether its positions are rounded
    (read through :func:`coarsened_sql`), and the classes of the rows it holds (what an access record
    names when a query reads any of them)."""

    dataset: Any
    coarsened: bool
    classes: frozenset[SignalClass]


def class_sources(
    dataset: ds.Dataset,
    view: ClassView,
    signals: Callable[[], Mapping[str, Iterable[str]]],
    recorded: bool = True,
) -> list[ClassSource]:
    """What ``view`` lets through, as datasets DuckDB pushes its filters into (pruning files by fleet
    and date): the classes it shows whole — ``personal`` and ``sensitive`` each apart — and the
    positions of the classes it coarsens. Only relations that hold rows are made.

    ``signals()`` names the signals of each fleet in the dataset's files; each (fleet, signal) is
    classified here, once, and a row passes by set membership — no pattern is matched per row. Not
    ``recorded`` (the coordinator's own reads) and every class whole: the dataset as it is, unread."""
    if not recorded and all(view.of(c) is Visibility.FULL for c in SignalClass):
        return [ClassSource(dataset, False, frozenset(SignalClass))]
    present = signals()
    classes = {(f, s): view.classification.classify(f, s) for f, names in present.items() for s in names}
    found = frozenset(classes.values())
    full = frozenset(c for c in SignalClass if view.of(c) is Visibility.FULL)
    coarse = frozenset(c for c in SignalClass if view.of(c) is Visibility.COARSENED)
    parts = [(full - set(RECORDED_APART), ()), *(((frozenset({c}) & full), ()) for c in RECORDED_APART),
             (coarse, COARSENED_SUFFIXES)]  # fmt: skip
    out = []
    for i, (wanted, suffixes) in enumerate(parts):
        held = frozenset(
            c for (_, s), c in classes.items() if c in wanted and (not suffixes or s.endswith(suffixes))
        )
        if not held:
            continue
        if not suffixes and wanted >= found:
            out.append(ClassSource(dataset, False, held))  # every row: no filter at all
            continue
        out.append(ClassSource(dataset.filter(_member(dataset, present, classes, wanted, suffixes)),
                               i == len(parts) - 1, held))  # fmt: skip
    return out


def _member(
    dataset: ds.Dataset,
    present: Mapping[str, Iterable[str]],
    classes: Mapping[tuple[str, str], SignalClass],
    wanted: frozenset[SignalClass],
    suffixes: tuple[str, ...],
) -> Any:
    """A filter passing the rows whose (fleet, signal) is of ``wanted`` (and ends in one of
    ``suffixes``, when given): fleets with the same passing signals share one ``is_in``."""
    groups: dict[frozenset[str], list[str]] = {}
    for fleet, names in present.items():
        chosen = frozenset(
            s for s in names if classes[(fleet, s)] in wanted and (not suffixes or s.endswith(suffixes))
        )
        groups.setdefault(chosen, []).append(fleet)
    kind = dataset.schema.field("signal").type
    expr: Any = pc.scalar(False)
    for chosen, fleets in groups.items():
        if not chosen:
            continue
        term = pc.is_in(pc.field("signal"), pa.array(sorted(chosen), kind))
        if len(groups) > 1:
            fleet_kind = dataset.schema.field("fleet").type
            term = term & pc.is_in(pc.field("fleet"), pa.array(sorted(fleets), fleet_kind))
        expr = expr | term
    return expr


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
