"""A home hub's own MQTT broker and the house's Zigbee devices on it, as zigbee2mqtt publishes them.

:class:`HubBroker` is a plain mosquitto on loopback, as zigbee2mqtt and Home Assistant use. This is *not*
the fleet's broker (:mod:`fleetloop_fwsim.broker`, TLS and dynamic security): it is the broker inside the
house, which the hub's agent reads devices from. It runs with its own minimal config (one loopback
listener, anonymous clients, no persistence), stoppable and restartable on the same port.

:class:`HomeScene` plays zigbee2mqtt on that broker: a temperature sensor, a motion sensor, a door contact
and a kettle's smart plug publishing their JSON states (:func:`scene_states`, generated: there is no
recording of a house), the plug's power also announced through Home Assistant discovery.
:func:`hub_source` is the agent config an integrator would write for them.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Final

from fleetloop_fwsim.broker import mosquitto_binary
from fleetloop_fwsim.child_process import await_listening, free_port, terminate
from fleetloop_shared.errors import ConfigError


class HubBroker:
    """mosquitto for one hub: ``127.0.0.1:<port>``, anonymous, nothing persisted."""

    def __init__(self, workdir: Path, *, port: int = 0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = self.workdir / "hub-mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        path = self.workdir / "hub-mosquitto.conf"
        path.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        )
        return path

    def start(self, timeout_s: float = 15.0) -> None:
        conf = self._config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        await_listening(
            self.proc, self.host, self.port, name="hub mosquitto", timeout_s=timeout_s, log_path=self.log_path
        )

    def stop(self) -> None:
        terminate(self.proc)


#: The scene's cycle: every device's behaviour repeats with this period (scene seconds).
SCENE_CYCLE_S: Final = 30.0
#: The kettle is on from 8 s to 12 s of each cycle (2.2 kW): what the hub's campaign catches.
KETTLE_ON_S: Final = (8.0, 12.0)
KETTLE_IEEE: Final = "0x0017880104e45517"
KETTLE_POWER_ID: Final = f"{KETTLE_IEEE}_power_zigbee2mqtt"


def scene_states(t_s: float) -> dict[str, dict[str, Any]]:
    """What each Zigbee device of the house reports at scene time ``t_s``: zigbee2mqtt's JSON state per
    friendly name (pure, deterministic)."""
    c = t_s % SCENE_CYCLE_S
    kettle_on = KETTLE_ON_S[0] <= c < KETTLE_ON_S[1]
    power = 2200.0 + 15 * math.sin(c * 7) if kettle_on else 0.8
    return {
        "living_room_sensor": {  # an Aqara temperature/humidity/pressure sensor
            "temperature": round(21.0 + 0.6 * math.sin(t_s / 40), 2),
            "humidity": round(45.0 + 3 * math.cos(t_s / 55), 1),
            "pressure": round(1012.0 + math.sin(t_s / 300), 1),
            "battery": 97,
            "voltage": 3005,
            "linkquality": 134,
        },
        "hallway_motion": {
            "occupancy": 5.0 <= c < 20.0,
            "illuminance_lux": 180 if 5.0 <= c < 20.0 else 12,
            "battery": 88,
            "linkquality": 96,
        },
        "front_door": {"contact": not (14.0 <= c < 17.0), "battery": 91, "linkquality": 110},
        "kitchen_kettle_plug": {
            "state": "ON" if kettle_on else "OFF",
            "power": round(power, 1),
            "energy": round(0.42 + t_s * 0.0001, 4),
            "voltage": 231,
            "linkquality": 150,
        },
    }


def discovery_configs(base_topic: str = "zigbee2mqtt", prefix: str = "homeassistant") -> dict[str, bytes]:
    """The retained Home Assistant discovery messages zigbee2mqtt publishes for the kettle plug's power
    (topic → payload, abbreviated keys as zigbee2mqtt writes them)."""
    config = {
        "~": f"{base_topic}/kitchen_kettle_plug",
        "stat_t": "~",
        "val_tpl": "{{ value_json.power }}",
        "unit_of_meas": "W",
        "dev_cla": "power",
        "uniq_id": KETTLE_POWER_ID,
        "dev": {"ids": [f"zigbee2mqtt_{KETTLE_IEEE}"], "name": "kitchen_kettle_plug", "mf": "Philips"},
    }
    return {f"{prefix}/sensor/{KETTLE_IEEE}/power/config": json.dumps(config).encode()}


def hub_source(host: str, port: int, *, name: str = "zigbee") -> dict[str, Any]:
    """The ``sources:`` entry an integrator writes for this house: zigbee2mqtt devices by friendly name,
    the kettle plug's power through Home Assistant discovery."""

    def sig(signal: str, unit: str = "", type_: str = "float") -> dict[str, str]:
        out = {"signal": signal, "type": type_}
        return out | ({"unit": unit} if unit else {})

    return {
        "kind": "mqtt_json",
        "name": name,
        "host": host,
        "port": port,
        "zigbee2mqtt": {
            "base_topic": "zigbee2mqtt",
            "devices": {
                "living_room_sensor": {
                    "temperature": sig("Home.LivingRoom.Temperature", "celsius"),
                    "humidity": sig("Home.LivingRoom.Humidity", "percent"),
                    "battery": sig("Home.LivingRoom.SensorBattery", "percent"),
                },
                "hallway_motion": {
                    "occupancy": sig("Home.Hallway.Occupied", type_="bool"),
                    "illuminance_lux": sig("Home.Hallway.Illuminance", "lx"),
                },
                "front_door": {"contact": sig("Home.Hallway.FrontDoorClosed", type_="bool")},
                "kitchen_kettle_plug": {"state": sig("Home.Kitchen.Kettle.On", type_="bool")},
            },
        },
        "discovery": {
            "prefix": "homeassistant",
            "entities": {KETTLE_POWER_ID: sig("Home.Kitchen.Kettle.Power", "W")},
        },
    }


class HomeScene:
    """zigbee2mqtt, simulated: publishes :func:`scene_states` to the hub's broker every ``period_s``
    (scene time runs ``speed`` times as fast as the wall clock), and the retained discovery messages
    once per connection. paho reconnects by itself when the broker restarts."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        speed: float = 1.0,
        period_s: float = 0.5,
        base_topic: str = "zigbee2mqtt",
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base_topic = base_topic
        self.speed = speed
        self.period_s = period_s
        self.published = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="zigbee2mqtt")
        self._client.on_connect = self._on_connect
        self._host, self._port = host, port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="home-scene", daemon=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        for topic, payload in discovery_configs(self.base_topic).items():
            client.publish(topic, payload, qos=1, retain=True)

    def start(self) -> HomeScene:
        self._client.connect_async(self._host, self._port)
        self._client.loop_start()
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.period_s):
            scene_t = (time.monotonic() - t0) * self.speed
            if not self._client.is_connected():
                continue
            for name, state in scene_states(scene_t).items():
                self._client.publish(f"{self.base_topic}/{name}", json.dumps(state), qos=0)
                self.published += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.disconnect()
        self._client.loop_stop()
