"""A home hub: JSON devices on the hub's local MQTT broker (zigbee2mqtt, Home Assistant discovery, any
JSON topic), through :class:`~fleetloop_agent.sources.hub_router.HubRouter`.

paho's network loop runs on the source's own thread (``loop_forever``), reconnecting with paho's
exponential backoff bounded by ``reconnect_min_s`` / ``reconnect_max_s``; every reconnect is counted
and resubscribes every topic (discovery configs are retained, so entities are re-learnt). Messages are
stamped with the device clock on arrival.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetloop_agent.sources.hub_router import Field, HubRouter, Target
from fleetloop_agent.sources.live import DeviceClock, LiveSource
from fleetloop_shared.catalog import Catalog

log = logging.getLogger("fleetloop.agent.sources")


@dataclass(frozen=True)
class BrokerSettings:
    """The hub's local broker: address, optional login and optional TLS (CA, client certificate)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_id: str = ""
    keepalive_s: int = 30
    #: paho's reconnect backoff, whole seconds
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30


class MqttJsonSource(LiveSource):
    """Signals from JSON payloads on a local MQTT broker."""

    def __init__(
        self,
        name: str,
        broker: BrokerSettings,
        topics: Mapping[str, list[Field]],
        *,
        discovery_prefix: str | None = None,
        entities: Mapping[str, Target] | None = None,
        clock: DeviceClock | None = None,
        queue_samples: int = 1_000_000,
        origin: str = "live",
    ) -> None:
        super().__init__(name, clock=clock, queue_samples=queue_samples, origin=origin)
        self.broker = broker
        self.router = HubRouter(
            name, topics, discovery_prefix=discovery_prefix, entities=entities, on_error=self._error
        )
        self.connected = False
        self._ever_connected = False
        self._client: mqtt.Client | None = None

    def _declare(self, catalog: Catalog) -> None:
        self.queue.dtypes.update(self.router.declare(catalog))

    # -- paho callbacks (on the source's thread) ------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._error(
                "connect", f"broker {self.broker.host}:{self.broker.port} refused the connection: {reason}"
            )
            return
        self.connected = True
        if self._ever_connected:
            self.counters.reconnects += 1
            log.info("source %s: reconnected to %s:%d", self.name, self.broker.host, self.broker.port)
        self._ever_connected = True
        for topic in self.router.subscriptions():
            client.subscribe(topic, qos=0)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected
        self.connected = False
        if was and not self._stop.is_set():
            self._error("connection", f"connection to {self.broker.host}:{self.broker.port} lost: {reason}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        row, follow = self.router.on_message(msg.topic, bytes(msg.payload), self.clock.now_ns())
        if row is not None:
            self.queue.put(row.group, row.ids, [row.t_ns], [[v] for v in row.values])
        for topic in follow:
            client.subscribe(topic, qos=0)

    # -- the network loop ---------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        b = self.broker
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=b.client_id, protocol=mqtt.MQTTv311)
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.ca is not None:
            context = ssl.create_default_context(cafile=str(b.ca))
            if b.cert is not None:
                context.load_cert_chain(str(b.cert), str(b.key) if b.key else None)
            client.tls_set_context(context)
        client.reconnect_delay_set(b.reconnect_min_s, b.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = lambda c, u: self._error(
            "connect", f"cannot connect to {b.host}:{b.port}; retrying"
        )
        return client

    def _wake(self) -> None:
        client = self._client
        if client is not None:
            client.disconnect()

    def _run(self) -> None:
        client = self._make_client()
        self._client = client
        if self._stop.is_set():
            return
        client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        # loop_forever connects and reconnects by itself (paho's backoff, bounded above); disconnect() in
        # _wake ends it.
        client.loop_forever(retry_first_connection=True)
