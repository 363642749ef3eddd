"""Blocks that wrap no other block: a time or value column through one codec of :mod:`.codecs`.

Each function is named in the registry (:mod:`fleetloop_shared.segment.registry`) as a codec's encoder
(values to the codec's bytes) or decoder (the codec's bytes, zstd already undone, to values). Decoders
raise :class:`StreamError` with what was wrong; the registry names the block and turns it into a
``CorruptSegmentError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs import StreamError, decimal_float, grid_float, intstream, strings
from fleetloop_shared.segment.layout import U16, Block

if TYPE_CHECKING:
    from fleetloop_shared.segment.registry import Reading

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

# ------------------------------------------------------------------------------------------ encoders


def same_as(group: int) -> bytes:
    """Time codec 4: the very times of an earlier group, named by its position."""
    return U16.pack(group)


def offsets(group: int, offsets: I64) -> bytes:
    """Time codec 5: an earlier group's times plus an integer stream of offsets."""
    return U16.pack(group) + intstream.encode(offsets)


def doubles(floats: F64) -> bytes:
    """Codec 16: the IEEE-754 bits as they are."""
    return np.ascontiguousarray(floats, dtype="<f8").tobytes()


def float_bits(floats: F64) -> tuple[bytes, bytes | None]:
    """Codec 19: the bits as an integer stream of values or first differences (and its zstd frame,
    when choosing the layout made one)."""
    bits = np.ascontiguousarray(floats, dtype="<f8").view(np.int64)
    return intstream.encode_with_zstd(bits, (0, 1))


def packed_bits(values: npt.NDArray[Any]) -> bytes:
    """Codec 48: one bit a row, least significant first."""
    return np.packbits(values.astype(np.bool_), bitorder="little").tobytes()


# ------------------------------------------------------------------------------------------ decoders


def ints(raw: bytes, rows: int) -> I64:
    """One integer stream filling ``raw`` exactly."""
    values, end = intstream.decode(raw, 0, rows)
    if end != len(raw):
        raise StreamError(f"{len(raw) - end} bytes after the integer stream")
    return values


def decode_ints(block: Block, rows: int, reading: Reading) -> I64:
    return ints(block.payload, rows)


def decode_clock_index(block: Block, rows: int, reading: Reading) -> I64:
    clock = reading.clock
    assert clock is not None  # only format 4 on allows the codec, and there is always a clock
    index = ints(block.payload, rows)
    if rows and (int(index.min()) < 0 or int(index.max()) >= clock.shape[0]):
        raise StreamError(f"clock index outside 0..{clock.shape[0] - 1}")
    out: I64 = clock[index]
    return out


def decode_same_as(block: Block, rows: int, reading: Reading) -> I64:
    (group,) = U16.unpack(block.payload)
    return reading.earlier_times(group, rows, "names group").copy()


def decode_offsets(block: Block, rows: int, reading: Reading) -> I64:
    (group,) = U16.unpack_from(block.payload, 0)
    base = reading.earlier_times(group, rows, "offsets from group")
    values, end = intstream.decode(block.payload, U16.size, rows)
    if end != len(block.payload):
        raise StreamError(f"{len(block.payload) - end} bytes after the offsets")
    out: I64 = base + values  # (wrapping, as the encoder's subtraction)
    return out


def decode_doubles(block: Block, rows: int, reading: Reading) -> F64:
    return np.frombuffer(block.payload, dtype="<f8").astype(np.float64)


def decode_xor(block: Block, rows: int, reading: Reading) -> F64:
    bits = np.bitwise_xor.accumulate(np.frombuffer(block.payload, dtype="<u8").astype(np.uint64))
    out: F64 = bits.view(np.float64)
    return out


def decode_float_bits(block: Block, rows: int, reading: Reading) -> F64:
    out: F64 = ints(block.payload, rows).view(np.float64)
    return out


def decode_scaled(block: Block, rows: int, reading: Reading) -> F64:
    return decimal_float.decode(block.payload, rows)


def decode_grid(block: Block, rows: int, reading: Reading) -> F64:
    return grid_float.decode(block.payload, rows)


def decode_bools(block: Block, rows: int, reading: Reading) -> npt.NDArray[np.bool_]:
    bits = np.unpackbits(np.frombuffer(block.payload, dtype=np.uint8), bitorder="little")
    if bits[rows:].any():
        raise StreamError("padding bits after the last row are set")
    return bits[:rows].astype(np.bool_)


def decode_text(block: Block, rows: int, reading: Reading) -> npt.NDArray[np.object_]:
    """Text, counted against what the segment may still hold."""
    values, text = strings.decode(block.payload, rows, reading.text_left)
    reading.text_left -= text
    return values
