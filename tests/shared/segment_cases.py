"""What the segment tests share: the format 5 writer they take apart, bit-exact comparison, small segments,
a hypothesis strategy, and forging (resealing a changed segment, replacing a block's payload)."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import strategies as st

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import Segment, decode_segment
from fleetloop_shared.segment import encode_segment as encode_newest


def encode_segment(segment: Segment, *, max_version: int = 5) -> bytes:
    """The format 5 writer: these tests take the bytes of formats 2–5 apart, which format 6 compresses
    into one zstd frame (tests/shared/test_segment_v6.py covers format 6 and the newest writer)."""
    return encode_newest(segment, max_version=max_version)


I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)


def floats_from_bits(bits: list[int]) -> npt.NDArray[np.float64]:
    return np.array(bits, dtype=np.uint64).view(np.float64)


def assert_bit_exact(a: Segment, b: Segment) -> None:
    assert a.segment_id == b.segment_id
    assert a.group == b.group
    assert a.data_types == b.data_types
    assert a.t_ns.dtype == np.int64 and b.t_ns.dtype == np.int64
    assert a.t_ns.tobytes() == b.t_ns.tobytes()
    assert sorted(a.columns) == sorted(b.columns)
    for sid, values in a.columns.items():
        other = b.columns[sid]
        assert values.dtype == other.dtype, sid
        if values.dtype == object:  # text: the same str values (the bytes of an object array are pointers)
            assert [type(x) for x in other.tolist()] == [str] * len(other), sid
            assert values.tolist() == other.tolist(), sid
        else:
            assert values.tobytes() == other.tobytes(), sid
    assert a == b


def roundtrip(segment: Segment) -> Segment:
    decoded = decode_segment(encode_segment(segment))
    assert_bit_exact(segment, decoded)
    return decoded


def small_segment() -> Segment:
    t = np.array([-1_000, 0, 10_000_000, 20_000_000, 20_000_000, 31_000_000], dtype=np.int64)
    return Segment(
        segment_id=bytes(range(16)),
        group="can0/SPEED",
        t_ns=t,
        columns={
            3: np.array([1.5, -0.0, np.nan, np.inf, -np.inf, 5e-324]),
            7: np.array([I64_MIN, -1, 0, 1, I64_MAX, 42], dtype=np.int64),
            9: np.array([True, False, True, True, False, True]),
        },
        data_types={3: DataType.FLOAT64, 7: DataType.INT64, 9: DataType.BOOL},
    )


def text(values: list[str]) -> npt.NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def text_segment() -> Segment:
    t = np.array([-5, 0, 10, 10, 20, 30], dtype=np.int64)
    return Segment(
        segment_id=bytes(range(16, 32)),
        group="plc/status",
        t_ns=t,
        columns={
            4: text(["", "ÉTAT ✓", "x" * 300, "x" * 300, "\U0001f600", ""]),
            5: text(["IDLE", "IDLE", "RUN", "RUN", "RUN", "IDLE"]),
            6: np.array([1, 2, 3, 4, 5, 6], dtype=np.int64),
        },
        data_types={4: DataType.STRING, 5: DataType.STRING, 6: DataType.INT64},
    )


dtypes = st.sampled_from([DataType.FLOAT64, DataType.INT64, DataType.BOOL, DataType.STRING])


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    rows = draw(st.integers(0, 300))
    steady = draw(st.booleans())
    if steady:
        start = draw(st.integers(-(2**62), 2**62))
        step = draw(st.integers(0, 10**9))
        jitter = draw(st.lists(st.integers(-1000, 1000), min_size=rows, max_size=rows))
        t = start + np.arange(rows, dtype=np.int64) * step + np.array(jitter, dtype=np.int64)
    else:
        t = np.array(
            draw(st.lists(st.integers(I64_MIN, I64_MAX), min_size=rows, max_size=rows)), dtype=np.int64
        )
    types = draw(st.dictionaries(st.integers(0, 2**32 - 1), dtypes, max_size=5))
    columns: dict[int, npt.NDArray[Any]] = {}
    for sid, dt in types.items():
        if dt is DataType.FLOAT64:
            if draw(st.booleans()):
                columns[sid] = floats_from_bits(
                    draw(st.lists(st.integers(0, 2**64 - 1), min_size=rows, max_size=rows))
                )
            else:
                columns[sid] = np.array(
                    draw(st.lists(st.floats(), min_size=rows, max_size=rows)), dtype=np.float64
                )
        elif dt is DataType.INT64:
            columns[sid] = np.array(
                draw(st.lists(st.integers(I64_MIN, I64_MAX), min_size=rows, max_size=rows)), dtype=np.int64
            )
        elif dt is DataType.STRING:
            pool = draw(st.lists(st.text(max_size=20), min_size=1, max_size=4))
            any_text = draw(st.booleans())
            columns[sid] = text(
                draw(st.lists(st.text() if any_text else st.sampled_from(pool), min_size=rows, max_size=rows))
            )
        else:
            columns[sid] = np.array(
                draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), dtype=np.bool_
            )
    group = draw(st.text(max_size=40))
    return Segment(draw(st.binary(min_size=16, max_size=16)), group, t, columns, types)


def reseal(body: bytes) -> bytes:
    """Recompute the trailing checksum, as a forger (not a random bit flip) would."""
    return body + struct.pack("<I", zlib.crc32(body))


def expect_corrupt(data: bytes, match: str | None = None) -> CorruptSegmentError:
    with pytest.raises(CorruptSegmentError, match=match) as info:
        decode_segment(data)
    assert "\n" not in str(info.value)
    return info.value


def expect_every_byte_flip_corrupt(good: bytes, masks: tuple[int, ...] = (0x01, 0x80, 0xFF)) -> None:
    """Each byte of ``good`` flipped by each of ``masks`` (one at a time) is refused as corrupt."""
    for i in range(len(good)):
        for mask in masks:
            bad = bytearray(good)
            bad[i] ^= mask
            expect_corrupt(bytes(bad))


def expect_every_truncation_corrupt(good: bytes) -> None:
    """Every cut of ``good`` is refused as corrupt, and once the header is whole, it says why: the segment
    is truncated, or its checksum does not match."""
    for n in range(len(good)):
        err = expect_corrupt(good[:n])
        if n >= 6:
            assert "truncated" in str(err) or "checksum" in str(err), (n, err)


def mutate_resealed(data: st.DataObject, encoded: bytes) -> None:
    """Overwrite a few bytes of ``encoded`` (maybe cut it short) and reseal the checksum, as a forger
    would: decoding ends in CorruptSegmentError (one line) or a segment that round-trips, never else."""
    good = bytearray(encoded[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    try:
        seg = decode_segment(reseal(bytes(good[:cut] if data.draw(st.booleans()) else good)))
    except CorruptSegmentError as exc:
        assert "\n" not in str(exc)
        return
    assert decode_segment(encode_segment(seg)) == seg


def _version(data: bytes) -> int:
    return int(struct.unpack_from("<H", data, 4)[0])


def _column_codecs(data: bytes) -> dict[int, int]:
    """signal id -> codec id of every column of a format 4/5 segment (walks the framing)."""
    from fleetloop_shared.segment import framing

    header = framing.parse(data)
    return {
        sid: block.codec
        for g in header.groups
        for (sid, _), block in zip(g.columns, g.blocks[1:], strict=True)
    }


def forge_block(data: bytes, codec: int, edit: Any) -> bytes:
    """``data`` with the payload of its first value block of ``codec`` replaced by ``edit(payload)``,
    the block's lengths set to match (these blocks are never zstd'd as a whole: stored == raw) and the
    checksum resealed, as a forger would."""
    from fleetloop_shared.segment import framing

    for g in framing.parse(data).groups:
        for block in g.blocks[1:]:
            if block.codec == codec:
                pos = data.find(block.payload)
                assert pos > 0
                forged = edit(block.payload)
                head = struct.pack("<BII", codec, len(forged), len(forged))
                return reseal(data[: pos - 9] + head + forged + data[pos + len(block.payload) : -4])
    raise AssertionError(f"no block with codec {codec}")
