"""The shipped mosquitto configuration, run by a private broker and attacked with a real client and real
certificates: identity = certificate CN = MQTT username = client id, and the dynamic-security plugin
checking every PUBLISH, SUBSCRIBE and delivery (MQTT 5, QoS 1). Devices cannot disturb each other: not
by joining the coordinators' shared subscription, not by taking another device's client id, not by
publishing or subscribing under another device's or another fleet's topics."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetloop_shared.errors import ConfigError
from tests.fixtures import mosquitto_broker as broker_fixture

GRANTED_QOS1 = 1
NO_MATCHING_SUBSCRIBERS = 0x10  # PUBACK: accepted, and no subscription matched
NOT_AUTHORIZED = 0x87
SESSION_TAKEN_OVER = 0x8E
SHARE = "$share/coordinators/fl/v1/+/+/up/#"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if broker_fixture.mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    with broker_fixture.private_broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


class Client:
    """A paho MQTT 5 client whose acks, messages and disconnects land in queues the test reads.

    ``certificate`` is (cert, key) — whose identity it proves; ``client_id`` is what it *claims*.
    Coordinators keep no session (like the bridge): a stale member would hold a share of the messages."""

    def __init__(
        self,
        broker: Any,
        certificate: tuple[Path, Path],
        client_id: str,
        *,
        clean_start: bool = True,
        session_expiry_s: int = 3600,
    ) -> None:
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        cert, key = certificate
        self.c.tls_set(ca_certs=str(broker.ca.ca_path), certfile=str(cert), keyfile=str(key))
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.put((rc.value, f.session_present))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc.value)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc.value))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self.c.reconnect_delay_set(min_delay=30, max_delay=30)  # a kicked client stays kicked
        self.c.connect(broker.host, broker.port, clean_start=clean_start, properties=props)
        self.c.loop_start()
        code, self.session_present = self.connected.get(timeout=10)
        assert code == 0

    def publish(self, topic: str, payload: bytes) -> int:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 600
        info = self.c.publish(topic, payload, qos=1, properties=props)
        while True:
            mid, rc = self.acks.get(timeout=10)
            if mid == info.mid:
                return rc

    def subscribe(self, topic: str) -> int:
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)[0]

    def drain(self, settle_s: float = 0.5) -> list[mqtt.MQTTMessage]:
        """Everything received until nothing more arrives for ``settle_s``."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=settle_s))
            except queue.Empty:
                return got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def device(broker: Any, device_id: str, *, as_id: str | None = None, **kw: Any) -> Client:
    return Client(broker, broker.device(device_id), as_id or device_id, **kw)


def coordinator(broker: Any, name: str = "coordinator") -> Client:
    return Client(broker, broker.coordinator(name), name, session_expiry_s=0)


def test_device_publishes_its_own_topics_and_the_coordinator_receives_them(broker: Any) -> None:
    cloud = coordinator(broker)
    car = device(broker, "car-1")
    try:
        assert cloud.subscribe(SHARE) == GRANTED_QOS1
        assert car.publish("fl/v1/test/car-1/up/heartbeat", b"alive") == 0
        msg = cloud.messages.get(timeout=10)
        assert msg.topic == "fl/v1/test/car-1/up/heartbeat" and msg.payload == b"alive"
        # commands down to the device
        assert car.subscribe("fl/v1/test/car-1/down/#") == GRANTED_QOS1
        assert cloud.publish("fl/v1/test/car-1/down/campaigns", b"cmd") == 0
        assert car.messages.get(timeout=10).payload == b"cmd"
    finally:
        car.close()
        cloud.close()


def test_impersonation_is_refused(broker: Any) -> None:
    cloud = coordinator(broker)
    broker.device("car-2")
    attacker = device(broker, "car-3")
    try:
        assert cloud.subscribe(SHARE) == GRANTED_QOS1
        # publishing on another device's topic: PUBACK "not authorized", nothing delivered
        assert attacker.publish("fl/v1/test/car-2/up/upload", b"forged") == NOT_AUTHORIZED
        # subscribing to another device's commands, or to anyone's through a wildcard: SUBACK refused
        for other in ("fl/v1/test/car-2/down/#", "fl/v1/test/+/down/#", "fl/v1/+/car-3/down/#", "#"):
            assert attacker.subscribe(other) == NOT_AUTHORIZED, other
        assert attacker.subscribe("fl/v1/test/car-3/down/#") == GRANTED_QOS1
        assert cloud.publish("fl/v1/test/car-2/down/ota", b"for car-2 only") == NO_MATCHING_SUBSCRIBERS
        assert cloud.publish("fl/v1/test/car-3/down/ota", b"for car-3") == 0
        assert attacker.messages.get(timeout=10).payload == b"for car-3"
        # sending commands to devices is the coordinators' right only
        assert attacker.publish("fl/v1/test/car-3/down/ota", b"x") == NOT_AUTHORIZED
        # the broker keeps serving everyone else
        assert attacker.publish("fl/v1/test/car-3/up/heartbeat", b"legit") == 0
        msg = cloud.messages.get(timeout=10)
        assert msg.topic == "fl/v1/test/car-3/up/heartbeat"
        assert cloud.drain(0.3) == [] and attacker.drain(0.3) == []
    finally:
        attacker.close()
        cloud.close()


def test_devices_cannot_join_the_coordinators_shared_subscription(broker: Any) -> None:
    """Were any certificate allowed in, the broker would hand each member its share of the fleet's
    uplink and drop it under the read ACL: with one rogue the coordinator got 5 of 10 of a device's
    messages, with three 2 of 10. Now the SUBSCRIBE is refused and the coordinator gets all 10."""
    cloud = coordinator(broker)
    rogues = [device(broker, f"rogue-{i}") for i in range(3)]
    victim = device(broker, "car-4")
    try:
        assert cloud.subscribe(SHARE) == GRANTED_QOS1
        for rogue in rogues:
            assert rogue.subscribe(SHARE) == NOT_AUTHORIZED
            # nor any other way to the fleet's uplink: another group, the plain filter, one device's
            assert rogue.subscribe("$share/rogues/fl/v1/+/+/up/#") == NOT_AUTHORIZED
            assert rogue.subscribe("fl/v1/+/+/up/#") == NOT_AUTHORIZED
            assert rogue.subscribe("fl/v1/test/car-4/up/#") == NOT_AUTHORIZED
        for i in range(10):
            assert victim.publish("fl/v1/test/car-4/up/control", b"m%d" % i) == 0
        got = cloud.drain()
        assert [m.payload for m in got] == [b"m%d" % i for i in range(10)], f"{len(got)} of 10"
        for rogue in rogues:
            assert rogue.drain(0.1) == []
    finally:
        for c in (*rogues, victim, cloud):
            c.close()


def test_coordinators_share_the_work_each_under_its_own_identity(broker: Any) -> None:
    a = coordinator(broker, "coordinator-a")
    b = coordinator(broker, "coordinator-b")
    car = device(broker, "car-5")
    try:
        assert a.subscribe(SHARE) == GRANTED_QOS1 and b.subscribe(SHARE) == GRANTED_QOS1
        for i in range(10):
            assert car.publish("fl/v1/test/car-5/up/control", b"m%d" % i) == 0
        got_a, got_b = a.drain(), b.drain()
        assert len(got_a) + len(got_b) == 10 and got_a and got_b, (len(got_a), len(got_b))
        assert sorted(m.payload for m in got_a + got_b) == sorted(b"m%d" % i for i in range(10))
        # each its own client id: neither pushed the other off (one shared id would have)
        assert a.disconnects.empty() and b.disconnects.empty()
        # a coordinator's certificate claiming the other's client id still connects as itself
        c = Client(broker, broker.coordinator("coordinator-c"), "coordinator-a", session_expiry_s=0)
        c.close()
        time.sleep(0.3)
        assert a.disconnects.empty()
    finally:
        for client in (car, a, b):
            client.close()


def test_a_device_cannot_take_over_another_devices_session(broker: Any) -> None:
    """The client id is the certificate's CN whatever a client claims: a device connecting with another
    device's client id neither disconnects it nor discards its session and the commands queued there."""
    cloud = coordinator(broker)
    victim = device(broker, "car-6", clean_start=True)
    try:
        assert victim.subscribe("fl/v1/test/car-6/down/#") == GRANTED_QOS1
        # while the victim is online: the attacker connects under its client id, with a clean start
        attacker = device(broker, "car-7", as_id="car-6", clean_start=True)
        time.sleep(0.3)
        assert victim.disconnects.empty(), "the victim was disconnected"
        attacker.close()
        assert cloud.publish("fl/v1/test/car-6/down/control", b"live") == 0
        assert victim.messages.get(timeout=10).payload == b"live"
        # while the victim is away: commands queue in its session ...
        victim.close()
        for i in range(3):
            assert cloud.publish("fl/v1/test/car-6/down/control", b"queued-%d" % i) == 0
        # ... the attacker claims its client id again (a clean start would discard that session) ...
        attacker = device(broker, "car-7", as_id="car-6", clean_start=True)
        assert attacker.session_present is False
        assert attacker.subscribe("fl/v1/test/car-6/down/#") == NOT_AUTHORIZED
        assert attacker.drain(0.3) == []
        attacker.close()
        # ... and the victim comes back to its session with every queued command
        back = device(broker, "car-6", clean_start=False)
        try:
            assert back.session_present is True
            assert [m.payload for m in back.drain()] == [b"queued-0", b"queued-1", b"queued-2"]
        finally:
            back.close()
    finally:
        cloud.close()


def test_a_device_cannot_act_under_another_fleet(broker: Any) -> None:
    cloud = coordinator(broker)
    car = device(broker, "car-8")  # registered in fleet "test"
    try:
        assert cloud.subscribe(SHARE) == GRANTED_QOS1
        # its own id under another fleet's prefix: refused, nothing reaches the coordinator
        assert car.publish("fl/v1/other/car-8/up/control", b"forged") == NOT_AUTHORIZED
        assert car.subscribe("fl/v1/other/car-8/down/#") == NOT_AUTHORIZED
        assert cloud.publish("fl/v1/other/car-8/down/control", b"not yours") == NO_MATCHING_SUBSCRIBERS
        assert car.drain(0.3) == [] and cloud.drain(0.3) == []
        # its own fleet still works
        assert car.publish("fl/v1/test/car-8/up/control", b"ok") == 0
        assert cloud.messages.get(timeout=10).topic == "fl/v1/test/car-8/up/control"
        # and the broker will not move it to another fleet (or make it a coordinator) behind its back
        with pytest.raises(ConfigError, match="other rights"):
            broker.device("car-8", fleet="other")
        with pytest.raises(ConfigError, match="other roles"):
            broker.coordinator("car-8")
    finally:
        car.close()
        cloud.close()


def test_a_certificate_the_broker_does_not_know_may_do_nothing(broker: Any) -> None:
    stranger = Client(broker, broker.client_cert("car-99"), "car-99")
    try:
        assert stranger.publish("fl/v1/test/car-99/up/control", b"x") == NOT_AUTHORIZED
        assert stranger.subscribe("fl/v1/test/car-99/down/#") == NOT_AUTHORIZED
        assert stranger.subscribe(SHARE) == NOT_AUTHORIZED
        # nor may it register itself (only the broker-admin certificate sends $CONTROL commands)
        assert stranger.publish("$CONTROL/dynamic-security/v1", b'{"commands": []}') == NOT_AUTHORIZED
    finally:
        stranger.close()


def test_identity_names_that_would_be_topic_wildcards_are_refused(broker: Any) -> None:
    for bad in ("+", "#", "a/b", "", "$SYS", "-x"):
        with pytest.raises(ConfigError, match="cannot name a broker identity"):
            broker.device(bad)
        with pytest.raises(ConfigError, match="cannot name a broker identity"):
            broker.device("car-ok", fleet=bad)


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
