"""Compaction of the fleet store: many small per-segment Parquet files into few large ones.

Ingest writes one file per segment (docs/decisions/0008): exactly-once without a transaction, but a busy
fleet makes thousands of small files a day per partition, and every query opens them all. A compaction
pass, per partition (``fleet=F/date=D``), under the partition's exclusive lock:

1. finishes what an earlier pass left: a segment file a compacted file already absorbed is deleted once
   that compacted file is older than ``grace_s`` (a query that listed the files before the commit may
   still be reading them; queries made after it leave them out by name);
2. picks the segment files that are old enough (``min_age_s``), whose (device, segment id) the metadata
   store has recorded — so their upload was acknowledged, and a retry is answered "duplicate" without
   touching the store — and that no compacted file absorbed yet; with fewer than ``min_files`` it stops;
3. per batch of up to ``target_bytes``: reads them, sorts by device, signal and time, and writes
   ``compacted-<24 hex>.parquet`` by temporary file and rename, with the absorbed file names in its Parquet
   metadata (``fleetloop.absorbed``). That rename is the commit: from then on queries read the compacted
   file instead of the segment files, and ingest never writes those segment files again;
4. raises the partition's generation (so every process's ingest re-reads the absorbed names).

So a row is never visible twice to :class:`~fleetloop_cloud.fleet_store.query.QueryEngine` and never
lost: before the
rename queries read the segment files, after it the compacted one. A crash at any point leaves either
the segment files alone (a stray temporary file, ignored), or both (the segment files left out by name
and deleted by a later pass). Readers other than ours (Trino, Spark reading the layout directly) can
see the segment files and the compacted file together for ``grace_s`` after a commit. Compacted files are
not compacted again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fleetloop_cloud.fleet_store.parquet import (
    ABSORBED_KEY,
    COMPACTED_FILE,
    SAMPLES_SCHEMA,
    SEGMENT_FILE,
    FleetStore,
    PartitionLock,
    scan_absorbed,
    with_all_columns,
)
from fleetloop_shared.durable import fsync_directory, write_atomically

log = logging.getLogger("fleetloop.cloud.compaction")

#: Rows per row group in a compacted file (DuckDB reads row groups in parallel and skips them by stats).
ROW_GROUP_ROWS = 1_000_000


@dataclass(frozen=True)
class CompactionPolicy:
    #: A partition is compacted when it has at least this many eligible segment files.
    min_files: int = 16
    #: Only segment files at least this old (seconds since written) are eligible.
    min_age_s: float = 60.0
    #: Input bytes per compacted file (a batch closes when the next file would pass it). The batch is
    #: decoded in memory: the narrow table compresses about tenfold, so 32 MiB of files is ~0.3 GB.
    target_bytes: int = 32 * 1024 * 1024
    #: How long to wait for the partition's lock (ingest holds it shared for each write, briefly).
    lock_wait_s: float = 5.0
    #: Absorbed segment files are deleted this long after their compacted file was committed: longer
    #: than any query may run (query.QUERY_TIMEOUT_S), so no running query loses a file it listed.
    grace_s: float = 180.0


@dataclass
class CompactionReport:
    partitions_compacted: int = 0
    files_absorbed: int = 0
    files_written: int = 0
    rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    leftovers_deleted: int = 0
    partitions_busy: int = 0
    written: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "written"}


class Compactor:
    """Compacts the partitions of one fleet store; ``is_recorded(device_id, segment_id)`` says whether
    the metadata store has the segment (``MetadataStore.has_segment``)."""

    def __init__(
        self,
        store: FleetStore,
        is_recorded: Callable[[str, bytes], bool],
        policy: CompactionPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.is_recorded = is_recorded
        self.policy = policy or CompactionPolicy()
        self._clock = clock

    def run_once(self) -> CompactionReport:
        """One pass over every partition; a partition another compactor holds is skipped."""
        report = CompactionReport()
        for partition in self.store.partitions():
            self.compact_partition(partition, report)
        return report

    def compact_partition(self, partition: Path, report: CompactionReport | None = None) -> CompactionReport:
        report = report if report is not None else CompactionReport()
        deadline = time.monotonic() + self.policy.lock_wait_s
        while True:
            with self.store.partition_lock(partition, exclusive=True, blocking=False) as lock:
                if lock is not None:
                    self._compact_locked(partition, lock, report)
                    return report
            if time.monotonic() >= deadline:
                report.partitions_busy += 1
                return report
            time.sleep(0.01)

    def _compact_locked(self, partition: Path, lock: PartitionLock, report: CompactionReport) -> None:
        now = self._clock()
        absorbed = scan_absorbed(partition)  # fresh, not cached: this pass decides from it
        candidates: list[tuple[str, int]] = []
        deleted = 0
        for entry in sorted(os.scandir(partition), key=lambda e: e.name):
            m = SEGMENT_FILE.match(entry.name)
            if m is None or not entry.is_file():
                continue
            st = entry.stat()
            if entry.name in absorbed:
                committed = (partition / absorbed[entry.name]).stat().st_mtime
                if now - committed >= self.policy.grace_s:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    deleted += 1
                continue
            if now - st.st_mtime < self.policy.min_age_s:
                continue
            if not self.is_recorded(m["device"], bytes.fromhex(m["segment"])):
                continue  # not acknowledged yet (in flight, or left by a crash before the metadata row)
            candidates.append((entry.name, st.st_size))
        if deleted:
            fsync_directory(partition)
            report.leftovers_deleted += deleted
        if len(candidates) < self.policy.min_files:
            return
        batches: list[list[tuple[str, int]]] = [[]]
        size = 0
        for name, nbytes in candidates:
            if batches[-1] and size + nbytes > self.policy.target_bytes:
                batches.append([])
                size = 0
            batches[-1].append((name, nbytes))
            size += nbytes
        if len(batches) > 1 and len(batches[-1]) < self.policy.min_files:
            batches.pop()  # too few for a file of their own: the next pass takes them
        for batch in batches:
            names = [n for n, _ in batch]
            self._write_batch(partition, lock, names, report)
            report.bytes_before += sum(b for _, b in batch)
            if self.policy.grace_s <= 0:  # no query to wait for (tests, offline tools): delete now
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(partition / name)
                fsync_directory(partition)
        report.partitions_compacted += 1

    def _write_batch(
        self, partition: Path, lock: PartitionLock, names: list[str], report: CompactionReport
    ) -> None:
        tables = [pq.ParquetFile(partition / n).read() for n in names]
        table = pa.concat_tables([with_all_columns(t, SAMPLES_SCHEMA) for t in tables])
        expected = sum(t.num_rows for t in tables)
        table = table.sort_by([("device_id", "ascending"), ("signal", "ascending"), ("t_ns", "ascending")])
        table = table.replace_schema_metadata({ABSORBED_KEY: json.dumps(names).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        data = sink.getvalue().to_pybytes()
        check = pq.read_metadata(pa.BufferReader(data))
        if check.num_rows != expected:
            raise RuntimeError(f"compaction of {partition}: {check.num_rows} rows written, {expected} read")
        name = f"compacted-{secrets.token_hex(12)}.parquet"
        assert COMPACTED_FILE.match(name)
        write_atomically(partition / name, data)  # the commit
        lock.bump()
        report.files_absorbed += len(names)
        report.files_written += 1
        report.rows += expected
        report.bytes_after += len(data)
        report.written.append(name)
        log.info("compacted %d files (%d rows) of %s into %s", len(names), expected, partition, name)


