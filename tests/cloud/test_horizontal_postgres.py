"""Horizontal scale-out: two coordinator processes sharing one PostgreSQL and one Parquet directory,
simulated devices spread across them — every acknowledged sample stored once."""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.coordinator import Coordinator
from fleetloop_fwsim.fleet import CoordinatorProcess, SimFleet, store_counts
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2

_spec = importlib.util.spec_from_file_location(
    "fleetloop_test_postgres", Path(__file__).resolve().parents[1] / "fixtures" / "postgres_server.py"
)
assert _spec is not None and _spec.loader is not None
pg_fixture = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pg_fixture
_spec.loader.exec_module(pg_fixture)


@pytest.fixture
def pg_url() -> Iterator[str]:
    if pg_fixture.pg_bin_dir() is None:
        pytest.fail("PostgreSQL is not installed; .ci/run installs it (apt-get install postgresql)")
    with pg_fixture.private_postgres() as url:
        yield url


def test_two_coordinator_processes_share_postgres_and_parquet(
    tmp_path: Path, recordings: Path, pg_url: str
) -> None:
    shared = tmp_path / "cloud"
    a = CoordinatorProcess(shared, log_path=tmp_path / "a.log", extra_args=["--db", pg_url])
    b = CoordinatorProcess(shared, log_path=tmp_path / "b.log", extra_args=["--db", pg_url])
    a.start()
    b.start()  # after a: the data directory's keys exist by then
    fleet = SimFleet([a.grpc_target, b.grpc_target], 6, tmp_path / "devices", recordings=recordings)
    try:
        fleet.start()
        threading.Event().wait(4.0)
        fleet.stop_producing()
        assert fleet.drain(timeout_s=60)
        totals = fleet.totals()
        assert totals["acknowledged_samples"] > 0
        for coordinator in (a, b):  # both see the whole fleet's data
            ingested, duplicates = store_counts(coordinator)
            assert ingested == totals["acknowledged_samples"] and duplicates == 0
        devices = a.query("SELECT count(DISTINCT device_id) FROM samples")[0][0]
        assert devices == 6
    finally:
        fleet.close()
        a.stop()
        b.stop()


def test_a_segment_sent_to_both_coordinators_at_once_is_stored_once(tmp_path: Path, pg_url: str) -> None:
    a = Coordinator(tmp_path / "cloud", db=pg_url)
    b = Coordinator(tmp_path / "cloud", db=pg_url)
    h = device_pb2.Hello(device_id="car-1", fleet="test", data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    a.on_hello(h)
    t0 = 1_700_000_000 * 10**9
    uploads = []
    for k in range(20):
        seg = Segment(
            new_segment_id(), "g", np.arange(t0 + k * 10**9, t0 + k * 10**9 + 50, dtype=np.int64),
            {1: np.arange(50, dtype=np.float64)}, {1: DataType.FLOAT64},
        )  # fmt: skip
        uploads.append((seg.segment_id, encode_segment(seg)))
    fresh: list[bool] = []

    def send(c: Coordinator) -> None:
        for sid, data in uploads:
            fresh.append(not c.ingest("car-1", sid, "cap", "c", 5, data).duplicate)

    threads = [threading.Thread(target=send, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.summary()["segments_ingested"] == 20 == b.summary()["segments_ingested"]
    assert a.query("SELECT count(*) FROM samples").rows[0][0] == 20 * 50
    assert a.metadata.captures()[0].segments == 20
