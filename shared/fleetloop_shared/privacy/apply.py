"""Applying a privacy policy to one capture, on the device, before anything of it is stored. Pure.

In this order, so that every condition sees the raw data and nothing sensitive survives a step:

1. **suppress** — with scope ``capture``, a capture with any position inside a geofence is not kept at
   all; with scope ``positions``, only the positions inside are removed.
2. **min_speed** — positions are kept only while the speed signal (its latest sample at or before the
   position, in the capture) reaches the threshold; without such a sample the position goes.
3. **coarsen** positions to their grid or geohash cell's centre.
4. **drop** the signals the policy drops.
5. **hash** the identifiers with the fleet's key of the capture's period; with no key for that time they
   are dropped instead (fail closed: a clear identifier never waits in the store for a key).
6. **coarsen** every timestamp down to the time step.

Latitude and longitude are paired row by row within their group; a latitude or longitude without its
partner in the same group cannot be tested against a fence, so under a policy that touches positions it
is removed (fail closed) and counted in ``unpaired_positions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.privacy.geo import geohash_centre, inside_any, snap_to_grid
from fleetloop_shared.privacy.keys import KeyRing, PrivacyKey, hash_identifier
from fleetloop_shared.privacy.policy import PolicyStamp, PrivacyPolicy
from fleetloop_shared.samples import GroupBatch


@dataclass
class Redactions:
    """What policies took out: of one capture (counted while the policy is applied), or summed over many
    (the agent's running totals, mirrored into its metrics)."""

    dropped_signals: int = 0
    hashed_values: int = 0
    removed_positions: int = 0
    unpaired_positions: int = 0
    #: Identifiers dropped because no key covered the capture's time.
    unkeyed_signals: int = 0

    def add(self, other: Redactions) -> None:
        for f in fields(Redactions):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class Outcome:
    """What the policy made of one capture: its batches (None: the capture is suppressed), the stamp it
    is stored under, and what was taken out."""

    batches: list[GroupBatch] | None
    stamp: PolicyStamp
    redacted: Redactions = field(default_factory=Redactions)

    @property
    def suppressed(self) -> bool:
        return self.batches is None


def apply_policy(
    policy: PrivacyPolicy, batches: Sequence[GroupBatch], catalog: Catalog, keys: KeyRing, capture_ns: int
) -> Outcome:
    """``batches`` (one capture's) as ``policy`` lets them be stored; ``capture_ns`` (the fire's time)
    picks the hashing key."""
    tally = Redactions()
    lat_spec, lon_spec = catalog.get(policy.latitude), catalog.get(policy.longitude)
    lat = lat_spec.id if lat_spec is not None else -1
    lon = lon_spec.id if lon_spec is not None else -1
    work = list(batches)
    if policy.touches_positions:
        work = _unpair(work, lat, lon, tally)
        if policy.geofences and policy.suppress_scope == "capture" and _any_inside(policy, work, lat, lon):
            return Outcome(None, policy.stamp(), Redactions(removed_positions=_count_positions(work, lat)))
        speeds = _speed_series(policy, work, catalog)
        work = [part for b in work for part in _positions(policy, b, lat, lon, speeds, tally)]
    work = _drop(policy, work, catalog, tally)
    key = keys.for_time(capture_ns) if policy.hash else None
    work = _hash(policy, work, catalog, key, tally)
    if policy.coarsen_time_ns:
        step = policy.coarsen_time_ns
        work = [GroupBatch(b.group, (b.t_ns // step) * step, b.values) for b in work]
    kept = [b for b in work if b.values and len(b)]
    return Outcome(kept, policy.stamp(key.key_id if key is not None else ""), tally)


def _unpair(batches: list[GroupBatch], lat: int, lon: int, tally: Redactions) -> list[GroupBatch]:
    out = []
    for b in batches:
        has_lat, has_lon = lat in b.values, lon in b.values
        if has_lat != has_lon:
            lone = lat if has_lat else lon
            tally.unpaired_positions += len(b)
            b = GroupBatch(b.group, b.t_ns, {k: v for k, v in b.values.items() if k != lone})
        out.append(b)
    return out


def _count_positions(batches: list[GroupBatch], lat: int) -> int:
    return sum(len(b) for b in batches if lat in b.values)


def _any_inside(policy: PrivacyPolicy, batches: list[GroupBatch], lat: int, lon: int) -> bool:
    for b in batches:
        if lat in b.values:
            lats, lons = b.values[lat].astype(np.float64), b.values[lon].astype(np.float64)
            if any(inside_any(policy.geofences, float(x), float(y)) for x, y in zip(lons, lats, strict=True)):
                return True
    return False


def _speed_series(
    policy: PrivacyPolicy, batches: list[GroupBatch], catalog: Catalog
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]] | None:
    """Every sample of the speed signal in the capture, by time (None when the policy has no min_speed)."""
    if policy.min_speed is None:
        return None
    spec = catalog.get(policy.min_speed.signal)
    times: list[npt.NDArray[np.int64]] = []
    values: list[npt.NDArray[np.float64]] = []
    if spec is not None and spec.data_type != DataType.STRING:
        for b in batches:
            if spec.id in b.values:
                times.append(b.t_ns)
                values.append(b.values[spec.id].astype(np.float64))
    if not times:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    t, v = np.concatenate(times), np.concatenate(values)
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def _positions(
    policy: PrivacyPolicy,
    b: GroupBatch,
    lat: int,
    lon: int,
    speeds: tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]] | None,
    tally: Redactions,
) -> list[GroupBatch]:
    """``b`` with its positions filtered (fences of scope ``positions``, min_speed) and coarsened; the
    position columns move to a batch of their own when rows go, so the other columns keep every row."""
    if lat not in b.values:
        return [b]
    lats, lons = b.values[lat].astype(np.float64), b.values[lon].astype(np.float64)
    keep = np.ones(len(b), dtype=bool)
    if policy.geofences and policy.suppress_scope == "positions":
        inside = [inside_any(policy.geofences, float(x), float(y)) for x, y in zip(lons, lats, strict=True)]
        keep &= ~np.asarray(inside, dtype=bool)
    if speeds is not None and policy.min_speed is not None:
        st, sv = speeds
        at = np.searchsorted(st, b.t_ns, side="right") - 1
        known = at >= 0
        fast = np.zeros(len(b), dtype=bool)
        fast[known] = sv[at[known]] >= policy.min_speed.value
        keep &= fast
    tally.removed_positions += int(len(b) - keep.sum())
    lats, lons = _coarsen(policy, lats[keep], lons[keep])
    rest = {k: v for k, v in b.values.items() if k not in (lat, lon)}
    if keep.all():
        return [GroupBatch(b.group, b.t_ns, {**rest, lat: lats, lon: lons})]
    return [GroupBatch(b.group, b.t_ns, rest), GroupBatch(b.group, b.t_ns[keep], {lat: lats, lon: lons})]


def _coarsen(
    policy: PrivacyPolicy, lats: npt.NDArray[np.float64], lons: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    c = policy.coarsen_position
    if c is None:
        return lats, lons
    if c.grid_deg is not None:
        step = c.grid_deg
        return (
            np.array([snap_to_grid(float(x), step) for x in lats], np.float64),
            np.array([snap_to_grid(float(x), step) for x in lons], np.float64),
        )
    assert c.geohash is not None
    out_lat, out_lon = np.empty_like(lats), np.empty_like(lons)
    for i, (y, x) in enumerate(zip(lats, lons, strict=True)):
        if np.isfinite(y) and np.isfinite(x):
            out_lat[i], out_lon[i] = geohash_centre(float(y), float(x), c.geohash)
        else:
            out_lat[i], out_lon[i] = np.nan, np.nan
    return out_lat, out_lon


def _drop(
    policy: PrivacyPolicy, batches: list[GroupBatch], catalog: Catalog, tally: Redactions
) -> list[GroupBatch]:
    dropped = {s.id for s in catalog.match(policy.drop)} if policy.drop else set()
    out = []
    for b in batches:
        gone = dropped & b.values.keys()
        tally.dropped_signals += len(gone)
        out.append(GroupBatch(b.group, b.t_ns, {k: v for k, v in b.values.items() if k not in gone}))
    return out


def _hash(
    policy: PrivacyPolicy,
    batches: list[GroupBatch],
    catalog: Catalog,
    key: PrivacyKey | None,
    tally: Redactions,
) -> list[GroupBatch]:
    if not policy.hash:
        return batches
    targets = {s.id: s for s in catalog.match(policy.hash)}
    out = []
    for b in batches:
        values = dict(b.values)
        for sid in targets.keys() & values.keys():
            if key is None or targets[sid].data_type != DataType.STRING:
                del values[sid]  # no key for this period, or not text: never keep it clear
                tally.unkeyed_signals += 1
                continue
            column = values[sid]
            hashed = np.empty(len(column), dtype=object)
            for i, v in enumerate(column):
                hashed[i] = hash_identifier(key, str(v))
            tally.hashed_values += len(column)
            values[sid] = hashed
        out.append(GroupBatch(b.group, b.t_ns, values))
    return out
