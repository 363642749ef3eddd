"""The fleet store as Apache Iceberg tables: ``fleetloop.samples`` and ``fleetloop.captures``.

The catalog is pyiceberg's SQL catalog in the coordinator's own database (the SQLite file of the
embedded default, or the PostgreSQL database coordinators share), the files live in the object store
(a folder, or an S3 bucket through the same pyarrow S3 file system as :mod:`fleetloop_cloud.storage.s3`).
Spark, Trino, DuckDB and pyiceberg read the same tables (docs/query.md).

``samples`` is the narrow table of the Parquet layout plus its partition columns: partitioned by
``fleet`` and ``date`` (identity: the same ``fleet=F/date=D`` folders the Hive layout had), sorted by
device, signal and time. ``captures`` has one row per ingested segment (capture, device, campaign,
first/last sample time, samples, arrival), also by fleet and date; ``segments`` is 1 for those rows
and N for a capture migrated from the ledger as a whole.

**Ingest** (:class:`IcebergFleetStore`): segments arriving together are written as one batch — one
append, one snapshot, atomic — a *group commit*: each request waits (``batch_wait_s`` at most) for
others to join, and its ack goes out after the commit. The batch's receipts travel in the snapshot's
summary (``fleetloop.segments``), which makes appends exactly-once without a transaction spanning the
table and the ingest ledger: a segment whose batch committed but whose ledger row was never written (a
crash between the two) is found there when it is retried and not appended again; two coordinators
appending the same segment at once conflict in the append's validation (any snapshot committed since
the batch began that names one of its segments) and the later one drops it and commits the rest.
Other concurrent appends merely retry (pyiceberg's commit retries, fresh metadata each time).
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.io.pyarrow import PyArrowFileIO, bin_pack_arrow_table, pyarrow_to_schema, write_file
from pyiceberg.manifest import DataFile
from pyiceberg.partitioning import PartitionField, PartitionFieldValue, PartitionKey, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import CommitTableResponse, Table, TableProperties, Transaction, WriteTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Operation, Snapshot
from pyiceberg.table.sorting import SortField, SortOrder
from pyiceberg.table.update import update_table_metadata
from pyiceberg.table.update.snapshot import _FastAppendFiles
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import DateType, DoubleType, LongType, NestedField, StringType

from fleetloop_cloud.fleet_store.iceberg_io import FleetFileIO
from fleetloop_cloud.fleet_store.parquet import partition_date, segment_table
from fleetloop_cloud.fleet_store.query import TableFiles
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.storage import S3Settings
from fleetloop_cloud.uploads.clock_check import cloud_span
from fleetloop_shared.catalog import Catalog as SignalCatalog
from fleetloop_shared.errors import ConfigError, UnavailableError
from fleetloop_shared.segment import Segment

log = logging.getLogger("fleetloop.cloud.iceberg")

NAMESPACE = "fleetloop"
SAMPLES = f"{NAMESPACE}.samples"
CAPTURES = f"{NAMESPACE}.captures"
#: Snapshot summary key holding the batch's receipts (JSON list of :data:`RECEIPT_FIELDS` lists).
SEGMENTS_KEY = "fleetloop.segments"
#: Snapshot summary key naming the batch (the same in the samples and the captures snapshot).
BATCH_KEY = "fleetloop.batch"
#: Snapshot summary key naming a migrated Parquet partition (``fleet=F/date=D``).
MIGRATED_KEY = "fleetloop.migrated"

SAMPLES_SCHEMA = Schema(
    NestedField(1, "device_id", StringType(), required=True),
    NestedField(2, "capture_id", StringType(), required=True),
    NestedField(3, "campaign", StringType(), required=True),
    NestedField(4, "signal", StringType(), required=True),
    NestedField(5, "t_ns", LongType(), required=True),
    NestedField(6, "value", DoubleType(), required=False),
    NestedField(7, "value_int", LongType(), required=False),
    NestedField(8, "value_str", StringType(), required=False),
    NestedField(9, "fleet", StringType(), required=True),
    NestedField(10, "date", DateType(), required=True),
    # the device's clock minus the cloud's, already taken off t_ns (see the Parquet layout's schema);
    # tables made before it gain it by a schema evolution (old rows read NULL)
    NestedField(11, "clock_offset_ns", LongType(), required=False),
)
CAPTURES_SCHEMA = Schema(
    NestedField(1, "capture_id", StringType(), required=True),
    NestedField(2, "device_id", StringType(), required=True),
    NestedField(3, "campaign", StringType(), required=True),
    NestedField(4, "segment_id", StringType(), required=False),
    NestedField(5, "first_ns", LongType(), required=True),
    NestedField(6, "last_ns", LongType(), required=True),
    NestedField(7, "samples", LongType(), required=True),
    NestedField(8, "segments", LongType(), required=True),
    NestedField(9, "first_received", DoubleType(), required=True),
    NestedField(10, "last_received", DoubleType(), required=True),
    NestedField(11, "fleet", StringType(), required=True),
    NestedField(12, "date", DateType(), required=True),
    # the privacy policy stamp the capture was taken under ("" for none; older tables gain the column)
    NestedField(13, "privacy", StringType(), required=False),
)
#: The tables' sort orders (each data file is written so sorted).
SAMPLES_ORDER = ("device_id", "signal", "t_ns")
CAPTURES_ORDER = ("device_id", "capture_id", "first_ns")
_EPOCH = datetime.date(1970, 1, 1)
#: What one receipt in a snapshot summary holds, in order.
RECEIPT_FIELDS = ("device_id", "segment_id", "samples", "capture_id", "campaign", "first_ns", "last_ns",
                  "received", "fleet", "date", "privacy")  # fmt: skip
#: Table properties: zstd data files, commits retried on conflict, old metadata files removed.
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    "commit.retry.num-retries": "10",
    "commit.retry.min-wait-ms": "20",
    "commit.retry.max-wait-ms": "2000",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
}


def _spec(schema: Schema) -> PartitionSpec:
    fleet, date = schema.find_field("fleet").field_id, schema.find_field("date").field_id
    return PartitionSpec(
        PartitionField(fleet, 1000, IdentityTransform(), "fleet"),
        PartitionField(date, 1001, IdentityTransform(), "date"),
    )


def _sort(schema: Schema, names: Iterable[str]) -> SortOrder:
    return SortOrder(*(SortField(schema.find_field(n).field_id, IdentityTransform()) for n in names))


# -- the catalog and its file IO ---------------------------------------------------------------------
def catalog_uri(db: str | None, sqlite_path: Path) -> str:
    """SQLAlchemy's URL for the coordinator's database: PostgreSQL through psycopg 3, or the SQLite file."""
    if db:
        scheme, _, rest = db.partition("://")
        if scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"the Iceberg catalog needs PostgreSQL or SQLite, got {scheme}://")
        return f"postgresql+psycopg://{rest}"
    sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{sqlite_path}?timeout=30"


def io_properties(storage: S3Settings | None) -> dict[str, str]:
    if storage is None:
        return {}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in storage.__dict__.items()}
    return {"py-io-impl": f"{FleetFileIO.__module__}.{FleetFileIO.__qualname__}",
            "fleetloop.s3": json.dumps(settings)}  # fmt: skip


class _FleetCatalog(SqlCatalog):
    """pyiceberg's SQL catalog, remembering the metadata of the last few metadata files it wrote or read.

    Every commit loads the table's current metadata to check the commit's requirements against it, and
    every load parses the metadata file — JSON holding every retained snapshot — although this catalog
    has usually just written it (the previous commit). Metadata files are never rewritten (each commit
    writes a new one, named by its sequence number and a UUID) and the parsed metadata is a frozen model,
    so the parsed copy is kept by location (:data:`PARSED_METADATA` of them, the oldest dropped)."""

    def __init__(self, name: str, **properties: str) -> None:
        super().__init__(name, **properties)
        self._parsed: OrderedDict[str, TableMetadata] = OrderedDict()
        self._parsed_lock = threading.Lock()

    def _remember(self, location: str, metadata: TableMetadata) -> None:
        with self._parsed_lock:
            self._parsed[location] = metadata
            self._parsed.move_to_end(location)
            while len(self._parsed) > PARSED_METADATA:
                self._parsed.popitem(last=False)

    def _convert_orm_to_iceberg(self, orm_table: Any) -> Table:
        location = orm_table.metadata_location
        with self._parsed_lock:
            metadata = self._parsed.get(location) if location else None
        if metadata is None:
            table = super()._convert_orm_to_iceberg(orm_table)
            self._remember(table.metadata_location, table.metadata)
            return table
        return Table(
            identifier=(*Catalog.identifier_to_tuple(orm_table.table_namespace), orm_table.table_name),
            metadata=metadata,
            metadata_location=location, io=self._load_file_io(metadata.properties, location), catalog=self,
        )  # fmt: skip

    def commit_table(self, table: Table, requirements: Any, updates: Any) -> CommitTableResponse:
        response = super().commit_table(table, requirements, updates)
        self._remember(response.metadata_location, response.metadata)
        return response


#: Parsed metadata files a catalog keeps (two tables: the current and the previous of each, and spare).
PARSED_METADATA = 8
#: Tries to open (and on first use create) the catalog and its tables, and the pause before each retry.
OPEN_ATTEMPTS = 5
OPEN_RETRY_S = 0.2


def _database_error(exc: BaseException) -> bool:
    """An error of the catalog's database layer (SQLAlchemy's, raised through pyiceberg's SQL catalog),
    told by its module so that nothing here imports SQLAlchemy."""
    return type(exc).__module__.split(".")[0] == "sqlalchemy"


class IcebergTables:
    """The two tables, created on first use, in the catalog at ``uri`` with files under ``warehouse``.

    Creation is idempotent across processes: coordinators started together on a new database race to
    create the catalog's own tables, the namespace and ours, and pyiceberg's SQL catalog checks before it
    creates, so all but one of them see a duplicate-key or duplicate-table error from the database. That
    loser opens again (:data:`OPEN_ATTEMPTS`) and finds everything there."""

    def __init__(self, uri: str, warehouse: str, properties: dict[str, str] | None = None) -> None:
        self.warehouse = warehouse.rstrip("/")
        where = uri.split("@")[-1]
        for attempt in range(OPEN_ATTEMPTS):
            catalog: Catalog | None = None
            try:
                catalog = self.catalog = _FleetCatalog("fleetloop", uri=uri, warehouse=self.warehouse,
                                                    **(properties or {}))  # fmt: skip
                catalog.create_namespace_if_not_exists(NAMESPACE)
                self.samples = self._table(SAMPLES, SAMPLES_SCHEMA, SAMPLES_ORDER)
                self.captures = self._table(CAPTURES, CAPTURES_SCHEMA, CAPTURES_ORDER)
                return
            except (OSError, CommitFailedException) as exc:
                raise UnavailableError(f"Iceberg catalog at {where}: {exc}") from None
            except Exception as exc:
                if not _database_error(exc):
                    raise
                if catalog is not None:
                    self.close()
                if attempt == OPEN_ATTEMPTS - 1:
                    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise UnavailableError(f"Iceberg catalog at {where}: {detail}") from None
                log.info("Iceberg catalog at %s: %s; opening it again", where, type(exc).__name__)
                time.sleep(OPEN_RETRY_S * (attempt + 1))

    def _table(self, name: str, schema: Schema, order: tuple[str, ...]) -> Table:
        location = f"{self.warehouse}/{name.split('.')[-1]}"
        table = self.catalog.create_table_if_not_exists(
            name, schema, location=location, partition_spec=_spec(schema), sort_order=_sort(schema, order),
            properties=TABLE_PROPERTIES,
        )  # fmt: skip
        return self._evolve(table, schema)

    def _evolve(self, table: Table, schema: Schema) -> Table:
        """``table`` with the columns of ``schema`` it lacks (a table made by an earlier version gains
        those since by a schema evolution). Two coordinators starting together may race on it: the loser
        reloads and finds them added."""
        for attempt in range(3):
            have = {f.name for f in table.schema().fields}
            missing = [f for f in schema.fields if f.name not in have]
            if not missing:
                return table
            try:
                with table.update_schema() as update:
                    for field in missing:
                        update.add_column(field.name, field.field_type, doc=field.doc)
            except CommitFailedException:
                if attempt == 2:
                    raise
            table = self.catalog.load_table(table.name())
        return table

    def load(self, name: str) -> Table:
        return self.catalog.load_table(name)

    def scan_files(self, name: str) -> TableFiles:
        """The current snapshot's data files of ``samples`` or ``captures`` (a fresh load: other
        coordinators' commits included)."""
        table = self.load(f"{NAMESPACE}.{name}")
        snapshot = table.current_snapshot()
        arrow_schema = table.schema().as_arrow()
        files: list[tuple[str, str, datetime.date]] = []
        filesystem: Any = None
        if snapshot is not None:
            for task in table.scan().plan_files():
                if task.delete_files:
                    raise UnavailableError(
                        f"{name} has row-level delete files (written by another engine); rewrite the table "
                        "with copy-on-write deletes before querying it here"
                    )
                scheme, netloc, path = PyArrowFileIO.parse_location(task.file.file_path)
                if filesystem is None:
                    filesystem = table.io.fs_by_scheme(scheme, netloc)  # type: ignore[attr-defined]
                partition = task.file.partition
                files.append((path, partition[0], _EPOCH + datetime.timedelta(days=partition[1])))
        return TableFiles(filesystem, files, arrow_schema)

    def close(self) -> None:
        engine = getattr(self.catalog, "engine", None)
        if engine is not None:
            engine.dispose()


# -- exactly-once appends ----------------------------------------------------------------------------
def receipts_of(snapshot: Snapshot) -> list[list[Any]]:
    """The receipts a snapshot's summary carries (none for snapshots not made by ingest)."""
    raw = snapshot.summary.additional_properties.get(SEGMENTS_KEY) if snapshot.summary else None
    if not raw:
        return []
    try:
        out = json.loads(raw)
    except ValueError:
        return []
    # receipts written before the privacy stamp existed lack that last field: none
    return [
        r if len(r) == len(RECEIPT_FIELDS) else [*r, ""]
        for r in out
        if isinstance(r, list) and len(RECEIPT_FIELDS) - 1 <= len(r) <= len(RECEIPT_FIELDS)
    ]


def _keys_between(table: Table, head: Snapshot | None, base_id: int | None) -> set[str]:
    """Segment keys named by the snapshots from ``head`` back to (not including) ``base_id``."""
    keys: set[str] = set()
    snapshot = head
    while snapshot is not None and snapshot.snapshot_id != base_id:
        keys.update(f"{r[0]}/{r[1]}" for r in receipts_of(snapshot))
        parent = snapshot.parent_snapshot_id
        snapshot = table.metadata.snapshot_by_id(parent) if parent is not None else None
    return keys


def _data_files(
    table: Table, groups: dict[tuple[str, str], list[pa.Table]], order: tuple[str, ...] = ()
) -> list[DataFile]:
    """A batch's rows written as one data file per partition (more past the target file size): in the
    order given, or sorted by ``order``.

    The rows arrive grouped by partition already (each segment's fleet and date), so each group is
    handed to pyiceberg's file writer with its partition key. pyiceberg's own path from a table
    (``_dataframe_to_data_files``) would find the partitions again — transform, group and filter every
    row, then copy each partition — which was most of the ingest's write CPU (benchmarks/scale.py).

    Ingest passes each partition's segments by device and time, each already sorted by signal and time
    (:func:`segment_table`), and no ``order``: sorting the batch's rows across its segments (sort, then
    copy every column) was the largest cost left in a commit, and bought nothing a reader uses — a
    batch's file is one row group (up to a million rows), so its statistics prune the same either way,
    and each signal's run stays contiguous within a segment for compression. Compaction rewrites the
    files fully sorted by the table's sort order (device, signal, time)."""
    if not groups:
        return []
    metadata = table.metadata
    schema, spec = metadata.schema(), metadata.spec()
    arrow_schema = schema.as_arrow()
    task_schema = pyarrow_to_schema(arrow_schema, name_mapping=schema.name_mapping,
                                    format_version=metadata.format_version)  # fmt: skip
    target = int(metadata.properties.get(TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                                         TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT))  # fmt: skip
    write_uuid, counter = uuid.uuid4(), itertools.count()
    tasks = []
    for (fleet, date), parts in sorted(groups.items()):
        data = pa.concat_tables(parts)
        if order:
            data = data.combine_chunks().sort_by([(name, "ascending") for name in order])
        data = data.cast(arrow_schema)
        values = {"fleet": fleet, "date": datetime.date.fromisoformat(date)}
        key = PartitionKey(
            field_values=[PartitionFieldValue(field, values[field.name]) for field in spec.fields],
            partition_spec=spec, schema=schema,
        )  # fmt: skip
        for batches in bin_pack_arrow_table(data, target):
            tasks.append(WriteTask(write_uuid=write_uuid, task_id=next(counter), record_batches=batches,
                                   partition_key=key, schema=task_schema))  # fmt: skip
    return list(write_file(table.io, metadata, iter(tasks)))


def _append_files(
    table: Table, files: list[DataFile], properties: dict[str, str], keys: frozenset[str] = frozenset()
) -> Table:
    """``files`` appended to ``table`` in one snapshot (a fast append; with ``keys``, one that fails
    with :class:`_Duplicates` when a snapshot committed since it began names one of those segments)."""
    tx = _AppendTransaction(table)
    producer = _KeyedAppend(operation=Operation.APPEND, transaction=tx, io=table.io,
                            snapshot_properties=properties)  # fmt: skip
    producer.keys = keys
    for data_file in files:
        producer.append_data_file(data_file)
    producer.commit()
    return tx.commit_transaction()


def on_current(table: Table, change: Callable[[Table], Table]) -> Table:
    """``change(table)``, and once more on the table as it is now if the snapshot this coordinator last
    saw was expired under it (erasure and retention expire every snapshot but the current one, and their
    files, so a change on it cannot read its parent's manifests: FileNotFoundError)."""
    try:
        return change(table)
    except FileNotFoundError:
        log.info("%s: the snapshot last seen here was expired; changing the current one", table.name())
        return change(table.refresh())


class _AppendTransaction(Transaction):
    """A transaction that works out its pending metadata once per change, not on every read.

    pyiceberg's ``Transaction.table_metadata`` applies the pending updates to the table's metadata and
    deep-copies the result each time it is read, and one append reads it a dozen times or more. The
    metadata holds every retained snapshot (with its receipts), so that copying made each commit's CPU
    grow with the snapshots kept — the ingest's first bottleneck (benchmarks/scale.py). The metadata is
    a frozen model and the updates a tuple that is replaced, never changed, so the result is kept until
    either is replaced."""

    _memo: tuple[TableMetadata, tuple[Any, ...], TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        base, updates = self._table.metadata, self._updates
        if not updates:
            return base  # nothing pending: the table's own (frozen) metadata
        memo = self._memo
        if memo is None or memo[0] is not base or memo[1] is not updates:
            memo = self._memo = (base, updates, update_table_metadata(base, updates))
        return memo[2]


class _Duplicates(ValidationException):
    def __init__(self, keys: set[str]) -> None:
        super().__init__(f"{len(keys)} segments were committed concurrently")
        self.keys = keys


class _KeyedAppend(_FastAppendFiles):
    """A fast append that conflicts with a concurrent snapshot naming one of its segments."""

    keys: frozenset[str] = frozenset()

    def _validate_concurrency(self) -> None:
        window = self._commit_window
        if window is None or window.is_empty():
            return
        base = window.base.snapshot_id if window.base is not None else None
        clash = _keys_between(self._transaction._table, window.head, base) & self.keys
        if clash:
            raise _Duplicates(clash)


def _unavailable(exc: BaseException) -> UnavailableError:
    """A failed commit as the device hears of it: unavailable for now, to be sent again."""
    return exc if isinstance(exc, UnavailableError) else UnavailableError(f"fleet store commit failed: {exc}")


@dataclass
class _Item:
    key: str
    rows: pa.Table
    receipt: list[Any]
    done: threading.Event = field(default_factory=threading.Event)
    samples: int = 0
    error: BaseException | None = None


class IcebergFleetStore:
    """Ingest's sink in the Iceberg format: ``write_segment`` like the Parquet store's, group-committed."""

    def __init__(
        self,
        tables: IcebergTables,
        settings: TableSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tables = tables
        self.settings = settings or TableSettings(format="iceberg")
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._leader = False
        self._samples = tables.load(SAMPLES)
        self._captures = tables.load(CAPTURES)
        #: Segment key → samples, and → the batch that committed it, from the live snapshots; the batches
        #: whose captures rows are known to be there; each live snapshot's batch and segment keys. All
        #: four shrink as snapshots expire (:meth:`_index`), so they hold what the retention keeps.
        self._committed: dict[str, int] = {}
        self._batch_of: dict[str, str] = {}
        self._captured: set[str] = set()
        self._indexed: dict[int, tuple[str | None, list[str]]] = {}
        #: Held by whoever touches the captures table or ``_captured``: the group commit's leader appends a
        #: batch's captures while a writer of a segment committed before restores another's, and both
        #: would share one pyiceberg ``Table``, whose ``refresh`` (ours, and pyiceberg's own commit retry)
        #: replaces its metadata in place — a commit begun on the old metadata then lands with the new
        #: one's sequence number over the old one's parent, dropping the other's snapshot from the table.
        #: The leader holds it from indexing its batch's keys to appending their captures, so that no
        #: writer of one of those keys restores the batch's captures in between (they would be twice).
        self._captures_lock = threading.RLock()
        self._index(self._samples)
        #: Batches and segments committed, duplicates dropped, conflicts retried (for metrics and tests).
        self.counters = {"batches": 0, "segments": 0, "duplicates": 0, "conflicts": 0, "captures_restored": 0}

    def _index(self, table: Table) -> None:
        """Learn the receipts of ``table``'s snapshots not seen yet, and forget those of expired ones
        (a segment retried after its snapshot expired is found in the ingest ledger, which the
        maintenance pass completes from the receipts before it expires them)."""
        live = {s.snapshot_id: s for s in table.metadata.snapshots}
        for snapshot_id, snapshot in live.items():
            if snapshot_id in self._indexed:
                continue
            batch = snapshot.summary.additional_properties.get(BATCH_KEY) if snapshot.summary else None
            keys = []
            for r in receipts_of(snapshot):
                key = f"{r[0]}/{r[1]}"
                keys.append(key)
                self._committed[key] = int(r[2])
                if batch is not None:
                    self._batch_of[key] = batch
            self._indexed[snapshot_id] = (batch, keys)
        for snapshot_id in [s for s in self._indexed if s not in live]:
            batch, keys = self._indexed.pop(snapshot_id)
            for key in keys:
                self._committed.pop(key, None)
                self._batch_of.pop(key, None)
        with self._captures_lock:
            self._captured &= {batch for batch, _ in self._indexed.values() if batch is not None}

    def write_segment(
        self, *, fleet: str, device_id: str, capture_id: str, campaign: str, segment: Segment,
        catalog: SignalCatalog, received_unix: float, clock_offset_ns: int | None = None, privacy: str = "",
    ) -> int:  # fmt: skip
        """Store one segment's samples in the next batch and return how many once it is committed (the
        count it had, for a segment committed before). Writing it again is harmless. With
        ``clock_offset_ns``, times are stored on the cloud's clock and the offset beside them."""
        rows = segment_table(device_id, capture_id, campaign, segment, catalog, clock_offset_ns)
        span = segment.time_range()
        first, last = cloud_span(segment, clock_offset_ns)
        date = partition_date(span[0] if span is not None else None, received_unix)
        key = f"{device_id}/{bytes(segment.segment_id).hex()}"
        if rows.num_rows:
            rows = rows.append_column("fleet", pa.array([fleet] * rows.num_rows, pa.string()))
            rows = rows.append_column("date", pa.array([date] * rows.num_rows, pa.string()).cast(pa.date32()))
            rows = rows.select([f.name for f in SAMPLES_SCHEMA.fields])
        receipt = [device_id, key.split("/")[1], rows.num_rows, capture_id, campaign, int(first), int(last),
                   float(received_unix), fleet, date, privacy]  # fmt: skip
        item = _Item(key, rows, receipt)
        with self._cond:
            committed = self._committed.get(key)  # read once: the leader's index may drop it meanwhile
            if committed is not None:
                try:
                    self._restore_captures({key})
                except Exception as exc:  # as a batch's failure is reported: the device sends it again
                    raise _unavailable(exc) from None
                return committed
            self._pending.append(item)
            while not item.done.is_set():
                if self._leader:
                    self._cond.wait(1.0)
                    continue
                self._leader = True
                self._cond.release()
                try:
                    if self.settings.batch_wait_s:
                        time.sleep(self.settings.batch_wait_s)
                    with self._cond:
                        batch = self._pending[: self.settings.batch_max_segments]
                        del self._pending[: len(batch)]
                    self._commit_batch(batch)
                finally:
                    self._cond.acquire()
                    self._leader = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.samples

    def _commit_batch(self, batch: list[_Item]) -> None:
        try:
            self._append(batch)
        except BaseException as exc:
            for item in batch:
                if not item.done.is_set():
                    item.error = _unavailable(exc)
                    item.done.set()
            if not isinstance(exc, Exception):
                raise

    def _append(self, batch: list[_Item]) -> None:
        unique: dict[str, _Item] = {}
        for item in batch:
            unique.setdefault(item.key, item)
        before = {k for k in unique if k in self._committed}
        elsewhere: set[str] = set()
        while True:
            fresh = [i for k, i in unique.items() if k not in self._committed]
            if fresh:
                try:
                    self._commit(fresh)
                except _Duplicates as exc:
                    self.counters["conflicts"] += 1
                    self.counters["duplicates"] += len(exc.keys)
                    elsewhere |= exc.keys
                    self._samples = self._samples.refresh()
                    self._index(self._samples)
                    continue
            break
        self._restore_captures(elsewhere | before)
        for item in batch:
            item.samples = self._committed.get(item.key, unique[item.key].rows.num_rows)
            item.done.set()

    def _commit(self, items: list[_Item]) -> None:
        batch_id = uuid.uuid4().hex
        receipts = [i.receipt for i in items]
        props = {SEGMENTS_KEY: json.dumps(receipts, separators=(",", ":")), BATCH_KEY: batch_id}
        groups: dict[tuple[str, str], list[pa.Table]] = {}
        for i in sorted(items, key=lambda i: (i.receipt[0], i.receipt[5], i.receipt[1])):  # device, first
            if i.rows.num_rows:  # a segment lies in one partition: its receipt's fleet and date
                groups.setdefault((str(i.receipt[8]), str(i.receipt[9])), []).append(i.rows)
        files = _data_files(self._samples, groups)
        keys = frozenset(i.key for i in items)
        try:
            self._samples = on_current(self._samples, lambda t: _append_files(t, files, props, keys))
        except _Duplicates:
            for data_file in files:
                self._samples.io.delete(data_file.file_path)
            raise
        with self._captures_lock:  # before the keys are known here: no writer restores them meanwhile
            self._index(self._samples)
            self.counters["batches"] += 1
            self.counters["segments"] += len(items)
            self._captures = on_current(self._captures, lambda t: append_captures(t, receipts, batch_id))
            self._captured.add(batch_id)

    def _restore_captures(self, keys: set[str]) -> None:
        """The captures rows of the batches that committed ``keys`` (segments sent again: committed
        elsewhere, or before), when those batches have none: their writer died between its samples
        commit and its captures append, and the retry is the first to know. Queries then count the
        segment at once rather than after the next maintenance pass; should that pass or the writer append
        them as well, the captures view counts each segment once."""
        with self._captures_lock:
            self._restore_captures_locked(keys)

    def _restore_captures_locked(self, keys: set[str]) -> None:
        batches = {b for k in keys if (b := self._batch_of.get(k)) is not None} - self._captured
        if not batches:
            return
        self._captures = self._captures.refresh()
        self._captured |= {s.summary.additional_properties.get(BATCH_KEY, "")
                           for s in self._captures.metadata.snapshots if s.summary is not None}  # fmt: skip
        for snapshot in self._samples.metadata.snapshots:
            batch = snapshot.summary.additional_properties.get(BATCH_KEY) if snapshot.summary else None
            if batch in batches and batch not in self._captured:
                self._captures = append_captures(self._captures, receipts_of(snapshot), batch)
                self._captured.add(batch)
                self.counters["captures_restored"] += 1


def captures_rows(
    receipts: list[list[Any]], *, segments: list[int] | None = None, last_received: list[float] | None = None
) -> pa.Table:
    """The captures table's rows for a batch's receipts (one per segment; a migrated capture's row
    stands for ``segments`` segments received until ``last_received``)."""
    cols = {name: [r[i] for r in receipts] for i, name in enumerate(RECEIPT_FIELDS)}
    schema = CAPTURES_SCHEMA.as_arrow()
    return pa.Table.from_pydict(
        {
            "capture_id": cols["capture_id"], "device_id": cols["device_id"], "campaign": cols["campaign"],
            "segment_id": cols["segment_id"], "first_ns": cols["first_ns"], "last_ns": cols["last_ns"],
            "samples": cols["samples"], "segments": segments or [1] * len(receipts),
            "first_received": cols["received"], "last_received": last_received or cols["received"],
            "fleet": cols["fleet"], "privacy": cols["privacy"],
            "date": pa.array(cols["date"], pa.string()).cast(pa.date32()),
        },
        schema=schema,
    )  # fmt: skip


def append_captures(table: Table, receipts: list[list[Any]], batch_id: str) -> Table:
    """Append a batch's capture rows (its samples commit happened first; the maintenance pass adds
    those of a batch whose captures append never happened): one data file per partition, through the
    same writer as the samples."""
    if not receipts:
        return table
    by_partition: dict[tuple[str, str], list[list[Any]]] = {}
    for r in receipts:
        by_partition.setdefault((str(r[8]), str(r[9])), []).append(r)
    groups = {k: [captures_rows(v)] for k, v in by_partition.items()}
    return _append_files(table, _data_files(table, groups, CAPTURES_ORDER), {BATCH_KEY: batch_id})
