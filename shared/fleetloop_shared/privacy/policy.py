"""A campaign's privacy policy as plain data: what it drops, hashes, coarsens and suppresses.

The campaign reader (:mod:`fleetloop_shared.rules.privacy_spec`) builds it from ``spec.privacy``; the
agent applies it to each capture before the capture is stored (:mod:`.apply`), and the cloud checks
each uploaded segment against it again (:mod:`.check`). A capture records the policy it was taken under
as a :class:`PolicyStamp`, which travels with its segments to the cloud.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetloop_shared.privacy.geo import Polygon

#: Position signals when ``spec.privacy.positions`` names none (VSS paths).
DEFAULT_LATITUDE = "Vehicle.CurrentLocation.Latitude"
DEFAULT_LONGITUDE = "Vehicle.CurrentLocation.Longitude"
SUPPRESS_SCOPES = ("capture", "positions")


@dataclass(frozen=True)
class PositionCoarsening:
    """Positions to the centre of a grid cell of ``grid_deg`` degrees, or of a geohash cell of
    ``geohash`` characters (exactly one is set)."""

    grid_deg: float | None = None
    geohash: int | None = None


@dataclass(frozen=True)
class MinSpeed:
    """Positions are kept only while ``signal`` (its latest sample at or before the position) is at least
    ``value``; a position with no such sample is not kept."""

    signal: str
    value: float


@dataclass(frozen=True)
class PrivacyPolicy:
    name: str
    version: int
    drop: tuple[str, ...] = ()
    hash: tuple[str, ...] = ()
    latitude: str = DEFAULT_LATITUDE
    longitude: str = DEFAULT_LONGITUDE
    coarsen_position: PositionCoarsening | None = None
    coarsen_time_ns: int = 0
    geofences: tuple[Polygon, ...] = ()
    suppress_scope: str = "capture"  # "capture" | "positions"
    min_speed: MinSpeed | None = None

    @property
    def touches_positions(self) -> bool:
        return bool(self.coarsen_position or self.geofences or self.min_speed)

    def stamp(self, key_id: str = "") -> PolicyStamp:
        return PolicyStamp(self.name, self.version, key_id)


@dataclass(frozen=True)
class PolicyStamp:
    """The policy a capture was taken under, and the id of the key its identifiers were hashed with.

    Written as ``NAME@VERSION`` or ``NAME@VERSION#KEYID`` where one text is kept (the device's store)."""

    name: str
    version: int
    key_id: str = ""

    def text(self) -> str:
        base = f"{self.name}@{self.version}"
        return f"{base}#{self.key_id}" if self.key_id else base

    @classmethod
    def parse(cls, text: str) -> PolicyStamp | None:
        """The stamp of :meth:`text`, or None for ``""`` (no policy) or anything unreadable."""
        head, _, key_id = text.partition("#")
        name, sep, version = head.rpartition("@")
        if not sep or not name or not version.isdigit():
            return None
        return cls(name, int(version), key_id)
