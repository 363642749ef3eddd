"""Ingest benchmark: uploads → queryable Parquet, devices held, capture-to-queryable latency.

Prints one JSON object with three parts:

* ``ingest_per_core`` — ``IngestService.segment`` (decode the segment, check it, write the Parquet file,
  commit the metadata row: what happens between an upload arriving and its ack) on segments cut from the
  real comma2k19 drive, timed by the process's CPU time on one thread: samples per coordinator CPU-second.
  The **reference in the same run** is what ThingsBoard-style ingestion does per point: one row per sample
  inserted into an SQL table (SQLite here, ``executemany`` in one transaction — the cheapest form of it).
  Reported as the ratio; ThingsBoard itself documents 5–10 k points/s on PostgreSQL.
* ``connected_devices`` — simulated devices held connected to one coordinator process at once, with
  the time to connect them all and what holding them costs the coordinator (RSS, CPU): over gRPC (the
  fleet simulator's devices, one asyncio loop for all, a connection and identity each), and over MQTT 5
  through a private mosquitto with the shipped config when mosquitto is installed (paho clients on one
  epoll loop per simulator process).
* ``capture_to_queryable`` — ``sim fleet`` with ``--latency-devices`` devices on loopback: seconds from a
  capture's segment being stored on the device to the cloud's ack, which is sent only after the Parquet
  file and the metadata row exist (so the data is queryable by then); p50/p95, and a final SQL count that
  must equal the acknowledged samples.

The machine is shared and noisy (2 cores): each throughput figure is the best of ``--repeat`` runs, and
the reference is timed interleaved with it.

Usage: ``.venv/bin/python benchmarks/ingest.py [--repeat 3] [--devices 100,125,200] [--mqtt-devices 10000]``
(``--only-connected --devices 10000 --mqtt-devices 10000`` runs only the devices-held part)
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
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.fleet import SimFleet, latency_summary, run_fleet
from fleetloop_fwsim.profiles import source_specs
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id, segment_from_batch
from fleetloop_shared.wire import device_pb2, ingest_pb2

NS = 1_000_000_000
CAR = Caller.device("car-1", transport="in-process", proven=True)
LOCAL = Caller.local()


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


def _upload(seg: Segment, capture_id: str) -> ingest_pb2.UploadSegmentRequest:
    return ingest_pb2.UploadSegmentRequest(
        device_id="car-1", segment_id=seg.segment_id, capture_id=capture_id, campaign="bench", priority=5,
        segment=encode_segment(seg),
    )  # fmt: skip


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
            c.devices.connect(CAR, _hello("car-1", catalog), time.time())
            uploads = []
            for k in range(copies):  # distinct segments: new ids, each copy later in time
                for s in base:
                    seg = dataclasses.replace(
                        s, segment_id=new_segment_id(), t_ns=s.t_ns + (k + r * copies) * 120 * NS
                    )
                    uploads.append(_upload(seg, "cap"))
            warm = dataclasses.replace(base[0], segment_id=new_segment_id(), t_ns=base[0].t_ns - 10**6 * NS)
            c.ingest.segment(CAR, _upload(warm, "warm-up"), time.time())  # imports, caches
            c.queries.sql(LOCAL, "SELECT 1")
            t0 = time.process_time()
            samples = 0
            for request in uploads:
                samples += c.ingest.segment(CAR, request, time.time()).samples
            cpu = time.process_time() - t0
            best_ours = max(best_ours, samples / cpu)
            check = c.queries.sql(LOCAL, "SELECT count(*) FROM samples WHERE capture_id = 'cap'").rows[0][0]
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
        "what": "IngestService.segment (decode + validate + Parquet + metadata) on real comma2k19 segments, "
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


def proc_usage(pid: int) -> dict[str, float]:
    """RSS now and at peak (MiB) and CPU seconds used so far (user + system) of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status.splitlines() if ":" in line}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    return {
        "rss_mib": round(int(fields["VmRSS"][0]) / 1024, 1),
        "peak_rss_mib": round(int(fields["VmHWM"][0]) / 1024, 1),
        "cpu_s": round((int(stat[11]) + int(stat[12])) / ticks, 2),
        "threads": int(fields["Threads"][0]),
        "sockets": sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if _is_socket(fd)),
    }


def _is_socket(fd: Path) -> bool:
    try:
        return __import__("os").readlink(fd).startswith("socket:")
    except OSError:
        return False


def bench_connected_grpc(recordings: Path, devices: int, timeout_s: float = 300.0,
                         hold_s: float = 10.0) -> dict[str, Any]:  # fmt: skip
    """``devices`` simulated devices (own connection and identity each, all on the fleet simulator's one
    asyncio loop) open their control stream to one coordinator process and say hello with the car's
    catalog; counted when the device has the coordinator's welcome. Then held ``hold_s`` seconds, idle
    (keepalive pings only), to see they stay and what holding them costs the coordinator."""
    from fleetloop_fwsim.fleet import CoordinatorProcess

    with tempfile.TemporaryDirectory() as tmp:
        cp = CoordinatorProcess(Path(tmp) / "cloud", log_path=Path(tmp) / "cloud.log")
        cp.start()
        assert cp.proc is not None
        before = proc_usage(cp.proc.pid)
        fleet = SimFleet(cp.grpc_target, devices, Path(tmp) / "devices", recordings=recordings,
                         hold_only=True)  # fmt: skip
        try:
            t0 = time.monotonic()
            fleet.start()
            peak = 0
            while time.monotonic() - t0 < timeout_s:
                peak = max(peak, fleet.connected())
                if peak == devices:
                    break
                time.sleep(0.25)
            seconds = time.monotonic() - t0
            connected_usage = proc_usage(cp.proc.pid)
            time.sleep(hold_s)
            held = fleet.connected()
            after = proc_usage(cp.proc.pid)
            online = len(cp.query("SELECT 1", max_rows=1))  # the coordinator still answers
            return {
                "transport": "grpc", "devices": devices, "peak_connected": peak, "held_connected": held,
                "online_at_coordinator": int(_summary(cp)["online"]),
                "coordinator_sockets": after["sockets"],
                "seconds_to_connect": round(seconds, 1), "held_for_s": hold_s,
                "coordinator_rss_mib": after["rss_mib"], "coordinator_peak_rss_mib": after["peak_rss_mib"],
                "coordinator_rss_before_mib": before["rss_mib"],
                "coordinator_cpu_s_connecting": round(connected_usage["cpu_s"] - before["cpu_s"], 2),
                "coordinator_cpu_pct_while_held": round(100 * (after["cpu_s"] - connected_usage["cpu_s"])
                                                        / hold_s, 1),
                "coordinator_threads": after["threads"], "coordinator_answers_sql": online == 1,
                "simulator": proc_usage(__import__("os").getpid()),
            }  # fmt: skip
        finally:
            fleet.close()
            cp.stop()


#: Devices per simulator process over MQTT: each process drives its clients from one epoll loop
#: (fleetloop_fwsim.mqtt_swarm), one descriptor each; a few processes use both cores for the handshakes.
MQTT_DEVICES_PER_PROCESS = 2500


def _summary(cp: Any) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(cp.http_url + "/v1/summary", headers={"Authorization": f"Bearer {cp.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


def bench_connected_mqtt(devices: int, timeout_s: float = 300.0, hold_s: float = 10.0,
                         rate_per_process: float = 150.0) -> dict[str, Any]:  # fmt: skip
    """Many MQTT 5 device sessions (TLS client certificates, shipped config and ACLs) against one private
    mosquitto and one coordinator process (its MQTT bridge: one shared-subscription connection). Each
    device connects, subscribes to its ``down/#``, says hello; counted online by the coordinator
    (``/v1/summary``) and welcomed at the device. The devices are paho clients on one epoll loop per
    simulator process (``fleetloop_fwsim.mqtt_swarm``), ``MQTT_DEVICES_PER_PROCESS`` per process, each
    process admitting ``rate_per_process`` new connections per second with jittered backoff on failures."""
    from fleetloop_fwsim.broker import MosquittoProcess, mosquitto_binary
    from fleetloop_fwsim.fleet import CoordinatorProcess, coordinator_mqtt_args

    if mosquitto_binary() is None:
        return {"transport": "mqtt", "skipped": "mosquitto not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoProcess(Path(tmp) / "broker")
        t_certs = time.monotonic()  # certificates issued and registered at once, before the broker starts
        broker.add_devices("bench", [f"m-{i:05d}" for i in range(devices)])
        certs_s = time.monotonic() - t_certs
        broker.start()
        cp = CoordinatorProcess(Path(tmp) / "cloud", log_path=Path(tmp) / "cloud.log",
                                extra_args=coordinator_mqtt_args(broker))  # fmt: skip
        workers: list[subprocess.Popen[bytes]] = []
        try:
            cp.start()
            assert cp.proc is not None and broker.proc is not None
            before = proc_usage(cp.proc.pid)
            broker_before = proc_usage(broker.proc.pid)
            statuses = []
            t0 = time.monotonic()
            for first in range(0, devices, MQTT_DEVICES_PER_PROCESS):
                count = min(MQTT_DEVICES_PER_PROCESS, devices - first)
                status = Path(tmp) / f"swarm-{first}.json"
                statuses.append(status)
                argv = [sys.executable, "-m", "fleetloop_fwsim.mqtt_swarm", "--host", broker.host,
                        "--port", str(broker.port), "--certs", str(broker.ca.dir), "--first", str(first),
                        "--count", str(count), "--rate", str(rate_per_process),
                        "--status", str(status)]  # fmt: skip
                workers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

            def swarm_counts() -> dict[str, int]:
                total: dict[str, int] = {}
                for f in statuses:
                    try:
                        counts = json.loads(f.read_text())
                    except (OSError, ValueError):
                        continue
                    for k, v in counts.items():
                        if k != "pid":
                            total[k] = total.get(k, 0) + int(v)
                return total

            online = peak = 0
            while time.monotonic() - t0 < timeout_s:
                online = int(_summary(cp)["online"])
                peak = max(peak, online)
                if online >= devices:
                    break
                time.sleep(1.0)
            seconds = time.monotonic() - t0
            connected_usage = proc_usage(cp.proc.pid)
            time.sleep(hold_s)
            after = proc_usage(cp.proc.pid)
            broker_after = proc_usage(broker.proc.pid)
            return {
                "transport": "mqtt", "devices": devices, "online_at_coordinator": peak,
                "held_online_after_s": {str(hold_s): int(_summary(cp)["online"])},
                "seconds_to_connect": round(seconds, 1), "certificates_issued_s": round(certs_s, 1),
                "devices_side": swarm_counts(), "simulator_processes": len(workers),
                "connect_rate_per_process": rate_per_process,
                "coordinator_rss_mib": after["rss_mib"], "coordinator_peak_rss_mib": after["peak_rss_mib"],
                "coordinator_rss_before_mib": before["rss_mib"],
                "coordinator_cpu_s_connecting": round(connected_usage["cpu_s"] - before["cpu_s"], 2),
                "coordinator_cpu_pct_while_held": round(100 * (after["cpu_s"] - connected_usage["cpu_s"])
                                                        / hold_s, 1),
                "broker_rss_mib": broker_after["rss_mib"],
                "broker_cpu_s": round(broker_after["cpu_s"] - broker_before["cpu_s"], 2),
                "coordinator_refused": _summary(cp).get("refused", {}),
            }  # fmt: skip
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                try:
                    w.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
            cp.stop()
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
    ap.add_argument("--hold-seconds", type=float, default=10.0, help="devices held this long once connected")
    ap.add_argument("--connect-timeout", type=float, default=300.0, help="seconds to connect them all")
    ap.add_argument("--only-connected", action="store_true", help="run only the devices-held benchmarks")
    args = ap.parse_args()
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
    if not args.only_connected:
        out["ingest_per_core"] = bench_ingest(recordings, args.repeat, args.seconds, args.copies)
    out["connected_devices"] = [
        bench_connected_grpc(recordings, int(n), args.connect_timeout, args.hold_seconds)
        for n in args.devices.split(",")
        if n
    ]
    if args.mqtt_devices:
        out["connected_devices"].append(
            bench_connected_mqtt(args.mqtt_devices, args.connect_timeout, args.hold_seconds)
        )
    if args.only_connected:
        print(json.dumps(out, indent=2))
        return 0
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
