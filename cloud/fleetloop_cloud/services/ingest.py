"""Ingest: segments from devices into the fleet store, exactly once, and the upload grants that pace them.

A segment is checked before anything is written — a known device, a segment that decodes (else
DATA_LOSS), ids that agree, signal ids the device's catalog names — then its samples are written (one
Parquet file named by device and segment id, so a retry rewrites the same file) and recorded in the
ingest ledger, whose (device, segment id) key answers a retry "duplicate". Resumable uploads
(``UploadChunk``) are staged until whole and then take the same path.

A device whose data was erased (``services.lifecycle``) has every segment with samples from before the
erasure refused the same way: what it still held is not taken again.

Defense in depth: a segment that carries a signal its campaign's privacy policy drops, or a clear
identifier it hashes, is refused before anything is written (``PrivacyViolationError``, which the device
gets as a refusal with the reason and does not retry), counted as outcome ``refused_privacy``. The policy
a capture was taken under (sent by the device) is kept with the capture.

What ingest observes — segments by outcome (stored, duplicate, refused), samples and bytes stored, the
time to answer each upload request and to make each new segment durable — goes to the narrow
:class:`IngestMetrics` this service owns, labelled by transport, never by device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from fleetloop_cloud.metrics.memory import MemoryMetrics
from fleetloop_cloud.repositories.interfaces import DeviceRepository, SegmentRepository
from fleetloop_cloud.repositories.records import SegmentReceipt
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_cloud.services.catalogs import aliases_of
from fleetloop_cloud.services.privacy import CampaignPolicies
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_cloud.uploads.clock_check import REFUSED, cloud_span, judge
from fleetloop_cloud.uploads.scheduler import Backlog, Budget, UploadScheduler
from fleetloop_cloud.uploads.staging import StagingLimits, UploadStaging
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.catalog_ids import remap_segment
from fleetloop_shared.errors import (
    FleetloopError,
    MalformedMessageError,
    NotFoundError,
    PrivacyViolationError,
    UserError,
)
from fleetloop_shared.networks import NETWORKS
from fleetloop_shared.privacy import PolicyStamp, violations
from fleetloop_shared.segment import Segment, decode_segment
from fleetloop_shared.wire import device_pb2, ingest_pb2, parse

log = logging.getLogger("fleetloop.cloud.ingest")

#: Largest segment a device may upload in pieces (UploadChunk), unless configured
#: (``uploads.staging.max_upload_bytes``); UploadSegment is bounded by the gRPC message limit (16 MiB).
MAX_CHUNKED_UPLOAD_BYTES = StagingLimits().max_upload_bytes
#: Longest privacy policy stamp kept with a capture (name, version, key id as the device sent them).
MAX_STAMP_CHARS = 300
#: Upload budgets for devices that ask for grants: what the cloud ingests and what cellular costs.
UPLOAD_BUDGET = Budget(
    global_bytes_per_s=64 * 1024 * 1024, per_network_bytes_per_s={"cellular": 4 * 1024 * 1024}
)


class SampleStore(Protocol):
    """Where ingested samples go (the fleet store, in either table format)."""

    def write_segment(
        self, *, fleet: str, device_id: str, capture_id: str, campaign: str, segment: Segment,
        catalog: Catalog, received_unix: float, clock_offset_ns: int | None = None, privacy: str = "",
    ) -> int:  # fmt: skip
        """Store one segment's samples durably and return how many; storing it again is harmless. With
        ``clock_offset_ns`` (device minus cloud), times are stored on the cloud's clock; ``privacy`` is
        the policy stamp of its capture (a table format that keeps captures beside the samples keeps it)."""
        ...


class IngestMetrics(Protocol):
    """Where ingest's observations go (the coordinator's metrics)."""

    def segment(
        self, transport: str, outcome: str, *, samples: int = 0, size: int = 0, seconds: float | None = None
    ) -> None:
        """One segment ``stored`` (with its samples, encoded size and seconds to make it durable),
        ``duplicate`` or ``refused``."""

    def upload(self, transport: str, kind: str, seconds: float) -> None:
        """One upload request answered (``segment`` or ``chunk``), refused ones included."""

    def clock_offset(self, transport: str, status: str) -> None:
        """One new segment's clock offset ``applied``, ``unmeasured`` or ``refused``."""


@dataclass(frozen=True)
class IngestAck:
    samples: int
    duplicate: bool

    def response(self, segment_id: bytes) -> ingest_pb2.UploadSegmentResponse:
        """The device's answer, the same over gRPC and MQTT."""
        return ingest_pb2.UploadSegmentResponse(
            segment_id=segment_id, duplicate=self.duplicate, samples=self.samples
        )


@dataclass(frozen=True)
class ChunkAck:
    """Where a resumable upload stands: send from ``next_offset``, or (``ack``) it is stored."""

    next_offset: int
    ack: IngestAck | None = None

    def response(self, segment_id: bytes) -> ingest_pb2.UploadChunkResponse:
        """The device's answer to the piece; the last one carries the segment's ack."""
        out = ingest_pb2.UploadChunkResponse(next_offset=self.next_offset, complete=self.ack is not None)
        if self.ack is not None:
            out.result.CopyFrom(self.ack.response(segment_id))
        return out


@dataclass
class _LedgerWrite:
    entry: tuple[str, bytes, SegmentReceipt, float]
    done: bool = False
    fresh: bool = False
    error: BaseException | None = None


class LedgerWrites:
    """The ingest ledger's rows written together: concurrent :meth:`record` calls (the segments of one
    fleet-store batch, acknowledged at once) share one transaction, at most ``max_rows`` each (more wait
    for the next). No call waits for others to arrive: whoever finds no transaction under way writes
    what is queued, and what queues meanwhile goes in the next one. A transaction per segment was the
    database's largest write load at fleet scale (docs/scale.md), and on PostgreSQL every write
    transaction takes the coordinators' shared write lock. ``counters`` is the metric."""

    def __init__(self, segments: SegmentRepository, *, max_rows: int = 256) -> None:
        self._segments = segments
        self._max_rows = max_rows
        self._cond = threading.Condition()
        self._queue: list[_LedgerWrite] = []
        self._writing = False
        self.counters = {"transactions": 0, "rows": 0}

    def record(self, device_id: str, segment_id: bytes, receipt: SegmentReceipt, now: float) -> bool:
        """:meth:`SegmentRepository.record`, in a transaction shared with concurrent calls."""
        mine = _LedgerWrite((device_id, segment_id, receipt, now))
        with self._cond:
            self._queue.append(mine)
            while not mine.done:
                if self._writing:
                    self._cond.wait()
                    continue
                batch = self._queue[: self._max_rows]
                del self._queue[: len(batch)]
                self._writing = True
                self._cond.release()
                try:
                    self._write(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.fresh

    def _write(self, batch: list[_LedgerWrite]) -> None:
        try:
            results = self._segments.record_many([w.entry for w in batch])
        except BaseException as exc:
            for w in batch:
                w.error, w.done = exc, True
            if not isinstance(exc, Exception):
                raise
            return
        self.counters["transactions"] += 1
        self.counters["rows"] += len(batch)
        for w, fresh in zip(batch, results, strict=True):
            w.fresh, w.done = fresh, True


class IngestService:
    def __init__(
        self,
        devices: DeviceRepository,
        segments: SegmentRepository,
        samples: SampleStore,
        staging: UploadStaging,
        access: Access,
        *,
        metrics: IngestMetrics | None = None,
        max_upload_bytes: int = MAX_CHUNKED_UPLOAD_BYTES,
        timer: Callable[[], float] = time.perf_counter,
        policies: CampaignPolicies | None = None,
        erased_before: Callable[[str], float | None] | None = None,
    ) -> None:
        self._policies = policies
        self._erased_before = erased_before
        self._devices = devices
        self._segments = segments
        self.ledger = LedgerWrites(segments)
        self._samples = samples
        self._staging = staging
        self._access = access
        self._metrics: IngestMetrics = metrics if metrics is not None else MemoryMetrics()
        self._max_upload_bytes = max_upload_bytes
        self._timer = timer

    @contextmanager
    def _observed(self, caller: Caller, kind: str) -> Iterator[None]:
        """Time the request; a refused one (any error of ours) counts as a refused segment."""
        started = self._timer()
        try:
            yield
        except PrivacyViolationError:
            self._metrics.segment(caller.transport, "refused_privacy")
            raise
        except FleetloopError:
            self._metrics.segment(caller.transport, "refused")
            raise
        finally:
            self._metrics.upload(caller.transport, kind, self._timer() - started)

    def segment(self, caller: Caller, request: ingest_pb2.UploadSegmentRequest, now: float) -> IngestAck:
        """One whole segment (``UploadSegment``)."""
        r = request
        with self._observed(caller, "segment"):
            device_id = self._access.device(caller, r.device_id)
            return self._ingest(caller.transport, device_id, r, now)

    def chunk(self, caller: Caller, request: ingest_pb2.UploadChunkRequest, now: float) -> ChunkAck:
        """One piece of a resumable upload (``UploadChunk``); the finished whole is ingested like an
        ``UploadSegment`` of the same request."""
        with self._observed(caller, "chunk"):
            return self._chunk(caller, request, now)

    def _chunk(self, caller: Caller, request: ingest_pb2.UploadChunkRequest, now: float) -> ChunkAck:
        r = request
        device_id = self._access.device(caller, r.device_id)
        if self._devices.get(device_id) is None:
            raise NotFoundError(f"unknown device {device_id!r}: connect and say hello first")
        if len(r.segment_id) == 16 and self._segments.has(device_id, r.segment_id):
            self._metrics.segment(caller.transport, "duplicate")
            return ChunkAck(r.total_bytes, IngestAck(0, True))
        outcome = self._staging.put(
            device_id, r.segment_id, offset=r.offset, total_bytes=r.total_bytes,
            total_sha256=r.total_sha256, data=r.data,
        )  # fmt: skip
        if outcome.whole is None:
            return ChunkAck(outcome.next_offset)
        whole = parse(ingest_pb2.UploadSegmentRequest, outcome.whole, max_bytes=self._max_upload_bytes)
        if whole.device_id != device_id or whole.segment_id != r.segment_id:
            raise MalformedMessageError(
                "the assembled upload names another device or segment than its pieces did"
            )
        ack = self._ingest(caller.transport, device_id, whole, now)
        return ChunkAck(r.total_bytes, ack)

    def _ingest(
        self, transport: str, device_id: str, request: ingest_pb2.UploadSegmentRequest, now: float
    ) -> IngestAck:
        r = request
        segment_id, capture_id, campaign, data = r.segment_id, r.capture_id, r.campaign, r.segment
        if len(segment_id) != 16:
            raise MalformedMessageError(f"segment id must be 16 bytes, got {len(segment_id)}")
        device = self._devices.get(device_id)
        if device is None:
            raise NotFoundError(f"unknown device {device_id!r}: connect and say hello first")
        if self._segments.has(device_id, segment_id):
            self._metrics.segment(transport, "duplicate")
            return IngestAck(0, True)
        started = self._timer()
        # written before the device had its fleet ids: its local ids name the same signals
        seg = remap_segment(decode_segment(data), aliases_of(device.catalog))
        if seg.segment_id != segment_id:
            raise MalformedMessageError("segment id in the request differs from the one in the segment")
        catalog = self._devices.catalog(device_id)
        for group in seg.groups():  # a format-4 segment carries several groups
            for sid in group.columns:
                try:
                    catalog.by_id(sid)
                except UserError:
                    raise MalformedMessageError(
                        f"segment {segment_id.hex()} names signal id {sid} unknown to device {device_id}"
                    ) from None
        policy = self._policies.policy_for(campaign, now) if self._policies is not None else None
        found = violations(policy, seg, catalog) if policy is not None else []
        if found:
            raise PrivacyViolationError(f"segment {segment_id.hex()} refused: {'; '.join(found)}")
        span = seg.time_range()
        erased = self._erased_before(device_id) if self._erased_before is not None else None
        if erased is not None and span is not None and span[0] < int(erased * 1e9):
            raise PrivacyViolationError(
                f"segment {segment_id.hex()} refused: device {device_id}'s data before its erasure "
                f"at {erased:.0f} (unix s) is not taken again"
            )
        clock = judge(
            r.clock if r.HasField("clock") else None,
            span[0] if span else None, span[1] if span else None, int(now * 1e9),
        )  # fmt: skip
        stamp = PolicyStamp(r.privacy_policy, r.privacy_policy_version, r.privacy_key_id)
        privacy = stamp.text()[:MAX_STAMP_CHARS] if r.privacy_policy else ""
        samples = self._samples.write_segment(
            fleet=device.fleet, device_id=device_id, capture_id=capture_id, campaign=campaign, segment=seg,
            catalog=catalog, received_unix=now, clock_offset_ns=clock.applied_ns, privacy=privacy,
        )  # fmt: skip
        first, last = cloud_span(seg, clock.applied_ns)
        receipt = SegmentReceipt(
            capture_id, campaign, r.priority, samples, first, last, privacy,
            clock_offset_ns=clock.reported_ns, clock_round_trip_ns=clock.round_trip_ns,
            clock_status=clock.status,
        )  # fmt: skip
        fresh = self.ledger.record(device_id, segment_id, receipt, now)
        if fresh:
            self._metrics.segment(
                transport, "stored", samples=samples, size=len(data), seconds=self._timer() - started
            )
            self._metrics.clock_offset(transport, clock.status)
            if clock.status == REFUSED:
                log.warning("device %s: clock offset not applied to segment %s: %s",
                            device_id, segment_id.hex(), clock.reason)  # fmt: skip
        else:  # another coordinator recorded it first
            self._metrics.segment(transport, "duplicate")
        return IngestAck(samples, not fresh)


class UploadGrants:
    """The upload scheduler behind a lock, fed by heartbeats and ticked by the coordinator: each tick's
    grants are pushed to the devices connected here."""

    def __init__(self, scheduler: UploadScheduler, sessions: DeviceSessions) -> None:
        self.scheduler = scheduler
        self._sessions = sessions
        self._lock = threading.Lock()

    def report(self, device_id: str, heartbeat: device_pb2.Heartbeat, now: float) -> None:
        network = heartbeat.network if heartbeat.network in NETWORKS else "other"
        by_priority = {b.priority: b.bytes for b in heartbeat.backlog if b.priority <= 9}
        with self._lock:
            self.scheduler.report(Backlog(device_id, network, by_priority), now)

    def pending_bytes(self, device_id: str) -> int:
        with self._lock:
            return self.scheduler.pending_bytes(device_id)

    def tick(self, now: float, dt: float) -> int:
        """Grant the next ``dt`` seconds' budgets; returns how many grants reached a device."""
        with self._lock:
            grants = self.scheduler.tick(now, dt)
        pushed = 0
        for g in grants:
            grant = device_pb2.UploadGrant(max_bytes=g.max_bytes, min_priority=g.min_priority)
            pushed += self._sessions.publish(g.device_id, device_pb2.CloudMessage(upload_grant=grant))
        return pushed
