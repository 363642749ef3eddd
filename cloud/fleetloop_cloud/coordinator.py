"""The coordinator's domain operations, shared by the gRPC and HTTP surfaces.

Each surface decodes its request, calls one method here and maps :mod:`fleetloop_shared.errors` to its
own status codes; nothing here knows about grpc or HTTP. State lives in the metadata store (SQLite), the
fleet store (Parquet) and the artifact store (content-addressed files), all under one data directory, so
a restarted coordinator resumes where it was.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetloop_cloud.artifact_store import ArtifactStore, check_not_older_than_fleet, is_bundle_image
from fleetloop_cloud.compaction import Compactor
from fleetloop_cloud.director import Director
from fleetloop_cloud.fleet_store import FleetStore
from fleetloop_cloud.metadata import MetadataStore
from fleetloop_cloud.query import QueryEngine, QueryResult
from fleetloop_cloud.rollout_controller import RolloutController
from fleetloop_cloud.rollout_planner import policy_from_dict
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_cloud.tuf_repository import TufRepositories
from fleetloop_cloud.upload_scheduler import NETWORKS, Backlog, Budget, UploadScheduler
from fleetloop_cloud.upload_staging import UploadStaging
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import MalformedMessageError, NotFoundError, UserError
from fleetloop_shared.rules import parse_campaign, selector_matches
from fleetloop_shared.segment import decode_segment
from fleetloop_shared.update.artifact import ReleaseSigner, manifest_from_bytes
from fleetloop_shared.update.delta_format import readable_formats
from fleetloop_shared.wire import device_pb2, ingest_pb2, ota_pb2, parse

log = logging.getLogger("fleetloop.cloud")

ROLLOUT_TICK_S = 0.5
#: How often the fleet store's small segment files are compacted (compaction.py, docs/query.md).
COMPACTION_INTERVAL_S = 60.0
HEARTBEAT_INTERVAL_MS = 2000
#: Largest segment a device may upload in pieces (UploadChunk); UploadSegment is bounded by the gRPC
#: message limit (16 MiB) instead.
MAX_CHUNKED_UPLOAD_BYTES = 256 << 20
#: Upload budgets for devices that ask for grants (issue 6): what the cloud ingests and what cellular costs.
UPLOAD_BUDGET = Budget(
    global_bytes_per_s=64 * 1024 * 1024, per_network_bytes_per_s={"cellular": 4 * 1024 * 1024}
)


@dataclass(frozen=True)
class IngestAck:
    samples: int
    duplicate: bool


@dataclass(frozen=True)
class ChunkAck:
    """Where a resumable upload stands: send from ``next_offset``, or (``ack``) it is stored."""

    next_offset: int
    ack: IngestAck | None = None


class Coordinator:
    """Everything the coordinator does, behind plain methods."""

    def __init__(
        self, data_dir: Path, *, clock: Callable[[], float] = time.time, db: str | None = None
    ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        # db: a postgresql:// URL shared by several coordinators (issue 6); default SQLite in data_dir
        self.metadata = MetadataStore(db if db else data_dir / "metadata.sqlite")
        self.fleet_store = FleetStore(data_dir / "fleet")
        self.query_engine = QueryEngine(data_dir / "fleet", captures=self.metadata.captures)
        # file ages are wall-clock (file mtimes), whatever clock drives the rest
        self.compactor = Compactor(self.fleet_store, self.metadata.has_segment)
        key_path = data_dir / "keys" / "release.pem"
        if key_path.is_file():
            self.signer = ReleaseSigner.load(key_path)
        else:
            key_path.parent.mkdir(parents=True, exist_ok=True)
            self.signer = ReleaseSigner.generate()
            self.signer.save(key_path)
        (data_dir / "keys" / "release.pub.pem").write_bytes(self.signer.public_key_pem())
        # OTA trust (issue 5): TUF image repository + director; devices are provisioned with the
        # roots written to keys/image-root.json and keys/director-root.json.
        self.tuf = TufRepositories(data_dir / "artifacts" / "tuf", data_dir / "keys" / "tuf", clock=clock)
        self.director = Director(self.tuf)
        self.artifacts = ArtifactStore(data_dir / "artifacts", self.signer, tuf=self.tuf)
        self.sessions = DeviceSessions()
        # Resumable uploads (UploadChunk) are staged per coordinator: a device that moves to another
        # coordinator mid-upload starts that segment again there (the dedupe key keeps it exactly once).
        self.staging = UploadStaging(data_dir / "staging", max_upload_bytes=MAX_CHUNKED_UPLOAD_BYTES)
        self.upload_scheduler = UploadScheduler(UPLOAD_BUDGET)
        #: Messages refused from devices, by reason (forged identity, undecodable protobuf, ...): issue 6.
        self.refused: collections.Counter[str] = collections.Counter()
        self.controller = RolloutController(self.metadata, self)
        self.artifact_base_url = ""
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="rollout-controller", daemon=True)
        self._compaction = threading.Thread(target=self._compaction_loop, name="compaction", daemon=True)

    def start(self) -> None:
        self._ticker.start()
        self._compaction.start()

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)
        self._compaction.join(timeout=5)

    def _compaction_loop(self) -> None:
        while not self._stop.wait(COMPACTION_INTERVAL_S):
            try:
                report = self.compactor.run_once()
                if report.files_written or report.leftovers_deleted:
                    log.info("compaction: %s", report.as_dict())
                expired = self.staging.expire(time.time())
                if expired:
                    log.info("upload staging: removed %d partial uploads left for over a day", expired)
            except Exception:
                log.exception("compaction pass failed")

    def _tick_loop(self) -> None:
        while not self._stop.wait(ROLLOUT_TICK_S):
            try:
                self.controller.tick(self._clock())
            except Exception:
                log.exception("rollout controller tick failed")
            self._grant_uploads()

    def _grant_uploads(self) -> None:
        """Issue 6: the upload scheduler's grants for the next tick, pushed to connected devices."""
        try:
            for g in self.upload_scheduler.tick(self._clock(), ROLLOUT_TICK_S):
                grant = device_pb2.UploadGrant(max_bytes=g.max_bytes, min_priority=g.min_priority)
                self.sessions.publish(g.device_id, device_pb2.CloudMessage(upload_grant=grant))
        except Exception:
            log.exception("upload scheduler tick failed")

    # -- devices ----------------------------------------------------------------------------------
    def on_hello(self, hello: device_pb2.Hello) -> None:
        if not hello.device_id:
            raise MalformedMessageError("hello without a device_id")
        catalog = []
        for s in hello.catalog:
            try:
                dtype = DataType(s.data_type).name
            except ValueError:
                raise MalformedMessageError(
                    f"hello from {hello.device_id}: signal {s.path!r} has unknown datatype {s.data_type}"
                ) from None
            catalog.append({"id": s.id, "path": s.path, "data_type": dtype, "unit": s.unit})
        self.metadata.upsert_device(
            hello.device_id,
            fleet=hello.fleet or "default",
            labels=dict(hello.labels),
            catalog=catalog,
            agent_version=hello.agent_version,
            data_origin=hello.data_origin,
            now=self._clock(),
        )
        log.info(
            "device %s connected (%d signals, data %s)", hello.device_id, len(catalog), hello.data_origin
        )

    def welcome_messages(self, device_id: str) -> list[device_pb2.CloudMessage]:
        return [
            device_pb2.CloudMessage(welcome=device_pb2.Welcome(heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)),
            device_pb2.CloudMessage(desired_campaigns=self.desired_campaigns_for(device_id)),
        ]

    def on_device_message(self, device_id: str, msg: device_pb2.DeviceMessage) -> None:
        now = self._clock()
        kind = msg.WhichOneof("kind")
        if kind == "inventory":
            inv = msg.inventory
            self.metadata.update_inventory(
                device_id,
                hardware_id=inv.hardware_id,
                firmware_version=inv.firmware_version,
                firmware_sha256=inv.firmware_sha256,
                active_slot=inv.active_slot,
                campaigns_version=inv.campaigns_version,
                now=now,
                delta_formats=readable_formats(inv.delta_formats) if inv.delta_formats else (),
            )
        elif kind == "heartbeat":
            self.metadata.touch_device(device_id, now, online=True)
            hb = msg.heartbeat
            if hb.backlog:  # the device asks for upload grants (issue 6)
                network = hb.network if hb.network in NETWORKS else "other"
                by_priority = {b.priority: b.bytes for b in hb.backlog if b.priority <= 9}
                self.upload_scheduler.report(Backlog(device_id, network, by_priority), now)
        elif kind == "campaign_status":
            cs = msg.campaign_status
            self.metadata.set_device_campaign_status(
                device_id,
                cs.version,
                list(cs.running),
                {r.name: r.reason for r in cs.refused},
                cs.captures_total,
            )
        elif kind == "ota_status":
            st = msg.ota_status
            state = ota_pb2.OtaState.Name(st.state).removeprefix("OTA_STATE_")
            log.info("device %s ota %s: %s %s", device_id, st.job_id, state, st.reason)
            self.controller.on_device_status(device_id, st.job_id, state, st.reason, now)
        elif kind == "hello":
            raise MalformedMessageError(f"device {device_id}: a second hello on one stream")

    def on_disconnect(self, device_id: str) -> None:
        self.metadata.touch_device(device_id, self._clock(), online=False)
        log.info("device %s disconnected", device_id)

    # -- JobPublisher for the rollout controller ---------------------------------------------------
    def publish_job(
        self, device_id: str, job_id: str, rollout_id: str, manifest: bytes, signature: bytes
    ) -> bool:
        # The director signs this device's targets for the job first; the device verifies them (TUF).
        device = self.metadata.device(device_id)
        self.director.assign(
            device_id,
            job_id=job_id,
            rollout_id=rollout_id,
            release=manifest_from_bytes(manifest),
            installed_sha256=device.firmware_sha256 if device is not None else "",
            delta_formats=readable_formats(device.delta_formats if device is not None else ()),
        )
        job = ota_pb2.OtaJob(
            job_id=job_id,
            rollout_id=rollout_id,
            manifest=manifest,
            signature=signature,
            artifact_base_url=self.artifact_base_url,
        )
        return self.sessions.publish(device_id, device_pb2.CloudMessage(ota_job=job))

    # -- ingest -----------------------------------------------------------------------------------
    def ingest(
        self, device_id: str, segment_id: bytes, capture_id: str, campaign: str, priority: int, data: bytes
    ) -> IngestAck:
        if len(segment_id) != 16:
            raise MalformedMessageError(f"segment id must be 16 bytes, got {len(segment_id)}")
        device = self.metadata.device(device_id)
        if device is None:
            raise NotFoundError(f"unknown device {device_id!r}: connect and say hello first")
        if self.metadata.has_segment(device_id, segment_id):
            return IngestAck(0, True)
        seg = decode_segment(data)
        if seg.segment_id != segment_id:
            raise MalformedMessageError("segment id in the request differs from the one in the segment")
        catalog = self.metadata.device_catalog(device_id)
        for group in seg.groups():  # a format-4 segment carries several groups
            for sid in group.columns:
                try:
                    catalog.by_id(sid)
                except UserError:
                    raise MalformedMessageError(
                        f"segment {segment_id.hex()} names signal id {sid} unknown to device {device_id}"
                    ) from None
        now = self._clock()
        samples = self.fleet_store.write_segment(
            fleet=device.fleet,
            device_id=device_id,
            capture_id=capture_id,
            campaign=campaign,
            segment=seg,
            catalog=catalog,
            received_unix=now,
        )
        first, last = seg.time_range() or (0, 0)
        fresh = self.metadata.record_segment(
            device_id,
            segment_id,
            capture_id=capture_id,
            campaign=campaign,
            priority=priority,
            samples=samples,
            first_ns=first,
            last_ns=last,
            now=now,
        )
        return IngestAck(samples, not fresh)

    def ingest_chunk(
        self,
        device_id: str,
        segment_id: bytes,
        *,
        offset: int,
        total_bytes: int,
        total_sha256: bytes,
        data: bytes,
    ) -> ChunkAck:
        """One piece of a resumable upload (``UploadChunk``); the finished whole goes through
        :meth:`ingest` like an ``UploadSegment`` of the same request."""
        if self.metadata.device(device_id) is None:
            raise NotFoundError(f"unknown device {device_id!r}: connect and say hello first")
        if len(segment_id) == 16 and self.metadata.has_segment(device_id, segment_id):
            return ChunkAck(total_bytes, IngestAck(0, True))
        outcome = self.staging.put(
            device_id, segment_id, offset=offset, total_bytes=total_bytes, total_sha256=total_sha256,
            data=data,
        )
        if outcome.whole is None:
            return ChunkAck(outcome.next_offset)
        request = parse(ingest_pb2.UploadSegmentRequest, outcome.whole, max_bytes=MAX_CHUNKED_UPLOAD_BYTES)
        if request.device_id != device_id or request.segment_id != segment_id:
            raise MalformedMessageError(
                "the assembled upload names another device or segment than its pieces did"
            )
        ack = self.ingest(
            device_id, segment_id, request.capture_id, request.campaign, request.priority, request.segment
        )
        return ChunkAck(total_bytes, ack)

    # -- campaigns --------------------------------------------------------------------------------
    def apply_campaign(self, document: str, source: str = "<campaign>") -> dict[str, Any]:
        """Validate with the same compiler the agents run, then make it desired state."""
        spec = parse_campaign(document, source=source)
        version = self.metadata.put_campaign(spec.name, document, self._clock())
        self._push_campaigns()
        matching = [d.device_id for d in self.metadata.devices() if selector_matches(spec.selector, d.labels)]
        return {"name": spec.name, "campaigns_version": version, "devices": matching}

    def delete_campaign(self, name: str) -> dict[str, Any]:
        version = self.metadata.delete_campaign(name, self._clock())
        self._push_campaigns()
        return {"name": name, "campaigns_version": version}

    def desired_campaigns_for(self, device_id: str) -> device_pb2.DesiredCampaigns:
        version, docs = self.metadata.campaigns()
        device = self.metadata.device(device_id)
        labels: Mapping[str, str] = device.labels if device is not None else {}
        out = device_pb2.DesiredCampaigns(version=version)
        for name, cversion, document in docs:
            try:
                selector = parse_campaign(document, source=name).selector
            except UserError:
                continue
            if selector_matches(selector, labels):
                out.campaigns.append(device_pb2.Campaign(name=name, version=cversion, document=document))
        return out

    def _push_campaigns(self) -> None:
        for device_id in self.sessions.online():
            self.sessions.publish(
                device_id, device_pb2.CloudMessage(desired_campaigns=self.desired_campaigns_for(device_id))
            )

    # -- artifacts and rollouts -------------------------------------------------------------------
    def upload_release(self, image: bytes, *, name: str, version: str, hardware_id: str) -> dict[str, Any]:
        if not image:
            raise UserError("the artifact is empty")
        bases: list[bytes] = []
        seen: set[str] = set()
        base_formats: dict[str, set[str]] = {}  # per base, the format each device on it prefers
        if not is_bundle_image(image):
            # Devices report the firmware they run, so only a slot image can be compared with the fleet;
            # a bundle (model pack, software) is kept moving forward per name by the artifact store.
            check_not_older_than_fleet(
                [d.firmware_version for d in self.metadata.devices() if d.hardware_id == hardware_id],
                version,
                hardware_id,
            )
        for d in self.metadata.devices():
            sha = d.firmware_sha256
            if d.hardware_id == hardware_id and sha:
                base_formats.setdefault(sha, set()).add(readable_formats(d.delta_formats)[0])
            if d.hardware_id != hardware_id or not sha or sha in seen:
                continue
            seen.add(sha)
            try:
                bases.append(self.artifacts.image(sha))
            except NotFoundError:
                continue
        manifest_bytes, signature = self.artifacts.add_release(
            image, name=name, version=version, hardware_id=hardware_id, bases=bases, now=self._clock(),
            base_formats=base_formats,
        )
        self.metadata.put_release(name, version, hardware_id, manifest_bytes, signature, self._clock())
        manifest = manifest_from_bytes(manifest_bytes)
        return {
            "name": name,
            "version": version,
            "hardware_id": hardware_id,
            "sha256": manifest.target_sha256,
            "size": manifest.target_size,
            "payloads": [
                {
                    "kind": p.kind,
                    "algorithm": p.algorithm,
                    "size": p.size,
                    "sha256": p.sha256,
                    "path": p.path,
                    "base_sha256": p.base_sha256,
                }
                for p in manifest.payloads
            ],
        }

    def create_rollout(self, policy: Mapping[str, Any]) -> dict[str, Any]:
        rid = self.controller.create(policy_from_dict(policy), self._clock())
        return self.controller.status(rid)

    def summary(self) -> dict[str, Any]:
        segments, samples, captures = self.metadata.ingest_totals()
        devices = self.metadata.devices()
        version, docs = self.metadata.campaigns()
        return {
            "devices": len(devices),
            "online": len(self.sessions.online()),
            "segments_ingested": segments,
            "samples_ingested": samples,
            "captures_ingested": captures,
            "campaigns": len(docs),
            "campaigns_version": version,
            "refused": dict(self.refused),
        }

    def query(self, sql: str, max_rows: int = 10000) -> QueryResult:
        return self.query_engine.query(sql, max_rows=max_rows)
