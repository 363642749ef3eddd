"""The ``sources:`` kinds of PLC gateways, home hubs and robots, checked key by key before the agent starts.

``modbus_tcp``, ``opcua``, ``mqtt_json``, ``push_api`` and ``ros_replay``: each builder reads one entry
through the spec reader of :mod:`fleetloop_agent.sources` (every fault a ConfigError naming the source and
the key, nested keys included: ``key 'tags': tag 'Plant.Pump.Pressure': key 'type': ...``) and returns
the source, which opens nothing until its first read. docs/sources.md has a worked example of each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fleetloop_agent.sources.base import ORIGINS, SignalSource
from fleetloop_agent.sources.hub_router import Field, Target
from fleetloop_agent.sources.json_paths import path_extractor
from fleetloop_agent.sources.live import DEFAULT_QUEUE_SAMPLES, LIVE_ORIGIN, DeviceClock
from fleetloop_agent.sources.modbus_map import BIT_TYPES, DATA_TYPES, ORDERS, REGISTER_TYPES, Tag
from fleetloop_shared.catalog import DataType
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.yaml_marks import location

if TYPE_CHECKING:
    from fleetloop_agent.sources import _SpecReader

LIVE_ORIGINS: Final = (LIVE_ORIGIN, *ORIGINS)
#: Datatype names a config may use.
TYPE_NAMES: Final = {
    "float": DataType.FLOAT64,
    "float64": DataType.FLOAT64,
    "int": DataType.INT64,
    "int64": DataType.INT64,
    "bool": DataType.BOOL,
    "string": DataType.STRING,
}
_COMMON: Final = ("kind", "name", "origin", "queue_samples")
_SIGNAL_KEYS: Final = ("signal", "type", "unit")
_TAG_KEYS: Final = (
    "register",
    "address",
    "type",
    "word_order",
    "byte_order",
    "scale",
    "offset",
    "unit",
    "poll_ms",
    "device_id",
    "bit",
)
KEYS: Final = {
    "modbus_tcp": (
        *_COMMON,
        "host",
        "port",
        "device_id",
        "timeout_s",
        "poll_ms",
        "max_registers",
        "max_bits",
        "max_gap",
        "tags",
    ),
    "opcua": (*_COMMON, "url", "timestamps", "publishing_ms", "sampling_ms", "timeout_s", "nodes"),
    "mqtt_json": (
        *_COMMON,
        "host",
        "port",
        "username",
        "password",
        "ca",
        "cert",
        "key",
        "client_id",
        "topics",
        "zigbee2mqtt",
        "discovery",
    ),
    "push_api": (*_COMMON, "socket", "socket_mode", "workers", "signals"),
    "ros_replay": ("kind", "name", "origin", "path", "mapping", "include_unmapped"),
}


@contextmanager
def _blamed(label: str, locate: Callable[[str], ConfigError]) -> Iterator[None]:
    """A source's own ConfigError located where the entry's YAML says it (``locate``), unless it
    already names the entry (then it is located already)."""
    try:
        yield
    except ConfigError as exc:
        if label in exc.message:
            raise
        raise locate(exc.message) from None


class _Nested:
    """One nested mapping of an entry (a tag, a node, a field), read with the entry's key in every error."""

    def __init__(self, r: _SpecReader, key: str, label: str, value: Any, allowed: tuple[str, ...]) -> None:
        self.r, self.key, self.label = r, key, label
        self.value = value
        if not isinstance(value, Mapping):
            raise self.fail(f"expected a mapping, got {type(value).__name__}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.fail(f"unknown key {str(unknown[0])!r} (expected {', '.join(allowed)})", unknown[0])

    def fail(self, reason: str, key: Any = None) -> ConfigError:
        return self.located(f"{self.label}: {reason}", key)

    def located(self, message: str, key: Any = None) -> ConfigError:
        """``message`` about this mapping (or its ``key``), with the entry's label and FILE:LINE:COL."""
        where = location(self.value, key) if isinstance(self.value, Mapping) else ""
        where = where or location(self.r.spec, self.key)
        return ConfigError(f"{where}{self.r.label}: key {self.key!r}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        v = self.value.get(key)
        return default if v is None else v

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        v = self.get(key, default)
        if not isinstance(v, str) or (v == "" and default != ""):
            raise self.fail(f"key {key!r}: expected a string, got {v!r}", key)
        if choices:
            check_choice(v, choices, error=lambda problem: self.fail(f"key {key!r}: {problem}", key))
        return v

    def integer(self, key: str, default: int | None = None, lo: int = 0, hi: int | None = None) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            bound = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise self.fail(f"key {key!r}: expected an integer {bound}, got {v!r}", key)
        return v

    def number(self, key: str, default: float) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(f"key {key!r}: expected a number, got {v!r}", key)
        return float(v)

    def data_type(self, default: str = "float") -> DataType:
        return TYPE_NAMES[self.string("type", default, tuple(TYPE_NAMES))]


def _number(r: _SpecReader, key: str, default: float, *, positive: bool = True) -> float:
    v = r.raw(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (positive and v == 0):
        raise r.fail(key, f"expected a {'positive' if positive else 'non-negative'} number, got {v!r}")
    return float(v)


def _mapping_of(r: _SpecReader, key: str, what: str, default: Any = None) -> Mapping[str, Any]:
    m = r.mapping(key, {} if default is None else default)
    for k in m:
        if not isinstance(k, str) or not k:
            raise r.fail(key, f"{what} names must be non-empty strings, got {k!r}")
    return m


def _target(r: _SpecReader, key: str, label: str, value: Any) -> Target:
    n = _Nested(r, key, label, value, _SIGNAL_KEYS)
    return Target(n.string("signal"), n.data_type(), n.string("unit", ""))


def _common(r: _SpecReader) -> dict[str, Any]:
    queue_samples = r.integer("queue_samples", DEFAULT_QUEUE_SAMPLES)
    if queue_samples < 1:
        raise r.fail("queue_samples", "expected at least 1")
    return {"origin": r.string("origin", LIVE_ORIGIN, choices=LIVE_ORIGINS), "queue_samples": queue_samples}


def _modbus(r: _SpecReader, name: str, start_ns: int, clock: DeviceClock | None) -> SignalSource:
    from fleetloop_agent.sources.modbus import ModbusSource, PymodbusClient

    host = r.string("host")
    port = r.integer("port", 502)
    device_id = r.integer("device_id", 1)
    default_poll = _number(r, "poll_ms", 1000)
    tags = []
    for signal, raw in _mapping_of(r, "tags", "tag").items():
        n = _Nested(r, "tags", f"tag {signal!r}", raw, _TAG_KEYS)
        register = n.string("register", "holding", tuple(REGISTER_TYPES))
        data_type = n.string("type", "bool" if register in BIT_TYPES else "uint16", tuple(DATA_TYPES))
        poll_ms = n.number("poll_ms", default_poll)
        if poll_ms <= 0:
            raise n.fail(f"key 'poll_ms': expected a positive number, got {poll_ms!r}", "poll_ms")
        bit = n.get("bit")
        with _blamed(r.label, n.located):
            tags.append(
                Tag(
                    signal,
                    register,
                    n.integer("address", None, 0, 65535),
                    data_type,
                    n.string("word_order", "big", ORDERS),
                    n.string("byte_order", "big", ORDERS),
                    n.number("scale", 1.0),
                    n.number("offset", 0.0),
                    n.string("unit", ""),
                    int(poll_ms * 1_000_000),
                    n.integer("device_id", device_id, 0, 255),
                    n.integer("bit", None, 0, 15) if bit is not None else None,
                )
            )
    if not tags:
        raise r.fail("tags", "maps no tag")
    max_gap = r.raw("max_gap", None)
    if max_gap is not None:
        max_gap = r.integer("max_gap", 0)
    with _blamed(r.label, lambda message: r.fail("tags", message)):
        return ModbusSource(
            name,
            PymodbusClient(host, port, timeout_s=_number(r, "timeout_s", 1.0)),
            tags,
            clock=clock,
            max_registers=r.integer("max_registers", 125),
            max_bits=r.integer("max_bits", 2000),
            max_gap=max_gap,
            **_common(r),
        )


def _opcua(r: _SpecReader, name: str, start_ns: int, clock: DeviceClock | None) -> SignalSource:
    from fleetloop_agent.sources.opcua import TIMESTAMPS, OpcUaSource, UaNode

    url = r.string("url")
    if not url.startswith("opc.tcp://"):
        raise r.fail("url", f"expected opc.tcp://HOST:PORT/PATH, got {url!r}")
    nodes = []
    for node_id, raw in _mapping_of(r, "nodes", "node id").items():
        t = _target(r, "nodes", f"node {node_id!r}", raw)
        nodes.append(UaNode(node_id, t.signal, t.data_type, t.unit))
    if not nodes:
        raise r.fail("nodes", "maps no node")
    return OpcUaSource(
        name,
        url,
        nodes,
        clock=clock,
        timestamps=r.string("timestamps", "server", choices=TIMESTAMPS),
        publishing_ms=_number(r, "publishing_ms", 100),
        sampling_ms=_number(r, "sampling_ms", 50, positive=False),  # 0: as fast as the server samples
        timeout_s=_number(r, "timeout_s", 4.0),
        **_common(r),
    )


def _fields(r: _SpecReader, key: str, label: str, raw: Any) -> list[Field]:
    if not isinstance(raw, Mapping) or not raw:
        raise r.fail(key, f"{label}: expected a mapping of JSON path: {{signal, type, unit}}")
    fields = []
    for path, target in raw.items():
        try:
            extractor = path_extractor(str(path))
        except ConfigError as exc:
            raise r.fail(key, f"{label}: {exc.message}") from None
        fields.append(Field(str(path), extractor, _target(r, key, f"{label}: {path}", target)))
    return fields


def _mqtt_json(r: _SpecReader, name: str, start_ns: int, clock: DeviceClock | None) -> SignalSource:
    from fleetloop_agent.sources.mqtt_json import BrokerSettings, MqttJsonSource

    def optional_path(key: str) -> Path | None:
        return r.path(key, must_be="file") if r.raw(key, None) is not None else None

    username = r.raw("username", None)
    password = r.raw("password", None)
    if username is not None and not isinstance(username, str):
        raise r.fail("username", "expected a string")
    if password is not None and not isinstance(password, str):
        raise r.fail("password", "expected a string")
    broker = BrokerSettings(
        host=r.string("host", "127.0.0.1"),
        port=r.integer("port", 1883),
        username=username,
        password=password,
        ca=optional_path("ca"),
        cert=optional_path("cert"),
        key=optional_path("key"),
        client_id=r.string("client_id", f"fleetloop-{name}"),
    )
    topics: dict[str, list[Field]] = {}
    for topic, raw in _mapping_of(r, "topics", "topic").items():
        if any(c in topic for c in "+#"):
            raise r.fail("topics", f"topic {topic!r}: wildcards are not mapped (name each topic)")
        topics[topic] = _fields(r, "topics", f"topic {topic!r}", raw)
    z2m = r.raw("zigbee2mqtt", None)
    if z2m is not None:
        z = _Nested(r, "zigbee2mqtt", "zigbee2mqtt", z2m, ("base_topic", "devices"))
        base = z.string("base_topic", "zigbee2mqtt").rstrip("/")
        devices = z.get("devices", {})
        if not isinstance(devices, Mapping) or not devices:
            raise z.fail("key 'devices': expected a mapping of friendly name: {JSON path: signal}")
        for device, raw in devices.items():
            topics[f"{base}/{device}"] = _fields(r, "zigbee2mqtt", f"device {device!r}", raw)
    discovery = r.raw("discovery", None)
    prefix = None
    entities: dict[str, Target] = {}
    if discovery is not None:
        d = _Nested(r, "discovery", "discovery", discovery, ("prefix", "entities"))
        prefix = d.string("prefix", "homeassistant")
        raw_entities = d.get("entities", {})
        if not isinstance(raw_entities, Mapping) or not raw_entities:
            raise d.fail("key 'entities': expected a mapping of unique_id: {signal, type, unit}")
        for key, raw in raw_entities.items():
            entities[str(key)] = _target(r, "discovery", f"entity {key!r}", raw)
    if not topics and not entities:
        raise r.fail("topics", "maps nothing (give topics, zigbee2mqtt devices or discovery entities)")
    with _blamed(r.label, lambda message: r.fail("topics", message)):
        return MqttJsonSource(
            name, broker, topics, discovery_prefix=prefix, entities=entities, clock=clock, **_common(r)
        )


def _push_api(r: _SpecReader, name: str, start_ns: int, clock: DeviceClock | None) -> SignalSource:
    from fleetloop_agent.sources.push_api import PushApiSource, PushSignal

    path = r.path("socket", must_be="any")
    mode = r.raw("socket_mode", "0660")
    try:
        socket_mode = int(mode, 8) if isinstance(mode, str) else int(mode)
    except ValueError:
        raise r.fail("socket_mode", f"expected an octal mode like '0660', got {mode!r}") from None
    signals = []
    for path_name, raw in _mapping_of(r, "signals", "signal").items():
        n = _Nested(
            r, "signals", f"signal {path_name!r}", raw if raw is not None else {}, ("type", "unit", "group")
        )
        signals.append(PushSignal(path_name, n.data_type(), n.string("unit", ""), n.string("group", "")))
    if not signals:
        raise r.fail("signals", "lists no signal")
    return PushApiSource(
        name,
        path,
        signals,
        clock=clock,
        socket_mode=socket_mode,
        workers=max(1, r.integer("workers", 2)),
        **_common(r),
    )


def _ros_replay(r: _SpecReader, name: str, start_ns: int, clock: DeviceClock | None) -> SignalSource:
    from fleetloop_agent.sources.ros_replay import RosReplaySource

    path = r.path("path", must_be="existing")
    mapping: dict[str, tuple[str, str]] = {}
    for key, target in r.mapping("mapping", {}).items():
        if isinstance(target, str) and target:
            mapping[str(key)] = (target, "")
        elif (
            isinstance(target, list | tuple)
            and len(target) == 2
            and all(isinstance(x, str) for x in target)
            and target[0]
        ):
            mapping[str(key)] = (target[0], target[1])
        else:
            raise r.fail(
                "mapping", f"entry {key!r} must be a signal path or [signal path, unit], got {target!r}"
            )
    return RosReplaySource(
        path,
        start_ns=start_ns,
        mapping=mapping,
        include_unmapped=r.boolean("include_unmapped", False),
        name=name,
        origin=r.string("origin", "recordings", choices=ORIGINS),
    )


Builder = Callable[["_SpecReader", str, int, "DeviceClock | None"], SignalSource]
BUILDERS: Final[dict[str, Builder]] = {
    "modbus_tcp": _modbus,
    "opcua": _opcua,
    "mqtt_json": _mqtt_json,
    "push_api": _push_api,
    "ros_replay": _ros_replay,
}
