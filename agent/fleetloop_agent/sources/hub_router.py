"""What a home hub's MQTT messages mean (pure: no broker, no paho; time passed in).

Three ways a signal is found, all ending in a JSON path into one topic's payloads:

* **topics**: any JSON topic, field paths mapped to signals;
* **zigbee2mqtt**: ``<base_topic>/<friendly name>`` per device (its JSON state: ``temperature``,
  ``humidity``, ``occupancy``, ``battery``, ...);
* **Home Assistant MQTT discovery**: ``<prefix>/<component>/[<node_id>/]<object_id>/config`` announces
  an entity's ``state_topic`` and ``value_template`` (abbreviated keys and ``~`` included); an entity the
  config maps (by ``unique_id``, ``component.object_id`` or ``object_id``) is followed on its state topic,
  an entity it does not map is ignored, an empty config removes it.

One topic's mapped fields form one group (a message's fields were read together). Malformed JSON, an
oversized payload, a value of the wrong type, a template outside the safe subset: each is reported and
counted, and drops only what it concerns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fleetloop_agent.sources.base import first_repeat
from fleetloop_agent.sources.json_paths import MISSING, Extractor, template_extractor
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError

#: Largest payload read (a zigbee2mqtt state is a few hundred bytes).
MAX_PAYLOAD_BYTES: Final = 64 * 1024
#: Home Assistant's abbreviations for the discovery keys read here.
_ABBREVIATIONS: Final = {
    "stat_t": "state_topic",
    "val_tpl": "value_template",
    "unit_of_meas": "unit_of_measurement",
    "uniq_id": "unique_id",
    "obj_id": "object_id",
    "pl_on": "payload_on",
    "pl_off": "payload_off",
    "cmps": "components",
    "p": "platform",
}
_TRUE: Final = frozenset({"on", "true", "1", "yes", "open", "detected"})
_FALSE: Final = frozenset({"off", "false", "0", "no", "closed", "clear"})


@dataclass(frozen=True)
class Target:
    """A signal a payload value feeds."""

    signal: str
    data_type: DataType = DataType.FLOAT64
    unit: str = ""


@dataclass(frozen=True)
class Field:
    """One mapped value of one topic: where it is and what it feeds (``on``/``off``: a binary
    sensor's announced payloads, matched before the usual spellings)."""

    key: str
    extractor: Extractor
    target: Target
    on: str | None = None
    off: str | None = None


@dataclass(frozen=True)
class Row:
    """One message's values for the agent: one row of one group (column set ``ids``)."""

    group: str
    ids: tuple[int, ...]
    t_ns: int
    values: tuple[Any, ...]


def convert(value: Any, data_type: DataType, on: str | None = None, off: str | None = None) -> Any:
    """``value`` as the catalog type, or raise ValueError saying why not."""
    if data_type is DataType.BOOL:
        if isinstance(value, bool):
            return value
        text = str(value).strip()
        if on is not None and text == on:
            return True
        if off is not None and text == off:
            return False
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if data_type is DataType.STRING:
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)  # numeric text too: plain state topics publish "21.5"
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if data_type is DataType.INT64:
        if not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    return number


def _expand(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Discovery keys unabbreviated and ``~`` substituted into topics."""
    out = {_ABBREVIATIONS.get(k, k): v for k, v in doc.items()}
    base = out.get("~")
    if isinstance(base, str):
        for k, v in list(out.items()):
            if k.endswith("_topic") and isinstance(v, str):
                if v.startswith("~"):
                    out[k] = base + v[1:]
                elif v.endswith("~"):
                    out[k] = v[:-1] + base
    return out


OnError = Callable[[str, str], None]


class HubRouter:
    """Maps a hub's MQTT messages to rows; keeps the discovered entities (only those the config maps)."""

    def __init__(
        self,
        source: str,
        topics: Mapping[str, list[Field]],
        *,
        discovery_prefix: str | None = None,
        entities: Mapping[str, Target] | None = None,
        on_error: OnError,
        max_payload: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        self.source = source
        self._static = {t: list(fs) for t, fs in topics.items()}
        self.discovery_prefix = discovery_prefix.rstrip("/") if discovery_prefix else None
        self.entities = dict(entities or {})
        self._on_error = on_error
        self.max_payload = max_payload
        signals = [f.target.signal for fs in self._static.values() for f in fs] + [
            t.signal for t in self.entities.values()
        ]
        dup = first_repeat(signals)
        if dup is not None:
            raise ConfigError(f"source {source!r}: signal {dup!r} is mapped twice")
        if self.entities and self.discovery_prefix is None:
            raise ConfigError(f"source {source!r}: discovery entities need a discovery prefix")
        #: entity key → (state topic, field) of discovered, mapped entities
        self._discovered: dict[str, tuple[str, Field]] = {}
        self._ids: dict[str, int] = {}
        #: messages whose payload was not JSON (or too large), counted and dropped
        self.malformed_total = 0
        #: discovery configs of entities the config does not map (ignored)
        self.ignored_total = 0

    def declare(self, catalog: Catalog) -> dict[int, str]:
        """Register every mapped signal; id → numpy dtype."""
        dtypes = {}
        targets = [f.target for fs in self._static.values() for f in fs] + list(self.entities.values())
        for t in targets:
            spec = catalog.add(t.signal, t.data_type, t.unit)
            self._ids[t.signal] = spec.id
            dtypes[spec.id] = t.data_type.numpy_dtype
        return dtypes

    def subscriptions(self) -> list[str]:
        """Every topic filter to subscribe to now (after a reconnect, all of them again)."""
        subs = list(self._static)
        subs += sorted({topic for topic, _ in self._discovered.values()} - set(subs))
        if self.discovery_prefix is not None:
            subs += [f"{self.discovery_prefix}/+/+/config", f"{self.discovery_prefix}/+/+/+/config"]
        return subs

    def _fields(self, topic: str) -> list[Field]:
        fields = list(self._static.get(topic, ()))
        fields += [f for t, f in self._discovered.values() if t == topic]
        return fields

    def on_message(self, topic: str, payload: bytes, t_ns: int) -> tuple[Row | None, list[str]]:
        """The row a message gives (None if nothing mapped or all dropped), and new topics to follow."""
        if (
            self.discovery_prefix is not None
            and topic.startswith(self.discovery_prefix + "/")
            and topic.endswith("/config")
        ):
            return None, self._on_discovery(topic, payload)
        fields = self._fields(topic)
        if not fields:
            return None, []
        if len(payload) > self.max_payload:
            self.malformed_total += 1
            self._on_error(
                f"size:{topic}", f"{topic}: {len(payload)}-byte payload exceeds {self.max_payload}, dropped"
            )
            return None, []
        try:
            raw = payload.decode("utf-8")
            doc = json.loads(raw) if any(f.extractor.needs_json for f in fields) else None
        except (UnicodeDecodeError, ValueError) as exc:
            self.malformed_total += 1
            self._on_error(f"json:{topic}", f"{topic}: malformed JSON dropped: {exc}")
            return None, []
        picked: dict[int, Any] = {}
        for f in fields:
            value = f.extractor.extract(doc, raw)
            if value is MISSING or value is None:
                continue
            try:
                picked[self._ids[f.target.signal]] = convert(value, f.target.data_type, f.on, f.off)
            except ValueError as exc:
                self._on_error(f"value:{topic}:{f.key}", f"{topic} {f.key}: {exc}; dropped")
        if not picked:
            return None, []
        ids = tuple(sorted(picked))
        return Row(f"{self.source}/{topic}", ids, t_ns, tuple(picked[i] for i in ids)), []

    def _on_discovery(self, topic: str, payload: bytes) -> list[str]:
        assert self.discovery_prefix is not None
        parts = topic[len(self.discovery_prefix) + 1 :].split("/")
        component, object_id = parts[0], parts[-2]
        if not payload:  # the entity was removed: forget what this config announced
            for k in [k for k, (_, f) in self._discovered.items() if f.key == topic]:
                del self._discovered[k]
            return []
        try:
            doc = json.loads(payload.decode("utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            self.malformed_total += 1
            self._on_error(f"json:{topic}", f"{topic}: malformed discovery config dropped: {exc}")
            return []
        config = _expand(doc)
        announced = [(component, object_id, config)]
        if component == "device" and isinstance(config.get("components"), dict):
            announced = [
                (str(c.get("platform", "")), str(cid), {**config, **_expand(c)})
                for cid, c in config["components"].items()
                if isinstance(c, dict)
            ]
        new: list[str] = []
        for comp, obj, cfg in announced:
            uid = cfg.get("unique_id")
            keys = ([str(uid)] if uid else []) + [f"{comp}.{obj}", obj]
            key = next((k for k in keys if k in self.entities), None)
            if key is None:
                self.ignored_total += 1
                continue
            state_topic = cfg.get("state_topic")
            if not isinstance(state_topic, str) or not state_topic:
                self._on_error(
                    f"entity:{key}", f"discovered entity {key!r} announces no state_topic; ignored"
                )
                continue
            template = cfg.get("value_template") or "{{ value }}"
            try:
                extractor = template_extractor(str(template))
            except ConfigError as exc:
                self._on_error(f"entity:{key}", f"discovered entity {key!r}: {exc}; ignored")
                continue
            target = self.entities[key]
            unit = cfg.get("unit_of_measurement")
            if unit and target.unit and unit != target.unit:
                self._on_error(
                    f"unit:{key}", f"entity {key!r} announces unit {unit!r}, the config says {target.unit!r}"
                )
            on, off = cfg.get("payload_on"), cfg.get("payload_off")
            field = Field(
                topic,
                extractor,
                target,
                str(on) if on is not None else None,
                str(off) if off is not None else None,
            )
            known = {t for t, _ in self._discovered.values()} | set(self._static)
            self._discovered[key] = (state_topic, field)
            if state_topic not in known:
                new.append(state_topic)
        return new
