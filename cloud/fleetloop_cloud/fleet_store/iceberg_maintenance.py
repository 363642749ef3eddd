"""Keeping the Iceberg fleet store in shape: compaction, reconciliation, snapshot expiry, retention and
erasure, and the migration of a Parquet data directory.

- **Compaction** rewrites a partition's small data files (each ingest batch adds one per partition) as
  one file sorted by device, signal and time, in one snapshot that removes the old files and adds the
  new one: a reader sees the partition before or after, never half. It conflicts only with a concurrent
  change to the same files (another compactor, a delete), not with ingest appending beside it.
- **Reconciliation** makes the ingest ledger and the ``captures`` table agree with the receipts in the
  ``samples`` snapshots (a coordinator killed between its commit and its ledger row or captures
  append), before those snapshots expire and their receipts with them.
- **Expiry** removes snapshots older than the retention (never the current one) and deletes the files
  only they referenced — so deleted rows are physically gone once the snapshots that still saw them are.
- **Retention and erasure** are row deletes (copy-on-write: files rewritten without the rows) followed by
  that expiry.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg import expressions
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _FastAppendFiles, _OverwriteFiles
from pyiceberg.table.update.validate import _validate_data_files_exist

from fleetloop_cloud.fleet_store.compaction import CompactionReport
from fleetloop_cloud.fleet_store.iceberg import (
    BATCH_KEY,
    CAPTURES,
    MIGRATED_KEY,
    SAMPLES,
    IcebergTables,
    append_captures,
    captures_rows,
    receipts_of,
)
from fleetloop_cloud.fleet_store.parquet import (
    COMPACTED_FILE,
    SEGMENT_FILE,
    partition_date,
    scan_absorbed,
    with_all_columns,
)
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.repositories.interfaces import SegmentRepository
from fleetloop_cloud.repositories.records import CaptureRecord, SegmentReceipt
from fleetloop_shared.errors import UnavailableError

log = logging.getLogger("fleetloop.cloud.iceberg")

_EPOCH = datetime.date(1970, 1, 1)
# pyiceberg's predicates take (column, value) at run time; their pydantic fields confuse mypy's view.
_equal: Any = expressions.EqualTo
_less: Any = expressions.LessThan
#: A data file smaller than this is "small": compaction gathers those.
SMALL_FILE_BYTES = 64 * 1024 * 1024


class _RewriteFiles(_OverwriteFiles):
    """Replace files with others holding the same rows: conflicts only with a concurrent removal of
    the files it replaces (new files appended beside them are no conflict)."""

    def _validate_concurrency(self) -> None:
        window = self._commit_window
        if window is None or window.is_empty() or window.head is None:
            return
        _validate_data_files_exist(
            self._transaction._table, window.head, self._deleted_data_files, window.base
        )


@dataclass
class MaintenanceReport(CompactionReport):
    snapshots_expired: int = 0
    files_deleted: int = 0
    reconciled: int = 0
    captures_restored: int = 0
    rows_deleted: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class IcebergMaintenance:
    """One coordinator's maintenance of the tables; several may run it (commits are optimistic)."""

    def __init__(
        self, tables: IcebergTables, segments: SegmentRepository, settings: TableSettings | None = None,
        *, clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.tables = tables
        self.segments = segments
        self.settings = settings or TableSettings(format="iceberg")
        self._clock = clock

    # -- the periodic pass (the coordinator's compaction loop) ---------------------------------------
    def run_once(self) -> MaintenanceReport:
        report = MaintenanceReport()
        self.compact(report)
        self.expire(report)
        return report

    # -- compaction --------------------------------------------------------------------------------
    def compact(self, report: MaintenanceReport | None = None) -> MaintenanceReport:
        report = report if report is not None else MaintenanceReport()
        table = self.tables.load(SAMPLES)
        if table.current_snapshot() is None:
            return report
        by_partition: dict[tuple[str, int], list[DataFile]] = {}
        for task in table.scan().plan_files():
            f = task.file
            if f.file_size_in_bytes < SMALL_FILE_BYTES:
                by_partition.setdefault((f.partition[0], f.partition[1]), []).append(f)
        for (fleet, day), files in sorted(by_partition.items()):
            if len(files) < self.settings.compact_min_files:
                continue
            try:
                table = self._rewrite(table, files, report)
            except (CommitFailedException, ValidationException) as exc:
                report.partitions_busy += 1
                log.info("compaction of fleet=%s day=%s gave way to a concurrent change: %s", fleet, day, exc)
                table = table.refresh()
        return report

    def _rewrite(self, table: Table, files: list[DataFile], report: MaintenanceReport) -> Table:
        arrow_schema = table.schema().as_arrow()
        parts = [table.io.new_input(f.file_path) for f in files]
        tables = []
        for src in parts:
            with src.open() as stream:
                tables.append(with_all_columns(pq.read_table(stream), arrow_schema))
        data = pa.concat_tables(tables).sort_by(
            [("device_id", "ascending"), ("signal", "ascending"), ("t_ns", "ascending")]
        )
        expected = sum(f.record_count for f in files)
        if data.num_rows != expected:
            raise UnavailableError(f"compaction read {data.num_rows} rows of {expected}")
        written = list(_dataframe_to_data_files(table.metadata, data, table.io))
        tx = table.transaction()
        producer = _RewriteFiles(operation=Operation.OVERWRITE, transaction=tx, io=table.io,
                                 snapshot_properties={"fleetloop.compaction": "1"})  # fmt: skip
        for f in files:
            producer.delete_data_file(f)
        for f in written:
            producer.append_data_file(f)
        try:
            producer.commit()
            table = tx.commit_transaction()
        except (CommitFailedException, ValidationException):
            for f in written:
                table.io.delete(f.file_path)
            raise
        report.partitions_compacted += 1
        report.files_absorbed += len(files)
        report.files_written += len(written)
        report.rows += expected
        report.bytes_before += sum(f.file_size_in_bytes for f in files)
        report.bytes_after += sum(f.file_size_in_bytes for f in written)
        report.written.extend(f.file_path for f in written)
        return table

    # -- reconciliation and expiry -------------------------------------------------------------------
    def reconcile(self, report: MaintenanceReport | None = None) -> MaintenanceReport:
        """Ledger rows and captures rows for every receipt in the live samples snapshots."""
        report = report if report is not None else MaintenanceReport()
        samples, captures = self.tables.load(SAMPLES), self.tables.load(CAPTURES)
        batches = {s.summary.additional_properties.get(BATCH_KEY) for s in captures.metadata.snapshots
                   if s.summary is not None}  # fmt: skip
        for snapshot in samples.metadata.snapshots:
            receipts = receipts_of(snapshot)
            if not receipts:
                continue
            missing = []
            for r in receipts:
                device, seg, samples_n, capture, campaign, first, last, received = r[:8]
                if not self.segments.has(device, bytes.fromhex(seg)):
                    # the privacy stamp travels in the receipt; the upload's clock figures do not (its rows
                    # and span are already on the cloud's clock)
                    receipt = SegmentReceipt(capture, campaign, 0, int(samples_n), int(first), int(last),
                                             privacy=str(r[10] or ""))  # fmt: skip
                    missing.append((device, bytes.fromhex(seg), receipt, float(received)))
            if missing:  # one transaction per batch
                report.reconciled += sum(self.segments.record_many(missing))
            batch = snapshot.summary.additional_properties.get(BATCH_KEY) if snapshot.summary else None
            if batch is not None and batch not in batches:
                captures = append_captures(captures, receipts, batch)
                report.captures_restored += len(receipts)
        return report

    def expire(
        self, report: MaintenanceReport | None = None, *, older_than_s: float | None = None,
        purge_history: bool = False,
    ) -> MaintenanceReport:  # fmt: skip
        """Reconcile, then expire the snapshots older than the retention (``older_than_s`` overrides it)
        in both tables and delete the files nothing live references any more; with ``purge_history``
        also the previous metadata files (they list the expired snapshots and their receipts)."""
        report = self.reconcile(report)
        keep_s = self.settings.snapshot_retention_s if older_than_s is None else older_than_s
        cutoff_ms = int((self._clock() - keep_s) * 1000)
        for name in (SAMPLES, CAPTURES):
            table = self.tables.load(name)
            current = table.current_snapshot()
            current_id = current.snapshot_id if current is not None else None
            old = [
                s.snapshot_id
                for s in table.metadata.snapshots
                if s.timestamp_ms <= cutoff_ms and s.snapshot_id != current_id
            ]
            if not old:
                continue
            before = _reachable(table)
            table.maintenance.expire_snapshots().by_ids(old).commit()
            table = table.refresh()
            gone = before - _reachable(table)
            if purge_history:
                gone |= {entry.metadata_file for entry in table.metadata.metadata_log}
            for path in sorted(gone):
                table.io.delete(path)
            report.snapshots_expired += len(old)
            report.files_deleted += len(gone)
        return report

    # -- retention and erasure -----------------------------------------------------------------------
    def erase_device(self, device_id: str) -> MaintenanceReport:
        """Every row of ``device_id`` deleted from both tables, and the files that held them with it
        (the expiry runs even when no row is left: it finishes an erasure a crash interrupted)."""
        return self._delete(_equal("device_id", device_id), always_expire=True)

    def drop_before(self, date: datetime.date, fleet: str | None = None) -> MaintenanceReport:
        """Retention: rows of days before ``date`` (of one fleet, or all) deleted, files with them."""
        cond: Any = _less("date", date.isoformat())
        if fleet is not None:
            cond = expressions.And(cond, _equal("fleet", fleet))
        return self._delete(cond, always_expire=False)

    def _delete(self, cond: Any, *, always_expire: bool) -> MaintenanceReport:
        """Rows matching ``cond`` deleted from both tables (copy-on-write; nothing when none match),
        then every snapshot but the current expired, so the files that held them are deleted too —
        unless nothing matched and not ``always_expire`` (a retention pass with nothing to do leaves the
        snapshots to the ordinary expiry)."""
        rows, deleted = 0, False
        for name in (SAMPLES, CAPTURES):
            table = self.tables.load(name)
            if table.current_snapshot() is None:
                continue
            matching = table.scan(row_filter=cond).count()
            if matching:
                table.delete(cond)
                table = table.refresh()
                _seal(table)
                deleted = True
            if name == SAMPLES:
                rows = matching
        if not (deleted or always_expire):
            return MaintenanceReport()
        report = self.expire(older_than_s=0.0, purge_history=True)
        report.rows_deleted += rows
        return report


def _seal(table: Table) -> None:
    """An empty append after a delete: a delete's snapshot keeps the removed files' entries (marked
    deleted, with their column bounds — a device id, the start of a VIN) in a manifest of its own; an
    append carries forward only manifests with live files, so once the delete's snapshot expires that
    manifest is unreachable and deleted with the rest."""
    tx = table.transaction()
    _FastAppendFiles(operation=Operation.APPEND, transaction=tx, io=table.io,
                     snapshot_properties={"fleetloop.sealed": "1"}).commit()  # fmt: skip
    tx.commit_transaction()


def _reachable(table: Table) -> set[str]:
    """Every data file (live in some snapshot), manifest and manifest list ``table`` references."""
    out: set[str] = set()
    seen_manifests: set[str] = set()
    for snapshot in table.metadata.snapshots:
        out.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            out.add(manifest.manifest_path)
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                out.add(entry.data_file.file_path)
    return out


# -- migration ---------------------------------------------------------------------------------------
@dataclass
class MigrationReport:
    partitions: int = 0
    partitions_skipped: int = 0
    rows: int = 0
    captures: int = 0
    #: Artifact objects (images, deltas, manifests, TUF metadata) copied into the bucket.
    artifacts: int = 0


def migrate_parquet(
    samples_dir: Path, tables: IcebergTables, captures: list[CaptureRecord], fleets: dict[str, str],
    *, now: float,
) -> MigrationReport:  # fmt: skip
    """Copy a Parquet fleet store (``samples/fleet=F/date=D/*.parquet``, compacted files included, the
    segment files they absorbed left out) into the Iceberg tables, one append per partition, named in the
    snapshot so a second run skips what the first did; then the ledger's ``captures`` (``fleets``: each
    device's fleet) as one row each, unless the captures table has rows already."""
    report = MigrationReport()
    table = tables.load(SAMPLES)
    done = {s.summary.additional_properties.get(MIGRATED_KEY) for s in table.metadata.snapshots
            if s.summary is not None}  # fmt: skip
    arrow_schema = table.schema().as_arrow()
    for partition in sorted(p for p in samples_dir.glob("fleet=*/date=*") if p.is_dir()):
        name = f"{partition.parent.name}/{partition.name}"
        if name in done:
            report.partitions_skipped += 1
            continue
        fleet, date = partition.parent.name.split("=", 1)[1], partition.name.split("=", 1)[1]
        absorbed = scan_absorbed(partition)
        parts = []
        for path in sorted(partition.glob("*.parquet")):
            if COMPACTED_FILE.match(path.name) or (
                SEGMENT_FILE.match(path.name) and path.name not in absorbed
            ):
                data = pq.read_table(path)
                n = data.num_rows
                data = data.append_column("fleet", pa.array([fleet] * n, pa.string()))
                data = data.append_column("date", pa.array([date] * n, pa.string()).cast(pa.date32()))
                parts.append(with_all_columns(data, arrow_schema))
        if not parts:
            continue
        data = pa.concat_tables(parts).sort_by(
            [("device_id", "ascending"), ("signal", "ascending"), ("t_ns", "ascending")]
        )
        table.append(data, snapshot_properties={MIGRATED_KEY: name})
        report.partitions += 1
        report.rows += data.num_rows
    capture_table = tables.load(CAPTURES)
    if captures and capture_table.current_snapshot() is None:
        receipts = [[c.device_id, None, c.samples, c.capture_id, c.campaign, c.first_ns, c.last_ns,
                     c.first_received, fleets.get(c.device_id, "default"),
                     partition_date(c.first_ns, c.first_received), c.privacy] for c in captures]  # fmt: skip
        rows = captures_rows(receipts, segments=[c.segments for c in captures],
                             last_received=[c.last_received for c in captures])  # fmt: skip
        capture_table.append(rows, snapshot_properties={MIGRATED_KEY: "captures"})
        report.captures = len(captures)
    return report
