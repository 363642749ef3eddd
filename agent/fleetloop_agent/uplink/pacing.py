"""When a link tries again: jittered exponential backoff and a token bucket for new connections.

Pure: the caller passes ``now`` and owns the randomness (a seeded ``random.Random`` in tests and in the
simulator's reproducible runs), so a test can say exactly when the next attempt is due.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    """Delays double from ``min_s`` up to ``max_s``; each is multiplied by a uniform draw from ``jitter``
    so a fleet that failed together does not retry together."""

    min_s: float
    max_s: float
    jitter: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self) -> None:
        low, high = self.jitter
        if not 0 < self.min_s <= self.max_s or not 0 < low <= high:
            raise ValueError(f"backoff needs 0 < min <= max and 0 < jitter low <= high, got {self}")


#: An agent's link: a cut link is tried again within a second, a dead cloud every ~5 s at most.
LINK_BACKOFF = BackoffPolicy(0.5, 5.0)


class Backoff:
    """The delay before the next attempt after consecutive failures; :meth:`reset` after a success."""

    def __init__(self, policy: BackoffPolicy = LINK_BACKOFF, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng if rng is not None else random.Random()
        self._base = policy.min_s

    def next_delay(self) -> float:
        """The delay to wait now (jittered), and the base doubles for the failure after this one."""
        delay = self._base * self._rng.uniform(*self.policy.jitter)
        self._base = min(self.policy.max_s, self._base * 2)
        return delay

    def reset(self) -> None:
        self._base = self.policy.min_s


class TokenBucket:
    """Admits at most ``rate`` events per second after an initial ``burst``: the simulator's thousands of
    devices connect as a ramp, not a storm. :meth:`delay` books the caller's turn and says how long to wait
    for it."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self._interval = 1.0 / rate
        self._burst_s = (burst - 1) * self._interval
        self._next = float("-inf")

    def delay(self, now: float) -> float:
        turn = max(self._next, now - self._burst_s)
        self._next = turn + self._interval
        return max(0.0, turn - now)
