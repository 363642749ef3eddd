"""Replay of a raw CAN log through a DBC, looping forever as if the bus never stopped.

The log is comma2k19's layout: a directory with four numpy arrays saved without extension — ``t``
(float seconds), ``address`` (frame id), ``src`` (bus number) and ``data`` (payload, ``|S8`` or an
``(N, width)`` uint8 array). Frames are read from disk in chunks of :data:`CHUNK_FRAMES` and decoded only
as :meth:`CanReplaySource.read` reaches them, so memory stays bounded however long the log is, and a file
that vanishes mid-run turns the source dead (``alive() is False``) instead of crashing the agent.

Files come from outside and are not trusted: headers are parsed without unpickling, and a log whose
time is not finite or goes backwards is refused at construction (ConfigError naming the frame). Should
the file change under a running source, chunk times are clamped to the previous frame's time (policy:
clamp-to-previous), so data time still never goes backwards.

Multiplexed messages are not supported: a frame lacking one of its message's selected signals is
skipped and counted in ``skipped_frames_total`` (none of the recorded DBCs multiplexes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.sources.base import (
    ORIGINS,
    PERIOD_PROBE,
    GroupAccumulator,
    ReplayCursor,
    loop_period_ns,
    median_period_s,
)
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.dbc import DbcDatabase, FrameDecoder, load_dbc
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch

#: Frames read from disk (and decoded) at a time.
CHUNK_FRAMES: Final = 8192
#: Widest payload accepted (CAN FD).
MAX_PAYLOAD_BYTES: Final = 64
COLUMNS: Final = ("t", "address", "src", "data")


@dataclass(frozen=True)
class _NpyColumn:
    """Where one extension-less ``.npy`` array's rows are in its file (read without loading it)."""

    path: Path
    offset: int
    dtype: np.dtype[Any]
    rows: int
    row_bytes: int

    def read(self, lo: int, hi: int) -> npt.NDArray[Any]:
        count = max(hi - lo, 0)
        with self.path.open("rb") as f:
            f.seek(self.offset + lo * self.row_bytes)
            buf = f.read(count * self.row_bytes)
        if len(buf) != count * self.row_bytes:
            raise OSError(f"{self.path}: truncated (wanted rows {lo}..{hi})")
        return np.frombuffer(buf, dtype=self.dtype, count=count * (self.row_bytes // self.dtype.itemsize))


def _open_column(path: Path) -> _NpyColumn:
    """Read and check the header of one ``.npy`` column; never unpickles anything."""
    if not path.is_file():
        raise ConfigError(f"{path}: CAN log column missing")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"{path}: not a numpy array file: {exc}") from None
    if dtype.hasobject or dtype.fields is not None:
        raise ConfigError(f"{path}: unsupported dtype {dtype} (objects and records are refused)")
    if not shape or len(shape) > 2 or (len(shape) == 2 and fortran):
        raise ConfigError(f"{path}: expected a 1-D array (or C-ordered 2-D payload), got shape {shape}")
    rows = int(shape[0])
    width = int(shape[1]) if len(shape) == 2 else 1
    row_bytes = width * dtype.itemsize
    if offset + rows * row_bytes > size:
        raise ConfigError(f"{path}: truncated: header says {rows} rows but the file is {size} bytes")
    return _NpyColumn(path, offset, dtype, rows, row_bytes)


def _payload_width(col: _NpyColumn) -> int:
    if col.dtype.kind == "S":
        width = col.dtype.itemsize
    elif col.dtype.kind == "u" and col.dtype.itemsize == 1:
        width = col.row_bytes
    else:
        raise ConfigError(f"{col.path}: payloads must be bytes (|S8) or uint8 rows, got {col.dtype}")
    if not 1 <= width <= MAX_PAYLOAD_BYTES:
        raise ConfigError(f"{col.path}: payload width {width} is outside 1..{MAX_PAYLOAD_BYTES} bytes")
    return width


@dataclass
class _Chunk:
    lo: int
    rel_ns: npt.NDArray[np.int64]
    address: npt.NDArray[np.int64]
    src: npt.NDArray[np.int64]
    payload: npt.NDArray[np.uint8]  # (n, width)


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
        frames_dir = Path(frames_dir)
        if not frames_dir.is_dir():
            raise ConfigError(f"{frames_dir}: CAN frames directory not found")
        cols = {c: _open_column(frames_dir / c) for c in COLUMNS}
        rows = {c: col.rows for c, col in cols.items()}
        if len(set(rows.values())) != 1:
            raise ConfigError(f"{frames_dir}: columns differ in length: {rows}")
        self._records = rows["t"]
        if self._records == 0:
            raise ConfigError(f"{frames_dir}: the CAN log holds no frames")
        for c in ("t", "address", "src"):
            kinds = "f" if c == "t" else "iu"
            if cols[c].dtype.kind not in kinds or cols[c].row_bytes != cols[c].dtype.itemsize:
                raise ConfigError(f"{cols[c].path}: unexpected dtype {cols[c].dtype} for column {c!r}")
        self._width = _payload_width(cols["data"])
        self._cols = cols
        try:
            head = cols["t"].read(0, min(self._records, PERIOD_PROBE)).astype(np.float64)
            last = cols["t"].read(self._records - 1, self._records).astype(np.float64)
        except OSError as exc:
            raise ConfigError(f"{frames_dir}: cannot read timestamps: {exc}") from None
        self._t0 = float(head[0])
        self._t_last = float(last[0])
        if not (np.isfinite(self._t0) and np.isfinite(self._t_last) and self._t_last >= self._t0):
            raise ConfigError(f"{frames_dir}: first/last timestamps {self._t0}, {self._t_last} are unusable")
        self._check_time_order(frames_dir)
        self._last_rel_ns = round((self._t_last - self._t0) * 1e9)
        period = loop_period_ns(self._last_rel_ns, round(median_period_s(head) * 1e9))
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

    def _check_time_order(self, frames_dir: Path) -> None:
        """Refuse a log whose time goes backwards or is not finite (one streaming pass, bounded memory)."""
        previous = -np.inf
        for lo in range(0, self._records, CHUNK_FRAMES):
            hi = min(lo + CHUNK_FRAMES, self._records)
            try:
                t = self._cols["t"].read(lo, hi).astype(np.float64)
            except OSError as exc:
                raise ConfigError(f"{frames_dir}: cannot read timestamps: {exc}") from None
            bad = ~np.isfinite(t)
            if bad.any():
                raise ConfigError(
                    f"{frames_dir}/t: frame {lo + int(np.argmax(bad))}: timestamp is not finite"
                )
            back = np.diff(np.concatenate(([previous], t))) < 0
            if back.any():
                i = lo + int(np.argmax(back))
                raise ConfigError(f"{frames_dir}/t: frame {i}: time goes backwards")
            previous = float(t[-1])

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
        hi = min(lo + CHUNK_FRAMES, self._records)
        t = self._cols["t"].read(lo, hi).astype(np.float64)
        address = self._cols["address"].read(lo, hi).astype(np.int64)
        src = self._cols["src"].read(lo, hi).astype(np.int64)
        payload = self._cols["data"].read(lo, hi).view(np.uint8).reshape(hi - lo, self._width)
        # The constructor checked that time never goes backwards; should the file change under us,
        # clamp-to-previous keeps the cursor's binary searches (and data time) monotonic anyway.
        t = np.clip(np.maximum.accumulate(np.where(np.isfinite(t), t, -np.inf)), self._t0, self._t_last)
        rel = np.rint((t - self._t0) * 1e9).astype(np.int64)
        return _Chunk(lo, rel, address, src, payload)

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
        address = chunk.address[a:b]
        keep = (chunk.src[a:b] == self._bus) & np.isin(address, self._ids)
        rows = np.flatnonzero(keep) + a
        if rows.size == 0:
            return
        times: dict[str, list[int]] = {}
        columns: dict[str, list[list[float | int]]] = {}
        decode = self._decoder.decode
        for row in rows.tolist():
            decoded = decode(int(chunk.address[row]), chunk.payload[row].tobytes())
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
