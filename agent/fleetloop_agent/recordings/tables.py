"""CSV recordings: the long form (``t_ns,signal,value`` / ``t,signal,value``) and the wide form (a time
column and one column per signal: an IMU log, a PLC historian export).

Cells and times are read by the one rule of :mod:`.cells`. Given datatypes (a catalog), cells must be of
them; otherwise each signal's datatype follows from its cells. Every malformed line is a ConfigError
naming ``FILE:LINE``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings.cells import Cells, guess_time_unit, infer_type, parse_time, typed_column
from fleetloop_agent.recordings.recording import Note, Recording, SignalGroup, detect_groups
from fleetloop_agent.recordings.text import MAX_INPUT_BYTES, csv_records, read_text, sniff_delimiter
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import ConfigError

LONG_HEADERS: dict[tuple[str, ...], str] = {("t_ns", "signal", "value"): "ns", ("t", "signal", "value"): "s"}
#: ``types(signal)``: the datatype a catalog gives a signal, or None when the catalog does not know it.
TypeOf = Callable[[str], DataType | None]


def is_long_header(fields: Sequence[str]) -> bool:
    return tuple(f.strip() for f in fields) in LONG_HEADERS


def _typed(
    cells: dict[str, Cells], source: Path, types: TypeOf | None, first_line: dict[str, int]
) -> tuple[dict[str, npt.NDArray[Any]], list[Note]]:
    """Each signal's cells as a column: of the catalog's datatype when given, else of the one they make.
    Signals a given catalog does not know are left out, with a note."""
    columns: dict[str, npt.NDArray[Any]] = {}
    notes: list[Note] = []
    for name, signal_cells in cells.items():
        if types is not None:
            data_type = types(name)
            if data_type is None:
                where = f"{source}:{first_line[name]}"
                notes.append(Note(f"{where}: note: signal {name} is not in the catalog; ignored", name))
                continue
        else:
            data_type, note = infer_type(name, signal_cells, str(source))
            if note is not None:
                notes.append(Note(note, name))
        columns[name] = typed_column(name, signal_cells, data_type, str(source))
    return columns, notes


def read_long_csv(path: Path, *, types: TypeOf | None = None, limit: int = MAX_INPUT_BYTES) -> Recording:
    """A long CSV: one sample per line, times in ns (``t_ns``) or seconds (``t``). Signals whose sample
    times are identical form a group; each group is sorted by time."""
    path = Path(path)
    records = csv_records(read_text(path, limit), path)
    first = next(records, None)
    header = [f.strip() for f, _ in first[1]] if first else []
    unit = LONG_HEADERS.get(tuple(header))
    if unit is None:
        raise ConfigError(
            f"{path}:1: expected the header t_ns,signal,value or t,signal,value, got {','.join(header)!r}"
        )
    times: dict[str, list[int]] = {}
    cells: dict[str, Cells] = {}
    first_line: dict[str, int] = {}
    for line, row in records:
        if len(row) != 3:
            raise ConfigError(f"{path}:{line}: expected 3 fields (t,signal,value), got {len(row)}")
        name = row[1][0].strip()
        if not name:
            raise ConfigError(f"{path}:{line}: empty signal name")
        try:
            t = parse_time(row[0][0], unit)
        except ValueError as exc:
            raise ConfigError(f"{path}:{line}: {exc}") from None
        if name not in cells:
            times[name], cells[name], first_line[name] = [], Cells(), line
        times[name].append(t)
        cells[name].add(row[2][0], row[2][1], line)
    columns, notes = _typed(cells, path, types, first_line)
    series = {name: (np.array(times[name], dtype=np.int64), values) for name, values in columns.items()}
    return Recording(detect_groups(series), notes=notes, qualified=False, time_unit=unit)


def read_wide_csv(
    path: Path,
    *,
    time_column: str | None = None,
    time_unit: str | None = None,
    delimiter: str | None = None,
    columns: Sequence[str] | None = None,
    group: str | None = None,
    types: TypeOf | None = None,
    limit: int = MAX_INPUT_BYTES,
) -> Recording:
    """A wide CSV: a header, then one row per sample time. The time column is ``time_column`` (default:
    the first), in ``time_unit`` (default: guessed from the header and the first row, see
    :func:`~.cells.guess_time_unit`); ``columns`` picks the signals (default: every other column).
    Rows must be in time order (equal times allowed): a row that goes back in time is an error."""
    path = Path(path)
    text = read_text(path, limit)
    delimiter = sniff_delimiter(text) if delimiter is None else delimiter
    records = csv_records(text, path, delimiter)
    first = next(records, None)
    if first is None:
        raise ConfigError(f"{path}: empty file, expected a header line")
    header = [f.strip() for f, _ in first[1]]
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in index:
            raise ConfigError(f"{path}:{first[0]}: column {name!r} appears twice in the header")
        index[name] = i
    time_name = header[0] if time_column is None else time_column
    wanted = [h for h in header if h != time_name] if columns is None else list(columns)
    for needed in (time_name, *wanted):
        if needed not in index:
            raise ConfigError(f"{path}: no column {needed!r} (header has {', '.join(map(repr, header))})")
    t_col = index[time_name]
    times: list[int] = []
    cells = {name: Cells() for name in wanted}
    unit = time_unit
    for line, row in records:
        if len(row) != len(header):
            raise ConfigError(f"{path}:{line}: expected {len(header)} fields, found {len(row)}")
        cell = row[t_col][0]
        unit = unit or guess_time_unit(time_name, cell)
        try:
            t = parse_time(cell, unit)
        except ValueError as exc:
            raise ConfigError(f"{path}:{line}: column {time_name!r}: {exc}") from None
        if times and t < times[-1]:
            raise ConfigError(f"{path}:{line}: time goes backwards ({cell.strip()!r})")
        times.append(t)
        for name in wanted:
            field, quoted = row[index[name]]
            cells[name].add(field, quoted, line)
    if not times:
        raise ConfigError(f"{path}: no data rows after the header")
    typed, notes = _typed(cells, path, types, dict.fromkeys(wanted, first[0]))
    t_ns = np.array(times, dtype=np.int64)
    table = SignalGroup(group or path.stem, t_ns, typed)
    return Recording([table], notes=notes, qualified=False, time_unit=unit or "s")
