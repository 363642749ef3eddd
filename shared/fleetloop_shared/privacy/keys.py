"""Keyed hashing of identifiers: stable within a fleet and a key period, unlinkable across either.

An identifier (a VIN, a driver id) becomes ``h:KEYID:DIGEST``: HMAC-SHA256 under the fleet's key of the
period, truncated to :data:`DIGEST_BYTES` bytes and written in unpadded upper-case base32. The same VIN
hashes to the same text throughout one fleet's key period (so analysts can still count trips per
vehicle), to unrelated text in another fleet or the next period, and without the key it cannot be
reversed by trying the few million plausible VINs. The key id in the text says which key made it, so
the cloud knows a hashed value from a clear one and a reader knows which period's values compare.

Keys come from the cloud: ``derive_key`` turns the coordinator's secret, a fleet and a period number
into that fleet's key of the period (an HMAC, so one key reveals neither the secret nor another key).
Devices receive the keys of the current and the next period over the control channel and keep them in
a :class:`KeyRing`, which picks the key whose period holds a capture's time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Bytes of the HMAC kept: 120 bits, far beyond any collision among a fleet's identifiers.
DIGEST_BYTES = 15
#: Prefix of every hashed identifier.
PREFIX = "h:"
#: What a hashed identifier looks like; anything else in a hashed signal is a clear identifier.
HASHED = re.compile(r"h:[A-Za-z0-9._-]{1,64}:[A-Z2-7]{24}")
#: Default key period: keys rotate every 30 days.
DEFAULT_PERIOD_S = 30 * 86_400
#: Keys a device keeps at most (current, next, and a few past for late captures); oldest dropped first.
MAX_KEYS = 8
_DERIVE_LABEL = b"fleetloop privacy key v1\x00"


@dataclass(frozen=True)
class PrivacyKey:
    """One fleet's key of one period: valid for capture times in ``[not_before_ns, not_after_ns)``."""

    key_id: str
    key: bytes
    not_before_ns: int
    not_after_ns: int

    def covers(self, t_ns: int) -> bool:
        return self.not_before_ns <= t_ns < self.not_after_ns


def derive_key(secret: bytes, fleet: str, period: int, period_s: int = DEFAULT_PERIOD_S) -> PrivacyKey:
    """The key of ``fleet`` for period number ``period`` (periods of ``period_s`` from the Unix epoch)."""
    material = _DERIVE_LABEL + fleet.encode("utf-8") + b"\x00" + str(period).encode("ascii")
    key = hmac.new(secret, material, hashlib.sha256).digest()
    key_id = f"p{period}-{hashlib.sha256(key).hexdigest()[:8]}"
    start = period * period_s * 1_000_000_000
    return PrivacyKey(key_id, key, start, start + period_s * 1_000_000_000)


def period_of(t_s: float, period_s: int = DEFAULT_PERIOD_S) -> int:
    return int(t_s // period_s)


def hash_identifier(key: PrivacyKey, value: str) -> str:
    """``value`` hashed under ``key``: ``h:KEYID:DIGEST`` (see the module doc)."""
    digest = hmac.new(key.key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    text = base64.b32encode(digest[:DIGEST_BYTES]).decode("ascii")
    return f"{PREFIX}{key.key_id}:{text}"


def is_hashed(value: str) -> bool:
    return HASHED.fullmatch(value) is not None


class KeyRing:
    """The keys a device holds, bounded by :data:`MAX_KEYS` (overflow policy: forget the key whose
    period ended first)."""

    def __init__(self, keys: Iterable[PrivacyKey] = (), *, max_keys: int = MAX_KEYS) -> None:
        self._max = max_keys
        self._keys: dict[str, PrivacyKey] = {}
        self.update(keys)

    def update(self, keys: Iterable[PrivacyKey]) -> None:
        for key in keys:
            self._keys[key.key_id] = key
        while len(self._keys) > self._max:
            oldest = min(self._keys.values(), key=lambda k: (k.not_after_ns, k.key_id))
            del self._keys[oldest.key_id]

    def for_time(self, t_ns: int) -> PrivacyKey | None:
        """The key whose period holds ``t_ns`` (the latest-starting one if periods overlap), or None."""
        fitting = [k for k in self._keys.values() if k.covers(t_ns)]
        return max(fitting, key=lambda k: (k.not_before_ns, k.key_id)) if fitting else None

    def keys(self) -> list[PrivacyKey]:
        return sorted(self._keys.values(), key=lambda k: (k.not_before_ns, k.key_id))

    def __len__(self) -> int:
        return len(self._keys)
