"""``fleetloop cloud serve``: one coordinator process, wired — its stores, services, surfaces and threads.

:class:`Coordinator` is the composition root: it builds the parts from one data directory (and an
optional PostgreSQL URL) and runs the periodic work; it decides nothing itself. The surfaces (gRPC,
HTTP, MQTT) are handed the coordinator and call its services. State lives in the metadata repositories
(SQLite or PostgreSQL), the fleet store (Parquet) and the artifact store (content-addressed files), all
under the data directory, so a restarted coordinator resumes where it was.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import resource
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fleetloop_cloud.changes import ChangeFeed, ChangeFollower, Topic, open_change_feed
from fleetloop_cloud.fleet_store.captures import CaptureReader
from fleetloop_cloud.fleet_store.compaction import CompactionPolicy, Compactor
from fleetloop_cloud.fleet_store.erasure import ParquetLifecycle
from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.grpc_api import GrpcTls, start_grpc_server
from fleetloop_cloud.http_api import HttpSettings, start_http_server
from fleetloop_cloud.http_api.metrics import metrics_middleware
from fleetloop_cloud.limits import Limits
from fleetloop_cloud.metrics.prometheus import PrometheusMetrics
from fleetloop_cloud.metrics.watches import watch_coordinator
from fleetloop_cloud.mqtt_bridge import BridgeSettings, MqttBridge
from fleetloop_cloud.ota.artifact_store import ArtifactStore
from fleetloop_cloud.ota.director import Director
from fleetloop_cloud.ota.online_keys import KeyFiles, OnlineKeys, SecretKeys, release_signer
from fleetloop_cloud.ota.tuf_repository import ImageKeyCustody, TufRepositories
from fleetloop_cloud.ota.writers import DatabaseWriters, LocalWriters
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.rollout.controller import LEASE_TTL_S, RolloutController
from fleetloop_cloud.rollout.gate_inputs import FleetStoreGateInputs
from fleetloop_cloud.rollout.jobs import OtaJobs
from fleetloop_cloud.services.access import Access, Caller, Refusals
from fleetloop_cloud.services.audit import AuditService
from fleetloop_cloud.services.campaigns import CampaignService
from fleetloop_cloud.services.captures import CaptureService
from fleetloop_cloud.services.catalogs import FleetCatalogService
from fleetloop_cloud.services.devices import LEASE_BEAT_S, DeviceService
from fleetloop_cloud.services.ingest import IngestService, SampleStore, UploadGrants
from fleetloop_cloud.services.lifecycle import DataLifecycle
from fleetloop_cloud.services.privacy import CampaignPolicies, FleetKeys
from fleetloop_cloud.services.query import QueryService
from fleetloop_cloud.services.releases import ReleaseService
from fleetloop_cloud.services.rollouts import ControllerAudit, RolloutService
from fleetloop_cloud.services.tokens import IssuedToken, TokenService
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_cloud.storage import LocalObjectStore, S3Settings, copy_objects, open_object_store
from fleetloop_cloud.uploads.scheduler import UploadScheduler
from fleetloop_cloud.uploads.staging import UploadStaging
from fleetloop_shared.classification import Classification, read_classification
from fleetloop_shared.errors import ConfigError

log = logging.getLogger("fleetloop.cloud")

#: How often rollouts are stepped and upload grants handed out.
ROLLOUT_TICK_S = 0.5
#: How often the fleet store's small segment files are compacted (compaction.py, docs/query.md).
COMPACTION_INTERVAL_S = 60.0
#: How often retention and pending erasures are carried out (services/lifecycle.py, docs/privacy.md).
LIFECYCLE_INTERVAL_S = 30.0


class _Periodic:
    """A daemon thread calling ``step`` every ``interval()`` seconds until stopped, or sooner when
    woken (:meth:`wake`: a change another coordinator made). A failing step is logged and the next one
    runs: one bad pass must not stop rollouts or compaction for good."""

    def __init__(self, name: str, interval: Callable[[], float], step: Callable[[], None]) -> None:
        self._interval = interval
        self._step = step
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._step()
            except Exception:
                log.exception("%s: a pass failed", self._thread.name)

    def wake(self) -> None:
        """Run the next pass now (several wakes before it starts make one pass)."""
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


if TYPE_CHECKING:  # Iceberg (pyiceberg, SQLAlchemy) is imported when a coordinator uses it: a second off
    # every start of the default Parquet store's coordinator
    from fleetloop_cloud.fleet_store.iceberg import IcebergTables
    from fleetloop_cloud.fleet_store.iceberg_maintenance import IcebergMaintenance, MigrationReport


def open_tables(data_dir: Path, db: str | None, storage: S3Settings | None) -> IcebergTables:
    """The Iceberg tables: catalog in the coordinator's database, files in its object store (the bucket,
    or ``data_dir/tables``)."""
    from fleetloop_cloud.fleet_store.iceberg import IcebergTables, catalog_uri, io_properties

    warehouse = open_object_store(storage, data_dir / "tables", area="fleet").location
    return IcebergTables(catalog_uri(db, data_dir / "metadata.sqlite"), warehouse, io_properties(storage))


class Coordinator:
    """One coordinator's parts, built from ``data_dir`` (and ``db``: a ``postgresql://`` URL shared by
    several coordinators; default SQLite in ``data_dir``). ``clock`` is what every service's ``now``
    comes from; ``limits`` the budgets and bounds it works within (a configuration file's); ``keys`` where
    its online keys load from (default: ``data_dir/keys``); ``changes`` the feed it hears the other
    coordinators' changes on (default: LISTEN/NOTIFY with a PostgreSQL ``db``, in-process otherwise)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        db: str | None = None,
        limits: Limits | None = None,
        storage: S3Settings | None = None,
        tables: TableSettings | None = None,
        changes: ChangeFeed | None = None,
        keys: OnlineKeys | None = None,
        custody: ImageKeyCustody | None = None,
        classification: Classification | None = None,
    ) -> None:
        """``custody``: who holds a new image repository's offline keys (see :class:`ImageKeyCustody`);
        without it, this coordinator does (a lab's custody: it signs every upload itself)."""
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        # Online keys: the data directory's keys/ (made here on the first start), or a secret every
        # coordinator mounts (never the database)
        self.keys = keys = keys or KeyFiles(data_dir / "keys")
        self.signer = release_signer(keys)
        # OTA trust: devices are provisioned with keys/image-root.json and keys/director-root.json. The
        # artifacts and the TUF metadata live in the object store: the data directory's artifacts/, or
        # the bucket every coordinator shares
        self.artifact_objects = open_object_store(storage, data_dir / "artifacts", area="artifacts")
        local_roots = data_dir / "artifacts" / "tuf" / "image" / "root"
        if storage is not None and local_roots.is_dir() and not self.artifact_objects.list("tuf/image/root/"):
            # a bucket without the repositories this directory's devices trust: starting would make new
            # roots there that no device was provisioned with
            raise ConfigError(
                f"{self.artifact_objects.location} holds no TUF repositories but {data_dir / 'artifacts'} "
                "does: move them to the bucket first with 'fleetloop cloud migrate' (docs/deploy.md)"
            )
        if not keys.writable and not self.artifact_objects.list("tuf/image/root/"):
            raise ConfigError(
                f"{self.artifact_objects.location} holds no TUF repositories, and with keys from a secret "
                f"({keys.directory}) a coordinator makes no keys: start from the data directory "
                "'fleetloop cloud init' made with those keys (moved to a bucket by 'fleetloop cloud migrate')"
            )
        self.limits = limits = limits or Limits()
        self.metrics = PrometheusMetrics()
        self.repositories = repos = open_repositories(db if db else data_dir / "metadata.sqlite")
        self.table_settings = tables = tables or TableSettings()
        if storage is not None and tables.format != "iceberg":
            raise ConfigError("an S3 bucket needs the iceberg table format (fleet_store.format: iceberg)")
        self.fleet_store: SampleStore
        self.compactor: Compactor | IcebergMaintenance
        self.tables: IcebergTables | None = None
        if tables.format == "iceberg":
            from fleetloop_cloud.fleet_store.iceberg import IcebergFleetStore
            from fleetloop_cloud.fleet_store.iceberg_maintenance import IcebergMaintenance

            self.tables = open_tables(data_dir, db, storage)
            self.fleet_store = IcebergFleetStore(self.tables, tables)
            self.query_engine = QueryEngine(data_dir / "fleet", limits=limits.query, tables=self.tables)
            self.compactor = IcebergMaintenance(self.tables, repos.segments, tables)
        else:
            self.fleet_store = FleetStore(data_dir / "fleet")
            self.query_engine = QueryEngine(
                data_dir / "fleet", captures=repos.segments.captures, limits=limits.query
            )
            # file ages are wall-clock (file mtimes), whatever clock drives the rest; absorbed files
            # outlive the longest query by a minute at least
            grace_s = max(CompactionPolicy().grace_s, limits.query.timeout_s + 60)
            policy = CompactionPolicy(grace_s=grace_s)
            self.compactor = Compactor(self.fleet_store, repos.segments.has, policy)
        coordinator_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # metadata versions only grow: coordinators sharing a bucket take turns through the database
        writers = DatabaseWriters(repos.leases, coordinator_id) if db or storage else LocalWriters()
        self.tuf = TufRepositories(
            self.artifact_objects, keys.directory / "tuf", clock=clock, anchor_dir=data_dir / "keys",
            custody=custody, writers=writers,
        )  # fmt: skip
        self.director = Director(self.tuf)
        self.artifacts = ArtifactStore(self.artifact_objects, self.signer, tuf=self.tuf)
        self.sessions = DeviceSessions()
        # Resumable uploads are staged in the object store: with a bucket shared by every coordinator, a
        # device that moves to another one mid-upload goes on where it was; in a data directory it
        # starts that segment again there (the ingest ledger keeps it exactly once either way).
        self.storage = storage
        staging_store = open_object_store(storage, data_dir / "staging", area="staging", durable=False)
        self.staging = UploadStaging(staging_store, **asdict(limits.staging))
        self.refusals = Refusals()
        self.access = access = Access(self.refusals, repos.audit_log, classification)
        controller = ControllerAudit(access, Caller.controller(coordinator_id))
        # A change made here reaches the devices of the other coordinators on one database through the
        # change feed (LISTEN/NOTIFY on PostgreSQL); each catches up on a timer too.
        self._rollout_loop = _Periodic("rollout-controller", lambda: ROLLOUT_TICK_S, self._tick)
        self.changes = ChangeFollower(
            changes or open_change_feed(db), coordinator_id,
            {Topic.CAMPAIGNS: self._campaigns_changed, Topic.ROLLOUTS: self._rollout_loop.wake},
        )  # fmt: skip
        self.grants = UploadGrants(UploadScheduler(limits.upload_budget), self.sessions)
        self.jobs = OtaJobs(self.director, self.sessions, repos.devices)
        self.controller = RolloutController(
            repos.rollouts,
            repos.releases,
            repos.devices,
            self.jobs,
            log_to=controller,
            holder=coordinator_id,
            lease_ttl_s=_lease_ttl(),
            gate_inputs=FleetStoreGateInputs(self.query_engine),
            stepped=lambda: self.changes.publish(Topic.ROLLOUTS),
        )
        self.privacy_keys = FleetKeys.from_source(keys)
        self.campaigns = CampaignService(
            repos.campaigns, repos.devices, self.sessions, access, keys=self.privacy_keys, clock=clock,
            changed=lambda: self.changes.publish(Topic.CAMPAIGNS),
        )  # fmt: skip
        self.catalogs = FleetCatalogService(repos.fleet_catalog, access)
        self.devices = DeviceService(
            repos.devices, repos.leases, self.sessions, access, coordinator_id=coordinator_id,
            campaigns=self.campaigns, ota=self.controller, backlog=self.grants, catalogs=self.catalogs,
        )  # fmt: skip
        self.ingest = IngestService(
            repos.devices,
            repos.segments,
            self.fleet_store,
            self.staging,
            access,
            metrics=self.metrics,
            max_upload_bytes=limits.staging.max_upload_bytes,
            policies=CampaignPolicies(repos.campaigns),
            erased_before=lambda device_id: self.lifecycle.erased_before(device_id),
        )
        self.releases = ReleaseService(
            repos.releases, repos.devices, self.artifacts, self.tuf, access,
            read_only_keys=None if keys.writable else keys.directory,
        )  # fmt: skip
        self.rollouts = RolloutService(
            self.controller, repos.rollouts, access, changed=self._rollouts_changed
        )
        self.queries = QueryService(
            self.query_engine, repos.segments, repos.campaigns, self.devices, access, metrics=self.metrics
        )
        self.captures = CaptureService(repos.segments, repos.devices, repos.campaigns,
                                       CaptureReader(self.query_engine), access)  # fmt: skip
        # Retention and erasure: the request is in the database, the job under a lease (one coordinator)
        erasable = self.compactor if not isinstance(self.compactor, Compactor) else ParquetLifecycle(
            self.compactor.store)  # fmt: skip
        self.lifecycle = DataLifecycle(
            repos.retention, repos.segments, repos.devices, erasable, self.staging, access,
            holder=coordinator_id, forget_cached=self.captures.forget_device,
        )  # fmt: skip
        lifecycle = self.lifecycle
        self.metrics.watch("fleetloop_lifecycle_rows_deleted", "Fleet store rows deleted by retention and "
                           "erasure", "counter", ["reason"],
                           lambda: {(k,): v for k, v in lifecycle.rows_deleted.items()})  # fmt: skip
        self.metrics.watch("fleetloop_lifecycle_passes", "Retention and erasure passes: ran, busy (another "
                           "coordinator holds the lease), failed", "counter", ["outcome"],
                           lambda: {(k,): v for k, v in lifecycle.passes.items()})  # fmt: skip
        self.metrics.watch("fleetloop_erasures_pending", "Device erasures asked for and not yet confirmed",
                           "gauge", [], lambda: {(): lifecycle.pending()})  # fmt: skip
        self.tokens = TokenService(repos.tokens, access)
        self.audit = AuditService(access)
        watch_coordinator(
            self.metrics,
            sessions=self.sessions,
            rollouts=repos.rollouts,
            refusals=self.refusals,
            staging=self.staging,
            grants=self.grants,
            changes=self.changes,
            devices=self.devices,
            catalogs=self.catalogs,
        )
        self.devices.beat(clock())
        self._last_beat = clock()
        self._loops = [
            self._rollout_loop,
            _Periodic("compaction", lambda: COMPACTION_INTERVAL_S, self._compact),
            _Periodic("lifecycle", lambda: LIFECYCLE_INTERVAL_S, lambda: self._lifecycle(self.clock())),
        ]

    def _campaigns_changed(self) -> None:
        if self.campaigns.catch_up():
            log.info("campaigns changed elsewhere: pushed to %d devices", len(self.sessions.online()))

    def _rollouts_changed(self) -> None:
        """An operator's rollout command here: step now, and tell the others (their devices, or their
        controller if one of them leads)."""
        self._rollout_loop.wake()
        self.changes.publish(Topic.ROLLOUTS)

    def _tick(self) -> None:
        now = self.clock()
        try:
            self.controller.tick(now)
        finally:
            self.grants.tick(now, ROLLOUT_TICK_S)
            self.campaigns.rotate(now)
            if now - self._last_beat >= LEASE_BEAT_S:
                self.devices.beat(now)
                self._last_beat = now

    def _compact(self) -> None:
        report = self.compactor.run_once()
        if report.files_written or report.leftovers_deleted:
            log.info("compaction: %s", report.as_dict())
        expired = self.staging.expire(time.time())
        if expired:
            log.info("upload staging: removed %d partial uploads left for over a day", expired)

    def _lifecycle(self, now: float) -> None:
        if self.lifecycle.run_once(now):
            log.debug("lifecycle pass: %s", dict(self.lifecycle.rows_deleted))

    def start(self) -> None:
        self.changes.start()
        for loop in self._loops:
            loop.start()

    def stop(self) -> None:
        """Stop the periodic work and end this coordinator's lease (its devices are offline now)."""
        self.changes.stop()
        for loop in self._loops:
            loop.stop()
        self.controller.release_lease()
        self.lifecycle.stop()
        self.devices.retire()

    def close(self) -> None:
        """Release the metadata connection (after :meth:`stop`)."""
        self.changes.stop()
        if self.tables is not None:
            self.tables.close()
        self.repositories.close()


def migrate(data_dir: Path, *, db: str | None = None, storage: S3Settings | None = None) -> MigrationReport:
    """``fleetloop cloud migrate``: copy the Parquet fleet store of ``data_dir`` (and the ledger's
    captures) into the Iceberg tables a coordinator with ``fleet_store.format: iceberg`` (and the same
    ``db`` and ``storage``) uses, and with a bucket, the artifacts (images, deltas, manifests, TUF
    metadata) into it. Safe to run again: partitions and objects already copied are skipped. The local
    folders are left as they were (delete them once the copies are checked)."""
    from fleetloop_cloud.fleet_store.iceberg_maintenance import MigrationReport, migrate_parquet

    samples = data_dir / "fleet" / "samples"
    artifacts = data_dir / "artifacts"
    copied = 0
    if storage is not None and artifacts.is_dir():
        target = open_object_store(storage, artifacts, area="artifacts")
        copied = copy_objects(LocalObjectStore(artifacts), target)
    if not samples.is_dir():
        if storage is not None and artifacts.is_dir():
            return MigrationReport(artifacts=copied)
        raise ConfigError(f"{data_dir} holds no Parquet fleet store ({samples} is missing)")
    repos = open_repositories(db if db else data_dir / "metadata.sqlite")
    try:
        tables = open_tables(data_dir, db, storage)
        try:
            fleets = {d.device_id: d.fleet for d in repos.devices.all()}
            report = migrate_parquet(samples, tables, repos.segments.captures(), fleets, now=time.time())
            return replace(report, artifacts=copied)
        finally:
            tables.close()
    finally:
        repos.close()


def _lease_ttl() -> float:
    """The controller lease's length: ``$FLEETLOOP_CONTROLLER_LEASE_S`` or :data:`LEASE_TTL_S` (shorter
    leases fail over faster and renew more often; the kill loop of ``sim rollout-kill`` uses a short one)."""
    text = os.environ.get("FLEETLOOP_CONTROLLER_LEASE_S", "")
    try:
        value = float(text) if text else LEASE_TTL_S
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 3600.0:
        raise ConfigError(f"FLEETLOOP_CONTROLLER_LEASE_S={text!r}: expected seconds from 1 to 3600")
    return value


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one and return it. Every device on gRPC holds a
    connection (a descriptor) for as long as it is online; the usual soft limit of 1,024 would turn the
    1,025th device away long before memory or CPU run short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def exposure_refusal(host: str, *, http: HttpSettings, grpc_tls: bool) -> str | None:
    """Why ``cloud serve`` must not listen on ``host`` as configured, or None. Off loopback, operators'
    tokens and devices' identities would cross the network in the clear: both ports need TLS, unless
    ``--insecure`` says this is a lab."""
    if is_loopback(host) or http.insecure:
        return None
    if http.tls is None:
        return (
            f"refusing to serve HTTP on {host} without TLS: give --http-cert and --http-key (a certificate "
            "from your CA, like the gRPC port's), or bind 127.0.0.1, or --insecure for a lab"
        )
    if not grpc_tls:
        return (
            f"refusing to serve devices' gRPC on {host} without mTLS: give --grpc-cert, --grpc-key and "
            "--grpc-ca, or bind 127.0.0.1, or --insecure for a lab"
        )
    return None


def served_url(scheme: str, host: str, port: int) -> str:
    """This coordinator's HTTP address as devices should reach it, when no public URL is configured.
    A wildcard address (0.0.0.0, ::) is no address a device can use: this machine's name stands in,
    with a warning to configure ``public_url``."""
    if host in ("", "0.0.0.0", "::"):
        name = socket.getfqdn()
        log.warning("devices will download artifacts from %s://%s:%d; set public_url (--public-url) if "
                    "they reach this coordinator under another name", scheme, name, port)  # fmt: skip
        host = name
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def initialise(
    data_dir: Path,
    *,
    db: str | None = None,
    recover: bool = False,
    clock: Callable[[], float] = time.time,
    custody: ImageKeyCustody | None = None,
) -> IssuedToken:
    """``fleetloop cloud init``: the data directory, its keys and metadata schema, and the first admin
    token (returned once; only its hash is stored). StateError when tokens exist, unless ``recover``.
    ``custody``: where the image repository's offline keys go (release managers', not this directory)."""
    coordinator = Coordinator(data_dir, clock=clock, db=db, custody=custody)
    try:
        return coordinator.tokens.bootstrap(clock(), recover=recover)
    finally:
        coordinator.stop()
        coordinator.close()


def serve(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 50051,
    http_port: int = 8080,
    ready_file: Path | None = None,
    stop: threading.Event | None = None,
    mqtt: BridgeSettings | None = None,
    db: str | None = None,
    grpc_tls: GrpcTls | None = None,
    http: HttpSettings | None = None,
    limits: Limits | None = None,
    public_url: str | None = None,
    storage: S3Settings | None = None,
    tables: TableSettings | None = None,
    keys_dir: Path | None = None,
    classification: Path | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). Writes ``ready_file`` once both ports listen.
    ConfigError (before anything listens) for an address it must not serve on as configured.
    ``public_url`` is where devices reach the HTTP port (artifact downloads); by default this address.
    ``keys_dir``: a mounted secret holding the online keys (default: the data directory's keys/).
    ``classification``: the file classifying the fleets' signals (default: the built-in rules)."""
    stop = stop or threading.Event()
    http = http or HttpSettings()
    refusal = exposure_refusal(host, http=http, grpc_tls=grpc_tls is not None)
    if refusal is not None:
        raise ConfigError(refusal)
    raise_open_files_limit()
    keys = SecretKeys(keys_dir) if keys_dir is not None else None
    classes = read_classification(classification) if classification is not None else None
    coordinator = Coordinator(data_dir, db=db, limits=limits, storage=storage, tables=tables, keys=keys,
                              classification=classes)  # fmt: skip
    if coordinator.releases.coordinator_signs():
        log.warning("this coordinator holds the image repository's targets key and signs every upload "
                    "itself (a lab's custody); hand the keys to release managers: fleetloop keys "
                    "export-offline --dir %s --out DIR (with a bucket: --config cloud.yaml)",
                    data_dir)  # fmt: skip
    if http.insecure:
        log.warning("--insecure: no API tokens (every HTTP request acts as an admin)%s",
                    "" if http.tls else " and no TLS")  # fmt: skip
    elif not coordinator.tokens.exist():
        if not is_loopback(host):
            coordinator.stop()
            coordinator.close()
            raise ConfigError(
                f"refusing to serve on {host}: no API token exists yet; run "
                f"'fleetloop cloud init --dir {data_dir}' first (it prints the first admin token once)"
            )
        log.warning("no API token exists yet: 'fleetloop cloud init --dir %s' makes the first admin token",
                    data_dir)  # fmt: skip
    grpc_server, gport = start_grpc_server(coordinator, host, grpc_port, tls=grpc_tls)
    http_server, hport = start_http_server(
        coordinator, host, http_port, http, middlewares=[metrics_middleware(coordinator.metrics)]
    )
    scheme = "https" if http.tls is not None else "http"
    coordinator.jobs.artifact_base_url = public_url or served_url(scheme, host, hport)
    coordinator.start()
    # MQTT 5 beside gRPC: consumers on a shared subscription calling the same services.
    bridge = MqttBridge(coordinator, mqtt) if mqtt is not None else None
    if bridge is not None:
        bridge.start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    info = {
        "grpc": f"{host}:{gport}",
        "http": f"{scheme}://{host}:{hport}",
        "artifacts": coordinator.jobs.artifact_base_url,
        "pid": os.getpid(),
        "data_dir": str(data_dir),
    }
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    log.info("coordinator serving: gRPC %s, HTTP %s, data %s", info["grpc"], info["http"], data_dir)
    stop.wait()
    log.info("coordinator stopping")
    if bridge is not None:
        bridge.stop()
    grpc_server.stop(grace=2).wait(3)
    http_server.shutdown()
    coordinator.stop()
    coordinator.close()
    return 0
