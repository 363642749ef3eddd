"""What every signal source is, and the looping-replay timeline that the replay sources share.

A replayed recording stands in for a live bus: it never ends. Recording time ``t_rec`` becomes data time

    start_ns + (t_rec - t_rec0) + loop_index * (duration + one median sample period)

so every loop follows the previous one by about one sample period, as the next frame on a real bus
would, and data time only ever grows.

Overflow policy **drop-oldest**: when a reader falls more than :data:`MAX_BACKLOG_NS` behind (the agent
was suspended, or asked for an hour at once), the oldest samples are skipped and counted in
``dropped_total`` instead of being decoded into memory, as a real CAN socket drops frames when its
receive queue is full.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog
from fleetloop_shared.choices import check_choice as shared_check_choice
from fleetloop_shared.samples import GroupBatch

H = TypeVar("H", bound=Hashable)

NS_PER_S: Final = 1_000_000_000
#: Where samples come from, as every command and capture reports it.
ORIGINS: Final = ("recordings", "simulated")
#: The origin of a source reading the machine's own bus or devices (never configured: it is what it is).
LIVE: Final = "live"
#: Oldest data a single ``read`` still delivers, relative to ``until_ns`` (policy: drop-oldest).
MAX_BACKLOG_NS: Final = 300 * NS_PER_S
#: Shortest loop period; a recording shorter than this is padded so a read cannot spin through millions
#: of loops of a degenerate (one-frame, zero-length) recording.
MIN_LOOP_PERIOD_NS: Final = 100_000_000
#: Sample period assumed for a recording whose timestamps are all equal.
FALLBACK_PERIOD_NS: Final = NS_PER_S
#: How many leading timestamps are inspected to find the median sample period (bounded work).
PERIOD_PROBE: Final = 65_536


@runtime_checkable
class SignalSource(Protocol):
    """A producer of timestamped signal samples: a bus, a broker subscription or a replayed recording."""

    name: str
    origin: str

    def declare(self, catalog: Catalog) -> None:
        """Register this source's signals (path, datatype, unit); call once before :meth:`read`."""
        ...

    def read(self, until_ns: int) -> list[GroupBatch]:
        """All samples not returned yet with data time ``<= until_ns``, one batch per non-empty group."""
        ...

    def alive(self) -> bool:
        """False once the source has failed for good (its file vanished, its bus went away)."""
        ...


def check_choice(name: str, key: str, value: str, choices: Collection[str]) -> None:
    """ConfigError unless source ``name``'s setting ``key`` is one of ``choices``: every source words
    the refusal of an enumerated setting (timestamps, time format, origin) the same way."""
    shared_check_choice(value, choices, f"source {name!r}: {key}")


def check_origin(name: str, origin: str) -> None:
    """ConfigError unless ``origin`` is one a replayed source may claim (:data:`ORIGINS`)."""
    check_choice(name, "origin", origin, ORIGINS)


def first_repeat(names: Sequence[H]) -> H | None:
    """The first of ``names`` that stands in it more than once, or None: what a source's configuration
    check names when one node, column or signal is mapped twice."""
    counts = Counter(names)
    return next((n for n in names if counts[n] > 1), None)


def loop_period_ns(t_ns: npt.NDArray[np.int64], duration_ns: int) -> int:
    """Length of one loop of a recording: its duration plus one median sample period (the median of
    the positive intervals between its first :data:`PERIOD_PROBE` times), at least
    :data:`MIN_LOOP_PERIOD_NS`."""
    diffs = np.diff(np.asarray(t_ns[:PERIOD_PROBE], dtype=np.int64))
    positive = diffs[diffs > 0]
    median = int(np.median(positive)) if positive.size else FALLBACK_PERIOD_NS
    return max(int(duration_ns) + max(median, 1), MIN_LOOP_PERIOD_NS)


@dataclass(frozen=True)
class Span:
    """Records ``[lo, hi)`` of loop ``loop``; their data time is ``offset_ns + relative time``."""

    loop: int
    lo: int
    hi: int
    offset_ns: int


#: ``times(lo, hi)`` → relative times (ns since the recording's first record, non-decreasing) of
#: records ``[lo, hi)``. The cursor asks for ranges inside one aligned block of ``step`` records
#: (``[k*step, (k+1)*step)``), so a disk-backed source can cache exactly one block.
TimesFn = Callable[[int, int], npt.NDArray[np.int64]]


@dataclass
class ReplayCursor:
    """Where a looping replay stands, and which records a read up to a given data time must deliver.

    Pure decision logic: record times come through the ``times`` callback, so the same cursor drives an
    in-memory CSV and a CAN log read from disk in chunks.
    """

    records: int
    start_ns: int
    period_ns: int
    max_backlog_ns: int = MAX_BACKLOG_NS
    loop: int = 0
    index: int = 0
    #: Records skipped by the drop-oldest policy.
    dropped_total: int = field(default=0)

    def offset_ns(self, loop: int) -> int:
        return self.start_ns + loop * self.period_ns

    def _block_end(self, step: int) -> int:
        return min((self.index // step + 1) * step, self.records)

    def _wrap(self) -> None:
        if self.index >= self.records:
            self.loop += 1
            self.index = 0

    def _drop_backlog(self, until_ns: int, times: TimesFn, step: int) -> None:
        floor = until_ns - self.max_backlog_ns
        behind = (floor - self.offset_ns(self.loop)) // self.period_ns
        if behind >= 1:
            # Everything left in this loop and in the loops in between ends before the floor.
            self.dropped_total += (self.records - self.index) + (behind - 1) * self.records
            self.loop += behind
            self.index = 0
        while True:
            chunk_end = self._block_end(step)
            rel = times(self.index, chunk_end)
            k = int(np.searchsorted(rel, floor - self.offset_ns(self.loop), side="left"))
            self.dropped_total += k
            self.index += k
            if self.index < chunk_end:
                return
            if self.index >= self.records:
                self._wrap()
                return  # the next loop starts after the floor (floor < offset of loop + 1)

    def advance(self, until_ns: int, times: TimesFn, step: int) -> list[Span]:
        """Move past every record with data time ``<= until_ns`` and return them as spans."""
        self._drop_backlog(until_ns, times, step)
        spans: list[Span] = []
        while True:
            offset = self.offset_ns(self.loop)
            chunk_end = self._block_end(step)
            rel = times(self.index, chunk_end)
            k = int(np.searchsorted(rel, until_ns - offset, side="right"))
            if k:
                last = spans[-1] if spans else None
                if last is not None and last.loop == self.loop and last.hi == self.index:
                    spans[-1] = Span(self.loop, last.lo, self.index + k, offset)
                else:
                    spans.append(Span(self.loop, self.index, self.index + k, offset))
            self.index += k
            if self.index >= self.records:
                self._wrap()
                continue
            if self.index < chunk_end:
                return spans


class GroupAccumulator:
    """Collects per-group pieces of one read and joins them into one :class:`GroupBatch` per group.

    Pieces arrive in data-time order (chunk after chunk, loop after loop), so concatenation keeps each
    group's timestamps non-decreasing. Most groups get one piece per read (a CAN message decoded once
    per batch): that piece becomes the batch as it is, its dict of columns taken over (callers hand in
    a fresh dict per piece), so a read costs no per-column work for them.
    """

    def __init__(self) -> None:
        self._pieces: dict[str, list[tuple[npt.NDArray[np.int64], dict[int, npt.NDArray[np.generic]]]]] = {}

    def add(
        self, group: str, t_ns: npt.NDArray[np.int64], values: dict[int, npt.NDArray[np.generic]]
    ) -> None:
        if t_ns.shape[0] == 0:
            return
        pieces = self._pieces.get(group)
        if pieces is None:
            self._pieces[group] = [(t_ns, values)]
        else:
            pieces.append((t_ns, values))

    def build(self) -> list[GroupBatch]:
        batches = []
        for group, pieces in self._pieces.items():
            if len(pieces) == 1:
                t_ns, values = pieces[0]
            else:
                t_ns = np.concatenate([t for t, _ in pieces])
                columns: dict[int, list[npt.NDArray[np.generic]]] = {}
                for _, piece in pieces:
                    for signal_id, array in piece.items():
                        columns.setdefault(signal_id, []).append(array)
                values = {
                    sid: (arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
                    for sid, arrays in columns.items()
                }
            batches.append(GroupBatch(group, t_ns.astype(np.int64, copy=False), values))
        return batches
