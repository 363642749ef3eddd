"""What every uplink sends and when, whatever the transport: the upload request of a stored segment,
the backlog heartbeat the cloud's upload scheduler reads, and the bookkeeping of its grants.

No transport library here: the gRPC link (``uplink.py``), the MQTT link (``uplink_mqtt.py``) and the
fleet simulator's links all use these, so they cannot drift apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_shared.wire import device_pb2, ingest_pb2


class UploadGrants:
    """What the cloud's upload scheduler granted and is not spent yet (issue 6), safe from any thread.

    Pure bookkeeping shared by the gRPC and MQTT links and the fleet simulator's, so all follow one
    rule: a grant adds bytes and sets the lowest priority allowed; a segment goes while bytes are left
    (one larger than what is left still goes; the overdraft is paid by the next grants)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0
        self._min_priority = 0

    def add(self, max_bytes: int, min_priority: int) -> None:
        with self._lock:
            self._bytes += max_bytes
            self._min_priority = min_priority

    def take(self, seg: StoredSegment) -> bool:
        """True (and the segment's bytes are spent) when ``seg`` may be uploaded now."""
        with self._lock:
            if self._bytes <= 0 or seg.priority < self._min_priority:
                return False
            self._bytes -= seg.size_bytes
            return True


#: Networks a device reports to the upload scheduler (the cloud budgets cellular apart from the rest).
NETWORKS = ("wifi", "cellular", "ethernet", "other")
#: Pending segments looked at to report the backlog per priority (the store's oldest first).
BACKLOG_SCAN = 1000


def backlog_heartbeat(store: LocalStore, network: str, now_ns: int) -> device_pb2.Heartbeat:
    """A heartbeat carrying what the cloud's upload scheduler needs: pending bytes per priority and the
    network the device is on now. Asking for grants is sending these; the same for every uplink."""
    stats = store.stats()
    by_priority: dict[int, int] = {}
    for seg in store.pending(limit=BACKLOG_SCAN):
        by_priority[seg.priority] = by_priority.get(seg.priority, 0) + seg.size_bytes
    hb = device_pb2.Heartbeat(
        time_unix_ns=now_ns,
        segments_pending=stats.segments_pending,
        bytes_pending=stats.bytes_pending,
        network=network,
    )
    for priority, size in sorted(by_priority.items()):
        hb.backlog.add(priority=priority, bytes=size)
    return hb


def upload_request(device_id: str, seg: StoredSegment, data: bytes) -> ingest_pb2.UploadSegmentRequest:
    """The upload of one stored segment, exactly as every fleetloop uplink sends it."""
    return ingest_pb2.UploadSegmentRequest(
        device_id=device_id,
        segment_id=seg.segment_id,
        capture_id=seg.capture_id,
        campaign=seg.campaign,
        priority=seg.priority,
        segment=data,
    )


def acknowledged(
    seg: StoredSegment,
    resp: ingest_pb2.UploadSegmentResponse,
    metrics: AgentMetrics,
    on_ack: Callable[[StoredSegment, bool], None] | None,
) -> None:
    """The cloud has the segment (stored now, or a duplicate of what it stored before): counted, and
    ``on_ack`` told, the same way on every transport."""
    metrics.segments_uploaded.inc()
    if on_ack is not None:
        on_ack(seg, bool(resp.duplicate))
