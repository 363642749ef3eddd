"""A link with scheduled uploads uploads nothing until the cloud grants, then only what was granted, highest
priority first."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, new_segment_id
from fleetloop_shared.wire import device_pb2

T0 = 1_700_000_000 * 10**9


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    c = Coordinator(tmp_path / "cloud")
    server, port = start_grpc_server(c, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=0).wait(2)


def test_uploads_wait_for_grants_and_respect_them(target: str, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for k, prio in enumerate([1, 9, 9, 1]):
        seg = Segment(new_segment_id(), "g", np.arange(T0 + k * 10**9, T0 + k * 10**9 + 100, dtype=np.int64),
                      {1: np.arange(100, dtype=np.float64)}, {1: DataType.FLOAT64})  # fmt: skip
        store.append(seg, capture_id=f"c{k}", campaign="c", priority=prio, now_ns=T0)
    h = device_pb2.Hello(device_id="car-1", fleet="t", data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    acks: list[StoredSegment] = []
    link = Link(GrpcTransport(target), device_id="car-1", store=store, metrics=AgentMetrics(),
                greeting=lambda: [device_pb2.DeviceMessage(hello=h)], on_message=lambda m: None,
                on_ack=lambda s, d: acks.append(s), scheduled=True)  # fmt: skip
    link.start()
    try:
        assert link.connected.wait(10)
        time.sleep(1.5)
        assert acks == []  # connected, backlog pending, but nothing granted
        link.grant(1, 9)  # one byte at priority >= 9: one segment goes (overdraft), no more
        deadline = time.monotonic() + 10
        while len(acks) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert [a.priority for a in acks] == [9]
        link.grant(10**9, 9)  # plenty, but only priority 9: the other 9 goes, the 1s wait
        deadline = time.monotonic() + 10
        while len(acks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert [a.priority for a in acks] == [9, 9]
        link.grant(10**9, 0)
        deadline = time.monotonic() + 10
        while len(acks) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a.priority for a in acks] == [9, 9, 1, 1]
    finally:
        link.stop()
