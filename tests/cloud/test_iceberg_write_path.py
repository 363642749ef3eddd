"""The Iceberg store's write path where it leans on pyiceberg and pyarrow internals: the transaction that
derives its metadata once, the file IO that writes each object in one request and reads back what it
just wrote from memory, and the store's receipts index that shrinks as snapshots expire. Each test fails
if an upgrade of either library changes what the code relies on."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pyiceberg import serializers as iceberg_serializers
from pyiceberg.table import Transaction
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _FastAppendFiles

from fleetloop_cloud.fleet_store import iceberg, iceberg_io
from fleetloop_cloud.fleet_store.iceberg import (
    CAPTURES,
    SAMPLES,
    IcebergFleetStore,
    IcebergTables,
    catalog_uri,
    io_properties,
)
from fleetloop_cloud.fleet_store.iceberg_maintenance import IcebergMaintenance
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.storage import S3Settings
from fleetloop_cloud.storage.s3 import S3ObjectStore
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.segment import Segment, new_segment_id

DAY0 = 1_772_352_000 * 1_000_000_000  # 2026-03-01 08:00 UTC


def segment(i: int, rows: int = 200) -> Segment:
    """``rows`` times of three signals (600 samples), 10 s apart per ``i``."""
    t = DAY0 + i * 10_000_000_000 + np.arange(rows, dtype=np.int64) * 10_000_000
    columns = {1: np.full(rows, float(i)), 2: np.arange(rows, dtype=np.int64), 3: np.full(rows, 2.5)}
    types = {1: DataType.FLOAT64, 2: DataType.INT64, 3: DataType.FLOAT64}
    return Segment(new_segment_id(), "g", t, columns, types)


def write(store: Any, seg: Segment, device: str) -> int:
    catalog = Catalog()
    for name, kind in (("Vehicle.Speed", DataType.FLOAT64), ("Vehicle.Gear", DataType.INT64),
                       ("Vehicle.Load", DataType.FLOAT64)):  # fmt: skip
        catalog.add(name, kind)
    return int(store.write_segment(fleet="taxi", device_id=device, capture_id=f"cap-{device}",
                                   campaign="braking", segment=seg, catalog=catalog,
                                   received_unix=DAY0 / 1e9 + 60))  # fmt: skip


def local_tables(root: Path) -> IcebergTables:
    return IcebergTables(catalog_uri(None, root / "metadata.sqlite"), (root / "fleet").as_uri())


def quick() -> TableSettings:
    return TableSettings(format="iceberg", batch_wait_s=0.01)


def _rows(table: Any, n: int) -> pa.Table:
    receipts = [
        [f"car-{i}", f"{i:032x}", 10, "cap", "c", 1, 2, 1.0, "taxi", "2026-03-01", ""] for i in range(n)
    ]
    return iceberg.captures_rows(receipts).cast(table.schema().as_arrow())


def test_the_memoized_transaction_derives_the_metadata_pyiceberg_does_and_follows_each_change(
    tmp_path: Path,
) -> None:
    tables = local_tables(tmp_path)
    table = tables.load(CAPTURES)
    ours, stock = iceberg._AppendTransaction(table), Transaction(table)
    assert ours.table_metadata is table.metadata  # nothing pending: the table's own
    for tx in (ours, stock):
        tx.set_properties({"fleetloop.test": "1"})
    first = ours.table_metadata
    same = {"last_updated_ms", "metadata_log"}  # the clock's reading differs between the two
    assert first.model_dump(exclude=same) == stock.table_metadata.model_dump(exclude=same)
    assert first.properties["fleetloop.test"] == "1"
    assert ours.table_metadata is first  # derived once per change, not on every read
    for tx in (ours, stock):
        _FastAppendFiles(operation=Operation.APPEND, transaction=tx, io=table.io).commit()
    assert ours.table_metadata is not first
    assert ours.table_metadata.snapshots and ours.table_metadata.snapshots[0].summary is not None
    assert [s.parent_snapshot_id for s in ours.table_metadata.snapshots] == [None]
    assert len(stock.table_metadata.snapshots) == 1
    committed = ours.commit_transaction()
    assert committed.metadata.properties["fleetloop.test"] == "1" and committed.current_snapshot() is not None


def test_the_catalog_checks_a_commit_against_the_metadata_it_just_wrote_without_parsing_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyiceberg's SQL catalog loads the table's current metadata on every commit; ours answers from the
    metadata it wrote. If an upgrade renamed the hook, the parse below would run and this fails."""
    root = tmp_path / "ice"
    tables = local_tables(root)
    store = IcebergFleetStore(tables, quick())
    assert write(store, segment(0), "car-1") == 600
    parses: list[str] = []
    parse = iceberg_serializers.FromInputFile.table_metadata

    def counted(input_file: Any, encoding: str = "utf-8") -> Any:
        parses.append(input_file.location)
        return parse(input_file, encoding)

    monkeypatch.setattr(iceberg_serializers.FromInputFile, "table_metadata", staticmethod(counted))
    for i in range(1, 3):
        assert write(store, segment(i), "car-1") == 600
    assert parses == []
    loaded = tables.load(SAMPLES)
    assert loaded.metadata is store._samples.metadata and len(loaded.metadata.snapshots) == 3
    # another catalog (another coordinator) parses what it did not write, and sees the same table
    assert local_tables(root).load(SAMPLES).metadata.model_dump() == loaded.metadata.model_dump()
    assert parses


def test_a_concurrent_snapshot_naming_a_segment_of_the_batch_fails_its_validation(tmp_path: Path) -> None:
    """The keyed append's validation hook is what pyiceberg calls before each commit try; if an upgrade
    stopped calling it (or renamed the commit window), two coordinators would both append a segment."""
    root = tmp_path / "ice"
    seg = segment(1)
    late = IcebergFleetStore(local_tables(root), quick())  # its view of the table predates the commit below
    assert write(IcebergFleetStore(local_tables(root), quick()), seg, "car-1") == 600
    assert write(late, seg, "car-1") == 600
    assert late.counters["conflicts"] == 1 and late.counters["duplicates"] == 1
    assert QueryEngine(root, tables=local_tables(root)).query("SELECT count(*) FROM samples").rows == [(600,)]


def test_the_receipts_index_forgets_what_expired_and_a_retry_is_still_caught_by_the_ledger(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ice"
    repos = open_repositories(root / "metadata.sqlite")
    store = IcebergFleetStore(local_tables(root), quick())
    segs = [segment(i) for i in range(3)]
    for seg in segs:
        assert write(store, seg, "car-1") == 600
    assert len(store._committed) == len(store._batch_of) == 3 and len(store._captured) == 3
    IcebergMaintenance(local_tables(root), repos.segments, quick()).expire(older_than_s=0.0)
    assert repos.segments.totals().segments == 3  # reconciled from the receipts before they expired
    last = segment(9)
    assert write(store, last, "car-1") == 600  # the next commit sees the expiry
    # what is left: the snapshot expiry keeps (the current one then) and the new one
    assert (
        set(store._committed)
        == set(store._batch_of)
        == {f"car-1/{s.segment_id.hex()}" for s in (segs[2], last)}
    )
    assert len(store._captured) == len(store._indexed) == 2
    # a retry of an expired segment is answered by the ledger, before the store (IngestService.segment)
    assert all(repos.segments.has("car-1", s.segment_id) for s in segs)
    repos.close()


def test_on_s3_each_object_is_one_put_and_a_commit_reads_nothing_it_just_wrote(
    tmp_path: Path, s3: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = S3Settings(bucket=s3.bucket, prefix="p", endpoint=s3.url)
    warehouse = S3ObjectStore(settings, area="fleet").location
    tables = IcebergTables(catalog_uri(pg_url, tmp_path / "unused"), warehouse, io_properties(settings))
    store = IcebergFleetStore(tables, quick())
    assert write(store, segment(0), "car-1") == 600  # the tables' first metadata read once
    methods: Counter[str] = Counter()
    take = s3.faults.take

    def counted(method: str) -> str:
        methods[method] += 1
        return str(take(method))

    monkeypatch.setattr(s3.faults, "take", counted)
    for i in range(1, 4):
        assert write(store, segment(i), "car-1") == 600
    # per batch two commits of four objects each (data file, manifest, manifest list, metadata file):
    # one PUT apiece, no multipart upload, no HEAD, no read back of the parent's metadata or manifest list
    assert methods == Counter({"PUT": 3 * 8}), methods
    monkeypatch.setattr(s3.faults, "take", take)
    # the sizes recorded without asking the bucket are the objects' sizes, and other engines read them
    table = IcebergTables(catalog_uri(pg_url, tmp_path / "unused"), warehouse, io_properties(settings)).load(
        SAMPLES
    )
    files = [task.file for task in table.scan().plan_files()]
    stored = S3ObjectStore(settings, area="fleet")
    sizes = {f"{warehouse}/{o.key}": o.size for o in stored.list()}
    assert files and all(sizes[f.file_path] == f.file_size_in_bytes for f in files)
    assert table.scan().to_arrow().num_rows == 4 * 600
    assert tables.load(CAPTURES).scan().to_arrow().num_rows == 4


def test_on_s3_a_file_larger_than_the_spool_streams_and_lands_whole(
    tmp_path: Path, s3: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(iceberg_io, "SPOOL_BYTES", 1024)
    settings = S3Settings(bucket=s3.bucket, prefix="spool", endpoint=s3.url)
    warehouse = S3ObjectStore(settings, area="fleet").location
    tables = IcebergTables(catalog_uri(pg_url, tmp_path / "unused"), warehouse, io_properties(settings))
    table = tables.load(CAPTURES)
    rows = _rows(table, 2000)
    table.append(rows)
    assert tables.load(CAPTURES).scan().to_arrow().num_rows == 2000
    data = [task.file for task in tables.load(CAPTURES).scan().plan_files()]
    assert data and all(f.file_size_in_bytes > 1024 for f in data)


def test_recent_files_are_bounded_and_forgotten_when_deleted() -> None:
    recent = iceberg_io.RecentFiles(max_files=2, max_bytes=10)
    for name in ("a", "b", "c"):
        recent.put(name, pa.py_buffer(b"xyz"))
    assert recent.get("a") is None and recent.get("c") is not None and recent.counters["dropped"] == 1
    recent.put("big", pa.py_buffer(b"x" * 11))  # larger than the whole bound: not kept
    assert recent.get("big") is None
    recent.put("d", pa.py_buffer(b"x" * 9))  # fits only alone: the others go
    assert recent.get("b") is None and recent.get("c") is None and recent.get("d") is not None
    recent.forget("d")
    assert recent.get("d") is None


_OPEN = """
import sys, time
from pathlib import Path
from fleetloop_cloud.fleet_store.iceberg import IcebergTables, catalog_uri
url, warehouse, ready, go = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
tables = IcebergTables(catalog_uri(url, Path(warehouse)), warehouse)
print(tables.samples.metadata.table_uuid, tables.captures.metadata.table_uuid)
tables.close()
"""


def test_three_coordinators_creating_a_new_catalog_at_once_all_open_the_same_tables(
    tmp_path: Path, pg_url: str
) -> None:
    warehouse = (tmp_path / "fleet").as_uri()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN, pg_url, warehouse, str(tmp_path / f"ready-{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(3)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()  # all three imported: they open the empty database together
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    tables = IcebergTables(catalog_uri(pg_url, tmp_path), warehouse)
    expected = f"{tables.samples.metadata.table_uuid} {tables.captures.metadata.table_uuid}"
    tables.close()
    assert [out.strip() for out, _ in results] == [expected] * 3


def test_on_s3_a_file_whose_writing_fails_sends_nothing_when_held_and_ends_its_upload_when_streamed(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = S3Settings(bucket=s3.bucket, prefix="failed", endpoint=s3.url)
    io = iceberg_io.FleetFileIO(io_properties(settings))
    base = S3ObjectStore(settings, area="t").location
    with pytest.raises(RuntimeError), io.new_output(f"{base}/held.avro").create() as out:
        out.write(b"x" * 100)
        raise RuntimeError("the writer failed")
    monkeypatch.setattr(iceberg_io, "SPOOL_BYTES", 10)
    with pytest.raises(RuntimeError), io.new_output(f"{base}/streamed.avro").create() as out:
        out.write(b"y" * 100)
        raise RuntimeError("the writer failed")
    names = {o.key for o in S3ObjectStore(settings, area="t").list()}
    assert "held.avro" not in names  # the streamed one is an object no commit names
    with io.new_output(f"{base}/ok.avro").create() as out:
        out.write(b"z" * 100)
    assert io.new_input(f"{base}/ok.avro").open().read() == b"z" * 100
