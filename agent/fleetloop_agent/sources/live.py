"""What live sources (a bus, an adapter, a server) share: the device clock they stamp samples with, the
reconnect backoff, the bounded hand-over from their I/O thread to ``read()``, and their counters.

A live source's I/O runs on its own thread; ``read()`` runs on the agent's loop. Between them sits a
:class:`FrameQueue` with a fixed capacity and the **drop-oldest** overflow policy: when the loop falls
behind (the machine is suspended, a burst outruns it), the oldest frames go and are counted, as a CAN
controller's receive FIFO drops them, and the newest data keeps flowing.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np

from fleetloop_shared.can_batch import CLASSIC_WIDTH, FrameBatch

#: Default capacity of a live source's receive queue (frames): ~10 s of a busy 500 kbit/s bus.
DEFAULT_QUEUE_FRAMES: Final = 65_536


class Clock(Protocol):
    """The device clock every source stamps its samples with (one object for the whole agent, so samples
    of different sources are comparable; the cloud corrects its offset separately)."""

    def now_ns(self) -> int: ...


class SystemClock:
    """The machine's wall clock (what :class:`~fleetloop_agent.runtime.AgentRuntime` counts data time
    from)."""

    def now_ns(self) -> int:
        return time.time_ns()


@dataclass
class Backoff:
    """Reconnect delays: exponential from ``initial_s`` to ``max_s``, with up to ``jitter`` of random
    spread so a fleet that lost the same server does not come back in lockstep. Pure: the caller sleeps."""

    initial_s: float = 0.1
    max_s: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = field(default=0.0, repr=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay(self) -> float:
        """The wait before the next attempt (and lengthen the one after)."""
        base = self._next or self.initial_s
        self._next = min(base * self.factor, self.max_s)
        return base * (1.0 + self.jitter * self._rng.random())

    def reset(self) -> None:
        """After a success: the next failure starts again from ``initial_s``."""
        self._next = 0.0


@dataclass
class SourceCounters:
    """Running totals a live source keeps (plain ints; the agent mirrors them into its metrics)."""

    samples: int = 0
    errors: int = 0
    dropped: int = 0
    reconnects: int = 0
    missed_polls: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "samples": self.samples,
            "errors": self.errors,
            "dropped": self.dropped,
            "reconnects": self.reconnects,
            "missed_polls": self.missed_polls,
        }


class FrameQueue:
    """Frames handed from a receive thread to ``read()``: bounded, drop-oldest, counted.

    ``put`` is what the receive thread calls per frame, so it does the least possible: one tuple into a
    deque under a lock. ``drain`` turns everything queued into one :class:`FrameBatch`.
    """

    def __init__(self, capacity: int = DEFAULT_QUEUE_FRAMES, width: int = CLASSIC_WIDTH) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1 frame")
        self.capacity = capacity
        self.width = width
        self._frames: deque[tuple[int, int, bytes]] = deque()
        self._lock = threading.Lock()
        #: Frames dropped because the queue was full (oldest first).
        self.dropped_total = 0

    def put(self, t_ns: int, frame_id: int, data: bytes) -> None:
        with self._lock:
            if len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped_total += 1
            self._frames.append((t_ns, frame_id, data))

    def __len__(self) -> int:
        return len(self._frames)

    def drain(self, until_ns: int | None = None) -> FrameBatch:
        """Every queued frame (received at or before ``until_ns``, if given) as one batch; later ones stay."""
        with self._lock:
            frames = self._frames
            if until_ns is None or not frames or frames[-1][0] <= until_ns:
                self._frames = deque()
            else:
                taken: deque[tuple[int, int, bytes]] = deque()
                while frames and frames[0][0] <= until_ns:
                    taken.append(frames.popleft())
                frames = taken
        if not frames:
            return FrameBatch.empty(self.width)
        t_ns, ids, payloads = zip(*frames, strict=True)
        return FrameBatch.from_payloads(
            np.array(t_ns, dtype=np.int64), np.array(ids, dtype=np.int64), payloads, width=self.width
        )
