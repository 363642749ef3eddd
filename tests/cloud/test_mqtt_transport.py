"""Devices over MQTT 5 end to end: the agent's link with the MQTT transport (real LocalStore) → a private
mosquitto with the shipped TLS + ACL config → the coordinator's MqttBridge → Parquet. Plus a device acting
as an attacker: forged ids, hostile protobufs, answers steered to other topics — refused, counted, and
everyone else keeps being served."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.mqtt_transport import MqttSettings, MqttTransport
from fleetloop_cloud.mqtt_bridge import BridgeSettings, MqttBridge
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2
from tests.fixtures import mosquitto_broker as broker_fixture
from tests.fixtures.waiting import wait_for

T0 = 1_700_000_000 * 10**9
LOCAL = Caller.local()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[Any, Coordinator, MqttBridge]]:
    if broker_fixture.mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    with broker_fixture.private_broker(tmp_path / "broker") as broker:
        coordinator, bridge = start_cloud(broker, tmp_path)
        wait_for("the bridge to connect", bridge.connected.is_set)
        try:
            yield broker, coordinator, bridge
        finally:
            bridge.stop()


def start_cloud(broker: Any, tmp: Path) -> tuple[Coordinator, MqttBridge]:
    """A coordinator and its MQTT bridge (its own certificate, registered as a coordinator) on ``broker``."""
    coordinator = Coordinator(tmp / "cloud")
    cert, key = broker.coordinator()
    bridge = MqttBridge(coordinator, BridgeSettings(broker.host, broker.port, broker.ca.ca_path, cert, key))
    bridge.start()
    return coordinator, bridge


def hello(device_id: str) -> device_pb2.DeviceMessage:
    h = device_pb2.Hello(device_id=device_id, fleet="test", labels={"kind": "car"}, data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    return device_pb2.DeviceMessage(hello=h)


def segment(k: int, rows: int = 100) -> Segment:
    return Segment(
        segment_id=new_segment_id(),
        group="speed",
        t_ns=np.arange(T0 + k * 10**10, T0 + k * 10**10 + rows * 10**7, 10**7, dtype=np.int64),
        columns={1: np.linspace(0.0, 99.0, rows)},
        data_types={1: DataType.FLOAT64},
    )


def make_link(
    broker: Any, device_id: str, tmp: Path, acks: list[StoredSegment], hello_retry_s: float = 5.0
) -> tuple[Link, LocalStore]:
    cert, key = broker.device(device_id)
    store = LocalStore(tmp / device_id)
    received: queue.Queue[device_pb2.CloudMessage] = queue.Queue()
    link = Link(
        MqttTransport(
            MqttSettings(broker.host, broker.port, broker.ca.ca_path, cert, key),
            device_id,
            fleet="test",
            hello_retry_s=hello_retry_s,
        ),
        device_id=device_id,
        store=store,
        metrics=AgentMetrics(),
        greeting=lambda: [hello(device_id)],
        on_message=received.put,
        upload_deadline_s=5.0,
        on_ack=lambda seg, dup: acks.append(seg),
    )
    link.received = received  # type: ignore[attr-defined]
    return link, store


def test_segments_flow_over_mqtt_exactly_once(cloud: Any, tmp_path: Path) -> None:
    broker, coordinator, bridge = cloud
    acks: list[StoredSegment] = []
    link, store = make_link(broker, "car-1", tmp_path, acks)
    for k in range(5):
        store.append(segment(k), capture_id="cap-1", campaign="c", priority=5, now_ns=T0)
    link.start()
    try:
        wait_for("the welcome", lambda: not link.received.empty())  # type: ignore[attr-defined]
        first = link.received.get()  # type: ignore[attr-defined]
        assert first.WhichOneof("kind") == "welcome"
        link.kick_upload()
        wait_for("all acks", lambda: store.stats().segments_pending == 0)
        assert len(acks) == 5
        assert coordinator.queries.sql(LOCAL, "SELECT count(*) FROM samples").rows[0][0] == 500
        assert "car-1" in coordinator.sessions.online()
        # a push from the cloud reaches the device on down/control
        coordinator.campaigns.apply(
            LOCAL,
            "apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: fast, version: 1}\nspec:\n"
            '  target: {selector: "kind=car"}\n  trigger: {when: "Vehicle.Speed > 50"}\n'
            '  collect: {signals: ["Vehicle.*"], pre: 1s, post: 1s}\n',
            now=time.time(),
        )

        def got_campaign() -> bool:
            while not link.received.empty():  # type: ignore[attr-defined]
                msg = link.received.get()  # type: ignore[attr-defined]
                if msg.WhichOneof("kind") == "desired_campaigns" and msg.desired_campaigns.campaigns:
                    return True
            return False

        wait_for("the campaign push", got_campaign)
        # and a withdrawal (the rollout aborted): the agent's OTA worker hears it on down/control
        assert coordinator.jobs.withdraw("car-1", "r1:car-1", "r1", "rollout r1 aborted")

        def got_withdrawal() -> bool:
            while not link.received.empty():  # type: ignore[attr-defined]
                msg = link.received.get()  # type: ignore[attr-defined]
                if msg.WhichOneof("kind") == "ota_cancel":
                    return bool(msg.ota_cancel.job_id == "r1:car-1" and msg.ota_cancel.reason)
            return False

        wait_for("the withdrawal", got_withdrawal)
    finally:
        link.stop()
    wait_for("the device to go offline", lambda: "car-1" not in coordinator.sessions.online())
    assert bridge.refused == {}


def test_a_hello_nobody_answered_is_said_again_until_a_coordinator_does(tmp_path: Path) -> None:
    if broker_fixture.mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    with broker_fixture.private_broker(tmp_path / "broker") as broker:
        acks: list[StoredSegment] = []
        link, store = make_link(broker, "car-1", tmp_path, acks, hello_retry_s=0.2)
        store.append(segment(0), capture_id="cap", campaign="c", priority=5, now_ns=T0)
        link.start()
        bridge: MqttBridge | None = None
        try:
            wait_for("the broker session", lambda: link.in_session)
            time.sleep(1.0)  # hellos go out; no coordinator consumes them
            assert not link.connected.is_set() and acks == []
            _, bridge = start_cloud(broker, tmp_path)
            wait_for("the welcome", link.connected.is_set)
            wait_for("the upload", lambda: store.stats().segments_pending == 0)
            assert link.sessions_ended == 0  # the same broker session all along
        finally:
            link.stop()
            if bridge is not None:
                bridge.stop()
    assert len(acks) == 1


class RawDevice:
    """A device that speaks MQTT directly, as an attacker would."""

    def __init__(self, broker: Any, device_id: str) -> None:
        self.answers: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        subscribed = threading.Event()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        cert, key = broker.device(device_id)
        self.c.tls_set(ca_certs=str(broker.ca.ca_path), certfile=str(cert), keyfile=str(key))
        self.c.on_message = lambda c, u, m: self.answers.put(m)
        self.c.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(f"fl/v1/test/{device_id}/down/#", qos=1)
        assert subscribed.wait(30), "the broker did not acknowledge the subscription"

    def publish(self, topic: str, payload: bytes, response_topic: str | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic:
            props.ResponseTopic = response_topic
            props.CorrelationData = b"corr"
        self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_an_attacking_device_is_refused_counted_and_others_are_served(cloud: Any, tmp_path: Path) -> None:
    broker, coordinator, bridge = cloud
    intruder = RawDevice(broker, "intruder-1")
    try:
        up = "fl/v1/test/intruder-1/up"
        intruder.publish(f"{up}/control", hello("intruder-1").SerializeToString())
        devices = coordinator.repositories.devices
        wait_for("the attacker's hello", lambda: devices.get("intruder-1") is not None)
        # 1. a hello claiming another device id
        intruder.publish(f"{up}/control", hello("car-9").SerializeToString())
        # 2. an upload claiming another device id: answered PERMISSION_DENIED
        seg = segment(0)
        req = ingest_pb2.UploadSegmentRequest(
            device_id="car-9",
            segment_id=seg.segment_id,
            capture_id="x",
            campaign="c",
            segment=encode_segment(seg),
        )
        intruder.publish(
            f"{up}/upload", req.SerializeToString(), response_topic="fl/v1/test/intruder-1/down/upload_ack"
        )
        answer = intruder.answers.get(timeout=10)
        while answer.topic.endswith("/control"):
            answer = intruder.answers.get(timeout=10)
        assert dict(answer.properties.UserProperty)["status"] == "PERMISSION_DENIED"
        # 3. hostile protobufs on both kinds
        for junk in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 40):
            intruder.publish(f"{up}/control", junk)
            intruder.publish(f"{up}/upload", junk)
        # 4. an answer steered into another device's topic
        intruder.publish(
            f"{up}/upload", req.SerializeToString(), response_topic="fl/v1/test/car-1/down/control"
        )
        # 5. publishing on another device's topic: the broker refuses it before the bridge sees it
        intruder.publish("fl/v1/test/car-1/up/control", hello("car-1").SerializeToString())
        # the intruder's messages are handled in order: once the last refusal (4.) is counted, all are
        # (waiting for any five raced it: 2 impersonations + 6 undecodable come first)
        wait_for("the refusals to be counted", lambda: bridge.refused["bad-response-topic"] >= 1)
        assert bridge.refused["impersonation"] == 2
        assert bridge.refused["undecodable"] >= 2
        assert bridge.refused["bad-response-topic"] == 1
        assert devices.get("car-9") is None
        assert devices.get("car-1") is None

        # the coordinator keeps serving an honest device
        acks: list[StoredSegment] = []
        link, store = make_link(broker, "car-1", tmp_path, acks)
        store.append(segment(1), capture_id="cap", campaign="c", priority=5, now_ns=T0)
        link.start()
        try:
            wait_for("the honest device's upload", lambda: store.stats().segments_pending == 0)
            assert len(acks) == 1
        finally:
            link.stop()
        distinct = "SELECT count(DISTINCT device_id) FROM samples"
        assert coordinator.queries.sql(LOCAL, distinct).rows[0][0] == 1
    finally:
        intruder.close()


def test_identities_the_broker_does_not_know_are_told_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A coordinator outside the broker's group, or a device registered in another fleet, would otherwise
    wait forever for messages the broker will never let through."""
    with broker_fixture.private_broker(tmp_path / "broker") as broker:
        cert, key = broker.client_cert("coordinator-x")  # a certificate of the CA, never registered
        bridge = MqttBridge(
            Coordinator(tmp_path / "cloud"),
            BridgeSettings(broker.host, broker.port, broker.ca.ca_path, cert, key),
        )
        with caplog.at_level(logging.ERROR, logger="fleetloop.cloud.mqtt"):
            bridge.start()
            try:
                wait_for("the refusal in the log", lambda: "refused the shared subscription" in caplog.text)
            finally:
                bridge.stop()
        assert "group of coordinators" in caplog.text

        cert, key = broker.device("car-1", fleet="other")
        store = LocalStore(tmp_path / "car-1")
        link = Link(
            MqttTransport(
                MqttSettings(broker.host, broker.port, broker.ca.ca_path, cert, key), "car-1", fleet="test"
            ),
            device_id="car-1",
            store=store,
            metrics=AgentMetrics(),
            greeting=lambda: [hello("car-1")],
            on_message=lambda m: None,
        )
        link.start()
        try:
            wait_for("the device to say why", lambda: "registered with the broker" in link.last_error)
            assert "fleet 'test'" in link.last_error
        finally:
            link.stop()
            store.close()
