"""What the two MQTT 5 adapters — the agent's uplink transport and the coordinator's bridge — share of
paho: a client with its TLS identity, a packet's properties, and a socket without Nagle's delay.

Each adapter still owns its protocol (topics, sessions, answers); this is only how either one talks to
paho, so that a change of paho's API or a TLS mistake is met in one place. Only the MQTT adapters import
this module (the import contract that keeps paho inside them names it as one of them).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetloop_shared.errors import ConfigError


def tls_client(client_id: str, *, ca: Path, cert: Path, key: Path, setting: str) -> mqtt.Client:
    """An MQTT 5 client (paho's version-2 callbacks) that presents ``cert``/``key`` and trusts ``ca``.

    ``setting`` names the files where the user configured them, with ``{}`` for ``ca``/``cert``/``key``
    (``cloud.mqtt.{}``, ``--mqtt-{}``): a missing or unreadable file is a :class:`ConfigError` that says
    which setting to fix, never paho's traceback.
    """
    for what, path in (("ca", ca), ("cert", cert), ("key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{setting.format(what)}: file not found: {path}")
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    try:
        client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
    except (OSError, ValueError) as exc:  # a key that does not match, a file that is not PEM (ssl.SSLError)
        raise ConfigError(
            f"{setting.format('cert')}: cannot load the TLS identity ({cert}, {key}): {exc}"
        ) from None
    return client


def publish_properties(
    *, expiry_s: int | None = None, response_topic: str = "", correlation: bytes | None = None
) -> Properties:
    """A PUBLISH's MQTT 5 properties: message expiry, and where and with what id to answer."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho's constructor is untyped
    if expiry_s is not None:
        props.MessageExpiryInterval = expiry_s
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def connect_properties(*, session_expiry_s: int) -> Properties:
    """A CONNECT's MQTT 5 properties: how long the broker keeps the session while the client is away."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props


def no_delay(client: mqtt.Client) -> None:
    """Turn Nagle's algorithm off on the client's socket (called on connect).

    MQTT's small packets — a ping, a clock pong, an upload's answer — otherwise wait for the ACK of the
    packet before them, up to the peer's delayed-ACK time (40 ms or more) each.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):  # paho may wrap it (websockets): then there is nothing to set
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
