"""A device whose clock is 37 s ahead, over each transport: the agent measures its offset over the control
stream, every upload carries it, and the cloud stores the samples on its own clock (within a few ms of
the truth) with the offset beside them. An offset that cannot be true is refused, recorded and counted,
and the times are then stored as the device stamped them. A cloud from before the exchange gets no pings.

Real gRPC on loopback, a private mosquitto, the in-memory transport against a real coordinator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.memory_transport import MemoryTransport
from fleetloop_agent.uplink.mqtt_transport import MqttSettings, MqttTransport
from fleetloop_agent.uplink.transport import UplinkTransport
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.mqtt_bridge import BridgeSettings, MqttBridge
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.uploads.clock_check import (
    APPLIED,
    FUTURE_SLACK_NS,
    MAX_OFFSET_NS,
    REFUSED,
    UNMEASURED,
    judge,
)
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2, ingest_pb2_grpc
from tests.agent.test_uplink_link import CoordinatorCloud
from tests.fixtures import mosquitto_broker
from tests.fixtures.waiting import wait_for

S = 1_000_000_000
MS = 1_000_000
SKEW_NS = 37 * S
LOCAL = Caller.local()


def skewed() -> int:
    """The device's clock: 37 s ahead of the machine's (the cloud's)."""
    return time.time_ns() + SKEW_NS


def hello(device_id: str) -> device_pb2.DeviceMessage:
    h = device_pb2.Hello(device_id=device_id, fleet="test", data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    return device_pb2.DeviceMessage(hello=h)


def captured_now(rows: int = 200) -> tuple[Segment, int]:
    """A segment stamped by the skewed device clock over the last 200 ms; and its first sample's true
    (cloud-clock) time."""
    device_now = skewed()
    t = device_now - rows * MS + np.arange(rows, dtype=np.int64) * MS
    seg = Segment(new_segment_id(), "speed", t, {1: np.linspace(0.0, 50.0, rows)}, {1: DataType.FLOAT64})
    return seg, int(t[0]) - SKEW_NS


def run_device(transport: UplinkTransport, tmp: Path, coordinator: Coordinator, device_id: str) -> None:
    """A skewed device uploads one segment; the cloud must store it on the cloud's clock."""
    store = LocalStore(tmp / f"store-{device_id}")
    seg, true_first = captured_now()
    store.append(seg, capture_id="cap", campaign="c", priority=5, now_ns=skewed())
    metrics = AgentMetrics()
    link = Link(
        transport, device_id=device_id, store=store, metrics=metrics,
        greeting=lambda: [hello(device_id)], on_message=lambda m: None, upload_deadline_s=5.0,
        device_clock=skewed,
    )  # fmt: skip
    link.start()
    try:
        wait_for("the upload", lambda: store.stats().segments_pending == 0)
    finally:
        link.stop()
        store.close()
    best = link.clock.best(skewed())
    assert best is not None and abs(best.offset_ns - SKEW_NS) < 5 * MS
    shown = metrics.registry.get_sample_value("fleetloop_agent_clock_offset_seconds")
    assert shown is not None and abs(shown - best.offset_ns / 1e9) < 1e-6
    ((first, offset, rows),) = coordinator.queries.sql(
        LOCAL,
        f"SELECT min(t_ns), min(clock_offset_ns), count(*) FROM samples WHERE device_id = '{device_id}'",
    ).rows
    assert rows == 200
    assert abs(first - true_first) < 5 * MS  # the device stamped it 37 s later
    assert offset == best.offset_ns
    receipt = coordinator.repositories.segments.receipt(device_id, seg.segment_id)
    assert receipt is not None and receipt.clock_status == APPLIED
    assert receipt.clock_offset_ns == best.offset_ns and abs(receipt.first_ns - true_first) < 5 * MS
    assert clock_offsets(coordinator, kind_of(transport), APPLIED) == 1


def kind_of(transport: UplinkTransport) -> str:
    return {GrpcTransport: "grpc", MqttTransport: "mqtt", MemoryTransport: "memory"}[type(transport)]


def clock_offsets(c: Coordinator, transport: str, status: str) -> float:
    labels = {"transport": transport, "status": status}
    return c.metrics.registry.get_sample_value("fleetloop_ingest_clock_offsets_total", labels) or 0.0


@pytest.fixture
def grpc_cloud(tmp_path: Path) -> Iterator[tuple[Coordinator, str]]:
    c = Coordinator(tmp_path / "cloud")
    server, port = start_grpc_server(c, "127.0.0.1", 0)
    try:
        yield c, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=0).wait(2)


def test_a_skewed_device_over_grpc_is_stored_on_the_clouds_clock(
    grpc_cloud: tuple[Coordinator, str], tmp_path: Path
) -> None:
    c, target = grpc_cloud
    run_device(GrpcTransport(target), tmp_path, c, "car-1")


def test_a_skewed_device_over_mqtt_is_stored_on_the_clouds_clock(tmp_path: Path) -> None:
    if mosquitto_broker.mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    with mosquitto_broker.private_broker(tmp_path / "broker") as broker:
        c = Coordinator(tmp_path / "cloud")
        cert, key = broker.coordinator()
        bridge = MqttBridge(c, BridgeSettings(broker.host, broker.port, broker.ca.ca_path, cert, key))
        bridge.start()
        try:
            wait_for("the bridge", bridge.connected.is_set)
            dcert, dkey = broker.device("car-2")
            settings = MqttSettings(broker.host, broker.port, broker.ca.ca_path, dcert, dkey)
            run_device(MqttTransport(settings, "car-2", fleet="test"), tmp_path, c, "car-2")
        finally:
            bridge.stop()
        assert bridge.refused == {}


def test_a_skewed_device_in_memory_is_stored_on_the_clouds_clock(tmp_path: Path) -> None:
    c = Coordinator(tmp_path / "cloud")
    run_device(MemoryTransport(CoordinatorCloud(c)), tmp_path, c, "car-3")


def test_a_cloud_that_does_not_answer_pings_gets_none_and_uploads_go_unmeasured(tmp_path: Path) -> None:
    """An older coordinator: its welcome does not say it answers pings. The device sends none, and its
    uploads carry no offset (stored as stamped, recorded as unmeasured)."""
    c = Coordinator(tmp_path / "cloud")
    sent: list[str] = []

    class OlderCloud(CoordinatorCloud):
        def open_session(self, hello: device_pb2.Hello, downlink: object) -> Callable[[], None]:
            class Older:
                def push(self, msg: device_pb2.CloudMessage) -> None:
                    if msg.WhichOneof("kind") == "welcome":
                        msg.welcome.ClearField("answers_clock_ping")
                    downlink.push(msg)  # type: ignore[attr-defined]

                def end(self, reason: str) -> None:
                    downlink.end(reason)  # type: ignore[attr-defined]

            return super().open_session(hello, Older())  # type: ignore[arg-type]

        def on_message(self, device_id: str, msg: device_pb2.DeviceMessage) -> None:
            sent.append(str(msg.WhichOneof("kind")))
            super().on_message(device_id, msg)

    store = LocalStore(tmp_path / "store")
    seg, _ = captured_now()
    store.append(seg, capture_id="cap", campaign="c", priority=5, now_ns=skewed())
    link = Link(
        MemoryTransport(OlderCloud(c)), device_id="car-4", store=store, metrics=AgentMetrics(),
        greeting=lambda: [hello("car-4")], on_message=lambda m: None, device_clock=skewed,
    )  # fmt: skip
    link.start()
    try:
        wait_for("the upload", lambda: store.stats().segments_pending == 0)
        link.send(device_pb2.DeviceMessage(heartbeat=device_pb2.Heartbeat(time_unix_ns=skewed())))
        wait_for("the heartbeat", lambda: "heartbeat" in sent)
    finally:
        link.stop()
        store.close()
    assert "clock_ping" not in sent
    receipt = c.repositories.segments.receipt("car-4", seg.segment_id)
    assert receipt is not None and receipt.clock_status == UNMEASURED and receipt.clock_offset_ns is None
    ((first, offset),) = c.queries.sql(LOCAL, "SELECT min(t_ns), min(clock_offset_ns) FROM samples").rows
    assert first == int(seg.t_ns[0]) and offset is None


def test_an_absurd_offset_over_grpc_is_refused_recorded_and_counted(
    grpc_cloud: tuple[Coordinator, str], tmp_path: Path
) -> None:
    c, target = grpc_cloud
    c.devices.connect(Caller.device("car-5", transport="grpc", proven=False), hello("car-5").hello, c.clock())
    stub = ingest_pb2_grpc.IngestServiceStub(channel := grpc.insecure_channel(target))
    try:
        sent: list[Segment] = []
        for clock in (
            ingest_pb2.ClockOffset(offset_ns=2**62, round_trip_ns=1 * MS, exchanges=8),  # centuries
            ingest_pb2.ClockOffset(
                offset_ns=-3600 * S, round_trip_ns=1 * MS, exchanges=8
            ),  # samples an hour ahead
            ingest_pb2.ClockOffset(offset_ns=SKEW_NS, round_trip_ns=-5, exchanges=8),  # no measurement
            ingest_pb2.ClockOffset(offset_ns=SKEW_NS, round_trip_ns=1 * MS, exchanges=0),
        ):
            seg, _ = captured_now()
            sent.append(seg)
            stub.UploadSegment(ingest_pb2.UploadSegmentRequest(
                device_id="car-5", segment_id=seg.segment_id, capture_id="cap", campaign="c", priority=5,
                segment=encode_segment(seg), clock=clock,
            ), timeout=10)  # fmt: skip
    finally:
        channel.close()
    receipts = [c.repositories.segments.receipt("car-5", seg.segment_id) for seg in sent]
    assert all(r is not None and r.clock_status == REFUSED for r in receipts)
    assert receipts[0] is not None and receipts[0].clock_offset_ns == MAX_OFFSET_NS  # clamped when stored
    ((first, offset),) = c.queries.sql(LOCAL, "SELECT min(t_ns), max(clock_offset_ns) FROM samples").rows
    assert first == min(int(seg.t_ns[0]) for seg in sent) and offset is None  # stored as stamped
    assert clock_offsets(c, "grpc", REFUSED) == 4


# -- the judgement alone ---------------------------------------------------------------------------------
NOW = 1_765_000_000 * S


def report(offset: int, rtt: int = MS, exchanges: int = 8) -> ingest_pb2.ClockOffset:
    return ingest_pb2.ClockOffset(offset_ns=offset, round_trip_ns=rtt, exchanges=exchanges)


def test_no_report_is_unmeasured_and_a_plausible_one_applied() -> None:
    assert judge(None, NOW - S, NOW, NOW).status == UNMEASURED
    verdict = judge(report(SKEW_NS), NOW + SKEW_NS - S, NOW + SKEW_NS, NOW + MS)
    assert verdict.status == APPLIED and verdict.applied_ns == SKEW_NS


@given(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**32 - 1),
       st.integers(-10**9 * S, 10**9 * S))  # fmt: skip
def test_whatever_is_reported_the_verdict_is_bounded_and_never_puts_samples_after_arrival(
    offset: int, rtt: int, exchanges: int, age: int
) -> None:
    last = NOW - abs(age) // 1000
    verdict = judge(report(offset, rtt, exchanges), last - S, last, NOW)
    assert verdict.status in (APPLIED, REFUSED)
    assert verdict.reported_ns is not None and abs(verdict.reported_ns) <= MAX_OFFSET_NS
    if verdict.status == APPLIED:
        assert verdict.applied_ns == offset and rtt >= 0
        assert last - offset <= NOW + rtt // 2 + FUTURE_SLACK_NS
    else:
        assert verdict.applied_ns is None and verdict.reason
