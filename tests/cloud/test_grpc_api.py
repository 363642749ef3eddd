"""The device-facing gRPC surface, over real gRPC on loopback."""

from __future__ import annotations

import time
from typing import Any as RunningCoordinator

import grpc
import numpy as np
import pytest

from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2, ingest_pb2_grpc
from tests.fixtures.control_stream import ControlStream

LOCAL = Caller.local()
CAMPAIGN = """
apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: fast, version: 1}
spec:
  target: {selector: "kind=car"}
  trigger: {when: "Vehicle.Speed > 50", mode: rising, min_interval: 10s}
  collect: {signals: ["Vehicle.*"], pre: 1s, post: 1s}
  priority: 5
"""


def hello(device_id: str = "car-1", kind: str = "car") -> device_pb2.DeviceMessage:
    h = device_pb2.Hello(device_id=device_id, fleet="test", labels={"kind": kind}, data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    h.catalog.add(id=2, path="Vehicle.Gear", data_type=device_pb2.DATA_TYPE_INT64)
    return device_pb2.DeviceMessage(hello=h)


def segment() -> Segment:
    t = np.arange(0, 10_000_000_000, 100_000_000, dtype=np.int64) + 1_700_000_000_000_000_000
    return Segment(
        segment_id=new_segment_id(),
        group="can0/SPEED",
        t_ns=t,
        columns={1: np.linspace(0.0, 90.0, len(t)), 2: np.full(len(t), 3, dtype=np.int64)},
        data_types={1: DataType.FLOAT64, 2: DataType.INT64},
    )


def test_hello_gets_welcome_and_matching_campaigns(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator
    rc.coordinator.campaigns.apply(LOCAL, CAMPAIGN, source="fast.yaml", now=time.time())
    car = ControlStream(rc.channel, hello("car-1", "car"))
    robot = ControlStream(rc.channel, hello("robot-1", "robot"))
    try:
        assert car.next("welcome").welcome.heartbeat_interval_ms > 0
        desired = car.next("desired_campaigns").desired_campaigns
        assert [c.name for c in desired.campaigns] == ["fast"]
        assert [c.name for c in robot.next("desired_campaigns").desired_campaigns.campaigns] == []
        # a new campaign version is pushed to connected devices
        rc.coordinator.campaigns.apply(
            LOCAL, CAMPAIGN.replace("> 50", "> 60"), source="fast.yaml", now=time.time()
        )
        pushed = car.next("desired_campaigns").desired_campaigns
        assert pushed.version > desired.version and "> 60" in pushed.campaigns[0].document
    finally:
        car.close()
        robot.close()


def test_first_message_must_be_hello(running_coordinator: RunningCoordinator) -> None:
    s = ControlStream(running_coordinator.channel, device_pb2.DeviceMessage(heartbeat=device_pb2.Heartbeat()))
    assert s.ended.wait(5)
    assert s.error is not None and s.error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_upload_is_acked_once_and_deduplicated(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator
    car = ControlStream(rc.channel, hello())
    car.next("welcome")
    stub = ingest_pb2_grpc.IngestServiceStub(rc.channel)
    seg = segment()
    req = ingest_pb2.UploadSegmentRequest(
        device_id="car-1",
        segment_id=seg.segment_id,
        capture_id="cap-1",
        campaign="fast",
        priority=5,
        segment=encode_segment(seg),
    )
    first = stub.UploadSegment(req, timeout=10)
    again = stub.UploadSegment(req, timeout=10)
    car.close()
    assert first.duplicate is False and first.samples == seg.sample_count
    assert again.duplicate is True
    rows = rc.coordinator.queries.sql(
        LOCAL, "SELECT signal, count(*) AS n FROM samples GROUP BY signal ORDER BY signal"
    ).rows
    assert rows == [("Vehicle.Gear", 100), ("Vehicle.Speed", 100)]


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda r: setattr(r, "segment", r.segment[:-5]), grpc.StatusCode.DATA_LOSS),
        (lambda r: setattr(r, "segment", b"garbage" * 10), grpc.StatusCode.DATA_LOSS),
        (lambda r: setattr(r, "segment_id", b"short"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r, "device_id", "stranger"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_bad_uploads_are_refused_with_a_code(
    running_coordinator: RunningCoordinator, mutate: object, code: grpc.StatusCode
) -> None:
    rc = running_coordinator
    car = ControlStream(rc.channel, hello())
    car.next("welcome")
    seg = segment()
    req = ingest_pb2.UploadSegmentRequest(
        device_id="car-1",
        segment_id=seg.segment_id,
        capture_id="c",
        campaign="x",
        segment=encode_segment(seg),
    )
    assert callable(mutate)
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        ingest_pb2_grpc.IngestServiceStub(rc.channel).UploadSegment(req, timeout=10)
    car.close()
    assert info.value.code() == code
    assert rc.coordinator.queries.summary(LOCAL, time.time()).segments_ingested == 0
