"""The fleet store: ingested samples as Parquet files in a Hive-partitioned layout.

Layout ``samples/fleet=<fleet>/date=<YYYY-MM-DD>/<device_id>-<segment_id hex>.parquet`` — the one DuckDB
queries here and Trino, Spark or ClickHouse can read as is. The table is *narrow* (one row per sample:
device, capture, campaign, signal path, time, value) and sorted by device, signal and time, because that
is what fleet queries filter and group by and what compresses best column-wise.

One file per segment, named by the segment id, makes ingest idempotent: a retried upload rewrites the
same file with the same rows. Files appear by rename only, so a reader never sees half a file.

Compaction (:mod:`fleetloop_cloud.fleet_store.compaction`) later merges a partition's small segment files into
``compacted-<24 hex>.parquet`` files whose Parquet key-value metadata ``fleetloop.absorbed`` names the
segment files they absorbed. A segment file so named is never written again (``write_segment`` checks
under the partition's lock), and queries leave it out until compaction deletes it. Each partition has a
lock file outside the samples tree, ``compaction/fleet=F/date=D.lock``: ingest holds it shared while it
writes, compaction exclusively while it commits, and its content is a generation number compaction raises
with every commit (so ingest re-reads the absorbed names only when they changed, also across processes
sharing the store).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import MalformedMessageError, UserError
from fleetloop_shared.names import safe_name
from fleetloop_shared.segment import Segment

#: The narrow table's schema; ``fleet`` and ``date`` come from the directory names (Hive partitions).
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("capture_id", pa.string(), nullable=False),
        pa.field("campaign", pa.string(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),
        pa.field("t_ns", pa.int64(), nullable=False),
        pa.field("value", pa.float64(), nullable=True),
        pa.field("value_int", pa.int64(), nullable=True),
        # The text of a STRING signal (NULL for the others, whose value/value_int are NULL for text).
        # Files written before text existed lack the column; readers fill it with NULL (union by name).
        pa.field("value_str", pa.string(), nullable=True),
        # The device's clock minus the cloud's, already taken off ``t_ns`` (which is cloud time); NULL
        # when no offset was applied (none measured, or refused). ``t_ns + clock_offset_ns`` is what the
        # device stamped. Files from before the column lack it; readers fill it with NULL.
        pa.field("clock_offset_ns", pa.int64(), nullable=True),
    ]
)
#: A first sample before this is not wall-clock time (device boot time, say): partition by arrival.
_PLAUSIBLE_EPOCH_NS = 946_684_800 * 1_000_000_000  # 2000-01-01T00:00:00Z
_NS_PER_S = 1_000_000_000
#: A segment file's name: ``<device id>-<segment id, 32 hex>.parquet``.
SEGMENT_FILE = re.compile(
    r"^(?P<device>[A-Za-z0-9_][A-Za-z0-9._-]{0,127})-(?P<segment>[0-9a-f]{32})\.parquet$"
)
#: A compacted file's name (never a segment file's: 24 hex digits, not 32).
COMPACTED_FILE = re.compile(r"^compacted-[0-9a-f]{24}\.parquet$")
#: Key of the Parquet key-value metadata listing (JSON) the segment file names a compacted file absorbed.
ABSORBED_KEY = b"fleetloop.absorbed"


def partition_date(first_ns: int | None, received_unix: float) -> str:
    """The UTC date a segment is filed under: its first sample's, or its arrival's when the samples
    do not carry wall-clock time (before 2000 or more than a day after arrival)."""
    limit_ns = int((received_unix + 86400) * _NS_PER_S)
    if first_ns is not None and _PLAUSIBLE_EPOCH_NS <= first_ns <= limit_ns:
        seconds = first_ns // _NS_PER_S
    else:
        seconds = int(received_unix)
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC).strftime("%Y-%m-%d")


def absorbed_by(path: Path) -> list[str]:
    """The segment file names the compacted file ``path`` absorbed (from its Parquet metadata)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(ABSORBED_KEY)
    if raw is None:
        return []
    names = json.loads(raw)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: {ABSORBED_KEY.decode()} is not a list of file names")
    return names


def scan_absorbed(partition: Path) -> dict[str, str]:
    """Segment file name → the compacted file (name) that absorbed it, for one partition directory."""
    out: dict[str, str] = {}
    try:
        entries = list(os.scandir(partition))
    except FileNotFoundError:
        return out
    for entry in entries:
        if COMPACTED_FILE.match(entry.name):
            for name in absorbed_by(Path(entry.path)):
                out[name] = entry.name
    return out


class PartitionLock:
    """A held lock on one partition's lock file (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def generation(self) -> int:
        raw = os.pread(self._fd, 32, 0).strip()
        return int(raw) if raw.isdigit() else 0

    def bump(self) -> int:
        """Raise the generation (exclusive holders only), durably; returns the new one."""
        new = self.generation() + 1
        data = f"{new}\n".encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)
        return new


class FleetStore:
    """Writes decoded segments as Parquet below ``root/samples`` (the only writer of that tree)."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._samples = self._root / "samples"
        self._samples.mkdir(parents=True, exist_ok=True)
        self._absorbed_cache: dict[Path, tuple[int, frozenset[str]]] = {}
        self._cache_lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def samples_dir(self) -> Path:
        return self._samples

    def partitions(self) -> list[Path]:
        """Every ``fleet=*/date=*`` directory, sorted."""
        return sorted(p for p in self._samples.glob("fleet=*/date=*") if p.is_dir())

    def _lock_path(self, partition: Path) -> Path:
        rel = partition.relative_to(self._samples)  # fleet=F/date=D
        directory = self._root / "compaction" / rel.parent
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{rel.name}.lock"

    @contextlib.contextmanager
    def partition_lock(
        self, partition: Path, *, exclusive: bool, blocking: bool = True
    ) -> Iterator[PartitionLock | None]:
        """Hold ``partition``'s lock (shared for writers of segment files, exclusive for compaction);
        yields None when ``blocking`` is false and the lock is busy."""
        fd = os.open(self._lock_path(partition), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, flags if blocking else flags | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield PartitionLock(fd)
        finally:
            os.close(fd)  # releases the lock

    def absorbed(self, partition: Path, lock: PartitionLock) -> frozenset[str]:
        """Names of segment files in ``partition`` that compacted files absorbed (the caller holds the
        partition's lock); re-read from the compacted files only when the generation moved."""
        generation = lock.generation()
        with self._cache_lock:
            cached = self._absorbed_cache.get(partition)
        if cached is not None and cached[0] == generation:
            return cached[1]
        names = frozenset(scan_absorbed(partition)) if generation else frozenset()
        with self._cache_lock:
            self._absorbed_cache[partition] = (generation, names)
        return names

    def segment_path(self, *, fleet: str, device_id: str, segment: Segment, received_unix: float) -> Path:
        """Where ``segment`` is (or will be) stored; deterministic, which is what makes retries safe. The
        date is the device's own stamp's: a retry under another clock estimate lands on the same file."""
        span = segment.time_range()  # over every group of a multi-group (format 4) segment
        first = span[0] if span is not None else None
        date = partition_date(first, received_unix)
        device = safe_name(device_id, "device id", becomes="a file")
        folder = self._samples / f"fleet={safe_name(fleet, 'fleet', becomes='a file')}" / f"date={date}"
        return folder / f"{device}-{bytes(segment.segment_id).hex()}.parquet"

    def write_segment(
        self,
        *,
        fleet: str,
        device_id: str,
        capture_id: str,
        campaign: str,
        segment: Segment,
        catalog: Catalog,
        received_unix: float,
        clock_offset_ns: int | None = None,
        privacy: str = "",
    ) -> int:
        """Store one segment's samples; returns how many (rows × signals). Writing it again is harmless.

        A segment whose file compaction already absorbed is not written again (its rows are in the
        compacted file); the count is returned all the same. A signal id the device's catalog does not
        know, or a column whose length differs from the timestamps, is a malformed upload
        (MalformedMessageError) and writes nothing. With ``clock_offset_ns`` (the device's clock minus
        the cloud's), times are stored on the cloud's clock and the offset beside them. ``privacy`` (the
        capture's policy stamp) is not kept here: the metadata's captures hold it in this layout.
        """
        path = self.segment_path(
            fleet=fleet, device_id=device_id, segment=segment, received_unix=received_unix
        )
        table = segment_table(device_id, capture_id, campaign, segment, catalog, clock_offset_ns)
        if table.num_rows == 0:
            return 0
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        with self.partition_lock(path.parent, exclusive=False) as lock:
            assert lock is not None  # blocking
            if path.name not in self.absorbed(path.parent, lock):
                write_atomically(path, data)
        return int(table.num_rows)

    @staticmethod
    def _table(
        device_id: str, capture_id: str, campaign: str, segment: Segment, catalog: Catalog,
        clock_offset_ns: int | None,
    ) -> pa.Table:  # fmt: skip
        where = f"segment {bytes(segment.segment_id).hex()} of device {device_id}"
        t_ns = np.asarray(segment.t_ns)
        if t_ns.ndim != 1:
            raise MalformedMessageError(f"{where}: timestamps are not a 1-D array")
        t_ns = t_ns.astype(np.int64, copy=False)
        if clock_offset_ns:
            t_ns = t_ns - np.int64(clock_offset_ns)
        rows = int(t_ns.shape[0])
        signal_ids = sorted(segment.columns)
        paths: list[str] = []
        for sid in signal_ids:
            try:
                spec = catalog.by_id(sid)
            except UserError:
                raise MalformedMessageError(
                    f"{where}: signal id {sid} is not in the device's catalog"
                ) from None
            paths.append(spec.path)
        # Sort by signal path (then time) so each file is ordered like the whole store.
        order = sorted(range(len(signal_ids)), key=lambda i: paths[i])
        time_order = np.argsort(t_ns, kind="stable")
        t_sorted = t_ns[time_order]
        value_parts: list[npt.NDArray[np.float64]] = []
        value_masks: list[npt.NDArray[np.bool_]] = []
        int_parts: list[npt.NDArray[np.int64]] = []
        int_masks: list[npt.NDArray[np.bool_]] = []
        str_parts: list[pa.Array] = []
        for i in order:
            sid = signal_ids[i]
            column = np.asarray(segment.columns[sid])
            if column.shape != (rows,):
                raise MalformedMessageError(
                    f"{where}: signal {paths[i]} has {column.shape} values for {rows} timestamps"
                )
            column = column[time_order]
            data_type = DataType(segment.data_types.get(sid, catalog.by_id(sid).data_type))
            if data_type is DataType.STRING:
                if column.dtype != object or not all(type(v) is str for v in column.tolist()):
                    raise MalformedMessageError(f"{where}: signal {paths[i]} is STRING but holds non-text")
                value_parts.append(np.zeros(rows, dtype=np.float64))
                value_masks.append(np.ones(rows, dtype=np.bool_))
                int_parts.append(np.zeros(rows, dtype=np.int64))
                int_masks.append(np.ones(rows, dtype=np.bool_))
                str_parts.append(pa.array(column.tolist(), type=pa.string()))
                continue
            str_parts.append(pa.nulls(rows, type=pa.string()))
            value_masks.append(np.zeros(rows, dtype=np.bool_))
            if data_type is DataType.FLOAT64:
                value_parts.append(column.astype(np.float64, copy=False))
                int_parts.append(np.zeros(rows, dtype=np.int64))
                int_masks.append(np.ones(rows, dtype=np.bool_))
            else:
                as_int = column.astype(np.int64, copy=False)
                value_parts.append(as_int.astype(np.float64))
                int_parts.append(as_int)
                int_masks.append(np.zeros(rows, dtype=np.bool_))
        n_signals = len(order)
        if n_signals == 0 or rows == 0:
            return SAMPLES_SCHEMA.empty_table()
        total = rows * n_signals
        signal_indices = np.repeat(np.arange(n_signals, dtype=np.int32), rows)
        signal_dict = pa.array([paths[i] for i in order], type=pa.string())
        signal_column = pa.DictionaryArray.from_arrays(pa.array(signal_indices), signal_dict)
        signal_column = signal_column.cast(pa.string())
        table = pa.Table.from_arrays(
            [
                _repeat_string(device_id, total),
                _repeat_string(capture_id, total),
                _repeat_string(campaign, total),
                signal_column,
                pa.array(np.tile(t_sorted, n_signals), type=pa.int64()),
                pa.array(np.concatenate(value_parts), type=pa.float64(), mask=np.concatenate(value_masks)),
                pa.array(np.concatenate(int_parts), type=pa.int64(), mask=np.concatenate(int_masks)),
                pa.concat_arrays(str_parts),
                pa.nulls(total, pa.int64())
                if clock_offset_ns is None
                else pa.array(np.full(total, clock_offset_ns, dtype=np.int64), type=pa.int64()),
            ],
            schema=SAMPLES_SCHEMA,
        )
        return table


def with_all_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s columns and order: a file written before a column existed (``value_str``,
    ``clock_offset_ns``) gets it as NULLs, so old and new files compact, migrate and append together."""
    for column in schema:
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, type=column.type))
    return table.select(schema.names).cast(schema)


def segment_table(
    device_id: str, capture_id: str, campaign: str, segment: Segment, catalog: Catalog,
    clock_offset_ns: int | None = None,
) -> pa.Table:  # fmt: skip
    """One segment's rows in :data:`SAMPLES_SCHEMA`, by signal path and time (what either table format
    stores); MalformedMessageError for a signal id the catalog lacks or a column of the wrong length."""
    # A multi-group (format 4) segment holds every group's rows, group after group.
    tables = [
        FleetStore._table(device_id, capture_id, campaign, group, catalog, clock_offset_ns)
        for group in segment.groups()
    ]
    if len(tables) == 1:
        return tables[0]
    # ordered like every other file: by signal path, then time
    return pa.concat_tables(tables).sort_by([("signal", "ascending"), ("t_ns", "ascending")])


#: Columns of ``fleetloop store export --format parquet``: one device's samples, no fleet columns.
EXPORT_SCHEMA = pa.schema(
    [SAMPLES_SCHEMA.field(name) for name in ("t_ns", "signal", "value", "value_int", "value_str")]
)


def export_segments(output: Path, segments: Iterable[Segment], names: Mapping[int, str]) -> None:
    """Write a device store's ``segments`` as one Parquet file (zstd): a row per sample, the signal named
    by ``names`` (``id:N`` for an id it lacks); the CLI's export, kept here so only the fleet store
    imports pyarrow."""
    with pq.ParquetWriter(output, EXPORT_SCHEMA, compression="zstd") as writer:
        for seg in segments:
            rows = int(seg.t_ns.shape[0])
            for sid in sorted(seg.columns):
                values = np.asarray(seg.columns[sid])
                kind = values.dtype.kind
                text = kind == "O"
                writer.write_table(
                    pa.Table.from_arrays(
                        [
                            pa.array(seg.t_ns, pa.int64()),
                            _repeat_string(names.get(sid, f"id:{sid}"), rows),
                            pa.nulls(rows, pa.float64()) if text else pa.array(values.astype(np.float64)),
                            pa.nulls(rows, pa.int64())
                            if kind == "f" or text
                            else pa.array(values.astype(np.int64), pa.int64()),
                            pa.array(values.tolist(), pa.string()) if text else pa.nulls(rows, pa.string()),
                        ],
                        schema=EXPORT_SCHEMA,
                    )
                )


def _repeat_string(value: str, count: int) -> pa.Array:
    """A string column holding one value ``count`` times, built without a Python list of that size."""
    indices = pa.array(np.zeros(count, dtype=np.int32))
    return pa.DictionaryArray.from_arrays(indices, pa.array([value], type=pa.string())).cast(pa.string())
