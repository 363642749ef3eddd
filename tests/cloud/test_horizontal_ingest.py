"""Exactly once on the cloud side: dedupe by (device, segment id) survives a coordinator restart, and two
coordinators sharing one data directory (metadata + Parquet) store a segment uploaded to both once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.ingest import IngestAck
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import MalformedMessageError
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

LOCAL = Caller.local()


def device(device_id: str) -> Caller:
    return Caller.device(device_id, transport="test", proven=True)


def hello(c: Coordinator, h: device_pb2.Hello) -> None:
    c.devices.connect(device(h.device_id), h, time.time())


def ingest(c: Coordinator, device_id: str, sid: bytes, capture: str, data: bytes) -> IngestAck:
    request = ingest_pb2.UploadSegmentRequest(
        device_id=device_id, segment_id=sid, capture_id=capture, campaign="c", priority=5, segment=data
    )
    return c.ingest.segment(device(device_id), request, time.time())


def _hello(device_id: str) -> device_pb2.Hello:
    h = device_pb2.Hello(device_id=device_id, fleet="test", labels={"kind": "car"}, data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    return h


def _segment(start_ns: int, rows: int = 50) -> tuple[bytes, bytes]:
    sid = new_segment_id()
    seg = Segment(
        segment_id=sid,
        group="speed",
        t_ns=np.arange(start_ns, start_ns + rows * 10_000_000, 10_000_000, dtype=np.int64),
        columns={1: np.linspace(0, 100, rows)},
        data_types={1: DataType.FLOAT64},
    )
    return sid, encode_segment(seg)


def _rows(c: Coordinator) -> tuple[int, int]:
    sql = "SELECT count(*), count(DISTINCT (device_id, signal, t_ns)) FROM samples"
    r = c.queries.sql(LOCAL, sql).rows[0]
    return int(r[0]), int(r[1])


def test_dedupe_survives_a_coordinator_restart(tmp_path: Path) -> None:
    t0 = 1_700_000_000 * 10**9
    first = Coordinator(tmp_path / "cloud")
    hello(first, _hello("car-1"))
    sid, data = _segment(t0)
    assert not ingest(first, "car-1", sid, "cap-1", data).duplicate
    del first  # a crash: nothing flushed beyond what ingest already made durable
    second = Coordinator(tmp_path / "cloud")
    ack = ingest(second, "car-1", sid, "cap-1", data)
    assert ack.duplicate and ack.samples == 0
    assert _rows(second) == (50, 50)


def test_two_coordinators_sharing_storage_store_each_segment_once(tmp_path: Path) -> None:
    a = Coordinator(tmp_path / "cloud")
    b = Coordinator(tmp_path / "cloud")
    t0 = 1_700_000_000 * 10**9
    devices = [f"car-{i}" for i in range(6)]
    for i, d in enumerate(devices):
        hello(a if i % 2 else b, _hello(d))
    uploads = [(d, *_segment(t0 + k * 10**9)) for d in devices for k in range(5)]
    errors: list[BaseException] = []

    def send(c: Coordinator, items: list[tuple[str, bytes, bytes]]) -> None:
        try:
            for device, sid, data in items:
                ingest(c, device, sid, f"{device}-cap", data)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    # Every segment goes to both coordinators at once: a device retrying on the other one after a
    # timeout, while the first is still writing.
    threads = [threading.Thread(target=send, args=(c, uploads)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _rows(a) == (len(uploads) * 50, len(uploads) * 50)
    assert a.queries.summary(LOCAL, time.time()).segments_ingested == len(uploads)


def test_a_segment_of_several_groups_is_checked_and_dated_over_all_of_them(tmp_path: Path) -> None:
    """Format 4: groups sharing a clock travel in one segment; every group's signals are checked against
    the catalog and the capture's time range covers every group."""
    from fleetloop_shared.segment import bundle_segments

    c = Coordinator(tmp_path / "cloud")
    h = _hello("car-1")
    h.catalog.add(id=2, path="Vehicle.Gear", data_type=device_pb2.DATA_TYPE_INT64)
    hello(c, h)
    t0 = 1_700_000_000 * 10**9
    speed = Segment(new_segment_id(), "speed", t0 + np.arange(50, dtype=np.int64) * 10**7,
                    {1: np.linspace(0, 100, 50)}, {1: DataType.FLOAT64})
    gear = Segment(new_segment_id(), "gear", t0 + 10**9 + np.arange(20, dtype=np.int64) * 10**7,
                   {2: np.arange(20, dtype=np.int64) % 6}, {2: DataType.INT64})
    (both,) = list(bundle_segments([speed, gear]))
    assert len(both.groups()) == 2
    ack = ingest(c, "car-1", both.segment_id, "cap-1", encode_segment(both))
    assert ack.samples == 70
    (capture,) = c.repositories.segments.captures()
    assert (capture.first_ns, capture.last_ns) == (t0, t0 + 10**9 + 19 * 10**7)
    bad_gear = Segment(new_segment_id(), "gear", gear.t_ns, {9: gear.columns[2]}, {9: DataType.INT64})
    again = Segment(new_segment_id(), "speed", speed.t_ns, speed.columns, speed.data_types)
    (bad,) = list(bundle_segments([again, bad_gear]))  # a bundle takes its first segment's id
    with pytest.raises(MalformedMessageError, match="names signal id 9 unknown to device car-1"):
        ingest(c, "car-1", bad.segment_id, "cap-2", encode_segment(bad))
