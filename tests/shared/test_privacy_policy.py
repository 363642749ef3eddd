"""The privacy core: geometry, keyed hashing and a policy applied to a capture's batches (pure)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleetloop_shared.catalog import Catalog, DataType, SignalSpec
from fleetloop_shared.privacy import (
    KeyRing,
    MinSpeed,
    Polygon,
    PositionCoarsening,
    PrivacyPolicy,
    apply_policy,
    derive_key,
    hash_identifier,
    is_hashed,
)
from fleetloop_shared.privacy.geo import geohash, geohash_cell, geohash_centre, snap_to_grid
from fleetloop_shared.privacy.policy import DEFAULT_LATITUDE, DEFAULT_LONGITUDE, PolicyStamp
from fleetloop_shared.samples import GroupBatch

SECRET = b"s" * 32
DAY_NS = 86_400 * 10**9
lon_st = st.floats(-179.0, 179.0)
lat_st = st.floats(-89.0, 89.0)


def _square(x0: float, y0: float, x1: float, y1: float) -> tuple[tuple[float, float], ...]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


# -- geometry ---------------------------------------------------------------------------------------


@given(lon_st, lat_st, st.floats(0.01, 5), st.floats(0.01, 5), lon_st, lat_st)
def test_a_point_is_inside_a_rectangle_exactly_when_within_its_bounds(
    x0: float, y0: float, w: float, h: float, x: float, y: float
) -> None:
    rect = Polygon((_square(x0, y0, x0 + w, y0 + h),))
    margin = 1e-9
    strictly_in = x0 + margin < x < x0 + w - margin and y0 + margin < y < y0 + h - margin
    strictly_out = not (x0 - margin <= x <= x0 + w + margin and y0 - margin <= y <= y0 + h + margin)
    assume(strictly_in or strictly_out)
    assert rect.contains(x, y) == strictly_in


@given(st.floats(-1.9, 1.9), st.floats(-1.9, 1.9))
def test_a_hole_is_outside(x: float, y: float) -> None:
    donut = Polygon((_square(-2, -2, 2, 2), _square(-1, -1, 1, 1)))
    in_hole = -1 < x < 1 and -1 < y < 1
    on_edge = max(abs(x), abs(y)) in (1.0,)
    assume(not on_edge)
    assert donut.contains(x, y) == (not in_hole)


@given(st.floats(0, 1), st.floats(0, 1))
def test_points_on_edges_and_vertices_count_as_inside(t: float, u: float) -> None:
    tri = Polygon((((0.0, 0.0), (4.0, 0.0), (0.0, 4.0)),))
    assert tri.contains(4 * t, 0.0) and tri.contains(0.0, 4 * u) and tri.contains(0.0, 0.0)
    assert not tri.contains(float("nan"), 1.0)


@given(st.floats(-1e4, 1e4), st.sampled_from([0.001, 0.01, 0.5, 1.0]))
def test_grid_snapping_keeps_within_half_a_cell_and_is_idempotent(v: float, step: float) -> None:
    snapped = snap_to_grid(v, step)
    assert abs(snapped - v) <= step / 2 + 1e-9
    assert snap_to_grid(snapped, step) == snapped


@given(lat_st, lon_st, st.integers(1, 12))
def test_a_geohash_cell_holds_its_point_and_its_centre_hashes_alike(lat: float, lon: float, p: int) -> None:
    code = geohash(lat, lon, p)
    lat_lo, lat_hi, lon_lo, lon_hi = geohash_cell(code)
    assert lat_lo <= lat <= lat_hi and lon_lo <= lon <= lon_hi
    assert geohash(*geohash_centre(lat, lon, p), p) == code


def test_a_known_geohash() -> None:
    assert geohash(57.64911, 10.40744, 11) == "u4pruydqqvj"  # the format's own published example


# -- keyed hashing ----------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40), st.integers(0, 10_000))
def test_hashes_are_stable_per_fleet_and_period_and_differ_across_them(vin: str, period: int) -> None:
    a = derive_key(SECRET, "fleet-a", period)
    assert hash_identifier(a, vin) == hash_identifier(derive_key(SECRET, "fleet-a", period), vin)
    digest = hash_identifier(a, vin).rsplit(":", 1)[1]
    assert digest != hash_identifier(derive_key(SECRET, "fleet-b", period), vin).rsplit(":", 1)[1]
    assert digest != hash_identifier(derive_key(SECRET, "fleet-a", period + 1), vin).rsplit(":", 1)[1]
    assert is_hashed(hash_identifier(a, vin)) and not is_hashed(vin)


def test_the_key_ring_picks_the_key_of_the_period_and_stays_bounded() -> None:
    keys = [derive_key(SECRET, "f", p, period_s=86_400) for p in range(20)]
    ring = KeyRing(keys, max_keys=3)
    assert len(ring) == 3 and ring.for_time(19 * DAY_NS + 5) == keys[19]
    assert ring.for_time(2 * DAY_NS) is None  # forgotten: the oldest go first


def test_a_stamp_reads_back() -> None:
    for stamp in (PolicyStamp("eu-cars", 3, "p7-abcd"), PolicyStamp("x.y", 1)):
        assert PolicyStamp.parse(stamp.text()) == stamp
    assert PolicyStamp.parse("") is None and PolicyStamp.parse("a@b") is None


# -- a policy applied -------------------------------------------------------------------------------


def _catalog() -> Catalog:
    paths = [
        ("Vehicle.Speed", DataType.FLOAT64),
        ("Vehicle.VehicleIdentification.VIN", DataType.STRING),
        (DEFAULT_LATITUDE, DataType.FLOAT64),
        (DEFAULT_LONGITUDE, DataType.FLOAT64),
        ("Vehicle.Cabin.Microphone", DataType.FLOAT64),
    ]
    return Catalog(SignalSpec(i, path, dtype) for i, (path, dtype) in enumerate(paths))


VIN = "WVWZZZ1JZXW000001"
FENCE = Polygon((_square(11.0, 48.0, 11.1, 48.1),))


def _capture(lats: list[float], lons: list[float], speeds: list[float]) -> list[GroupBatch]:
    n = len(lats)
    t = np.arange(n, dtype=np.int64) * 500_000_000 + 10 * DAY_NS
    gps = GroupBatch("gps", t, {2: np.array(lats), 3: np.array(lons)})
    can = GroupBatch("can", t + 1, {0: np.array(speeds, np.float64), 4: np.ones(n)})
    vin = GroupBatch("obd/VIN", t[:1], {1: np.array([VIN], dtype=object)})
    return [gps, can, vin]


def _ring() -> KeyRing:
    return KeyRing([derive_key(SECRET, "fleet-a", p, period_s=86_400) for p in (9, 10, 11)])


def test_drop_and_hash() -> None:
    policy = PrivacyPolicy("p", 2, drop=("Vehicle.Cabin.*",), hash=("Vehicle.VehicleIdentification.VIN",))
    out = apply_policy(policy, _capture([1.0], [1.0], [5.0]), _catalog(), _ring(), 10 * DAY_NS + 1)
    assert out.batches is not None
    ids = {sid for b in out.batches for sid in b.values}
    assert 4 not in ids and out.redacted.dropped_signals == 1
    (vin,) = [b.values[1][0] for b in out.batches if 1 in b.values]
    assert vin == hash_identifier(derive_key(SECRET, "fleet-a", 10, period_s=86_400), VIN)
    assert out.stamp.key_id.startswith("p10-") and (out.stamp.name, out.stamp.version) == ("p", 2)


def test_without_a_key_for_the_time_identifiers_are_dropped_not_kept() -> None:
    policy = PrivacyPolicy("p", 1, hash=("Vehicle.VehicleIdentification.VIN",))
    out = apply_policy(policy, _capture([1.0], [1.0], [5.0]), _catalog(), KeyRing(), 10 * DAY_NS)
    assert out.batches is not None and all(1 not in b.values for b in out.batches)
    assert out.redacted.unkeyed_signals == 1 and out.stamp.key_id == ""


def test_a_capture_touching_a_geofence_is_suppressed_whole() -> None:
    policy = PrivacyPolicy("p", 1, geofences=(FENCE,))
    inside = apply_policy(policy, _capture([47.0, 48.05], [11.0, 11.05], [9, 9]), _catalog(), _ring(), 0)
    assert inside.suppressed
    outside = apply_policy(policy, _capture([47.0, 47.5], [11.0, 11.05], [9, 9]), _catalog(), _ring(), 0)
    assert not outside.suppressed


def test_scope_positions_removes_only_the_positions_inside() -> None:
    policy = PrivacyPolicy("p", 1, geofences=(FENCE,), suppress_scope="positions")
    out = apply_policy(
        policy, _capture([47.0, 48.05, 47.5], [11.0, 11.05, 11.0], [9, 9, 9]), _catalog(), _ring(), 0
    )
    assert out.batches is not None and out.redacted.removed_positions == 1
    lats = np.concatenate([b.values[2] for b in out.batches if 2 in b.values])
    assert list(lats) == [47.0, 47.5]
    speeds = np.concatenate([b.values[0] for b in out.batches if 0 in b.values])
    assert len(speeds) == 3  # the other signals of the capture keep every sample


def test_min_speed_keeps_positions_only_while_moving_fast_enough() -> None:
    policy = PrivacyPolicy("p", 1, min_speed=MinSpeed("Vehicle.Speed", 10.0))
    # positions at t, speeds at t+1: the first position has no speed before it yet
    out = apply_policy(policy, _capture([1, 2, 3, 4], [1, 2, 3, 4], [20, 20, 3, 30]), _catalog(), _ring(), 0)
    assert out.batches is not None
    lats = np.concatenate([b.values[2] for b in out.batches if 2 in b.values])
    assert list(lats) == [2.0, 3.0] and out.redacted.removed_positions == 2  # speeds before: none, 20, 20, 3


def test_coarsening_positions_and_time() -> None:
    policy = PrivacyPolicy(
        "p", 1, coarsen_position=PositionCoarsening(grid_deg=0.1), coarsen_time_ns=1_000_000_000
    )
    out = apply_policy(policy, _capture([48.123, 48.149], [11.51, 11.59], [1, 1]), _catalog(), _ring(), 0)
    assert out.batches is not None
    gps = next(b for b in out.batches if 2 in b.values)
    assert np.allclose(gps.values[2], [48.15, 48.15]) and np.allclose(gps.values[3], [11.55, 11.55])
    assert all(int(t) % 1_000_000_000 == 0 for b in out.batches for t in b.t_ns)
    geo = PrivacyPolicy("p", 1, coarsen_position=PositionCoarsening(geohash=5))
    out = apply_policy(geo, _capture([48.123], [11.51], [1]), _catalog(), _ring(), 0)
    assert out.batches is not None
    gps = next(b for b in out.batches if 2 in b.values)
    assert (float(gps.values[2][0]), float(gps.values[3][0])) == geohash_centre(48.123, 11.51, 5)


def test_a_latitude_without_its_longitude_is_not_kept() -> None:
    policy = PrivacyPolicy("p", 1, geofences=(FENCE,))
    batches = [GroupBatch("gps", np.array([1], np.int64), {2: np.array([48.05])})]
    out = apply_policy(policy, batches, _catalog(), _ring(), 0)
    assert out.batches == [] and out.redacted.unpaired_positions == 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(47.9, 48.2), st.floats(10.9, 11.2), st.floats(0, 40)), min_size=1, max_size=30
    ),
    st.sampled_from(["capture", "positions"]),
    st.text(min_size=1, max_size=20),
)
def test_nothing_the_policy_forbids_survives(
    rows: list[tuple[float, float, float]], scope: str, vin: str
) -> None:
    policy = PrivacyPolicy(
        "p", 1, drop=("Vehicle.Cabin.*",), hash=("Vehicle.VehicleIdentification.VIN",), geofences=(FENCE,),
        suppress_scope=scope, min_speed=MinSpeed("Vehicle.Speed", 10.0),
    )  # fmt: skip
    lats, lons, speeds = ([r[i] for r in rows] for i in range(3))
    batches = _capture(lats, lons, speeds)
    batches[2].values[1][0] = vin
    out = apply_policy(policy, batches, _catalog(), _ring(), 10 * DAY_NS)
    if out.batches is None:
        assert scope == "capture" and any(FENCE.contains(x, y) for y, x in zip(lats, lons, strict=True))
        return
    for b in out.batches:
        assert 4 not in b.values
        if 1 in b.values:
            assert all(is_hashed(v) and v != vin for v in b.values[1])
        if 2 in b.values:
            assert not any(FENCE.contains(x, y) for y, x in zip(b.values[2], b.values[3], strict=True))
