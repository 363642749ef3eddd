"""Replay of a wide CSV recording (an IMU log, a PLC historian export), looping forever.

Every row becomes one sample of one group: the columns of a row were read together, so they share its
timestamp. The file is read once, at construction (at most :data:`MAX_CSV_BYTES`), by the one reader of
recordings (:func:`~fleetloop_agent.recordings.read_wide_csv`), so its cells and times are typed exactly
as ``rules test`` and ``store import`` type them, any fault is reported with its line before the agent
starts, and the replay itself cannot fail later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings import data_type_of, read_wide_csv
from fleetloop_agent.sources.base import (
    GroupAccumulator,
    ReplayCursor,
    check_choice,
    check_origin,
    first_repeat,
    loop_period_ns,
)
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch

log = logging.getLogger("fleetloop.agent.sources")

#: Largest CSV replayed (it is held in memory as typed columns).
MAX_CSV_BYTES: Final = 64 * 1024 * 1024
#: ``time_format`` of a source → time unit of the one reader.
TIME_FORMATS: Final = {"seconds": "s", "datetime": "datetime"}


class CsvReplaySource:
    """Columns of a CSV file replayed as one group of signals (typed by their cells)."""

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
        check_origin(name, origin)
        check_choice(name, "time_format", time_format, TIME_FORMATS)
        if not columns:
            raise ConfigError(f"source {name!r}: no columns to replay")
        self.name = name
        self.origin = origin
        self._group = group
        self._columns = {str(k): (str(v[0]), str(v[1])) for k, v in columns.items()}
        dup = first_repeat([path for path, _ in self._columns.values()])
        if dup is not None:
            raise ConfigError(f"source {name!r}: two columns map to the same signal {dup!r}")
        recording = read_wide_csv(
            Path(path),
            time_column=time_column,
            time_unit=TIME_FORMATS[time_format],
            delimiter=delimiter,
            columns=list(self._columns),
            group=group,
            limit=MAX_CSV_BYTES,
        )
        for note in recording.notes:
            log.warning("source %s: %s", name, note)
        (table,) = recording.groups
        self._rel_ns: npt.NDArray[np.int64] = table.t_ns - table.t_ns[0]
        self._values: dict[str, npt.NDArray[Any]] = table.columns
        period = loop_period_ns(self._rel_ns, int(self._rel_ns[-1]))
        self._cursor = ReplayCursor(len(self._rel_ns), int(start_ns), period)
        self._ids: dict[str, int] = {}
        self._declared = False

    def declare(self, catalog: Catalog) -> None:
        self._ids = {
            column: catalog.add(path, data_type_of(self._values[column], f"column {column!r}"), unit).id
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
