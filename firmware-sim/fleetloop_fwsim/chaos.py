"""``fleetloop sim chaos``: prove exactly-once under coordinator crashes and a hostile network.

A fleet of simulated agents (:mod:`fleetloop_fwsim.fleet`, the real uplink and local store) uploads to a
private coordinator through :class:`ChaosProxy`, a TCP proxy that delays every chunk it forwards, resets
connections at random (what a dropped cellular link looks like to TCP) and stalls the link completely for
seconds at a time (so uploads hit their deadline after the coordinator may already have stored them). On
a seeded schedule the coordinator is killed with SIGKILL and restarted on the same ports.

After the faults stop, the devices drain their stores and the run compares:

- ``acknowledged_samples`` — samples of every segment a device was told is safely in the cloud;
- ``ingested_samples`` — rows in the fleet store's ``samples`` table (asked over the query API);
- ``duplicates`` — rows repeating a (device, signal, time) already stored;
- ``lost`` — samples of acknowledged segments whose Parquet file is missing from the store.

Exactly once means acknowledged == ingested with 0 duplicates and 0 lost.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from fleetloop_fwsim.broker import MosquittoProcess
from fleetloop_fwsim.fleet import (
    CoordinatorProcess,
    MqttEndpoint,
    SimFleet,
    coordinator_mqtt_args,
    register_mqtt_devices,
    store_counts,
)

#: Largest chunk the proxy forwards at once.
CHUNK = 65536
#: Connections the proxy holds at once; overflow policy: refuse the new one (counted), the client retries.
MAX_CONNECTIONS = 4096


class ChaosProxy:
    """A TCP proxy in front of one upstream address whose faults can be switched at run time."""

    def __init__(self, upstream: tuple[str, int], *, seed: int = 1) -> None:
        self.upstream = upstream
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        #: Largest random delay added before forwarding a chunk (seconds).
        self.max_delay_s = 0.0
        #: Probability that forwarding a chunk resets its connection instead.
        self.reset_probability = 0.0
        self.connections_total = 0
        self.connections_refused = 0
        self.resets = 0
        self.stalls = 0
        self.bytes_forwarded = 0
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut_all()
        self._thread.join(timeout=5)

    def calm(self) -> None:
        """No more faults: forward everything promptly."""
        self.max_delay_s = 0.0
        self.reset_probability = 0.0
        self._flowing.set()

    def stall(self, seconds: float) -> None:
        """Forward nothing for ``seconds`` (connections stay open: a black hole, not a refusal)."""
        self.stalls += 1
        self._flowing.clear()
        try:
            self._stop.wait(seconds)
        finally:
            self._flowing.set()

    def cut_all(self) -> None:
        """Reset every open connection (RST, as a vanished NAT mapping or radio link would)."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            _reset(conn)
        self.resets += len(conns)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    self.connections_refused += 1
                    _reset(client)
                    continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)  # coordinator down: the client sees a reset and retries
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, upstream))
                self.connections_total += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for src in readable:
                    data = src.recv(CHUNK)
                    if not data:
                        return
                    self._flowing.wait()
                    with self._rng_lock:
                        delay = self._rng.uniform(0.0, self.max_delay_s) if self.max_delay_s else 0.0
                        reset = self._rng.random() < self.reset_probability
                    if delay:
                        time.sleep(delay)
                    if reset:
                        self.resets += 1
                        return
                    peers[src].sendall(data)
                    self.bytes_forwarded += len(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            _reset(a)
            _reset(b)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _stored_segment_files(samples_dir: Path) -> set[tuple[str, bytes]]:
    out: set[tuple[str, bytes]] = set()
    for path in samples_dir.glob("fleet=*/date=*/*.parquet"):
        device, _, hexid = path.stem.rpartition("-")
        with contextlib.suppress(ValueError):
            out.add((device, bytes.fromhex(hexid)))
    return out


def run_chaos(
    *,
    devices: int,
    duration_s: float,
    workdir: Path,
    recordings: Path | None,
    kind: str = "car",
    seed: int = 1,
    coordinator_kills: int | None = None,
    drain_timeout_s: float = 120.0,
    transport: str = "grpc",
) -> dict[str, Any]:
    """Run the fleet through the faults for ``duration_s``, drain, and count (see the module doc).

    With ``transport="mqtt"`` the devices reach a private mosquitto through the proxy, the coordinator
    consumes from the broker directly, and the broker is killed and restarted as well."""
    rng = random.Random(seed)
    broker: MosquittoProcess | None = None
    if transport == "mqtt":
        broker = MosquittoProcess(workdir / "broker")
        broker.start()
    coordinator = CoordinatorProcess(
        workdir / "cloud",
        log_path=workdir / "cloud.log",
        extra_args=coordinator_mqtt_args(broker) if broker is not None else [],
    )
    coordinator.start()
    upstream = broker.port if broker is not None else coordinator.grpc_port
    proxy = ChaosProxy(("127.0.0.1", upstream), seed=seed)
    proxy.start()
    # A short upload deadline so stalls produce timeouts whose upload the coordinator already stored.
    fleet = SimFleet(
        proxy.address,
        devices,
        workdir / "devices",
        recordings=recordings,
        kind=kind,
        upload_deadline_s=2.0,
        mqtt=MqttEndpoint("127.0.0.1", proxy.port, broker.ca) if broker is not None else None,
    )
    kills = coordinator_kills if coordinator_kills is not None else max(1, int(duration_s // 10))
    victims = ["coordinator", "broker"] if broker is not None else ["coordinator"]
    kill_plan = sorted(
        (rng.uniform(0.15, 0.85) * duration_s, victims[i % len(victims)]) for i in range(kills)
    )
    events: list[str] = []
    try:
        if broker is not None:
            register_mqtt_devices(broker, fleet)
        t0 = time.monotonic()
        fleet.start()
        proxy.max_delay_s = 0.02
        proxy.reset_probability = 0.002
        next_fault = 1.0
        # every planned kill happens, however long the restarts before it took on a loaded machine
        while (elapsed := time.monotonic() - t0) < duration_s or kill_plan:
            if kill_plan and elapsed >= kill_plan[0][0]:
                _, victim = kill_plan.pop(0)
                if victim == "broker" and broker is not None:
                    broker.restart(down_s=rng.uniform(0.2, 1.5))
                else:
                    coordinator.restart(down_s=rng.uniform(0.2, 1.5))
                events.append(f"{elapsed:.1f}s {victim} killed and restarted")
                continue
            if elapsed >= next_fault:
                fault = rng.choice(("stall", "cut", "none"))
                if fault == "stall":
                    seconds = rng.uniform(1.0, 3.0)
                    events.append(f"{elapsed:.1f}s link stalled {seconds:.1f}s")
                    proxy.stall(seconds)
                elif fault == "cut":
                    events.append(f"{elapsed:.1f}s all connections reset")
                    proxy.cut_all()
                next_fault = time.monotonic() - t0 + rng.uniform(1.0, 3.0)
                continue
            time.sleep(0.1)
        fleet.stop_producing()
        proxy.calm()
        drained = fleet.drain(timeout_s=drain_timeout_s)
        elapsed = time.monotonic() - t0
        totals = fleet.totals()
        acked = fleet.acked_segments()
        ingested, duplicates = store_counts(coordinator)
        present = _stored_segment_files(coordinator.data_dir / "fleet" / "samples")
        lost = sum(n for key, n in acked.items() if n and key not in present)
        return {
            "acknowledged_samples": totals["acknowledged_samples"],
            "ingested_samples": ingested,
            "duplicates": duplicates,
            "lost": lost,
            "devices": devices,
            "transport": transport,
            "data_origin": fleet.origin,
            "duration_s": round(elapsed, 2),
            "drained": drained,
            "segments_acknowledged": totals["segments_acknowledged"],
            "segments_stored_on_devices": totals["segments_stored"],
            "duplicate_acks": totals["duplicate_acks"],
            "retries_deduplicated_by_cloud": totals["retries_deduplicated_by_cloud"],
            "segments_refused": totals["segments_refused"],
            "upload_errors": totals["upload_errors"],
            "coordinator_restarts": coordinator.restarts,
            "broker_restarts": broker.restarts if broker is not None else 0,
            "connections_reset": proxy.resets,
            "link_stalls": proxy.stalls,
            "proxied_connections": proxy.connections_total,
            "events": events,
        }
    finally:
        fleet.close()
        proxy.close()
        coordinator.stop()
        if broker is not None:
            broker.stop()
