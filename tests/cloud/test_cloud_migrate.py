"""``fleetloop cloud migrate``: a data directory made by the Parquet fleet store (segments ingested
through the coordinator, some compacted with leftovers absorbed but not yet deleted) becomes Iceberg
tables that answer every query as before; a second run copies nothing twice; ingest goes on into the
tables afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fleetloop_cloud.fleet_store.compaction import CompactionPolicy, Compactor
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment
from fleetloop_shared.wire import device_pb2, ingest_pb2

SAMPLES = "SELECT * FROM samples ORDER BY fleet, date, device_id, signal, t_ns"
CAPTURES = "SELECT * FROM captures ORDER BY capture_id, device_id"
T0 = 1_772_352_000 * 10**9  # 2026-03-01T08:00:00Z


def connect(c: Coordinator, device: str, fleet: str) -> Caller:
    caller = Caller.device(device, transport="test", proven=True)
    hello = device_pb2.Hello(device_id=device, fleet=fleet, labels={"kind": "car"}, data_origin="recordings")
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    hello.catalog.add(id=2, path="Vehicle.Gear", data_type=device_pb2.DATA_TYPE_INT64)
    c.devices.connect(caller, hello, time.time())
    return caller


def upload(c: Coordinator, caller: Caller, device: str, i: int) -> tuple[int, bool]:
    rows = 300
    t = T0 + (i % 2) * 86_400 * 10**9 + i * 10**10 + np.arange(rows, dtype=np.int64) * 10**7
    rng = np.random.default_rng(i)
    seg = Segment(i.to_bytes(16, "big"), "g", t, {1: rng.normal(50, 9, rows), 2: rng.integers(0, 6, rows)},
                  {1: DataType.FLOAT64, 2: DataType.INT64})  # fmt: skip
    request = ingest_pb2.UploadSegmentRequest(
        device_id=device, segment_id=seg.segment_id, capture_id=f"cap-{i % 4}", campaign="braking",
        priority=3,
        segment=encode_segment(seg),
    )  # fmt: skip
    ack = c.ingest.segment(caller, request, T0 / 1e9 + 5 * 86_400)
    return ack.samples, ack.duplicate


def migrate(data_dir: Path) -> dict[str, int]:
    command = [sys.executable, "-m", "fleetloop_cli.main", "cloud", "migrate", "--dir", str(data_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out.pop("data_dir") == str(data_dir)
    return {k: int(v) for k, v in out.items()}


def test_a_parquet_data_dir_becomes_iceberg_tables_that_answer_alike(tmp_path: Path) -> None:
    data_dir = tmp_path / "cloud"
    today = Coordinator(data_dir)  # today's code: the Parquet layout
    callers = {d: connect(today, d, f) for d, f in (("car-1", "taxi"), ("car-2", "taxi"), ("bus-1", "bus"))}
    for i in range(24):
        device = ("car-1", "car-2", "bus-1")[i % 3]
        assert upload(today, callers[device], device, i) == (600, False)
    # compacted, the absorbed segment files still there (within their grace period)
    report = Compactor(today.fleet_store, today.repositories.segments.has,
                       CompactionPolicy(min_files=2, min_age_s=0, grace_s=3600)).run_once()  # fmt: skip
    assert report.files_absorbed > 0
    local = Caller.local()
    samples, captures = (
        today.queries.sql(local, SAMPLES, max_rows=100_000),
        today.queries.sql(local, CAPTURES),
    )
    assert len(samples.rows) == 24 * 600
    today.stop()
    today.close()
    # files written before times were clock-corrected have no clock_offset_ns column: strip it, as the
    # release before wrote them (the compacted file keeps its list of absorbed files)
    for path in (data_dir / "fleet").rglob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["clock_offset_ns"]), path)

    # two fleets, two days each
    assert migrate(data_dir) == {"partitions": 4, "partitions_skipped": 0, "rows": 24 * 600, "captures": 12,
                                 "artifacts": 0}
    assert migrate(data_dir) == {"partitions": 0, "partitions_skipped": 4, "rows": 0, "captures": 0,
                                 "artifacts": 0}

    tables = TableSettings(format="iceberg", batch_wait_s=0)
    iceberg = Coordinator(data_dir, tables=tables)
    try:
        assert iceberg.queries.sql(local, SAMPLES, max_rows=100_000).rows == samples.rows
        assert iceberg.queries.sql(local, CAPTURES).rows == captures.rows
        # ingest goes on into the tables; an upload ingested before is still a duplicate
        caller = connect(iceberg, "car-1", "taxi")
        assert upload(iceberg, caller, "car-1", 99) == (600, False)
        assert upload(iceberg, caller, "car-1", 0) == (0, True)
        assert iceberg.queries.sql(local, "SELECT count(*) FROM samples").rows == [(25 * 600,)]
        assert iceberg.queries.sql(local, "SELECT sum(samples) FROM captures").rows == [(25 * 600,)]
    finally:
        iceberg.stop()
        iceberg.close()
