"""The agent's link to the cloud over MQTT 5 (paho): same role and interface as ``uplink.CloudLink``.

The only agent module that imports paho. Topics are ``fl/v1/{fleet}/{device_id}/{up|down}/{kind}``:

- ``up/control`` — :class:`DeviceMessage` (hello first after every connect, then inventory, heartbeats,
  status), QoS 1; ``up/status`` — ``offline``, also the Last Will, so the cloud learns of a vanished link;
- ``up/upload`` — :class:`UploadSegmentRequest`, QoS 1, with a *response topic*
  (``down/upload_ack``) and *correlation data*; the cloud answers :class:`UploadSegmentResponse` with a
  ``status`` user property (a gRPC status name, ``OK`` on success, and an ``error`` text otherwise);
- ``down/control`` — :class:`CloudMessage` pushed by the cloud (each with a message expiry).

Identity: TLS with the device's client certificate; its CN is the MQTT username and must be the device
id (the broker's role for the device lets it touch only its own topics, in its own fleet). The session
is persistent (session expiry ``SESSION_EXPIRY_S``) so commands published while the device is away wait
at the broker.

Exactly once, device side: a segment is checkpointed (``mark_uploaded``) only after the cloud's
``OK``/duplicate answer for that correlation id; a timeout or a lost connection retries the same segment
id, which the cloud dedupes. Failures are mapped to a log line, a metric and a bounded, jittered backoff.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetloop_agent.control_outbox import OUTBOX_LIMIT, ControlOutbox
from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.upload_protocol import UploadGrants, acknowledged, upload_request
from fleetloop_shared.errors import ConfigError, NotFoundError
from fleetloop_shared.wire import device_pb2, ingest_pb2

log = logging.getLogger("fleetloop.agent.uplink")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0
KEEPALIVE_S = 30
#: How long the broker keeps the device's session (subscriptions, queued commands) while it is away.
SESSION_EXPIRY_S = 24 * 3600
#: Upload answers with these statuses refuse the bytes themselves; retrying cannot help.
PERMANENT_STATUSES = {"INVALID_ARGUMENT", "DATA_LOSS", "PERMISSION_DENIED"}
#: A hello without a welcome within this many seconds is repeated.
HELLO_RETRY_S = 5.0
#: Requests in flight waiting for their answer (bounded: the upload loop sends one at a time).
MAX_WAITERS = 64


def _props(packet_type: int) -> Properties:
    """MQTT 5 properties for one packet (paho's constructor is untyped)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and the device's TLS identity (certificate CN = device id)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path


def device_topic(fleet: str, device_id: str, direction: str, kind: str) -> str:
    return f"fl/v1/{fleet}/{device_id}/{direction}/{kind}"


class _Waiter:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.status = ""
        self.error = ""
        self.response: ingest_pb2.UploadSegmentResponse | None = None


class _RetryLater(Exception):
    """An upload attempt failed in a way a later retry can fix (timeout, link down, cloud busy)."""


class MqttCloudLink(ControlOutbox):
    """Keeps the MQTT session up and drains the local store to the cloud (same API as CloudLink)."""

    def __init__(
        self,
        settings: MqttSettings,
        device_id: str,
        *,
        fleet: str,
        store: LocalStore,
        metrics: AgentMetrics,
        greeting: Callable[[], list[device_pb2.DeviceMessage]],
        on_message: Callable[[device_pb2.CloudMessage], None],
        upload_deadline_s: float = 10.0,
        on_ack: Callable[[StoredSegment, bool], None] | None = None,
        grants: bool = False,
    ) -> None:
        # grants (issue 6): upload only what the cloud's upload scheduler granted, as CloudLink does
        self._grants = grants
        self._budget = UploadGrants()
        for what, path in (("ca", settings.ca), ("cert", settings.cert), ("key", settings.key)):
            if not Path(path).is_file():
                raise ConfigError(f"cloud.mqtt.{what}: file not found: {path}")
        self.settings = settings
        self.target = f"mqtts://{settings.host}:{settings.port}"
        self.device_id = device_id
        self.fleet = fleet
        self._store = store
        super().__init__(metrics)
        self._greeting = greeting
        self._on_message = on_message
        self._on_ack = on_ack
        self._deadline = upload_deadline_s
        self._stop = threading.Event()
        self._upload_wakeup = threading.Event()
        self._waiters: dict[bytes, _Waiter] = {}
        self._waiters_lock = threading.Lock()
        #: Set once a coordinator answered our hello (a welcome): the cloud, not just the broker, is up.
        self._broker_up = threading.Event()
        self._greeted_at = 0.0
        self.last_error = ""
        self.decode_errors = 0
        self._up_control = device_topic(fleet, device_id, "up", "control")
        self._up_upload = device_topic(fleet, device_id, "up", "upload")
        self._up_status = device_topic(fleet, device_id, "up", "status")
        self._down = device_topic(fleet, device_id, "down", "#")
        self._ack_topic = device_topic(fleet, device_id, "down", "upload_ack")
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.tls_set(
            ca_certs=str(settings.ca), certfile=str(settings.cert), keyfile=str(settings.key)
        )
        self._client.will_set(self._up_status, b"offline", qos=1)
        self._client.reconnect_delay_set(min_delay=1, max_delay=int(BACKOFF_MAX_S))
        self._client.max_queued_messages_set(OUTBOX_LIMIT)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_mqtt_message
        self._client.on_subscribe = self._on_subscribe
        self._threads = [
            threading.Thread(target=self._control_loop, name="uplink-mqtt-control", daemon=True),
            threading.Thread(target=self._upload_loop, name="uplink-mqtt-upload", daemon=True),
        ]
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        props = _props(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self.settings.host, self.settings.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props
        )
        self._client.loop_start()
        self._started = True
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._upload_wakeup.set()
        if self._started:
            if self.connected.is_set():
                info = self._client.publish(self._up_status, b"offline", qos=1)
                info.wait_for_publish(timeout=1.0)
            self._client.disconnect()
            self._client.loop_stop()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)

    def grant(self, max_bytes: int, min_priority: int) -> None:
        """An UploadGrant from the cloud (see :class:`~fleetloop_agent.uplink.UploadGrants`)."""
        self._budget.add(max_bytes, min_priority)
        self._upload_wakeup.set()

    def kick_upload(self) -> None:
        self._upload_wakeup.set()

    # -- paho callbacks (paho's network thread) ---------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            self._note_error(f"broker refused the connection: {rc}")
            return
        client.subscribe(self._down, qos=1)
        self._broker_up.set()
        self._greet()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, codes: list[ReasonCode], props: object
    ) -> None:
        """A refused SUBSCRIBE means the broker does not know this device in this fleet: say so, since
        otherwise commands would just never arrive."""
        if codes and codes[0].is_failure:
            self._note_error(
                f"the broker refused {self._down} ({codes[0]}): is {self.device_id!r} registered with the "
                f"broker in fleet {self.fleet!r}?"
            )

    def _greet(self) -> None:
        """Say hello (again): the cloud answers with a welcome, which is what marks the link up. A hello
        published while no coordinator consumed it (all of them restarting) is repeated."""
        self._greeted_at = time.monotonic()
        for msg in self._greeting():
            self._client.publish(self._up_control, msg.SerializeToString(), qos=1)

    def _on_welcome(self) -> None:
        if self.connected.is_set():
            return
        if self.last_error:
            log.info("cloud at %s reachable again", self.target)
        self.last_error = ""
        self._metrics.reconnects.inc()
        self.connected.set()
        self._upload_wakeup.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self.connected.clear()
        self._broker_up.clear()
        self._note_error(f"disconnected from broker: {rc}")
        with self._waiters_lock:
            for w in self._waiters.values():
                w.status = "UNAVAILABLE"
                w.error = "link lost before the answer"
                w.done.set()

    def _on_mqtt_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        try:
            if kind == "upload_ack":
                self._on_upload_answer(message)
            elif kind == "control":
                msg = device_pb2.CloudMessage.FromString(bytes(message.payload))
                if msg.WhichOneof("kind") == "welcome":
                    self._on_welcome()
                self._on_message(msg)
        except DecodeError:
            self.decode_errors += 1
            log.warning("undecodable message on %s dropped", message.topic)
        except Exception as exc:  # a handler bug must not kill paho's network thread
            log.exception("control message handler failed: %s", exc)

    def _on_upload_answer(self, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        with self._waiters_lock:
            waiter = self._waiters.get(correlation)
        if waiter is None:
            return  # an answer to an attempt we gave up on: the retry will get its own
        users = dict(getattr(props, "UserProperty", []) or [])
        waiter.status = str(users.get("status", "UNKNOWN"))
        waiter.error = str(users.get("error", ""))
        if waiter.status == "OK":
            waiter.response = ingest_pb2.UploadSegmentResponse.FromString(bytes(message.payload))
        waiter.done.set()

    def _note_error(self, what: str) -> None:
        if self._stop.is_set():
            return
        if what != self.last_error:
            log.warning("cannot reach cloud at %s: %s (retrying)", self.target, what)
        self.last_error = what

    # -- control messages -------------------------------------------------------------------------
    def _control_loop(self) -> None:
        while not self._stop.is_set():
            if not self.connected.wait(timeout=0.5):
                if self._broker_up.is_set() and time.monotonic() - self._greeted_at > HELLO_RETRY_S:
                    self._note_error("no coordinator answered the hello")
                    self._greet()
                continue
            try:
                msg = self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            props = _props(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = 300
            info = self._client.publish(self._up_control, msg.SerializeToString(), qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._note_error(f"publish failed: {mqtt.error_string(info.rc)}")

    # -- uploads ----------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            self._upload_wakeup.wait(timeout=1.0)
            self._upload_wakeup.clear()
            if self._stop.is_set():
                return
            if not self.connected.is_set():
                continue
            try:
                self._drain()
                backoff = BACKOFF_MIN_S
            except _RetryLater as exc:
                self._metrics.upload_errors.inc()
                log.warning("upload to %s failed: %s (retrying)", self.target, exc)
                if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                    return
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                self._upload_wakeup.set()

    def _drain(self) -> None:
        while not self._stop.is_set():
            batch = self._store.pending(limit=32)
            if not batch:
                return
            for seg in batch:
                if self._grants and not self._budget.take(seg):
                    return  # wait for the next grant
                try:
                    data = self._store.read(seg.segment_id)
                except NotFoundError:
                    continue  # evicted by the quota between pending() and read()
                req = upload_request(self.device_id, seg, data)
                status, error, response = self._request(req)
                if status == "OK" and response is not None:
                    acknowledged(seg, response, self._metrics, self._on_ack)
                elif status in PERMANENT_STATUSES:
                    log.error("cloud refused segment %s: %s: %s", seg.segment_id.hex(), status, error)
                    self._metrics.segments_refused.inc()
                else:
                    raise _RetryLater(f"{status}: {error}")
                self._store.mark_uploaded(seg.segment_id)
            self._metrics.store_pending_bytes.set(self._store.stats().bytes_pending)

    def _request(
        self, req: ingest_pb2.UploadSegmentRequest
    ) -> tuple[str, str, ingest_pb2.UploadSegmentResponse | None]:
        correlation = uuid.uuid4().bytes
        waiter = _Waiter()
        with self._waiters_lock:
            if len(self._waiters) >= MAX_WAITERS:
                raise _RetryLater("too many uploads waiting for answers")
            self._waiters[correlation] = waiter
        try:
            props = _props(PacketTypes.PUBLISH)
            props.ResponseTopic = self._ack_topic
            props.CorrelationData = correlation
            props.MessageExpiryInterval = max(1, int(self._deadline))
            info = self._client.publish(self._up_upload, req.SerializeToString(), qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise _RetryLater(f"publish failed: {mqtt.error_string(info.rc)}")
            if not waiter.done.wait(self._deadline):
                raise _RetryLater(f"DEADLINE_EXCEEDED: no answer within {self._deadline:g} s")
            return waiter.status, waiter.error, waiter.response
        finally:
            with self._waiters_lock:
                self._waiters.pop(correlation, None)
