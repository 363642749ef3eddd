"""Replay of a CAN bus log — candump, Vector ASC or BLF, SavvyCAN GVRET CSV, ASAM MF4, or a comma-style
numpy directory — as a live bus would deliver it, decoded through a DBC.

The log is read once, at construction, by the one reader of recordings
(:func:`~fleetloop_agent.recordings.read_can_frames`), so a malformed line is reported with its
``FILE:LINE`` before the agent starts and the replay itself cannot fail later. Frames are delivered at
``speed`` times real time (2 = twice as fast, so the same frames in half the time: a denser bus), looping
forever by default as a bus never stops, or once (``loop: false``). Frames due are decoded all at once
(:class:`~fleetloop_agent.sources.can_signals.CanSignalMap`) when the
:class:`~fleetloop_agent.sources.can_signals.DecodeCadence` says so, as a live bus's are; J1939
transport sessions are reassembled when ``j1939`` is on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings import read_can_frames
from fleetloop_agent.sources.base import GroupAccumulator, ReplayCursor, check_origin, loop_period_ns
from fleetloop_agent.sources.can_signals import DEFAULT_CADENCE, CanSignalMap, DecodeCadence
from fleetloop_agent.sources.j1939 import J1939Reassembler
from fleetloop_shared.can_batch import FrameBatch
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch


class CanLogSource:
    """The frames of one bus (or all buses) of a log, replayed and decoded."""

    def __init__(
        self,
        path: Path,
        signals: CanSignalMap,
        *,
        start_ns: int,
        bus: int | None = None,
        speed: float = 1.0,
        loop: bool = True,
        j1939: bool = False,
        name: str = "can0",
        origin: str = "recordings",
        cadence: DecodeCadence = DEFAULT_CADENCE,
    ) -> None:
        check_origin(name, origin)
        if not speed > 0:
            raise ConfigError(f"source {name!r}: speed must be > 0, got {speed!r}")
        self.name = name
        self.origin = origin
        frames = read_can_frames(Path(path))
        if frames is None:
            raise ConfigError(f"{path}: a CSV of signals, not a CAN bus log (use kind csv_replay)")
        keep = np.ones(frames.t_ns.shape[0], bool) if bus is None else frames.bus == bus
        if not keep.any():
            buses = sorted(set(frames.bus.tolist()))
            raise ConfigError(f"{path}: no frames on bus {bus} (the log has buses {buses})")
        rows = np.flatnonzero(keep)
        order = rows[np.argsort(frames.t_ns[rows], kind="stable")]  # loggers may interleave channels
        self._frames = FrameBatch.from_payloads(
            frames.t_ns[order], frames.frame_id[order], [frames.data[i] for i in order.tolist()]
        )
        rel = self._frames.t_ns - self._frames.t_ns[0]
        self._rel_ns: npt.NDArray[np.int64] = rel if speed == 1 else np.round(rel / speed).astype(np.int64)
        self._cursor = ReplayCursor(
            len(self._frames), int(start_ns), loop_period_ns(self._rel_ns, int(self._rel_ns[-1]))
        )
        self._loop = loop
        self._cadence = cadence
        self._signals = signals
        self._reassembler = J1939Reassembler() if j1939 else None
        self._declared = False
        #: Whether a one-shot replay has delivered its last frame.
        self.finished = False

    def declare(self, catalog: Catalog) -> None:
        self._signals.declare(catalog)
        self._declared = True

    def alive(self) -> bool:
        return True  # the log is in memory since construction; nothing can take it away

    @property
    def dropped_total(self) -> int:
        """Frames skipped by the drop-oldest backlog policy."""
        return self._cursor.dropped_total

    def counters(self) -> dict[str, int]:
        errors = self._signals.decode_errors_total
        if self._reassembler is not None:
            s = self._reassembler.stats
            errors += s.malformed + s.timed_out + s.aborted + s.overflowed
        return {"errors": errors, "dropped": self.dropped_total}

    @property
    def decode_lag_ns(self) -> int:
        """How much later than its frame's time a sample may be read (see :class:`DecodeCadence`)."""
        return self._cadence.lag_ns

    def _due(self, until_ns: int) -> bool:
        """Whether the cadence lets this read decode: frames pending up to ``until_ns`` counted in the
        cursor's current loop (a read reaching past the loop's end is due: the log wraps or ends)."""
        c = self._cursor
        if c.index >= len(self._rel_ns):
            return True
        offset = c.offset_ns(c.loop)
        oldest = int(self._rel_ns[c.index]) + offset
        if until_ns - offset > int(self._rel_ns[-1]) or until_ns - oldest >= c.max_backlog_ns:
            return True  # the loop's end, or the drop-oldest backlog policy: the cursor decides
        pending = int(np.searchsorted(self._rel_ns, until_ns - offset, side="right")) - c.index
        return self._cadence.due(pending, oldest, until_ns)

    def _times(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        return self._rel_ns[lo:hi]

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        if self.finished or not self._due(int(until_ns)):
            return []
        out = GroupAccumulator()
        for span in self._cursor.advance(int(until_ns), self._times, len(self._rel_ns)):
            if not self._loop and span.loop >= 1:
                self.finished = True
                break
            f = self._frames
            piece = FrameBatch(
                self._rel_ns[span.lo : span.hi] + np.int64(span.offset_ns),
                f.frame_id[span.lo : span.hi],
                f.payload[span.lo : span.hi],
                f.length[span.lo : span.hi],
            )
            self._signals.emit(piece, 0, out)
            if self._reassembler is not None:
                whole = self._reassembler.feed(piece)
                if len(whole):
                    self._signals.emit(whole, 0, out)
        if not self._loop and self._cursor.loop >= 1:
            self.finished = True
        return out.build()
