"""Horizontal scale-out: two coordinator processes sharing one PostgreSQL and one Parquet directory,
simulated devices spread across them — every acknowledged sample stored once. The PostgreSQL server
and a fresh database per test come from conftest.py (``pg_url``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.fleet import CoordinatorProcess, SimFleet, store_counts
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

#: How long a step may take on a loaded machine (two shared cores, other suites running) before the test
#: gives up; the test waits for what it needs, never for a fixed time.
DEADLINE_S = 180.0
LOCAL = Caller.local()


def wait_for(what: str, done: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


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
        everyone = {agent.device_id for agent in fleet.agents}
        # Every device's data reaches one coordinator or the other, however slow the machine is today.
        wait_for(
            "every device to have a segment acknowledged",
            lambda: {device for device, _ in fleet.acked_segments()} == everyone,
        )
        fleet.stop_producing()
        assert fleet.drain(timeout_s=DEADLINE_S)
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
    car = Caller.device("car-1", transport="test", proven=True)
    a.devices.connect(car, h, time.time())
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
            request = ingest_pb2.UploadSegmentRequest(
                device_id="car-1", segment_id=sid, capture_id="cap", campaign="c", priority=5, segment=data
            )
            fresh.append(not c.ingest.segment(car, request, time.time()).duplicate)

    threads = [threading.Thread(target=send, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.queries.summary(LOCAL, time.time()).segments_ingested == 20
    assert b.queries.summary(LOCAL, time.time()).segments_ingested == 20
    assert a.queries.sql(LOCAL, "SELECT count(*) FROM samples").rows[0][0] == 20 * 50
    assert a.repositories.segments.captures()[0].segments == 20
    assert sum(fresh) == 20  # each segment stored once, the other upload answered "duplicate"
