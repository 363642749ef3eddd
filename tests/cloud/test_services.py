"""The coordinator's services on the in-memory repositories, with fakes for the OTA and backlog sinks,
the real file stores in a temporary directory and a test clock passed as ``now``. No transport, no
database: what each service decides, and that every one checks its caller."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.identity.roles import Role
from fleetloop_cloud.ota.artifact_store import ArtifactStore, ReleaseInput
from fleetloop_cloud.ota.online_keys import KeyFiles, release_signer
from fleetloop_cloud.ota.tuf_repository import TufRepositories
from fleetloop_cloud.repositories import Repositories, memory_repositories
from fleetloop_cloud.repositories.records import Inventory, Registration
from fleetloop_cloud.rollout.controller import Job, RolloutController
from fleetloop_cloud.services.access import Access, Caller, Refusals
from fleetloop_cloud.services.campaigns import CampaignService
from fleetloop_cloud.services.devices import LEASE_S, DeviceService
from fleetloop_cloud.services.ingest import IngestService, UploadGrants
from fleetloop_cloud.services.query import QueryService
from fleetloop_cloud.services.releases import ReleaseService
from fleetloop_cloud.services.rollouts import RolloutService
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_cloud.storage import LocalObjectStore
from fleetloop_cloud.uploads.scheduler import Budget, UploadScheduler
from fleetloop_cloud.uploads.staging import UploadStaging
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import (
    IntegrityError,
    MalformedMessageError,
    NotFoundError,
    PermissionDeniedError,
    RuleError,
    StateError,
    UnavailableError,
    UserError,
)
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2, ota_pb2

NOW = 1_700_000_000.0
LOCAL = Caller.local()
CAR = Caller.device("car-1", transport="test", proven=True)
ME = "coordinator-a"
CAMPAIGN = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: fast, version: 1}
spec:
  target: {selector: "kind=car"}
  trigger: {when: "Vehicle.Speed > 50"}
  collect: {signals: ["Vehicle.*"], pre: 1s, post: 1s}
"""


@dataclass
class Sinks:
    """Where device messages other than registration go: OTA reports and upload backlogs."""

    ota: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    backlog: list[tuple[str, int, float]] = field(default_factory=list)
    connected: list[tuple[str, float]] = field(default_factory=list)

    def on_device_status(self, device_id: str, job_id: str, state: str, reason: str, now: float, *,
                         running_version: str = "", waiting: bool = False) -> None:  # fmt: skip
        self.ota.append((device_id, job_id, state, reason, now))

    def on_device_connected(self, device_id: str, now: float) -> None:
        self.connected.append((device_id, now))

    def report(self, device_id: str, heartbeat: device_pb2.Heartbeat, now: float) -> None:
        self.backlog.append((device_id, heartbeat.bytes_pending, now))


@dataclass
class World:
    repos: Repositories
    sessions: DeviceSessions
    refusals: Refusals
    access: Access
    sinks: Sinks
    campaigns: CampaignService
    devices: DeviceService


@pytest.fixture
def world() -> World:
    repos = memory_repositories()
    sessions = DeviceSessions()
    refusals = Refusals()
    access = Access(refusals)
    sinks = Sinks()
    campaigns = CampaignService(repos.campaigns, repos.devices, sessions, access)
    devices = DeviceService(
        repos.devices, repos.leases, sessions, access, coordinator_id=ME, campaigns=campaigns,
        ota=sinks, backlog=sinks,
    )  # fmt: skip
    devices.beat(NOW)
    return World(repos, sessions, refusals, access, sinks, campaigns, devices)


def hello(device_id: str = "car-1", kind: str = "car") -> device_pb2.Hello:
    h = device_pb2.Hello(device_id=device_id, fleet="taxi", labels={"kind": kind}, data_origin="sim")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    return h


# -- access ----------------------------------------------------------------------------------------


def test_a_device_acts_only_for_itself_and_never_as_an_operator() -> None:
    refusals = Refusals()
    access = Access(refusals)
    assert access.device(CAR, "car-1") == "car-1"
    with pytest.raises(PermissionDeniedError, match="this connection is device car-1, not 'car-2'"):
        access.device(CAR, "car-2")
    with pytest.raises(PermissionDeniedError, match="devices cannot use operator actions"):
        access.operator(CAR, "rollouts.create")
    with pytest.raises(PermissionDeniedError):
        access.device(LOCAL, "car-1")
    access.operator(Caller.operator("ci", Role.RELEASE_MANAGER), "rollouts.create")
    assert refusals["impersonation"] == 1 and refusals.of("test") == {"impersonation": 1}
    assert refusals.of("mqtt") == {}


# -- devices ---------------------------------------------------------------------------------------


def test_a_hello_registers_the_device_and_its_welcome_carries_its_campaigns(world: World) -> None:
    world.campaigns.apply(LOCAL, CAMPAIGN, source="fast.yaml", now=NOW)
    session = world.devices.connect(CAR, hello(), NOW)
    assert session.device_id == "car-1" and world.sessions.online() == ["car-1"]
    record = world.repos.devices.get("car-1")
    assert record is not None and record.session_owner == ME and record.labels == {"kind": "car"}
    welcome, desired = world.devices.welcome(CAR)
    assert welcome.welcome.heartbeat_interval_ms > 0
    assert [c.name for c in desired.desired_campaigns.campaigns] == ["fast"]
    robot = Caller.device("robot-1", transport="test", proven=True)
    world.devices.connect(robot, hello("robot-1", kind="robot"), NOW)
    assert list(world.devices.welcome(robot)[1].desired_campaigns.campaigns) == []
    assert world.sinks.connected == [("car-1", NOW), ("robot-1", NOW)]  # each new session: offers again


def test_a_new_session_opens_even_when_its_offers_cannot_be_marked_again(world: World) -> None:
    def unavailable(device_id: str, now: float) -> None:
        raise UnavailableError("database unreachable")

    world.sinks.on_device_connected = unavailable  # type: ignore[method-assign]
    session = world.devices.connect(CAR, hello(), NOW)
    assert session.device_id == "car-1" and world.sessions.online() == ["car-1"]


def test_a_hello_is_checked_before_anything_is_registered(world: World) -> None:
    with pytest.raises(PermissionDeniedError):
        world.devices.connect(CAR, hello("car-2"), NOW)
    bad = hello()
    bad.catalog.add(id=2, path="Vehicle.X", data_type=99)  # type: ignore[arg-type]
    with pytest.raises(MalformedMessageError, match="unknown datatype 99"):
        world.devices.connect(CAR, bad, NOW)
    with pytest.raises(MalformedMessageError, match="without a device_id"):
        world.devices.connect(Caller.device("", transport="test", proven=False), hello(""), NOW)
    assert world.repos.devices.all() == [] and world.sessions.online() == []
    assert world.refusals["impersonation"] == 1


def test_device_messages_reach_inventory_campaign_status_ota_and_the_scheduler(world: World) -> None:
    world.devices.connect(CAR, hello(), NOW)
    inventory = device_pb2.Inventory(hardware_id="gen1", firmware_version="1.0.0", active_slot="a")
    world.devices.receive(CAR, device_pb2.DeviceMessage(inventory=inventory), NOW + 1)
    status = device_pb2.CampaignStatus(version=3, running=["fast"], captures_total=7)
    status.refused.add(name="slow", reason="unknown signal")
    world.devices.receive(CAR, device_pb2.DeviceMessage(campaign_status=status), NOW + 2)
    beat = device_pb2.Heartbeat(bytes_pending=500, network="wifi")
    beat.backlog.add(priority=5, bytes=500)
    world.devices.receive(CAR, device_pb2.DeviceMessage(heartbeat=beat), NOW + 3)
    ota = ota_pb2.OtaStatus(job_id="ro-1:car-1", state=ota_pb2.OTA_STATE_COMMITTED, reason="")
    world.devices.receive(CAR, device_pb2.DeviceMessage(ota_status=ota), NOW + 4)
    record = world.repos.devices.get("car-1")
    assert record is not None
    assert (record.hardware_id, record.firmware_version, record.last_seen) == ("gen1", "1.0.0", NOW + 3)
    assert (record.campaigns_version, record.campaigns_refused) == (3, {"slow": "unknown signal"})
    assert world.sinks.backlog == [("car-1", 500, NOW + 3)]
    assert world.sinks.ota == [("car-1", "ro-1:car-1", "COMMITTED", "", NOW + 4)]
    with pytest.raises(MalformedMessageError, match="a second hello"):
        world.devices.receive(CAR, device_pb2.DeviceMessage(hello=hello()), NOW + 5)


def test_online_is_decided_from_the_leases_and_now(world: World) -> None:
    session = world.devices.connect(CAR, hello(), NOW)
    assert world.devices.describe(LOCAL, "car-1", NOW).online
    assert world.devices.census(NOW).online == 1
    # this coordinator stops beating (it died): a lease later nobody holds the device
    assert not world.devices.describe(LOCAL, "car-1", NOW + LEASE_S + 1).online
    world.devices.beat(NOW + LEASE_S + 1)
    assert world.devices.describe(LOCAL, "car-1", NOW + LEASE_S + 1).online
    world.devices.disconnect(session)
    assert [d.online for d in world.devices.fleet(LOCAL, NOW + LEASE_S + 1)] == [False]
    assert world.sessions.online() == []
    with pytest.raises(NotFoundError):
        world.devices.describe(LOCAL, "ghost", NOW)
    with pytest.raises(PermissionDeniedError):
        world.devices.fleet(CAR, NOW)


def test_a_message_from_a_device_that_said_hello_elsewhere_attaches_it_here(world: World) -> None:
    with pytest.raises(NotFoundError):
        world.devices.attach(CAR, NOW)
    reg = Registration("taxi", {}, [], "x", "sim")
    world.repos.devices.register("car-1", reg, owner="coordinator-b", now=NOW)
    world.devices.attach(CAR, NOW + 1)
    assert world.sessions.online() == ["car-1"]
    assert world.repos.devices.get("car-1").session_owner == ME  # type: ignore[union-attr]
    assert world.sinks.connected == [("car-1", NOW + 1)]  # a restarted coordinator over MQTT: no hello


# -- campaigns -------------------------------------------------------------------------------------


def test_campaigns_are_validated_stored_and_pushed_to_matching_devices(world: World) -> None:
    car = world.devices.connect(CAR, hello(), NOW)
    robot = Caller.device("robot-1", transport="test", proven=True)
    world.devices.connect(robot, hello("robot-1", "robot"), NOW)
    with pytest.raises(RuleError, match=r"fast\.yaml:6:"):
        world.campaigns.apply(LOCAL, CAMPAIGN.replace("> 50", "> "), source="fast.yaml", now=NOW)
    applied = world.campaigns.apply(LOCAL, CAMPAIGN, source="fast.yaml", now=NOW)
    assert (applied.name, applied.campaigns_version, applied.devices) == ("fast", 1, ["car-1"])
    pushed = car.outbox.get_nowait().desired_campaigns
    assert pushed.version == 1 and [c.name for c in pushed.campaigns] == ["fast"]
    assert world.campaigns.apply(LOCAL, CAMPAIGN, now=NOW).campaigns_version == 1  # unchanged
    deleted = world.campaigns.delete(LOCAL, "fast", NOW)
    assert deleted.campaigns_version == 2
    with pytest.raises(NotFoundError):
        world.campaigns.delete(LOCAL, "fast", NOW)
    with pytest.raises(PermissionDeniedError):
        world.campaigns.apply(CAR, CAMPAIGN, now=NOW)


# -- ingest ----------------------------------------------------------------------------------------


def segment(rows: int = 50) -> Segment:
    t = (np.arange(rows, dtype=np.int64) + 1_700_000_000) * 10**9
    return Segment(new_segment_id(), "speed", t, {1: np.linspace(0, 90, rows)}, {1: DataType.FLOAT64})


def upload(seg: Segment, device_id: str = "car-1") -> ingest_pb2.UploadSegmentRequest:
    return ingest_pb2.UploadSegmentRequest(
        device_id=device_id, segment_id=seg.segment_id, capture_id="cap", campaign="fast", priority=5,
        segment=encode_segment(seg),
    )  # fmt: skip


@pytest.fixture
def ingest(world: World, tmp_path: Path) -> tuple[IngestService, FleetStore]:
    store = FleetStore(tmp_path / "fleet")
    staging = UploadStaging(tmp_path / "staging", max_upload_bytes=1 << 20)
    return IngestService(world.repos.devices, world.repos.segments, store, staging, world.access), store


def written(store: FleetStore) -> list[str]:
    return sorted(p.name for p in store.samples_dir.rglob("*.parquet"))


def test_a_segment_is_stored_once_and_a_retry_is_a_duplicate(
    world: World, ingest: tuple[IngestService, FleetStore]
) -> None:
    service, store = ingest
    world.devices.connect(CAR, hello(), NOW)
    seg = segment()
    first = service.segment(CAR, upload(seg), NOW)
    again = service.segment(CAR, upload(seg), NOW + 1)
    assert (first.samples, first.duplicate) == (50, False)
    assert (again.samples, again.duplicate) == (0, True)
    assert written(store) == [f"car-1-{bytes(seg.segment_id).hex()}.parquet"]
    assert store.samples_dir.joinpath("fleet=taxi").is_dir()
    (capture,) = world.repos.segments.captures()
    assert (capture.capture_id, capture.samples, capture.first_received) == ("cap", 50, NOW)
    assert first.response(seg.segment_id).samples == 50


def test_what_ingest_refuses_writes_nothing(world: World, ingest: tuple[IngestService, FleetStore]) -> None:
    service, store = ingest
    seg = segment()
    with pytest.raises(NotFoundError, match="say hello first"):
        service.segment(CAR, upload(seg), NOW)
    world.devices.connect(CAR, hello(), NOW)
    with pytest.raises(PermissionDeniedError):
        service.segment(CAR, upload(seg, device_id="car-2"), NOW)
    corrupt = upload(seg)
    corrupt.segment = corrupt.segment[:-5]
    with pytest.raises(IntegrityError):
        service.segment(CAR, corrupt, NOW)
    other = upload(seg)
    other.segment_id = new_segment_id()
    with pytest.raises(MalformedMessageError, match="differs"):
        service.segment(CAR, other, NOW)
    short = upload(seg)
    short.segment_id = b"short"
    with pytest.raises(MalformedMessageError, match="16 bytes"):
        service.segment(CAR, short, NOW)
    unknown = Segment(new_segment_id(), "x", seg.t_ns, {9: seg.columns[1]}, {9: DataType.FLOAT64})
    with pytest.raises(MalformedMessageError, match="signal id 9 unknown to device car-1"):
        service.segment(CAR, upload(unknown), NOW)
    assert written(store) == [] and world.repos.segments.totals().segments == 0


def test_a_segment_in_pieces_is_ingested_once_whole(
    world: World, ingest: tuple[IngestService, FleetStore]
) -> None:
    service, store = ingest
    world.devices.connect(CAR, hello(), NOW)
    seg = segment(rows=2000)
    whole = upload(seg).SerializeToString()
    sha = hashlib.sha256(whole).digest()

    def piece(offset: int, size: int) -> Any:
        request = ingest_pb2.UploadChunkRequest(
            device_id="car-1", segment_id=seg.segment_id, offset=offset, total_bytes=len(whole),
            total_sha256=sha, data=whole[offset:offset + size],
        )  # fmt: skip
        return service.chunk(CAR, request, NOW)

    half = len(whole) // 2
    assert (piece(0, half).next_offset, piece(0, half).ack) == (half, None)
    done = piece(half, len(whole))
    assert done.next_offset == len(whole) and done.ack is not None and not done.ack.duplicate
    assert piece(0, half).ack.duplicate  # type: ignore[union-attr]  # a retry of the finished upload
    assert len(written(store)) == 1


def test_upload_grants_go_to_the_devices_connected_here(world: World) -> None:
    grants = UploadGrants(UploadScheduler(Budget(global_bytes_per_s=1000)), world.sessions)
    car = world.devices.connect(CAR, hello(), NOW)
    beat = device_pb2.Heartbeat(network="wifi")
    beat.backlog.add(priority=9, bytes=10_000)
    beat.backlog.add(priority=99, bytes=1)  # beyond the priorities: ignored
    grants.report("car-1", beat, NOW)
    grants.report("car-9", beat, NOW)  # not connected here: granted, but nowhere to push
    assert grants.pending_bytes("car-1") == 10_000
    assert grants.tick(NOW, 1.0) == 1
    grant = car.outbox.get_nowait().upload_grant
    assert grant.min_priority == 9 and 0 < grant.max_bytes <= 1000


# -- releases and rollouts -------------------------------------------------------------------------


@pytest.fixture
def releases(world: World, tmp_path: Path) -> ReleaseService:
    objects = LocalObjectStore(tmp_path / "artifacts")
    tuf = TufRepositories(objects, tmp_path / "keys" / "tuf", clock=lambda: NOW)
    artifacts = ArtifactStore(objects, release_signer(KeyFiles(tmp_path / "keys")), tuf=tuf)
    return ReleaseService(world.repos.releases, world.repos.devices, artifacts, tuf, world.access)


def test_a_release_is_checked_against_the_fleet_and_signed(world: World, releases: ReleaseService) -> None:
    world.repos.devices.register("car-1", Registration("taxi", {}, [], "x", "sim"), owner="", now=NOW)
    world.repos.devices.update_inventory("car-1", Inventory("gen1", "3.0.0", "", "a", 0), NOW)
    with pytest.raises(UserError, match=r"older than 3\.0\.0"):
        releases.upload(LOCAL, ReleaseInput(
            build_image("2.0.0", "gen1", size_hint=4096), name="fw", version="2.0.0",
                        hardware_id="gen1", now=NOW))  # fmt: skip
    with pytest.raises(UserError, match="empty"):
        releases.upload(LOCAL, ReleaseInput(b"", name="fw", version="4.0.0", hardware_id="gen1", now=NOW))
    with pytest.raises(PermissionDeniedError):
        releases.upload(CAR, ReleaseInput(b"x", name="fw", version="4.0.0", hardware_id="gen1", now=NOW))
    manifest = releases.upload(LOCAL, ReleaseInput(build_image("4.0.0", "gen1", size_hint=4096), name="fw",
                               version="4.0.0", hardware_id="gen1", now=NOW))  # fmt: skip
    assert (manifest.name, manifest.version, manifest.hardware_id) == ("fw", "4.0.0", "gen1")
    assert [(r.name, r.version, r.created_at) for r in releases.all(LOCAL)] == [("fw", "4.0.0", NOW)]
    assert releases.artifact_file(manifest.payloads[0].path).size == manifest.target_size
    with pytest.raises(StateError):
        releases.upload(LOCAL, ReleaseInput(
            build_image("4.0.0", "gen1", size_hint=4096), name="fw", version="4.0.0",
                        hardware_id="gen1", now=NOW))  # fmt: skip


@dataclass
class Publisher:
    sent: list[str] = field(default_factory=list)

    def reachable(self) -> set[str]:
        return {"car-1", "car-2"}

    def publish(self, device_id: str, job: Job) -> bool:
        self.sent.append(device_id)
        return True


def test_rollouts_are_created_driven_and_read_by_operators_only(
    world: World, releases: ReleaseService
) -> None:
    for d in ("car-1", "car-2"):
        registration = Registration("taxi", {"kind": "car"}, [], "x", "sim")
        world.repos.devices.register(d, registration, owner="", now=NOW)
        world.repos.devices.update_inventory(d, Inventory("gen1", "1.0.0", "", "a", 0), NOW)
    releases.upload(LOCAL, ReleaseInput(
        build_image("2.0.0", "gen1", size_hint=4096), name="fw", version="2.0.0",
                    hardware_id="gen1", now=NOW))  # fmt: skip
    publisher = Publisher()
    controller = RolloutController(world.repos.rollouts, world.repos.releases, world.repos.devices, publisher)
    rollouts = RolloutService(controller, world.repos.rollouts, world.access)
    policy = {"release": {"version": "2.0.0"}, "target": {"selector": "kind=car"},
              "phases": [{"name": "all"}]}  # fmt: skip
    with pytest.raises(PermissionDeniedError):
        rollouts.create(CAR, policy, NOW)
    with pytest.raises(UserError, match="phases"):
        rollouts.create(LOCAL, {**policy, "phases": "all"}, NOW)
    created = rollouts.create(LOCAL, policy, NOW)
    assert created.state == "RUNNING" and [d.device_id for d in created.devices] == ["car-1", "car-2"]
    controller.tick(NOW + 1)
    assert sorted(publisher.sent) == ["car-1", "car-2"]
    assert rollouts.pause(LOCAL, created.id, NOW + 2).state == "PAUSED"
    assert rollouts.resume(LOCAL, created.id, NOW + 3).state == "RUNNING"
    assert rollouts.abort(LOCAL, created.id, NOW + 4).state == "ABORTED"
    assert [r.state for r in rollouts.all(LOCAL)] == ["ABORTED"]
    events = [a.event for a in rollouts.history(LOCAL, created.id).events]
    assert events[0] == "created" and events[-1] == "aborted"
    with pytest.raises(NotFoundError):
        rollouts.history(LOCAL, "ro-none")


# -- query -----------------------------------------------------------------------------------------


def test_the_summary_counts_devices_ingest_campaigns_and_refusals(world: World, tmp_path: Path) -> None:
    engine = QueryEngine(tmp_path / "fleet", captures=world.repos.segments.captures)
    query = QueryService(engine, world.repos.segments, world.repos.campaigns, world.devices, world.access)
    world.devices.connect(CAR, hello(), NOW)
    world.campaigns.apply(LOCAL, CAMPAIGN, now=NOW)
    world.refusals.count("undecodable", "grpc")
    summary = query.summary(LOCAL, NOW)
    assert (summary.devices, summary.online, summary.campaigns, summary.campaigns_version) == (1, 1, 1, 1)
    assert summary.refused == {"undecodable": 1} and summary.segments_ingested == 0
    assert query.summary(LOCAL, NOW + LEASE_S + 1).online == 0
    result = query.sql(LOCAL, "SELECT n FROM range(10) AS r(n)", max_rows=5, timeout_s=2.0)
    assert result.rows == [(0,), (1,), (2,), (3,), (4,)] and result.truncated
    assert query.sql(LOCAL, "SELECT count(*) FROM captures").rows == [(0,)]
    assert query.captures(LOCAL) == []
    with pytest.raises(PermissionDeniedError):
        query.sql(CAR, "SELECT 1")
