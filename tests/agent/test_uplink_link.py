"""The link driver over the in-memory transport, against a real coordinator in this process.

No network: :class:`CoordinatorCloud` adapts the coordinator to the transport's ``InProcessCloud`` (the
agent owns that interface; the adapter lives in tests only). What these prove is the driver's part, the
same over every transport: the greeting opens each session, the outbox waits for the welcome, segments
are checkpointed only once acknowledged or refused for good, pieces resume where the cloud is after a
cut, grants are obeyed, and an unreachable cloud is retried with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Greeting, Link, heartbeat
from fleetloop_agent.uplink.memory_transport import Downlink, MemoryTransport
from fleetloop_agent.uplink.pacing import BackoffPolicy
from fleetloop_agent.uplink.transport import (
    Acknowledged,
    Refused,
    RetryLater,
    UploadAnswer,
    UploadRequest,
)
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.sessions import Session
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import UnavailableError
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2
from tests.fixtures.waiting import wait_for

T0 = 1_700_000_000 * 10**9
FAST = BackoffPolicy(0.05, 0.2)


class CoordinatorCloud:
    """The coordinator as the in-memory transport's in-process cloud."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.hellos: list[device_pb2.Hello] = []

    def _caller(self, device_id: str) -> Caller:
        return Caller.device(device_id, transport="memory", proven=True)

    def open_session(self, hello: device_pb2.Hello, downlink: Downlink) -> Callable[[], None]:
        caller = self._caller(hello.device_id)
        holder: list[Session] = []

        def pump() -> None:
            if not holder:
                return
            session = holder[0]
            while not session.outbox.empty():
                downlink.push(session.outbox.get_nowait())
            if session.closed.is_set():
                downlink.end("UNAVAILABLE: the cloud closed the session")

        holder.append(self.c.devices.connect(caller, hello, self.c.clock(), pump))
        self.hellos.append(hello)
        for msg in self.c.devices.welcome(caller):
            downlink.push(msg)

        def hang_up() -> None:
            self.c.devices.disconnect(holder[0])

        return hang_up

    def on_message(self, device_id: str, msg: device_pb2.DeviceMessage) -> None:
        self.c.devices.receive(self._caller(device_id), msg, self.c.clock())

    def upload(self, request: ingest_pb2.UploadSegmentRequest) -> ingest_pb2.UploadSegmentResponse:
        ack = self.c.ingest.segment(self._caller(request.device_id), request, self.c.clock())
        return ack.response(request.segment_id)

    def upload_piece(self, request: ingest_pb2.UploadChunkRequest) -> ingest_pb2.UploadChunkResponse:
        ack = self.c.ingest.chunk(self._caller(request.device_id), request, self.c.clock())
        return ack.response(request.segment_id)


def catalog() -> Catalog:
    cat = Catalog()
    cat.add("Vehicle.Speed", DataType.FLOAT64, unit="km/h")
    return cat


def segment(k: int, rows: int = 100, *, signal: int = 1, noisy: bool = False) -> Segment:
    values = np.random.default_rng(k).normal(50, 20, rows) if noisy else np.arange(rows, dtype=np.float64)
    t = T0 + k * 10**10 + np.arange(rows, dtype=np.int64) * 1_000_000
    return Segment(new_segment_id(), "speed", t, {signal: values}, {signal: DataType.FLOAT64})


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CoordinatorCloud]:
    yield CoordinatorCloud(Coordinator(tmp_path / "cloud"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


def make_link(
    transport: MemoryTransport,
    store: LocalStore | None,
    *,
    acks: list[StoredSegment] | None = None,
    received: list[device_pb2.CloudMessage] | None = None,
    metrics: AgentMetrics | None = None,
    **options: object,
) -> Link:
    greeting = Greeting("car-1", "test", catalog=catalog(), labels={"kind": "car"}, data_origin="recordings")
    return Link(
        transport, device_id="car-1", store=store, metrics=metrics or AgentMetrics(),
        greeting=greeting.messages, on_message=(received if received is not None else []).append,
        on_ack=lambda seg, dup: (acks if acks is not None else []).append(seg), backoff=FAST,
        **options,  # type: ignore[arg-type]
    )  # fmt: skip


def running(cloud: CoordinatorCloud) -> list[str]:
    """The campaigns the cloud's shadow of car-1 says are running (from its campaign status)."""
    device = cloud.c.repositories.devices.get("car-1")
    assert device is not None
    return device.campaigns_running


def status(*running: str) -> device_pb2.DeviceMessage:
    return device_pb2.DeviceMessage(campaign_status=device_pb2.CampaignStatus(version=1, running=running))


def count(metrics: AgentMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"fleetloop_agent_{name}_total") or 0.0


def test_segments_go_exactly_once_after_the_greeting(cloud: CoordinatorCloud, store: LocalStore) -> None:
    for k in range(3):
        store.append(segment(k), capture_id=f"cap-{k}", campaign="c", priority=5, now_ns=T0)
    acks: list[StoredSegment] = []
    received: list[device_pb2.CloudMessage] = []
    link = make_link(MemoryTransport(cloud), store, acks=acks, received=received)
    link.start()
    try:
        wait_for("the uploads", lambda: store.stats().segments_pending == 0)
        assert link.connected.is_set() and link.last_error == ""
        # the cloud learned who the device is from the greeting
        device = cloud.c.repositories.devices.get("car-1")
        assert device is not None and device.labels == {"kind": "car"} and device.data_origin == "recordings"
        assert [s["path"] for s in device.catalog] == ["Vehicle.Speed"]
        assert received[0].WhichOneof("kind") == "welcome"
        # a push reaches the device; a device message reaches the cloud
        cloud.c.campaigns.apply(
            Caller.local(),
            "apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: fast, version: 1}\nspec:\n"
            '  target: {selector: "kind=car"}\n  trigger: {when: "Vehicle.Speed > 50"}\n'
            '  collect: {signals: ["Vehicle.*"], pre: 1s, post: 1s}\n',
            now=time.time(),
        )

        def campaign_pushed() -> bool:
            pushes = [
                m.desired_campaigns for m in list(received) if m.WhichOneof("kind") == "desired_campaigns"
            ]
            return any(p.campaigns for p in pushes)

        wait_for("the campaign push", campaign_pushed)
        assert cloud.c.jobs.withdraw("car-1", "r1:car-1", "r1", "rollout r1 aborted")  # a withdrawal too
        wait_for("the withdrawal", lambda: any(m.ota_cancel.job_id == "r1:car-1" for m in list(received)
                                                  if m.WhichOneof("kind") == "ota_cancel"))  # fmt: skip
        link.send(status("fast"))
        wait_for("the campaign status", lambda: running(cloud) == ["fast"])
    finally:
        link.stop()
    assert len(acks) == 3 and len({a.segment_id for a in acks}) == 3
    assert cloud.c.queries.sql(Caller.local(), "SELECT count(*) FROM samples").rows[0][0] == 300
    assert cloud.c.sessions.online() == []  # the device hung up


def test_a_lost_session_reconnects_and_the_outbox_waits_for_the_welcome(cloud: CoordinatorCloud) -> None:
    transport = MemoryTransport(cloud)
    received: list[device_pb2.CloudMessage] = []
    link = make_link(transport, None, received=received)
    link.start()
    try:
        wait_for("the first welcome", link.connected.is_set)
        transport.reachable = False
        transport.cut()
        wait_for("the link to notice", lambda: not link.connected.is_set())
        link.send(status("a"))
        time.sleep(0.5)  # several reconnect attempts fail meanwhile
        assert "out of reach" in link.last_error and link.connect_failures >= 2
        assert running(cloud) == []
        transport.reachable = True
        wait_for("the second welcome", link.connected.is_set)
        wait_for("the queued message", lambda: running(cloud) == ["a"])
    finally:
        link.stop()
    assert len(cloud.hellos) == 2  # the greeting opened each session
    assert link.last_error == ""


def test_pieces_resume_where_the_cloud_is_after_a_cut(cloud: CoordinatorCloud, store: LocalStore) -> None:
    store.append(segment(1, rows=20_000, noisy=True), capture_id="cap", campaign="c", priority=5, now_ns=T0)
    (seg,) = store.pending(limit=5)
    piece = 8 * 1024
    pieces = -(-(seg.size_bytes + 100) // piece)
    assert pieces >= 10
    transport = MemoryTransport(cloud)
    metrics = AgentMetrics()
    acks: list[StoredSegment] = []
    link = make_link(transport, store, acks=acks, metrics=metrics, chunk_bytes=piece)
    cut = threading.Event()

    def cut_after_some_pieces() -> None:
        while count(metrics, "upload_pieces") < 3:
            time.sleep(0.001)
        transport.reachable = False  # the link goes mid-upload
        cut.set()
        time.sleep(0.3)
        transport.reachable = True

    helper = threading.Thread(target=cut_after_some_pieces, daemon=True)
    helper.start()
    link.start()
    try:
        wait_for("the acknowledgement", lambda: bool(acks), timeout=30)
    finally:
        link.stop()
    helper.join(timeout=5)
    assert cut.is_set() and count(metrics, "upload_errors") >= 1
    assert count(metrics, "upload_resumes") >= 1
    assert count(metrics, "upload_pieces") <= pieces  # nothing the cloud had was sent again
    assert cloud.c.queries.sql(Caller.local(), "SELECT count(*) FROM samples").rows[0][0] == 20_000


def test_a_segment_refused_for_good_is_checkpointed_and_counted(
    cloud: CoordinatorCloud, store: LocalStore
) -> None:
    store.append(segment(1, signal=99), capture_id="bad", campaign="c", priority=9, now_ns=T0)  # unknown id
    store.append(segment(2), capture_id="good", campaign="c", priority=5, now_ns=T0)
    metrics, acks = AgentMetrics(), []
    link = make_link(MemoryTransport(cloud), store, acks=acks, metrics=metrics)
    link.start()
    try:
        wait_for("both settled", lambda: store.stats().segments_pending == 0)
    finally:
        link.stop()
    assert [a.capture_id for a in acks] == ["good"]
    assert count(metrics, "segments_refused") == 1 and count(metrics, "segments_uploaded") == 1


class MisbehavingTransport(MemoryTransport):
    """The first upload never answers, past its own deadline, or has its call cancelled under the link
    (as grpc.aio does to a call it cancels itself); every later one goes to the cloud."""

    def __init__(self, cloud: CoordinatorCloud, fault: str) -> None:
        super().__init__(cloud)
        self.fault = fault
        self.uploads = 0

    async def upload(self, request: UploadRequest, timeout_s: float) -> UploadAnswer:
        self.uploads += 1
        if self.uploads == 1:
            if self.fault == "hang":
                await asyncio.Event().wait()  # nothing ever sets it
            raise asyncio.CancelledError()
        return await super().upload(request, timeout_s)


@pytest.mark.parametrize("fault", ["hang", "cancelled"])
def test_an_upload_the_transport_never_answers_is_retried_not_left_pending(
    cloud: CoordinatorCloud, store: LocalStore, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    for k in range(2):
        store.append(segment(k), capture_id=f"cap-{k}", campaign="c", priority=5, now_ns=T0)
    metrics, acks = AgentMetrics(), []
    transport = MisbehavingTransport(cloud, fault)
    link = make_link(transport, store, acks=acks, metrics=metrics, upload_deadline_s=0.2)
    link.start()
    try:
        wait_for("both acknowledged", lambda: store.stats().segments_pending == 0)
        assert link.connected.is_set()  # the link went on: the session and the upload loop alike
    finally:
        link.stop()
    assert len(acks) == 2 and transport.uploads == 3
    assert count(metrics, "upload_errors") == 1
    assert ("DEADLINE_EXCEEDED" if fault == "hang" else "CANCELLED") in caplog.text


def test_scheduled_uploads_go_only_as_granted(cloud: CoordinatorCloud, store: LocalStore) -> None:
    for k, prio in enumerate([1, 9, 9]):
        store.append(segment(k), capture_id=f"c{k}", campaign="c", priority=prio, now_ns=T0)
    acks: list[StoredSegment] = []
    link = make_link(MemoryTransport(cloud), store, acks=acks, scheduled=True)
    link.start()
    try:
        wait_for("the welcome", link.connected.is_set)
        time.sleep(0.5)
        assert acks == []
        link.grant(1, 9)  # one segment of priority 9 (overdraft), no more
        wait_for("one upload", lambda: len(acks) == 1)
        time.sleep(0.3)
        assert [a.priority for a in acks] == [9]
        link.grant(10**9, 0)
        wait_for("the rest", lambda: len(acks) == 3)
    finally:
        link.stop()
    assert [a.priority for a in acks] == [9, 9, 1]


def test_the_greeting_and_the_heartbeat(store: LocalStore) -> None:
    inventory = device_pb2.Inventory(hardware_id="hw", firmware_version="1.0")
    msgs = Greeting("car-1", "fleet", catalog=catalog(), labels={"a": "b"}, inventory=inventory).messages()
    assert [m.WhichOneof("kind") for m in msgs] == ["hello", "inventory"]
    hello = msgs[0].hello
    assert (hello.device_id, hello.fleet, dict(hello.labels)) == ("car-1", "fleet", {"a": "b"})
    assert [(s.id, s.path, s.data_type, s.unit) for s in hello.catalog] == [
        (1, "Vehicle.Speed", device_pb2.DATA_TYPE_FLOAT64, "km/h")
    ]
    assert hello.agent_version  # this build's
    for k, prio in enumerate([3, 9, 3]):
        store.append(segment(k), capture_id=f"c{k}", campaign="c", priority=prio, now_ns=T0)
    plain = heartbeat(store, "wifi", T0, backlog=False)
    assert (plain.segments_pending, plain.network, list(plain.backlog)) == (3, "wifi", [])
    asking = heartbeat(store, "cellular", T0, backlog=True)
    assert [(b.priority, b.bytes > 0) for b in asking.backlog] == [(3, True), (9, True)]
    assert sum(b.bytes for b in asking.backlog) == asking.bytes_pending == store.stats().bytes_pending


# -- the in-memory transport on its own ------------------------------------------------------------


class SlowCloud(CoordinatorCloud):
    def upload(self, request: ingest_pb2.UploadSegmentRequest) -> ingest_pb2.UploadSegmentResponse:
        time.sleep(0.5)
        return super().upload(request)


def test_the_memory_transport_maps_the_clouds_answers(cloud: CoordinatorCloud) -> None:
    greeting = Greeting("car-1", "test", catalog=catalog()).messages()
    seg = segment(1)
    whole = ingest_pb2.UploadSegmentRequest(
        device_id="car-1", segment_id=seg.segment_id, capture_id="c", segment=encode_segment(seg)
    )

    async def run() -> None:
        transport = MemoryTransport(cloud)
        # before any hello the device is unknown: worth a retry, not a refusal
        unknown = await transport.upload(whole, 5.0)
        assert isinstance(unknown, RetryLater) and unknown.reason.startswith("NOT_FOUND")
        session = await transport.connect(greeting)
        assert (await session.receive()).WhichOneof("kind") == "welcome"
        assert cloud.c.sessions.online() == ["car-1"]
        assert await transport.upload(whole, 5.0) == Acknowledged(False, 100)
        assert await transport.upload(whole, 5.0) == Acknowledged(True, 0)  # a retry the cloud had
        junk = ingest_pb2.UploadSegmentRequest(device_id="car-1", segment_id=new_segment_id(), segment=b"x")
        refused = await transport.upload(junk, 5.0)
        assert isinstance(refused, Refused) and refused.status == "DATA_LOSS"
        encoded = whole.SerializeToString()
        piece = ingest_pb2.UploadChunkRequest(
            device_id="car-1", segment_id=seg.segment_id, offset=0, total_bytes=len(encoded),
            total_sha256=hashlib.sha256(encoded).digest(), data=encoded[:10],
        )  # fmt: skip
        assert await transport.upload(piece, 5.0) == Acknowledged(True, 0)  # stored already: done at once
        transport.reachable = False
        assert isinstance(await transport.upload(whole, 5.0), RetryLater)
        transport.cut()
        with pytest.raises(UnavailableError, match="link cut"):
            while True:
                await session.receive()  # what was pushed before the cut, then the end
        with pytest.raises(UnavailableError, match="out of reach"):
            await transport.connect(greeting)
        await session.close()
        assert cloud.c.sessions.online() == []  # the cloud learned of the hang-up
        slow = MemoryTransport(SlowCloud(cloud.c))
        late = await slow.upload(whole, 0.1)
        assert isinstance(late, RetryLater) and late.reason.startswith("DEADLINE_EXCEEDED")

    asyncio.run(run())
