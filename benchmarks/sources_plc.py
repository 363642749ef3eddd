"""Live-source benchmark: Modbus TCP tags per second per core, push-API samples per second per core.

One JSON object on stdout. The other side of each wire runs in its own process (spawned), so the CPU
time measured (``time.process_time`` of this process) is the agent side's alone:

(a) ``modbus``: the ``ModbusSource`` polling firmware-sim's pymodbus server playing the SKAB pump
    (27 tags: 16 float32 in two word orders, 8 scaled int16, 3 bits; planned into 4 requests per poll),
    as fast as the server answers, for ``--seconds``. Reference, same run, same server: pymodbus's own
    client reading each tag with its own request and decoding it with ``convert_from_registers`` (what a
    map without planning costs). Reports tags/s per agent CPU-second and wall tags/s for both.
(b) ``push``: a publisher process sending ``PublishValues`` batches (3 float columns × ``rows`` rows) over
    the UNIX socket to ``PushApiSource`` while this process's main thread drains ``read()`` every 100 ms,
    as the agent's loop does. Reference, same run: the same requests to a gRPC servicer on the same kind
    of socket that only answers (protobuf parsing and gRPC's own cost: the floor). Reports samples/s
    per agent CPU-second for small (10 rows) and large (1,000 rows) batches.

Usage: ``.venv/bin/python benchmarks/sources_plc.py [--seconds S]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fleetloop_agent.push_client import PushClient
from fleetloop_agent.sources.modbus import ModbusSource, PymodbusClient
from fleetloop_agent.sources.modbus_map import Tag
from fleetloop_agent.sources.push_api import PushApiSource, PushSignal
from fleetloop_fwsim.plc import SKAB_COLUMNS, ModbusPump, SkabTable
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.wire import push_pb2, push_pb2_grpc

S = 1_000_000_000


# -- the other side of the wire (child processes) --------------------------------------------------------


def _serve_pump(port_q: Any, stop: Any) -> None:
    pump = ModbusPump(SkabTable.load(find_recordings(), rows_per_s=10.0))
    pump.start()
    port_q.put(pump.port)
    stop.wait()
    pump.close()


def _publish(sock: str, rows: int, seconds: float, out: Any) -> None:
    t0 = time.time_ns()
    sent = refused = 0
    with PushClient(sock) as client:
        client.signals()
        batch = client.batch(
            {f"Robot.Imu.{a}": np.linspace(0, 1, rows).tolist() for a in "XYZ"},
            time_ns=[t0 + k for k in range(rows)],
        )
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += client.publish_batches([batch])
            except Exception:
                refused += 1
    out.put((sent, refused))


# -- (a) Modbus --------------------------------------------------------------------------------------------


def _pump_tags() -> list[Tag]:
    tags = []
    for i, c in enumerate(SKAB_COLUMNS):
        k = c.replace(" ", "")
        tags.append(Tag(f"Pump.ABCD.{k}", "holding", 2 * i, "float32", poll_ns=1_000_000))
        tags.append(
            Tag(f"Pump.CDAB.{k}", "holding", 100 + 2 * i, "float32", word_order="little", poll_ns=1_000_000)
        )
        tags.append(Tag(f"Pump.X100.{k}", "input", i, "int16", scale=0.01, poll_ns=1_000_000))
    tags += [
        Tag("Pump.Motor", "coil", 0, "bool", poll_ns=1_000_000),
        Tag("Pump.Flow", "discrete", 0, "bool", poll_ns=1_000_000),
    ]
    tags.append(Tag("Pump.PressureUp", "coil", 1, "bool", poll_ns=1_000_000))
    return tags


def bench_modbus(port: int, seconds: float) -> dict[str, Any]:
    tags = _pump_tags()
    src = ModbusSource("pump", PymodbusClient("127.0.0.1", port, timeout_s=2.0), tags)
    src.declare(Catalog())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    src.start()
    delivered = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        delivered += sum(b.sample_count for b in src.read(time.time_ns() + S))
    src.close()
    delivered += sum(b.sample_count for b in src.read(time.time_ns() + S))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    # reference: one request per tag, decoded by pymodbus itself
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2.0, retries=0)
    client.connect()  # type: ignore[no-untyped-call]
    dt = client.DATATYPE
    ref = 0
    wall1, cpu1 = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in tags:
            if t.register == "coil":
                client.read_coils(t.address, count=1, device_id=1)
            elif t.register == "discrete":
                client.read_discrete_inputs(t.address, count=1, device_id=1)
            else:
                read = (
                    client.read_holding_registers if t.register == "holding" else client.read_input_registers
                )
                regs = read(t.address, count=t.words, device_id=1).registers
                kind = dt.FLOAT32 if t.data_type == "float32" else dt.INT16
                client.convert_from_registers(
                    regs, kind, word_order="little" if t.word_order == "little" else "big"
                )
            ref += 1
    ref_wall, ref_cpu = time.perf_counter() - wall1, time.process_time() - cpu1
    client.close()  # type: ignore[no-untyped-call]
    return {
        "tags": len(tags),
        "requests_per_poll": src.requests_per_cycle,
        "polls": delivered // len(tags),
        "missed_polls": src.counters.missed_polls,
        "errors": src.counters.errors,
        "tags_per_cpu_s": round(delivered / cpu),
        "tags_per_wall_s": round(delivered / wall),
        "reference": "pymodbus client, one request per tag, convert_from_registers",
        "reference_tags_per_cpu_s": round(ref / ref_cpu),
        "reference_tags_per_wall_s": round(ref / ref_wall),
        "ratio_cpu": round((delivered / cpu) / (ref / ref_cpu), 2),
        "ratio_wall": round((delivered / wall) / (ref / ref_wall), 2),
    }


# -- (b) push API --------------------------------------------------------------------------------------


class _Floor(push_pb2_grpc.PushServiceServicer):
    def PublishValues(
        self, request: push_pb2.PublishValuesRequest, context: grpc.ServicerContext
    ) -> push_pb2.PublishValuesResponse:
        return push_pb2.PublishValuesResponse(
            accepted_samples=sum(len(b.time_ns) * len(b.columns) for b in request.batches)
        )

    def ListSignals(
        self, request: push_pb2.ListSignalsRequest, context: grpc.ServicerContext
    ) -> push_pb2.ListSignalsResponse:
        return push_pb2.ListSignalsResponse()


def bench_push(ctx: Any, rows: int, seconds: float, workdir: Path) -> dict[str, Any]:
    sock = workdir / f"push-{rows}.sock"
    src = PushApiSource(
        "robot", sock, [PushSignal(f"Robot.Imu.{a}", group="imu") for a in "XYZ"], queue_samples=2_000_000
    )
    src.declare(Catalog())
    src.start()
    while not src.serving:
        time.sleep(0.01)
    out = ctx.Queue()
    proc = ctx.Process(target=_publish, args=(str(sock), rows, seconds, out))
    proc.start()
    while src.counters.samples == 0 and proc.is_alive():  # the publisher's start-up is not measured
        time.sleep(0.005)
    wall0, cpu0, s0 = time.perf_counter(), time.process_time(), src.counters.samples
    read = 0
    while proc.is_alive():
        time.sleep(0.1)
        read += sum(b.sample_count for b in src.read(time.time_ns() + S))
    _, refused = out.get()
    proc.join()
    read += sum(b.sample_count for b in src.read(time.time_ns() + S))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    accepted = src.counters.samples - s0
    src.close()

    return {
        "rows_per_batch": rows,
        "signals_per_batch": 3,
        "samples_accepted": accepted,
        "samples_read": read,
        "refused_calls": refused,
        "samples_per_cpu_s": round(accepted / cpu),
        "samples_per_wall_s": round(accepted / wall),
    }


def bench_push_floor(ctx: Any, rows: int, seconds: float, workdir: Path) -> float:
    """Samples per CPU-second of a servicer that only answers (same requests, same socket kind)."""
    floor_sock = workdir / f"floor-{rows}.sock"
    server = grpc.server(
        ThreadPoolExecutor(max_workers=2), options=[("grpc.max_receive_message_length", 4 << 20)]
    )
    push_pb2_grpc.add_PushServiceServicer_to_server(_Floor(), server)
    server.add_insecure_port(f"unix:{floor_sock}")
    server.start()
    out = ctx.Queue()
    proc = ctx.Process(target=_publish, args=(str(floor_sock), rows, seconds, out))
    cpu0 = time.process_time()
    proc.start()
    sent, _ = out.get()
    cpu = time.process_time() - cpu0
    proc.join()
    server.stop(0)
    return sent / cpu if cpu > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve_pump, args=(port_q, stop))
    server.start()
    try:
        modbus = bench_modbus(port_q.get(timeout=60), args.seconds)
    finally:
        stop.set()
        server.join(10)
    push = {}
    with tempfile.TemporaryDirectory(prefix="fl-push-") as tmp:
        for rows in (10, 1000):
            result = bench_push(ctx, rows, args.seconds, Path(tmp))
            floor = bench_push_floor(ctx, rows, args.seconds, Path(tmp))
            result["reference"] = "gRPC servicer that only answers (parsing + gRPC: the floor)"
            result["reference_samples_per_cpu_s"] = round(floor)
            result["ratio_cpu"] = round(result["samples_per_cpu_s"] / floor, 2)
            push[f"batch_{rows}_rows"] = result
    report = {
        "benchmark": "sources_plc",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cores": mp.cpu_count(),
        },
        "seconds": args.seconds,
        "modbus": modbus,
        "push": push,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
