"""The local push API over real gRPC on a UNIX socket: batches accepted whole, unknown signals and
malformed batches refused whole and said why, a flood refused with RESOURCE_EXHAUSTED and counted while
memory stays bounded, a stale socket replaced, config mistakes named."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fleetloop_agent.push_client import PushClient
from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.push_api import PushApiSource
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, UnavailableError, UserError
from fleetloop_shared.wire import push_pb2, push_pb2_grpc

S = 1_000_000_000
AXES = ("X", "Y", "Z")


def spec(sock: Path, **extra: Any) -> dict[str, Any]:
    signals: dict[str, Any] = {f"Robot.Imu.Acceleration.{a}": {"unit": "m/s^2", "group": "imu"} for a in AXES}
    signals["Robot.Mode"] = {"type": "string"}
    signals["Robot.Battery.Cells"] = {"type": "int"}
    return {"kind": "push_api", "name": "robot", "socket": str(sock), "signals": signals, **extra}


@pytest.fixture
def robot(tmp_path: Path) -> Iterator[tuple[PushApiSource, Catalog, Path]]:
    sock = tmp_path / "run" / "push.sock"
    src = build_source(spec(sock, queue_samples=20_000), base_dir=tmp_path, start_ns=0)
    assert isinstance(src, PushApiSource)
    catalog = Catalog()
    src.declare(catalog)
    src.start()
    deadline = time.monotonic() + 10
    while not src.serving:
        assert time.monotonic() < deadline and src.alive(), src.failure
        time.sleep(0.01)
    yield src, catalog, sock
    src.close()
    assert not sock.exists()


def test_batches_are_accepted_whole_and_read_by_the_agent(robot: tuple[PushApiSource, Catalog, Path]) -> None:
    src, catalog, sock = robot
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    t0 = time.time_ns()
    with PushClient(sock) as client:
        assert {s.path: DataType(s.data_type) for s in client.signals()}["Robot.Mode"] is DataType.STRING
        n = client.publish(
            {f"Robot.Imu.Acceleration.{a}": np.arange(100.0) + i for i, a in enumerate(AXES)},
            time_ns=[t0 + k * 10_000_000 for k in range(100)],
        )
        assert n == 300
        assert client.publish({"Robot.Mode": "docking"}) == 1  # one row, stamped on arrival
        assert client.publish({"Robot.Battery.Cells": [12, 12]}, time_ns=[t0, t0 + 1]) == 2
    batches = {b.group: b for b in src.read(time.time_ns() + S)}
    imu = batches["robot/imu"]
    assert imu.t_ns.tolist() == [t0 + k * 10_000_000 for k in range(100)]
    assert (
        imu.values[catalog.by_path("Robot.Imu.Acceleration.Y").id].tolist() == (np.arange(100.0) + 1).tolist()
    )
    mode = batches["robot/Robot.Mode"]
    assert mode.values[catalog.by_path("Robot.Mode").id].tolist() == ["docking"] and t0 <= int(mode.t_ns[0])
    assert (
        batches["robot/Robot.Battery.Cells"].values[catalog.by_path("Robot.Battery.Cells").id].dtype
        == np.int64
    )
    assert src.counters.samples == 303 and src.counters.errors == 0


def test_unknown_signals_and_bad_batches_are_refused_whole(
    robot: tuple[PushApiSource, Catalog, Path],
) -> None:
    src, _, sock = robot
    with PushClient(sock) as client:
        good = client.batch({"Robot.Mode": "ok"})
        bad = client.batch({"Robot.Arm.Joint1": 0.5})
        with pytest.raises(UserError, match=r"signal 'Robot\.Arm\.Joint1' is not in this agent's catalog"):
            client.publish_batches([good, bad])
        with pytest.raises(UserError, match="the signals of group 'imu' travel together"):
            client.publish({"Robot.Imu.Acceleration.X": 1.0})
        with pytest.raises(UserError, match=r"Robot\.Battery\.Cells is INT64; send its values as int64s"):
            client.publish_batches(
                [
                    push_pb2.SampleBatch(
                        columns=[
                            push_pb2.Column(
                                signal="Robot.Battery.Cells", doubles=push_pb2.DoubleValues(values=[1.5])
                            )
                        ]
                    )
                ]
            )
    assert src.read(time.time_ns() + S) == []  # nothing of a refused request was taken, not even "ok"
    assert src.counters.errors == 3 and "Robot.Battery.Cells" in (src.last_error or "")


def test_a_flood_is_refused_with_resource_exhausted_and_memory_stays_bounded(
    robot: tuple[PushApiSource, Catalog, Path],
) -> None:
    src, _, sock = robot
    t0 = time.time_ns()
    outcomes: list[str] = []
    lock = threading.Lock()

    def flood() -> None:
        with PushClient(sock) as client:
            batch = client.batch(
                {f"Robot.Imu.Acceleration.{a}": np.zeros(500) for a in AXES},
                time_ns=[t0 + k for k in range(500)],
            )
            for _ in range(10):
                try:
                    client.publish_batches([batch])
                    result = "ok"
                except UnavailableError as exc:
                    result = "busy" if "queue is full" in str(exc) else f"other: {exc}"
                with lock:
                    outcomes.append(result)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 20_000 // 1500 and outcomes.count("busy") == 40 - 13, outcomes
    assert len(src.queue) <= src.queue.capacity
    assert src.counters.dropped == 27 * 1500 and src.counters.samples == 13 * 1500
    # the agent reads, room frees up, the publisher's retry gets through
    assert sum(len(b) for b in src.read(time.time_ns() + S)) == 13 * 500
    with PushClient(sock) as client:
        assert client.publish({"Robot.Mode": "recovered"}) == 1


def test_a_request_over_the_size_limit_is_refused_by_grpc(robot: tuple[PushApiSource, Catalog, Path]) -> None:
    src, _, sock = robot
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = push_pb2_grpc.PushServiceStub(channel)
        huge = push_pb2.SampleBatch(
            columns=[
                push_pb2.Column(
                    signal="Robot.Mode", strings=push_pb2.StringValues(values=["x" * (5 * 1024 * 1024)])
                )
            ]
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.PublishValues(push_pb2.PublishValuesRequest(batches=[huge]), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert src.alive() and src.counters.samples == 0


def test_a_stale_socket_is_replaced_and_a_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    src = build_source(spec(stale), base_dir=tmp_path, start_ns=0)
    assert isinstance(src, PushApiSource)
    src.declare(Catalog())
    src.start()
    try:
        deadline = time.monotonic() + 10
        while not src.serving:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with PushClient(stale) as client:
            assert client.publish({"Robot.Mode": "up"}) == 1
    finally:
        src.close()
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    src = build_source(spec(regular), base_dir=tmp_path, start_ns=0)
    assert isinstance(src, PushApiSource)
    src.declare(Catalog())
    src.start()
    src.close()
    assert not src.alive() and "is not a socket; not replacing it" in (src.failure or "")
    assert regular.read_text() == "keep me"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"socket": None}, "missing key 'socket'"),
        ({"socket": "/tmp/" + "x" * 120}, "socket path longer than 107 bytes"),
        ({"signals": {}}, "key 'signals': lists no signal"),
        ({"signals": {"A": {"type": "float32"}}}, "key 'signals': signal 'A': key 'type': must be one of"),
        ({"socket_mode": "rw"}, "key 'socket_mode': expected an octal mode"),
    ],
)
def test_config_mistakes_name_the_source_and_the_key(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    s = spec(tmp_path / "p.sock")
    s.update(change)
    with pytest.raises(ConfigError, match=f"source 'robot': {message}"):
        build_source(s, base_dir=tmp_path, start_ns=0)
