"""The coordinator's MQTT 5 surface: consumers on a shared subscription calling the same services the
gRPC servicers call. The cloud's paho adapter: the only cloud module that imports paho (with the
paho pieces it shares with the agent's MQTT transport, :mod:`fleetloop_shared.mqtt_client`).

Subscribes ``$share/{group}/fl/v1/+/+/up/#`` (QoS 1), so several coordinators split the devices' traffic
between them. The caller is the device of the *topic* — which the broker's per-device role ties to the
client certificate's CN — and the services check every claim inside a message against it: a hello or an
upload naming another device is refused and counted. Undecodable protobufs are refused and counted too;
nothing a device sends can stop the bridge serving the others.

Handlers are idempotent (QoS 1 may deliver twice): ingest dedupes by (device, segment id), status
messages overwrite. Messages are handed to ``WORKERS`` threads chosen by device id, so one device's
messages stay in order; the hand-off queue is bounded (policy: block paho's network thread, which
applies back-pressure through the broker — nothing is dropped). Pushes to devices (campaigns, OTA jobs)
go out on ``down/control`` with a message expiry, from the same ``DeviceSessions`` outboxes the gRPC
control stream drains.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.api import DeviceApi
from fleetloop_cloud.sessions import Session
from fleetloop_shared.clock import stamp_transmit
from fleetloop_shared.errors import (
    FleetloopError,
    MalformedMessageError,
    NotFoundError,
    PermissionDeniedError,
)
from fleetloop_shared.mqtt_client import no_delay, publish_properties, tls_client
from fleetloop_shared.wire import device_pb2, ingest_pb2, parse

log = logging.getLogger("fleetloop.cloud.mqtt")

WORKERS = 4
#: Messages waiting for a worker, per worker.
QUEUE_LIMIT = 256
#: Commands older than this are dropped by the broker instead of reaching a device late.
COMMAND_EXPIRY_S = 300
ANSWER_EXPIRY_S = 60
#: The push loop wakes on every push; this is only how often it also looks for closed sessions.
PUSH_SWEEP_S = 1.0


@dataclass(frozen=True)
class BridgeSettings:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    #: The MQTT client id; "" for one of this process's own: the broker ends a session when another
    #: client connects with its id, so coordinators sharing a configuration must not share one.
    client_id: str = ""
    group: str = "coordinators"


class MqttBridge:
    """MQTT consumers for one coordinator process."""

    def __init__(self, api: DeviceApi, settings: BridgeSettings) -> None:
        self.api = api
        self.settings = settings
        self.handled = 0
        self._sessions: dict[str, tuple[str, Session]] = {}
        #: Devices with pushes waiting (set by the sessions' wake callbacks, from any thread).
        self._ready: set[str] = set()
        self._ready_event = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._queues: list[queue.Queue[mqtt.MQTTMessage | None]] = [
            queue.Queue(maxsize=QUEUE_LIMIT) for _ in range(WORKERS)
        ]
        self._client = tls_client(
            settings.client_id or f"coordinator-{socket.gethostname()}-{os.getpid()}",
            ca=settings.ca, cert=settings.cert, key=settings.key, setting="--mqtt-{}"
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"mqtt-worker-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        self._threads.append(threading.Thread(target=self._push_loop, name="mqtt-push", daemon=True))

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=30, clean_start=True)
        self._client.loop_start()

    def stop(self) -> None:
        self._stop.set()
        self._ready_event.set()
        self._client.disconnect()
        self._client.loop_stop()
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=5)

    # -- paho callbacks ---------------------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("broker refused the coordinator: %s", rc)
            return
        no_delay(client)  # answers (clock pongs) must not wait on Nagle for an ACK
        client.subscribe(f"$share/{self.settings.group}/fl/v1/+/+/up/#", qos=1)
        self.connected.set()
        log.info("MQTT bridge connected to %s:%d", self.settings.host, self.settings.port)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, codes: list[ReasonCode], props: object
    ) -> None:
        if codes and codes[0].is_failure:  # nothing would ever arrive: say why
            log.error(
                "the broker refused the shared subscription $share/%s/... (%s): is this coordinator's "
                "certificate CN in the broker's group of coordinators, and the share group the one allowed?",
                self.settings.group,
                codes[0],
            )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT bridge lost the broker: %s (reconnecting)", rc)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        key = parts[3] if len(parts) > 3 else ""
        self._queues[zlib.crc32(key.encode()) % WORKERS].put(message)

    @property
    def refused(self) -> Counter[str]:
        """Refusals over MQTT by reason ("undecodable", "impersonation", "bad-topic", "ingest:CODE")."""
        return self.api.refusals.of("mqtt")

    # -- handling ---------------------------------------------------------------------------------
    def _work(self, q: queue.Queue[mqtt.MQTTMessage | None]) -> None:
        while True:
            message = q.get()
            if message is None:
                return
            try:
                self.handle(message.topic, bytes(message.payload), getattr(message, "properties", None))
            except Exception:  # a bug must not kill the worker serving other devices
                log.exception("MQTT message on %s failed", message.topic)
                self.api.refusals.count("internal", "mqtt")

    def _refuse(self, reason: str, device_id: str, detail: str) -> None:
        self.api.refusals.count(reason, "mqtt")
        log.warning("refused %s from %s: %s", reason, device_id or "?", detail)

    def handle(self, topic: str, payload: bytes, props: Properties | None) -> None:
        """One message from a device's ``up`` topic (public for tests: the broker is not needed)."""
        parts = topic.split("/")
        if len(parts) != 6 or parts[0] != "fl" or parts[1] != "v1" or parts[4] != "up":
            self._refuse("bad-topic", "", topic)
            return
        fleet, device_id, kind = parts[2], parts[3], parts[5]
        self.handled += 1
        # The broker's ACL ties the topic to the client certificate: the topic's device is proven.
        caller = Caller.device(device_id, transport="mqtt", proven=True)
        if kind == "control":
            self._control(fleet, caller, payload)
        elif kind == "upload":
            self._upload(fleet, caller, payload, props)
        elif kind == "status":
            if payload == b"offline":
                self._offline(caller)
        else:
            self._refuse("bad-topic", device_id, topic)

    def _control(self, fleet: str, caller: Caller, payload: bytes) -> None:
        device_id = caller.name
        try:
            msg = parse(device_pb2.DeviceMessage, payload)
        except MalformedMessageError:
            self._refuse("undecodable", device_id, "DeviceMessage does not decode")
            return
        devices = self.api.devices
        try:
            if msg.WhichOneof("kind") == "hello":
                session = devices.connect(caller, msg.hello, self.api.clock(), self._waker(device_id))
                with self._lock:
                    self._sessions[device_id] = (fleet, session)
                for out in devices.welcome(caller):
                    self._publish_down(fleet, device_id, out)
                return
            with self._lock:
                known = device_id in self._sessions
            if not known:
                # said hello to another coordinator (shared subscription) or to our predecessor before a
                # restart: route pushes for it through this one too
                session = devices.attach(caller, self.api.clock(), self._waker(device_id))
                with self._lock:
                    self._sessions[device_id] = (fleet, session)
            devices.receive(caller, msg, self.api.clock())
        except PermissionDeniedError as exc:  # counted where it was found (services.access)
            log.warning("refused from %s: %s", device_id, exc)
        except NotFoundError as exc:
            self._refuse("no-hello", device_id, str(exc))
        except FleetloopError as exc:
            self._refuse("control", device_id, str(exc))

    def _offline(self, caller: Caller) -> None:
        with self._lock:
            entry = self._sessions.pop(caller.name, None)
        self.api.devices.gone(caller, entry[1] if entry is not None else None)

    def _upload(self, fleet: str, caller: Caller, payload: bytes, props: Properties | None) -> None:
        device_id = caller.name
        response_topic = str(getattr(props, "ResponseTopic", "") or "")
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        own_prefix = f"fl/v1/{fleet}/{device_id}/down/"
        if response_topic and not response_topic.startswith(own_prefix):
            # answering there would let a device make the coordinator write into another device's topics
            self._refuse("bad-response-topic", device_id, response_topic)
            return
        status, error, answer = "OK", "", b""
        try:
            req = parse(ingest_pb2.UploadSegmentRequest, payload)
        except MalformedMessageError:
            self._refuse("undecodable", device_id, "UploadSegmentRequest does not decode")
            status, error = "INVALID_ARGUMENT", "UploadSegmentRequest does not decode"
        else:
            try:
                ack = self.api.ingest.segment(caller, req, self.api.clock())
                answer = ack.response(req.segment_id).SerializeToString()
            except PermissionDeniedError as exc:  # counted where it was found (services.access)
                status, error = exc.grpc_code, str(exc)
            except FleetloopError as exc:
                self._refuse(f"ingest:{exc.grpc_code}", device_id, str(exc))
                status, error = exc.grpc_code, str(exc)
        if not response_topic:
            return
        out = publish_properties(expiry_s=ANSWER_EXPIRY_S, correlation=correlation)
        out.UserProperty = [("status", status), ("error", error[:500])]
        self._client.publish(response_topic, answer, qos=1, properties=out)

    # -- pushes -----------------------------------------------------------------------------------
    def _publish_down(self, fleet: str, device_id: str, msg: device_pb2.CloudMessage) -> None:
        props = publish_properties(expiry_s=COMMAND_EXPIRY_S)
        payload = stamp_transmit(msg, int(self.api.clock() * 1e9)).SerializeToString()
        self._client.publish(f"fl/v1/{fleet}/{device_id}/down/control", payload, qos=1, properties=props)

    def _waker(self, device_id: str) -> Callable[[], None]:
        def wake() -> None:
            with self._lock:
                self._ready.add(device_id)
            self._ready_event.set()

        return wake

    def _push_loop(self) -> None:
        """Publishes what sessions were woken for; an idle fleet costs nothing (no per-device polling)."""
        while not self._stop.is_set():
            self._ready_event.wait(PUSH_SWEEP_S)
            self._ready_event.clear()
            with self._lock:
                ready, self._ready = self._ready, set()
                entries = [
                    (d, e) for d, e in self._sessions.items() if d in ready or e[1].closed.is_set()
                ]
            for device_id, (fleet, session) in entries:
                if session.closed.is_set():
                    with self._lock:
                        if self._sessions.get(device_id, (None, None))[1] is session:
                            del self._sessions[device_id]
                    continue
                while True:
                    try:
                        msg = session.outbox.get_nowait()
                    except queue.Empty:
                        break
                    self._publish_down(fleet, device_id, msg)
