"""The codec registry: every codec round-trips its data type through it, and a codec id a format version
does not know is refused, in the registry and in real segment bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment_cases import reseal  # (tests/shared/conftest.py loads it)

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import (
    READ_VERSIONS,
    ZSTD_FLAG,
    Segment,
    decode_segment,
    encode_segment,
    framing,
    registry,
)
from fleetloop_shared.segment.codecs import grid_float, recent
from fleetloop_shared.segment.layout import Block, Encoded
from fleetloop_shared.segment.registry import REGISTRY, Codec, Reading

SID = bytes(range(16))
ROWS = 600
_RNG = np.random.default_rng(7)
TIMES = np.cumsum(_RNG.integers(900_000, 1_100_000, ROWS)).astype(np.int64) + 10**18
DECIMALS = np.round(np.cumsum(_RNG.normal(0, 0.3, ROWS)), 2)
#: a wheel speed: counts of 0.01 km/h in m/s, on a grid of step 0.01/3.6
ON_GRID = (8000 + np.cumsum(_RNG.integers(-40, 41, ROWS))) * 0.01 / 3.6
DOUBLES = np.concatenate(
    [
        _RNG.standard_normal(ROWS - 4),
        np.array([0x7FF4DEADBEEF0001, 0x8000000000000000], dtype=np.uint64).view(np.float64),
        [np.inf, 5e-324],
    ]
)
INTS = np.cumsum(_RNG.integers(-5, 6, ROWS)).astype(np.int64)
KEY = np.tile(np.arange(12, dtype=np.int64), ROWS // 12)
LEVELS = np.array([0.1, 0.25, 1 / 3, 2.5e-7])[_RNG.integers(0, 4, ROWS)]


def reading(**state: Any) -> Reading:
    return Reading(6, **state)


def group_with(signal_id: int, codec: Codec[Any], values: npt.NDArray[Any], data_type: DataType) -> Reading:
    """A reading whose group has decoded ``values`` as column ``signal_id`` through ``codec``."""
    return reading(
        data_types={signal_id: data_type}, codecs={signal_id: codec.id}, decoded={signal_id: values}
    )


def encoded(codec: Codec[Any], *args: Any) -> Encoded:
    """A block through an encoder that returns the codec's bytes (and maybe their zstd frame)."""
    out = codec.encode(*args)
    return codec.block(*out) if isinstance(out, tuple) else codec.block(out)


Case = tuple[Encoded, int, Reading, npt.NDArray[Any]]


def _scaled() -> Case:
    packed, _, exact = registry.F64_SCALED.encode(DECIMALS)
    assert exact and packed is not None
    return registry.F64_SCALED.block(packed), ROWS, reading(), DECIMALS


def _grid() -> Case:
    found = grid_float.find_step(ON_GRID, 8.0)
    assert found is not None
    packed, planes = registry.F64_GRID.encode(ON_GRID, found[0])
    block = registry.F64_GRID.block(packed) if packed is not None else registry.F64_GRID.as_is(planes or b"")
    return block, ROWS, reading(), ON_GRID


def _xor() -> Case:
    """Codec 17 is read but never written: its bytes made by hand (each value's bits XOR the previous)."""
    raw = DOUBLES.view(np.uint64)
    xored = raw ^ np.concatenate([[np.uint64(0)], raw[:-1]])
    return registry.F64_XOR.block(xored.astype("<u8").tobytes()), ROWS, reading(), DOUBLES


def _text() -> Case:
    values = np.empty(ROWS, dtype=object)
    values[:] = [["IDLE", "RUN", "ÉTAT ✓", ""][k] for k in _RNG.integers(0, 4, ROWS)]
    payload, _ = registry.STR_DICT.encode(values)
    return registry.STR_DICT.block(payload), ROWS, reading(), values


def _keyed(codec: Codec[Any], values: npt.NDArray[Any], inner_codec: Codec[Any]) -> Case:
    order = np.argsort(KEY, kind="stable")
    inner = encoded(inner_codec, values[order])
    block = codec.block(codec.encode(1, inner), inner=(inner.codec,))
    return block, ROWS, group_with(1, registry.I64_INTSTREAM, KEY, DataType.INT64), values


def _difference() -> Case:
    twin = DECIMALS + 0.125
    difference = twin - DECIMALS
    patches = np.flatnonzero((DECIMALS + difference).view(np.int64) != twin.view(np.int64))
    inner = encoded(registry.F64_BITS_INTSTREAM, difference)
    payload = registry.F64_DIFF.encode(1, patches, twin[patches], inner)
    block = registry.F64_DIFF.block(payload, inner=(inner.codec,))
    return block, ROWS, group_with(1, registry.F64_SCALED, DECIMALS, DataType.FLOAT64), twin


def _recent() -> Case:
    values = LEVELS + np.arange(ROWS) // 50  # each value repeats a few rows back
    refs, _ = recent.references(values.view(np.int64))
    references = encoded(registry.I64_INTSTREAM, refs, (0,))
    literals = encoded(registry.F64_RAW, values[refs == 0])
    payload = registry.F64_RECENT.encode(references, literals)
    return (
        registry.F64_RECENT.block(payload, inner=(references.codec, literals.codec)),
        ROWS,
        reading(),
        values,
    )


def _dictionary(codec: Codec[Any], values: npt.NDArray[Any]) -> Case:
    table, index = np.unique(values.view(np.int64), return_inverse=True)
    entries = encoded(registry.I64_INTSTREAM, table)
    indices = encoded(registry.I64_INTSTREAM, index.astype(np.int64))
    payload = codec.encode(table.shape[0], entries, indices)
    return codec.block(payload, inner=(entries.codec, indices.codec)), ROWS, reading(), values


def _times_after(offset: int) -> Reading:
    return reading(earlier=[Segment(SID, "earlier", TIMES - offset, {}, {})])


#: One round trip per registered codec, by id: values through its encoder (or, for a codec only read,
#: bytes made by hand) and back through the registry's decoder.
CASES: dict[int, Callable[[], Case]] = {
    registry.TS_INTSTREAM.id: lambda: (encoded(registry.TS_INTSTREAM, TIMES), ROWS, reading(), TIMES),
    registry.TS_CLOCK_INDEX.id: lambda: (
        encoded(registry.TS_CLOCK_INDEX, np.arange(ROWS, dtype=np.int64) * 2, (1, 2)),
        ROWS,
        reading(clock=np.repeat(TIMES, 2)),
        TIMES,
    ),
    registry.TS_SAME_AS.id: lambda: (encoded(registry.TS_SAME_AS, 0), ROWS, _times_after(0), TIMES),
    registry.TS_OFFSET.id: lambda: (
        encoded(registry.TS_OFFSET, 0, np.full(ROWS, 250_000, dtype=np.int64)),
        ROWS,
        _times_after(250_000),
        TIMES,
    ),
    registry.F64_RAW.id: lambda: (encoded(registry.F64_RAW, DOUBLES), ROWS, reading(), DOUBLES),
    registry.F64_XOR.id: _xor,
    registry.F64_SCALED.id: _scaled,
    registry.F64_BITS_INTSTREAM.id: lambda: (
        encoded(registry.F64_BITS_INTSTREAM, DOUBLES),
        ROWS,
        reading(),
        DOUBLES,
    ),
    registry.F64_KEYED.id: lambda: _keyed(registry.F64_KEYED, DECIMALS, registry.F64_RAW),
    registry.F64_DIFF.id: _difference,
    registry.F64_RECENT.id: _recent,
    registry.F64_DICT.id: lambda: _dictionary(registry.F64_DICT, LEVELS),
    registry.F64_GRID.id: _grid,
    registry.I64_INTSTREAM.id: lambda: (encoded(registry.I64_INTSTREAM, INTS), ROWS, reading(), INTS),
    registry.I64_KEYED.id: lambda: _keyed(registry.I64_KEYED, INTS, registry.I64_INTSTREAM),
    registry.I64_DICT.id: lambda: _dictionary(registry.I64_DICT, INTS % 7),
    registry.BOOL_PACKBITS.id: lambda: (
        encoded(registry.BOOL_PACKBITS, INTS % 3 == 0),
        ROWS,
        reading(),
        INTS % 3 == 0,
    ),
    registry.STR_DICT.id: _text,
}


def framed(block: Encoded, what: str = "block under test", version: int = 6) -> Block:
    """The block as a reader finds it, once the framing has checked its lengths."""
    codec = registry.lookup(block.codec)
    assert codec is not None, block.codec
    return Block(block.codec, block.raw_len, block.payload, what, version)


def same_bits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    if a.dtype == object:
        return b.dtype == object and a.tolist() == b.tolist() and all(type(x) is str for x in b.tolist())
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_every_registered_codec_has_a_round_trip_here() -> None:
    assert sorted(CASES) == sorted(REGISTRY)


@pytest.mark.parametrize("codec_id", sorted(REGISTRY))
def test_every_registered_codec_round_trips_its_data_type_through_the_registry(codec_id: int) -> None:
    codec = REGISTRY[codec_id]
    block, rows, state, want = CASES[codec_id]()
    assert block.codec & ~ZSTD_FLAG == codec.id
    assert codec.zstd or not block.codec & ZSTD_FLAG  # codecs that are never zstd'd as a whole
    lo, hi = registry.bounds(block.codec, rows)
    assert lo <= block.raw_len <= hi  # what a reader accepts holds what the writer makes
    assert registry.needs(block) == max(REGISTRY[c & ~ZSTD_FLAG].since for c in (block.codec, *block.inner))
    got = registry.decode(framed(block), rows, state)
    if codec.data_type is not None:
        assert got.dtype == codec.data_type.numpy_dtype
    assert same_bits(np.asarray(want), got)


def test_the_table_says_what_the_format_says() -> None:
    """The registry's facts against docs/segment-format.md's codec table and version history."""
    since = {c.id: c.since for c in REGISTRY.values()}
    assert since == {
        2: 2,
        3: 4,
        4: 4,
        5: 6,
        16: 2,
        17: 2,
        18: 2,
        19: 2,
        20: 5,
        21: 5,
        22: 5,
        23: 5,
        24: 6,
        33: 2,
        34: 5,
        35: 5,
        48: 2,
        64: 3,
    }
    assert {c.id for c in REGISTRY.values() if c.data_type is None} == {2, 3, 4, 5}
    assert {c.id for c in REGISTRY.values() if not c.zstd} == {4, 20, 21, 22, 23, 34, 35}
    assert {c.id for c in REGISTRY.values() if c.wraps} == {20, 21, 22, 23, 34, 35}
    assert REGISTRY[17].encode is None  # read, never written
    for codec in REGISTRY.values():
        assert registry.lookup(codec.id) is codec
        assert (registry.lookup(codec.id | ZSTD_FLAG) is codec) == codec.zstd


def refusals() -> list[tuple[Codec[Any], int]]:
    return [(c, v) for c in REGISTRY.values() for v in sorted(READ_VERSIONS) if v < c.since]


@pytest.mark.parametrize(("codec", "version"), refusals(), ids=lambda x: getattr(x, "name", x))
def test_a_codec_id_a_version_does_not_know_is_refused(codec: Codec[Any], version: int) -> None:
    for codec_id in registry.ids(codec):
        if codec.data_type is None:
            with pytest.raises(
                CorruptSegmentError, match=f"unknown timestamp codec id {codec_id} .*needs {codec.since}"
            ):
                registry.time_codec(codec_id, version, "")
        else:
            with pytest.raises(
                CorruptSegmentError, match=f"needs format version {codec.since}, segment is {version}"
            ):
                registry.value_codec(codec_id, codec.data_type, version, "")
    # ... and from its version on it is known
    for codec_id in registry.ids(codec):
        if codec.data_type is None:
            assert registry.time_codec(codec_id, codec.since, "") is codec
        else:
            assert registry.value_codec(codec_id, codec.data_type, codec.since, "") is codec


def test_a_codec_of_another_data_type_or_an_unknown_id_is_refused() -> None:
    for codec_id in range(256):
        found = registry.lookup(codec_id)
        for data_type in DataType:
            if found is not None and found.data_type is data_type:
                continue
            with pytest.raises(CorruptSegmentError, match="not valid for"):
                registry.value_codec(codec_id, data_type, 6, "")
        if found is None or found.data_type is not None:
            with pytest.raises(CorruptSegmentError, match="unknown timestamp codec"):
                registry.time_codec(codec_id, 6, "")


def _descriptor_offsets(data: bytes) -> dict[DataType, list[int]]:
    """Where each column descriptor's codec byte is, by data type (formats 2–5, uncompressed)."""
    out: dict[DataType, list[int]] = {}
    for group in framing.parse(data).groups:
        for (signal_id, data_type), block in zip(group.columns, group.blocks[1:], strict=True):
            pos = data.find(struct.pack("<IB", signal_id, int(data_type)) + bytes([block.codec]))
            assert pos > 0
            out.setdefault(data_type, []).append(pos + 5)
    return out


def _columns(rows: int, first: int) -> tuple[dict[int, npt.NDArray[Any]], dict[int, DataType]]:
    return (
        {first: DECIMALS[:rows], first + 1: INTS[:rows], first + 2: INTS[:rows] % 2 == 0},
        {first: DataType.FLOAT64, first + 1: DataType.INT64, first + 2: DataType.BOOL},
    )


@pytest.mark.parametrize("version", sorted(READ_VERSIONS - {6}))
def test_segment_bytes_naming_a_codec_their_version_does_not_know_are_refused(version: int) -> None:
    """A real segment stamped ``version`` (the layout of 2 or of 4), each column descriptor turned to
    every value codec of its type that the version does not know: refused, naming the version."""
    columns, types = _columns(ROWS, 1)
    if version < 4:
        data = encode_segment(Segment(SID, "one", TIMES, columns, types), max_version=2)
    else:
        more = Segment(SID, "two", TIMES + 1, *_columns(ROWS, 10))
        data = encode_segment(Segment(SID, "one", TIMES, columns, types, (more,)), max_version=4)
    body = bytearray(data[:-4])
    body[4:6] = struct.pack("<H", version)
    assert decode_segment(reseal(bytes(body))) is not None  # stamped ``version``, it is a valid segment
    tried = 0
    for data_type, offsets in _descriptor_offsets(data).items():
        for codec in REGISTRY.values():
            if codec.data_type is not data_type or codec.since <= version:
                continue
            for codec_id in registry.ids(codec):
                for pos in offsets:
                    forged = bytearray(body)
                    forged[pos] = codec_id
                    with pytest.raises(
                        CorruptSegmentError, match=f"codec id {codec_id} needs format version"
                    ):
                        decode_segment(reseal(bytes(forged)))
                    tried += 1
    assert tried


# ------------------------------------------------------------------------------ hypothesis round trips

_FLOATS = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=300).map(
    lambda v: np.array(v, dtype=np.float64)
)
_FLOAT_BITS = st.lists(st.integers(0, 2**64 - 1), max_size=300).map(
    lambda v: np.array(v, dtype=np.uint64).view(np.float64)
)
_INTS = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=300).map(lambda v: np.array(v, dtype=np.int64))


def _through_registry(codec: Codec[Any], block: Encoded, rows: int, want: npt.NDArray[Any]) -> None:
    lo, hi = registry.bounds(block.codec, rows)
    assert lo <= block.raw_len <= hi
    assert same_bits(want, registry.decode(framed(block), rows, reading()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_FLOATS, _FLOAT_BITS), st.floats(1e-9, 1e9))
def test_property_float_codecs_round_trip_through_the_registry(
    values: npt.NDArray[np.float64], step: float
) -> None:
    rows = int(values.shape[0])
    _through_registry(registry.F64_RAW, encoded(registry.F64_RAW, values), rows, values)
    _through_registry(registry.F64_BITS_INTSTREAM, encoded(registry.F64_BITS_INTSTREAM, values), rows, values)
    for codec, variants in (
        (registry.F64_SCALED, registry.F64_SCALED.encode(values)[:2]),
        (registry.F64_GRID, registry.F64_GRID.encode(values, step)),  # any step: the residual makes it exact
    ):
        packed, planes = variants
        for block in [codec.block(packed)] if packed is not None else []:
            _through_registry(codec, block, rows, values)
        if planes is not None:
            _through_registry(codec, codec.as_is(planes), rows, values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_INTS)
def test_property_integer_and_bool_codecs_round_trip_through_the_registry(
    values: npt.NDArray[np.int64],
) -> None:
    rows = int(values.shape[0])
    _through_registry(registry.I64_INTSTREAM, encoded(registry.I64_INTSTREAM, values), rows, values)
    _through_registry(registry.TS_INTSTREAM, encoded(registry.TS_INTSTREAM, values), rows, values)
    flags = values % 3 == 0
    _through_registry(registry.BOOL_PACKBITS, encoded(registry.BOOL_PACKBITS, flags), rows, flags)
    if rows >= 1:
        table, index = np.unique(values, return_inverse=True)
        if table.shape[0] <= 256:
            entries = encoded(registry.I64_INTSTREAM, table)
            indices = encoded(registry.I64_INTSTREAM, index.astype(np.int64).ravel())
            block = registry.I64_DICT.block(registry.I64_DICT.encode(table.shape[0], entries, indices))
            _through_registry(registry.I64_DICT, block, rows, values)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=12), max_size=200))
def test_property_text_round_trips_through_the_registry(rows: list[str]) -> None:
    values = np.empty(len(rows), dtype=object)
    values[:] = rows
    try:
        payload, _ = registry.STR_DICT.encode(values)
    except ValueError:  # text UTF-8 cannot encode (a lone surrogate) is refused by the encoder, not altered
        return
    _through_registry(registry.STR_DICT, registry.STR_DICT.block(payload), len(rows), values)
