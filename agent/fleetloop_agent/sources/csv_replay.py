"""Replay of a CSV recording (an IMU log, a PLC historian export), looping forever.

Every row becomes one sample of one group: the columns of a row were read together, so they share its
timestamp. The file is read and checked once, at construction (at most :data:`MAX_CSV_BYTES`), so any
fault in it is reported with its line before the agent starts, and the replay itself cannot fail later.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.sources.base import (
    NS_PER_S,
    ORIGINS,
    GroupAccumulator,
    ReplayCursor,
    loop_period_ns,
)
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch

#: Largest CSV replayed (it is held in memory as float64 columns).
MAX_CSV_BYTES: Final = 64 * 1024 * 1024
TIME_FORMATS: Final = ("seconds", "datetime")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_time_ns(cell: str, time_format: str) -> int:
    """Recording time of one row in integer ns (only differences matter, so naive datetimes are UTC)."""
    if time_format == "seconds":
        seconds = float(cell)
        if not math.isfinite(seconds):
            raise ValueError(f"{cell!r} is not a finite number of seconds")
        return round(seconds * NS_PER_S)
    moment = datetime.fromisoformat(cell.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return ((moment - _EPOCH) // timedelta(microseconds=1)) * 1000


class CsvReplaySource:
    """Columns of a CSV file replayed as one group of FLOAT64 signals."""

    def __init__(
        self,
        path: Path,
        *,
        start_ns: int,
        time_column: str,
        time_format: str,
        columns: Mapping[str, tuple[str, str]],
        delimiter: str = ",",
        group: str = "csv",
        name: str = "csv",
        origin: str = "recordings",
    ) -> None:
        if origin not in ORIGINS:
            raise ConfigError(f"source {name!r}: origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
        if time_format not in TIME_FORMATS:
            raise ConfigError(
                f"source {name!r}: time_format must be one of {', '.join(TIME_FORMATS)}, got {time_format!r}"
            )
        if len(delimiter) != 1 or delimiter in '\r\n"':
            raise ConfigError(f"source {name!r}: delimiter must be one character, got {delimiter!r}")
        if not columns:
            raise ConfigError(f"source {name!r}: no columns to replay")
        self.name = name
        self.origin = origin
        self._group = group
        self._columns = {str(k): (str(v[0]), str(v[1])) for k, v in columns.items()}
        targets = [path for path, _ in self._columns.values()]
        if len(set(targets)) != len(targets):
            dup = next(p for p in targets if targets.count(p) > 1)
            raise ConfigError(f"source {name!r}: two columns map to the same signal {dup!r}")
        self._path = Path(path)
        rel_ns, values = self._load(time_column, time_format, delimiter)
        self._rel_ns = rel_ns
        self._values = values
        diffs = np.diff(rel_ns)
        positive = diffs[diffs > 0]
        median_ns = int(np.median(positive)) if positive.size else NS_PER_S
        self._cursor = ReplayCursor(len(rel_ns), int(start_ns), loop_period_ns(int(rel_ns[-1]), median_ns))
        self._ids: dict[str, int] = {}
        self._declared = False

    def _load(
        self, time_column: str, time_format: str, delimiter: str
    ) -> tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[np.float64]]]:
        path = self._path
        try:
            size = path.stat().st_size
            if size > MAX_CSV_BYTES:
                raise ConfigError(f"{path}: {size} bytes exceeds the {MAX_CSV_BYTES} byte replay limit")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
        if "\x00" in text:
            raise ConfigError(f"{path}: contains NUL bytes; not a CSV file")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise ConfigError(f"{path}: empty file, expected a header line") from None
        except csv.Error as exc:
            raise ConfigError(f"{path}:1: {exc}") from None
        header = [h.strip() for h in header]
        index = {h: i for i, h in enumerate(header)}
        for needed in [time_column, *self._columns]:
            if needed not in index:
                raise ConfigError(f"{path}: no column {needed!r} (header has {', '.join(map(repr, header))})")
        t_col = index[time_column]
        wanted = [(c, index[c]) for c in self._columns]
        times: list[int] = []
        cols: dict[str, list[float]] = {c: [] for c in self._columns}
        previous: int | None = None
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ConfigError(f"{path}:{line}: expected {len(header)} fields, found {len(row)}")
                try:
                    t_ns = _parse_time_ns(row[t_col], time_format)
                except (ValueError, OverflowError):
                    raise ConfigError(
                        f"{path}:{line}: column {time_column!r}: {row[t_col]!r} is not a {time_format} time"
                    ) from None
                if previous is not None and t_ns < previous:
                    raise ConfigError(f"{path}:{line}: time goes backwards ({row[t_col]!r})")
                previous = t_ns
                times.append(t_ns)
                for column, i in wanted:
                    try:
                        value = float(row[i])
                    except ValueError:
                        value = math.nan
                    if not math.isfinite(value):
                        raise ConfigError(
                            f"{path}:{line}: column {column!r}: {row[i]!r} is not a finite number"
                        )
                    cols[column].append(value)
        except csv.Error as exc:
            raise ConfigError(f"{path}:{reader.line_num}: {exc}") from None
        if not times:
            raise ConfigError(f"{path}: no data rows after the header")
        t = np.asarray(times, dtype=np.int64)
        return t - t[0], {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}

    def declare(self, catalog: Catalog) -> None:
        self._ids = {
            column: catalog.add(path, DataType.FLOAT64, unit).id
            for column, (path, unit) in self._columns.items()
        }
        self._declared = True

    def alive(self) -> bool:
        # The recording is in memory since construction; nothing can take it away.
        return True

    @property
    def dropped_total(self) -> int:
        """Rows skipped by the drop-oldest backlog policy."""
        return self._cursor.dropped_total

    def _times(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        return self._rel_ns[lo:hi]

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        out = GroupAccumulator()
        for span in self._cursor.advance(int(until_ns), self._times, len(self._rel_ns)):
            t_ns = self._rel_ns[span.lo : span.hi] + np.int64(span.offset_ns)
            values: dict[int, npt.NDArray[np.generic]] = {
                self._ids[column]: self._values[column][span.lo : span.hi].copy() for column in self._columns
            }
            out.add(self._group, t_ns, values)
        return out.build()
