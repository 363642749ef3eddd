"""Replay of a raw CAN log through a DBC, looping forever as if the bus never stopped.

The log is comma2k19's layout of numpy arrays, opened and checked by
:class:`~fleetloop_agent.recordings.NumpyCanLog` (the one reader of recordings). Frames are read from
disk in chunks of :data:`CHUNK_FRAMES` and decoded only as :meth:`CanReplaySource.read` reaches them, so
memory stays bounded however long the log is, and a file that vanishes mid-run turns the source dead
(``alive() is False``) instead of crashing the agent.

Frames are decoded a chunk at a time by :class:`~fleetloop_agent.sources.can_signals.CanSignalMap`
(vectorized, values exactly cantools'); multiplexed messages become one group per combination of the
multiplexed signals their frames carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings.numpy_can import FrameRows, NumpyCanLog
from fleetloop_agent.sources.base import (
    PERIOD_PROBE,
    GroupAccumulator,
    ReplayCursor,
    check_origin,
    loop_period_ns,
)
from fleetloop_agent.sources.can_signals import CanSignalMap
from fleetloop_shared.can_batch import FrameBatch
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch

#: Frames read from disk (and decoded) at a time.
CHUNK_FRAMES: Final = 8192


@dataclass
class _Chunk:
    """Frames ``[lo, lo + n)`` of the log, with their times relative to its first frame."""

    lo: int
    rel_ns: npt.NDArray[np.int64]
    rows: FrameRows


class CanReplaySource:
    """A CAN bus replayed from a comma-style frames directory and decoded with a DBC."""

    def __init__(
        self,
        frames_dir: Path,
        dbc_path: Path,
        *,
        start_ns: int,
        bus: int = 0,
        mapping: Mapping[str, str] | None = None,
        include_unmapped: bool = False,
        name: str = "can0",
        origin: str = "recordings",
    ) -> None:
        check_origin(name, origin)
        self.name = name
        self.origin = origin
        self._bus = int(bus)
        self._log = NumpyCanLog(Path(frames_dir))
        self._records = self._log.records
        try:
            head = self._log.read(0, min(self._records, PERIOD_PROBE)).t_ns
        except OSError as exc:
            raise ConfigError(f"{frames_dir}: cannot read timestamps: {exc}") from None
        period = loop_period_ns(head, self._log.t_last_ns - self._log.t0_ns)
        self._cursor = ReplayCursor(self._records, int(start_ns), period)

        self._signals = CanSignalMap(
            load_dbc(Path(dbc_path)), dict(mapping or {}), include_unmapped=include_unmapped, source=name
        )
        self._declared = False
        self._chunk: _Chunk | None = None
        self._failed: str | None = None

    @property
    def skipped_frames_total(self) -> int:
        """Frames of selected messages that carried none of their selected signals (multiplexed)."""
        return self._signals.skipped_frames_total

    def declare(self, catalog: Catalog) -> None:
        """Register mapped signals in mapping order, then unmapped ones in DBC order (see
        :meth:`CanSignalMap.declare`)."""
        self._signals.declare(catalog)
        self._declared = True

    # -- reading -------------------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self._failed is None

    @property
    def failure(self) -> str | None:
        """Why the source died, if it did."""
        return self._failed

    @property
    def decode_errors_total(self) -> int:
        """Frames of selected messages with a payload the DBC could not decode."""
        return self._signals.decode_errors_total

    @property
    def dropped_total(self) -> int:
        """Frames skipped by the drop-oldest backlog policy."""
        return self._cursor.dropped_total

    def _load(self, block: int) -> _Chunk:
        lo = block * CHUNK_FRAMES
        rows = self._log.read(lo, min(lo + CHUNK_FRAMES, self._records))
        return _Chunk(lo, rows.t_ns - np.int64(self._log.t0_ns), rows)

    def _chunk_at(self, index: int) -> _Chunk:
        chunk = self._chunk
        if chunk is None or chunk.lo != (index // CHUNK_FRAMES) * CHUNK_FRAMES:
            chunk = self._load(index // CHUNK_FRAMES)
            self._chunk = chunk
        return chunk

    def _times(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        chunk = self._chunk_at(lo)
        return chunk.rel_ns[lo - chunk.lo : hi - chunk.lo]

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        if self._failed is not None:
            return []
        out = GroupAccumulator()
        try:
            for span in self._cursor.advance(int(until_ns), self._times, CHUNK_FRAMES):
                lo = span.lo
                while lo < span.hi:
                    chunk = self._chunk_at(lo)
                    hi = min(span.hi, chunk.lo + len(chunk.rel_ns))
                    self._decode(chunk, lo - chunk.lo, hi - chunk.lo, span.offset_ns, out)
                    lo = hi
        except OSError as exc:
            self._failed = f"CAN log unreadable: {exc}"
        return out.build()

    def _decode(self, chunk: _Chunk, a: int, b: int, offset_ns: int, out: GroupAccumulator) -> None:
        rows = chunk.rows
        keep = np.flatnonzero(rows.src[a:b] == self._bus) + a
        if keep.size == 0:
            return
        payload = rows.payload[keep]
        batch = FrameBatch(
            chunk.rel_ns[keep],
            rows.address[keep],
            payload,
            np.full(keep.size, payload.shape[1], dtype=np.int64),
        )
        self._signals.emit(batch, offset_ns, out)
