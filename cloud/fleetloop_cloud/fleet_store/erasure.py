"""Erasure and retention in the Parquet fleet store: a device's rows, or a fleet's old days, gone from
every file a reader can open.

Per partition, under its exclusive lock (ingest holds it shared while it writes a file, so no write is
half done meanwhile):

- a device's **segment files** (named by device) are deleted;
- a **compacted file** holding its rows is rewritten without them, under the same name (temporary file
  and rename: a reader sees the old file or the new one), and its ``fleetloop.absorbed`` list loses the
  device's segment file names; then the partition's generation is raised so every process's ingest
  re-reads that list;
- **stray temporary files** (a write a crash interrupted) are deleted: with the lock held exclusively,
  no temporary file belongs to a write in progress.

Retention deletes whole ``date=`` partitions of a fleet, oldest first, a bounded number per call.
Everything here is idempotent: a pass that a crash interrupted is simply run again.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleetloop_cloud.fleet_store.parquet import (
    ABSORBED_KEY,
    COMPACTED_FILE,
    SAMPLES_SCHEMA,
    SEGMENT_FILE,
    FleetStore,
    absorbed_by,
    with_all_columns,
)
from fleetloop_shared.durable import fsync_directory, write_atomically


@dataclass
class LifecycleReport:
    """What one erasure or retention pass removed (the same fields for either table format)."""

    files_deleted: int = 0
    files_rewritten: int = 0
    rows_deleted: int = 0
    partitions_dropped: int = 0
    snapshots_expired: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ParquetLifecycle:
    """Erasure and retention over one :class:`FleetStore` (several processes may share it)."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def erase_device(self, device_id: str) -> LifecycleReport:
        report = LifecycleReport()
        for partition in self.store.partitions():
            with self.store.partition_lock(partition, exclusive=True) as lock:
                assert lock is not None  # blocking
                if self._erase_in(partition, device_id, report):
                    lock.bump()
        return report

    def _erase_in(self, partition: Path, device_id: str, report: LifecycleReport) -> bool:
        changed = False
        for entry in sorted(os.scandir(partition), key=lambda e: e.name):
            path = Path(entry.path)
            m = SEGMENT_FILE.match(entry.name)
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                report.files_deleted += 1
            elif m is not None and m["device"] == device_id:
                report.rows_deleted += pq.read_metadata(path).num_rows
                path.unlink(missing_ok=True)
                report.files_deleted += 1
            elif COMPACTED_FILE.match(entry.name):
                changed |= self._rewrite(path, device_id, report)
        if report.files_deleted or changed:
            fsync_directory(partition)
        return changed

    @staticmethod
    def _rewrite(path: Path, device_id: str, report: LifecycleReport) -> bool:
        names = absorbed_by(path)
        kept_names = [n for n in names if (m := SEGMENT_FILE.match(n)) is None or m["device"] != device_id]
        table = with_all_columns(pq.read_table(path), SAMPLES_SCHEMA)
        keep = np.asarray(table["device_id"].to_pylist(), dtype=object) != device_id
        kept = table.filter(pa.array(keep, pa.bool_()))
        if kept.num_rows == table.num_rows and kept_names == names:
            return False
        kept = kept.replace_schema_metadata({ABSORBED_KEY: json.dumps(kept_names).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(kept, sink, compression="zstd")
        write_atomically(path, sink.getvalue().to_pybytes())
        report.rows_deleted += table.num_rows - kept.num_rows
        report.files_rewritten += 1
        return True

    def drop_before(
        self, date: datetime.date, fleet: str | None = None, *, limit: int = 64
    ) -> LifecycleReport:
        """Retention: at most ``limit`` partitions (of ``fleet``, or all) dated before ``date`` deleted,
        oldest first (call again while ``partitions_dropped`` equals ``limit``)."""
        report = LifecycleReport()
        old = [p for p in self.store.partitions()
               if (fleet is None or p.parent.name == f"fleet={fleet}")
               and p.name < f"date={date.isoformat()}"]  # fmt: skip
        old.sort(key=lambda p: p.name)
        for partition in old[:limit]:
            with self.store.partition_lock(partition, exclusive=True) as lock:
                assert lock is not None
                for entry in os.scandir(partition):
                    if entry.name.endswith(".parquet"):
                        report.rows_deleted += _rows(Path(entry.path))
                    report.files_deleted += 1
                shutil.rmtree(partition, ignore_errors=True)
                lock.bump()
            report.partitions_dropped += 1
        return report


def _rows(path: Path) -> int:
    """Rows in a Parquet file about to be deleted (0 for a file that is not one: a stray temporary)."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except (OSError, pa.ArrowInvalid):
        return 0
