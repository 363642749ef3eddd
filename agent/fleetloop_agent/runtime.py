"""The agent's driver: owns the loop, the threads and the I/O; the decisions live in pure cores.

Data path per tick (time passed in, data time = start + elapsed × replay speed):
sources → ring buffers → trigger engine → capture assembler → local store → link (its own thread).
Control path: the link's control session delivers desired campaigns (compiled here, refused with a
reason if they do not compile) and OTA jobs (run by the OTA worker thread through ``OtaDriver``, which
journals before each side effect and asks for a reboot by raising ``RebootRequested``).
Model packs: ``model("name", w)`` scores come from a :class:`ModelRegistry` loaded from the installed
model-pack bundles (``<state_dir>/ota/bundles/<name>/current/model.yaml``) and the optional
``models_dir``. A bundle installed by the OTA worker only raises a flag; the main loop reloads the
registry in place and re-applies the desired campaigns, so campaigns calling a changed model restart
with it, campaigns that were refused for want of it start, and every other campaign keeps its state.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from fleetloop_agent import __version__
from fleetloop_agent.capture import Capture, CaptureAssembler
from fleetloop_agent.catalog_cache import CatalogIds
from fleetloop_agent.catalog_upgrade import legacy_catalog, needs_upgrade, upgrade_store
from fleetloop_agent.config import AgentConfig
from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.models import MANIFEST, ModelPack, ModelRegistry, load_model_pack
from fleetloop_agent.ota.download import HttpFetcher
from fleetloop_agent.ota.driver import OtaDriver, OtaReport
from fleetloop_agent.ota.platform import EXIT_REBOOT, EnvFilePlatform, RebootRequested
from fleetloop_agent.privacy_state import PrivacyTotals, keys_from_json, keys_from_wire, keys_to_json
from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.sources import SignalSource, build_source
from fleetloop_agent.sources.live import LIVE_ORIGIN, Closable, source_totals
from fleetloop_agent.trigger_engine import TriggerEngine
from fleetloop_agent.uplink import Greeting, Link, UplinkTransport, heartbeat
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.mqtt_transport import MqttSettings, MqttTransport
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.catalog_ids import assignment_from_wire, is_fleet_id, remap_segment
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import FleetloopError, IntegrityError, RuleError, StorageFullError
from fleetloop_shared.privacy import KeyRing, apply_policy
from fleetloop_shared.rules import CampaignSpec, check_against_catalog, parse_campaign, selector_matches
from fleetloop_shared.segment import BUNDLE_MAX_ROWS, FORMAT_VERSION
from fleetloop_shared.wire import device_pb2, ota_pb2

log = logging.getLogger("fleetloop.agent")

TICK_S = 0.1
MIN_HORIZON_NS = 10 * 1_000_000_000
#: How long the post-reboot health check waits for the cloud before calling it unreachable.
HEALTH_CLOUD_WAIT_S = 20.0
#: Bounded queue of OTA jobs waiting for the worker; overflow policy: refuse (the cloud re-offers).
OTA_QUEUE_LIMIT = 4


@dataclass
class _DesiredState:
    version: int
    documents: list[tuple[str, int, str]]


class AgentRuntime:
    """One agent process: build everything from the config, run until stopped or rebooting.

    The link reaches the cloud over ``transport``, by default the one the config names."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: UplinkTransport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self._monotonic = monotonic
        self._wall_ns = wall_ns
        self.metrics = AgentMetrics()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        #: The fleet's catalog ids as last assigned, and this device's local ids for the others.
        first_run = not (config.state_dir / "catalog_ids.json").exists()
        self.catalog_ids = CatalogIds(config.state_dir / "catalog_ids.json", config.fleet)
        self.catalog = Catalog(assign=self.catalog_ids.assign)
        self.start_ns = wall_ns()
        self.sources: list[SignalSource] = [
            build_source(spec, base_dir=config.base_dir, start_ns=self.start_ns) for spec in config.sources
        ]
        # a store an older agent left holds registration-order ids: the same configuration's, declared
        # first (a source keeps the ids of its last declare)
        legacy = legacy_catalog(self.sources) if first_run and needs_upgrade(config.store_dir) else None
        for src in self.sources:
            src.declare(self.catalog)
        #: Local id → fleet id, for the signals whose fleet id arrived after they were declared.
        self.segment_ids = self.catalog_ids.segment_ids(self.catalog)
        # CAN sources decode on a cadence: their samples may arrive this much after their time, so a
        # capture is cut that much later and the ring buffers keep that much more
        self._decode_lag_ns = max((int(getattr(s, "decode_lag_ns", 0)) for s in self.sources), default=0)
        origins = {s.origin for s in self.sources}
        # one origin when all sources agree; otherwise any simulated data makes the whole simulated
        self.data_origin = (
            origins.pop() if len(origins) == 1 else "simulated" if "simulated" in origins else LIVE_ORIGIN
        )
        self.buffers = RingBuffers(self.catalog, horizon_ns=MIN_HORIZON_NS)
        #: One registry for the process, replaced in place on reload (running evaluators hold it).
        self.models = ModelRegistry()
        self.engine = TriggerEngine(self.catalog, models=self.models)
        self.assembler = CaptureAssembler(self.catalog)
        self.store = LocalStore(
            config.store_dir,
            quota_bytes=config.store_quota_bytes,
            segment_version=config.store_segment_version or FORMAT_VERSION,
        )
        # before the uplink starts, and before the cache exists (which ends first runs)
        self.store_upgrade = upgrade_store(self.store, legacy, self.catalog)
        self.catalog_ids.save(force=first_run)
        self._sync_catalog_metrics()
        pc = config.platform
        self.platform = EnvFilePlatform(
            pc.slots, pc.env, pc.booted_slot, health_commands=[list(c) for c in pc.health_commands]
        )
        self.ota = OtaDriver(
            self.platform,
            config.state_dir / "ota",
            trust_anchors=[p.read_bytes() for p in config.trusted_release_keys],  # TUF roots
            hardware_id=pc.hardware_id,
            device_id=config.device_id,
            report=self._on_ota_report,
            fetcher=HttpFetcher(ca=config.cloud_ca),
            on_bundle=self._on_bundle,
            delta_formats=config.delta_formats,
        )
        #: Set by the OTA worker when a bundle is switched; the main loop reloads the model registry.
        self._bundles_changed = threading.Event()
        self.specs: dict[str, CampaignSpec] = {}
        self.refused: dict[str, str] = {}
        self.desired = _DesiredState(0, [])
        self.captures_total = 0
        #: The fleet's keys for hashing identifiers (``spec.privacy.hash``), from the cloud.
        self.privacy_keys = KeyRing()
        self.privacy = PrivacyTotals()
        self._inbox: queue.Queue[device_pb2.CloudMessage] = queue.Queue(maxsize=256)
        self._ota_jobs: queue.Queue[ota_pb2.OtaJob | ota_pb2.OtaCancel] = queue.Queue(maxsize=OTA_QUEUE_LIMIT)
        self._stop = threading.Event()
        self._reboot = threading.Event()
        self._last_ota: OtaReport | None = None
        self.link = Link(
            transport if transport is not None else transport_from_config(config),
            device_id=config.device_id,
            store=self.store,
            metrics=self.metrics,
            greeting=self._greeting,
            on_message=self._on_cloud_message,
            upload_deadline_s=config.upload_deadline_s,
            scheduled=config.upload_scheduled,
        )
        self.models.replace(self._discover_models())
        self._load_desired()

    # -- lifecycle --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Run until :meth:`stop` (returns 0) or until an update needs a reboot (returns EXIT_REBOOT)."""
        log.info(
            "agent %s starting: device %s, firmware %s, slot %s, data %s, %d signals",
            __version__,
            self.config.device_id,
            self.ota.installed_version(),
            self.platform.booted_slot(),
            self.data_origin,
            len(self.catalog),
        )
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port)
        self.link.start()
        worker = threading.Thread(target=self._ota_worker, name="ota", daemon=True)
        worker.start()
        mono0 = self._monotonic()
        last_beat = 0.0
        try:
            while not self._stop.is_set() and not self._reboot.is_set():
                now_mono = self._monotonic()
                data_now = self.start_ns + int((now_mono - mono0) * self.config.replay_speed * 1e9)
                if self._bundles_changed.is_set():
                    self._bundles_changed.clear()
                    self._reload_models()
                self._drain_inbox()
                self._tick(data_now)
                if now_mono - last_beat >= self.config.heartbeat_s:
                    last_beat = now_mono
                    self._heartbeat()
                self._stop.wait(TICK_S)
        finally:
            if self._reboot.is_set():
                self.link.flush(3.0)
            self.link.stop()
            self.store.close()
            for src in self.sources:
                if isinstance(src, Closable):  # live sources stop their bus, poller or server thread
                    src.close()
        if self._reboot.is_set():
            log.info("rebooting to finish the update")
            return EXIT_REBOOT
        return 0

    # -- data path --------------------------------------------------------------------------------
    def _tick(self, data_now: int) -> None:
        for name in self.engine.expire(self._wall_ns()):  # campaigns past their end
            log.info("campaign %s expired", name)
        batches = []
        for src in self.sources:
            try:
                batches.extend(src.read(data_now))
            except FleetloopError as exc:
                log.error("source %s failed: %s", src.name, exc)
        for src in self.sources:
            totals = source_totals(src)
            if totals is not None:
                self.metrics.sync_source(src.name, totals)
        for b in batches:
            self.buffers.append(b)
            self.metrics.samples_read.inc(b.sample_count)
        self.metrics.ring_buffer_bytes.set(self.buffers.bytes_used)
        if not batches:
            return
        fires = self.engine.process(batches, self.buffers)
        self.metrics.sync_totals(
            ring_buffer_dropped_samples=self.buffers.dropped_samples_total,
            ring_buffer_late_samples=self.buffers.late_samples_total,
            trigger_evaluations=self.engine.evaluations_total,
            trigger_late_evaluations=self.engine.late_evaluations_total,
        )
        for fire in fires:
            spec = self.specs.get(fire.campaign)
            if spec is None:
                continue
            self.metrics.fires.inc()
            self.assembler.on_fire(fire, spec.collect_signals, spec.privacy)
        for capture in self.assembler.poll(data_now - self._decode_lag_ns, self.buffers):
            self._store_capture(capture)

    def _store_capture(self, capture: Capture) -> None:
        now_ns = self._wall_ns()
        stamp = ""
        if capture.privacy is not None:  # before the store: what the policy forbids is never written
            outcome = apply_policy(capture.privacy, capture.batches, self.catalog, self.privacy_keys,
                                   capture.fire_ns)  # fmt: skip
            self.privacy.count(outcome)
            self.metrics.sync_totals(**self.privacy.totals())
            if outcome.batches is None:
                log.info("capture %s suppressed by privacy policy %s (inside a geofence)",
                         capture.capture_id, outcome.stamp.text())  # fmt: skip
                return
            if outcome.redacted.unkeyed_signals:
                log.warning("capture %s: no privacy key for its time; its identifiers were dropped",
                            capture.capture_id)  # fmt: skip
            capture.batches, stamp = outcome.batches, outcome.stamp.text()
        try:
            # groups sharing arrival times (one CAN bus) travel in one segment that stores them once
            # (below format 4, as the cloud reads it: one group per segment)
            bundle_rows = BUNDLE_MAX_ROWS if self.store.segment_version >= 4 else 0
            for seg in capture.segments(self.catalog, bundle_rows=bundle_rows):
                self.store.append(
                    remap_segment(seg, self.segment_ids),
                    capture_id=capture.capture_id,
                    campaign=capture.campaign,
                    priority=capture.priority,
                    now_ns=now_ns,
                    privacy=stamp,
                )
        except StorageFullError as exc:
            log.error("capture %s not stored: %s", capture.capture_id, exc)
            return
        self.captures_total += 1
        self.metrics.captures.inc()
        log.info(
            "capture %s of campaign %s stored: %d samples",
            capture.capture_id,
            capture.campaign,
            capture.sample_count,
        )
        self.link.kick_upload()

    # -- control path -----------------------------------------------------------------------------
    def _on_cloud_message(self, msg: device_pb2.CloudMessage) -> None:
        """Called on the link's thread: hand over to the main loop (campaigns) or the OTA worker."""
        kind = msg.WhichOneof("kind")
        if kind == "upload_grant":
            self.link.grant(msg.upload_grant.max_bytes, msg.upload_grant.min_priority)
            return
        if kind == "ota_job":
            try:
                self._ota_jobs.put_nowait(msg.ota_job)
            except queue.Full:
                log.warning("OTA job %s refused: %d jobs already queued", msg.ota_job.job_id, OTA_QUEUE_LIMIT)
            return
        if kind == "ota_cancel":
            # at once, so a job downloading now stops; queued too, to settle one not started yet
            self.ota.cancel(msg.ota_cancel.job_id, msg.ota_cancel.reason)
            try:
                self._ota_jobs.put_nowait(msg.ota_cancel)
            except queue.Full:
                log.warning("OTA queue full; job %s is withdrawn when it comes up", msg.ota_cancel.job_id)
            return
        try:
            self._inbox.put_nowait(msg)  # on the link's loop: never wait here
        except queue.Full:
            log.warning("control inbox full; dropped a %s message", kind)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg.WhichOneof("kind") == "catalog_assignment":
                self._take_assignment(msg.catalog_assignment)
            elif msg.WhichOneof("kind") == "desired_campaigns":
                dc = msg.desired_campaigns
                self.privacy_keys.update(keys_from_wire(dc.privacy_keys))
                self.desired = _DesiredState(
                    dc.version, [(c.name, c.version, c.document) for c in dc.campaigns]
                )
                self._apply_desired()
                self._save_desired()

    def _sync_catalog_metrics(self) -> None:
        up = self.store_upgrade
        self.metrics.catalog_local_ids.set(len(self.catalog_ids.local_ids))
        self.metrics.sync_totals(
            catalog_local_ids_dropped=self.catalog_ids.local_ids_dropped,
            store_upgrade_rewritten=up.rewritten if up else 0,
            store_upgrade_held=up.held if up else 0,
        )

    def _take_assignment(self, msg: device_pb2.CatalogAssignment) -> None:
        """The fleet's ids of this device's signals: cached, and carried by the segments stored from now."""
        try:
            self.catalog_ids.apply(assignment_from_wire(msg))
        except IntegrityError as exc:
            log.error("catalog assignment refused, ids kept as they were: %s", exc)
            return
        self.segment_ids = self.catalog_ids.segment_ids(self.catalog)
        log.info(
            "catalog ids: %d of %d signals under fleet ids",
            sum(1 for s in self.catalog if is_fleet_id(self.segment_ids.get(s.id, s.id))),
            len(self.catalog),
        )

    def _apply_desired(self, refresh_models: Collection[str] = ()) -> None:
        specs: list[CampaignSpec] = []
        refused: dict[str, str] = {}
        for name, _version, document in self.desired.documents:
            try:
                spec = parse_campaign(document, source=f"campaign {name}")
                check_against_catalog(spec, self.catalog)
                if spec.selector and not selector_matches(spec.selector, self.config.labels):
                    continue
            except RuleError as exc:
                refused[name] = str(exc)
                continue
            specs.append(spec)
        refused.update(self.engine.set_campaigns(specs, self._wall_ns(), refresh_models=refresh_models))
        self.specs = {s.name: s for s in specs if s.name not in refused}
        self.refused = refused
        # captures still pending from swapped-out campaigns keep their history
        horizon = (
            max([MIN_HORIZON_NS, self.engine.required_horizon_ns(), self.assembler.required_horizon_ns()])
            + self._decode_lag_ns
        )
        self.buffers.set_horizon(horizon)
        for name, reason in refused.items():
            log.warning("campaign %s refused: %s", name, reason)
        log.info("campaigns v%d running: %s", self.desired.version, ", ".join(self.engine.active) or "none")
        self.link.send(device_pb2.DeviceMessage(campaign_status=self._campaign_status()))

    def _desired_path(self) -> Path:
        return self.config.state_dir / "campaigns.json"

    def _save_desired(self) -> None:
        doc = {
            "version": self.desired.version,
            "campaigns": self.desired.documents,
            "privacy_keys": keys_to_json(self.privacy_keys.keys()),
        }
        write_atomically(self._desired_path(), json.dumps(doc).encode())

    def _load_desired(self) -> None:
        """Run the last desired campaigns at once after a restart, before the cloud is reachable."""
        path = self._desired_path()
        if not path.is_file():
            return
        try:
            doc = json.loads(path.read_text())
            self.desired = _DesiredState(
                int(doc["version"]), [(str(n), int(v), str(d)) for n, v, d in doc["campaigns"]]
            )
            self.privacy_keys.update(keys_from_json(doc.get("privacy_keys", [])))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return
        self._apply_desired()

    def _campaign_status(self) -> device_pb2.CampaignStatus:
        return device_pb2.CampaignStatus(
            version=self.desired.version,
            running=list(self.engine.active),
            refused=[device_pb2.CampaignRefusal(name=n, reason=r) for n, r in sorted(self.refused.items())],
            captures_total=self.captures_total,
        )

    def _greeting(self) -> list[device_pb2.DeviceMessage]:
        return Greeting(
            device_id=self.config.device_id,
            fleet=self.config.fleet,
            catalog=self.catalog,
            fleet_ids=True,
            ids=self.segment_ids,
            labels=self.config.labels,
            data_origin=self.data_origin,
            inventory=self._inventory(),
            campaign_status=self._campaign_status(),
            ota_status=_ota_status(self._last_ota) if self._last_ota is not None else None,
        ).messages()

    def _inventory(self) -> device_pb2.Inventory:
        return device_pb2.Inventory(
            hardware_id=self.config.platform.hardware_id,
            firmware_version=self.ota.installed_version(),
            firmware_sha256=self.ota.installed_sha256(),
            active_slot=self.platform.booted_slot(),
            campaigns_version=self.desired.version,
            delta_formats=list(self.ota.delta_formats),
        )

    def _heartbeat(self) -> None:
        # with scheduled uploads, the backlog per priority is the request for grants
        hb = heartbeat(self.store, self.config.network, self._wall_ns(), backlog=self.config.upload_scheduled)
        self.metrics.store_pending_bytes.set(hb.bytes_pending)
        self.link.send(device_pb2.DeviceMessage(heartbeat=hb))
        self.link.send(device_pb2.DeviceMessage(campaign_status=self._campaign_status()))

    # -- model packs --------------------------------------------------------------------------------
    def _discover_models(self) -> list[ModelPack]:
        """The usable model packs: every bundle whose ``current`` holds a ``model.yaml``, then ``models_dir``.

        A bundle's pack is loaded from the resolved version directory (``v-<version>``), not through
        ``current``, so a pack keeps naming the files it was loaded from while a later install switches
        the link. Its onnxruntime session is created here, so a pack that cannot load is logged and left
        out (campaigns calling it are refused as "not installed") instead of scoring nothing silently.
        A model name delivered by a bundle wins over the same name in ``models_dir``.
        """
        dirs: list[Path] = []
        root = self.ota.bundles.root
        if root.is_dir():
            dirs += [d / "current" for d in sorted(root.iterdir()) if (d / "current" / MANIFEST).is_file()]
        if self.config.models_dir is not None and self.config.models_dir.is_dir():
            dirs += [d for d in sorted(self.config.models_dir.iterdir()) if (d / MANIFEST).is_file()]
        packs: dict[str, ModelPack] = {}
        for directory in dirs:
            try:
                pack = load_model_pack(directory.resolve())
                pack.session()
            except (FleetloopError, OSError) as exc:
                log.error("model pack %s not loaded: %s", directory, exc)
                continue
            if pack.name in packs:
                log.warning(
                    "model %s in %s ignored: already installed from %s",
                    pack.name,
                    directory,
                    packs[pack.name].path.parent,
                )
                continue
            packs[pack.name] = pack
        return list(packs.values())

    def _on_bundle(self, name: str, current: Path) -> None:
        """Called on the OTA worker thread after a bundle switch: only hand over to the main loop,
        which owns the engine (the engine is not thread-safe and a reload must not race a tick)."""
        log.info("bundle %s switched to %s; reloading model packs", name, current.resolve().name)
        self._bundles_changed.set()

    def _reload_models(self) -> None:
        """On the main thread: reload the registry and re-apply the campaigns the change touches."""
        changed = self.models.replace(self._discover_models())
        if not changed:
            return
        log.info(
            "model packs changed: %s (installed: %s)",
            ", ".join(sorted(changed)),
            ", ".join(self.models.names) or "none",
        )
        self._apply_desired(refresh_models=changed)

    # -- OTA ----------------------------------------------------------------------------------------
    def _on_ota_report(self, report: OtaReport) -> None:
        self._last_ota = report
        log.info(
            "ota job %s: %s%s",
            report.job_id,
            report.state.value,
            f" ({report.reason})" if report.reason else "",
        )
        self.link.send(device_pb2.DeviceMessage(ota_status=_ota_status(report)))
        if report.state.value in ("COMMITTED", "ROLLED_BACK"):
            self.link.send(device_pb2.DeviceMessage(inventory=self._inventory()))

    def _extra_health(self) -> list[str]:
        failures = []
        if not self.link.connected.wait(HEALTH_CLOUD_WAIT_S):
            failures.append(f"cloud unreachable at {self.link.target}: {self.link.last_error or 'timeout'}")
        dead = [s.name for s in self.sources if not s.alive()]
        if dead:
            failures.append(f"sources not alive: {', '.join(dead)}")
        return failures

    def _ota_worker(self) -> None:
        try:
            self.ota.resume_after_boot(self._extra_health)
            while not self._stop.is_set():
                try:
                    job = self._ota_jobs.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(job, ota_pb2.OtaCancel):
                    self.ota.settle_cancel(job.job_id, job.rollout_id, job.reason)
                    continue
                self.ota.handle_job(
                    job.job_id, job.rollout_id, job.manifest, job.signature, job.artifact_base_url
                )
        except RebootRequested:
            self._reboot.set()
        except FleetloopError as exc:
            log.error("OTA worker: %s", exc)
        except Exception:
            log.exception("OTA worker crashed")


def _ota_status(report: OtaReport) -> ota_pb2.OtaStatus:
    return ota_pb2.OtaStatus(
        job_id=report.job_id,
        rollout_id=report.rollout_id,
        state=ota_pb2.OtaState.Value(f"OTA_STATE_{report.state.value}"),
        reason=report.reason,
        version=report.version,
        bytes_downloaded=report.bytes_downloaded,
        bytes_total=report.bytes_total,
        payload_kind=report.payload_kind,
    )


def transport_from_config(config: AgentConfig) -> UplinkTransport:
    """The transport ``cloud.transport`` names: MQTT 5 to a broker, or gRPC to a coordinator."""
    if config.cloud_transport == "mqtt" and config.cloud_mqtt is not None:
        m = config.cloud_mqtt
        return MqttTransport(
            MqttSettings(m.host, m.port, m.ca, m.cert, m.key), config.device_id, fleet=config.fleet
        )
    # ``cloud.grpc`` may list several coordinators ("a:8443,b:8443"): a reconnect goes to the next
    addresses = [a.strip() for a in config.cloud_grpc.split(",") if a.strip()]
    return GrpcTransport(addresses or config.cloud_grpc, tls=config.cloud_tls)
