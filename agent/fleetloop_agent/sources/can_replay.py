"""Replay of a raw CAN log through a DBC, looping forever as if the bus never stopped.

The log is comma2k19's layout of numpy arrays, opened and checked by
:class:`~fleetloop_agent.recordings.NumpyCanLog` (the one reader of recordings). Frames are read from
disk in chunks of :data:`CHUNK_FRAMES` and decoded only as :meth:`CanReplaySource.read` reaches them, so
memory stays bounded however long the log is, and a file that vanishes mid-run turns the source dead
(``alive() is False``) instead of crashing the agent.

Multiplexed messages are not supported: a frame lacking one of its message's selected signals is
skipped and counted in ``skipped_frames_total`` (none of the recorded DBCs multiplexes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings.numpy_can import FrameRows, NumpyCanLog
from fleetloop_agent.sources.base import ORIGINS, PERIOD_PROBE, GroupAccumulator, ReplayCursor, loop_period_ns
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.dbc import DbcDatabase, FrameDecoder, load_dbc
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


@dataclass(frozen=True)
class _Selected:
    """One decoded message: its group and where each kept signal goes."""

    group: str
    signals: tuple[tuple[str, int, DataType], ...]  # (signal name, catalog id, datatype)


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
        if origin not in ORIGINS:
            raise ConfigError(f"source {name!r}: origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
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

        self._dbc: DbcDatabase = load_dbc(Path(dbc_path))
        self._mapping_order: list[str] = []
        self._paths = self._resolve_mapping(dict(mapping or {}), include_unmapped)
        self._decoder: FrameDecoder = self._dbc.decoder(self._paths.keys())
        self._ids = np.array(sorted(self._decoder.frame_ids), dtype=np.int64)
        self._selected: dict[str, _Selected] = {}
        self._declared = False
        self._chunk: _Chunk | None = None
        self._failed: str | None = None
        #: Frames of selected messages that lacked a selected signal (multiplexed messages).
        self.skipped_frames_total = 0

    # -- configuration -------------------------------------------------------------------------------------

    def _resolve_mapping(
        self, mapping: dict[str, str], include_unmapped: bool
    ) -> dict[str, list[tuple[str, str, str, bool]]]:
        """message → [(signal, catalog path, unit, is_float)] for every signal to deliver (DBC order)."""
        wanted: dict[str, dict[str, str]] = {}
        all_paths = list(mapping.values())
        for key, path in mapping.items():
            if all_paths.count(path) > 1:
                raise ConfigError(f"mapping key {key!r}: signal {path!r} is the target of two keys")
            message, dot, signal = str(key).partition(".")
            if not dot or not message or not signal:
                raise ConfigError(f"mapping key {key!r}: expected MESSAGE.SIGNAL")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"mapping key {key!r}: the catalog path must be a non-empty string")
            if message not in self._dbc.message_names():
                raise ConfigError(f"mapping key {key!r}: {self._dbc.source} has no message {message!r}")
            names = [s[0] for s in self._dbc.signals_of(message)]
            if signal not in names:
                raise ConfigError(f"mapping key {key!r}: message {message} has no signal {signal!r}")
            wanted.setdefault(message, {})[signal] = path
        self._mapping_order = [str(p) for p in mapping.values()]
        messages = self._dbc.message_names() if include_unmapped else list(wanted)
        resolved: dict[str, list[tuple[str, str, str, bool]]] = {}
        for message in messages:
            targets = wanted.get(message, {})
            kept = []
            for signal, unit, is_float in self._dbc.signals_of(message):
                mapped = targets.get(signal)
                if mapped is None and include_unmapped:
                    mapped = f"CAN.{message}.{signal}"
                if mapped is not None:
                    kept.append((signal, mapped, unit, is_float))
            if kept:
                resolved[message] = kept
        return resolved

    def declare(self, catalog: Catalog) -> None:
        """Register mapped signals in mapping order, then unmapped ones in DBC order.

        Catalog ids follow registration order, so two cars whose mappings list the same paths in the same
        order get the same ids, whatever their DBCs look like.
        """
        flat = {
            path: (unit, is_float) for signals in self._paths.values() for _, path, unit, is_float in signals
        }
        order = [p for p in self._mapping_order if p in flat] + [
            p for p in flat if p not in self._mapping_order
        ]
        ids: dict[str, tuple[int, DataType]] = {}
        for path in order:
            unit, is_float = flat[path]
            dtype = DataType.FLOAT64 if is_float else DataType.INT64
            ids[path] = (catalog.add(path, dtype, unit).id, dtype)
        self._selected = {
            message: _Selected(
                f"{self.name}/{message}", tuple((signal, *ids[path]) for signal, path, _, _ in signals)
            )
            for message, signals in self._paths.items()
        }
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
        return self._decoder.errors_total

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
        address = chunk.rows.address[a:b]
        keep = (chunk.rows.src[a:b] == self._bus) & np.isin(address, self._ids)
        rows = np.flatnonzero(keep) + a
        if rows.size == 0:
            return
        times: dict[str, list[int]] = {}
        columns: dict[str, list[list[float | int]]] = {}
        decode = self._decoder.decode
        for row in rows.tolist():
            decoded = decode(int(chunk.rows.address[row]), chunk.rows.payload[row].tobytes())
            if decoded is None:
                continue
            message, values = decoded
            sel = self._selected.get(message)
            if sel is None:
                continue
            try:
                picked = [values[signal] for signal, _, _ in sel.signals]
            except KeyError:
                self.skipped_frames_total += 1
                continue
            times.setdefault(message, []).append(int(chunk.rel_ns[row]))
            cols = columns.setdefault(message, [[] for _ in sel.signals])
            for col, value in zip(cols, picked, strict=True):
                col.append(value)
        for message, rel in times.items():
            sel = self._selected[message]
            t_ns = np.asarray(rel, dtype=np.int64) + np.int64(offset_ns)
            arrays: dict[int, npt.NDArray[np.generic]] = {}
            for (_, signal_id, dtype), col in zip(sel.signals, columns[message], strict=True):
                arrays[signal_id] = np.asarray(col, dtype=dtype.numpy_dtype)
            out.add(sel.group, t_ns, arrays)
