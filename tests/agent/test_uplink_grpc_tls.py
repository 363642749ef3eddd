"""The gRPC link with mTLS: the agent's link uploads over a client certificate (CN = device id); a
device acting as an attacker — claiming another device id, sending hostile protobufs, or connecting
without a certificate of the fleet's CA — is refused and counted while everyone else is served."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_cloud.grpc_api import GrpcTls, start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.broker import CertificateAuthority
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.fixtures.waiting import wait_for

T0 = 1_700_000_000 * 10**9


@pytest.fixture
def tls_cloud(tmp_path: Path) -> Iterator[tuple[Coordinator, str, CertificateAuthority]]:
    ca = CertificateAuthority(tmp_path / "pki")
    cert, key = ca.issue("coordinator", server=True)
    c = Coordinator(tmp_path / "cloud")
    server, port = start_grpc_server(c, "127.0.0.1", 0, tls=GrpcTls(ca.ca_path, cert, key))
    try:
        yield c, f"127.0.0.1:{port}", ca
    finally:
        server.stop(grace=0).wait(2)


def hello(device_id: str) -> device_pb2.DeviceMessage:
    h = device_pb2.Hello(device_id=device_id, fleet="test", data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    return device_pb2.DeviceMessage(hello=h)


def segment(k: int) -> Segment:
    return Segment(
        new_segment_id(), "speed", np.arange(T0 + k * 10**10, T0 + k * 10**10 + 100, dtype=np.int64),
        {1: np.arange(100, dtype=np.float64)}, {1: DataType.FLOAT64},
    )  # fmt: skip


def channel(target: str, ca: CertificateAuthority, name: str) -> grpc.Channel:
    cert, key = ca.client(name)
    creds = grpc.ssl_channel_credentials(
        ca.ca_path.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )
    return grpc.secure_channel(target, creds)


def run_link(
    c: Coordinator, target: str, ca: CertificateAuthority, tmp: Path, name: str
) -> list[StoredSegment]:
    cert, key = ca.client(name)
    store = LocalStore(tmp / name)
    for k in range(3):
        store.append(segment(k), capture_id="cap", campaign="c", priority=5, now_ns=T0)
    acks: list[StoredSegment] = []
    received: queue.Queue[Any] = queue.Queue()
    link = Link(
        GrpcTransport(target, tls=(ca.ca_path, cert, key)), device_id=name, store=store,
        metrics=AgentMetrics(), greeting=lambda: [hello(name)], on_message=received.put,
        on_ack=lambda s, d: acks.append(s),
    )  # fmt: skip
    link.start()
    try:
        wait_for("the uploads", lambda: store.stats().segments_pending == 0)
    finally:
        link.stop()
    return acks


def test_agent_uploads_over_mtls(tls_cloud: Any, tmp_path: Path) -> None:
    c, target, ca = tls_cloud
    assert len(run_link(c, target, ca, tmp_path, "car-1")) == 3
    assert c.queries.sql(Caller.local(), "SELECT count(*) FROM samples").rows[0][0] == 300
    assert c.refusals.totals() == {}


def test_attacks_over_grpc_are_refused_counted_and_others_served(tls_cloud: Any, tmp_path: Path) -> None:
    c, target, ca = tls_cloud
    car_2 = Caller.device("car-2", transport="test", proven=True)
    c.devices.connect(car_2, hello("car-2").hello, time.time())
    intruder = channel(target, ca, "intruder-1")
    # 1. an upload claiming another device id
    seg = segment(0)
    req = ingest_pb2.UploadSegmentRequest(
        device_id="car-2",
        segment_id=seg.segment_id,
        capture_id="x",
        campaign="c",
        segment=encode_segment(seg),
    )
    with pytest.raises(grpc.RpcError) as exc:
        ingest_pb2_grpc.IngestServiceStub(intruder).UploadSegment(req, timeout=5)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # 2. a control stream whose hello claims another device id
    with pytest.raises(grpc.RpcError) as exc:
        list(device_pb2_grpc.DeviceServiceStub(intruder).Connect(iter([hello("car-2")]), timeout=5))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert c.refusals["impersonation"] == 2
    # 3. hostile protobufs
    raw = intruder.unary_unary("/fleetloop.ingest.v1.IngestService/UploadSegment")
    for junk in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"):
        with pytest.raises(grpc.RpcError):
            raw(junk, timeout=5)
    assert c.refusals["undecodable"] == 3
    intruder.close()
    # 4. no certificate of the fleet's CA: the handshake fails
    rogue = CertificateAuthority(tmp_path / "rogue")
    with pytest.raises(grpc.RpcError) as exc:
        ingest_pb2_grpc.IngestServiceStub(channel(target, rogue, "car-1")).UploadSegment(req, timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    # the coordinator keeps serving an honest device; nothing of the attacker's was stored
    assert len(run_link(c, target, ca, tmp_path, "car-1")) == 3
    assert c.queries.sql(Caller.local(), "SELECT DISTINCT device_id FROM samples").rows == [("car-1",)]
    assert c.queries.summary(Caller.local(), time.time()).refused == {"impersonation": 2, "undecodable": 3}
