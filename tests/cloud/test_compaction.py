"""Compaction of the fleet store, against real Parquet files, a real metadata store and real DuckDB.

What must hold: every acknowledged row is queryable exactly once before, during and after compaction,
also when a segment is uploaded again after its file was compacted, when a pass crashes half-way, and
when ingest runs while compaction commits.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from fleetloop_cloud import server as server_module
from fleetloop_cloud.fleet_store import query as query_module
from fleetloop_cloud.fleet_store.compaction import CompactionPolicy, Compactor
from fleetloop_cloud.fleet_store.parquet import (
    ABSORBED_KEY,
    COMPACTED_FILE,
    SEGMENT_FILE,
    FleetStore,
    absorbed_by,
)
from fleetloop_cloud.repositories.records import SegmentReceipt
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

LOCAL = Caller.local()
START_NS = int(dt.datetime(2018, 8, 2, 8, 34, 47, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
EAGER = CompactionPolicy(min_files=2, min_age_s=0.0, grace_s=0.0)
COUNT_SQL = (
    "SELECT count(*), count(DISTINCT (device_id, signal, t_ns)), sum(value), sum(value_int) FROM samples"
)


def say_hello(c: Coordinator, h: device_pb2.Hello) -> None:
    c.devices.connect(Caller.device(h.device_id, transport="test", proven=True), h, time.time())


def hello(device_id: str) -> device_pb2.Hello:
    h = device_pb2.Hello(device_id=device_id, fleet="taxi", data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="m/s")
    h.catalog.add(id=2, path="Vehicle.Gear", data_type=device_pb2.DATA_TYPE_INT64)
    return h


def segment(i: int, rows: int = 200, t0: int = START_NS) -> Segment:
    t = t0 + i * rows * 10_000_000 + np.arange(rows, dtype=np.int64) * 10_000_000
    speed = np.sin(np.arange(rows) / 7.0 + i) * 30 + 30
    gear = (np.arange(rows, dtype=np.int64) // 40 + i) % 6
    return Segment(new_segment_id(), "can0", t, {1: speed, 2: gear}, {1: DataType.FLOAT64, 2: DataType.INT64})


@pytest.fixture
def cloud(tmp_path: Path) -> Coordinator:
    c = Coordinator(tmp_path / "cloud")
    for d in ("car-1", "car-2"):
        say_hello(c, hello(d))
    return c


def ingest(c: Coordinator, device: str, seg: Segment) -> tuple[int, bool]:
    request = ingest_pb2.UploadSegmentRequest(
        device_id=device, segment_id=seg.segment_id, capture_id=f"cap-{device}", campaign="braking",
        priority=5, segment=encode_segment(seg),
    )  # fmt: skip
    ack = c.ingest.segment(Caller.device(device, transport="test", proven=True), request, time.time())
    return ack.samples, ack.duplicate


def files(c: Coordinator) -> tuple[list[Path], list[Path]]:
    every = sorted((c.data_dir / "fleet" / "samples").rglob("*.parquet"))
    small = [p for p in every if SEGMENT_FILE.match(p.name)]
    return small, [p for p in every if COMPACTED_FILE.match(p.name)]


def counts(c: Coordinator) -> tuple[int, int, float, int]:
    row = c.queries.sql(LOCAL, COUNT_SQL).rows[0]
    # sum() over no rows is NULL: a compaction pass may look before the first upload landed
    return int(row[0]), int(row[1]), round(float(row[2] or 0.0), 6), int(row[3] or 0)


def compactor(c: Coordinator, policy: CompactionPolicy = EAGER) -> Compactor:
    return Compactor(c.fleet_store, c.repositories.segments.has, policy)


def test_compaction_replaces_small_files_and_keeps_every_row_once(cloud: Coordinator) -> None:
    segs = {d: [segment(i + 100 * n) for i in range(12)] for n, d in enumerate(("car-1", "car-2"))}
    acked = sum(ingest(cloud, d, s)[0] for d, ss in segs.items() for s in ss)
    small, _ = files(cloud)
    assert len(small) == 24
    before = counts(cloud)
    assert before[0] == before[1] == acked == 24 * 200 * 2

    report = compactor(cloud).run_once()

    small, compacted = files(cloud)
    assert report.files_absorbed == 24 and report.files_written == 1 and report.rows == acked
    assert small == [] and len(compacted) == 1
    assert counts(cloud) == before
    # the compacted file: plain Parquet, sorted like the store, naming what it absorbed
    table = pq.ParquetFile(compacted[0]).read()
    assert table.num_rows == acked
    keys = list(zip(table["device_id"].to_pylist(), table["signal"].to_pylist(), table["t_ns"].to_pylist(),
                    strict=True))
    assert keys == sorted(keys)
    assert len(absorbed_by(compacted[0])) == 24
    assert ABSORBED_KEY in (pq.read_schema(compacted[0]).metadata or {})
    # a second pass has nothing to do
    again = compactor(cloud).run_once()
    assert again.files_written == 0 and counts(cloud) == before


def test_a_retried_upload_of_a_compacted_segment_adds_no_rows(cloud: Coordinator) -> None:
    segs = [segment(i) for i in range(5)]
    for s in segs:
        ingest(cloud, "car-1", s)
    before = counts(cloud)
    compactor(cloud).run_once()
    assert files(cloud)[0] == []
    # the device never saw the ack and retries: the metadata row answers "duplicate"
    assert ingest(cloud, "car-1", segs[2]) == (0, True)
    # and even a write that got past that check (a retry racing the first upload) leaves the store as is
    cat = cloud.repositories.devices.catalog("car-1")
    samples = cloud.fleet_store.write_segment(fleet="taxi", device_id="car-1", capture_id="cap-car-1",
                                              campaign="braking", segment=segs[2], catalog=cat,
                                              received_unix=time.time())
    assert samples == 400
    assert files(cloud)[0] == []
    assert counts(cloud) == before


def test_another_process_sees_the_compaction_before_it_writes(cloud: Coordinator) -> None:
    # Two coordinators sharing one data directory: the second one's FleetStore cached "nothing absorbed".
    other = FleetStore(cloud.data_dir / "fleet")
    segs = [segment(i) for i in range(4)]
    for s in segs[:3]:
        ingest(cloud, "car-1", s)
    cat = cloud.repositories.devices.catalog("car-1")

    def write(store: FleetStore, seg: Segment) -> None:
        store.write_segment(fleet="taxi", device_id="car-1", capture_id="cap-car-1", campaign="braking",
                            segment=seg, catalog=cat, received_unix=time.time())

    write(other, segs[3])  # fills the other store's cache for this partition (generation 0)
    receipt = SegmentReceipt(capture_id="cap-car-1", campaign="braking", priority=5, samples=400, first_ns=0,
                             last_ns=0)  # fmt: skip
    cloud.repositories.segments.record("car-1", segs[3].segment_id, receipt, time.time())
    before = counts(cloud)
    compactor(cloud).run_once()
    write(other, segs[0])  # the generation moved: it re-reads the absorbed names and writes nothing
    assert files(cloud)[0] == []
    assert counts(cloud) == before


def test_only_acknowledged_old_enough_files_in_numbers_are_compacted(cloud: Coordinator) -> None:
    for i in range(3):
        ingest(cloud, "car-1", segment(i))
    # a file whose metadata row is missing (a crash between the file and the row): not acknowledged
    orphan = segment(50)
    cloud.fleet_store.write_segment(fleet="taxi", device_id="car-1", capture_id="x", campaign="braking",
                                    segment=orphan, catalog=cloud.repositories.devices.catalog("car-1"),
                                    received_unix=time.time())
    assert compactor(cloud, CompactionPolicy(min_files=2, min_age_s=3600)).run_once().files_written == 0
    assert compactor(cloud, CompactionPolicy(min_files=4, min_age_s=0)).run_once().files_written == 0
    report = compactor(cloud).run_once()
    assert report.files_absorbed == 3
    small, _ = files(cloud)
    assert [p.name for p in small] == [f"car-1-{orphan.segment_id.hex()}.parquet"]
    # the device retries the orphan: stored and recorded as usual, then compacted by a later pass
    assert ingest(cloud, "car-1", orphan) == (400, False)
    assert counts(cloud)[0] == counts(cloud)[1] == 4 * 400
    compactor(cloud, CompactionPolicy(min_files=1, min_age_s=0, grace_s=0)).run_once()
    assert files(cloud)[0] == [] and len(files(cloud)[1]) == 2
    assert counts(cloud)[0] == 4 * 400


def test_a_pass_that_stopped_after_its_commit_is_finished_and_never_double_counts(
    cloud: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(6):
        ingest(cloud, "car-2", segment(i))
    before = counts(cloud)
    # grace_s keeps the absorbed files on disk after the commit, as a crash right after it would
    report = compactor(cloud, CompactionPolicy(min_files=2, min_age_s=0, grace_s=3600)).run_once()
    small, compacted = files(cloud)
    assert report.files_written == 1 and len(small) == 6 and len(compacted) == 1
    assert counts(cloud) == before  # the query leaves the absorbed files out
    # a stray temporary file of a crashed write is ignored by everyone
    (compacted[0].parent / ".compacted-0123.parquet.abc.tmp").write_bytes(b"partial")
    assert counts(cloud) == before
    # still within the grace period: nothing deleted, nothing compacted again
    assert compactor(cloud, CompactionPolicy(min_files=2, min_age_s=0, grace_s=3600)).run_once().rows == 0
    assert len(files(cloud)[0]) == 6
    # after it: the leftovers go
    report = compactor(cloud).run_once()
    assert report.leftovers_deleted == 6 and report.files_written == 0
    assert files(cloud)[0] == [] and counts(cloud) == before


def test_a_compacted_file_committed_after_the_query_listed_the_files_is_left_out(
    cloud: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        ingest(cloud, "car-1", segment(i))
    before = counts(cloud)
    compactor(cloud, CompactionPolicy(min_files=2, min_age_s=0, grace_s=3600)).run_once()
    # a query whose listing predates the commit: it knows no compacted file and no absorbed one
    listing = query_module.parquet_files

    def before_commit(root: Path, absorbed: Callable[[str, int], tuple[str, ...]]) -> list[Any]:
        return [f for f in listing(root, lambda path, mtime: ()) if "/compacted-" not in f[0]]

    monkeypatch.setattr(query_module, "parquet_files", before_commit)
    assert counts(cloud) == before


def test_ingest_while_compacting_is_exactly_once(cloud: Coordinator) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    acked: dict[str, int] = {}
    segs = [segment(i, rows=100) for i in range(120)]

    def device(name: str, mine: list[Segment]) -> None:
        try:
            for s in mine:
                samples, dup = ingest(cloud, name, s)
                assert not dup
                acked[name] = acked.get(name, 0) + samples
                assert ingest(cloud, name, s) == (0, True)  # every upload retried once
        except BaseException as exc:
            errors.append(exc)

    def compact() -> None:
        try:
            c = compactor(cloud, CompactionPolicy(min_files=3, min_age_s=0, grace_s=0))
            while not stop.is_set():
                c.run_once()
                total, distinct, _, _ = counts(cloud)
                assert total == distinct
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=device, args=("car-1", segs[:60])),
               threading.Thread(target=device, args=("car-2", segs[60:]))]
    compacting = threading.Thread(target=compact)
    compacting.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    compacting.join(timeout=60)
    assert errors == []
    compactor(cloud, CompactionPolicy(min_files=1, min_age_s=0, grace_s=0)).run_once()
    total, distinct, _, _ = counts(cloud)
    assert total == distinct == sum(acked.values()) == 120 * 100 * 2
    assert files(cloud)[0] == []


def test_real_drive_compacts_losslessly(tmp_path: Path, recordings: Path) -> None:
    base = comma2k19_segment(recordings) / "processed_log" / "CAN" / "speed"
    t = np.load(base / "t")
    v = np.load(base / "value").reshape(-1).astype(np.float64)
    t_ns = START_NS + np.round((t - t[0]) * 1e9).astype(np.int64)
    c = Coordinator(tmp_path / "cloud")
    say_hello(c, hello("car-1"))
    chunks = np.array_split(np.arange(len(t_ns)), 20)
    for idx in chunks:
        seg = Segment(new_segment_id(), "can0", t_ns[idx], {1: v[idx]}, {1: DataType.FLOAT64})
        ingest(c, "car-1", seg)
    sql = "SELECT t_ns, value FROM samples ORDER BY t_ns"
    before = c.queries.sql(LOCAL, sql, max_rows=1_000_000).rows
    size_before = sum(p.stat().st_size for p in files(c)[0])
    report = compactor(c).run_once()
    assert report.files_absorbed == 20 and report.rows == len(t_ns)
    assert c.queries.sql(LOCAL, sql, max_rows=1_000_000).rows == before
    assert report.bytes_after < size_before


def test_the_coordinator_compacts_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "COMPACTION_INTERVAL_S", 0.2)
    c = Coordinator(tmp_path / "cloud")
    c.compactor.policy = CompactionPolicy(min_files=2, min_age_s=0, grace_s=0)
    say_hello(c, hello("car-1"))
    for i in range(3):
        ingest(c, "car-1", segment(i))
    c.start()
    try:
        deadline = time.monotonic() + 120  # generous: a loaded machine may be slow, a pass is not
        while files(c)[0] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        c.stop()
    assert files(c)[0] == [] and len(files(c)[1]) == 1
    assert c.queries.sql(LOCAL, "SELECT count(*) FROM samples").rows[0][0] == 3 * 400


def test_lock_files_stay_out_of_the_samples_tree(cloud: Coordinator) -> None:
    for i in range(2):
        ingest(cloud, "car-1", segment(i))
    compactor(cloud).run_once()
    samples = cloud.data_dir / "fleet" / "samples"
    assert all(p.suffix == ".parquet" for p in samples.rglob("*") if p.is_file())
    locks = list((cloud.data_dir / "fleet" / "compaction").rglob("*.lock"))
    assert [p.relative_to(cloud.data_dir / "fleet" / "compaction").as_posix() for p in locks] == [
        "fleet=taxi/date=2018-08-02.lock"
    ]
    assert int(locks[0].read_text()) == 1
    assert os.access(locks[0], os.R_OK)


def test_files_from_before_text_signals_query_and_compact_with_new_ones(cloud: Coordinator) -> None:
    """Segment files written before ``value_str`` existed: queried alone (value_str NULL), and compacted
    together with new files carrying text, every row once."""
    for i in range(4):
        ingest(cloud, "car-1", segment(i))
    small, _ = files(cloud)
    for path in small:  # what the previous release wrote: the same rows without the text column
        pq.write_table(pq.read_table(path).drop(["value_str"]), path)
    assert "value_str" not in pq.read_schema(small[0]).names
    before = counts(cloud)
    no_text = "SELECT count(*) FROM samples WHERE value_str IS NULL"
    assert cloud.queries.sql(LOCAL, no_text).rows[0][0] == before[0]

    h = hello("car-3")
    h.catalog.add(id=3, path="Vehicle.Mode", data_type=device_pb2.DATA_TYPE_STRING)
    say_hello(cloud, h)
    t = START_NS + 10**12 + np.arange(3, dtype=np.int64) * 10**9
    text = Segment(new_segment_id(), "mode", t, {3: np.asarray(["eco", "", "sport"], dtype=object)},
                   {3: DataType.STRING})
    assert ingest(cloud, "car-3", text) == (3, False)
    report = compactor(cloud).run_once()
    assert report.files_written >= 1
    total, distinct, _, _ = counts(cloud)
    assert (total, distinct) == (before[0] + 3, before[1] + 3)
    sql = "SELECT value_str FROM samples WHERE signal = 'Vehicle.Mode' ORDER BY t_ns"
    modes = cloud.queries.sql(LOCAL, sql).rows
    assert [r[0] for r in modes] == ["eco", "", "sport"]
