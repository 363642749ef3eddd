"""One coordinator holds more devices than it has threads, over gRPC and over MQTT 5.

The coordinator's gRPC server used to spend a worker thread per open control stream (128 of them), so
device 129 waited at the door; these run 300 simulated devices — each its own connection and identity —
against one coordinator over real gRPC on loopback, and 300 MQTT devices from one simulator loop through
the private mosquitto with the shipped config, and check that everyone else is still served meanwhile.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.mqtt_bridge import BridgeSettings, MqttBridge
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.fleet import SimFleet
from fleetloop_fwsim.mqtt_swarm import MqttSwarm
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.segment import Segment, new_segment_id
from fleetloop_shared.wire import device_pb2
from tests.fixtures import mosquitto_broker as broker_fixture
from tests.fixtures.waiting import wait_for

#: How long a wait may take here: a whole fleet connects, uploads and leaves.
FLEET_WAIT_S = 25.0


DEVICES = 300  # > the 128 worker threads of the former synchronous server
T0 = 1_700_000_000 * 10**9


def test_one_coordinator_holds_300_grpc_devices_and_serves_others(tmp_path: Path, recordings: Path) -> None:
    c = Coordinator(tmp_path / "cloud")
    server, port = start_grpc_server(c, "127.0.0.1", 0)
    target = f"127.0.0.1:{port}"
    fleet = SimFleet(target, DEVICES, tmp_path / "devices", recordings=recordings, hold_only=True)
    store = LocalStore(tmp_path / "honest")
    try:
        fleet.start()
        wait_for(f"{DEVICES} devices welcomed", lambda: fleet.connected() == DEVICES, timeout=FLEET_WAIT_S)
        wait_for(
            "the coordinator to see them", lambda: len(c.sessions.online()) == DEVICES, timeout=FLEET_WAIT_S
        )
        # health still answers at once (it queued behind the device streams on the thread pool before)
        with grpc.insecure_channel(target) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # one more device (an agent's own link) connects and uploads while the 300 are held
        t = np.arange(T0, T0 + 100, dtype=np.int64)
        seg = Segment(new_segment_id(), "speed", t, {1: np.arange(100.0)}, {1: DataType.FLOAT64})
        store.append(seg, capture_id="cap", campaign="c", priority=5, now_ns=T0)
        hello = device_pb2.Hello(device_id="car-301", fleet="sim")
        hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
        link = Link(
            GrpcTransport(target), device_id="car-301", store=store, metrics=AgentMetrics(),
            greeting=lambda: [device_pb2.DeviceMessage(hello=hello)], on_message=lambda m: None,
        )  # fmt: skip
        link.start()
        try:
            wait_for("the upload", lambda: store.stats().segments_pending == 0, timeout=FLEET_WAIT_S)
        finally:
            link.stop()
        assert c.queries.sql(Caller.local(), "SELECT count(*) FROM samples").rows[0][0] == 100
        # every device is its own identity at the coordinator
        assert {d for d in c.sessions.online() if d.startswith("sim-")} == {
            f"sim-{i:05d}" for i in range(DEVICES)
        }
        assert fleet.connected() == DEVICES  # still held
    finally:
        fleet.close()
        store.close()
        server.stop(grace=0).wait(5)
    # once the devices hang up, the coordinator marks them offline
    wait_for("the coordinator to see them leave", lambda: len(c.sessions.online()) == 0, timeout=FLEET_WAIT_S)


def test_one_simulator_loop_holds_300_mqtt_devices(tmp_path: Path) -> None:
    if broker_fixture.mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    ids = [f"m-{i:05d}" for i in range(DEVICES)]
    threads_before = threading.active_count()  # what earlier tests left (thread pools of libraries)
    with broker_fixture.private_broker(tmp_path / "broker", devices=ids, fleet="test") as broker:
        c = Coordinator(tmp_path / "cloud")
        cert, key = broker.coordinator()
        bridge = MqttBridge(c, BridgeSettings(broker.host, broker.port, broker.ca.ca_path, cert, key))
        bridge.start()
        swarm = MqttSwarm(
            broker.host, broker.port, ca=broker.ca.ca_path, certs=broker.ca.dir, fleet="test",
            device_ids=ids, connect_rate=300,
        )  # fmt: skip
        stop = threading.Event()
        loop = threading.Thread(target=swarm.run, args=(stop,), daemon=True)
        loop.start()
        try:
            wait_for(
                f"{DEVICES} MQTT devices welcomed", lambda: swarm.welcomed == DEVICES, timeout=FLEET_WAIT_S
            )
            assert len(c.sessions.online()) == DEVICES
            assert swarm.status()["connect_failures"] == 0
            assert threading.active_count() - threads_before < 20  # one loop, not a thread per device
        finally:
            stop.set()
            loop.join(timeout=10)
            bridge.stop()


def test_sim_fleet_hold_only_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetloop_cli.main import main

    code = main(
        [
            "sim",
            "fleet",
            "--devices",
            "150",
            "--duration",
            "2",
            "--hold-only",
            "--simulated",
            "--workdir",
            str(tmp_path),
            "-o",
            "json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["devices"], out["peak_connected"], out["segments_stored"]) == (150, 150, 0)


def test_an_unknown_kind_is_refused_before_any_device_starts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--kind must be one of car, robot, plc, got 'boat'$"):
        SimFleet("127.0.0.1:9", 1, tmp_path / "devices", recordings=None, kind="boat")
    assert not (tmp_path / "devices").exists()
