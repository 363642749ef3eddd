"""Ingest benchmark (issue 6): uploads → queryable Parquet, devices held, capture-to-queryable latency.

Prints one JSON object with three parts:

* ``ingest_per_core`` — ``Coordinator.ingest`` (decode the segment, check it, write the Parquet file,
  commit the metadata row: what happens between an upload arriving and its ack) on segments cut from the
  real comma2k19 drive, timed by the process's CPU time on one thread: samples per coordinator CPU-second.
  The **reference in the same run** is what ThingsBoard-style ingestion does per point: one row per sample
  inserted into an SQL table (SQLite here, ``executemany`` in one transaction — the cheapest form of it).
  Reported as the ratio; ThingsBoard itself documents 5–10 k points/s on PostgreSQL.
* ``connected_devices`` — simulated agents (the real uplink and local store, many per process) held
  connected to one coordinator at once, over gRPC, and over MQTT 5 through the shipped mosquitto config
  when mosquitto is installed.
* ``capture_to_queryable`` — ``sim fleet`` with ``--latency-devices`` devices on loopback: seconds from a
  capture's segment being stored on the device to the cloud's ack, which is sent only after the Parquet
  file and the metadata row exist (so the data is queryable by then); p50/p95, and a final SQL count that
  must equal the acknowledged samples.

The machine is shared and noisy (2 cores): each throughput figure is the best of ``--repeat`` runs, and
the reference is timed interleaved with it.

Usage: ``.venv/bin/python benchmarks/ingest.py [--repeat 3] [--devices 100,125,200] [--mqtt-devices 10000]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleetloop_agent.sources import build_source
from fleetloop_cloud.coordinator import Coordinator
from fleetloop_fwsim.fleet import SimFleet, latency_summary, run_fleet
from fleetloop_fwsim.profiles import source_specs
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id, segment_from_batch
from fleetloop_shared.wire import device_pb2

NS = 1_000_000_000


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cloud", "firmware-sim", "agent"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def real_segments(recordings: Path, seconds: float) -> tuple[Catalog, list[Segment]]:
    """``seconds`` of the comma2k19 drive as the car agent cuts it: one segment per signal group."""
    specs, _ = source_specs("car", recordings, Path(tempfile.mkdtemp()))
    start = 1_700_000_000 * NS
    catalog = Catalog()
    sources = [build_source(s, base_dir=recordings, start_ns=start) for s in specs]
    for src in sources:
        src.declare(catalog)
    segs = []
    for src in sources:
        for batch in src.read(start + int(seconds * NS)):
            if len(batch) and batch.values:
                segs.append(segment_from_batch(batch, catalog))
    return catalog, segs


def _hello(device_id: str, catalog: Catalog) -> device_pb2.Hello:
    h = device_pb2.Hello(device_id=device_id, fleet="bench", data_origin="recordings")
    for s in catalog:
        h.catalog.add(
            id=s.id,
            path=s.path,
            data_type=device_pb2.DataType.Value(f"DATA_TYPE_{s.data_type.name}"),
            unit=s.unit,
        )
    return h


def bench_ingest(recordings: Path, repeat: int, seconds: float, copies: int) -> dict[str, Any]:
    catalog, base = real_segments(recordings, seconds)
    per_copy = sum(s.sample_count for s in base)
    best_ours = best_ref = 0.0
    files = rows = 0
    for r in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            c = Coordinator(Path(tmp) / "cloud")
            c.on_hello(_hello("car-1", catalog))
            uploads = []
            for k in range(copies):  # distinct segments: new ids, each copy later in time
                for s in base:
                    seg = dataclasses.replace(
                        s, segment_id=new_segment_id(), t_ns=s.t_ns + (k + r * copies) * 120 * NS
                    )
                    uploads.append((seg.segment_id, encode_segment(seg)))
            warm = dataclasses.replace(base[0], segment_id=new_segment_id(), t_ns=base[0].t_ns - 10**6 * NS)
            c.ingest("car-1", warm.segment_id, "warm-up", "bench", 5, encode_segment(warm))  # imports, caches
            c.query("SELECT 1")
            t0 = time.process_time()
            samples = 0
            for sid, data in uploads:
                samples += c.ingest("car-1", sid, "cap", "bench", 5, data).samples
            cpu = time.process_time() - t0
            best_ours = max(best_ours, samples / cpu)
            check = c.query("SELECT count(*) FROM samples WHERE capture_id = 'cap'").rows[0][0]
            assert check == samples == per_copy * copies, (check, samples)
            files = len(uploads)
            rows = samples
            # the reference: one row per point into an SQL table
            db = sqlite3.connect(str(Path(tmp) / "points.sqlite"))
            db.execute("CREATE TABLE ts (device TEXT, signal TEXT, t INTEGER, v REAL)")
            t0 = time.process_time()
            with db:
                for s in base:
                    for sid, col in s.columns.items():
                        name = catalog.by_id(sid).path
                        db.executemany(
                            "INSERT INTO ts VALUES (?, ?, ?, ?)",
                            zip(["car-1"] * len(s.t_ns), [name] * len(s.t_ns), s.t_ns.tolist(),
                                np.asarray(col, dtype=float).tolist(), strict=True),
                        )  # fmt: skip
            ref = per_copy / (time.process_time() - t0)
            db.close()
            best_ref = max(best_ref, ref)
    return {
        "what": "Coordinator.ingest (decode + validate + Parquet + metadata) on real comma2k19 segments, "
        "one thread, samples per CPU-second",
        "segments_per_run": files,
        "samples_per_run": rows,
        "samples_per_segment_avg": round(rows / max(files, 1), 1),
        "samples_per_s_per_core": round(best_ours),
        "reference": "row-per-point INSERT into SQLite (executemany, one transaction)",
        "reference_samples_per_s_per_core": round(best_ref),
        "ratio_vs_reference": round(best_ours / best_ref, 2),
        "goal_samples_per_s_per_core": 1_000_000,
        "anchor": "ThingsBoard documents 5-10 k points/s on PostgreSQL",
    }


def bench_connected_grpc(recordings: Path, devices: int) -> dict[str, Any]:
    from fleetloop_fwsim.fleet import CoordinatorProcess

    with tempfile.TemporaryDirectory() as tmp:
        cp = CoordinatorProcess(Path(tmp) / "cloud", log_path=Path(tmp) / "cloud.log")
        cp.start()
        fleet = SimFleet(
            cp.grpc_target, devices, Path(tmp) / "devices", recordings=recordings, capture_period_s=5
        )
        try:
            t0 = time.monotonic()
            fleet.start()
            peak = 0
            while time.monotonic() - t0 < 20:
                peak = max(peak, fleet.connected())
                if peak == devices:
                    break
                time.sleep(0.5)
            held = fleet.connected()
            return {"transport": "grpc", "devices": devices, "peak_connected": peak, "held_connected": held,
                    "seconds_to_connect": round(time.monotonic() - t0, 1)}  # fmt: skip
        finally:
            fleet.close()
            cp.stop()


#: Devices per client process: paho's loop uses select(), which cannot watch fds above 1024, and each
#: client holds 3 fds — so one process can hold ~300 clients, and the harness spreads them over processes.
MQTT_CLIENTS_PER_PROCESS = 250


def mqtt_client_worker(host: str, port: int, ca_dir: str, first: int, count: int) -> None:
    """(subprocess) hold ``count`` device sessions: connect with TLS (paho retries a failed connect on its
    own), say hello on every (re)connect, keep alive until killed."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ca = Path(ca_dir)
    clients = []
    for i in range(first, first + count):
        did = f"m-{i:05d}"
        cl = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=did, protocol=mqtt.MQTTv5
        )
        cl.tls_set(
            ca_certs=str(ca / "ca.pem"), certfile=str(ca / f"{did}.pem"), keyfile=str(ca / f"{did}.key")
        )
        hello = device_pb2.DeviceMessage(
            hello=device_pb2.Hello(device_id=did, fleet="bench")
        ).SerializeToString()
        topic = f"fl/v1/bench/{did}/up/control"
        cl.on_connect = lambda c, u, f, rc, p, t=topic, h=hello: c.publish(t, h, qos=1)
        cl.reconnect_delay_set(1, 10)
        cl.connect_async(host, port, keepalive=120)
        cl.loop_start()
        clients.append(cl)
    time.sleep(3600)


def bench_connected_mqtt(devices: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """Many MQTT 5 device sessions (TLS client certificates, shipped ACLs) against one broker and one
    coordinator bridge: each device connects and says hello; counted when the coordinator has it online.
    The devices are paho clients in ``ceil(devices / MQTT_CLIENTS_PER_PROCESS)`` helper processes."""
    from fleetloop_cloud.mqtt_bridge import BridgeSettings, MqttBridge
    from fleetloop_fwsim.broker import MosquittoProcess, mosquitto_binary

    if mosquitto_binary() is None:
        return {"transport": "mqtt", "skipped": "mosquitto not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoProcess(Path(tmp) / "broker")
        broker.start()
        c = Coordinator(Path(tmp) / "cloud")
        cert, key = broker.ca.client("coordinator")
        bridge = MqttBridge(c, BridgeSettings(broker.host, broker.port, broker.ca.ca_path, cert, key))
        bridge.start()
        while not bridge.connected.wait(0.1):
            pass
        for i in range(devices):
            broker.ca.client(f"m-{i:05d}")
        workers: list[subprocess.Popen[bytes]] = []
        try:
            t0 = time.monotonic()
            for first in range(0, devices, MQTT_CLIENTS_PER_PROCESS):
                count = min(MQTT_CLIENTS_PER_PROCESS, devices - first)
                argv = [sys.executable, __file__, "--mqtt-worker", broker.host, str(broker.port),
                        str(broker.ca.dir), str(first), str(count)]  # fmt: skip
                workers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            peak = 0
            while time.monotonic() - t0 < timeout_s:
                peak = len(c.sessions.online())
                if peak >= devices:
                    break
                time.sleep(0.5)
            seconds = time.monotonic() - t0
            time.sleep(5)  # still held a few seconds later?
            return {"transport": "mqtt", "devices": devices, "online_at_coordinator": peak,
                    "held_after_5_s": len(c.sessions.online()), "seconds_to_connect": round(seconds, 1),
                    "client_processes": len(workers), "bridge_refused": dict(bridge.refused)}  # fmt: skip
        finally:
            for w in workers:
                w.kill()
                w.wait()
            bridge.stop()
            broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="recordings directory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of the drive per segment set")
    ap.add_argument("--copies", type=int, default=5, help="copies of the segment set ingested per run")
    ap.add_argument("--devices", default="100,120", help="gRPC devices held (comma-separated runs)")
    ap.add_argument("--mqtt-devices", type=int, default=500)
    ap.add_argument("--latency-devices", type=int, default=100)
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--mqtt-worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mqtt_worker:
        host, port, ca_dir, first, count = args.mqtt_worker
        mqtt_client_worker(host, int(port), ca_dir, int(first), int(count))
        return 0
    recordings = find_recordings(args.data)
    if recordings is None:
        print("error: the real recordings are needed (../shared/data/real or --data)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {
        "benchmark": "ingest",
        "commit": _commit(),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "command": " ".join([".venv/bin/python", "benchmarks/ingest.py", *sys.argv[1:]]),
    }
    out["ingest_per_core"] = bench_ingest(recordings, args.repeat, args.seconds, args.copies)
    out["connected_devices"] = [
        bench_connected_grpc(recordings, int(n)) for n in args.devices.split(",") if n
    ]
    if args.mqtt_devices:
        out["connected_devices"].append(bench_connected_mqtt(args.mqtt_devices))
    with tempfile.TemporaryDirectory() as tmp:
        fleet = run_fleet(devices=args.latency_devices, duration_s=args.latency_seconds, workdir=Path(tmp),
                          recordings=recordings)  # fmt: skip
    out["capture_to_queryable"] = {
        "devices": args.latency_devices,
        "transport": "grpc (loopback)",
        "p50_s": fleet.get("capture_to_queryable_p50_s"),
        "p95_s": fleet.get("capture_to_queryable_p95_s"),
        "max_s": fleet.get("capture_to_queryable_max_s"),
        "goal_p95_s": 2.0,
        "segments": fleet["segments_acknowledged"],
        "acknowledged_samples": fleet["acknowledged_samples"],
        "ingested_samples_by_sql": fleet.get("ingested_samples"),
        "duplicates": fleet.get("duplicates"),
    }
    assert latency_summary  # re-exported for readers of this script
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
