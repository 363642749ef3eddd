"""Plane geometry for privacy policies: where a point lies against a geofence, and how positions coarsen.

Geofences are GeoJSON polygons (longitude first, as GeoJSON writes them) and are small next to the
distances where the earth's curvature matters, so a point is tested in the plane of (lon, lat) degrees by
crossing number (even-odd rule): a ray to the east crosses the rings an odd number of times exactly when
the point is inside. A polygon's holes are rings like its outline, so the even-odd rule over all rings
answers "inside the outline and outside every hole" in one pass. Points exactly on an edge count as
inside: a policy that suppresses must err towards suppressing.

Coarsening replaces a position with the centre of the cell it falls in (a grid of ``step`` degrees, or a
geohash cell), so every position of a cell becomes the same value and nothing finer than the cell
survives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: A ring: (lon, lat) vertices; the last may repeat the first (GeoJSON closes rings), or not.
Ring = tuple[tuple[float, float], ...]

_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"
#: Longest geohash accepted: 12 characters is a cell of a few centimetres, finer than any receiver.
MAX_GEOHASH_PRECISION = 12


@dataclass(frozen=True)
class Polygon:
    """One polygon: ``rings[0]`` its outline, the rest its holes."""

    rings: tuple[Ring, ...]

    def bounds(self) -> tuple[float, float, float, float]:
        """(min lon, min lat, max lon, max lat) of the outline."""
        xs = [p[0] for p in self.rings[0]]
        ys = [p[1] for p in self.rings[0]]
        return min(xs), min(ys), max(xs), max(ys)

    def contains(self, lon: float, lat: float) -> bool:
        """Whether (lon, lat) is inside the outline and outside every hole (edges count as inside)."""
        if not (math.isfinite(lon) and math.isfinite(lat)):
            return False
        x0, y0, x1, y1 = self.bounds()
        if not (x0 <= lon <= x1 and y0 <= lat <= y1):
            return False
        inside = False
        for ring in self.rings:
            if _on_boundary(ring, lon, lat):
                return True
            if _crossings(ring, lon, lat) % 2:
                inside = not inside
        return inside


def _edges(ring: Ring) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    n = len(ring)
    return [(ring[i], ring[(i + 1) % n]) for i in range(n)]


def _crossings(ring: Ring, x: float, y: float) -> int:
    """Edges crossed by the ray from (x, y) towards +x; each edge is half-open in y so a vertex on the
    ray is counted once."""
    count = 0
    for (ax, ay), (bx, by) in _edges(ring):
        if (ay > y) != (by > y):
            cross_x = ax + (y - ay) * (bx - ax) / (by - ay)
            if cross_x > x:
                count += 1
    return count


def _on_boundary(ring: Ring, x: float, y: float) -> bool:
    for (ax, ay), (bx, by) in _edges(ring):
        if min(ax, bx) <= x <= max(ax, bx) and min(ay, by) <= y <= max(ay, by):
            cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
            scale = max(abs(bx - ax), abs(by - ay), 1e-300)
            if abs(cross) <= 1e-12 * scale:
                return True
    return False


def inside_any(fences: Sequence[Polygon], lon: float, lat: float) -> bool:
    return any(fence.contains(lon, lat) for fence in fences)


def snap_to_grid(value: float, step: float) -> float:
    """The centre of the ``step``-wide cell ``value`` falls in (cells start at 0)."""
    return (math.floor(value / step) + 0.5) * step


def _world() -> tuple[list[float], list[float]]:
    """The whole earth as [lo, hi] of longitude and of latitude: a geohash's bit ``i`` halves the
    ``i % 2``-th of them (the axes take turns, longitude first), narrowed in place bit by bit."""
    return [-180.0, 180.0], [-90.0, 90.0]


def _narrow(span: list[float], upper: bool) -> None:
    """Keep the upper or the lower half of ``span`` (what one geohash bit says)."""
    span[0 if upper else 1] = (span[0] + span[1]) / 2


def geohash(lat: float, lon: float, precision: int) -> str:
    """The geohash of (lat, lon) with ``precision`` characters (bits alternate lon, lat from lon)."""
    spans, point = _world(), (lon, lat)
    out: list[str] = []
    value = 0
    for i in range(precision * 5):
        span = spans[i % 2]
        upper = point[i % 2] >= (span[0] + span[1]) / 2
        _narrow(span, upper)
        value = value * 2 + upper
        if i % 5 == 4:
            out.append(_BASE32[value])
            value = 0
    return "".join(out)


def geohash_cell(code: str) -> tuple[float, float, float, float]:
    """(lat_lo, lat_hi, lon_lo, lon_hi) of a geohash's cell."""
    spans = _world()
    for i in range(len(code) * 5):
        _narrow(spans[i % 2], bool(_BASE32.index(code[i // 5]) >> (4 - i % 5) & 1))
    (lon_lo, lon_hi), (lat_lo, lat_hi) = spans
    return lat_lo, lat_hi, lon_lo, lon_hi


def geohash_centre(lat: float, lon: float, precision: int) -> tuple[float, float]:
    """(lat, lon) of the centre of the geohash cell of ``precision`` characters holding the point."""
    lat_lo, lat_hi, lon_lo, lon_hi = geohash_cell(geohash(lat, lon, precision))
    return (lat_lo + lat_hi) / 2, (lon_lo + lon_hi) / 2
