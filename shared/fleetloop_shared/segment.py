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
* A writer stamps the *lowest* format version that expresses the segment (2 unless a column is text),
  so a cloud that reads only version 2 keeps accepting every segment without text.
* Decoding trusts nothing: every length is checked against what the header implies *before* anything is
  allocated or decompressed, and the checksum is verified before any block is decompressed, so hostile or
  truncated bytes end in :class:`CorruptSegmentError` rather than in a crash, a huge allocation or a
  silently wrong value.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.codecs import decimal_float, intstream, strings, zstd_frames
from fleetloop_shared.errors import CorruptSegmentError, UserError
from fleetloop_shared.samples import GroupBatch

#: The newest format version this build writes (and reads).
FORMAT_VERSION: int = 3
#: Every version this build reads (the versioning rule: readers keep reading what was ever released).
READ_VERSIONS: frozenset[int] = frozenset({2, 3})
MAGIC: bytes = b"FLSG"

#: Hard limits a decoder enforces before it allocates anything; an encoder refuses to exceed them too.
MAX_ROWS = 50_000_000
MAX_COLUMNS = 4096
#: Rows × (columns + 1): caps what one segment may decode to (~800 MB of 8-byte cells) whatever it claims.
MAX_CELLS = 100_000_000
MAX_GROUP_BYTES = 1024
MAX_SIGNAL_ID = 2**32 - 1
#: Distinct text of all STRING columns of one segment, UTF-8 bytes: what one segment's text may decode to.
MAX_TEXT_BYTES = strings.MAX_TEXT_BYTES

# Codec ids (one byte, stable forever within a format version; see docs/segment-format.md). The high
# bit (ZSTD_FLAG) says the block's payload is a zstd frame of the transform's bytes.
CODEC_TS_INTSTREAM = 2
CODEC_F64_RAW = 16
CODEC_F64_XOR = 17
CODEC_F64_SCALED = 18
CODEC_F64_BITS_INTSTREAM = 19
CODEC_I64_INTSTREAM = 33
CODEC_BOOL_PACKBITS = 48
CODEC_STR_DICT = 64  # format version 3
ZSTD_FLAG = 0x80
# Names kept for callers of format version 1 (the zstd-wrapped forms of the same transforms).
CODEC_F64_RAW_ZSTD = CODEC_F64_RAW | ZSTD_FLAG
CODEC_F64_XOR_ZSTD = CODEC_F64_XOR | ZSTD_FLAG

_TS_CODECS = frozenset({CODEC_TS_INTSTREAM, CODEC_TS_INTSTREAM | ZSTD_FLAG})


def _with_flag(*codecs: int) -> frozenset[int]:
    return frozenset(c | f for c in codecs for f in (0, ZSTD_FLAG))


_VALUE_CODECS: dict[DataType, frozenset[int]] = {
    DataType.FLOAT64: _with_flag(CODEC_F64_RAW, CODEC_F64_XOR, CODEC_F64_SCALED, CODEC_F64_BITS_INTSTREAM),
    DataType.INT64: _with_flag(CODEC_I64_INTSTREAM),
    DataType.BOOL: _with_flag(CODEC_BOOL_PACKBITS),
    DataType.STRING: _with_flag(CODEC_STR_DICT),
}
#: Codec ids (base, flag clear) that need format version 3; a version 2 segment naming one is corrupt.
_V3_CODECS = frozenset({CODEC_STR_DICT})
#: Below this many bytes a zstd frame (≥ 9 bytes of framing) cannot win; not tried.
_ZSTD_MIN_INPUT = 24

# magic, version, flags, segment id, row count, first ns, last ns
_FIXED = struct.Struct("<4sHH16sQqq")
_U16 = struct.Struct("<H")
_COLUMN = struct.Struct("<IBB")  # signal id, data type, codec id
_BLOCK = struct.Struct("<BII")  # codec id, raw (decompressed) length, stored (compressed) length
_CRC = struct.Struct("<I")


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

    Equality is bit-exact (NaN payloads and -0.0 included), which is what a codec round trip promises.
    """

    segment_id: bytes
    group: str
    t_ns: npt.NDArray[np.int64]
    columns: dict[int, npt.NDArray[Any]]
    data_types: dict[int, DataType]

    @property
    def sample_count(self) -> int:
        """Number of (timestamp, value) samples: rows × columns."""
        return int(self.t_ns.shape[0]) * len(self.columns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        if (
            self.segment_id != other.segment_id
            or self.group != other.group
            or self.data_types != other.data_types
            or self.columns.keys() != other.columns.keys()
            or not _bits_equal(self.t_ns, other.t_ns)
        ):
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


# --------------------------------------------------------------------------------------------- encode


def encode_segment(segment: Segment) -> bytes:
    """The segment's bytes (format version :data:`FORMAT_VERSION`); raises UserError on an invalid one."""
    t_ns, columns = _validated(segment)
    rows = int(t_ns.shape[0])
    first_ns = int(t_ns.min()) if rows else 0
    last_ns = int(t_ns.max()) if rows else 0
    group = segment.group.encode("utf-8")

    blocks: list[tuple[int, bytes, int]] = [_encode_timestamps(t_ns)]
    text = 0  # distinct text of the STRING columns, capped per segment exactly as the decoder caps it
    for signal_id, data_type, values in columns:
        try:
            if data_type is DataType.STRING:
                payload, column_text = strings.encode_measured(values)
                text += column_text
                blocks.append(_smaller(CODEC_STR_DICT, payload))
            else:
                blocks.append(_encode_values(data_type, values))
        except strings.TextError as exc:
            raise UserError(f"segment {segment.segment_id.hex()}: signal {signal_id}: {exc}") from None
    if text > MAX_TEXT_BYTES:
        raise UserError(
            f"segment {segment.segment_id.hex()}: {text} bytes of distinct text exceed {MAX_TEXT_BYTES}"
        )
    # The lowest version that expresses these blocks: readers of version 2 keep reading segments
    # without text (the versioning rule's rollout order then only matters for text).
    version = 3 if any(codec & ~ZSTD_FLAG in _V3_CODECS for codec, _, _ in blocks) else 2

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
    return body + _CRC.pack(zlib.crc32(body))


_Columns = list[tuple[int, DataType, npt.NDArray[Any]]]


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


def _zstd(raw: bytes) -> bytes:
    return zstd_frames.compress(raw)


def _smaller(codec: int, raw: bytes, compressed: bytes | None = None) -> tuple[int, bytes, int]:
    """The transform's bytes as they are, or zstd of them (``compressed`` if already made) if smaller."""
    if len(raw) >= _ZSTD_MIN_INPUT:
        packed = _zstd(raw) if compressed is None else compressed
        if len(packed) < len(raw):
            return codec | ZSTD_FLAG, packed, len(raw)
    return codec, raw, len(raw)


def _encode_timestamps(t_ns: npt.NDArray[np.int64]) -> tuple[int, bytes, int]:
    return _smaller(CODEC_TS_INTSTREAM, *intstream.encode_with_zstd(t_ns))


def _encode_values(data_type: DataType, values: npt.NDArray[Any]) -> tuple[int, bytes, int]:
    if data_type is DataType.FLOAT64:
        floats = np.ascontiguousarray(values, dtype="<f8")
        packed, planes, exact = decimal_float.encode_variants(floats)
        best = _smaller(CODEC_F64_SCALED, packed)
        if planes is not None and len(planes) < len(best[1]):
            best = (CODEC_F64_SCALED, planes, len(planes))
        rows = int(floats.shape[0])
        if not exact and len(best[1]) > 2 * rows:
            # Not a decimal or scaled integer in disguise (true doubles): first differences of the bits
            # win for slowly changing values, plain bytes for noise. Ties keep the earlier candidate.
            # XOR of neighbours (codec 17, still read) is not tried: on every real data set one of these
            # two was smaller, so it only cost encode time.
            bits = floats.view("<u8")
            for candidate in (
                _smaller(CODEC_F64_RAW, bits.tobytes()),
                # (the stream's zstd frame was made while choosing its layout: not compressed twice)
                _smaller(CODEC_F64_BITS_INTSTREAM, *intstream.encode_with_zstd(bits.view(np.int64), (0, 1))),
            ):
                if len(candidate[1]) < len(best[1]):
                    best = candidate
        return best
    if data_type is DataType.INT64:
        return _smaller(CODEC_I64_INTSTREAM, *intstream.encode_with_zstd(values))
    if data_type is DataType.STRING:
        return _smaller(CODEC_STR_DICT, strings.encode(values))  # (encode_segment measures text itself)
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


def decode_segment(data: bytes) -> Segment:
    """Parse and verify segment bytes; any defect raises :class:`CorruptSegmentError` with a one-line reason.

    Order matters: framing (lengths) is checked first so truncation is reported as such, then the
    checksum, and only then are blocks decompressed — never more than the header implies.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptSegmentError(f"segment must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        header, blocks = _parse_framing(data)
        _check_crc(data)
        return _decode_blocks(header, blocks)
    except (struct.error, zstandard.ZstdError, ValueError) as exc:  # defensive: every case is checked above
        raise CorruptSegmentError(f"segment undecodable: {exc}") from None


@dataclass(frozen=True)
class _Header:
    segment_id: bytes
    group: str
    rows: int
    first_ns: int
    last_ns: int
    columns: list[tuple[int, DataType]]


def _parse_framing(data: bytes) -> tuple[_Header, list[_Block]]:
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
    (group_len,) = r.unpack(_U16, "group name length")
    if group_len > MAX_GROUP_BYTES:
        raise CorruptSegmentError(f"group name length {group_len} exceeds {MAX_GROUP_BYTES}")
    group_bytes = r.take(group_len, "group name")
    try:
        group = group_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptSegmentError("group name is not valid UTF-8") from None
    ts_codec = r.take(1, "timestamp codec id")[0]
    if ts_codec not in _TS_CODECS:
        raise CorruptSegmentError(f"unknown timestamp codec id {ts_codec}")
    (ncols,) = r.unpack(_U16, "column count")
    if ncols > MAX_COLUMNS:
        raise CorruptSegmentError(f"impossible column count {ncols} (limit {MAX_COLUMNS})")
    if rows * (ncols + 1) > MAX_CELLS:
        raise CorruptSegmentError(f"impossible size: {rows} rows × {ncols} columns exceed {MAX_CELLS} cells")
    columns: list[tuple[int, DataType]] = []
    codecs = [ts_codec]
    seen: set[int] = set()
    for i in range(ncols):
        signal_id, dt_raw, codec = r.unpack(_COLUMN, f"column {i} descriptor")
        try:
            data_type = DataType(dt_raw)
        except ValueError:
            raise CorruptSegmentError(f"column {i}: unknown data type {dt_raw}") from None
        if codec not in _VALUE_CODECS[data_type]:
            raise CorruptSegmentError(f"column {i}: codec id {codec} is not valid for {data_type.name}")
        if version < 3 and codec & ~ZSTD_FLAG in _V3_CODECS:
            raise CorruptSegmentError(
                f"column {i}: codec id {codec} needs format version 3, segment is {version}"
            )
        if signal_id in seen:
            raise CorruptSegmentError(f"column {i}: signal id {signal_id} appears twice")
        seen.add(signal_id)
        columns.append((signal_id, data_type))
        codecs.append(codec)

    blocks: list[_Block] = []
    for i, expected_codec in enumerate(codecs):
        what = "timestamp block" if i == 0 else f"value block of signal {columns[i - 1][0]}"
        start = r.pos
        codec, raw_len, stored_len = r.unpack(_BLOCK, f"{what} header")
        if codec != expected_codec:
            raise CorruptSegmentError(
                f"{what} at byte {start}: codec id {codec} differs from header's {expected_codec}"
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
        blocks.append(_Block(codec, raw_len, payload, what))
    r.take(_CRC.size, "checksum")
    if r.pos != len(data):
        raise CorruptSegmentError(f"{len(data) - r.pos} unexpected bytes after the checksum")
    header = _Header(segment_id, group, rows, first_ns, last_ns, columns)
    return header, blocks


def _raw_len_bounds(codec: int, rows: int) -> tuple[int, int]:
    """The decoded size a block may have for ``rows`` rows: the cap on what decompression may produce."""
    base = codec & ~ZSTD_FLAG
    if base in (CODEC_TS_INTSTREAM, CODEC_I64_INTSTREAM, CODEC_F64_BITS_INTSTREAM):
        return 1, intstream.max_encoded_size(rows)
    if base == CODEC_F64_SCALED:
        return 1, decimal_float.max_encoded_size(rows)
    if base in (CODEC_F64_RAW, CODEC_F64_XOR):
        return rows * 8, rows * 8
    if base == CODEC_STR_DICT:
        return 1, strings.max_encoded_size(rows)
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


def _decode_blocks(header: _Header, blocks: list[_Block]) -> Segment:
    rows = header.rows
    ts_block = blocks[0]
    t_ns = _decode_ints(ts_block, rows)
    first = int(t_ns.min()) if rows else 0
    last = int(t_ns.max()) if rows else 0
    if (first, last) != (header.first_ns, header.last_ns):
        raise CorruptSegmentError(
            f"header time range {header.first_ns}..{header.last_ns} differs from timestamps {first}..{last}"
        )
    columns: dict[int, npt.NDArray[Any]] = {}
    data_types: dict[int, DataType] = {}
    text_left = MAX_TEXT_BYTES
    for (signal_id, data_type), block in zip(header.columns, blocks[1:], strict=True):
        base = block.codec & ~ZSTD_FLAG
        values: npt.NDArray[Any]
        if base == CODEC_I64_INTSTREAM:
            values = _decode_ints(block, rows)
        elif base == CODEC_F64_BITS_INTSTREAM:
            values = _decode_ints(block, rows).view(np.float64)
        elif base == CODEC_F64_SCALED:
            try:
                values = decimal_float.decode(_unzstd(block), rows)
            except intstream.StreamError as exc:
                raise CorruptSegmentError(f"{block.what}: {exc}") from None
        elif base == CODEC_STR_DICT:
            try:
                values, text = strings.decode(_unzstd(block), rows, text_left)
            except intstream.StreamError as exc:
                raise CorruptSegmentError(f"{block.what}: {exc}") from None
            text_left -= text
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
        columns[signal_id] = values
        data_types[signal_id] = data_type
    return Segment(header.segment_id, header.group, t_ns, columns, data_types)


def _decode_ints(block: _Block, rows: int) -> npt.NDArray[np.int64]:
    raw = _unzstd(block)
    try:
        values, end = intstream.decode(raw, 0, rows)
    except intstream.StreamError as exc:
        raise CorruptSegmentError(f"{block.what}: {exc}") from None
    if end != len(raw):
        raise CorruptSegmentError(f"{block.what}: {len(raw) - end} bytes after the integer stream")
    return values
