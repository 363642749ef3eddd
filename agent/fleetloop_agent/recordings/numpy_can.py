"""CAN frames stored as numpy arrays, comma2k19's layout (what the car replays today).

A frames directory holds four ``.npy`` arrays saved without extension: ``t`` (float seconds), ``address``
(frame id), ``src`` (bus number) and ``data`` (payload: ``|S8`` or an ``(N, width)`` uint8 array).
:class:`NumpyCanLog` opens and checks them without loading them, and reads row ranges, so a replay keeps
memory bounded however long the log is; :func:`read_numpy_can` reads every frame at once.

Payloads are read as whole rows of bytes. ``bytes()`` of a numpy ``|S8`` value strips trailing zero
bytes, which turns a real frame ending in ``00`` into a short, malformed one; a row's bytes never do.

Files come from outside and are not trusted: headers are parsed without unpickling, and a log whose
time is not finite or goes backwards is refused at open (ConfigError naming the frame). Should the file
change later, :meth:`NumpyCanLog.read` clamps each time to the previous one (policy: clamp-to-previous),
so time still never goes backwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings.can_logs import MAX_PAYLOAD_BYTES, CanFrames
from fleetloop_agent.recordings.cells import float_seconds_to_ns
from fleetloop_shared.errors import ConfigError

COLUMNS: Final = ("t", "address", "src", "data")
#: Rows checked at a time when a log is opened (bounded memory).
CHECK_ROWS: Final = 65_536


@dataclass(frozen=True)
class NpyColumn:
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


def open_column(path: Path) -> NpyColumn:
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
    return NpyColumn(path, offset, dtype, rows, row_bytes)


def _payload_width(col: NpyColumn) -> int:
    if col.dtype.kind == "S":
        width = col.dtype.itemsize
    elif col.dtype.kind == "u" and col.dtype.itemsize == 1:
        width = col.row_bytes
    else:
        raise ConfigError(f"{col.path}: payloads must be bytes (|S8) or uint8 rows, got {col.dtype}")
    if not 1 <= width <= MAX_PAYLOAD_BYTES:
        raise ConfigError(f"{col.path}: payload width {width} is outside 1..{MAX_PAYLOAD_BYTES} bytes")
    return width


@dataclass(frozen=True)
class FrameRows:
    """Rows ``[lo, lo + n)`` of a log: times (ns), ids, buses and payloads ``(n, width)``."""

    t_ns: npt.NDArray[np.int64]
    address: npt.NDArray[np.int64]
    src: npt.NDArray[np.int64]
    payload: npt.NDArray[np.uint8]


class NumpyCanLog:
    """An opened and checked frames directory."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"{directory}: CAN frames directory not found")
        self.directory = directory
        cols = {c: open_column(directory / c) for c in COLUMNS}
        rows = {c: col.rows for c, col in cols.items()}
        if len(set(rows.values())) != 1:
            raise ConfigError(f"{directory}: columns differ in length: {rows}")
        self.records = rows["t"]
        if self.records == 0:
            raise ConfigError(f"{directory}: the CAN log holds no frames")
        for c in ("t", "address", "src"):
            kinds = "f" if c == "t" else "iu"
            if cols[c].dtype.kind not in kinds or cols[c].row_bytes != cols[c].dtype.itemsize:
                raise ConfigError(f"{cols[c].path}: unexpected dtype {cols[c].dtype} for column {c!r}")
        self.width = _payload_width(cols["data"])
        self._cols = cols
        try:
            ends = np.concatenate([cols["t"].read(0, 1), cols["t"].read(self.records - 1, self.records)])
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot read timestamps: {exc}") from None
        self._t0, self._t_last = (float(x) for x in ends.astype(np.float64))
        if not (np.isfinite(self._t0) and np.isfinite(self._t_last) and self._t_last >= self._t0):
            raise ConfigError(f"{directory}: first/last timestamps {self._t0}, {self._t_last} are unusable")
        self._check_time_order()
        self.t0_ns = int(float_seconds_to_ns(self._t0))
        self.t_last_ns = int(float_seconds_to_ns(self._t_last))

    def _check_time_order(self) -> None:
        """Refuse a log whose time goes backwards or is not finite (one streaming pass)."""
        previous = -np.inf
        for lo in range(0, self.records, CHECK_ROWS):
            hi = min(lo + CHECK_ROWS, self.records)
            try:
                t = self._cols["t"].read(lo, hi).astype(np.float64)
            except OSError as exc:
                raise ConfigError(f"{self.directory}: cannot read timestamps: {exc}") from None
            bad = ~np.isfinite(t)
            if bad.any():
                raise ConfigError(
                    f"{self.directory}/t: frame {lo + int(np.argmax(bad))}: timestamp is not finite"
                )
            back = np.diff(np.concatenate(([previous], t))) < 0
            if back.any():
                raise ConfigError(
                    f"{self.directory}/t: frame {lo + int(np.argmax(back))}: time goes backwards"
                )
            previous = float(t[-1])

    def read(self, lo: int, hi: int) -> FrameRows:
        """Rows ``[lo, hi)``; OSError when the files changed or vanished under the reader."""
        t = self._cols["t"].read(lo, hi).astype(np.float64)
        t = np.clip(np.maximum.accumulate(np.where(np.isfinite(t), t, -np.inf)), self._t0, self._t_last)
        return FrameRows(
            float_seconds_to_ns(t),
            self._cols["address"].read(lo, hi).astype(np.int64),
            self._cols["src"].read(lo, hi).astype(np.int64),
            self._cols["data"].read(lo, hi).view(np.uint8).reshape(hi - lo, self.width),
        )

    def frames(self) -> CanFrames:
        """Every frame at once (payloads of the full row width: loggers pad to 8 bytes, decoders ignore
        the padding)."""
        try:
            rows = self.read(0, self.records)
        except OSError as exc:
            raise ConfigError(f"{self.directory}: cannot read frames: {exc}") from None
        return CanFrames(rows.t_ns, rows.src, rows.address, [p.tobytes() for p in rows.payload])


def is_numpy_can(directory: Path) -> bool:
    return directory.is_dir() and all((directory / c).is_file() for c in COLUMNS)


def read_numpy_can(directory: Path) -> CanFrames:
    return NumpyCanLog(directory).frames()
