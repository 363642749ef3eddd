"""A home hub against its own local mosquitto: zigbee2mqtt devices, Home Assistant discovery, malformed
JSON counted and dropped, a broker restart reconnected; config mistakes named."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.mqtt_json import MqttJsonSource
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.samples import GroupBatch
from tests.fixtures.hub_broker import HubBroker, hub_local_broker
from tests.fixtures.waiting import wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[HubBroker]:
    with hub_local_broker(tmp_path / "hub") as b:
        yield b


@pytest.fixture
def publisher(broker: HubBroker) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="zigbee2mqtt")
    client.connect(broker.host, broker.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: Any, retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)


def hub_source(broker: HubBroker) -> MqttJsonSource:
    spec = {
        "kind": "mqtt_json",
        "name": "hub",
        "host": broker.host,
        "port": broker.port,
        "zigbee2mqtt": {
            "devices": {
                "living_room": {
                    "temperature": {"signal": "Home.LivingRoom.Temperature", "unit": "celsius"},
                    "humidity": {"signal": "Home.LivingRoom.Humidity", "unit": "percent"},
                    "occupancy": {"signal": "Home.LivingRoom.Occupied", "type": "bool"},
                },
            },
        },
        "discovery": {
            "entities": {
                "0x00158d0001_power": {"signal": "Home.Pump.Power", "unit": "W"},
                "binary_sensor.garage_door": {"signal": "Home.Garage.DoorOpen", "type": "bool"},
            },
        },
        "topics": {
            "sensors/boiler": {"$.flow.temp": {"signal": "Home.Boiler.FlowTemperature", "unit": "celsius"}}
        },
    }
    src = build_source(spec, base_dir=Path("."), start_ns=0)
    assert isinstance(src, MqttJsonSource)
    return src


def by_group(batches: list[GroupBatch]) -> dict[str, list[GroupBatch]]:
    out: dict[str, list[GroupBatch]] = {}
    for b in batches:
        out.setdefault(b.group, []).append(b)
    return out


def test_zigbee2mqtt_and_discovery_devices_become_signals(broker: HubBroker, publisher: mqtt.Client) -> None:
    # what zigbee2mqtt's Home Assistant integration announces (retained, abbreviated, with ~)
    publish(
        publisher,
        "homeassistant/sensor/0x00158d0001/power/config",
        {
            "~": "zigbee2mqtt/pump_plug",
            "stat_t": "~",
            "val_tpl": "{{ value_json.power | float }}",
            "unit_of_meas": "W",
            "uniq_id": "0x00158d0001_power",
            "dev": {"ids": ["0x00158d0001"]},
        },
        retain=True,
    )
    publish(
        publisher,
        "homeassistant/binary_sensor/garage_door/config",
        {
            "state_topic": "zigbee2mqtt/garage",
            "value_template": "{{ value_json.contact }}",
            "payload_on": "false",
        },
        retain=True,
    )
    publish(publisher, "homeassistant/sensor/other/config", {"state_topic": "x/y"}, retain=True)  # not mapped
    src = hub_source(broker)
    catalog = Catalog()
    src.declare(catalog)
    src.start()
    try:
        wait_for(
            "the connection and the ignored message", lambda: src.connected and src.router.ignored_total == 1
        )
        time.sleep(0.2)  # the discovered state topics are subscribed to
        for i in range(5):
            publish(
                publisher,
                "zigbee2mqtt/living_room",
                {
                    "temperature": 20.0 + i,
                    "humidity": 40 + i,
                    "occupancy": i % 2 == 0,
                    "battery": 97,
                    "linkquality": 120,
                },
            )
            publish(publisher, "zigbee2mqtt/pump_plug", {"power": 100 + i, "state": "ON"})
        publish(publisher, "zigbee2mqtt/garage", {"contact": "false"})
        publish(publisher, "zigbee2mqtt/living_room", b'{"temperature": 21,')  # cut short
        publish(
            publisher, "zigbee2mqtt/living_room", {"temperature": "warm", "humidity": 50}
        )  # a wrong value
        publish(publisher, "sensors/boiler", {"flow": {"temp": 61.5}})
        wait_for("every sample", lambda: src.counters.samples >= 5 * 3 + 5 + 1 + 1 + 1)
        groups = by_group(src.read(time.time_ns() + 10**9))
    finally:
        src.close()
    room = groups["hub/zigbee2mqtt/living_room"]
    full = next(b for b in room if len(b.values) == 3)
    assert full.values[catalog.by_path("Home.LivingRoom.Temperature").id].tolist() == [
        20.0,
        21.0,
        22.0,
        23.0,
        24.0,
    ]
    assert full.values[catalog.by_path("Home.LivingRoom.Occupied").id].tolist() == [
        True,
        False,
        True,
        False,
        True,
    ]
    partial = next(b for b in room if len(b.values) == 1)  # the wrong temperature dropped, the humidity kept
    assert partial.values[catalog.by_path("Home.LivingRoom.Humidity").id].tolist() == [50.0]
    (plug,) = groups["hub/zigbee2mqtt/pump_plug"]
    assert plug.values[catalog.by_path("Home.Pump.Power").id].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
    (garage,) = groups["hub/zigbee2mqtt/garage"]
    assert garage.values[catalog.by_path("Home.Garage.DoorOpen").id].tolist() == [True]
    (boiler,) = groups["hub/sensors/boiler"]
    assert boiler.values[catalog.by_path("Home.Boiler.FlowTemperature").id].tolist() == [61.5]
    assert src.router.malformed_total == 1 and src.counters.errors == 2
    assert catalog.by_path("Home.Pump.Power").unit == "W"


def test_a_broker_restart_is_reconnected_and_topics_resubscribed(
    broker: HubBroker, publisher: mqtt.Client
) -> None:
    src = hub_source(broker)
    src.declare(Catalog())
    src.start()
    try:
        wait_for("the connection", lambda: src.connected)
        broker.stop()
        wait_for("the disconnection", lambda: not src.connected)
        broker.start()
        wait_for("the reconnection", lambda: src.connected and src.counters.reconnects == 1)
        again = mqtt.Client(CallbackAPIVersion.VERSION2)
        again.connect(broker.host, broker.port)
        again.loop_start()
        try:
            time.sleep(0.2)
            publish(again, "sensors/boiler", {"flow": {"temp": 55.0}})
            wait_for("the sample", lambda: src.counters.samples == 1)
        finally:
            again.disconnect()
            again.loop_stop()
    finally:
        src.close()
    assert src.counters.errors >= 1 and src.alive()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topics": {"a/#": {"x": {"signal": "X"}}}}, "key 'topics': topic 'a/#': wildcards are not mapped"),
        ({"topics": {"a": {"x..y": {"signal": "X"}}}}, "key 'topics': topic 'a': JSON path 'x..y'"),
        (
            {"topics": {"a": {"x": {"signal": "X", "typ": "bool"}}}},
            "key 'topics': topic 'a': x: unknown key 'typ'",
        ),
        ({"topics": {"a": {"x": {"signal": "X"}, "y": {"signal": "X"}}}}, "signal 'X' is mapped twice"),
        ({"zigbee2mqtt": {"devices": {}}}, "key 'zigbee2mqtt': zigbee2mqtt: key 'devices'"),
        ({"discovery": {"entities": {"e": {"unit": "W"}}}}, "key 'discovery': entity 'e': key 'signal'"),
        ({"port": -1}, "key 'port': expected a non-negative integer"),
    ],
)
def test_config_mistakes_name_the_source_and_the_key(change: dict[str, Any], message: str) -> None:
    spec: dict[str, Any] = {"kind": "mqtt_json", "name": "hub"}
    spec.update(change)
    with pytest.raises(ConfigError, match=f"source 'hub': {message}".replace("(", r"\(")):
        build_source(spec, base_dir=Path("."), start_ns=0)
