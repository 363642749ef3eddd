"""Thousands of simulated MQTT 5 devices from one thread: paho clients on one ``selectors`` (epoll) loop.

The agent's ``MqttCloudLink`` runs paho's own network loop, a thread per device, and paho's loop waits
in ``select()``, which cannot watch descriptors past 1,024; a previous harness spread 10,000 devices over
40 processes of such clients and drowned the machine in threads and retry storms (docs/benchmarks.md,
issue 6). Here every device is still its own paho client — its own TLS client certificate (CN = device
id = MQTT username), its own connection, the shipped broker config and ACLs — but no client runs a loop
of its own: one :class:`MqttSwarm` registers their sockets with one epoll selector and calls paho's
external-loop API (``loop_read``, ``loop_write``, ``loop_misc``, ``want_write`` through the socket
callbacks). Without paho's loop thread a client holds one descriptor, not three.

Connections are admitted at a bounded rate (``connect_rate`` per second, token bucket), and every
failure — refused, timed out, dropped — retries after its own exponential backoff with jitter, so a
broker that falls behind sees a steady ramp instead of every client retrying at once.

Each device, once connected, subscribes to its ``down/#`` topics and says hello (QoS 1) like the agent;
it counts as *welcomed* when the coordinator's ``Welcome`` arrives. Run as a process:
``python -m fleetloop_fwsim.mqtt_swarm --host H --port P --certs DIR --first N --count K --status FILE``
(what ``benchmarks/ingest.py`` does, a few processes of a few thousand devices each).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import os
import random
import selectors
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetloop_agent.uplink_mqtt import KEEPALIVE_S, SESSION_EXPIRY_S, device_topic
from fleetloop_fwsim.grpc_swarm import raise_open_files_limit
from fleetloop_shared.wire import device_pb2

log = logging.getLogger("fleetloop.fwsim.mqtt_swarm")

#: New connections (TCP + TLS handshake + CONNECT) per second per swarm; overflow policy: the device
#: waits for its turn. Handshakes are done one at a time on the loop, so this also bounds its stalls.
CONNECT_RATE = 150.0
#: Connections admitted in one burst at most (token bucket size).
CONNECT_BURST = 20
#: Retry backoff after a failed or lost connection: doubles from MIN to MAX, times a jitter of 0.5–1.5.
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
#: Seconds allowed for one TCP connect + TLS handshake.
CONNECT_TIMEOUT_S = 10.0
#: How often every connected client's keepalive bookkeeping (``loop_misc``) runs.
MISC_INTERVAL_S = 1.0


def _props(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


@dataclass
class _Device:
    device_id: str
    index: int
    client: mqtt.Client
    backoff: float = BACKOFF_MIN_S
    tls_ready: bool = False
    broker_connected: bool = False
    welcomed: bool = False


class MqttSwarm:
    """Many device sessions on one selector loop (:meth:`run`, one thread)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: Path,
        certs: Path,
        fleet: str,
        device_ids: Sequence[str],
        hello: Callable[[str], bytes],
        connect_rate: float = CONNECT_RATE,
        keepalive_s: int = KEEPALIVE_S,
    ) -> None:
        raise_open_files_limit()
        self.host, self.port = host, port
        self._ca, self._certs, self.fleet = ca, certs, fleet
        self._hello = hello
        self._rate = connect_rate
        self._keepalive = keepalive_s
        self._sel = selectors.DefaultSelector()
        self._due: list[tuple[float, int]] = []  # (when, device index): connection attempts waiting
        self.devices = [self._device(i, did) for i, did in enumerate(device_ids)]
        for i in range(len(self.devices)):
            heapq.heappush(self._due, (0.0, i))
        self.welcomed = 0
        self.broker_connected = 0
        self.attempts = 0
        self.connect_failures = 0
        self.disconnects = 0

    def _device(self, index: int, device_id: str) -> _Device:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        dev = _Device(device_id, index, client)
        client.user_data_set(dev)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.will_set(device_topic(self.fleet, device_id, "up", "status"), b"offline", qos=1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return dev

    # -- the loop ---------------------------------------------------------------------------------
    def run(
        self,
        stop: threading.Event,
        report: Callable[[dict[str, Any]], None] | None = None,
        report_every_s: float = 1.0,
    ) -> None:
        tokens = float(CONNECT_BURST)
        last = last_misc = last_report = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            tokens = min(float(CONNECT_BURST), tokens + (now - last) * self._rate)
            last = now
            while self._due and self._due[0][0] <= now and tokens >= 1.0:
                _, i = heapq.heappop(self._due)
                tokens -= 1.0
                self._connect(self.devices[i])
            timeout = 0.05 if self._due else 0.2
            for key, mask in self._sel.select(timeout):
                client: mqtt.Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                    sock = client.socket()
                    while isinstance(sock, ssl.SSLSocket) and sock.pending():  # bytes TLS already decrypted
                        client.loop_read()
                        sock = client.socket()
                if mask & selectors.EVENT_WRITE and client.socket() is not None:
                    client.loop_write()
            now = time.monotonic()
            if now - last_misc >= MISC_INTERVAL_S:
                last_misc = now
                for dev in self.devices:
                    if dev.broker_connected:
                        dev.client.loop_misc()
            if report is not None and now - last_report >= report_every_s:
                last_report = now
                report(self.status())
        for dev in self.devices:
            with contextlib.suppress(Exception):
                dev.client.disconnect()
                dev.client.loop_write()

    def status(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "welcomed": self.welcomed,
            "broker_connected": self.broker_connected,
            "attempts": self.attempts,
            "connect_failures": self.connect_failures,
            "disconnects": self.disconnects,
            "waiting_to_connect": len(self._due),
        }

    def _connect(self, dev: _Device) -> None:
        self.attempts += 1
        try:
            if not dev.tls_ready:  # the context (CA, the device's certificate and key) on first use
                dev.client.tls_set(
                    ca_certs=str(self._ca),
                    certfile=str(self._certs / f"{dev.device_id}.pem"),
                    keyfile=str(self._certs / f"{dev.device_id}.key"),
                )
                dev.tls_ready = True
            props = _props(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            dev.client.connect(self.host, self.port, keepalive=self._keepalive, properties=props)
        except (OSError, ValueError) as exc:  # refused, timed out, handshake failed (ssl.SSLError)
            self.connect_failures += 1
            log.debug("%s: connect failed: %s", dev.device_id, exc)
            self._retry_later(dev)

    def _retry_later(self, dev: _Device) -> None:
        delay = dev.backoff * random.uniform(0.5, 1.5)
        dev.backoff = min(BACKOFF_MAX_S, dev.backoff * 2)
        heapq.heappush(self._due, (time.monotonic() + delay, dev.index))

    # -- paho callbacks (on the loop) -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, dev: _Device, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            self.connect_failures += 1
            client.disconnect()  # on_disconnect schedules the retry
            return
        dev.broker_connected = True
        self.broker_connected += 1
        client.subscribe(device_topic(self.fleet, dev.device_id, "down", "#"), qos=1)
        hello = self._hello(dev.device_id)
        client.publish(device_topic(self.fleet, dev.device_id, "up", "control"), hello, qos=1)

    def _on_disconnect(self, client: mqtt.Client, dev: _Device, flags: Any, rc: Any, props: Any) -> None:
        self.disconnects += 1
        if dev.broker_connected:
            dev.broker_connected = False
            self.broker_connected -= 1
        if dev.welcomed:
            dev.welcomed = False
            self.welcomed -= 1
        self._retry_later(dev)

    def _on_message(self, client: mqtt.Client, dev: _Device, message: mqtt.MQTTMessage) -> None:
        if not message.topic.endswith("/down/control"):
            return
        try:
            msg = device_pb2.CloudMessage.FromString(bytes(message.payload))
        except DecodeError:
            return
        if msg.WhichOneof("kind") == "welcome" and not dev.welcomed:
            dev.welcomed = True
            dev.backoff = BACKOFF_MIN_S
            self.welcomed += 1

    def _on_socket_open(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, client)


def plain_hello(fleet: str) -> Callable[[str], bytes]:
    """A hello naming the device and its fleet (what a device without a signal catalog says)."""

    def hello(device_id: str) -> bytes:
        msg = device_pb2.DeviceMessage(hello=device_pb2.Hello(device_id=device_id, fleet=fleet))
        return msg.SerializeToString()

    return hello


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hold many simulated MQTT 5 devices from one loop")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--certs", required=True, help="directory with ca.pem and <device>.pem/.key")
    ap.add_argument("--fleet", default="bench")
    ap.add_argument("--prefix", default="m")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, default=CONNECT_RATE, help="new connections per second")
    ap.add_argument("--status", help="file rewritten every second with this swarm's counts (JSON)")
    args = ap.parse_args(argv)
    certs = Path(args.certs)
    ids = [f"{args.prefix}-{i:05d}" for i in range(args.first, args.first + args.count)]
    swarm = MqttSwarm(
        args.host, args.port, ca=certs / "ca.pem", certs=certs, fleet=args.fleet, device_ids=ids,
        hello=plain_hello(args.fleet), connect_rate=args.rate,
    )  # fmt: skip
    status = Path(args.status) if args.status else None

    def report(counts: dict[str, Any]) -> None:
        if status is not None:
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps({**counts, "pid": os.getpid()}))
            os.replace(tmp, status)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    swarm.run(stop, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
