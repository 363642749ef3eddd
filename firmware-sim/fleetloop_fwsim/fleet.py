"""Many simulated agents in one process, each with the agent's uplink protocol and the real local store.

A full ``fleetloop agent run`` per device costs a process, an interpreter and a trigger engine; to put a
fleet in front of one coordinator on a small machine, each simulated agent here keeps only what the
uplink path needs: its own replay sources (the real recordings, started at a per-device time offset so
the devices are not in lockstep), its own :class:`~fleetloop_agent.local_store.LocalStore` and its own
 link to the cloud. Every ``capture_period_s`` each device cuts what its sources
produced into segments (one capture), stores them durably and lets the uplink drain them — the same
store → upload → ack → checkpoint path a real agent runs, so what the fleet counts as *acknowledged* is
exactly what devices were told is safely in the cloud.

One producer thread ticks every device (bounded work per tick). Every device runs the agent's own link
(:class:`~fleetloop_agent.uplink.Link`, over gRPC or MQTT 5), and all of them run on one event loop
(:mod:`fleetloop_fwsim.swarm`: a connection and an identity per device, no thread per device), so one
process holds thousands of devices. ``hold_only`` devices keep just their control session (a hello with
the fleet's catalog, then keepalives): what "devices held" measures.
Coordinator processes for ``sim fleet`` / ``sim chaos`` are started as ``fleetloop cloud serve``
subprocesses (the simulator never imports the cloud).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.sources import SignalSource, build_source
from fleetloop_agent.uplink import Greeting, Link, UplinkTransport, heartbeat
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.mqtt_transport import MqttSettings, MqttTransport
from fleetloop_fwsim.broker import CertificateAuthority, MosquittoProcess
from fleetloop_fwsim.child_process import RestartableChild
from fleetloop_fwsim.profiles import KINDS, source_specs
from fleetloop_fwsim.swarm import Swarm
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError, StorageFullError, UnavailableError, UserError
from fleetloop_shared.segment import segment_from_batch
from fleetloop_shared.wire import device_pb2

log = logging.getLogger("fleetloop.fwsim.fleet")

NS_PER_S = 1_000_000_000
#: Per-device replay offset: device i starts its recording i × this later (data time), so devices differ.
DEVICE_OFFSET_S = 7.0
#: Local store quota per simulated device (policy when full: the store evicts oldest/least urgent, counted).
DEVICE_QUOTA_BYTES = 64 * 1024 * 1024
#: Upper bound of devices in one process over gRPC (each holds a channel and a few coroutines on the
#: swarm's loop; with data, also a local store: about 3 file descriptors).
MAX_DEVICES = 10_000
#: Upper bound over MQTT (each device a TLS session, its handshake on one of the swarm's few threads).
MAX_MQTT_DEVICES = 2000
CAPTURE_PRIORITY = 5
#: Latency samples kept per device (bounded; later ones are not recorded).
MAX_LATENCY_SAMPLES = 100_000


@dataclass(frozen=True)
class MqttEndpoint:
    """Where simulated devices reach the broker (maybe through a chaos proxy) and the CA that issues
    their certificates."""

    host: str
    port: int
    ca: CertificateAuthority


@dataclass
class DeviceCounters:
    """What one simulated device did; guarded by the fleet's lock."""

    segments_stored: int = 0
    samples_stored: int = 0
    acked: dict[bytes, int] = field(default_factory=dict)
    duplicate_acks: int = 0
    store_full: int = 0
    #: Seconds from a segment's capture (stored on the device) to the cloud's ack, which the cloud sends
    #: only once the Parquet file and its metadata row are in place: capture-to-queryable.
    latencies_s: list[float] = field(default_factory=list)
    grants: int = 0
    granted_bytes: int = 0
    #: Acks the cloud marked duplicate: a retried upload it had already stored (the dedupe at work).
    cloud_duplicates: int = 0
    #: The capture each acknowledged segment belongs to.
    capture_of: dict[bytes, str] = field(default_factory=dict)


class SimAgent:
    """One simulated device: replay sources → local store → the agent's link (on the fleet's swarm)."""

    def __init__(
        self,
        device_id: str,
        *,
        target: str | Sequence[str],
        fleet: str,
        specs: list[dict[str, Any]],
        origin: str,
        workdir: Path,
        start_ns: int,
        lock: threading.Lock,
        upload_deadline_s: float = 10.0,
        swarm: Swarm,
        mqtt: MqttEndpoint | None = None,
        grants: bool = False,
        priority: int = CAPTURE_PRIORITY,
        network: str = "wifi",
        hold_only: Catalog | None = None,
    ) -> None:
        self.device_id = device_id
        self.grants = grants
        self.priority = priority
        self.network = network
        self.fleet = fleet
        self.origin = origin
        self.start_ns = start_ns
        self.sources: list[SignalSource] = []
        self.store: LocalStore | None = None
        if hold_only is not None:  # holds its control stream only: no sources, no store, no uploads
            self.catalog = hold_only
        else:
            self.catalog = Catalog()
            self.sources = [build_source(spec, base_dir=workdir, start_ns=start_ns) for spec in specs]
            for src in self.sources:
                src.declare(self.catalog)
            self.store = LocalStore(workdir / device_id / "store", quota_bytes=DEVICE_QUOTA_BYTES)
        self.metrics = AgentMetrics()
        self.counters = DeviceCounters()
        self._lock = lock
        self._captures = 0
        self._stored_at: dict[bytes, float] = {}
        transport: UplinkTransport
        if mqtt is not None:
            cert, key = mqtt.ca.client(device_id)  # CN = device id = MQTT username
            transport = MqttTransport(
                MqttSettings(mqtt.host, mqtt.port, mqtt.ca.ca_path, cert, key), device_id, fleet=fleet
            )
        else:
            transport = GrpcTransport(target)
        self.link = Link(
            transport,
            device_id=device_id,
            store=self.store,
            metrics=self.metrics,
            greeting=Greeting(
                device_id, fleet, catalog=self.catalog, labels={"sim": "fleet"}, data_origin=origin
            ).messages,
            on_message=self._on_cloud,
            upload_deadline_s=upload_deadline_s,
            on_ack=self._on_ack,
            scheduled=grants,
            loop=swarm,
        )

    def _on_cloud(self, msg: device_pb2.CloudMessage) -> None:
        if msg.WhichOneof("kind") == "upload_grant":
            with self._lock:
                self.counters.grants += 1
                self.counters.granted_bytes += msg.upload_grant.max_bytes
            self.link.grant(msg.upload_grant.max_bytes, msg.upload_grant.min_priority)

    def report_backlog(self) -> None:
        """A heartbeat with the backlog per priority and the network: what the upload scheduler needs."""
        if self.store is None:
            return
        hb = heartbeat(self.store, self.network, time.time_ns(), backlog=True)
        self.link.send(device_pb2.DeviceMessage(heartbeat=hb))

    def _on_ack(self, seg: StoredSegment, duplicate: bool) -> None:
        with self._lock:
            self.counters.cloud_duplicates += int(duplicate)
            if seg.segment_id in self.counters.acked:
                self.counters.duplicate_acks += 1
            else:
                self.counters.acked[seg.segment_id] = seg.samples
                self.counters.capture_of[seg.segment_id] = seg.capture_id
            stored_at = self._stored_at.pop(seg.segment_id, None)
            if stored_at is not None and len(self.counters.latencies_s) < MAX_LATENCY_SAMPLES:
                self.counters.latencies_s.append(time.monotonic() - stored_at)

    def capture(self, data_until_ns: int, now_ns: int) -> int:
        """Cut everything the sources produced up to ``data_until_ns`` into one capture; returns samples."""
        if self.store is None:
            return 0
        self._captures += 1
        capture_id = f"{self.device_id}-c{self._captures:06d}"
        stored = 0
        for src in self.sources:
            for batch in src.read(data_until_ns):
                if len(batch) == 0 or not batch.values:
                    continue
                seg = segment_from_batch(batch, self.catalog)
                with self._lock:
                    self._stored_at[seg.segment_id] = time.monotonic()
                try:
                    self.store.append(
                        seg,
                        capture_id=capture_id,
                        campaign="sim-fleet",
                        priority=self.priority,
                        now_ns=now_ns,
                    )
                except StorageFullError:
                    with self._lock:
                        self.counters.store_full += 1
                        self._stored_at.pop(seg.segment_id, None)
                    continue
                stored += seg.sample_count
                with self._lock:
                    self.counters.segments_stored += 1
                    self.counters.samples_stored += seg.sample_count
        if stored:
            self.link.kick_upload()
        if self.grants:
            self.report_backlog()
        return stored

    def pending(self) -> int:
        return self.store.stats().segments_pending if self.store is not None else 0

    def close(self) -> None:
        self.link.stop()
        if self.store is not None:
            self.store.close()


class SimFleet:
    """``devices`` simulated agents sharing one producer thread; with several targets (coordinators),
    device i talks to ``targets[i % len(targets)]`` first and, when that session ends, to the next."""

    def __init__(
        self,
        target: str | Sequence[str],
        devices: int,
        workdir: Path,
        *,
        recordings: Path | None,
        kind: str = "car",
        fleet: str = "sim",
        capture_period_s: float = 1.0,
        speed: float = 1.0,
        upload_deadline_s: float = 10.0,
        id_prefix: str = "sim",
        mqtt: MqttEndpoint | None = None,
        grants: bool = False,
        hold_only: bool = False,
        connect_rate: float | None = None,
    ) -> None:
        if grants and mqtt is not None:
            raise UserError("upload grants are simulated over gRPC only for now")
        if hold_only and mqtt is not None:
            raise UserError("hold-only devices run over gRPC (for MQTT see fleetloop_fwsim.mqtt_swarm)")
        limit = MAX_MQTT_DEVICES if mqtt is not None else MAX_DEVICES
        if not 1 <= devices <= limit:
            raise UserError(f"--devices must be between 1 and {limit} over this transport, got {devices}")
        check_choice(kind, KINDS, "--kind", error=UserError)
        if capture_period_s <= 0 or speed <= 0:
            raise UserError("capture period and replay speed must be positive")
        targets = [target] if isinstance(target, str) else list(target)
        if not targets:
            raise UserError("the fleet needs at least one coordinator address")
        self.target = targets[0]
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        specs, self.origin = source_specs(kind, recordings, self.workdir)
        self._lock = threading.Lock()
        self._period = capture_period_s
        self._speed = speed
        self._stop = threading.Event()
        self._t0 = time.time_ns()
        self._swarm = Swarm(connect_rate=connect_rate) if connect_rate else Swarm()
        shared_catalog: Catalog | None = None
        if hold_only:  # one catalog for all: the hello carries it, no device replays anything
            shared_catalog = Catalog()
            for spec in specs:
                build_source(spec, base_dir=self.workdir, start_ns=self._t0).declare(shared_catalog)
        self.agents = [
            SimAgent(
                f"{id_prefix}-{i:05d}",
                target=targets[i % len(targets):] + targets[: i % len(targets)],
                fleet=fleet,
                specs=specs,
                origin=self.origin,
                workdir=self.workdir,
                start_ns=self._t0 - int(i * DEVICE_OFFSET_S * NS_PER_S),
                lock=self._lock,
                upload_deadline_s=upload_deadline_s,
                mqtt=mqtt,
                grants=grants,
                # with grants, a mixed fleet: priorities 3/6/9, every other device on cellular
                priority=(3, 6, 9)[i % 3] if grants else CAPTURE_PRIORITY,
                network="cellular" if grants and i % 2 else "wifi",
                swarm=self._swarm,
                hold_only=shared_catalog,
            )
            for i in range(devices)
        ]
        self._producer = threading.Thread(target=self._produce, name="sim-fleet-producer", daemon=True)
        self.produce_errors = 0

    def start(self) -> None:
        for agent in self.agents:
            agent.link.start()
        self._producer.start()

    def _produce(self) -> None:
        next_tick = time.monotonic() + self._period
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += self._period
            now_ns = time.time_ns()
            for agent in self.agents:
                if self._stop.is_set():
                    return
                elapsed = (now_ns - self._t0) * self._speed
                try:
                    agent.capture(agent.start_ns + int(elapsed), now_ns)
                except (UserError, ConfigError, OSError) as exc:
                    self.produce_errors += 1
                    log.warning("device %s: capture failed: %s", agent.device_id, exc)

    def stop_producing(self) -> None:
        self._stop.set()
        if self._producer.is_alive():
            self._producer.join(timeout=30)

    def connected(self) -> int:
        return sum(1 for a in self.agents if a.link.connected.is_set())

    def pending(self) -> int:
        return sum(a.pending() for a in self.agents)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every device's store is empty (all acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pending() == 0:
                return True
            for agent in self.agents:
                if agent.grants:
                    agent.report_backlog()  # grants follow reports; the producer no longer sends them
                agent.link.kick_upload()
            time.sleep(0.25)
        return self.pending() == 0

    def close(self) -> None:
        self.stop_producing()
        self._swarm.close()  # every link at once rather than one device after the other
        for agent in self.agents:
            agent.close()

    def latencies_s(self) -> list[float]:
        with self._lock:
            return sorted(x for a in self.agents for x in a.counters.latencies_s)

    def acked_segments(self) -> dict[tuple[str, bytes], int]:
        with self._lock:
            return {(a.device_id, sid): n for a in self.agents for sid, n in a.counters.acked.items()}

    def acked_by_capture(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(device, capture) → (acknowledged segments, their samples)."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        with self._lock:
            for a in self.agents:
                for sid, n in a.counters.acked.items():
                    key = (a.device_id, a.counters.capture_of[sid])
                    segments, samples = out.get(key, (0, 0))
                    out[key] = (segments + 1, samples + n)
        return out

    def totals(self) -> dict[str, int]:
        with self._lock:
            c = [a.counters for a in self.agents]
            return {
                "segments_stored": sum(x.segments_stored for x in c),
                "samples_stored": sum(x.samples_stored for x in c),
                "segments_acknowledged": sum(len(x.acked) for x in c),
                "acknowledged_samples": sum(sum(x.acked.values()) for x in c),
                "duplicate_acks": sum(x.duplicate_acks for x in c),
                "retries_deduplicated_by_cloud": sum(x.cloud_duplicates for x in c),
                "store_full": sum(x.store_full for x in c),
                "grants_received": sum(x.grants for x in c),
                "granted_bytes": sum(x.granted_bytes for x in c),
                "segments_refused": sum(_counter(a, "segments_refused") for a in self.agents),
                "upload_errors": sum(_counter(a, "upload_errors") for a in self.agents),
            }


def _counter(agent: SimAgent, name: str) -> int:
    value = agent.metrics.registry.get_sample_value(f"fleetloop_agent_{name}_total")
    return int(value or 0)


# -- a private coordinator process -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CoordinatorProcess(RestartableChild):
    """``fleetloop cloud serve`` in its own process group, restartable on the same ports."""

    def __init__(
        self,
        data_dir: Path,
        *,
        log_path: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        init_args: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        #: Added to ``cloud init`` (e.g. ``--targets-key``: the release manager's public key).
        self.init_args = list(init_args or [])
        #: Added to this process's environment for the coordinator (e.g. a short controller lease).
        self.env = dict(env or {})
        self.log_path = log_path
        self.grpc_port = 0
        self.http_port = 0
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        #: The admin API token of this coordinator's data (made by ``cloud init`` on the first start).
        self.token = ""

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def init(self) -> None:
        """``fleetloop cloud init`` once per data directory (and database); the admin token goes to a
        file there, so coordinators sharing the directory share it (and, once one of them ran this,
        may start at the same time)."""
        token_file = self.data_dir / "admin.token"
        if not token_file.exists():
            db = self.extra_args[self.extra_args.index("--db") + 1] if "--db" in self.extra_args else None
            argv = [sys.executable, "-m", "fleetloop_cli.main", "cloud", "init", "--dir", str(self.data_dir),
                    "--token-file", str(token_file), *(["--db", db] if db else []),
                    *self.init_args]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
            if done.returncode != 0:
                raise UnavailableError(f"cloud init failed: {done.stderr.strip()[-500:]}")
        self.token = token_file.read_text().strip()

    def start(self, timeout_s: float = 60.0) -> None:
        if not self.token:
            self.init()
        ready = self.log_path.with_suffix(".ready.json")  # per process: several may share data_dir
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        argv = [
            sys.executable, "-m", "fleetloop_cli.main", "cloud", "serve",
            "--dir", str(self.data_dir),
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            "--ready-file", str(ready), "--log-level", "warning",
            *self.extra_args,
        ]  # fmt: skip
        log_file = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env},
            )  # fmt: skip
        finally:
            log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UnavailableError(
                    f"coordinator exited with code {self.proc.returncode} while starting "
                    f"(log {self.log_path})"
                )
            if ready.is_file():
                info = json.loads(ready.read_text())
                self.grpc_port = int(str(info["grpc"]).rsplit(":", 1)[1])
                self.http_port = int(str(info["http"]).rsplit(":", 1)[1])
                return
            time.sleep(0.05)
        self.kill()
        raise UnavailableError(
            f"coordinator did not become ready within {timeout_s:g} s (log {self.log_path})"
        )

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, like a crashed or OOM-killed coordinator."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def query(self, sql: str, max_rows: int = 1000) -> list[list[Any]]:
        body = json.dumps({"sql": sql, "max_rows": max_rows}).encode()
        req = urllib.request.Request(
            self.http_url + "/v1/query", data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=150) as resp:
                result = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise UserError(f"query failed: HTTP {exc.code}: {exc.read()[:200]!r}") from None
        except OSError as exc:
            raise UnavailableError(f"coordinator at {self.http_url}: {exc}") from None
        return [list(r) for r in result["rows"]]


def coordinator_mqtt_args(broker: MosquittoProcess, name: str = "coordinator") -> list[str]:
    """``cloud serve`` flags that attach a coordinator to ``broker`` (its own certificate, CN=``name``,
    registered in the broker's group of coordinators)."""
    cert, key = broker.add_coordinator(name)
    return [
        f"--mqtt={broker.host}:{broker.port}",
        f"--mqtt-ca={broker.ca.ca_path}",
        f"--mqtt-cert={cert}",
        f"--mqtt-key={key}",
    ]


def register_mqtt_devices(broker: MosquittoProcess, fleet: SimFleet) -> None:
    """Register the fleet's devices with the broker, each in its fleet, before they connect."""
    for name in sorted({agent.fleet for agent in fleet.agents}):
        broker.add_devices(name, [agent.device_id for agent in fleet.agents if agent.fleet == name])


def store_counts(coordinator: CoordinatorProcess) -> tuple[int, int]:
    """(rows in ``samples``, rows that repeat a (device, signal, time) already there)."""
    rows = coordinator.query(
        "SELECT count(*), count(*) - (SELECT count(*) FROM "
        "(SELECT DISTINCT device_id, signal, t_ns FROM samples)) FROM samples"
    )
    return int(rows[0][0] or 0), int(rows[0][1] or 0)


def latency_summary(latencies: list[float]) -> dict[str, float | None]:
    """p50/p95/max of capture-to-queryable seconds (sorted input)."""
    if not latencies:
        return {"capture_to_queryable_p50_s": None, "capture_to_queryable_p95_s": None}

    def pick(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 4)

    return {
        "capture_to_queryable_p50_s": pick(0.50),
        "capture_to_queryable_p95_s": pick(0.95),
        "capture_to_queryable_max_s": round(latencies[-1], 4),
    }


def run_fleet(
    *,
    devices: int,
    duration_s: float,
    workdir: Path,
    recordings: Path | None,
    target: str | None = None,
    kind: str = "car",
    capture_period_s: float = 1.0,
    transport: str = "grpc",
    grants: bool = False,
    hold_only: bool = False,
) -> dict[str, Any]:
    """``fleetloop sim fleet``: run ``devices`` agents for ``duration_s`` against ``target`` (or a
    private coordinator; with ``transport="mqtt"`` also a private mosquitto), drain, and report what
    was stored, acknowledged and ingested. ``hold_only`` (gRPC): devices that only hold their control
    stream — up to ``MAX_DEVICES`` of them, where devices with data are bounded by their local stores
    (3 descriptors each) and the replay work of one producer thread."""
    coordinator: CoordinatorProcess | None = None
    broker: MosquittoProcess | None = None
    endpoint: MqttEndpoint | None = None
    if transport == "mqtt":
        if target is not None:
            raise UserError("--transport mqtt runs its own broker and coordinator; drop --grpc")
        broker = MosquittoProcess(workdir / "broker")
        broker.start()
        endpoint = MqttEndpoint(broker.host, broker.port, broker.ca)
    if target is None:
        extra = coordinator_mqtt_args(broker) if broker is not None else []
        coordinator = CoordinatorProcess(workdir / "cloud", log_path=workdir / "cloud.log", extra_args=extra)
        try:
            coordinator.start()
        except BaseException:
            if broker is not None:
                broker.stop()
            raise
        target = coordinator.grpc_target
    fleet = SimFleet(
        target,
        devices,
        workdir / "devices",
        recordings=recordings,
        kind=kind,
        capture_period_s=capture_period_s,
        mqtt=endpoint,
        grants=grants,
        hold_only=hold_only,
    )
    try:
        if broker is not None:
            register_mqtt_devices(broker, fleet)
        t0 = time.monotonic()
        fleet.start()
        peak_connected = 0
        while time.monotonic() - t0 < duration_s:
            time.sleep(min(0.5, max(0.0, duration_s - (time.monotonic() - t0))))
            peak_connected = max(peak_connected, fleet.connected())
        fleet.stop_producing()
        drained = fleet.drain(timeout_s=max(30.0, duration_s))
        elapsed = time.monotonic() - t0
        totals = fleet.totals()
        out: dict[str, Any] = {
            "devices": devices,
            "transport": transport,
            "data_origin": fleet.origin,
            "duration_s": round(elapsed, 2),
            "peak_connected": peak_connected,
            "drained": drained,
            **totals,
            "acknowledged_samples_per_s": round(totals["acknowledged_samples"] / elapsed, 1),
            **latency_summary(fleet.latencies_s()),
        }
        if coordinator is not None:
            ingested, duplicates = store_counts(coordinator)
            out["ingested_samples"] = ingested
            out["duplicates"] = duplicates
        return out
    finally:
        fleet.close()
        if coordinator is not None:
            coordinator.stop()
        if broker is not None:
            broker.stop()
