"""Segment format 6 and the newest writer: grid floats (codec 24) and compressed bodies.

test_segment.py, test_segment_groups.py and test_segment_derived.py take formats 2–5 apart byte by byte
(with the writer capped at 5); here the default writer runs, so every round trip below goes through
format 6 wherever it pays.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment_cases import (  # (tests/shared/conftest.py loads it)
    expect_corrupt,
    expect_every_byte_flip_corrupt,
    expect_every_truncation_corrupt,
    reseal,
)

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import (
    BODY_MAX_RATIO,
    BODY_MAX_SLACK,
    CODEC_F64_GRID,
    CODEC_F64_KEYED,
    CODEC_F64_RECENT,
    CODEC_TS_INTSTREAM,
    CODEC_TS_OFFSET,
    FLAG_BODY_ZSTD,
    FORMAT_VERSION,
    ZSTD_FLAG,
    Segment,
    decode_segment,
    encode_segment,
    framing,
    new_segment_id,
    plan_times,
)
from fleetloop_shared.segment.codecs import grid_float, intstream
from fleetloop_shared.segment.layout import Encoded

SID = new_segment_id()


def header_fields(data: bytes) -> tuple[int, int]:
    """(format version, flags) of a segment."""
    version, flags = struct.unpack_from("<HH", data, 4)
    return int(version), int(flags)


def opened(data: bytes) -> bytes:
    """The segment with its body decompressed (as the reader sees it) — for looking at the codecs."""
    return framing.opened(data)


def column_codecs(data: bytes) -> dict[int, int]:
    header = framing.parse(opened(data))
    return {sid: b.codec for g in header.groups for (sid, _), b in zip(g.columns, g.blocks[1:], strict=True)}


def assert_bit_exact(want: Segment, got: Segment) -> None:
    assert got == want  # Segment equality is bit-exact (NaN payloads, -0.0)
    for a, b in zip(want.groups(), got.groups(), strict=True):
        for sid, values in a.columns.items():
            if values.dtype == np.float64:
                assert np.array_equal(values.view(np.int64), b.columns[sid].view(np.int64))


# --------------------------------------------------------------------------------- grid floats


def wheel_speeds(seed: int, rows: int = 5000, offset: int = 0) -> npt.NDArray[np.float64]:
    """A CAN wheel speed as a phone logger stores it: raw counts of 0.01 km/h, offset, then m/s — a grid
    of step 0.01/3.6 that no power of ten or two scales to integers."""
    rng = np.random.default_rng(seed)
    raw = (
        8767 + offset + np.cumsum(rng.integers(-40, 41, rows))
    )  # (too many distinct values for a dictionary)
    return (raw * 0.01 - 67.67) * (1 / 3.6)


def test_grid_floats_store_converted_units_as_their_counts() -> None:
    t = np.arange(5000, dtype=np.int64) * 12_000_000
    columns = {1: wheel_speeds(1), 2: wheel_speeds(2)}
    seg = Segment(SID, "CAN/wheel_speed", t, columns, {1: DataType.FLOAT64, 2: DataType.FLOAT64})
    data = encode_segment(seg)
    assert header_fields(data)[0] == 6
    assert {c & ~ZSTD_FLAG for c in column_codecs(data).values()} == {CODEC_F64_GRID}
    assert_bit_exact(seg, decode_segment(data))
    older = encode_segment(seg, max_version=5)
    assert header_fields(older)[0] <= 5 and decode_segment(older) == seg
    assert len(data) < 0.6 * len(older), (len(data), len(older))


@pytest.mark.parametrize(
    ("values", "found"),
    [
        (np.arange(1, 400) * (3.3 / 4096), True),  # an ADC count in volts
        ((np.arange(-200, 200) * 0.01 - 67.67) * (1 / 3.6), True),  # km/h counts in m/s
        (np.round(np.linspace(0, 50, 400), 2), True),  # decimals are a grid too (the writer never asks)
        (np.random.default_rng(1).standard_normal(400), False),  # noise: no grid
        (np.full(400, 2.5), False),  # one value
        (np.array([1e-300, 1e300] * 200), False),  # a "step" no double ratio can hold
    ],
)
def test_find_step_sees_grids_of_other_steps_only(values: npt.NDArray[np.float64], found: bool) -> None:
    step = grid_float.find_step(values, 8.0)
    assert (step is not None) == found, step
    if step is not None:
        n = values / step[0]
        assert np.abs(n - np.rint(n)).max() < 1e-6


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=300),
    st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
)
def test_property_grid_float_round_trip_is_bit_exact(values: list[float], step: float) -> None:
    """Any doubles on any step round-trip bit for bit: off-grid values carry a larger residual."""
    v = np.array(values, dtype=np.float64)
    v[::7] = -0.0 if v.size else v[::7]
    packed, planes = grid_float.encode_variants(v, step)
    for payload in (packed, planes):
        if payload is not None:
            back = grid_float.decode(payload, v.shape[0])
            assert np.array_equal(back.view(np.int64), v.view(np.int64))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00" * 4, "step truncated"),
        (struct.pack("<d", 0.0), "not a positive finite"),
        (struct.pack("<d", -1.0), "not a positive finite"),
        (struct.pack("<d", math.nan), "not a positive finite"),
        (struct.pack("<d", math.inf), "not a positive finite"),
        (struct.pack("<d", 0.5) + b"\x00", "truncated"),
    ],
)
def test_forged_grid_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(intstream.StreamError, match=message):
        grid_float.decode(payload, 3)


def test_grid_floats_in_a_version_5_segment_are_refused() -> None:
    """Codec 24 is format 6: a segment stamped 5 naming it — at the top or inside a keyed or recent-values
    block — is refused with the reason, not decoded by luck."""
    t = np.arange(5000, dtype=np.int64) * 12_000_000
    seg = Segment(SID, "g", t, {1: wheel_speeds(3)}, {1: DataType.FLOAT64})
    body = opened(encode_segment(seg))[:-4]
    as_five = body[:4] + struct.pack("<H", 5) + body[6:]
    expect_corrupt(reseal(as_five), "codec id 24 needs format version 6, segment is 5")

    # wrapped: a keyed block around a grid float, stamped 5
    keys = np.tile(np.arange(4, dtype=np.int64), 1250)
    series = (
        np.concatenate([wheel_speeds(k, 1250, 100_000 * k) for k in range(4)]).reshape(4, 1250).T.reshape(-1)
    )
    keyed = Segment(
        SID,
        "radar",
        np.repeat(np.arange(1250, dtype=np.int64), 4) * 50_000_000,
        {1: keys, 2: series, 3: series[::-1].copy()},
        {1: DataType.INT64, 2: DataType.FLOAT64, 3: DataType.FLOAT64},
    )
    data = encode_segment(keyed)
    assert column_codecs(data)[2] == CODEC_F64_KEYED
    assert decode_segment(data) == keyed
    body = opened(data)[:-4]
    expect_corrupt(reseal(body[:4] + struct.pack("<H", 5) + body[6:]), "codec id 24 needs format version 6")


def test_a_wrapped_grid_float_makes_the_segment_version_6() -> None:
    """Recent values whose literals are grid floats: the segment is stamped 6 (a format 5 reader would
    refuse the wrapped codec), and capping at 5 writes the literals another way."""
    rng = np.random.default_rng(5)
    values = (rng.integers(0, 300_000, 6000) + 1000) * (0.01 / 3.6)  # (over 2 bytes a literal)
    for row in np.flatnonzero(rng.random(6000) < 0.6):  # 60 % of the rows repeat one 2..200 rows back
        if row >= 200:
            values[row] = values[row - rng.integers(2, 200)]
    seg = Segment(
        SID, "imu", np.arange(6000, dtype=np.int64) * 10_000_000, {1: values}, {1: DataType.FLOAT64}
    )
    data = encode_segment(seg)
    codecs = column_codecs(data)
    assert codecs[1] == CODEC_F64_RECENT
    payload = _first_value_payload(data)
    (references_stored,) = struct.unpack_from("<I", payload, 5)
    assert payload[9 + references_stored] & ~ZSTD_FLAG == CODEC_F64_GRID  # the literals are grid floats
    assert header_fields(data)[0] == 6 and decode_segment(data) == seg
    capped = encode_segment(seg, max_version=5)
    assert header_fields(capped)[0] == 5 and decode_segment(capped) == seg


def _first_value_payload(data: bytes) -> bytes:
    header = framing.parse(opened(data))
    return bytes(header.groups[0].blocks[1].payload)


# ---------------------------------------------------------------------------- compressed bodies


def small_groups(seed: int, groups: int = 40) -> Segment:
    """Many small groups (a car's bus: dozens of messages, a few hundred frames each): every block is
    small, so each of its own zstd frames costs framing and tables that one body frame shares."""
    rng = np.random.default_rng(seed)
    parts = []
    sid = 1
    for g in range(groups):
        rows = int(rng.integers(20, 300))
        t = np.sort(rng.integers(0, 10**10, rows)).astype(np.int64)
        cols: dict[int, npt.NDArray[Any]] = {}
        types: dict[int, DataType] = {}
        for _ in range(int(rng.integers(1, 6))):
            kind = int(rng.integers(0, 3))
            if kind == 0:
                cols[sid], types[sid] = np.cumsum(rng.integers(-2, 3, rows)) * 0.25, DataType.FLOAT64
            elif kind == 1:
                cols[sid], types[sid] = rng.integers(0, 16, rows).astype(np.int64), DataType.INT64
            else:
                cols[sid], types[sid] = rng.integers(0, 2, rows).astype(np.bool_), DataType.BOOL
            sid += 1
        parts.append(Segment(SID, f"can0/MSG_{g:03d}", t, cols, types))
    head = parts[0]
    return Segment(SID, head.group, head.t_ns, head.columns, head.data_types, tuple(parts[1:]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compressed_body_shrinks_segments_of_many_small_groups(seed: int) -> None:
    seg = small_groups(seed)
    data = encode_segment(seg)
    assert header_fields(data) == (6, FLAG_BODY_ZSTD)
    assert decode_segment(data) == seg
    older = encode_segment(seg, max_version=5)
    assert header_fields(older) == (4, 0)
    assert len(data) < 0.93 * len(older), (len(data), len(older))


def test_a_body_that_does_not_shrink_is_not_compressed() -> None:
    """One group of noise in big blocks: nothing for a body frame to gain, so the old layout stays."""
    rng = np.random.default_rng(9)
    seg = Segment(
        SID, "imu", np.arange(20000, dtype=np.int64), {1: rng.standard_normal(20000)}, {1: DataType.FLOAT64}
    )
    data = encode_segment(seg)
    assert header_fields(data)[1] == 0 and header_fields(data)[0] < 6
    assert decode_segment(data) == seg


def test_every_single_byte_flip_and_truncation_of_a_compressed_segment_is_detected() -> None:
    good = encode_segment(small_groups(4, groups=6))
    assert header_fields(good) == (6, FLAG_BODY_ZSTD)
    expect_every_byte_flip_corrupt(good, masks=(0x55,))
    expect_every_truncation_corrupt(good)


def test_forged_compressed_bodies_are_refused_before_decompressing() -> None:
    good = encode_segment(small_groups(5, groups=8))
    head = good[:48]
    expect_corrupt(reseal(head + b"not a zstd frame at all"), "not a zstd frame")
    # a bomb: a frame that declares far more than the ratio allows for its stored size
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (BODY_MAX_SLACK + 4_000_000))
    assert BODY_MAX_RATIO * len(bomb) + BODY_MAX_SLACK < BODY_MAX_SLACK + 4_000_000
    expect_corrupt(reseal(head + bomb), "declares .* bytes \\(at most")
    # a frame without its content size
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(opened(good)[48:-4])
    expect_corrupt(reseal(head + nosize), "declares -1 bytes")
    # the flag on a version that has no compressed body
    expect_corrupt(reseal(good[:4] + struct.pack("<H", 5) + good[6:-4]), "unknown header flags 0x0001")
    # an unknown flag beside the body flag
    expect_corrupt(reseal(good[:6] + struct.pack("<H", FLAG_BODY_ZSTD | 4) + good[8:-4]), "flags 0x0004")
    # an empty body (zstd would hand back nothing and ignore what follows the frame)
    empty = zstandard.ZstdCompressor().compress(b"")
    expect_corrupt(reseal(head + empty + b"junk after the frame"), "declares 0 bytes")
    # a newer version with the flag: refused by its number, nothing decompressed
    newer = good[:4] + struct.pack("<H", FORMAT_VERSION + 1) + good[6:-4] + b"\xff"
    expect_corrupt(reseal(newer), f"unsupported segment format version {FORMAT_VERSION + 1}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_resealed_mutations_inside_a_compressed_body_never_raise_anything_else(data: st.DataObject) -> None:
    """A forger who recompresses a mutated body and reseals it: CorruptSegmentError or a segment that
    round-trips, never another exception."""
    good = encode_segment(small_groups(data.draw(st.integers(1, 4)), groups=5))
    inner = bytearray(opened(good)[48:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(inner) - 1))
        inner[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(inner)))
    body = bytes(inner[:cut] if data.draw(st.booleans()) else inner)
    forged = reseal(good[:48] + zstandard.ZstdCompressor().compress(body))
    try:
        seg = decode_segment(forged)
    except CorruptSegmentError as exc:
        assert "\n" not in str(exc)
        return
    assert decode_segment(encode_segment(seg)) == seg


# ----------------------------------------------------------------------- the newest writer, any data


@st.composite
def mixed_segments(draw: st.DrawFn) -> Segment:
    """One to six groups of any values: doubles of every kind, grid values, ints, bools."""
    ngroups = draw(st.integers(1, 6))
    parts = []
    sid = 1
    for g in range(ngroups):
        if parts and draw(st.booleans()):  # sent together with the first group: its times plus a little
            rows = int(parts[0].t_ns.shape[0])
            jitter = draw(st.lists(st.integers(-(2**20), 2**20), min_size=rows, max_size=rows))
            t = parts[0].t_ns + np.array(jitter, dtype=np.int64)
        else:
            rows = draw(st.integers(0, 120))
            t = np.array(
                draw(st.lists(st.integers(-(2**62), 2**62), min_size=rows, max_size=rows)), dtype=np.int64
            )
        cols: dict[int, npt.NDArray[Any]] = {}
        types: dict[int, DataType] = {}
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["float", "grid", "int", "bool"]))
            if kind == "float":
                values = draw(st.lists(st.floats(width=64), min_size=rows, max_size=rows))
                cols[sid], types[sid] = np.array(values, dtype=np.float64), DataType.FLOAT64
            elif kind == "grid":
                step = draw(st.floats(min_value=1e-6, max_value=1e3))
                counts = draw(st.lists(st.integers(-(10**6), 10**6), min_size=rows, max_size=rows))
                cols[sid], types[sid] = np.array(counts, dtype=np.float64) * step, DataType.FLOAT64
            elif kind == "int":
                values = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows, max_size=rows))
                cols[sid], types[sid] = np.array(values, dtype=np.int64), DataType.INT64
            else:
                cols[sid], types[sid] = (
                    np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), dtype=np.bool_),
                    DataType.BOOL,
                )
            sid += 1
        parts.append(Segment(SID, f"group-{g}", t, cols, types))
    head = parts[0]
    return Segment(SID, head.group, head.t_ns, head.columns, head.data_types, tuple(parts[1:]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_segments())
def test_property_newest_writer_round_trip_is_bit_exact(seg: Segment) -> None:
    data = encode_segment(seg)
    assert header_fields(data)[0] <= FORMAT_VERSION
    assert_bit_exact(seg, decode_segment(data))
    for cap in (5, 4):
        assert decode_segment(encode_segment(seg, max_version=cap)) == seg


def test_real_corpus_round_trips_through_the_newest_writer(recordings: Path) -> None:
    """Every real data set, bundled as the store imports it: bit-exact, and smaller than format 5 as a
    whole (a set may come out a few bytes larger: the grid is chosen on a sample, not by encoding twice)."""
    from real_corpus import real_corpus

    from fleetloop_agent.store_import import to_segments
    from fleetloop_cli.store_commands import import_segments
    from fleetloop_shared.catalog import Catalog

    versions = set()
    newest = older = 0
    for name, result in real_corpus(recordings):
        for seg in import_segments(result, Catalog(), to_segments):
            data = encode_segment(seg)
            versions.add(header_fields(data)[0])
            assert decode_segment(data) == seg, name
            five = len(encode_segment(seg, max_version=5))
            assert len(data) <= five * 1.001, name
            newest, older = newest + len(data), older + five
    assert 6 in versions
    assert newest < 0.95 * older, (newest, older)


# ------------------------------------------------------------------------- time offsets (codec 5)


def gnss_module(seed: int, epochs: int = 600) -> Segment:
    """A CAN GNSS module: each epoch it sends position, speed and attitude frames one after the other.
    The epoch's arrival jitters by milliseconds, the frames within it by microseconds."""
    rng = np.random.default_rng(seed)
    epoch = np.cumsum(rng.integers(95_000_000, 105_000_000, epochs)).astype(np.int64)
    parts = []
    for k, name in enumerate(["gnss_pos", "gnss_speed", "gnss_attitude"]):
        t = epoch + k * 350_000 + rng.integers(-2_000, 2_000, epochs)
        values = np.cumsum(rng.integers(-5, 6, epochs)).astype(np.int64)
        parts.append(
            Segment(SID, f"can2/{name}", t.astype(np.int64), {10 + k: values}, {10 + k: DataType.INT64})
        )
    head = parts[0]
    return Segment(SID, head.group, head.t_ns, head.columns, head.data_types, tuple(parts[1:]))


def time_codecs(data: bytes) -> list[int]:
    header = framing.parse(opened(data))
    return [g.blocks[0].codec & ~ZSTD_FLAG for g in header.groups]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_time_offsets_store_frames_sent_together_as_their_spacing(seed: int) -> None:
    seg = gnss_module(seed)
    data = encode_segment(seg)
    assert time_codecs(data) == [CODEC_TS_INTSTREAM, *[CODEC_TS_OFFSET] * 2]
    assert decode_segment(data) == seg
    older = encode_segment(seg, max_version=5)
    assert CODEC_TS_OFFSET not in time_codecs(older) and decode_segment(older) == seg
    assert len(data) < 0.8 * len(older), (len(data), len(older))


def test_time_offsets_wrap_like_int64_and_round_trip_at_the_extremes() -> None:
    t = np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max] * 40, dtype=np.int64)
    u = t[::-1].copy()
    parts = [
        Segment(SID, "a", t, {1: np.arange(160, dtype=np.int64)}, {1: DataType.INT64}),
        Segment(SID, "b", u, {2: np.arange(160, dtype=np.int64)}, {2: DataType.INT64}),
    ]
    seg = Segment(SID, "a", t, parts[0].columns, parts[0].data_types, (parts[1],))
    assert decode_segment(encode_segment(seg)) == seg


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (lambda i, rows: (CODEC_TS_OFFSET, struct.pack("<H", i), 2), "impossible|truncated"),
        (
            lambda i, rows: (
                CODEC_TS_OFFSET,
                struct.pack("<H", i) + intstream.encode(np.zeros(rows, np.int64)),
                0,
            ),
            "not an earlier group",
        ),
        (
            lambda i, rows: (
                CODEC_TS_OFFSET,
                struct.pack("<H", 0) + intstream.encode(np.zeros(rows + 1, np.int64)),
                0,
            ),
            "holds .* values, expected",
        ),
        (
            lambda i, rows: (
                CODEC_TS_OFFSET,
                struct.pack("<H", 0) + intstream.encode(np.zeros(rows, np.int64)) + b"x",
                0,
            ),
            "bytes after the offsets",
        ),
    ],
)
def test_forged_time_offsets_are_refused_with_a_reason(
    forge: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offsets naming the group itself (not an earlier one), too many offsets, bytes after them."""

    def forged(i: int, times: Any, same_as: Any, own: Any) -> Any:
        if i == 0:
            return None
        codec, payload, _ = forge(i, int(times[i].shape[0]))
        return Encoded(codec, payload, len(payload))

    monkeypatch.setattr(plan_times, "offset_times", forged)
    data = encode_segment(gnss_module(4, epochs=50))
    expect_corrupt(data, message)


def test_time_offsets_in_a_version_5_segment_are_refused() -> None:
    body = opened(encode_segment(gnss_module(5)))[:-4]
    assert header_fields(body)[0] == 6
    expect_corrupt(reseal(body[:4] + struct.pack("<H", 5) + body[6:]), "unknown timestamp codec id")
