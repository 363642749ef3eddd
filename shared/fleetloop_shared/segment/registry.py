"""The codec registry: every codec id a segment may name, and what it is, in one table.

A block names its codec in one byte, and everything a reader or writer must know about that byte is
here: the data type it holds (or that it holds a group's times), the first format version that has it,
its encoder and decoder, whether zstd may sit on top, the decoded sizes it allows for a number of rows,
the blocks it wraps and when in a group it can be decoded. The framing asks the registry whether a
codec is valid for a column at the segment's version; the decoder asks it to decode a block, and it is
the one place where a codec's :class:`StreamError` becomes a :class:`CorruptSegmentError` naming the
block; the encoder takes each codec's encoder from it and asks which format version its blocks need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import derived, layout, plain
from fleetloop_shared.segment.codecs import (
    StreamError,
    decimal_float,
    grid_float,
    intstream,
    strings,
    zstd_frames,
)
from fleetloop_shared.segment.layout import (
    BLOCK,
    DICT_MAX_VALUES,
    DIFF,
    KEYED,
    MAX_TEXT_BYTES,
    U16,
    U32,
    ZSTD_FLAG,
    Block,
    Encoded,
)

if TYPE_CHECKING:
    from fleetloop_shared.segment.model import Segment

E = TypeVar("E")
Decoder = Callable[[Block, int, "Reading"], npt.NDArray[Any]]

#: Below this many bytes a zstd frame (≥ 9 bytes of framing) cannot win; not tried.
ZSTD_MIN_INPUT = 24
#: In :attr:`Part.codec`: any codec of the wrapping codec's data type that wraps nothing itself.
PLAIN = -1


class Stage(IntEnum):
    """When a group's column can be decoded: from its own bytes, after the columns that are keys, or
    after every other column (a difference may name any column that is not a difference itself)."""

    OWN = 0
    KEYED = 1
    DIFFERENCE = 2


@dataclass(frozen=True)
class Part:
    """A block another block wraps: its name (in errors) and which codec it may be."""

    name: str
    #: a codec id (flag clear), or :data:`PLAIN`
    codec: int


@dataclass(frozen=True)
class Codec(Generic[E]):
    """One codec id and everything the format says about it."""

    id: int
    name: str
    #: the column type it holds; ``None`` for a group's times
    data_type: DataType | None
    #: the first format version that has it (an older segment naming it is corrupt)
    since: int
    #: values to the codec's bytes (the signature is the codec's own); ``None``: read, never written
    encode: E
    decode: Decoder
    #: the decoded length (``raw_len``) it allows for a number of rows, checked before decompressing
    bounds: Callable[[int], tuple[int, int]]
    #: whether a block of it may be a zstd frame (``codec | ZSTD_FLAG``)
    zstd: bool = True
    #: the blocks its payload frames, each checked against the registry before it is decoded
    wraps: tuple[Part, ...] = ()
    #: when in its group a column of it can be decoded
    stage: Stage = Stage.OWN

    def block(self, raw: bytes, compressed: bytes | None = None, *, inner: tuple[int, ...] = ()) -> Encoded:
        """The codec's bytes as a block: as they are, or their zstd frame (``compressed`` when already
        made) where the codec allows one and it is smaller.

        (A format 6 body takes small blocks' frames off again: every block is still compressed here, so
        that the encoder's choices between codecs compare what they would store.)"""
        if self.zstd and len(raw) >= ZSTD_MIN_INPUT:
            packed = zstd_frames.compress(raw) if compressed is None else compressed
            if len(packed) < len(raw):
                return Encoded(self.id | ZSTD_FLAG, packed, len(raw), inner)
        return Encoded(self.id, raw, len(raw), inner)

    def as_is(self, raw: bytes) -> Encoded:
        """The codec's bytes as a block without trying zstd (byte planes are compressed already)."""
        return Encoded(self.id, raw, len(raw))


def _up_to(largest: Callable[[int], int]) -> Callable[[int], tuple[int, int]]:
    """Bounds of a codec whose bytes are at least one and at most what ``largest`` says for the rows."""
    return lambda rows: (1, largest(rows))


def _exactly(size: Callable[[int], int]) -> Callable[[int], tuple[int, int]]:
    """Bounds of a codec whose bytes are a function of the rows."""
    return lambda rows: (size(rows), size(rows))


_stream = _up_to(intstream.max_encoded_size)
_doubles = _exactly(lambda rows: rows * 8)


def _wrapped(rows: int) -> int:
    """The largest block a keyed, difference or recent-values block may wrap: a grid float's."""
    return max(grid_float.max_encoded_size(rows), intstream.max_encoded_size(rows), rows * 8)


def _keyed(rows: int) -> tuple[int, int]:
    return KEYED.size + 1, KEYED.size + _wrapped(rows)


def _dictionary(rows: int) -> tuple[int, int]:
    least = U32.size + 2 * BLOCK.size
    return least + 2, least + intstream.max_encoded_size(DICT_MAX_VALUES) + intstream.max_encoded_size(rows)


_WRAPPED = (Part("wrapped block", PLAIN),)
F64, I64 = DataType.FLOAT64, DataType.INT64


def _keyed_codec(codec_id: int, data_type: DataType) -> Codec[Callable[[int, Encoded], bytes]]:
    return Codec(
        codec_id, "keyed", data_type, 5, derived.keyed, derived.decode_keyed, _keyed,
        zstd=False, wraps=_WRAPPED, stage=Stage.KEYED,
    )  # fmt: skip


def _dictionary_codec(
    codec_id: int, data_type: DataType, decode: Decoder
) -> Codec[Callable[[int, Encoded, Encoded], bytes]]:
    indices = (
        Part("dictionary entries", layout.CODEC_I64_INTSTREAM),
        Part("indices", layout.CODEC_I64_INTSTREAM),
    )
    return Codec(
        codec_id, "dictionary", data_type, 5, derived.dictionary, decode, _dictionary,
        zstd=False, wraps=indices,
    )  # fmt: skip


# fmt: off
# Each codec: its id, name, what it holds (None: a group's times), first format version, encoder, decoder
# and decoded sizes; then what differs from the defaults.
TS_INTSTREAM = Codec(
    layout.CODEC_TS_INTSTREAM, "timestamps", None, 2, intstream.encode_with_zstd, plain.decode_ints, _stream
)
TS_CLOCK_INDEX = Codec(
    layout.CODEC_TS_CLOCK_INDEX, "clock indices", None, 4,
    intstream.encode_with_zstd, plain.decode_clock_index, _stream,
)
TS_SAME_AS = Codec(
    layout.CODEC_TS_SAME_AS, "same times", None, 4, plain.same_as, plain.decode_same_as,
    _exactly(lambda rows: U16.size), zstd=False,
)
TS_OFFSET = Codec(
    layout.CODEC_TS_OFFSET, "time offsets", None, 6, plain.offsets, plain.decode_offsets,
    lambda rows: (U16.size + 1, U16.size + intstream.max_encoded_size(rows)),
)
F64_RAW = Codec(layout.CODEC_F64_RAW, "doubles", F64, 2, plain.doubles, plain.decode_doubles, _doubles)
F64_XOR = Codec(layout.CODEC_F64_XOR, "XOR doubles", F64, 2, None, plain.decode_xor, _doubles)
F64_SCALED = Codec(
    layout.CODEC_F64_SCALED, "scaled float", F64, 2, decimal_float.encode_variants, plain.decode_scaled,
    _up_to(decimal_float.max_encoded_size),
)
F64_BITS_INTSTREAM = Codec(
    layout.CODEC_F64_BITS_INTSTREAM, "float bits", F64, 2, plain.float_bits, plain.decode_float_bits, _stream
)
F64_KEYED = _keyed_codec(layout.CODEC_F64_KEYED, F64)
F64_DIFF = Codec(
    layout.CODEC_F64_DIFF, "difference", F64, 5, derived.difference, derived.decode_difference,
    # (its header, then up to one patch of 12 bytes a row)
    lambda rows: (DIFF.size + 1, DIFF.size + 12 * rows + _wrapped(rows)),
    zstd=False, wraps=_WRAPPED, stage=Stage.DIFFERENCE,
)
F64_RECENT = Codec(
    layout.CODEC_F64_RECENT, "recent values", F64, 5, derived.recent, derived.decode_recent,
    lambda rows: (2 * BLOCK.size + 2, 2 * BLOCK.size + intstream.max_encoded_size(rows) + _wrapped(rows)),
    zstd=False, wraps=(Part("references", layout.CODEC_I64_INTSTREAM), Part("literals", PLAIN)),
)
F64_DICT = _dictionary_codec(layout.CODEC_F64_DICT, F64, derived.decode_float_dictionary)
F64_GRID = Codec(
    layout.CODEC_F64_GRID, "grid float", F64, 6, grid_float.encode_variants, plain.decode_grid,
    _up_to(grid_float.max_encoded_size),
)
I64_INTSTREAM = Codec(
    layout.CODEC_I64_INTSTREAM, "integers", I64, 2, intstream.encode_with_zstd, plain.decode_ints, _stream
)
I64_KEYED = _keyed_codec(layout.CODEC_I64_KEYED, I64)
I64_DICT = _dictionary_codec(layout.CODEC_I64_DICT, I64, derived.decode_dictionary)
BOOL_PACKBITS = Codec(
    layout.CODEC_BOOL_PACKBITS, "packed bits", DataType.BOOL, 2, plain.packed_bits, plain.decode_bools,
    _exactly(lambda rows: (rows + 7) // 8),
)
STR_DICT = Codec(
    layout.CODEC_STR_DICT, "string dictionary", DataType.STRING, 3,
    strings.encode_measured, plain.decode_text, _up_to(strings.max_encoded_size),
)
# fmt: on

#: Every codec, by id (flag clear).
REGISTRY: dict[int, Codec[Any]] = {
    c.id: c
    for c in (
        TS_INTSTREAM,
        TS_CLOCK_INDEX,
        TS_SAME_AS,
        TS_OFFSET,
        F64_RAW,
        F64_XOR,
        F64_SCALED,
        F64_BITS_INTSTREAM,
        F64_KEYED,
        F64_DIFF,
        F64_RECENT,
        F64_DICT,
        F64_GRID,
        I64_INTSTREAM,
        I64_KEYED,
        I64_DICT,
        BOOL_PACKBITS,
        STR_DICT,
    )
}
#: The keyed and dictionary codec of each number type.
KEYED_CODECS = {F64: F64_KEYED, I64: I64_KEYED}
DICT_CODECS = {F64: F64_DICT, I64: I64_DICT}


def lookup(codec: int) -> Codec[Any] | None:
    """The codec a block's id names (with or without the zstd flag), or None when no codec is."""
    found = REGISTRY.get(codec & ~ZSTD_FLAG)
    if found is None or (codec & ZSTD_FLAG and not found.zstd):
        return None
    return found


def ids(codec: Codec[Any]) -> frozenset[int]:
    """The ids a block of ``codec`` may carry."""
    return frozenset({codec.id, codec.id | ZSTD_FLAG} if codec.zstd else {codec.id})


def time_codec(codec: int, version: int, where: str) -> Codec[Any]:
    """The time codec a group names, refused when it is none or newer than the segment."""
    found = lookup(codec)
    if found is None or found.data_type is not None:
        raise CorruptSegmentError(f"{where}unknown timestamp codec id {codec}")
    if found.since > version:
        raise CorruptSegmentError(
            f"{where}unknown timestamp codec id {codec} in format version {version} (it needs {found.since})"
        )
    return found


def value_codec(codec: int, data_type: DataType, version: int, where: str) -> Codec[Any]:
    """The codec a column descriptor names, refused when it is not one of the column's data type or
    is newer than the segment."""
    found = lookup(codec)
    if found is None or found.data_type is not data_type:
        raise CorruptSegmentError(f"{where}codec id {codec} is not valid for {data_type.name}")
    if found.since > version:
        raise CorruptSegmentError(
            f"{where}codec id {codec} needs format version {found.since}, segment is {version}"
        )
    return found


def needs(block: Encoded) -> int:
    """The lowest format version that reads a block: its codec's, or a wrapped block's if newer."""
    since = REGISTRY[block.codec & ~ZSTD_FLAG].since
    for codec in block.inner:
        since = max(since, REGISTRY[codec & ~ZSTD_FLAG].since)
    return since


def stage(codec: int) -> Stage:
    return REGISTRY[codec & ~ZSTD_FLAG].stage


def bounds(codec: int, rows: int) -> tuple[int, int]:
    """The decoded size a block may have for ``rows`` rows: the cap on what decompression may produce."""
    return REGISTRY[codec & ~ZSTD_FLAG].bounds(rows)


def decode(block: Block, rows: int, reading: Reading) -> npt.NDArray[Any]:
    """A block's values (its codec was checked by the framing or by :meth:`Reading.part`)."""
    try:
        return REGISTRY[block.codec & ~ZSTD_FLAG].decode(_unzstd(block), rows, reading)
    except StreamError as exc:
        raise CorruptSegmentError(f"{block.what}: {exc}") from None


def _unzstd(block: Block) -> Block:
    """The block with its payload as the codec reads it: a zstd frame is opened, never to more than the
    header declared (checked against the frame's own declaration first)."""
    if not block.codec & ZSTD_FLAG:
        return block
    declared = zstd_frames.content_size(block.payload)
    if declared != block.raw_len:
        raise StreamError(f"zstd frame declares {declared} bytes, header says {block.raw_len}")
    raw = zstd_frames.decompress_at_most(block.payload, block.raw_len)
    if len(raw) != block.raw_len:
        raise StreamError(f"decompressed to {len(raw)} bytes, header says {block.raw_len}")
    return Block(block.codec, block.raw_len, raw, block.what, block.version)


@dataclass
class Reading:
    """What a decoder may ask of the segment being read: the clock, the groups decoded before, the
    text it may still hold, and the group's own columns as far as they are decoded."""

    version: int
    clock: npt.NDArray[np.int64] | None = None
    earlier: Sequence[Segment] = ()
    text_left: int = MAX_TEXT_BYTES
    #: the group's columns: data type and codec of each, and those decoded so far
    data_types: dict[int, DataType] = field(default_factory=dict)
    codecs: dict[int, int] = field(default_factory=dict)
    decoded: dict[int, npt.NDArray[Any]] = field(default_factory=dict)
    #: stable sorts by key columns, made once per key
    orders: dict[int, npt.NDArray[np.intp]] = field(default_factory=dict)

    def earlier_times(self, group: int, rows: int, named: str) -> npt.NDArray[np.int64]:
        if group >= len(self.earlier) or self.earlier[group].t_ns.shape[0] != rows:
            raise StreamError(f"{named} {group}, which is not an earlier group of {rows} rows")
        return self.earlier[group].t_ns

    def is_plain(self, signal_id: int) -> bool:
        """Whether a column of this group is decoded from its own bytes (not keyed, not a difference)."""
        return stage(self.codecs[signal_id]) is Stage.OWN

    def reference(self, signal_id: int, rows: int) -> npt.NDArray[np.float64] | None:
        """A FLOAT64 column a difference may name: of an earlier group of as many rows, or of this
        group when not a difference itself."""
        if signal_id in self.codecs:
            if (
                self.data_types[signal_id] is DataType.FLOAT64
                and stage(self.codecs[signal_id]) < Stage.DIFFERENCE
            ):
                return self.decoded[signal_id]
            return None
        for part in self.earlier:
            if part.t_ns.shape[0] == rows and part.data_types.get(signal_id) is DataType.FLOAT64:
                found: npt.NDArray[np.float64] = part.columns[signal_id]
                return found
        return None

    def part(
        self, outer: Block, index: int, codec: int, raw_len: int, payload: bytes, rows: int
    ) -> npt.NDArray[Any]:
        """The values of the ``index``-th block ``outer`` wraps, once the registry allows its codec
        there (at the segment's version) and its lengths for ``rows`` rows."""
        wrapping = REGISTRY[outer.codec & ~ZSTD_FLAG]
        part = wrapping.wraps[index]
        found = lookup(codec)
        data_type = wrapping.data_type
        if part.codec == PLAIN:
            valid = found is not None and found.data_type is data_type and not found.wraps
        else:
            valid = found is not None and found.id == part.codec
        if not valid or found is None:
            if len(wrapping.wraps) == 1:
                name = data_type.name if data_type is not None else "times"
                raise StreamError(f"{wrapping.name} block wraps codec id {codec}, not valid for {name}")
            raise StreamError(f"{part.name} in codec {codec}")
        if found.since > self.version:
            raise StreamError(
                f"codec id {codec} needs format version {found.since}, segment is {self.version}"
            )
        lo, hi = found.bounds(rows)
        if not lo <= raw_len <= hi or (not codec & ZSTD_FLAG and len(payload) != raw_len):
            raise StreamError(f"{part.name}: lengths impossible for {rows} rows")
        return decode(
            Block(codec, raw_len, payload, f"{outer.what} ({part.name})", outer.version), rows, self
        )
