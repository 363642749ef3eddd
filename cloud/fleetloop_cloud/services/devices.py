"""Devices: the conversation on a device's control stream (hello, inventory, heartbeats, campaign and OTA
status), which coordinator holds its session, and what an operator reads of the fleet.

A device is *online* while a coordinator whose lease is current holds its session. Each coordinator
beats its lease every :data:`LEASE_BEAT_S`; one that crashes stops beating, and its devices count as
offline :data:`LEASE_S` later — so ``devices list`` never shows a device online for minutes after a
restart, whether one coordinator runs or several share PostgreSQL. A clean stop ends the lease at once.
Transport-free: the surfaces hand in a :class:`~.access.Caller` and the wire messages.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from fleetloop_cloud.repositories.interfaces import CoordinatorLeases, DeviceRepository
from fleetloop_cloud.repositories.records import DeviceRecord, DeviceTelemetry, Inventory, Registration
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_cloud.services.catalogs import FleetCatalogService
from fleetloop_cloud.sessions import DeviceSessions, Session
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.clock import pong_for
from fleetloop_shared.errors import FleetloopError, MalformedMessageError, NotFoundError
from fleetloop_shared.update.delta_format import readable_formats
from fleetloop_shared.wire import device_pb2, ota_pb2

log = logging.getLogger("fleetloop.cloud")

HEARTBEAT_INTERVAL_MS = 2000
#: A coordinator's lease: a session held by a coordinator that has not beaten for this long is over.
LEASE_S = 15.0
#: How often a coordinator beats its lease (a third of it: two beats may be late before devices drop).
LEASE_BEAT_S = 5.0
#: Leases older than this are forgotten (their coordinators are long gone); keeps the table small.
LEASE_FORGET_S = 24 * 3600.0
#: Catalog assignments made at a hello and not yet sent with its welcome (a stream that ends between the
#: two leaves one behind); beyond it the oldest is dropped — that device gets it at its next hello.
PENDING_ASSIGNMENTS = 4096


class CampaignsFor(Protocol):
    """The desired campaigns of one device (``services.campaigns``)."""

    def desired_for(self, device_id: str) -> device_pb2.DesiredCampaigns: ...


class OtaReports(Protocol):
    """Where a device's OTA status and its new sessions go (the rollout controller)."""

    def on_device_status(
        self, device_id: str, job_id: str, state: str, reason: str, now: float, *,
        running_version: str = "", waiting: bool = False,
    ) -> None: ...  # fmt: skip

    def on_device_connected(self, device_id: str, now: float) -> None: ...


class BacklogReports(Protocol):
    """Where a heartbeat's upload backlog goes (``services.ingest.UploadGrants``)."""

    def report(self, device_id: str, heartbeat: device_pb2.Heartbeat, now: float) -> None: ...


@dataclass(frozen=True)
class DeviceStatus:
    """A device, whether it is online now, and what its latest heartbeat reported."""

    record: DeviceRecord
    online: bool
    telemetry: DeviceTelemetry | None = None


def telemetry_of(heartbeat: device_pb2.Heartbeat, now: float) -> DeviceTelemetry:
    """What a heartbeat says of the device's store and clock (offset 0 when it sent no time)."""
    hb = heartbeat
    offset_ms = hb.time_unix_ns / 1e6 - now * 1000.0 if hb.time_unix_ns else 0.0
    return DeviceTelemetry(
        reported_at=now, segments_pending=hb.segments_pending, bytes_pending=hb.bytes_pending,
        store_bytes=hb.store_bytes, store_quota_bytes=hb.store_quota_bytes,
        clock_offset_ms=round(offset_ms, 1), network=hb.network,
    )  # fmt: skip


@dataclass(frozen=True)
class Census:
    devices: int
    online: int


def registration(hello: device_pb2.Hello) -> Registration:
    """What a hello registers; MalformedMessageError for a signal of an unknown datatype."""
    catalog = []
    for s in hello.catalog:
        try:
            dtype = DataType(s.data_type).name
        except ValueError:
            raise MalformedMessageError(
                f"hello from {hello.device_id}: signal {s.path!r} has unknown datatype {s.data_type}"
            ) from None
        catalog.append({"id": s.id, "path": s.path, "data_type": dtype, "unit": s.unit})
    return Registration(
        fleet=hello.fleet or "default",
        labels=dict(hello.labels),
        catalog=catalog,
        agent_version=hello.agent_version,
        data_origin=hello.data_origin,
    )


#: What every device hears first: how often to beat, and that clock pings are answered here.
WELCOME = device_pb2.Welcome(heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS, answers_clock_ping=True)
#: The same, from a coordinator that assigns fleet catalog ids.
WELCOME_WITH_IDS = device_pb2.Welcome(
    heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS, answers_clock_ping=True, assigns_catalog_ids=True
)


class DeviceService:
    """Devices as seen by one coordinator (``coordinator_id``): its sessions and the fleet's records."""

    def __init__(
        self,
        devices: DeviceRepository,
        leases: CoordinatorLeases,
        sessions: DeviceSessions,
        access: Access,
        *,
        coordinator_id: str,
        campaigns: CampaignsFor,
        ota: OtaReports,
        backlog: BacklogReports,
        catalogs: FleetCatalogService | None = None,
    ) -> None:
        self._devices = devices
        #: Assigns fleet catalog ids at each hello (None: devices keep their own ids, as before).
        self._catalogs = catalogs
        self._assignments: OrderedDict[str, device_pb2.CloudMessage] = OrderedDict()
        self._assignments_lock = threading.Lock()
        #: Assignments dropped at the PENDING_ASSIGNMENTS bound, for metrics.
        self.assignments_dropped = 0
        self._leases = leases
        self._sessions = sessions
        self._access = access
        self.coordinator_id = coordinator_id
        self._campaigns = campaigns
        self._ota = ota
        self._backlog = backlog

    # -- the lease --------------------------------------------------------------------------------
    def beat(self, now: float) -> None:
        """Renew this coordinator's lease (and forget leases long expired)."""
        self._leases.beat(self.coordinator_id, now)
        self._leases.reap(now - LEASE_FORGET_S)

    def retire(self) -> None:
        """A clean stop: every session this coordinator holds is over now."""
        self._leases.retire(self.coordinator_id)

    # -- the control stream -----------------------------------------------------------------------
    def connect(
        self, caller: Caller, hello: device_pb2.Hello, now: float, wake: Callable[[], None] | None = None
    ) -> Session:
        """A device's hello: register it (or refresh what it says), hold its session here, and open the
        outbox its pushes go to (``wake`` is told of each push and of the close)."""
        device_id = self._access.device(caller, hello.device_id)
        if not device_id:
            raise MalformedMessageError("hello without a device_id")
        previous = self._devices.get(device_id)
        new = previous is None
        reg = registration(hello)
        if self._catalogs is not None:
            entries, assignment = self._catalogs.on_hello(
                device_id, reg.fleet, hello.fleet_ids, reg.catalog, previous.catalog if previous else []
            )
            reg = dataclasses.replace(reg, catalog=entries)
            if assignment is not None:
                self._pend(device_id, device_pb2.CloudMessage(catalog_assignment=assignment.to_wire()))
        self._devices.register(device_id, reg, owner=self.coordinator_id, now=now)
        if new:  # a device joining the fleet is for operators to see; its later reports are telemetry
            self._access.record(caller, "devices.register", device_id, now,
                                detail=f"fleet {hello.fleet or 'default'}, proven: {caller.proven}")
        session = self._sessions.open(device_id, wake, transport=caller.transport)
        self._resend_offers(device_id, now)
        log.info(
            "device %s connected over %s (%d signals, data %s)",
            device_id, caller.transport, len(hello.catalog), hello.data_origin,
        )  # fmt: skip
        return session

    def attach(self, caller: Caller, now: float, wake: Callable[[], None] | None = None) -> Session:
        """Hold the session of a device that said hello elsewhere (another coordinator on the shared
        MQTT subscription, or this one's predecessor): pushes for it go out from here too. NotFoundError
        when no coordinator has seen its hello."""
        device_id = self._access.device(caller, caller.name)
        if self._devices.get(device_id) is None:
            raise NotFoundError(f"device {device_id!r}: a message before any hello")
        session = self._sessions.open(device_id, wake, transport=caller.transport)
        self._devices.touch(device_id, now, owner=self.coordinator_id)
        self._resend_offers(device_id, now)  # over MQTT a restarted coordinator sees no new hello
        return session

    def _resend_offers(self, device_id: str, now: float) -> None:
        """A new session here: the device's offered jobs go out again (a job queued on its previous
        session may never have reached it). Failing that, its session still opens: such a job then waits
        for its rollout's success timeout, as without this."""
        try:
            self._ota.on_device_connected(device_id, now)
        except FleetloopError as exc:
            log.warning("device %s: its offered jobs were not marked for sending again: %s", device_id, exc)

    def _pend(self, device_id: str, msg: device_pb2.CloudMessage) -> None:
        with self._assignments_lock:
            self._assignments[device_id] = msg
            self._assignments.move_to_end(device_id)
            while len(self._assignments) > PENDING_ASSIGNMENTS:
                self._assignments.popitem(last=False)  # drop-oldest: that device's next hello asks again
                self.assignments_dropped += 1

    def pending_assignments(self) -> int:
        """Assignments waiting for their device's welcome (bounded by PENDING_ASSIGNMENTS)."""
        with self._assignments_lock:
            return len(self._assignments)

    def welcome(self, caller: Caller) -> list[device_pb2.CloudMessage]:
        """What a device gets after its hello: the welcome, its catalog assignment (a device that asked
        for fleet ids) and its desired campaigns."""
        device_id = self._access.device(caller, caller.name)
        with self._assignments_lock:
            assignment = self._assignments.pop(device_id, None)
        welcome = WELCOME if self._catalogs is None else WELCOME_WITH_IDS
        return [
            device_pb2.CloudMessage(welcome=welcome),
            *([assignment] if assignment is not None else []),
            device_pb2.CloudMessage(desired_campaigns=self._campaigns.desired_for(device_id)),
        ]

    def receive(self, caller: Caller, msg: device_pb2.DeviceMessage, now: float) -> None:
        """One message on the device's stream after its hello, applied before the next is read."""
        device_id = self._access.device(caller, caller.name)
        kind = msg.WhichOneof("kind")
        if kind == "inventory":
            inv = msg.inventory
            inventory = Inventory(
                inv.hardware_id, inv.firmware_version, inv.firmware_sha256, inv.active_slot,
                inv.campaigns_version, inv.time_zone[:64],
                readable_formats(inv.delta_formats) if inv.delta_formats else (),
            )  # fmt: skip
            self._devices.update_inventory(device_id, inventory, now)
        elif kind == "heartbeat":
            self._devices.touch(device_id, now, owner=self.coordinator_id,
                                telemetry=telemetry_of(msg.heartbeat, now))  # fmt: skip
            if msg.heartbeat.backlog:
                self._backlog.report(device_id, msg.heartbeat, now)
        elif kind == "campaign_status":
            cs = msg.campaign_status
            refused = {r.name: r.reason for r in cs.refused}
            self._devices.set_campaign_status(
                device_id, cs.version, list(cs.running), refused, cs.captures_total
            )
        elif kind == "ota_status":
            st = msg.ota_status
            state = ota_pb2.OtaState.Name(st.state).removeprefix("OTA_STATE_")
            log.info("device %s ota %s: %s %s", device_id, st.job_id, state, st.reason)
            self._ota.on_device_status(device_id, st.job_id, state, st.reason, now,
                                       running_version=st.running_version, waiting=st.install_waiting)
        elif kind == "clock_ping":
            # answered at once through the device's session here; the stamps are this coordinator's clock
            stamp = int(now * 1e9)
            self._sessions.publish(device_id, pong_for(msg.clock_ping, stamp, stamp))
        elif kind == "hello":
            raise MalformedMessageError(f"device {device_id}: a second hello on one stream")

    def release(self, session: Session) -> bool:
        """Close the session of a stream that ended, here and at once (no I/O: safe on an event loop).
        True if it was the device's current session here; then :meth:`offline` records that it left."""
        return self._sessions.close(session)

    def offline(self, device_id: str) -> None:
        """The device's stream here ended: it is offline, unless another coordinator holds its session
        by now (a metadata write)."""
        if self._devices.end_session(device_id, owner=self.coordinator_id):
            log.info("device %s disconnected", device_id)

    def disconnect(self, session: Session) -> None:
        """:meth:`release`, then :meth:`offline` when it was the device's current session."""
        if self.release(session):
            self.offline(session.device_id)

    def gone(self, caller: Caller, session: Session | None) -> None:
        """The transport says the device left (MQTT's last will): its session is over wherever it was."""
        device_id = self._access.device(caller, caller.name)
        if session is not None:
            self._sessions.close(session)
        if self._devices.end_session(device_id, owner=None):
            log.info("device %s disconnected", device_id)

    # -- what operators read ----------------------------------------------------------------------
    def _alive(self, now: float) -> set[str]:
        return self._leases.alive(now - LEASE_S)

    def fleet(self, caller: Caller, now: float) -> list[DeviceStatus]:
        self._access.operator(caller, "devices.list")
        alive = self._alive(now)
        telemetry = self._devices.telemetry()
        return [
            DeviceStatus(d, d.session_owner in alive, telemetry.get(d.device_id)) for d in self._devices.all()
        ]

    def describe(self, caller: Caller, device_id: str, now: float) -> DeviceStatus:
        self._access.operator(caller, "devices.get")
        record = self._devices.get(device_id)
        if record is None:
            raise NotFoundError(f"unknown device {device_id!r}")
        telemetry = self._devices.telemetry().get(device_id)
        return DeviceStatus(record, record.session_owner in self._alive(now), telemetry)

    def catalog(self, caller: Caller, device_id: str) -> Catalog:
        """The device's catalog as its hello sent it, each signal with the class the cloud assigns it
        (the device's fleet's rules, the built-in defaults; devices send no classes)."""
        self._access.operator(caller, "devices.get")
        catalog = self._devices.catalog(device_id)
        record = self._devices.get(device_id)
        fleet = record.fleet if record is not None else ""
        classify = self._access.classification.classify
        return Catalog(replace(s, signal_class=classify(fleet, s.path)) for s in catalog)

    def census(self, now: float) -> Census:
        """How many devices are registered and how many are online, fleet-wide."""
        alive = self._alive(now)
        records = self._devices.all()
        return Census(len(records), sum(d.session_owner in alive for d in records))
