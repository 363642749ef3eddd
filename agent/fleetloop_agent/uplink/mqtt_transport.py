"""The uplink over MQTT 5 (paho), driven by the link's event loop.

The only agent module that imports paho (with the paho pieces it shares with the cloud's bridge,
:mod:`fleetloop_shared.mqtt_client`). Topics are ``fl/v1/{fleet}/{device_id}/{up|down}/{kind}``:

- ``up/control`` — :class:`DeviceMessage` (the greeting after every connect, then heartbeats, status),
  QoS 1; ``up/status`` — ``offline``, also the Last Will, so the cloud learns of a vanished link;
- ``up/upload`` — :class:`UploadSegmentRequest`, QoS 1, with a *response topic* (``down/upload_ack``) and
  *correlation data*; the cloud answers :class:`UploadSegmentResponse` with a ``status`` user property
  (a gRPC status name, ``OK`` on success, and an ``error`` text otherwise). Segments go whole;
- ``down/control`` — :class:`CloudMessage` pushed by the cloud (each with a message expiry).

Identity: TLS with the device's client certificate; its CN is the MQTT username and must be the device
id (the broker's role for the device lets it touch only its own topics, in its own fleet; a refused
subscription ends the session with a reason that says so). The broker session is persistent
(``SESSION_EXPIRY_S``) so commands published while the device is away wait for it. The broker may be up
while no coordinator is: a hello nobody welcomed is said again, at growing intervals.

paho runs no thread of its own here: its socket is watched by the event loop (paho's external-loop API:
``loop_read``, ``loop_write`` and ``loop_misc``), so one loop holds one agent's connection or a
simulator's thousands. Only the TCP connect and TLS handshake, which paho does blocking, run in the loop's
default executor; paho's socket callbacks from there are applied on the loop once the connect returns.
Failures are mapped here: a session's to ``UnavailableError``, an upload's to an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.reasoncodes import ReasonCode

from fleetloop_agent.uplink.transport import (
    PiecesUnsupported,
    RetryLater,
    SessionInbox,
    UploadAnswer,
    UploadRequest,
    answer_for_reply,
    answer_for_status,
    no_answer,
)
from fleetloop_shared.errors import UnavailableError
from fleetloop_shared.mqtt_client import connect_properties, no_delay, publish_properties, tls_client
from fleetloop_shared.wire import device_pb2, ingest_pb2

log = logging.getLogger("fleetloop.agent.uplink")

KEEPALIVE_S = 30
#: How long the broker keeps the device's session (subscriptions, queued commands) while it is away.
SESSION_EXPIRY_S = 24 * 3600
#: Seconds allowed for the TCP connect + TLS handshake, and again for the broker's CONNACK.
CONNECT_TIMEOUT_S = 10.0
#: A hello without a welcome is said again after this many seconds, doubling up to the maximum.
HELLO_RETRY_S = 5.0
HELLO_RETRY_MAX_S = 60.0
#: Seconds a control message may wait at the broker for the cloud.
CONTROL_EXPIRY_S = 300
#: Uploads waiting for their answer at most; overflow policy: the next one is a retry-later answer.
MAX_WAITERS = 64
#: How often paho's keepalive bookkeeping (``loop_misc``) runs.
MISC_INTERVAL_S = 1.0
#: Seconds ``close`` waits for the ``offline`` status and the DISCONNECT to leave.
CLOSE_WAIT_S = 1.0


#: What the CONNACK wait gets when the connection dropped before the broker answered.
_LOST = object()


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


class _MqttSession:
    """The greeting said on connect (and again until welcomed); cloud messages from ``down/control``."""

    def __init__(self, transport: MqttTransport, greeting: Sequence[device_pb2.DeviceMessage]) -> None:
        self._transport = transport
        self._greeting = list(greeting)
        self.inbox = SessionInbox()
        self._welcomed = False
        self._hello_retry_s = transport.hello_retry_s

    def greet(self) -> None:
        for msg in self._greeting:
            self._transport.publish_control(msg, expiry_s=None)

    async def receive(self) -> device_pb2.CloudMessage:
        while True:
            msg = await self.inbox.get(None if self._welcomed else self._hello_retry_s)
            if msg is not None:
                if msg.WhichOneof("kind") == "welcome":
                    self._welcomed = True
                return msg
            log.warning(
                "%s: no coordinator answered the hello at %s within %g s; saying it again",
                self._transport.device_id, self._transport.target, self._hello_retry_s,
            )  # fmt: skip
            self._hello_retry_s = min(HELLO_RETRY_MAX_S, self._hello_retry_s * 2)
            self.greet()

    async def send(self, msg: device_pb2.DeviceMessage) -> None:
        if self.inbox.ended:
            raise UnavailableError("disconnected from the broker")
        self._transport.publish_control(msg, expiry_s=CONTROL_EXPIRY_S)

    async def close(self) -> None:
        if not self.inbox.ended:
            self.inbox.end("session closed")
            self._transport.hang_up(self)


class MqttTransport:
    """A device's MQTT 5 connection to the broker in ``settings``, with its own client certificate."""

    takes_pieces = False

    def __init__(
        self,
        settings: MqttSettings,
        device_id: str,
        *,
        fleet: str,
        keepalive_s: int = KEEPALIVE_S,
        hello_retry_s: float = HELLO_RETRY_S,
    ) -> None:
        self.settings = settings
        self.target = f"mqtts://{settings.host}:{settings.port}"
        self.device_id = device_id
        self.fleet = fleet
        self.keepalive_s = keepalive_s
        self.hello_retry_s = hello_retry_s
        self._up_control = device_topic(fleet, device_id, "up", "control")
        self._up_upload = device_topic(fleet, device_id, "up", "upload")
        self._up_status = device_topic(fleet, device_id, "up", "status")
        self._down = device_topic(fleet, device_id, "down", "#")
        self._ack_topic = device_topic(fleet, device_id, "down", "upload_ack")
        self._client = self._make_client(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        #: Socket callbacks paho made on the connect thread, applied on the loop when it returns.
        self._pending_ops: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._fd: int | None = None
        self._connack: asyncio.Future[Any] | None = None
        self._misc: asyncio.Task[None] | None = None
        #: The broker accepted the connection and it has not dropped since.
        self._up = False
        self._session: _MqttSession | None = None
        self._waiters: dict[bytes, asyncio.Future[UploadAnswer]] = {}
        self.decode_errors = 0

    def _make_client(self, settings: MqttSettings) -> mqtt.Client:
        client = tls_client(
            self.device_id, ca=settings.ca, cert=settings.cert, key=settings.key, setting="cloud.mqtt.{}"
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.will_set(self._up_status, b"offline", qos=1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    # -- the interface ----------------------------------------------------------------------------
    async def connect(self, greeting: Sequence[device_pb2.DeviceMessage]) -> _MqttSession:
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._unwatch()  # the connect thread closes the old socket: the loop must not read it meanwhile
        self._stop_misc()
        self._connack = connack = loop.create_future()
        props = connect_properties(session_expiry_s=SESSION_EXPIRY_S)
        connect = functools.partial(
            self._client.connect,
            self.settings.host,
            self.settings.port,
            keepalive=self.keepalive_s,
            clean_start=False,
            properties=props,
        )
        try:
            await loop.run_in_executor(None, connect)
        except (OSError, ValueError) as exc:  # refused, timed out, handshake failed (ssl.SSLError)
            raise UnavailableError(f"cannot connect to {self.target}: {exc}") from None
        finally:
            ops, self._pending_ops = self._pending_ops, []
            for fn, args in ops:
                fn(*args)
        self._misc = loop.create_task(self._keepalive())
        try:
            rc = await asyncio.wait_for(connack, CONNECT_TIMEOUT_S)
        except TimeoutError:
            self._client.disconnect()
            raise UnavailableError(f"no answer from the broker at {self.target}") from None
        if rc is _LOST:
            raise UnavailableError(f"the broker at {self.target} dropped the connection before answering")
        if getattr(rc, "is_failure", False):
            raise UnavailableError(f"the broker at {self.target} refused the connection: {rc}")
        self._up = True
        self._client.subscribe(self._down, qos=1)
        self._session = session = _MqttSession(self, greeting)
        session.greet()
        return session

    async def upload(self, request: UploadRequest, timeout_s: float) -> UploadAnswer:
        if isinstance(request, ingest_pb2.UploadChunkRequest):
            return PiecesUnsupported("segments go whole over MQTT")
        if not self._up or self._loop is None:
            return RetryLater("UNAVAILABLE: not connected to the broker")
        if len(self._waiters) >= MAX_WAITERS:
            return RetryLater("RESOURCE_EXHAUSTED: too many uploads waiting for answers")
        correlation = uuid.uuid4().bytes
        answer: asyncio.Future[UploadAnswer] = self._loop.create_future()
        self._waiters[correlation] = answer
        try:
            props = publish_properties(
                expiry_s=max(1, int(timeout_s)), response_topic=self._ack_topic, correlation=correlation
            )
            info = self._client.publish(self._up_upload, request.SerializeToString(), qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return RetryLater(f"UNAVAILABLE: publish failed: {mqtt.error_string(info.rc)}")
            try:
                return await asyncio.wait_for(answer, timeout_s)
            except TimeoutError:
                return no_answer(timeout_s)
        finally:
            self._waiters.pop(correlation, None)

    async def close(self) -> None:
        """Say ``offline``, disconnect (the broker keeps the session), and let go of the socket."""
        if self._up:
            info = self._client.publish(self._up_status, b"offline", qos=1)
            await self._until(info.is_published)
            self._client.disconnect()
            await self._until(lambda: self._fd is None)
        self._stop_misc()
        sock = self._client.socket()  # still open: the DISCONNECT did not leave, or a connect was cut short
        self._unwatch()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._up = False

    # -- for the session --------------------------------------------------------------------------
    def publish_control(self, msg: device_pb2.DeviceMessage, *, expiry_s: int | None) -> None:
        props = publish_properties(expiry_s=expiry_s) if expiry_s is not None else None
        info = self._client.publish(self._up_control, msg.SerializeToString(), qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise UnavailableError(f"publish failed: {mqtt.error_string(info.rc)}")

    def hang_up(self, session: _MqttSession) -> None:
        """The link closed ``session`` while the connection is up: end the connection too."""
        if session is self._session and self._up:
            self._client.disconnect()

    # -- paho callbacks (on the loop) -------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        no_delay(client)  # pings must not wait on Nagle for the last packet's ACK
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self._up = False
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(_LOST)
        if self._session is not None:
            self._session.inbox.end(f"disconnected from the broker: {rc}")
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(RetryLater("UNAVAILABLE: link lost before the answer"))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, codes: list[ReasonCode], props: object
    ) -> None:
        """A refused SUBSCRIBE means the broker does not know this device in this fleet: end the session
        with that reason (the link says it and retries), since otherwise commands would never arrive."""
        if codes and codes[0].is_failure and self._session is not None:
            self._session.inbox.end(
                f"the broker refused {self._down} ({codes[0]}): is {self.device_id!r} registered with the "
                f"broker in fleet {self.fleet!r}?"
            )

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        try:
            if kind == "upload_ack":
                self._on_upload_answer(message)
            elif kind == "control" and self._session is not None:
                self._session.inbox.put(device_pb2.CloudMessage.FromString(bytes(message.payload)))
        except DecodeError:
            self.decode_errors += 1
            log.warning("%s: undecodable message on %s dropped", self.device_id, message.topic)

    def _on_upload_answer(self, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        waiter = self._waiters.get(correlation)
        if waiter is None or waiter.done():
            return  # an answer to an attempt given up on: the retry gets its own
        users = dict(getattr(props, "UserProperty", []) or [])
        status, error = str(users.get("status", "UNKNOWN")), str(users.get("error", ""))
        if status != "OK":
            waiter.set_result(answer_for_status(status, error))
            return
        response = ingest_pb2.UploadSegmentResponse.FromString(bytes(message.payload))
        waiter.set_result(answer_for_reply(response))

    # -- the socket on the loop -------------------------------------------------------------------
    def _socket_op(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:  # paho's connect, on the executor: applied on the loop when it returns
            self._pending_ops.append((fn, args))

    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._socket_op(self._watch, sock.fileno())

    def _on_socket_close(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._socket_op(self._unwatch_fd, sock.fileno())

    def _on_register_write(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._socket_op(self._want_write, sock.fileno(), True)

    def _on_unregister_write(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._socket_op(self._want_write, sock.fileno(), False)

    def _watch(self, fd: int) -> None:
        assert self._loop is not None
        self._unwatch()
        self._fd = fd
        self._loop.add_reader(fd, self._readable)

    def _unwatch_fd(self, fd: int) -> None:
        assert self._loop is not None
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        if self._fd == fd:
            self._fd = None

    def _unwatch(self) -> None:
        if self._fd is not None:
            self._unwatch_fd(self._fd)

    def _want_write(self, fd: int, on: bool) -> None:
        if self._loop is None or fd != self._fd:
            return
        with contextlib.suppress(OSError, ValueError):
            if on:
                self._loop.add_writer(fd, self._client.loop_write)
            else:
                self._loop.remove_writer(fd)

    def _readable(self) -> None:
        self._client.loop_read()
        sock = self._client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending():  # bytes TLS already decrypted
            self._client.loop_read()
            sock = self._client.socket()

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            self._client.loop_misc()

    def _stop_misc(self) -> None:
        task, self._misc = self._misc, None
        if task is not None:
            task.cancel()

    @staticmethod
    async def _until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + CLOSE_WAIT_S
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
