"""A device given several coordinator addresses: a dead first one costs a reconnect, and a session that
ends moves the device to the next address, where its stored segments go on uploading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.pacing import BackoffPolicy
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_fwsim.fleet import free_port
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.segment import Segment, new_segment_id
from fleetloop_shared.wire import device_pb2
from tests.fixtures.waiting import wait_for

#: How long a wait may take here: a failover first waits out the dead address.
FAILOVER_WAIT_S = 30.0

T0 = 1_700_000_000 * 10**9


@pytest.fixture
def two_coordinators(tmp_path: Path) -> Iterator[list[tuple[Coordinator, str, object]]]:
    """Two coordinators on one data directory (they share the ingest ledger), each its own gRPC port."""
    out = []
    for _ in range(2):
        c = Coordinator(tmp_path / "cloud")
        server, port = start_grpc_server(c, "127.0.0.1", 0)
        out.append((c, f"127.0.0.1:{port}", server))
    try:
        yield out
    finally:
        for c, _, server in out:
            server.stop(grace=0).wait(2)  # type: ignore[attr-defined]
            c.close()


def segment(k: int) -> Segment:
    t = np.arange(T0 + k * 10**10, T0 + k * 10**10 + 50, dtype=np.int64)
    return Segment(new_segment_id(), "speed", t, {1: np.arange(50, dtype=np.float64)}, {1: DataType.FLOAT64})


def device_link(targets: list[str], store: LocalStore, acks: list[bytes]) -> Link:
    hello = device_pb2.Hello(device_id="car-1", fleet="t", data_origin="recordings")
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    return Link(
        GrpcTransport(targets), device_id="car-1", store=store, metrics=AgentMetrics(),
        greeting=lambda: [device_pb2.DeviceMessage(hello=hello)], on_message=lambda m: None,
        on_ack=lambda s, duplicate: acks.append(s.segment_id), backoff=BackoffPolicy(0.05, 0.2),
        upload_deadline_s=5.0,
    )  # fmt: skip


def test_a_dead_first_address_and_a_lost_coordinator_move_the_device_on(
    two_coordinators: list[tuple[Coordinator, str, object]], tmp_path: Path
) -> None:
    (a, a_target, a_server), (b, b_target, _) = two_coordinators
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = LocalStore(tmp_path / "store")
    acks: list[bytes] = []
    link = device_link([dead, a_target, b_target], store, acks)
    link.start()
    try:
        wait_for("a session past the dead address", lambda: link.connected.is_set(), timeout=FAILOVER_WAIT_S)
        assert link.transport.target == a_target  # type: ignore[attr-defined]
        first = store.append(segment(0), capture_id="c", campaign="x", priority=5, now_ns=T0)
        link.kick_upload()
        wait_for("the first upload acknowledged", lambda: len(acks) == 1, timeout=FAILOVER_WAIT_S)
        assert a.repositories.segments.has("car-1", first.segment_id)
        # A goes away: the session ends, and the next address takes the device and its next upload
        a_server.stop(grace=0).wait(2)  # type: ignore[attr-defined]
        wait_for(
            "a session on B",
            lambda: link.connected.is_set() and link.transport.target == b_target,  # type: ignore[attr-defined]
            timeout=FAILOVER_WAIT_S,
        )
        second = store.append(segment(1), capture_id="c", campaign="x", priority=5, now_ns=T0)
        link.kick_upload()
        wait_for("the second upload acknowledged", lambda: len(acks) == 2, timeout=FAILOVER_WAIT_S)
        assert acks == [first.segment_id, second.segment_id]
        assert b.repositories.segments.has("car-1", second.segment_id)
    finally:
        link.stop()
        store.close()


def test_no_address_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="at least one coordinator address"):
        GrpcTransport([])
