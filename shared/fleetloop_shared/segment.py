"""Segment codec: one group's samples as self-describing, compressed, checksummed bytes.

A segment is the unit the agent stores, the uplink sends and the cloud ingests, so the same code encodes
on the device and decodes in the cloud. The byte layout is specified in ``docs/segment-format.md``; this
module is its only implementation.

Why the layout looks the way it does:

* Signals of one group share one timestamp column, and timestamps are most of the cost, so they get the
  strongest transform: an integer stream (:mod:`fleetloop_shared.codecs.intstream`) that picks values,
  first or second differences, divides out the clock's tick and bit-packs with exceptions.
* Floats are mostly decimals or scaled integers in disguise, so they become integers plus an exact ulp
  residual (:mod:`fleetloop_shared.codecs.decimal_float`); true doubles fall back to plain bytes or
  first differences of their bits.
* Every block names its codec (and whether zstd was applied on top), so the encoder picks per block
  whatever is smallest and a reader can say *which* codec it does not know.
* Text (catalog ``STRING``) is a dictionary of distinct strings plus per-row or run-length indices
  (:mod:`fleetloop_shared.codecs.strings`): machine text is states and codes with few distinct values.
* A writer stamps the *lowest* format version that expresses the segment (2 unless a column is text,
  4 only for a segment of several groups, 5 only where a keyed, difference, recent-value or dictionary
  column pays, 6 only where a compressed body, a grid float or a time offset pays), so a cloud that
  reads only version 2 keeps accepting every single-group segment without text;
  ``encode_segment(max_version=...)`` caps it for a fleet whose cloud is older.
* Format 5 columns may be stored relative to something: in the order of a key column (interleaved
  series), as the difference from a twin column, as references to recent equal rows, or as indices into
  a few distinct values — each only where the block comes out smaller.
* Format 6 compresses the whole body as one zstd frame (dozens of small groups no longer pay a frame,
  tables and zero-filled headers each), stores floats on a grid of any step as integers times that step
  (a unit conversion, a calibration) and a group's times as offsets from an earlier group's (frames one
  node sends one after another).
* A segment may hold several groups (format version 4) because on a CAN bus the *arrival* times are
  the cost: frames of different messages that came in one USB batch carry the very same timestamp, so
  those groups share one sorted "clock" column and each group stores indices into it (cheap: a periodic
  message's indices step by an almost constant amount) when that is smaller than its own timestamps.
* Decoding trusts nothing: every length is checked against what the header implies *before* anything is
  allocated or decompressed, and the checksum is verified before any block is decompressed, so hostile or
  truncated bytes end in :class:`CorruptSegmentError` rather than in a crash, a huge allocation or a
  silently wrong value.
"""

from __future__ import annotations

import math
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.codecs import decimal_float, grid_float, intstream, recent, strings, zstd_frames
from fleetloop_shared.errors import CorruptSegmentError, UserError
from fleetloop_shared.samples import GroupBatch

#: The newest format version this build writes (and reads): 4 for segments of several groups, 5 only
#: for segments with a derived column, 6 only where a compressed body, grid float or time offset pays.
FORMAT_VERSION: int = 6
#: Every version this build reads (the versioning rule: readers keep reading what was ever released).
READ_VERSIONS: frozenset[int] = frozenset({2, 3, 4, 5, 6})
MAGIC: bytes = b"FLSG"

#: Hard limits a decoder enforces before it allocates anything; an encoder refuses to exceed them too.
MAX_ROWS = 50_000_000
MAX_COLUMNS = 4096
#: Rows × (columns + 1): caps what one segment may decode to (~800 MB of 8-byte cells) whatever it claims.
MAX_CELLS = 100_000_000
MAX_GROUP_BYTES = 1024
MAX_SIGNAL_ID = 2**32 - 1
#: Groups of one (format 4) segment.
MAX_GROUPS = 4096
#: Distinct text of all STRING columns of one segment, UTF-8 bytes: what one segment's text may decode to.
MAX_TEXT_BYTES = strings.MAX_TEXT_BYTES

# Codec ids (one byte, stable forever within a format version; see docs/segment-format.md). The high
# bit (ZSTD_FLAG) says the block's payload is a zstd frame of the transform's bytes.
CODEC_TS_INTSTREAM = 2
CODEC_TS_CLOCK_INDEX = 3  # format version 4: indices into the segment's shared clock
CODEC_TS_SAME_AS = 4  # format version 4: the very timestamps of an earlier group of the segment
CODEC_TS_OFFSET = 5  # format version 6: an earlier group's timestamps plus an integer stream of offsets
CODEC_F64_RAW = 16
CODEC_F64_XOR = 17
CODEC_F64_SCALED = 18
CODEC_F64_BITS_INTSTREAM = 19
CODEC_F64_KEYED = 20  # format version 5: the column in the order of a key column of its group
CODEC_F64_DIFF = 21  # format version 5: the difference from another FLOAT64 column of the segment
CODEC_F64_RECENT = 22  # format version 5: values that repeat a recent value name it instead
CODEC_I64_INTSTREAM = 33
CODEC_I64_KEYED = 34  # format version 5
CODEC_F64_DICT = 23  # format version 5: few distinct values, as a dictionary and one index per row
CODEC_F64_GRID = 24  # format version 6: integers times a step found in the data, plus an ulp residual
CODEC_I64_DICT = 35  # format version 5
CODEC_BOOL_PACKBITS = 48
CODEC_STR_DICT = 64  # format version 3
ZSTD_FLAG = 0x80
# Names kept for callers of format version 1 (the zstd-wrapped forms of the same transforms).
CODEC_F64_RAW_ZSTD = CODEC_F64_RAW | ZSTD_FLAG
CODEC_F64_XOR_ZSTD = CODEC_F64_XOR | ZSTD_FLAG

_TS_CODECS = frozenset({CODEC_TS_INTSTREAM, CODEC_TS_INTSTREAM | ZSTD_FLAG})
#: A group's time block in format 4: its own timestamps or indices into the shared clock.
_GROUP_TS_CODECS = _TS_CODECS | {CODEC_TS_CLOCK_INDEX, CODEC_TS_CLOCK_INDEX | ZSTD_FLAG, CODEC_TS_SAME_AS}
#: ... and from format 6 on, offsets from an earlier group's times.
_GROUP_TS_CODECS_V6 = _GROUP_TS_CODECS | {CODEC_TS_OFFSET, CODEC_TS_OFFSET | ZSTD_FLAG}


def _with_flag(*codecs: int) -> frozenset[int]:
    return frozenset(c | f for c in codecs for f in (0, ZSTD_FLAG))


#: The codecs a keyed block may wrap (never another keyed block).
_PLAIN_VALUE_CODECS: dict[DataType, frozenset[int]] = {
    DataType.FLOAT64: _with_flag(
        CODEC_F64_RAW, CODEC_F64_XOR, CODEC_F64_SCALED, CODEC_F64_BITS_INTSTREAM, CODEC_F64_GRID
    ),
    DataType.INT64: _with_flag(CODEC_I64_INTSTREAM),
    DataType.BOOL: _with_flag(CODEC_BOOL_PACKBITS),
    DataType.STRING: _with_flag(CODEC_STR_DICT),
}
#: Keyed and difference blocks wrap another block and are never zstd'd as a whole (the wrapped one may be).
_KEYED_CODECS = frozenset({CODEC_F64_KEYED, CODEC_I64_KEYED})
_WRAPPING_CODECS = _KEYED_CODECS | {CODEC_F64_DIFF}
_VALUE_CODECS: dict[DataType, frozenset[int]] = {
    DataType.FLOAT64: _PLAIN_VALUE_CODECS[DataType.FLOAT64]
    | {CODEC_F64_KEYED, CODEC_F64_DIFF, CODEC_F64_RECENT, CODEC_F64_DICT},
    DataType.INT64: _PLAIN_VALUE_CODECS[DataType.INT64] | {CODEC_I64_KEYED, CODEC_I64_DICT},
    DataType.BOOL: _PLAIN_VALUE_CODECS[DataType.BOOL],
    DataType.STRING: _PLAIN_VALUE_CODECS[DataType.STRING],
}
#: Codec ids (base, flag clear) that need format version 3; a version 2 segment naming one is corrupt.
_V3_CODECS = frozenset({CODEC_STR_DICT})
#: Keyed blocks need format version 5 (the multi-group layout of version 4).
_DICT_CODECS = frozenset({CODEC_F64_DICT, CODEC_I64_DICT})
_V5_CODECS = _WRAPPING_CODECS | _DICT_CODECS | {CODEC_F64_RECENT}
#: Grid floats need format version 6, at any depth (a keyed or recent-values block may wrap one).
_V6_CODECS = _with_flag(CODEC_F64_GRID)
#: ``flags`` bit of format 6: the body (after the fixed header, before the checksum) is one zstd frame.
FLAG_BODY_ZSTD = 1
#: Format 6: the body (everything between the fixed header and the checksum) is one zstd frame, at this
#: level; top-level blocks stored smaller than :data:`BODY_RAW_BELOW` lose their own zstd frame in it.
#: (Leaving the larger, already compressed blocks outside the frame was tried: no faster, 0.1 % larger —
#: the frame still finds a little in them.)
BODY_LEVEL = 3
BODY_RAW_BELOW = 4096
#: ... and bodies under this many bytes (a small bundle) at this level: cheap there, ~1 % smaller.
BODY_SMALL = 64 * 1024
BODY_SMALL_LEVEL = 9
#: A format 6 body may decompress to at most this many times its stored size plus the slack (a reader
#: refuses more before decompressing; the encoder writes format 5 instead of exceeding it).
BODY_MAX_RATIO = 32
BODY_MAX_SLACK = 1 << 20
#: The smallest body a format 6 frame can hold (group count, clock rows, the clock block's header).
_SMALLEST_BODY = 2 + 4 + 9
#: Below this many bytes a zstd frame (≥ 9 bytes of framing) cannot win; not tried.
_ZSTD_MIN_INPUT = 24

# magic, version, flags, segment id, row count, first ns, last ns
_FIXED = struct.Struct("<4sHH16sQqq")
_U16 = struct.Struct("<H")
_COLUMN = struct.Struct("<IBB")  # signal id, data type, codec id
_BLOCK = struct.Struct("<BII")  # codec id, raw (decompressed) length, stored (compressed) length
_U32 = struct.Struct("<I")
_CRC = struct.Struct("<I")
_KEYED = struct.Struct("<IBI")  # key signal id, wrapped codec id, wrapped decoded length
_DIFF = struct.Struct("<IBII")  # reference signal id, wrapped codec id, wrapped decoded length, patches


def new_segment_id() -> bytes:
    """A 16-byte id that sorts by creation time (UUIDv7 layout: 48-bit ms timestamp, then random).

    Time order lets the cloud and the store list segments chronologically without a second key; the
    74 random bits make collisions between devices negligible without any coordination.
    """
    ms = time.time_ns() // 1_000_000
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
    return bytes(raw)


@dataclass(eq=False)
class Segment:
    """One group's samples: a shared timestamp column and one value column per signal id.

    A segment may carry further groups in ``more_groups`` (format version 4): single-group segments of
    the same ``segment_id`` and no ``more_groups`` of their own. They exist because groups that share
    arrival times (the frames of one CAN bus) store those times once; everything that turns a segment
    into rows must walk :meth:`groups`, not just the first group's fields.

    Equality is bit-exact (NaN payloads and -0.0 included), which is what a codec round trip promises.
    """

    segment_id: bytes
    group: str
    t_ns: npt.NDArray[np.int64]
    columns: dict[int, npt.NDArray[Any]]
    data_types: dict[int, DataType]
    more_groups: tuple[Segment, ...] = ()

    @property
    def sample_count(self) -> int:
        """Number of (timestamp, value) samples: rows × columns, summed over every group."""
        own = int(self.t_ns.shape[0]) * len(self.columns)
        return own + sum(g.sample_count for g in self.more_groups)

    def groups(self) -> list[Segment]:
        """Every group of the segment as a single-group segment (the first one is this one's fields)."""
        if not self.more_groups:
            return [self]
        head = Segment(self.segment_id, self.group, self.t_ns, self.columns, self.data_types)
        return [head, *self.more_groups]

    def time_range(self) -> tuple[int, int] | None:
        """(earliest, latest) timestamp over every group, ``None`` when the segment has no rows."""
        times = [np.asarray(g.t_ns) for g in self.groups()]
        ranges = [(int(t.min()), int(t.max())) for t in times if t.size]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        if (
            self.segment_id != other.segment_id
            or self.group != other.group
            or self.data_types != other.data_types
            or self.columns.keys() != other.columns.keys()
            or not _bits_equal(self.t_ns, other.t_ns)
            or len(self.more_groups) != len(other.more_groups)
        ):
            return False
        if not all(a == b for a, b in zip(self.more_groups, other.more_groups, strict=True)):
            return False
        return all(_bits_equal(self.columns[k], other.columns[k]) for k in self.columns)

    __hash__ = None  # type: ignore[assignment]


def _bits_equal(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    if a.dtype == object or b.dtype == object:  # text: the same strings (their bytes are pointers)
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and all(type(x) is type(y) and x == y for x, y in zip(a.tolist(), b.tolist(), strict=True))
        )
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == (np.ascontiguousarray(b).tobytes())
    )


#: numpy dtype kinds that hold text: Python objects (``str``), fixed-width unicode, numpy 2 StringDType.
_TEXT_KINDS = frozenset("OUT")


def segment_from_batch(batch: GroupBatch, catalog: Catalog, segment_id: bytes | None = None) -> Segment:
    """Turn a batch into a segment, typing each column as the catalog declares its signal.

    Values are converted to the catalog's dtype only where no information is lost in kind (ints to
    float64, bools to int64, numpy text to Python ``str``); anything else is a caller error, not a
    silent truncation or a number turned into text.
    """
    t_ns = np.asarray(batch.t_ns)
    if t_ns.ndim != 1 or t_ns.dtype.kind not in "iu":
        raise UserError(f"group {batch.group!r}: t_ns must be a 1-D integer array, got {t_ns.dtype}")
    columns: dict[int, npt.NDArray[Any]] = {}
    data_types: dict[int, DataType] = {}
    for signal_id, values in batch.values.items():
        data_type = catalog.by_id(signal_id).data_type
        arr = np.asarray(values)
        if (data_type is DataType.STRING) != (arr.dtype.kind in _TEXT_KINDS):
            raise UserError(
                f"group {batch.group!r}: signal id {signal_id} is {data_type.name} in the catalog "
                f"but its values are {arr.dtype}"
            )
        try:
            columns[signal_id] = arr.astype(data_type.numpy_dtype, casting="same_kind")
        except TypeError:
            raise UserError(
                f"group {batch.group!r}: signal id {signal_id} is {data_type.name} in the catalog "
                f"but its values are {arr.dtype}"
            ) from None
        data_types[signal_id] = data_type
    return Segment(
        segment_id=new_segment_id() if segment_id is None else segment_id,
        group=batch.group,
        t_ns=t_ns.astype(np.int64),
        columns=columns,
        data_types=data_types,
    )


#: Rows (all groups together) of one segment made by :func:`bundle_segments`: bounds what one decode
#: holds in memory (a CAN capture's groups are ~5–10 columns, so ~20 MB decoded at most).
BUNDLE_MAX_ROWS = 262_144


def bundle_segments(segments: Iterable[Segment], *, max_rows: int = BUNDLE_MAX_ROWS) -> Iterator[Segment]:
    """Pack consecutive single-group segments into multi-group (format 4) segments of ≤ ``max_rows`` rows.

    Why: on a CAN bus the arrival times are most of the bytes, and frames of different messages that
    arrived in one USB batch carry the same timestamp; a multi-group segment stores those shared times
    once (see :func:`encode_segment`). The bundle takes the first segment's id. A segment with text (its
    distinct text is capped per segment), one that is already multi-group, or a signal id already in the
    bundle (the next chunk of the same group) starts a new bundle; a bundle of one is yielded unchanged,
    so it is written as format 2/3 exactly as before. ``max_rows`` ≤ 0 yields every segment unchanged.
    """
    current: list[Segment] = []
    rows = columns = cells = 0
    ids: set[int] = set()

    def flush() -> Iterator[Segment]:
        if len(current) == 1:
            yield current[0]
        elif current:
            head = current[0]
            more = tuple(
                Segment(head.segment_id, s.group, s.t_ns, s.columns, s.data_types) for s in current[1:]
            )
            yield Segment(head.segment_id, head.group, head.t_ns, head.columns, head.data_types, more)

    for seg in segments:
        seg_rows = int(np.asarray(seg.t_ns).shape[0])
        alone = (
            max_rows <= 0
            or bool(seg.more_groups)
            or any(DataType(t) is DataType.STRING for t in seg.data_types.values())
        )
        fits = (
            not alone
            and current
            and rows + seg_rows <= max_rows
            and columns + len(seg.columns) <= MAX_COLUMNS
            and cells + seg_rows * (len(seg.columns) + 2) <= MAX_CELLS
            and len(current) < MAX_GROUPS
            and not ids & seg.columns.keys()
        )
        if not fits:
            yield from flush()
            current, rows, columns, cells, ids = [], 0, 0, 0, set()
        current.append(seg)
        rows += seg_rows
        columns += len(seg.columns)
        cells += seg_rows * (len(seg.columns) + 2)  # + its time column + its share of the clock
        ids |= seg.columns.keys()
        if alone:
            yield from flush()
            current, rows, columns, cells, ids = [], 0, 0, 0, set()
    yield from flush()


# --------------------------------------------------------------------------------------------- encode


def encode_segment(segment: Segment, *, max_version: int = FORMAT_VERSION) -> bytes:
    """The segment's bytes (the lowest format version that expresses it); raises UserError on an invalid one.

    A single-group segment is written as format 2 (or 3 with text), byte for byte as before format 4;
    only a segment with ``more_groups`` is written as format 4, 5 only where a keyed, difference,
    recent-values or dictionary column pays, and 6 only where a compressed body, a grid float or a
    time offset pays. ``max_version`` caps that for a cloud that reads only older versions (the
    versioning rule's rollout order): below 6 none of format 6's, below 5 no derived column; a segment
    that needs more than the cap (several groups below 4, text below 3) is refused with a UserError.
    """
    if max_version not in READ_VERSIONS:
        raise UserError(
            f"segment format version {max_version} cannot be written "
            f"(this build writes {', '.join(map(str, sorted(READ_VERSIONS)))})"
        )
    derive = max_version >= 5
    v6 = max_version >= 6
    if segment.more_groups:
        if max_version < 4:
            raise UserError(
                f"a segment of {len(segment.more_groups) + 1} groups needs format version 4, "
                f"the limit is {max_version} (write one group per segment)"
            )
        return _encode_multi(segment, derive=derive, v6=v6)
    t_ns, columns = _validated(segment)
    rows = int(t_ns.shape[0])
    first_ns = int(t_ns.min()) if rows else 0
    last_ns = int(t_ns.max()) if rows else 0
    group = segment.group.encode("utf-8")

    value_blocks, text = _encode_columns(segment, columns, derive=derive, v6=v6)
    if any(codec in _V5_CODECS or _uses_grid(codec, payload) for codec, payload, _ in value_blocks):
        # keyed, difference and recent-value columns exist from format 5 on, which has the multi-group
        # layout (here of one group)
        return _encode_multi(segment, {0: (value_blocks, text)}, derive=derive, v6=v6)
    blocks: list[tuple[int, bytes, int]] = [_encode_timestamps(t_ns), *value_blocks]
    if text > MAX_TEXT_BYTES:
        raise UserError(
            f"segment {segment.segment_id.hex()}: {text} bytes of distinct text exceed {MAX_TEXT_BYTES}"
        )
    # The lowest version that expresses these blocks: readers of version 2 keep reading segments
    # without text (the versioning rule's rollout order then only matters for text).
    version = 3 if any(codec & ~ZSTD_FLAG in _V3_CODECS for codec, _, _ in blocks) else 2
    if version > max_version:
        raise UserError(f"text columns need segment format version 3, the limit is {max_version}")

    parts = [
        _FIXED.pack(MAGIC, version, 0, segment.segment_id, rows, first_ns, last_ns),
        _U16.pack(len(group)),
        group,
        bytes([blocks[0][0]]),
        _U16.pack(len(columns)),
    ]
    for (signal_id, data_type, _), (codec, _, _) in zip(columns, blocks[1:], strict=True):
        parts.append(_COLUMN.pack(signal_id, int(data_type), codec))
    for codec, payload, raw_len in blocks:
        parts.append(_BLOCK.pack(codec, raw_len, len(payload)))
        parts.append(payload)
    body = b"".join(parts)
    plain = body + _CRC.pack(zlib.crc32(body))
    if v6 and any(len(p) < BODY_RAW_BELOW for _, p, _ in blocks):
        # small blocks (stored as they are for the body's frame): one frame may well be smaller
        packed = _encode_multi(segment, {0: (value_blocks, text)}, derive=derive, v6=v6)
        if len(packed) < len(plain):
            return packed
    return plain


_Column = tuple[int, DataType, npt.NDArray[Any]]
_Columns = list[_Column]
_EncodedBlock = tuple[int, bytes, int]  # codec id (with the zstd flag), stored payload, raw length


def _encode_columns(
    segment: Segment,
    columns: _Columns,
    stamped_with: Sequence[_Column] = (),
    *,
    derive: bool,
    v6: bool,
) -> tuple[list[_EncodedBlock], int]:
    """The value blocks of one group, and its distinct text (capped per segment by the caller).

    ``stamped_with``: the columns of an earlier group of the segment with the very same timestamps,
    which a column may be stored as the difference from. ``derive`` False: no keyed or difference
    column (format version 4 and older); ``v6`` False: no grid float (format version 5 and older).
    """
    blocks: list[_EncodedBlock] = []
    text = 0
    key = _plan_key(np.asarray(segment.t_ns), columns) if derive else None
    for i, (signal_id, data_type, values) in enumerate(columns):
        try:
            if data_type is DataType.STRING:
                payload, column_text = strings.encode_measured(values)
                text += column_text
                blocks.append(_smaller(CODEC_STR_DICT, payload))
            elif key is not None and i in key.keyed:
                blocks.append(_encode_keyed(data_type, values, key, v6))
            else:
                block = _recent_values(values, v6) if derive and data_type is DataType.FLOAT64 else None
                if block is None:
                    block = _encode_values(data_type, values, v6)
                    if derive and data_type in _NUMERIC:
                        block = _with_dictionary(data_type, values, block)
                blocks.append(block)
        except strings.TextError as exc:
            raise UserError(f"segment {segment.segment_id.hex()}: signal {signal_id}: {exc}") from None
    if derive:
        _difference_columns(columns, blocks, stamped_with, v6)
    return blocks, text


# Recent values (format 5). A sensor's raw readings are integers under a calibration: an IMU at rest
# dithers between a handful of values, so a third of the xio gyro readings repeat one of the last 255
# (but rarely the one just before). Such a row names how many rows back the same value was instead of
# carrying it: the references are small integers, and the remaining (literal) values get their own codec.
RECENT_WINDOW = recent.WINDOW
#: Columns of fewer rows are not tried, nor columns whose literals cost less than this a value.
_RECENT_MIN_ROWS = 2048
_RECENT_MIN_BYTES_PER_ROW = 2
#: ... nor columns with fewer distinct values than one in this many rows ...
_RECENT_MIN_DISTINCT_SHARE = 16
#: ... nor columns where fewer than this share of the rows repeat a recent value.
_RECENT_MIN_HITS = 0.15
#: Below this share of the estimated plain size the block is taken without encoding the column plainly.
_RECENT_SURE = 0.9


def _recent_values(values: npt.NDArray[np.float64], v6: bool) -> _EncodedBlock | None:
    """The recent-values block of a column, or None when the column is stored as it is.

    Decided without encoding the column plainly first (that doubled the cost of every column tried):
    the literals are encoded anyway, and their bytes per value estimate what every row would cost
    plainly; only when the estimate is close is the plain block made to compare.
    """
    rows = int(values.shape[0])
    if rows < _RECENT_MIN_ROWS:
        return None
    bits = values.view(np.int64)
    middle = np.sort(bits[rows // 2 : rows // 2 + 256])
    if int(np.count_nonzero(middle[1:] != middle[:-1])) * _RECENT_MIN_DISTINCT_SHARE < 2 * middle.shape[0]:
        return None  # (a quick look: few distinct values in 256 rows, see below)
    refs, distinct = recent.references(bits)
    if distinct * _RECENT_MIN_DISTINCT_SHARE < rows:
        return None  # few distinct values: cheap for the plain codecs already
    literal = refs == 0
    count = int(np.count_nonzero(literal))
    if count > (1 - _RECENT_MIN_HITS) * rows:
        return None
    literal_block = _encode_values(DataType.FLOAT64, values[literal], v6)
    if len(literal_block[1]) < _RECENT_MIN_BYTES_PER_ROW * count:
        return None  # cheap values: a reference would cost about as much as the value
    ref_block = _smaller(CODEC_I64_INTSTREAM, *intstream.encode_with_zstd(refs, (0,)))
    payload = b"".join(
        [
            _BLOCK.pack(ref_block[0], ref_block[2], len(ref_block[1])),
            ref_block[1],
            _BLOCK.pack(literal_block[0], literal_block[2], len(literal_block[1])),
            literal_block[1],
        ]
    )
    estimate = len(literal_block[1]) * rows / max(count, 1)
    if len(payload) > _RECENT_SURE * estimate:
        plain = _encode_values(DataType.FLOAT64, values, v6)
        if len(plain[1]) <= len(payload):
            return plain
    return CODEC_F64_RECENT, payload, len(payload)


# Dictionaries (format 5). A column with few distinct values that do not lie on a grid — a pressure
# gauge printing 6 significant digits of 9 ADC levels, a phone gyro's ~100 calibrated raw counts — costs
# as many bits as the spread of its values under the integer transforms; as one index per row into its
# distinct values it costs what the index sequence carries.
#: At most this many distinct values (an index fits a byte).
DICT_MAX_VALUES = 256
#: Columns of fewer rows, or cheaper than this many bytes a row, are not tried.
_DICT_MIN_ROWS = 256
_DICT_MIN_BYTES_PER_ROW = 0.5


def _with_dictionary(data_type: DataType, values: npt.NDArray[Any], plain: _EncodedBlock) -> _EncodedBlock:
    """``plain``, or the dictionary block of the column when that is smaller."""
    rows = int(values.shape[0])
    if rows < _DICT_MIN_ROWS or len(plain[1]) < _DICT_MIN_BYTES_PER_ROW * rows:
        return plain
    bits = np.ascontiguousarray(values).view(np.int64)
    found = recent.dictionary(bits, DICT_MAX_VALUES)  # (one compiled pass; stops past the limit)
    if found is None:
        return plain
    distinct, index = found
    # an index costs about log2(count) bits before zstd: not worth it where the plain block is cheaper
    if 8 * len(plain[1]) < rows * (math.log2(distinct.shape[0]) + 1):
        return plain
    entries = _smaller(CODEC_I64_INTSTREAM, *intstream.encode_with_zstd(distinct))
    indices = _smaller(CODEC_I64_INTSTREAM, *intstream.encode_with_zstd(index))
    payload = b"".join(
        [
            _U32.pack(distinct.shape[0]),
            _BLOCK.pack(entries[0], entries[2], len(entries[1])),
            entries[1],
            _BLOCK.pack(indices[0], indices[2], len(indices[1])),
            indices[1],
        ]
    )
    if len(payload) < len(plain[1]):
        return (CODEC_F64_DICT if data_type is DataType.FLOAT64 else CODEC_I64_DICT), payload, len(payload)
    return plain


# Difference columns (format 5). Signals stamped together are sometimes the same quantity twice or
# nearly so: a phone's calibrated and uncalibrated gyro differ by a constant bias, four wheel speeds
# differ by a little while driving straight. Such a column costs far less as its difference from
# the other one. The decoder adds the two back in IEEE double arithmetic, which is exact for finite
# values wherever the encoder checked it (every row, before choosing it).
#: Columns cheaper than this are not searched for a reference (nothing much to gain).
_DIFF_MIN_BYTES = 1024
#: A reference is tried when, on the screened rows, the difference changes by less than this share of
#: the column's own changes.
DIFF_MAX_STEP_RATIO = 0.5
#: At most one row in this many may need patching (rows the addition does not give back exactly).
_DIFF_MAX_PATCH_SHARE = 16


def _difference_columns(
    columns: _Columns, blocks: list[_EncodedBlock], stamped_with: Sequence[_Column], v6: bool
) -> None:
    """Replace costly FLOAT64 blocks by their difference from another column where that is smaller."""
    rows = int(columns[0][2].shape[0]) if columns else 0
    costly = [
        i
        for i, (_, data_type, _) in enumerate(columns)
        if data_type is DataType.FLOAT64
        and blocks[i][0] not in _WRAPPING_CODECS
        and len(blocks[i][1]) >= max(_DIFF_MIN_BYTES, rows // 2)
    ]
    if not costly:
        return
    # References: the earlier group's columns (decoded before this group), and this group's columns
    # that are neither keyed nor differences themselves (decoded before any difference).
    refs = [(sid, v) for sid, data_type, v in stamped_with if data_type is DataType.FLOAT64]
    own = len(refs)
    refs += [
        (sid, v)
        for (sid, data_type, v), block in zip(columns, blocks, strict=True)
        if data_type is DataType.FLOAT64 and block[0] not in _WRAPPING_CODECS
    ]
    if len(refs) < 2:
        return
    screened = min(rows, _KEY_SCREEN_ROWS)
    heads = np.empty((len(refs), screened), dtype=np.float64)
    for j, (_, v) in enumerate(refs):
        heads[j] = v[:screened]
    ids = np.array([sid for sid, _ in refs], dtype=np.int64)
    mine = np.array([columns[i][0] for i in costly], dtype=np.int64)
    # every costly column against every reference at once: (costly, refs, rows) differences
    position = {sid: k for k, (sid, _) in enumerate(refs) if k >= own}  # costly columns are references too
    own_heads = heads[[position[int(sid)] for sid in mine]]
    with np.errstate(invalid="ignore", over="ignore"):
        differences = own_heads[:, None, :] - heads[None, :, :]
        steps = _step_sums(differences.reshape(-1, screened)).reshape(len(costly), len(refs))
        change = _step_sums(own_heads)
        close = steps < DIFF_MAX_STEP_RATIO * change[:, None]
        close &= ids[None, :] != mine[:, None]
    usable = np.ones(len(refs), dtype=np.bool_)
    referenced: set[int] = set()
    for c in np.flatnonzero(close.any(axis=1)):
        i = costly[int(c)]
        signal_id, _, values = columns[i]
        candidates = close[c] & usable
        if signal_id in referenced or not candidates.any():
            continue
        j = int(np.flatnonzero(candidates)[np.argmin(steps[c][candidates])])
        ref_id, ref = refs[j]
        with np.errstate(invalid="ignore", over="ignore"):
            difference = values - ref
            # Rows the addition does not give back bit for bit (-0.0 from x + -x) are patched; so are
            # rows with a NaN operand, whose payload after an addition depends on the machine.
            wrong = (
                ((ref + difference).view(np.int64) != values.view(np.int64))
                | np.isnan(ref)
                | np.isnan(difference)
            )
        patches = np.flatnonzero(wrong)
        if patches.shape[0] * _DIFF_MAX_PATCH_SHARE > rows:
            continue
        inner = _encode_values(DataType.FLOAT64, difference, v6)
        payload = b"".join(
            [
                _DIFF.pack(ref_id, inner[0], inner[2], patches.shape[0]),
                patches.astype("<u4").tobytes(),
                values[patches].astype("<f8").tobytes(),
                inner[1],
            ]
        )
        if len(payload) < len(blocks[i][1]):
            blocks[i] = (CODEC_F64_DIFF, payload, len(payload))
            referenced.add(ref_id)
            # a difference is never a reference (one level: the decoder needs no ordering among them)
            usable[[k for k in range(own, len(refs)) if refs[k][0] == signal_id]] = False


# Keyed columns (format 5). Some groups interleave several series: a GNSS receiver's measurement
# message has one row per satellite, a radar message one per track, and a *key* column (the satellite or
# track id) says which series a row belongs to. Differences between neighbouring rows then jump from
# one series to another and cost nearly as much as the values; in the order of a stable sort by the
# key, each series' rows follow each other in time and their differences are small. On the real
# comma2k19 sensors this makes the u-blox raw measurements ~26 % and the radar ~30 % smaller.
#: A group needs this many rows before a key is looked for.
KEY_MIN_ROWS = 256
#: ... and at least one row in this many must repeat the previous row's timestamp.
KEY_MIN_REPEATS = 4
#: A key takes at most this many distinct values (within the screened rows).
KEY_MAX_DISTINCT = 128
#: Rows the decision is made on (the sort then covers every row).
_KEY_SCREEN_ROWS = 512
#: Keys span fewer values than this (ids, not measurements; also bounds the screen's histograms).
_KEY_MAX_SPAN = 1 << 16
#: A column is keyed when, on the screened rows, the key order makes the sum of its absolute
#: differences smaller than this share of the sum in time order.
KEY_MAX_STEP_RATIO = 0.5
_NUMERIC = (DataType.FLOAT64, DataType.INT64)


@dataclass(frozen=True)
class _KeyPlan:
    key_id: int
    order: npt.NDArray[np.intp]  # stable sort of every row by the key
    keyed: frozenset[int]  # positions (in the group's columns) of the columns stored in key order


def _key_candidates(columns: _Columns, numeric: list[int]) -> list[int]:
    """Columns that look like a key: whole numbers with few distinct values that change on most rows,
    but not a rolling counter (a message counter also changes on every row and orders nothing)."""
    # Most columns change on few rows or are not whole numbers: one look at the first rows of all of
    # them at once settles it, and only the few that pass are screened further.
    first = np.empty((len(numeric), 64), dtype=np.float64)
    for j, i in enumerate(numeric):
        first[j] = columns[i][2][:64]
    steps = np.diff(first, axis=1)
    with np.errstate(invalid="ignore"):
        maybe = (
            (np.count_nonzero(steps != 0, axis=1) * 2 >= steps.shape[1])
            & (first == np.rint(first)).all(axis=1)
            & (np.abs(first) < 2**53).all(axis=1)
            & (first.max(axis=1) - first.min(axis=1) < _KEY_MAX_SPAN)
            # a counter steps the same way from row to row (+1, now and then a wrap)
            & (np.count_nonzero(steps[:, 1:] == steps[:, :-1], axis=1) * 5 <= (steps.shape[1] - 1) * 4)
        )
    found: list[int] = []
    for j in np.flatnonzero(maybe).tolist():
        i = numeric[j]
        data_type, head = columns[i][1], columns[i][2][:_KEY_SCREEN_ROWS]
        if int(np.count_nonzero(head[1:] != head[:-1])) * 2 < head.shape[0]:
            continue
        if data_type is DataType.FLOAT64:
            with np.errstate(invalid="ignore"):
                whole = (
                    np.isfinite(head).all() and (head == np.rint(head)).all() and (np.abs(head) < 2**53).all()
                )
            if not whole:
                continue
        keys = head.astype(np.int64)
        low = int(keys.min())
        if int(keys.max()) - low >= _KEY_MAX_SPAN:
            continue
        if not 2 <= np.count_nonzero(np.bincount(keys - low)) <= KEY_MAX_DISTINCT:
            continue
        steps = np.diff(keys)
        if int(np.bincount(steps - int(steps.min())).max()) * 5 > steps.shape[0] * 4:
            continue  # one step on ≥ 80 % of rows: a counter (wrapping once in a while)
        found.append(i)
    return found


def _plan_key(t_ns: npt.NDArray[Any], columns: _Columns) -> _KeyPlan | None:
    """Which key (if any) to store which columns of a group in the order of, decided before encoding.

    Decided from the screened rows by how much closer neighbouring values get in key order, so every
    column is encoded once: encoding the costliest columns both ways and keeping the smaller found the
    same keys on the real corpus but cost ~20 % more encode time.
    """
    rows = int(columns[0][2].shape[0]) if columns else 0
    if rows < KEY_MIN_ROWS or len(columns) < 3:
        return None
    # A group of interleaved series logs several rows at one instant (a receiver's epoch, a radar
    # scan): its time column repeats. Other groups (one row per frame or sample) are not screened.
    if int(np.count_nonzero(t_ns[1:] == t_ns[:-1])) * KEY_MIN_REPEATS < rows:
        return None
    numeric = [i for i, (_, data_type, _) in enumerate(columns) if data_type in _NUMERIC]
    if len(numeric) < 2:
        return None
    candidates = _key_candidates(columns, numeric)
    if not candidates:
        return None
    screened = min(rows, _KEY_SCREEN_ROWS)
    heads = np.empty((len(numeric), screened), dtype=np.float64)
    for j, i in enumerate(numeric):
        heads[j] = columns[i][2][:screened]
    natural = _step_sums(heads)
    best: tuple[int, int, frozenset[int]] | None = None
    for k in candidates:
        order = np.argsort(heads[numeric.index(k)], kind="stable")
        closer = (_step_sums(heads[:, order]) < KEY_MAX_STEP_RATIO * natural) & (natural > 0)
        keyed = [i for j, i in enumerate(numeric) if closer[j] and i != k]
        # Columns that look like keys themselves (a counter and the checksum computed from it) get
        # "closer" in key order without getting cheaper; a key must help some other column.
        if any(i not in candidates for i in keyed) and (best is None or len(keyed) > len(best[2])):
            best = (len(keyed), k, frozenset(keyed))
    if best is None:
        return None
    _, k, keyed_columns = best
    return _KeyPlan(columns[k][0], np.argsort(columns[k][2], kind="stable"), keyed_columns)


def _step_sums(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per row of ``values``: the sum of absolute differences between neighbours, over the finite
    ones (NaN fills and infinities skipped)."""
    with np.errstate(invalid="ignore", over="ignore"):
        steps = np.abs(np.diff(values, axis=1))
        steps[~np.isfinite(steps)] = 0.0
        sums: npt.NDArray[np.float64] = steps.sum(axis=1)
    return sums


def _encode_keyed(data_type: DataType, values: npt.NDArray[Any], key: _KeyPlan, v6: bool) -> _EncodedBlock:
    inner = _encode_values(data_type, values[key.order], v6)
    payload = _KEYED.pack(key.key_id, inner[0], inner[2]) + inner[1]
    return (CODEC_F64_KEYED if data_type is DataType.FLOAT64 else CODEC_I64_KEYED), payload, len(payload)


def _encode_multi(
    segment: Segment,
    encoded: dict[int, tuple[list[_EncodedBlock], int]] | None = None,
    *,
    derive: bool,
    v6: bool,
) -> bytes:
    """Format 4: several groups, one optional shared clock (see docs/segment-format.md, version 4).

    Each group's time block is whichever is smaller: its own timestamps (codec 2) or indices into the
    clock (codec 3). The clock is the sorted distinct timestamps of the groups that use it; a group
    whose indices cost more than its own timestamps leaves it and the clock is rebuilt without it (at
    most a few rounds: leaving only shrinks the clock), and the clock is dropped when it does not pay.
    ``encoded``: value blocks (and their text) already made for some groups, by position. The version
    is 5 when a column is keyed, else 4.
    """
    where = f"segment {segment.segment_id.hex() if isinstance(segment.segment_id, bytes) else '?'}"
    parts = segment.groups()
    if len(parts) > MAX_GROUPS:
        raise UserError(f"{where}: {len(parts)} groups exceed the limit of {MAX_GROUPS}")
    validated: list[tuple[npt.NDArray[np.int64], _Columns]] = []
    seen: set[int] = set()
    for part in parts:
        if part.segment_id != segment.segment_id:
            raise UserError(f"{where}: group {part.group!r} has another segment_id")
        if part.more_groups:
            raise UserError(f"{where}: group {part.group!r} has more_groups of its own")
        t_ns, columns = _validated(part)
        for signal_id, _, _ in columns:
            if signal_id in seen:
                raise UserError(f"{where}: signal id {signal_id} appears in two groups")
            seen.add(signal_id)
        validated.append((t_ns, columns))
    rows = sum(int(t.shape[0]) for t, _ in validated)
    ncols = sum(len(c) for _, c in validated)
    cells = sum(int(t.shape[0]) * (len(c) + 1) for t, c in validated)
    if rows > MAX_ROWS:
        raise UserError(f"{where}: {rows} rows exceed the limit of {MAX_ROWS}")
    if ncols > MAX_COLUMNS:
        raise UserError(f"{where}: {ncols} columns exceed the limit of {MAX_COLUMNS}")

    # Groups with the very same time column (the axes of one IMU split across families, two messages
    # decoded from one frame) name the first such group instead: 2 bytes, whatever the rows.
    same_as: dict[int, int] = {}
    first_with: dict[bytes, int] = {}
    for i, (t_ns, _) in enumerate(validated):
        if t_ns.shape[0]:
            j = first_with.setdefault(t_ns.tobytes(), i)
            if j != i:
                same_as[i] = j
    empty = np.zeros(0, dtype=np.int64)
    clock, clock_index = _choose_clock([empty if i in same_as else t for i, (t, _) in enumerate(validated)])
    clock_block = _encode_timestamps(clock)
    if cells + int(clock.shape[0]) > MAX_CELLS:
        raise UserError(f"{where}: {rows} rows in {ncols} columns exceed {MAX_CELLS} cells")
    time_range = segment.time_range()
    first_ns, last_ns = time_range if time_range is not None else (0, 0)

    text = 0
    version = 4
    #: per group: its header fields, column descriptors and blocks, rendered below (twice for format 6)
    rendered: list[tuple[bytes, list[tuple[int, DataType]], list[_EncodedBlock]]] = []
    for i, (part, (t_ns, columns)) in enumerate(zip(parts, validated, strict=True)):
        index = clock_index.get(i)
        if i in same_as:
            time_block = (CODEC_TS_SAME_AS, _U16.pack(same_as[i]), _U16.size)
        elif index is not None:
            time_block = _smaller(CODEC_TS_CLOCK_INDEX, *intstream.encode_with_zstd(index, _INDEX_ORDERS))
        else:
            time_block = _encode_timestamps(t_ns)
            if v6:
                offsets = _offset_times(i, validated, same_as, time_block)
                if offsets is not None:
                    time_block = offsets
                    version = 6
        known = encoded.get(i) if encoded else None
        if known is None:
            # the columns of the earlier groups stamped with the very same times
            root = same_as.get(i, i)
            stamped_with = [c for j in range(root, i) if same_as.get(j, j) == root for c in validated[j][1]]
            known = _encode_columns(part, columns, stamped_with, derive=derive, v6=v6)
        value_blocks, column_text = known
        if any(codec in _V5_CODECS for codec, _, _ in value_blocks):
            version = max(version, 5)
        if any(_uses_grid(codec, payload) for codec, payload, _ in value_blocks):
            version = 6
        text += column_text
        name = part.group.encode("utf-8")
        head = _U16.pack(len(name)) + name + _U32.pack(int(t_ns.shape[0]))
        rendered.append((head, [(sid, dt) for sid, dt, _ in columns], [time_block, *value_blocks]))
    if text > MAX_TEXT_BYTES:
        raise UserError(f"{where}: {text} bytes of distinct text exceed {MAX_TEXT_BYTES}")

    def body(compressed: bool) -> bytes:
        """The body as formats 4/5 frame it, or as a format 6 compressed body holds it before its zstd
        frame: blocks stored in fewer than :data:`BODY_RAW_BELOW` bytes without their own frame."""
        out = [_U16.pack(len(parts)), _U32.pack(int(clock.shape[0]))]
        for head, descriptors, blocks in [(b"", [], [clock_block]), *rendered]:
            kept = [_small_block_raw(b) for b in blocks] if compressed else blocks
            if head:
                out += [head, bytes([kept[0][0]]), _U16.pack(len(descriptors))]
            for (signal_id, data_type), (codec, _, _) in zip(descriptors, kept[1:], strict=True):
                out.append(_COLUMN.pack(signal_id, int(data_type), codec))
            for codec, payload, raw_len in kept:
                out += [_BLOCK.pack(codec, raw_len, len(payload)), payload]
        return b"".join(out)

    plain_body = body(False)
    if v6:
        inner = body(True)
        level = BODY_SMALL_LEVEL if len(inner) < BODY_SMALL else BODY_LEVEL
        packed = zstd_frames.compress(inner, level=level)
        if len(inner) <= BODY_MAX_RATIO * len(packed) + BODY_MAX_SLACK and len(packed) < len(plain_body):
            out = _FIXED.pack(MAGIC, 6, FLAG_BODY_ZSTD, segment.segment_id, rows, first_ns, last_ns) + packed
            return out + _CRC.pack(zlib.crc32(out))
    plain = _FIXED.pack(MAGIC, version, 0, segment.segment_id, rows, first_ns, last_ns) + plain_body
    return plain + _CRC.pack(zlib.crc32(plain))


#: Time offsets (format 6) are tried against at most this many earlier groups of as many rows (the
#: nearest ones), and taken when their planned stream is below this share of the group's own times.
OFFSET_CANDIDATES = 4
_OFFSET_SCREEN = 1.5
#: ... for groups whose own times cost at least this many bytes a row.
_OFFSET_MIN_BYTES_PER_ROW = 1


def _offset_times(
    i: int,
    validated: list[tuple[npt.NDArray[np.int64], _Columns]],
    same_as: dict[int, int],
    own: _EncodedBlock,
) -> _EncodedBlock | None:
    """Group ``i``'s time block as offsets from an earlier group's times (codec 5), when smaller.

    Why: messages that one node sends one after the other (a GNSS module's position, speed and
    attitude frames; an engine controller's two PGNs) arrive a nearly constant few hundred µs apart,
    so their times cost a few bits a row as offsets from the first message's and ~12–25 as their own
    arrival jitter. Screened on planned sizes; only the best candidate is encoded."""
    t_ns = validated[i][0]
    rows = int(t_ns.shape[0])
    if len(own[1]) < _OFFSET_MIN_BYTES_PER_ROW * rows or rows < 2:
        return None  # own times cheap already (a steady clock)
    candidates = [j for j in range(i - 1, -1, -1) if j not in same_as and validated[j][0].shape[0] == rows][
        :OFFSET_CANDIDATES
    ]
    best: tuple[int, int, npt.NDArray[np.int64]] | None = None
    for j in candidates:
        offsets = t_ns - validated[j][0]  # (wraps like the decoder's addition)
        planned = min(intstream.plan_size(offsets, 0), intstream.plan_size(offsets, 1))
        if best is None or planned < best[0]:
            best = (planned, j, offsets)
    if best is None or best[0] >= _OFFSET_SCREEN * len(own[1]):
        return None
    _, j, offsets = best
    codec, payload, raw_len = _smaller(CODEC_TS_OFFSET, _U16.pack(j) + intstream.encode(offsets))
    if len(payload) >= len(own[1]):
        return None
    return codec, payload, raw_len


def _uses_grid(codec: int, payload: bytes) -> bool:
    """Whether a value block is a grid float or wraps one (then its segment is format 6)."""
    if codec in _V6_CODECS:
        return True
    if codec in _WRAPPING_CODECS:  # keyed and difference blocks name their wrapped codec at byte 4
        return payload[4] in _V6_CODECS
    if codec == CODEC_F64_RECENT:  # the references block, then the literals block
        (stored,) = _U32.unpack_from(payload, 5)
        return payload[_BLOCK.size + stored] in _V6_CODECS
    return False


def _small_block_raw(block: _EncodedBlock) -> _EncodedBlock:
    """A block as a format 6 body holds it: a small one without its own zstd frame (the body's frame
    codes it, with tables shared by every small block instead of a frame and tables each)."""
    codec, payload, raw_len = block
    if codec & ZSTD_FLAG and len(payload) < BODY_RAW_BELOW:
        return codec & ~ZSTD_FLAG, zstd_frames.decompress(payload), raw_len
    return block


#: Difference orders tried for clock indices: they rise (a group's rows are in time order), so the
#: steps (order 1) or the change of step (order 2) are small; order 0 never wins.
_INDEX_ORDERS = (1, 2)
#: A group uses the shared clock when at least this share of its timestamps also occur in another
#: group that uses it (the screen is repeated once among the users; see :func:`_choose_clock`).
CLOCK_MIN_SHARED = 0.2
_CLOCK_ROUNDS = 2


def _choose_clock(
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


def _validated(segment: Segment) -> tuple[npt.NDArray[np.int64], _Columns]:
    """Checks an encoder must make so that it never writes bytes its own decoder would refuse."""
    where = f"segment {segment.segment_id.hex() if isinstance(segment.segment_id, bytes) else '?'}"
    if not isinstance(segment.segment_id, bytes) or len(segment.segment_id) != 16:
        raise UserError(f"{where}: segment_id must be 16 bytes")
    if len(segment.group.encode("utf-8")) > MAX_GROUP_BYTES:
        raise UserError(f"{where}: group name longer than {MAX_GROUP_BYTES} bytes")
    t_ns = np.asarray(segment.t_ns)
    if t_ns.ndim != 1 or t_ns.dtype.kind not in "iu":
        raise UserError(f"{where}: t_ns must be a 1-D integer array, got {t_ns.dtype} {t_ns.shape}")
    if t_ns.dtype.kind == "u" and t_ns.size and int(t_ns.max()) > np.iinfo(np.int64).max:
        raise UserError(f"{where}: t_ns exceeds the int64 range")
    t_ns = t_ns.astype(np.int64, copy=False)  # encoding never writes into the caller's arrays
    rows = int(t_ns.shape[0])
    if rows > MAX_ROWS:
        raise UserError(f"{where}: {rows} rows exceed the limit of {MAX_ROWS}")
    if set(segment.columns) != set(segment.data_types):
        raise UserError(f"{where}: columns and data_types name different signal ids")
    if len(segment.columns) > MAX_COLUMNS:
        raise UserError(f"{where}: {len(segment.columns)} columns exceed the limit of {MAX_COLUMNS}")
    if rows * (len(segment.columns) + 1) > MAX_CELLS:
        raise UserError(f"{where}: {rows} rows × {len(segment.columns)} columns exceed {MAX_CELLS} cells")
    out: _Columns = []
    for signal_id in sorted(segment.columns):
        if not 0 <= signal_id <= MAX_SIGNAL_ID:
            raise UserError(f"{where}: signal id {signal_id} outside 0..{MAX_SIGNAL_ID}")
        data_type = DataType(segment.data_types[signal_id])
        values = np.asarray(segment.columns[signal_id])
        if values.shape != (rows,):
            raise UserError(f"{where}: signal {signal_id} has shape {values.shape}, expected ({rows},)")
        if (data_type is DataType.STRING) != (values.dtype.kind in _TEXT_KINDS):
            raise UserError(f"{where}: signal {signal_id} is {data_type.name} but holds {values.dtype}")
        try:
            values = values.astype(data_type.numpy_dtype, casting="same_kind", copy=False)
        except TypeError:
            raise UserError(
                f"{where}: signal {signal_id} is {data_type.name} but holds {values.dtype}"
            ) from None
        out.append((signal_id, data_type, values))
    return t_ns, out


#: A float column whose best scaling is estimated (on its sample) above this many bytes a value is taken
#: for true doubles: only the bit-level codecs 19 and 16 are made.
_TRUE_DOUBLE_BYTES = 6.0
#: Plain doubles (codec 16) are tried only for a column still costing more than this many bytes a value
#: (on the real corpus they won once, on a column of near-noise).
_RAW_WORTH_TRYING = 6
#: A grid of another step is looked for only where the scaled estimate is at least this many bytes a
#: value (cheaper columns have little to gain, and the look costs a sort of the sample).
GRID_MIN_ESTIMATE = 0.75


def _zstd(raw: bytes) -> bytes:
    return zstd_frames.compress(raw)


def _smaller(codec: int, raw: bytes, compressed: bytes | None = None) -> tuple[int, bytes, int]:
    """The transform's bytes as they are, or zstd of them (``compressed`` if already made) if smaller.

    (A format 6 body takes small blocks' frames off again, see :func:`_small_block_raw`: every block
    is still compressed here, so that the choices between codecs compare what they would store.)"""
    if len(raw) >= _ZSTD_MIN_INPUT:
        packed = _zstd(raw) if compressed is None else compressed
        if len(packed) < len(raw):
            return codec | ZSTD_FLAG, packed, len(raw)
    return codec, raw, len(raw)


def _encode_timestamps(t_ns: npt.NDArray[np.int64]) -> tuple[int, bytes, int]:
    return _smaller(CODEC_TS_INTSTREAM, *intstream.encode_with_zstd(t_ns))


def _encode_values(data_type: DataType, values: npt.NDArray[Any], v6: bool) -> tuple[int, bytes, int]:
    if data_type is DataType.FLOAT64:
        floats = np.ascontiguousarray(values, dtype="<f8")
        rows = int(floats.shape[0])
        mode, exponent, estimate = decimal_float.choose_estimated(floats)
        best: _EncodedBlock | None = None
        exact = False
        # Not decimals (the scaling was not exact on the sample): perhaps a grid of another step — a
        # unit conversion, a calibration. Cheaper on the sample: the scaled encoding is not even made
        # (making both where the sample's gain was under 20 % and keeping the smaller came out the same
        # on the real corpus, ~3 % slower).
        found = grid_float.find_step(floats, estimate) if v6 and estimate >= GRID_MIN_ESTIMATE else None
        if found is not None:
            packed, planes = grid_float.encode_variants(floats, found[0])
            stepped = [(CODEC_F64_GRID, planes, len(planes))] if planes is not None else []
            if packed is not None:
                stepped.append(_smaller(CODEC_F64_GRID, packed))
            best = min(stepped, key=lambda block: len(block[1]))
        if estimate <= _TRUE_DOUBLE_BYTES and found is None:
            packed, planes, exact = decimal_float.encode_variants(floats, (mode, exponent))
            scaled = [(CODEC_F64_SCALED, planes, len(planes))] if planes is not None else []
            if packed is not None:
                scaled.append(_smaller(CODEC_F64_SCALED, packed))
            best = min(scaled if best is None else [best, *scaled], key=lambda block: len(block[1]))
        # else: true doubles (no scaling came near: the sample's best cost > 6 bytes a value, as for
        # GNSS pseudoranges or a pose) — the scaled encoding is not even made.
        if best is None or (not exact and len(best[1]) > 2 * rows):
            # Not a decimal or scaled integer in disguise (true doubles): first differences of the bits
            # win for slowly changing values, plain bytes for noise — but plain bytes (8 a value before
            # zstd) only when nothing so far came near them. XOR of neighbours (codec 17, still read)
            # is not tried: on every real data set one of these two was smaller.
            bits = floats.view("<u8")
            # (the stream's zstd frame was made while choosing its layout: not compressed twice)
            candidate = _smaller(
                CODEC_F64_BITS_INTSTREAM, *intstream.encode_with_zstd(bits.view(np.int64), (0, 1))
            )
            if best is None or len(candidate[1]) < len(best[1]):
                best = candidate
            if len(best[1]) > _RAW_WORTH_TRYING * rows:
                candidate = _smaller(CODEC_F64_RAW, bits.tobytes())
                if len(candidate[1]) < len(best[1]):
                    best = candidate
        return best
    if data_type is DataType.INT64:
        return _smaller(CODEC_I64_INTSTREAM, *intstream.encode_with_zstd(values))
    if data_type is DataType.STRING:
        return _smaller(CODEC_STR_DICT, strings.encode(values))  # (encode_segment measures text)
    raw = np.packbits(values.astype(np.bool_), bitorder="little").tobytes()
    return _smaller(CODEC_BOOL_PACKBITS, raw)


# --------------------------------------------------------------------------------------------- decode


class _Reader:
    """Bounds-checked cursor: every read names what it wanted, so truncation says where it happened."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CorruptSegmentError(
                f"segment truncated at byte {len(self.data)}: {what} needs bytes {self.pos}..{end}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))


@dataclass(frozen=True)
class _Block:
    codec: int
    raw_len: int
    payload: bytes
    what: str
    #: the segment's format version (what codecs the block and the blocks it wraps may use)
    version: int


def decode_segment(data: bytes) -> Segment:
    """Parse and verify segment bytes; any defect raises :class:`CorruptSegmentError` with a one-line reason.

    Order matters: framing (lengths) is checked first so truncation is reported as such, then the
    checksum, and only then are blocks decompressed — never more than the header implies. A format 6
    compressed body is the exception: its checksum is verified first, then the body decompressed
    (capped, see :data:`BODY_MAX_RATIO`), then its framing checked as above.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptSegmentError(f"segment must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        opened = _opened(data)
        header = _parse_framing(opened)
        if opened is data:  # (an opened body's checksum was verified before decompressing it)
            _check_crc(data)
        return _decode_blocks(header)
    except (struct.error, zstandard.ZstdError, ValueError) as exc:  # defensive: every case is checked above
        raise CorruptSegmentError(f"segment undecodable: {exc}") from None


@dataclass(frozen=True)
class _GroupHeader:
    group: str
    rows: int
    columns: list[tuple[int, DataType]]
    #: the time block, then one value block per column
    blocks: list[_Block]


@dataclass(frozen=True)
class _Header:
    segment_id: bytes
    rows: int
    first_ns: int
    last_ns: int
    groups: list[_GroupHeader]
    #: format 4's shared clock block (``None`` before format 4) and its row count
    clock: _Block | None = None
    clock_rows: int = 0


def _opened(data: bytes) -> bytes:
    """The segment as :func:`_parse_framing` reads it: a format 6 segment with a compressed body gets its
    checksum verified, then its body decompressed — never to more than :data:`BODY_MAX_RATIO` times the
    stored bytes — and its flag cleared (offsets in later errors are then offsets in the opened body).
    Every other segment is returned as it is."""
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        return data
    version, flags = struct.unpack_from("<HH", data, 4)
    if version not in READ_VERSIONS or version < 6 or not flags & FLAG_BODY_ZSTD:
        return data  # (an unknown version is refused by its number, before anything is decompressed)
    if len(data) < _FIXED.size + _CRC.size:
        raise CorruptSegmentError(
            f"segment truncated at byte {len(data)}: "
            f"the compressed body and checksum start at byte {_FIXED.size}"
        )
    _check_crc(data)
    stored = data[_FIXED.size : len(data) - _CRC.size]
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError:
        raise CorruptSegmentError(f"compressed body at byte {_FIXED.size}: not a zstd frame") from None
    limit = BODY_MAX_RATIO * len(stored) + BODY_MAX_SLACK
    if not _SMALLEST_BODY <= declared <= limit:
        raise CorruptSegmentError(
            f"compressed body at byte {_FIXED.size}: declares {declared} bytes "
            f"(at most {limit} for its {len(stored)} stored bytes)"
        )
    try:
        body = zstandard.ZstdDecompressor().decompress(
            stored, max_output_size=declared, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CorruptSegmentError(f"compressed body at byte {_FIXED.size}: zstd error: {exc}") from None
    if len(body) != declared:
        raise CorruptSegmentError(f"compressed body decompressed to {len(body)} bytes, declares {declared}")
    return data[:6] + _U16.pack(flags & ~FLAG_BODY_ZSTD) + data[8 : _FIXED.size] + body + data[-_CRC.size :]


def _parse_framing(data: bytes) -> _Header:
    r = _Reader(data)
    if len(data) >= 4 and data[:4] != MAGIC:
        raise CorruptSegmentError(f"not a segment: magic is {data[:4]!r}, expected {MAGIC!r}")
    if len(data) >= 6:
        (version,) = _U16.unpack_from(data, 4)
        if version not in READ_VERSIONS:
            raise CorruptSegmentError(
                f"unsupported segment format version {version} "
                f"(this build reads {', '.join(map(str, sorted(READ_VERSIONS)))})"
            )
    magic, version, flags, segment_id, rows, first_ns, last_ns = r.unpack(_FIXED, "fixed header")
    if magic != MAGIC:  # pragma: no cover - checked above whenever 4 bytes exist
        raise CorruptSegmentError(f"not a segment: magic is {magic!r}")
    if flags != 0:
        raise CorruptSegmentError(f"unknown header flags 0x{flags:04x} at byte 6")
    if rows > MAX_ROWS:
        raise CorruptSegmentError(f"impossible row count {rows} (limit {MAX_ROWS})")
    if version < 4:
        group = _parse_group(r, version, rows, "", _TS_CODECS, 0, set(), 0)
        header = _Header(segment_id, rows, first_ns, last_ns, [group])
    else:
        (ngroups,) = r.unpack(_U16, "group count")
        if not 1 <= ngroups <= MAX_GROUPS:
            raise CorruptSegmentError(f"impossible group count {ngroups} (1 … {MAX_GROUPS})")
        (clock_rows,) = r.unpack(_U32, "clock row count")
        if clock_rows > rows:
            raise CorruptSegmentError(f"clock of {clock_rows} rows exceeds the segment's {rows} rows")
        clock = _parse_block(r, "clock block", _TS_CODECS, clock_rows, version)
        groups: list[_GroupHeader] = []
        seen: set[int] = set()
        total_rows = columns = 0
        cells = clock_rows
        for g in range(ngroups):
            where = f"group {g}: "
            ts_codecs = _GROUP_TS_CODECS_V6 if version >= 6 else _GROUP_TS_CODECS
            group = _parse_group(r, version, -1, where, ts_codecs, columns, seen, cells)
            groups.append(group)
            total_rows += group.rows
            columns += len(group.columns)
            cells += group.rows * (len(group.columns) + 1)
            if total_rows > rows:
                raise CorruptSegmentError(f"{where}rows add up to more than the segment's {rows}")
        if total_rows != rows:
            raise CorruptSegmentError(f"groups hold {total_rows} rows, header says {rows}")
        header = _Header(segment_id, rows, first_ns, last_ns, groups, clock, clock_rows)
    r.take(_CRC.size, "checksum")
    if r.pos != len(data):
        raise CorruptSegmentError(f"{len(data) - r.pos} unexpected bytes after the checksum")
    return header


def _parse_group(
    r: _Reader,
    version: int,
    rows: int,
    where: str,
    ts_codecs: frozenset[int],
    columns_before: int,
    seen: set[int],
    cells_before: int,
) -> _GroupHeader:
    """One group's header and block framing; ``rows`` < 0 means the group states its own (format 4)."""
    (group_len,) = r.unpack(_U16, f"{where}group name length")
    if group_len > MAX_GROUP_BYTES:
        raise CorruptSegmentError(f"{where}group name length {group_len} exceeds {MAX_GROUP_BYTES}")
    group_bytes = r.take(group_len, f"{where}group name")
    try:
        group = group_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptSegmentError(f"{where}group name is not valid UTF-8") from None
    if rows < 0:
        (rows,) = r.unpack(_U32, f"{where}row count")
        if rows > MAX_ROWS:
            raise CorruptSegmentError(f"{where}impossible row count {rows} (limit {MAX_ROWS})")
    ts_codec = r.take(1, f"{where}timestamp codec id")[0]
    if ts_codec not in ts_codecs:
        raise CorruptSegmentError(f"{where}unknown timestamp codec id {ts_codec}")
    (ncols,) = r.unpack(_U16, f"{where}column count")
    if columns_before + ncols > MAX_COLUMNS:
        raise CorruptSegmentError(f"{where}impossible column count {ncols} (limit {MAX_COLUMNS})")
    if cells_before + rows * (ncols + 1) > MAX_CELLS:
        raise CorruptSegmentError(
            f"{where}impossible size: {rows} rows × {ncols} columns exceed {MAX_CELLS} cells"
        )
    columns: list[tuple[int, DataType]] = []
    codecs = [ts_codec]
    for i in range(ncols):
        signal_id, dt_raw, codec = r.unpack(_COLUMN, f"{where}column {i} descriptor")
        try:
            data_type = DataType(dt_raw)
        except ValueError:
            raise CorruptSegmentError(f"{where}column {i}: unknown data type {dt_raw}") from None
        if codec not in _VALUE_CODECS[data_type]:
            raise CorruptSegmentError(
                f"{where}column {i}: codec id {codec} is not valid for {data_type.name}"
            )
        if version < 3 and codec & ~ZSTD_FLAG in _V3_CODECS:
            raise CorruptSegmentError(
                f"{where}column {i}: codec id {codec} needs format version 3, segment is {version}"
            )
        if version < 5 and codec in _V5_CODECS:
            raise CorruptSegmentError(
                f"{where}column {i}: codec id {codec} needs format version 5, segment is {version}"
            )
        if version < 6 and codec in _V6_CODECS:
            raise CorruptSegmentError(
                f"{where}column {i}: codec id {codec} needs format version 6, segment is {version}"
            )
        if signal_id in seen:
            raise CorruptSegmentError(f"{where}column {i}: signal id {signal_id} appears twice")
        seen.add(signal_id)
        columns.append((signal_id, data_type))
        codecs.append(codec)
    blocks: list[_Block] = []
    for i, expected_codec in enumerate(codecs):
        what = f"{where}timestamp block" if i == 0 else f"value block of signal {columns[i - 1][0]}"
        blocks.append(_parse_block(r, what, frozenset({expected_codec}), rows, version))
    return _GroupHeader(group, rows, columns, blocks)


def _parse_block(r: _Reader, what: str, codecs: frozenset[int], rows: int, version: int) -> _Block:
    start = r.pos
    codec, raw_len, stored_len = r.unpack(_BLOCK, f"{what} header")
    if codec not in codecs:
        expected = next(iter(codecs)) if len(codecs) == 1 else "a timestamp codec"
        raise CorruptSegmentError(
            f"{what} at byte {start}: codec id {codec} differs from header's {expected}"
        )
    lo, hi = _raw_len_bounds(codec, rows)
    if not lo <= raw_len <= hi:
        raise CorruptSegmentError(
            f"{what} at byte {start}: decoded length {raw_len} impossible for {rows} rows"
        )
    if not codec & ZSTD_FLAG and stored_len != raw_len:
        raise CorruptSegmentError(
            f"{what} at byte {start}: stored length {stored_len} differs from decoded length {raw_len}"
        )
    payload = r.take(stored_len, what)
    return _Block(codec, raw_len, payload, what, version)


def _raw_len_bounds(codec: int, rows: int) -> tuple[int, int]:
    """The decoded size a block may have for ``rows`` rows: the cap on what decompression may produce."""
    base = codec & ~ZSTD_FLAG
    if codec == CODEC_TS_SAME_AS:
        return _U16.size, _U16.size
    if base == CODEC_TS_OFFSET:
        return _U16.size + 1, _U16.size + intstream.max_encoded_size(rows)
    if base in (CODEC_TS_INTSTREAM, CODEC_TS_CLOCK_INDEX, CODEC_I64_INTSTREAM, CODEC_F64_BITS_INTSTREAM):
        return 1, intstream.max_encoded_size(rows)
    if base == CODEC_F64_SCALED:
        return 1, decimal_float.max_encoded_size(rows)
    if base == CODEC_F64_GRID:
        return 1, grid_float.max_encoded_size(rows)
    if base in (CODEC_F64_RAW, CODEC_F64_XOR):
        return rows * 8, rows * 8
    if base == CODEC_STR_DICT:
        return 1, strings.max_encoded_size(rows)
    if codec in _DICT_CODECS:
        most = intstream.max_encoded_size(DICT_MAX_VALUES) + intstream.max_encoded_size(rows)
        return _U32.size + 2 * _BLOCK.size + 2, _U32.size + 2 * _BLOCK.size + most
    # (the largest block a keyed, difference or recent-values block may wrap: a grid float's)
    inner = max(grid_float.max_encoded_size(rows), intstream.max_encoded_size(rows), rows * 8)
    if codec == CODEC_F64_RECENT:
        return 2 * _BLOCK.size + 2, 2 * _BLOCK.size + intstream.max_encoded_size(rows) + inner
    if codec in _WRAPPING_CODECS:
        if codec == CODEC_F64_DIFF:  # (its header, then up to one patch of 12 bytes a row)
            return _DIFF.size + 1, _DIFF.size + 12 * rows + inner
        return _KEYED.size + 1, _KEYED.size + inner
    n = (rows + 7) // 8
    return n, n


def _check_crc(data: bytes) -> None:
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    actual = zlib.crc32(memoryview(data)[: len(data) - _CRC.size])
    if stored != actual:
        raise CorruptSegmentError(f"checksum mismatch: stored 0x{stored:08x}, computed 0x{actual:08x}")


def _unzstd(block: _Block) -> bytes:
    if not block.codec & ZSTD_FLAG:
        return block.payload
    try:
        declared = zstandard.frame_content_size(block.payload)
    except zstandard.ZstdError:
        raise CorruptSegmentError(f"{block.what}: not a zstd frame") from None
    if declared != block.raw_len:
        raise CorruptSegmentError(
            f"{block.what}: zstd frame declares {declared} bytes, header says {block.raw_len}"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(
            block.payload, max_output_size=block.raw_len, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CorruptSegmentError(f"{block.what}: zstd error: {exc}") from None
    if len(raw) != block.raw_len:
        raise CorruptSegmentError(
            f"{block.what}: decompressed to {len(raw)} bytes, header says {block.raw_len}"
        )
    return bytes(raw)


def _decode_blocks(header: _Header) -> Segment:
    clock = None if header.clock is None else _decode_ints(header.clock, header.clock_rows)
    text_left = MAX_TEXT_BYTES
    parts: list[Segment] = []
    for group in header.groups:
        part, text = _decode_group(header.segment_id, group, clock, text_left, parts)
        text_left -= text
        parts.append(part)
    ranges = [(int(p.t_ns.min()), int(p.t_ns.max())) for p in parts if p.t_ns.shape[0]]
    first = min((r[0] for r in ranges), default=0)
    last = max((r[1] for r in ranges), default=0)
    if (first, last) != (header.first_ns, header.last_ns):
        raise CorruptSegmentError(
            f"header time range {header.first_ns}..{header.last_ns} differs from timestamps {first}..{last}"
        )
    head = parts[0]
    head.more_groups = tuple(parts[1:])
    return head


def _decode_group(
    segment_id: bytes,
    header: _GroupHeader,
    clock: npt.NDArray[np.int64] | None,
    text_left: int,
    earlier: list[Segment],
) -> tuple[Segment, int]:
    """One group's segment and the distinct text it used (counted against the segment's limit)."""
    rows = header.rows
    ts_block = header.blocks[0]
    if ts_block.codec == CODEC_TS_SAME_AS:
        (j,) = _U16.unpack(ts_block.payload)
        if j >= len(earlier) or earlier[j].t_ns.shape[0] != rows:
            raise CorruptSegmentError(
                f"{ts_block.what}: names group {j}, which is not an earlier group of {rows} rows"
            )
        t_ns = earlier[j].t_ns.copy()
    elif ts_block.codec & ~ZSTD_FLAG == CODEC_TS_OFFSET:
        raw = _unzstd(ts_block)
        (j,) = _U16.unpack_from(raw, 0)
        if j >= len(earlier) or earlier[j].t_ns.shape[0] != rows:
            raise CorruptSegmentError(
                f"{ts_block.what}: offsets from group {j}, which is not an earlier group of {rows} rows"
            )
        try:
            offsets, end = intstream.decode(raw, _U16.size, rows)
        except intstream.StreamError as exc:
            raise CorruptSegmentError(f"{ts_block.what}: {exc}") from None
        if end != len(raw):
            raise CorruptSegmentError(f"{ts_block.what}: {len(raw) - end} bytes after the offsets")
        t_ns = earlier[j].t_ns + offsets  # (wrapping, as the encoder's subtraction)
    elif ts_block.codec & ~ZSTD_FLAG == CODEC_TS_CLOCK_INDEX:
        assert clock is not None  # only format 4 allows the codec, and format 4 always has a clock
        index = _decode_ints(ts_block, rows)
        if rows and (int(index.min()) < 0 or int(index.max()) >= clock.shape[0]):
            raise CorruptSegmentError(f"{ts_block.what}: clock index outside 0..{clock.shape[0] - 1}")
        t_ns = clock[index]
    else:
        t_ns = _decode_ints(ts_block, rows)
    decoded: dict[int, npt.NDArray[Any]] = {}
    data_types = dict(header.columns)
    text_used = 0
    for (signal_id, data_type), block in zip(header.columns, header.blocks[1:], strict=True):
        if block.codec not in _WRAPPING_CODECS:  # keyed columns after their keys, differences last
            decoded[signal_id], text = _decode_values(block, data_type, rows, text_left - text_used)
            text_used += text
    orders: dict[int, npt.NDArray[np.intp]] = {}
    unkeyed = dict(decoded)  # a key is never keyed itself
    for (signal_id, data_type), block in zip(header.columns, header.blocks[1:], strict=True):
        if block.codec in _KEYED_CODECS:
            decoded[signal_id] = _decode_keyed(block, data_type, rows, unkeyed, data_types, orders)
    # differences last: from a column of an earlier group of as many rows, or a non-difference of this one
    refs = {
        signal_id: values
        for part in earlier
        if part.t_ns.shape[0] == rows
        for signal_id, values in part.columns.items()
        if part.data_types[signal_id] is DataType.FLOAT64
    }
    refs.update((sid, v) for sid, v in decoded.items() if data_types[sid] is DataType.FLOAT64)
    for (signal_id, _), block in zip(header.columns, header.blocks[1:], strict=True):
        if block.codec == CODEC_F64_DIFF:
            decoded[signal_id] = _decode_difference(block, rows, refs)
    columns = {signal_id: decoded[signal_id] for signal_id, _ in header.columns}
    return Segment(segment_id, header.group, t_ns, columns, data_types), text_used


def _decode_keyed(
    block: _Block,
    data_type: DataType,
    rows: int,
    decoded: dict[int, npt.NDArray[Any]],
    data_types: dict[int, DataType],
    orders: dict[int, npt.NDArray[np.intp]],
) -> npt.NDArray[Any]:
    """A keyed column: the wrapped block holds the values in the order of a stable sort by the key."""
    key_id, codec, raw_len = _KEYED.unpack_from(block.payload)
    if key_id not in decoded or data_types[key_id] not in _NUMERIC:
        raise CorruptSegmentError(
            f"{block.what}: key signal {key_id} is not an unkeyed number column of this group"
        )
    values = _decode_wrapped(block, codec, raw_len, data_type, rows)
    order = orders.get(key_id)
    if order is None:
        order = orders[key_id] = np.argsort(decoded[key_id], kind="stable")
    out = np.empty_like(values)
    out[order] = values
    return out


def _decode_difference(
    block: _Block, rows: int, refs: dict[int, npt.NDArray[np.float64]]
) -> npt.NDArray[Any]:
    """A difference column: the wrapped FLOAT64 block plus the reference column in IEEE doubles, then
    the patched rows' exact values."""
    ref_id, codec, raw_len, npatches = _DIFF.unpack_from(block.payload)
    ref = refs.get(ref_id)
    if ref is None:
        raise CorruptSegmentError(
            f"{block.what}: reference signal {ref_id} is no FLOAT64 column of {rows} rows decoded before"
        )
    patch_end = _DIFF.size + 12 * npatches
    if npatches > rows or len(block.payload) <= patch_end:
        raise CorruptSegmentError(f"{block.what}: {npatches} patched rows impossible for {rows} rows")
    positions = np.frombuffer(block.payload, dtype="<u4", count=npatches, offset=_DIFF.size).astype(np.int64)
    if npatches and (int(positions[-1]) >= rows or (npatches > 1 and bool((np.diff(positions) <= 0).any()))):
        raise CorruptSegmentError(f"{block.what}: patched rows out of range or not increasing")
    exact = np.frombuffer(block.payload, dtype="<f8", count=npatches, offset=_DIFF.size + 4 * npatches)
    values = _decode_wrapped(block, codec, raw_len, DataType.FLOAT64, rows, patch_end)
    with np.errstate(invalid="ignore", over="ignore"):
        out: npt.NDArray[np.float64] = ref + values
    out[positions] = exact
    return out


def _decode_wrapped(
    block: _Block, codec: int, raw_len: int, data_type: DataType, rows: int, start: int = _KEYED.size
) -> npt.NDArray[Any]:
    """The values of the block a keyed or difference block wraps (its framing checked like a block's)."""
    if codec not in _PLAIN_VALUE_CODECS[data_type]:
        raise CorruptSegmentError(
            f"{block.what}: {'keyed' if block.codec in _KEYED_CODECS else 'difference'} block wraps "
            f"codec id {codec}, not valid for {data_type.name}"
        )
    lo, hi = _raw_len_bounds(codec, rows)
    payload = block.payload[start:]
    if not lo <= raw_len <= hi or (not codec & ZSTD_FLAG and len(payload) != raw_len):
        raise CorruptSegmentError(f"{block.what}: wrapped block's lengths impossible for {rows} rows")
    return _decode_values(_Block(codec, raw_len, payload, block.what, block.version), data_type, rows, 0)[0]


def _decode_values(
    block: _Block, data_type: DataType, rows: int, text_left: int
) -> tuple[npt.NDArray[Any], int]:
    """One plain value block's values and the distinct text they used."""
    base = block.codec & ~ZSTD_FLAG
    values: npt.NDArray[Any]
    text = 0
    if base == CODEC_I64_INTSTREAM:
        values = _decode_ints(block, rows)
    elif base == CODEC_F64_BITS_INTSTREAM:
        values = _decode_ints(block, rows).view(np.float64)
    elif base == CODEC_F64_SCALED:
        try:
            values = decimal_float.decode(_unzstd(block), rows)
        except intstream.StreamError as exc:
            raise CorruptSegmentError(f"{block.what}: {exc}") from None
    elif base == CODEC_F64_GRID:
        if block.version < 6:  # (at the top level the framing refused it already; this is a wrapped one)
            raise CorruptSegmentError(
                f"{block.what}: codec id {block.codec} needs format version 6, segment is {block.version}"
            )
        try:
            values = grid_float.decode(_unzstd(block), rows)
        except intstream.StreamError as exc:
            raise CorruptSegmentError(f"{block.what}: {exc}") from None
    elif base == CODEC_STR_DICT:
        try:
            values, text = strings.decode(_unzstd(block), rows, text_left)
        except intstream.StreamError as exc:
            raise CorruptSegmentError(f"{block.what}: {exc}") from None
    elif base == CODEC_F64_RECENT:
        values = _decode_recent(block, rows)
    elif block.codec in _DICT_CODECS:
        values = _decode_dictionary(block, rows)
        if data_type is DataType.FLOAT64:
            values = values.view(np.float64)
    elif base == CODEC_F64_RAW:
        values = np.frombuffer(_unzstd(block), dtype="<f8").astype(np.float64)
    elif base == CODEC_F64_XOR:
        bits = np.bitwise_xor.accumulate(np.frombuffer(_unzstd(block), dtype="<u8").astype(np.uint64))
        values = bits.view(np.float64)
    else:
        packed = np.frombuffer(_unzstd(block), dtype=np.uint8)
        bits_all = np.unpackbits(packed, bitorder="little")
        if bits_all[rows:].any():
            raise CorruptSegmentError(f"{block.what}: padding bits after the last row are set")
        values = bits_all[:rows].astype(np.bool_)
    return values, text


def _nested_blocks(block: _Block, start: int, parts: list[tuple[str, frozenset[int]]]) -> list[_Block]:
    """Blocks framed inside a block's payload (as in *Blocks*), from ``start``, filling it exactly."""
    payload = block.payload
    pos = start
    out: list[_Block] = []
    for what, codecs in parts:
        if pos + _BLOCK.size > len(payload):
            raise CorruptSegmentError(f"{block.what}: truncated in the {what} header")
        codec, raw_len, stored = _BLOCK.unpack_from(payload, pos)
        pos += _BLOCK.size
        if codec not in codecs:
            raise CorruptSegmentError(f"{block.what}: {what} in codec {codec}")
        if pos + stored > len(payload) or (not codec & ZSTD_FLAG and stored != raw_len):
            raise CorruptSegmentError(f"{block.what}: {what} have impossible lengths")
        out.append(
            _Block(codec, raw_len, payload[pos : pos + stored], f"{block.what} ({what})", block.version)
        )
        pos += stored
    if pos != len(payload):
        raise CorruptSegmentError(f"{block.what}: {len(payload) - pos} bytes after the {parts[-1][0]}")
    return out


_INT_STREAM_CODECS = frozenset({CODEC_I64_INTSTREAM, CODEC_I64_INTSTREAM | ZSTD_FLAG})


def _decode_dictionary(block: _Block, rows: int) -> npt.NDArray[np.int64]:
    """A dictionary block: the count, the distinct values (bits), one index per row."""
    if len(block.payload) < _U32.size:
        raise CorruptSegmentError(f"{block.what}: dictionary truncated")
    (count,) = _U32.unpack_from(block.payload, 0)
    if not 1 <= count <= min(DICT_MAX_VALUES, max(rows, 1)):
        raise CorruptSegmentError(f"{block.what}: {count} dictionary entries impossible for {rows} rows")
    entries, indices = _nested_blocks(
        block, _U32.size, [("dictionary entries", _INT_STREAM_CODECS), ("indices", _INT_STREAM_CODECS)]
    )
    for part, n in ((entries, count), (indices, rows)):
        lo, hi = _raw_len_bounds(part.codec, n)
        if not lo <= part.raw_len <= hi:
            raise CorruptSegmentError(f"{part.what}: impossible length for {n} values")
    table = _decode_ints(entries, count)
    index = _decode_ints(indices, rows)
    if rows and (int(index.min()) < 0 or int(index.max()) >= count):
        raise CorruptSegmentError(f"{block.what}: an index outside the {count} dictionary entries")
    out: npt.NDArray[np.int64] = table[index]
    return out


def _decode_recent(block: _Block, rows: int) -> npt.NDArray[np.float64]:
    """Recent values: the references (an integer stream), then the literals (a FLOAT64 block)."""
    parts = _nested_blocks(
        block, 0, [("references", _INT_STREAM_CODECS), ("literals", _PLAIN_VALUE_CODECS[DataType.FLOAT64])]
    )
    ref_block, literal_block = parts
    lo, hi = _raw_len_bounds(ref_block.codec, rows)
    if not lo <= ref_block.raw_len <= hi:
        raise CorruptSegmentError(f"{block.what}: references of recent values impossible for {rows} rows")
    refs = _decode_ints(ref_block, rows)
    row = np.arange(rows, dtype=np.int64)
    if rows and (int(refs.min()) < 0 or int(refs.max()) > RECENT_WINDOW or bool((refs > row).any())):
        raise CorruptSegmentError(f"{block.what}: a reference points outside 0..{RECENT_WINDOW} rows back")
    literal = refs == 0
    count = int(np.count_nonzero(literal))
    lo, hi = _raw_len_bounds(literal_block.codec, count)
    if not lo <= literal_block.raw_len <= hi:
        raise CorruptSegmentError(f"{block.what}: literals of recent values impossible for {count} rows")
    literals = _decode_values(literal_block, DataType.FLOAT64, count, 0)[0]
    # Every reference points strictly back, so following them ends at a literal; pointer jumping gets
    # there in at most log2(rows) + 1 rounds.
    source = row - refs
    for _ in range(64):
        further = source[source]
        if np.array_equal(further, source):
            break
        source = further
    out: npt.NDArray[np.float64] = literals[(np.cumsum(literal) - 1)[source]]
    return out


def _decode_ints(block: _Block, rows: int) -> npt.NDArray[np.int64]:
    raw = _unzstd(block)
    try:
        values, end = intstream.decode(raw, 0, rows)
    except intstream.StreamError as exc:
        raise CorruptSegmentError(f"{block.what}: {exc}") from None
    if end != len(raw):
        raise CorruptSegmentError(f"{block.what}: {len(raw) - end} bytes after the integer stream")
    return values
