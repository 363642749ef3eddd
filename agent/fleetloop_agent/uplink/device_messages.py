"""What a device says to the cloud, built in one place for the agent and the simulator: the greeting
that opens every control session, and the heartbeat that carries its upload backlog.

:class:`Greeting` holds what a device tells about itself; a new fact is one field here and one line in
:meth:`Greeting.hello`, and every device that connects (agent, simulated fleet, held swarm) says it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetloop_agent import __version__
from fleetloop_agent.local_store import LocalStore
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.wire import device_pb2, ota_pb2

#: Pending segments looked at to report the backlog per priority (the store's most urgent first).
BACKLOG_SCAN = 1000


@dataclass(frozen=True)
class Greeting:
    """The messages that open a control session: the hello (who the device is, the signals it has),
    then whatever state the cloud should learn at once (inventory, campaign status, the last OTA step)."""

    device_id: str
    fleet: str
    catalog: Catalog | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    data_origin: str = ""
    agent_version: str = __version__
    inventory: device_pb2.Inventory | None = None
    campaign_status: device_pb2.CampaignStatus | None = None
    ota_status: ota_pb2.OtaStatus | None = None
    #: The catalog's ids are fleet ids or local ones (an agent with a catalog id cache); ``ids`` maps
    #: those the segments now carry differently (a local id whose fleet id has arrived).
    fleet_ids: bool = False
    ids: Mapping[int, int] = field(default_factory=dict)

    def hello(self) -> device_pb2.Hello:
        hello = device_pb2.Hello(
            device_id=self.device_id,
            fleet=self.fleet,
            labels=dict(self.labels),
            agent_version=self.agent_version,
            data_origin=self.data_origin,
            fleet_ids=self.fleet_ids,
        )
        for s in self.catalog or ():
            hello.catalog.add(
                id=self.ids.get(s.id, s.id),
                path=s.path,
                data_type=device_pb2.DataType.Value(f"DATA_TYPE_{s.data_type.name}"),
                unit=s.unit,
            )
        return hello

    def messages(self) -> list[device_pb2.DeviceMessage]:
        """The hello first (the cloud refuses a session that opens otherwise), then the state."""
        out = [device_pb2.DeviceMessage(hello=self.hello())]
        if self.inventory is not None:
            out.append(device_pb2.DeviceMessage(inventory=self.inventory))
        if self.campaign_status is not None:
            out.append(device_pb2.DeviceMessage(campaign_status=self.campaign_status))
        if self.ota_status is not None:
            out.append(device_pb2.DeviceMessage(ota_status=self.ota_status))
        return out


def heartbeat(store: LocalStore, network: str, now_ns: int, *, backlog: bool) -> device_pb2.Heartbeat:
    """A heartbeat with what is pending; with ``backlog``, also the pending bytes per priority, which is
    how a device asks the cloud's upload scheduler for grants."""
    stats = store.stats()
    hb = device_pb2.Heartbeat(
        time_unix_ns=now_ns,
        segments_pending=stats.segments_pending,
        bytes_pending=stats.bytes_pending,
        network=network,
        store_bytes=store.disk_usage(),
        store_quota_bytes=store.quota_bytes,
    )
    if backlog:
        by_priority: dict[int, int] = {}
        for seg in store.pending(limit=BACKLOG_SCAN):
            by_priority[seg.priority] = by_priority.get(seg.priority, 0) + seg.size_bytes
        for priority, size in sorted(by_priority.items()):
            hb.backlog.add(priority=priority, bytes=size)
    return hb
