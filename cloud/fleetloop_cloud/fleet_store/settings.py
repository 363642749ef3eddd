"""How the fleet store keeps its tables (``fleet_store.*`` in the coordinator's configuration).

Two formats: ``parquet`` — today's Hive-partitioned folder of Parquet files, one per segment, on local
disk (docs/decisions/0008) — and ``iceberg`` — Apache Iceberg tables ``samples`` and ``captures`` whose
catalog is the coordinator's own SQL database and whose files live in the object store (a folder, or an
S3 bucket shared by several coordinators; docs/decisions/0025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import UserError

FORMATS = ("parquet", "iceberg")


@dataclass(frozen=True)
class TableSettings:
    format: str = "parquet"
    #: An ingest batch (one atomic append) waits at most this long for more segments to join it.
    batch_wait_s: float = 0.05
    #: Segments in one batch at most; more wait for the next one.
    batch_max_segments: int = 256
    #: Snapshots older than this are expired by the maintenance pass (after their segments were
    #: reconciled with the ingest ledger), and files only they referenced are deleted. Time travel
    #: reaches this far back; every snapshot's summary is in each new metadata file, so it bounds that too.
    snapshot_retention_s: float = 900.0
    #: A partition with at least this many small data files is compacted (rewritten as one sorted file).
    compact_min_files: int = 16

    def __post_init__(self) -> None:
        check_choice(self.format, FORMATS, "fleet store format", error=UserError)
        if not (math.isfinite(self.batch_wait_s) and 0 <= self.batch_wait_s <= 10):
            raise UserError(f"batch wait must be from 0 to 10 seconds, got {self.batch_wait_s!r}")
        if not 1 <= self.batch_max_segments <= 10_000:
            raise UserError(f"batch max segments must be from 1 to 10000, got {self.batch_max_segments!r}")
        if not (math.isfinite(self.snapshot_retention_s) and self.snapshot_retention_s >= 0):
            raise UserError(
                f"snapshot retention must be 0 or more seconds, got {self.snapshot_retention_s!r}"
            )
        if self.compact_min_files < 2:
            raise UserError(f"compaction needs at least 2 files, got {self.compact_min_files!r}")
