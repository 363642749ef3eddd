"""Resumable uploads end to end: the agent's link over gRPC, a real coordinator, a TCP proxy that cuts
every connection mid-upload. The segment arrives once, and each cut costs at most the piece in flight."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.uploader import upload_request
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.chaos import ChaosProxy
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, new_segment_id
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, ingest_pb2

T0 = 1_700_000_000 * 10**9
PIECE = 32 * 1024


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[Coordinator, ChaosProxy]]:
    c = Coordinator(tmp_path / "cloud")
    server, port = start_grpc_server(c, "127.0.0.1", 0)
    proxy = ChaosProxy(("127.0.0.1", port))
    proxy.start()
    try:
        yield c, proxy
    finally:
        proxy.close()
        server.stop(grace=0).wait(2)


def noisy_segment(store: LocalStore, rows: int) -> StoredSegment:
    """Random doubles: incompressible, so the upload is as large as the rows make it."""
    values = np.random.default_rng(7).normal(50.0, 20.0, rows)
    seg = Segment(new_segment_id(), "g", T0 + np.arange(rows, dtype=np.int64) * 1_000_000,
                  {1: values}, {1: DataType.FLOAT64})  # fmt: skip
    store.append(seg, capture_id="cap-1", campaign="c", priority=5, now_ns=T0)
    (pending,) = store.pending(limit=10)
    return pending


def link(
    target: str,
    store: LocalStore,
    metrics: AgentMetrics,
    acks: list[bool],
    chunk_bytes: int = PIECE,
    deadline_s: float = 3.0,
) -> Link:
    hello = device_pb2.Hello(device_id="car-1", fleet="t", data_origin="recordings")
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    return Link(
        GrpcTransport(target),
        device_id="car-1",
        store=store,
        metrics=metrics,
        upload_deadline_s=deadline_s,
        greeting=lambda: [device_pb2.DeviceMessage(hello=hello)],
        on_message=lambda m: None,
        on_ack=lambda s, duplicate: acks.append(duplicate),
        chunk_bytes=chunk_bytes,
    )


def count(metrics: AgentMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"fleetloop_agent_{name}_total") or 0.0


def rows(c: Coordinator) -> int:
    return int(c.queries.sql(Caller.local(), "SELECT count(*) FROM samples").rows[0][0])


def test_a_cut_link_resumes_where_the_cloud_is(cloud: tuple[Coordinator, ChaosProxy], tmp_path: Path) -> None:
    c, proxy = cloud
    store = LocalStore(tmp_path / "store")
    seg = noisy_segment(store, 60_000)
    total = len(upload_request("car-1", seg, store.read(seg.segment_id)).SerializeToString())
    pieces = math.ceil(total / PIECE)
    assert pieces >= 12
    metrics, acks = AgentMetrics(), []
    uplink = link(proxy.address, store, metrics, acks)
    uplink.start()
    try:
        cuts = 0
        deadline = time.monotonic() + 60
        while not acks and time.monotonic() < deadline:
            if cuts < 3 and count(metrics, "upload_pieces") >= 3 * (cuts + 1):
                proxy.cut_all()  # the radio link goes, mid-upload
                cuts += 1
            time.sleep(0.005)
        # acknowledged once; "duplicate" when the cut took the last piece's answer and the retry found
        # the segment stored — the device treats both as its ack
        assert len(acks) == 1, "the segment was not acknowledged (or twice)"
    finally:
        uplink.stop()
    assert cuts == 3
    assert rows(c) == 60_000
    assert store.pending(limit=10) == []
    assert count(metrics, "upload_resumes") >= 1
    # A cut costs only the piece in flight (its answer never came, so it is not counted): after each
    # cut the link asks where the cloud is instead of sending again from the start.
    assert count(metrics, "upload_pieces") <= pieces


def test_a_segment_over_the_message_limit_goes_in_pieces(
    cloud: tuple[Coordinator, ChaosProxy], tmp_path: Path
) -> None:
    c, _ = cloud
    store = LocalStore(tmp_path / "store")
    seg = noisy_segment(store, 2_600_000)
    assert seg.size_bytes > MAX_MESSAGE_BYTES  # UploadSegment could never carry it
    metrics, acks = AgentMetrics(), []
    largest = 1 << 20  # the largest piece the cloud takes
    # the last piece makes the cloud ingest 2.6 M rows before it answers: on a loaded machine that takes
    # longer than a short deadline, and the retry is (correctly) answered as a duplicate
    uplink = link(
        f"127.0.0.1:{_upstream_port(cloud)}", store, metrics, acks, chunk_bytes=largest, deadline_s=120.0
    )
    uplink.start()
    try:
        deadline = time.monotonic() + 120
        while not acks and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        uplink.stop()
    assert acks == [False]
    assert rows(c) == 2_600_000


def _upstream_port(cloud: tuple[Coordinator, ChaosProxy]) -> int:
    return cloud[1].upstream[1]


def test_an_older_coordinator_without_pieces_gets_segments_whole(tmp_path: Path) -> None:
    """A real gRPC server that serves the control stream and ``UploadSegment`` only (as coordinators did
    before ``UploadChunk``): the link hears UNIMPLEMENTED once and sends whole segments from then on."""
    c = Coordinator(tmp_path / "cloud")

    def connect(requests: Iterator[device_pb2.DeviceMessage], context: grpc.ServicerContext) -> Iterator[Any]:
        first = next(requests)
        caller = Caller.device(first.hello.device_id, transport="grpc", proven=False)
        c.devices.connect(caller, first.hello, c.clock())
        yield from c.devices.welcome(caller)
        for msg in requests:
            c.devices.receive(caller, msg, c.clock())

    def upload(r: ingest_pb2.UploadSegmentRequest, context: grpc.ServicerContext) -> Any:
        caller = Caller.device(r.device_id, transport="grpc", proven=False)
        return c.ingest.segment(caller, r, c.clock()).response(r.segment_id)

    segment_rpc = grpc.unary_unary_rpc_method_handler(
        upload, ingest_pb2.UploadSegmentRequest.FromString, ingest_pb2.UploadSegmentResponse.SerializeToString
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("fleetloop.device.v1.DeviceService", {
            "Connect": grpc.stream_stream_rpc_method_handler(
                connect, device_pb2.DeviceMessage.FromString, device_pb2.CloudMessage.SerializeToString
            )
        }),
        grpc.method_handlers_generic_handler("fleetloop.ingest.v1.IngestService", {
            "UploadSegment": segment_rpc,
        }),
    ])  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    store = LocalStore(tmp_path / "store")
    noisy_segment(store, 2_000)
    metrics, acks = AgentMetrics(), []
    uplink = link(f"127.0.0.1:{port}", store, metrics, acks, chunk_bytes=1024)
    uplink.start()
    try:
        deadline = time.monotonic() + 30
        while not acks and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        uplink.stop()
        server.stop(grace=0).wait(2)
    assert acks == [False]
    assert uplink.uploader is not None and not uplink.uploader.pieces
    assert count(metrics, "upload_errors") == 0  # a change of plan, not a failed attempt
    assert rows(c) == 2_000
