"""The unit of signal data that flows from sources to ring buffers, the trigger engine and the store.

Signals that arrive together (the signals of one CAN frame, the axes of one IMU sample, the tags of one
PLC poll) share one timestamp column: a *group*. Carrying them as one batch keeps that sharing all the way
into the segment format, where timestamps are most of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class GroupBatch:
    """Samples of one group: ``t_ns`` (int64 ns, non-decreasing) and one value array per signal id.

    Every array in ``values`` has the length of ``t_ns``; dtype float64, int64 or bool as the catalog
    declares the signal, or for a ``STRING`` signal an object array of Python ``str`` (any length, ``""``
    included: text stays exact all the way into the segment's string dictionary).
    """

    group: str
    t_ns: npt.NDArray[np.int64]
    values: dict[int, npt.NDArray[np.generic]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.t_ns.shape[0])

    def slice_time(self, from_ns: int, to_ns: int) -> GroupBatch:
        """The samples with ``from_ns <= t <= to_ns`` (both ends included)."""
        lo = int(np.searchsorted(self.t_ns, from_ns, side="left"))
        hi = int(np.searchsorted(self.t_ns, to_ns, side="right"))
        return GroupBatch(self.group, self.t_ns[lo:hi], {k: v[lo:hi] for k, v in self.values.items()})

    def select(self, signal_ids: set[int]) -> GroupBatch:
        """Only the columns of ``signal_ids`` (the timestamp column stays whole)."""
        return GroupBatch(self.group, self.t_ns, {k: v for k, v in self.values.items() if k in signal_ids})

    @property
    def sample_count(self) -> int:
        """Number of (timestamp, value) samples: rows × columns."""
        return len(self) * len(self.values)
