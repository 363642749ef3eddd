"""``spec.privacy`` in campaign documents: what it reads, and each mistake with its position."""

from __future__ import annotations

import pytest

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import RuleError
from fleetloop_shared.privacy import PositionCoarsening
from fleetloop_shared.rules import check_against_catalog, parse_campaign

HEAD = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: trips, version: 4}
spec:
  trigger: {when: "Vehicle.Speed > 1"}
"""

FULL = (
    HEAD
    + """  privacy:
    name: eu-cars
    version: 3
    drop: [Vehicle.Cabin.*]
    hash: [Vehicle.VehicleIdentification.VIN]
    positions:
      min_speed: {signal: Vehicle.Speed, value: 10}
    coarsen:
      position: {geohash: 6}
      time: 1s
    suppress:
      scope: positions
      geofences:
        - type: Feature
          geometry:
            type: Polygon
            coordinates: [[[11.0, 48.0], [11.1, 48.0], [11.1, 48.1], [11.0, 48.1], [11.0, 48.0]]]
        - type: MultiPolygon
          coordinates:
            - [[[0, 0], [1, 0], [1, 1], [0, 0]]]
"""
)


def test_a_full_policy_is_read() -> None:
    p = parse_campaign(FULL, "trips.yaml").privacy
    assert p is not None
    assert (p.name, p.version) == ("eu-cars", 3)
    assert p.drop == ("Vehicle.Cabin.*",)
    assert p.hash == ("Vehicle.VehicleIdentification.VIN",)
    assert p.min_speed is not None and (p.min_speed.signal, p.min_speed.value) == ("Vehicle.Speed", 10.0)
    assert p.coarsen_position == PositionCoarsening(geohash=6)
    assert p.coarsen_time_ns == 1_000_000_000
    assert p.suppress_scope == "positions" and len(p.geofences) == 2
    assert p.geofences[0].contains(11.05, 48.05) and not p.geofences[0].contains(11.2, 48.05)


def test_defaults_name_the_campaign_and_version_one() -> None:
    p = parse_campaign(HEAD + "  privacy: {drop: [Vehicle.Cabin.*]}\n").privacy
    assert p is not None and (p.name, p.version, p.suppress_scope) == ("trips", 1, "capture")
    assert parse_campaign(HEAD).privacy is None


FENCE = "  privacy:\n    suppress:\n      geofences:\n        - {type: Polygon, coordinates: "


@pytest.mark.parametrize(
    ("privacy", "line", "col", "reason"),
    [
        ("  privacy: {dorp: [x]}\n", 6, 13, "unknown field 'spec.privacy.dorp'; did you mean 'drop'?"),
        ("  privacy: {hash: ['a b']}\n", 6, 20, "spec.privacy.hash: 'a b' is not a signal path or glob"),
        ("  privacy: {coarsen: {position: {grid: 0.1, geohash: 5}}}\n", 6, 33, "exactly one of grid"),
        ("  privacy: {coarsen: {position: {geohash: 13}}}\n", 6, 43, "between 1 and 12, got 13"),
        ("  privacy: {coarsen: {position: {grid: '0.1'}}}\n", 6, 40, "must be a number"),
        ("  privacy: {coarsen: {time: 25h}}\n", 6, 29, "may be at most 24h"),
        (
            "  privacy: {suppress: {scope: all, geofences: []}}\n",
            6, 31, "scope must be one of capture, positions, got 'all'",
        ),
        ("  privacy: {suppress: {geofences: []}}\n", 6, 35, "at least one polygon"),
        (
            FENCE + "[[[0, 0], [1, 0], [0, 0]]]}\n",
            9, 41, "closed ring of at least 4 positions",
        ),
        (
            FENCE + "[[[0, 0], [1, 95], [1, 1], [0, 0]]]}\n",
            9, 54, "latitude must be between -90 and 90",
        ),
        (
            "  privacy:\n    suppress:\n      geofences:\n        - {type: Point, coordinates: [0, 0]}\n",
            9, 18, "must be Polygon, MultiPolygon, Feature or FeatureCollection",
        ),
        ("  privacy: {positions: {min_speed: {signal: Vehicle.*, value: 3}}}\n", 6, 45, "not a signal path"),
        ("  privacy: {positions: {latitude: a, longitude: a}}\n", 6, 24, "must be different signals"),
    ],
)  # fmt: skip
def test_mistakes_name_file_line_and_column(privacy: str, line: int, col: int, reason: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_campaign(HEAD + privacy, "trips.yaml")
    err = info.value
    assert reason in err.reason, err.reason
    assert (err.source, err.line, err.col) == ("trips.yaml", line, col), str(err)


def test_on_the_device_only_text_identifiers_can_be_hashed() -> None:
    catalog = Catalog()
    catalog.add("Vehicle.Speed", DataType.FLOAT64)
    catalog.add("Vehicle.VehicleIdentification.VIN", DataType.STRING)
    catalog.add("Vehicle.Driver.Id", DataType.INT64)
    ok = parse_campaign(HEAD + "  privacy: {hash: [Vehicle.VehicleIdentification.VIN]}\n", "c.yaml")
    check_against_catalog(ok, catalog)
    bad = parse_campaign(HEAD + "  privacy: {hash: [Vehicle.Driver.Id]}\n", "c.yaml")
    with pytest.raises(RuleError) as info:
        check_against_catalog(bad, catalog)
    assert "Vehicle.Driver.Id is int64, not text" in info.value.reason
    assert (info.value.line, info.value.col) == (6, 19)
