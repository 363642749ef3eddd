"""The encoder's plan for a segment's times: which groups share a clock, repeat an earlier group's
times, or store offsets from them.

On a CAN bus the *arrival* times are most of the bytes. Frames of different messages that came in one
USB batch carry the very same timestamp, so those groups share one sorted clock column and each stores
indices into it (format 4: a periodic message's indices step by an almost constant amount); groups with
the very same time column name the first such group (2 bytes, whatever the rows); and messages one node
sends one after the other store their small offsets from the first one's times (format 6).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment import registry
from fleetloop_shared.segment.codecs import intstream
from fleetloop_shared.segment.layout import Encoded

I64 = npt.NDArray[np.int64]


def timestamps(t_ns: I64) -> Encoded:
    """A group's (or the clock's) own times: an integer stream."""
    return registry.TS_INTSTREAM.block(*registry.TS_INTSTREAM.encode(t_ns))


def same_times(times: list[I64]) -> dict[int, int]:
    """Groups whose time column is the very same as an earlier group's (the axes of one IMU split
    across families, two messages decoded from one frame), each to the first such group."""
    same_as: dict[int, int] = {}
    first_with: dict[bytes, int] = {}
    for i, t_ns in enumerate(times):
        if t_ns.shape[0]:
            j = first_with.setdefault(t_ns.tobytes(), i)
            if j != i:
                same_as[i] = j
    return same_as


def time_block(
    i: int, times: list[I64], same_as: dict[int, int], clock_index: dict[int, I64], offsets: bool
) -> Encoded:
    """Group ``i``'s time block: the same times as an earlier group, indices into the clock, its own
    times, or (``offsets``: format 6) offsets from an earlier group's times where those are smaller."""
    if i in same_as:
        return registry.TS_SAME_AS.block(registry.TS_SAME_AS.encode(same_as[i]))
    index = clock_index.get(i)
    if index is not None:
        return registry.TS_CLOCK_INDEX.block(*registry.TS_CLOCK_INDEX.encode(index, INDEX_ORDERS))
    own = timestamps(times[i])
    if offsets:
        found = offset_times(i, times, same_as, own)
        if found is not None:
            return found
    return own


#: Time offsets (format 6) are tried against at most this many earlier groups of as many rows (the
#: nearest ones), and taken when their planned stream is below this share of the group's own times.
OFFSET_CANDIDATES = 4
_OFFSET_SCREEN = 1.5
#: ... for groups whose own times cost at least this many bytes a row.
_OFFSET_MIN_BYTES_PER_ROW = 1


def offset_times(i: int, times: list[I64], same_as: dict[int, int], own: Encoded) -> Encoded | None:
    """Group ``i``'s time block as offsets from an earlier group's times (codec 5), when smaller.

    Why: messages that one node sends one after the other (a GNSS module's position, speed and
    attitude frames; an engine controller's two PGNs) arrive a nearly constant few hundred µs apart,
    so their times cost a few bits a row as offsets from the first message's and ~12–25 as their own
    arrival jitter. Screened on planned sizes; only the best candidate is encoded."""
    t_ns = times[i]
    rows = int(t_ns.shape[0])
    if len(own.payload) < _OFFSET_MIN_BYTES_PER_ROW * rows or rows < 2:
        return None  # own times cheap already (a steady clock)
    candidates = [j for j in range(i - 1, -1, -1) if j not in same_as and times[j].shape[0] == rows][
        :OFFSET_CANDIDATES
    ]
    best: tuple[int, int, I64] | None = None
    for j in candidates:
        offsets = t_ns - times[j]  # (wraps like the decoder's addition)
        planned = min(intstream.plan_size(offsets, 0), intstream.plan_size(offsets, 1))
        if best is None or planned < best[0]:
            best = (planned, j, offsets)
    if best is None or best[0] >= _OFFSET_SCREEN * len(own.payload):
        return None
    _, j, offsets = best
    block = registry.TS_OFFSET.block(registry.TS_OFFSET.encode(j, offsets))
    return None if len(block.payload) >= len(own.payload) else block


#: Difference orders tried for clock indices: they rise (a group's rows are in time order), so the
#: steps (order 1) or the change of step (order 2) are small; order 0 never wins.
INDEX_ORDERS = (1, 2)
#: A group uses the shared clock when at least this share of its timestamps also occur in another
#: group that uses it (the screen is repeated once among the users; see :func:`choose_clock`).
CLOCK_MIN_SHARED = 0.2
_CLOCK_ROUNDS = 2


def choose_clock(
    times: list[npt.NDArray[np.int64]],
) -> tuple[npt.NDArray[np.int64], dict[int, npt.NDArray[np.int64]]]:
    """The shared clock and, for each group that uses it, its indices into it.

    Decided by a screen, not by encoding: a group joins when at least :data:`CLOCK_MIN_SHARED` of its
    timestamps occur in another group too (then those rows cost nothing of their own). Encoding every
    group both ways and keeping the smaller was ~2 % smaller on the real corpus but cost ~25 % of the
    corpus encode time (two or three time-block encodes per group instead of one).
    """
    empty = np.zeros(0, dtype=np.int64)
    users = [i for i, t in enumerate(times) if t.shape[0]]
    # A group's repeated times (one row per satellite or radar track at one instant) are cheap in its
    # own stream already; only times shared with *another* group count, so each group's runs of equal
    # times are collapsed first (adjacent ones: rows are normally in time order).
    firsts = {i: np.concatenate(([True], times[i][1:] != times[i][:-1])) for i in users}
    distinct = {i: times[i][firsts[i]] for i in users}
    for round_ in range(_CLOCK_ROUNDS):
        if len(users) < 2:
            return empty, {}
        last_round = round_ == _CLOCK_ROUNDS - 1  # the screen settles in two rounds; keep the rest
        joined = np.concatenate([distinct[i] for i in users])
        # Each group's times are usually sorted already: a stable sort (timsort) merges the runs.
        order = np.argsort(joined, kind="stable")
        merged = joined[order]
        new = np.concatenate(([True], merged[1:] != merged[:-1]))
        clock = merged[new]
        if not last_round and clock.shape[0] > (1 - CLOCK_MIN_SHARED / 2) * merged.shape[0]:
            return empty, {}  # hardly any time is shared (a bus of unbatched arrivals): no clock
        shared = np.diff(np.append(np.flatnonzero(new), merged.shape[0])) > 1
        rank = np.empty(merged.shape[0], dtype=np.int64)
        rank[order] = np.cumsum(new) - 1  # each joined time's position in the clock
        index: dict[int, npt.NDArray[np.int64]] = {}
        keep: list[int] = []
        offset = 0
        for i in users:
            n = distinct[i].shape[0]
            own_rank = rank[offset : offset + n]
            offset += n
            if last_round or float(shared[own_rank].mean()) >= CLOCK_MIN_SHARED:
                keep.append(i)
                # back to one index per row (repeated times repeat their index)
                index[i] = own_rank if n == times[i].shape[0] else own_rank[np.cumsum(firsts[i]) - 1]
        if keep == users:
            return clock, index
        left = sum(distinct[i].shape[0] for i in users if i not in index)
        if len(keep) >= 2 and left * 10 < clock.shape[0]:
            # The groups that left hold few times: keeping them in the clock costs less than a
            # second round (the users' indices stay valid as they are).
            return clock, index
        users = keep
    return empty, {}
