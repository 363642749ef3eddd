"""The shipped mosquitto configuration, run by a private broker: TLS client certificates, identity = CN =
MQTT username, and ``%u`` ACLs that refuse a device acting as another one (MQTT 5, QoS 1)."""

from __future__ import annotations

import importlib.util
import queue
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_spec = importlib.util.spec_from_file_location(
    "fleetloop_test_mosquitto", Path(__file__).resolve().parents[1] / "fixtures" / "mosquitto_broker.py"
)
assert _spec is not None and _spec.loader is not None
broker_fixture = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = broker_fixture
_spec.loader.exec_module(broker_fixture)

NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if broker_fixture.mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    with broker_fixture.private_broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


class Client:
    """A paho MQTT 5 client whose acks and messages land in queues the test reads."""

    def __init__(self, broker: Any, name: str, *, cert_name: str | None = None) -> None:
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected: queue.Queue[int] = queue.Queue()
        self.c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5
        )
        cert, key = broker.client_cert(cert_name or name)
        self.c.tls_set(ca_certs=str(broker.ca.ca_path), certfile=str(cert), keyfile=str(key))
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.put(rc.value)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc.value))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect(broker.host, broker.port, clean_start=True, properties=props)
        self.c.loop_start()
        assert self.connected.get(timeout=10) == 0

    def publish(self, topic: str, payload: bytes) -> int:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 60
        info = self.c.publish(topic, payload, qos=1, properties=props)
        while True:
            mid, rc = self.acks.get(timeout=10)
            if mid == info.mid:
                return rc

    def subscribe(self, topic: str) -> int:
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)[0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_device_publishes_its_own_topics_and_the_coordinator_receives_them(broker: Any) -> None:
    cloud = Client(broker, "coordinator")
    car = Client(broker, "car-1")
    try:
        assert cloud.subscribe("$share/coordinators/fl/v1/+/+/up/#") == 1
        assert car.publish("fl/v1/test/car-1/up/heartbeat", b"alive") == 0
        msg = cloud.messages.get(timeout=10)
        assert msg.topic == "fl/v1/test/car-1/up/heartbeat" and msg.payload == b"alive"
        # commands down to the device
        assert car.subscribe("fl/v1/test/car-1/down/#") == 1
        assert cloud.publish("fl/v1/test/car-1/down/campaigns", b"cmd") == 0
        assert car.messages.get(timeout=10).payload == b"cmd"
    finally:
        car.close()
        cloud.close()


def test_impersonation_is_refused(broker: Any) -> None:
    cloud = Client(broker, "coordinator")
    attacker = Client(broker, "car-1")
    try:
        assert cloud.subscribe("$share/coordinators/fl/v1/+/+/up/#") == 1
        # publishing on another device's topic: PUBACK "not authorized", nothing delivered
        assert attacker.publish("fl/v1/test/car-2/up/upload", b"forged") == NOT_AUTHORIZED
        # reading another device's commands: mosquitto 2 grants the SUBSCRIBE but checks the read ACL
        # on delivery, so nothing of car-2's reaches car-1
        attacker.subscribe("fl/v1/test/car-2/down/#")
        attacker.subscribe("fl/v1/test/car-1/down/#")
        assert cloud.publish("fl/v1/test/car-2/down/ota", b"for car-2 only") == 0
        assert cloud.publish("fl/v1/test/car-1/down/ota", b"for car-1") == 0
        assert attacker.messages.get(timeout=10).payload == b"for car-1"
        # sending commands to devices is the coordinator's right only
        assert attacker.publish("fl/v1/test/car-1/down/ota", b"x") == NOT_AUTHORIZED
        # the broker keeps serving everyone else
        assert attacker.publish("fl/v1/test/car-1/up/heartbeat", b"legit") == 0
        msg = cloud.messages.get(timeout=10)
        assert msg.topic == "fl/v1/test/car-1/up/heartbeat"
        time.sleep(0.3)
        assert cloud.messages.empty() and attacker.messages.empty()
    finally:
        attacker.close()
        cloud.close()


def test_a_client_without_a_certificate_of_our_ca_cannot_connect(broker: Any, tmp_path: Path) -> None:
    rogue_ca = broker_fixture.CertificateAuthority(tmp_path / "rogue")
    cert, key = rogue_ca.issue("car-1")
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="car-1", protocol=mqtt.MQTTv5
    )
    c.tls_set(ca_certs=str(broker.ca.ca_path), certfile=str(cert), keyfile=str(key))
    accepted: queue.Queue[int] = queue.Queue()
    c.on_connect = lambda cl, u, f, rc, p: accepted.put(rc.value)
    try:
        c.connect(broker.host, broker.port)
    except OSError:
        return  # refused during the handshake (TLS 1.2)
    c.loop_start()
    try:
        with pytest.raises(queue.Empty):
            accepted.get(timeout=3)  # TLS 1.3: the broker drops the connection after the handshake
    finally:
        c.loop_stop()
