"""``spec.privacy`` of a campaign document: read into a :class:`PrivacyPolicy`, every mistake with its
position. The campaign reader hands over its field readers, so errors look like the rest of the
document's (``FILE:LINE:COL: reason``) and the same rules about tags, duplicates and unknown keys hold.

    privacy:
      name: eu-cars            # default: the campaign's name
      version: 3               # default: 1
      drop: [Vehicle.Cabin.Microphone.*]
      hash: [Vehicle.VehicleIdentification.VIN]
      positions:               # which signals are the position (defaults: VSS CurrentLocation)
        latitude: Vehicle.CurrentLocation.Latitude
        longitude: Vehicle.CurrentLocation.Longitude
        min_speed: {signal: Vehicle.Speed, value: 10}
      coarsen:
        position: {grid: 0.01}   # or {geohash: 6}
        time: 1s
      suppress:
        scope: capture           # or positions
        geofences: [GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection, ...]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import RuleError
from fleetloop_shared.privacy.geo import MAX_GEOHASH_PRECISION, Polygon, Ring
from fleetloop_shared.privacy.policy import (
    DEFAULT_LATITUDE,
    DEFAULT_LONGITUDE,
    SUPPRESS_SCOPES,
    MinSpeed,
    PositionCoarsening,
    PrivacyPolicy,
)
from fleetloop_shared.rules.durations import UNIT_NS

_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
_POLICY_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,61}[a-z0-9])?")
#: Bounds of what a policy may ask: a time step over a day or a geofence of more vertices is a mistake.
MAX_TIME_STEP_NS = 24 * UNIT_NS["h"]
MAX_GEOFENCES = 256
MAX_VERTICES = 10_000
_WHERE = "spec.privacy"


class FieldReader(Protocol):
    """What the campaign reader lends: typed field readers that raise positioned errors."""

    def _error(self, message: str, node: Node | None) -> RuleError: ...
    def _mapping(
        self, node: Node, where: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> dict[str, tuple[Node, Node]]: ...
    def _scalar(self, node: Node, where: str) -> str: ...
    def _string(self, node: Node, where: str) -> str: ...
    def _integer(self, node: Node, where: str, low: int, high: int) -> int: ...
    def _duration(self, node: Node, where: str, maximum: int) -> int: ...
    def _list_of_strings(self, node: Node, where: str) -> list[tuple[str, Node]]: ...
    def _check_tag(self, node: Node, where: str) -> None: ...


def read_privacy(r: FieldReader, node: Node, campaign: str, catalog: Catalog | None) -> PrivacyPolicy:
    """The policy of ``spec.privacy`` (``node``); ``catalog``, when known, checks what it names."""
    fields = r._mapping(node, _WHERE, ("name", "version", "drop", "hash", "positions", "coarsen", "suppress"))
    name = campaign
    if "name" in fields:
        name_node = fields["name"][1]
        name = r._string(name_node, f"{_WHERE}.name")
        if not _POLICY_NAME.fullmatch(name):
            raise r._error(
                f"{_WHERE}.name {name!r} must be lowercase letters, digits, '-' or '.' (at most 63)",
                name_node,
            )
    version = 1
    if "version" in fields:
        version = r._integer(fields["version"][1], f"{_WHERE}.version", 1, 2**63 - 1)
    drop = _patterns(r, fields, "drop")
    hashed = _patterns(r, fields, "hash")
    if catalog is not None and "hash" in fields:
        for spec in catalog.match(hashed):
            if spec.data_type != DataType.STRING:
                raise r._error(
                    f"{_WHERE}.hash: {spec.path} is {spec.data_type.name.lower()}, not text; only text "
                    "identifiers can be hashed (drop it instead)",
                    fields["hash"][1],
                )
    latitude, longitude, min_speed = DEFAULT_LATITUDE, DEFAULT_LONGITUDE, None
    if "positions" in fields:
        latitude, longitude, min_speed = _positions(r, fields["positions"][1])
    coarsen_position, coarsen_time = None, 0
    if "coarsen" in fields:
        coarsen_position, coarsen_time = _coarsen(r, fields["coarsen"][1])
    fences: tuple[Polygon, ...] = ()
    scope = "capture"
    if "suppress" in fields:
        fences, scope = _suppress(r, fields["suppress"][1])
    return PrivacyPolicy(
        name=name, version=version, drop=drop, hash=hashed, latitude=latitude, longitude=longitude,
        coarsen_position=coarsen_position, coarsen_time_ns=coarsen_time, geofences=fences,
        suppress_scope=scope, min_speed=min_speed,
    )  # fmt: skip


def _patterns(r: FieldReader, fields: dict[str, tuple[Node, Node]], key: str) -> tuple[str, ...]:
    if key not in fields:
        return ()
    where = f"{_WHERE}.{key}"
    items = r._list_of_strings(fields[key][1], where)
    for value, item in items:
        if not _PATTERN.fullmatch(value):
            raise r._error(f"{where}: {value!r} is not a signal path or glob", item)
    return tuple(dict.fromkeys(value for value, _ in items))


def _signal(r: FieldReader, node: Node, where: str) -> str:
    value = r._string(node, where)
    if not _PATTERN.fullmatch(value) or any(c in value for c in "*?[]!"):
        raise r._error(f"{where}: {value!r} is not a signal path", node)
    return value


def _number(r: FieldReader, node: Node, where: str, low: float, high: float) -> float:
    text = r._scalar(node, where).strip()
    quoted = isinstance(node, ScalarNode) and node.style is not None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if quoted or not math.isfinite(value):
        raise r._error(f"{where} must be a number, got {text!r}", node)
    if not low <= value <= high:
        raise r._error(f"{where} must be between {low:g} and {high:g}, got {value:g}", node)
    return value


def _positions(r: FieldReader, node: Node) -> tuple[str, str, MinSpeed | None]:
    where = f"{_WHERE}.positions"
    fields = r._mapping(node, where, ("latitude", "longitude", "min_speed"))
    lat = _signal(r, fields["latitude"][1], f"{where}.latitude") if "latitude" in fields else DEFAULT_LATITUDE
    lon = (
        _signal(r, fields["longitude"][1], f"{where}.longitude")
        if "longitude" in fields
        else DEFAULT_LONGITUDE
    )
    if lat == lon:
        raise r._error(f"{where}: latitude and longitude must be different signals", node)
    min_speed = None
    if "min_speed" in fields:
        ms = r._mapping(
            fields["min_speed"][1], f"{where}.min_speed", ("signal", "value"), ("signal", "value")
        )
        min_speed = MinSpeed(
            _signal(r, ms["signal"][1], f"{where}.min_speed.signal"),
            _number(r, ms["value"][1], f"{where}.min_speed.value", 0.0, 1e6),
        )
    return lat, lon, min_speed


def _coarsen(r: FieldReader, node: Node) -> tuple[PositionCoarsening | None, int]:
    where = f"{_WHERE}.coarsen"
    fields = r._mapping(node, where, ("position", "time"))
    position = None
    if "position" in fields:
        pnode = fields["position"][1]
        pf = r._mapping(pnode, f"{where}.position", ("grid", "geohash"))
        if len(pf) != 1:
            raise r._error(
                f"{where}.position needs exactly one of grid (degrees) or geohash (characters)", pnode
            )
        if "grid" in pf:
            position = PositionCoarsening(
                grid_deg=_number(r, pf["grid"][1], f"{where}.position.grid", 1e-6, 90.0)
            )
        else:
            position = PositionCoarsening(
                geohash=r._integer(pf["geohash"][1], f"{where}.position.geohash", 1, MAX_GEOHASH_PRECISION)
            )
    step = 0
    if "time" in fields:
        step = r._duration(fields["time"][1], f"{where}.time", MAX_TIME_STEP_NS)
    return position, step


def _suppress(r: FieldReader, node: Node) -> tuple[tuple[Polygon, ...], str]:
    where = f"{_WHERE}.suppress"
    fields = r._mapping(node, where, ("scope", "geofences"), ("geofences",))
    scope = "capture"
    if "scope" in fields:
        scope_node = fields["scope"][1]
        scope = check_choice(
            r._scalar(scope_node, f"{where}.scope"),
            SUPPRESS_SCOPES,
            f"{where}.scope",
            error=lambda message: r._error(message, scope_node),
        )
    fences_node = fields["geofences"][1]
    items = fences_node.value if isinstance(fences_node, SequenceNode) else [fences_node]
    polygons: list[Polygon] = []
    for i, item in enumerate(items):
        polygons.extend(_geojson(r, item, f"{where}.geofences[{i}]"))
    if not polygons:
        raise r._error(f"{where}.geofences must hold at least one polygon", fences_node)
    if len(polygons) > MAX_GEOFENCES:
        raise r._error(
            f"{where}.geofences: at most {MAX_GEOFENCES} polygons, got {len(polygons)}", fences_node
        )
    return tuple(polygons), scope


def _geojson(r: FieldReader, node: Node, where: str) -> list[Polygon]:
    """Polygons of a GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection."""
    if not isinstance(node, MappingNode):
        raise r._error(
            f"{where} must be a GeoJSON object (Polygon, MultiPolygon, Feature, FeatureCollection)", node
        )
    keys = tuple(k.value for k, _ in node.value if isinstance(k, ScalarNode))
    fields = r._mapping(node, where, keys, ("type",))
    kind_node = fields["type"][1]
    kind = r._scalar(kind_node, f"{where}.type")
    if kind == "FeatureCollection":
        feats = _sequence(r, fields, "features", where, node)
        return [p for i, f in enumerate(feats) for p in _geojson(r, f, f"{where}.features[{i}]")]
    if kind == "Feature":
        if "geometry" not in fields:
            raise r._error(f"missing required field '{where}.geometry'", node)
        return _geojson(r, fields["geometry"][1], f"{where}.geometry")
    if kind == "Polygon":
        return [_polygon(r, _sequence(r, fields, "coordinates", where, node), f"{where}.coordinates", node)]
    if kind == "MultiPolygon":
        coords = _sequence(r, fields, "coordinates", where, node)
        out = []
        for i, poly in enumerate(coords):
            inner = f"{where}.coordinates[{i}]"
            if not isinstance(poly, SequenceNode):
                raise r._error(f"{inner} must be a list of rings", poly)
            out.append(_polygon(r, poly.value, inner, poly))
        return out
    raise r._error(
        f"{where}.type must be Polygon, MultiPolygon, Feature or FeatureCollection, got {kind!r}", kind_node
    )


def _sequence(
    r: FieldReader, fields: dict[str, tuple[Node, Node]], key: str, where: str, parent: Node
) -> list[Node]:
    if key not in fields:
        raise r._error(f"missing required field '{where}.{key}'", parent)
    node = fields[key][1]
    if not isinstance(node, SequenceNode):
        raise r._error(f"{where}.{key} must be a list", node)
    r._check_tag(node, f"{where}.{key}")
    return list(node.value)


def _polygon(r: FieldReader, rings: list[Node], where: str, node: Node) -> Polygon:
    if not rings:
        raise r._error(f"{where} must hold the polygon's outline", node)
    out: list[Ring] = []
    vertices = 0
    for i, ring_node in enumerate(rings):
        inner = f"{where}[{i}]"
        if not isinstance(ring_node, SequenceNode):
            raise r._error(f"{inner} must be a ring: a list of [longitude, latitude]", ring_node)
        ring: list[tuple[float, float]] = []
        for j, point in enumerate(ring_node.value):
            at = f"{inner}[{j}]"
            if not isinstance(point, SequenceNode) or len(point.value) not in (2, 3):
                raise r._error(f"{at} must be [longitude, latitude]", point)
            lon = _number(r, point.value[0], f"{at} longitude", -180.0, 180.0)
            lat = _number(r, point.value[1], f"{at} latitude", -90.0, 90.0)
            ring.append((lon, lat))
        if len(ring) < 4 or ring[0] != ring[-1]:
            raise r._error(
                f"{inner} must be a closed ring of at least 4 positions (the last repeats the first)",
                ring_node,
            )
        vertices += len(ring)
        if vertices > MAX_VERTICES:
            raise r._error(f"{where}: more than {MAX_VERTICES} vertices", ring_node)
        out.append(tuple(ring[:-1]))
    return Polygon(tuple(out))
