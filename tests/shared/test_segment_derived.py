"""Derived columns (format 5): keyed, difference, recent-value and dictionary columns — what they save,
bit-exact round trips, forged blocks."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment_cases import (  # (tests/shared/conftest.py loads it)
    I64_MAX,
    I64_MIN,
    _column_codecs,
    _version,
    assert_bit_exact,
    encode_segment,
    expect_corrupt,
    forge_block,
    mutate_resealed,
    reseal,
    roundtrip,
    small_segment,
    text_segment,
)

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.segment import (
    CODEC_F64_DICT,
    CODEC_F64_DIFF,
    CODEC_F64_KEYED,
    CODEC_F64_RAW,
    CODEC_F64_RECENT,
    CODEC_I64_INTSTREAM,
    ZSTD_FLAG,
    Segment,
    decode_segment,
    new_segment_id,
)

# ------------------------------------------------------------------------- keyed columns (format 5)


def interleaved_series(seed: int, epochs: int = 400) -> Segment:
    """Generated multiplexed rows (not the corpus): each epoch lists the series in view (ids in
    ascending order, some appearing and disappearing), one row per series, as a GNSS receiver's raw
    measurements or a radar's tracks do. Per series: a range that drifts smoothly around its own large
    offset (decimals), a Doppler-like rate and a signal strength; plus NaN fills and -0.0."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(np.arange(1, 64), 24, replace=False))
    offset = rng.uniform(2e7, 2.6e7, ids.shape[0])
    rate = rng.uniform(-800, 800, ids.shape[0])
    t, key, rng_m, dopp, cn0 = [], [], [], [], []
    for e in range(epochs):
        visible = rng.random(ids.shape[0]) < 0.8
        for j in np.flatnonzero(visible):
            t.append(1_700_000_000_000_000_000 + e * 100_000_000)
            key.append(float(ids[j]))
            rng_m.append(round(offset[j] + rate[j] * e * 0.1 + rng.normal(0, 0.05), 3))
            dopp.append(round(rate[j] + rng.normal(0, 0.01), 3))
            cn0.append(float(rng.integers(25, 50)))
    rows = len(t)
    dopp_arr = np.array(dopp)
    dopp_arr[rng.integers(0, rows, 5)] = np.nan
    dopp_arr[0] = -0.0
    return Segment(
        new_segment_id(),
        "gnss/raw",
        np.array(t, dtype=np.int64),
        {
            1: np.array(key),
            2: np.array(rng_m),
            3: dopp_arr,
            4: np.array(cn0),
            5: np.arange(rows, dtype=np.int64) % 7,
        },
        {
            1: DataType.FLOAT64,
            2: DataType.FLOAT64,
            3: DataType.FLOAT64,
            4: DataType.FLOAT64,
            5: DataType.INT64,
        },
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_keyed_columns_shrink_interleaved_series_and_round_trip(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = interleaved_series(seed)
    data = encode_segment(seg)
    assert _version(data) == 5
    roundtrip(seg)
    codecs = _column_codecs(data)
    assert codecs[2] == CODEC_F64_KEYED and codecs[3] == CODEC_F64_KEYED  # range and rate follow the key
    assert codecs[1] & ~ZSTD_FLAG != CODEC_F64_KEYED  # the key itself is stored as it is
    from fleetloop_shared.segment import plan_columns

    monkeypatch.setattr(plan_columns, "plan_key", lambda t_ns, columns: None)
    plain = encode_segment(seg)
    assert _version(plain) == 2  # one group, nothing keyed: format 2 as before
    assert len(data) < 0.85 * len(plain)


def test_counters_and_checksums_are_not_keys() -> None:
    """A CAN message's rolling counter and the checksum over it change on every row too; they must not
    reorder the message's signals (and the segment stays format 2, readable by older clouds)."""
    rows = 2000
    rng = np.random.default_rng(5)
    counter = (np.arange(rows) % 16).astype(np.int64)
    speed = np.round(np.cumsum(rng.normal(0, 0.2, rows)) + 50, 2)
    checksum = ((counter * 7 + (speed * 100).astype(np.int64)) % 256).astype(np.int64)
    seg = Segment(
        new_segment_id(),
        "can0/SPEED",
        np.arange(rows, dtype=np.int64) * 10_000_000,
        {1: counter, 2: checksum, 3: speed, 4: np.round(speed * 0.9, 2)},
        {1: DataType.INT64, 2: DataType.INT64, 3: DataType.FLOAT64, 4: DataType.FLOAT64},
    )
    data = encode_segment(seg)
    assert _version(data) == 2
    roundtrip(seg)


@st.composite
def keyed_segments(draw: st.DrawFn) -> Segment:
    """Interleaved series with hypothesis-drawn ids, values and special values (any may be keyed)."""
    series = draw(st.integers(3, 12))
    epochs = draw(st.integers(40, 90))
    ids = draw(st.lists(st.integers(-5, 200), min_size=series, max_size=series, unique=True))
    keys = np.tile(np.array(ids, dtype=np.int64), epochs)
    rows = keys.shape[0]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = np.repeat(rng.uniform(-1e6, 1e6, series)[None, :], epochs, axis=0).ravel()
    values = np.round(base + np.cumsum(rng.normal(0, 1, rows)) * 0.01, 2)
    specials = draw(st.lists(st.sampled_from([np.nan, -0.0, np.inf, -np.inf, 5e-324, 1e308]), max_size=6))
    for x in specials:
        values[draw(st.integers(0, rows - 1))] = x
    as_float = draw(st.booleans())
    key_col = keys.astype(np.float64) if as_float else keys
    ints = (
        np.repeat(np.array(ids, dtype=np.int64)[None, :] * 1000, epochs, axis=0).ravel()
        + np.arange(rows) // series
    )
    return Segment(
        new_segment_id(),
        "keyed",
        np.repeat(np.arange(epochs, dtype=np.int64) * 1_000_000, series),
        {7: key_col, 8: values, 9: ints, 10: values[::-1].copy()},
        {
            7: DataType.FLOAT64 if as_float else DataType.INT64,
            8: DataType.FLOAT64,
            9: DataType.INT64,
            10: DataType.FLOAT64,
        },
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_segments(), st.booleans())
def test_property_keyed_round_trip_is_bit_exact(seg: Segment, bundled: bool) -> None:
    if bundled:  # a keyed group among others of a format 5 multi-group segment
        other = Segment(
            seg.segment_id, "other", seg.t_ns[:10].copy(), {1: np.arange(10.0)}, {1: DataType.FLOAT64}
        )
        seg = Segment(seg.segment_id, seg.group, seg.t_ns, seg.columns, seg.data_types, (other,))
    data = encode_segment(seg)
    decoded = decode_segment(data)
    for want, got in zip(seg.groups(), decoded.groups(), strict=True):
        assert_bit_exact(want, got)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: struct.pack("<I", 99) + p[4:], "key signal 99 is not an unkeyed number column"),
        (
            lambda p: struct.pack("<I", 3) + p[4:],
            "key signal 3 is not an unkeyed number column",
        ),  # keyed itself
        (lambda p: p[:4] + bytes([CODEC_I64_INTSTREAM]) + p[5:], "wraps codec id 33, not valid for FLOAT64"),
        (lambda p: p[:4] + bytes([CODEC_F64_KEYED]) + p[5:], "wraps codec id 20"),
        (lambda p: p[:5] + struct.pack("<I", 2**31) + p[9:], "lengths impossible"),
        (lambda p: p[:-1], "lengths impossible|truncated|stored length"),
    ],
)
def test_forged_keyed_blocks_are_refused_with_a_reason(edit: Any, message: str) -> None:
    expect_corrupt(
        forge_block(encode_segment(interleaved_series(1, epochs=60)), CODEC_F64_KEYED, edit), message
    )


def test_keyed_codecs_in_a_version_4_segment_are_refused() -> None:
    data = encode_segment(interleaved_series(2, epochs=60))
    assert _version(data) == 5
    expect_corrupt(reseal(data[:4] + struct.pack("<H", 4) + data[6:-4]), "needs format version 5")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_resealed_random_mutations_of_keyed_segments_never_raise_anything_else(data: st.DataObject) -> None:
    mutate_resealed(data, encode_segment(interleaved_series(3, epochs=30)))


# ---------------------------------------------------------------------- difference columns (format 5)


def calibrated_pair(seed: int, rows: int = 3000) -> Segment:
    """Generated (not the corpus): a gyro reported calibrated and uncalibrated by a constant bias, as
    two groups stamped together; float32-valued readings with -0.0 rows (which x + (-x) does not give
    back) and a NaN dropout in both."""
    rng = np.random.default_rng(seed)
    sid = new_segment_id()
    t = np.arange(rows, dtype=np.int64) * 5_000_000
    raw = np.cumsum(rng.normal(0, 0.01, (rows, 3)), axis=0).astype(np.float32).astype(np.float64)
    bias = np.array([-0.00978088, 0.03511047, -0.06835938], dtype=np.float32).astype(np.float64)
    calibrated = raw - bias
    calibrated[rng.integers(0, rows, 6), 0] = -0.0
    raw[100:104, 1] = np.nan
    calibrated[100:104, 1] = np.nan
    uncal = Segment(
        sid,
        "imu/gyro_uncalibrated",
        t.copy(),
        {10 + k: raw[:, k].copy() for k in range(3)},
        {10 + k: DataType.FLOAT64 for k in range(3)},
    )
    cal = Segment(
        sid,
        "imu/gyro",
        t.copy(),
        {20 + k: calibrated[:, k].copy() for k in range(3)},
        {20 + k: DataType.FLOAT64 for k in range(3)},
    )
    return Segment(uncal.segment_id, uncal.group, uncal.t_ns, uncal.columns, uncal.data_types, (cal,))


@pytest.mark.parametrize("seed", [1, 2])
def test_difference_columns_store_a_calibrated_twin_nearly_free(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = calibrated_pair(seed)
    data = encode_segment(seg)
    assert _version(data) == 5
    decoded = decode_segment(data)
    for want, got in zip(seg.groups(), decoded.groups(), strict=True):
        assert_bit_exact(want, got)
    codecs = _column_codecs(data)
    assert [codecs[20 + k] for k in range(3)] == [CODEC_F64_DIFF] * 3
    from fleetloop_shared.segment import plan_columns

    monkeypatch.setattr(plan_columns, "difference_columns", lambda columns, blocks, stamped_with, grid: None)
    plain = encode_segment(seg)
    assert _version(plain) == 4
    assert len(data) < 0.65 * len(plain)


@st.composite
def twin_segments(draw: st.DrawFn) -> Segment:
    rows = draw(st.integers(800, 2000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ref = np.round(np.cumsum(rng.normal(0, 1, rows)), draw(st.integers(2, 6)))
    offset = draw(st.sampled_from([0.0, 0.5, -1e-3, 1e6, 0.1]))
    twin = ref + offset + np.round(rng.normal(0, 0.001, rows), 4) * draw(st.integers(0, 1))
    for x in draw(st.lists(st.sampled_from([np.nan, -0.0, np.inf, -np.inf, 5e-324]), max_size=5)):
        (twin if draw(st.booleans()) else ref)[draw(st.integers(0, rows - 1))] = x
    t = np.arange(rows, dtype=np.int64)
    sid = new_segment_id()
    if draw(st.booleans()):  # the twin in the same group
        return Segment(
            sid,
            "a",
            t,
            {1: ref, 2: twin, 3: -twin},
            {1: DataType.FLOAT64, 2: DataType.FLOAT64, 3: DataType.FLOAT64},
        )
    other = Segment(sid, "b", t.copy(), {2: twin}, {2: DataType.FLOAT64})
    return Segment(sid, "a", t, {1: ref}, {1: DataType.FLOAT64}, (other,))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(twin_segments())
def test_property_difference_round_trip_is_bit_exact(seg: Segment) -> None:
    decoded = decode_segment(encode_segment(seg))
    for want, got in zip(seg.groups(), decoded.groups(), strict=True):
        assert_bit_exact(want, got)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: struct.pack("<I", 99) + p[4:], "reference signal 99 is no FLOAT64 column"),
        (lambda p: struct.pack("<I", 21) + p[4:], "reference signal 21 is no FLOAT64 column"),  # a difference
        (lambda p: p[:5] + struct.pack("<I", 2**31) + p[9:], "lengths impossible"),
        (lambda p: p[:9] + struct.pack("<I", 10**6) + p[13:], "patched rows impossible"),
        (lambda p: p[:4] + bytes([CODEC_F64_DIFF]) + p[5:], "wraps codec id 21"),
    ],
)
def test_forged_difference_blocks_are_refused_with_a_reason(edit: Any, message: str) -> None:
    expect_corrupt(forge_block(encode_segment(calibrated_pair(1, rows=600)), CODEC_F64_DIFF, edit), message)


def test_forged_difference_patches_out_of_order_are_refused() -> None:
    data = encode_segment(calibrated_pair(2, rows=600))
    from fleetloop_shared.segment import framing

    for g in framing.parse(data).groups:
        for block in g.blocks[1:]:
            if block.codec == CODEC_F64_DIFF and struct.unpack_from("<I", block.payload, 9)[0] >= 2:
                pos = data.find(block.payload)
                forged = bytearray(block.payload)
                forged[13:17], forged[17:21] = forged[17:21], forged[13:17]  # swap the first two positions
                body = data[:pos] + bytes(forged) + data[pos + len(forged) : -4]
                expect_corrupt(reseal(body), "patched rows out of range or not increasing")
                return
    raise AssertionError("no difference block with two patches")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_resealed_random_mutations_of_difference_segments_never_raise_anything_else(
    data: st.DataObject,
) -> None:
    mutate_resealed(data, encode_segment(calibrated_pair(3, rows=400)))


def test_max_version_caps_what_a_writer_uses_for_older_clouds() -> None:
    """The rollout order: until the cloud reads format 5, agents write at most 4 (no keyed or difference
    column, same values); below 4 a segment of several groups is refused with the reason, not
    silently split; unknown versions are refused."""
    keyed = interleaved_series(4, epochs=80)
    assert _version(encode_segment(keyed)) == 5
    capped = encode_segment(keyed, max_version=4)
    assert _version(capped) == 2 and decode_segment(capped) == keyed
    assert len(capped) > len(encode_segment(keyed))
    twins = calibrated_pair(4, rows=800)
    assert _version(encode_segment(twins, max_version=4)) == 4
    assert decode_segment(encode_segment(twins, max_version=4)) == twins
    with pytest.raises(UserError, match="needs format version 4, the limit is 3"):
        encode_segment(twins, max_version=3)
    with pytest.raises(UserError, match="text columns need segment format version 3, the limit is 2"):
        encode_segment(text_segment(), max_version=2)
    with pytest.raises(UserError, match="format version 7 cannot be written"):
        encode_segment(small_segment(), max_version=7)


# ------------------------------------------------------------------------- recent values (format 5)


def dithering_imu(seed: int, rows: int = 6000) -> Segment:
    """Generated (not the corpus): a calibrated IMU axis at rest and moving. Raw readings are integers
    (noise of a few counts, a slow drift while moving), printed as 7-significant-digit floats, so the
    same few values recur within a few hundred rows but seldom twice in a row; plus NaN dropouts."""
    rng = np.random.default_rng(seed)
    counts = np.round(rng.normal(0, 3, rows)).astype(np.int64)
    counts[rows // 2 :] += np.cumsum(rng.integers(-40, 41, rows - rows // 2))  # motion
    values = np.array([float(f"{c * 0.0610351 + 0.0123:.7g}") for c in counts])
    values[rng.integers(0, rows, 4)] = np.nan
    return Segment(
        new_segment_id(),
        "imu/gyro_x",
        np.arange(rows, dtype=np.int64) * 10_000_000,
        {1: values},
        {1: DataType.FLOAT64},
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_recent_values_name_an_earlier_row_and_round_trip(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = dithering_imu(seed)
    data = encode_segment(seg)
    assert _version(data) == 5 and _column_codecs(data)[1] == CODEC_F64_RECENT
    roundtrip(seg)
    from fleetloop_shared.segment import plan_values

    monkeypatch.setattr(plan_values, "recent_values", lambda values, grid: None)
    plain = encode_segment(seg)
    assert _version(plain) == 2
    assert len(data) < 0.9 * len(plain)
    assert decode_segment(encode_segment(seg, max_version=4)) == seg


def test_recent_references_kernel_and_numpy_agree() -> None:
    from fleetloop_shared.segment.codecs import recent

    rng = np.random.default_rng(7)
    for values in (
        rng.integers(0, 50, 5000),
        rng.integers(0, 3, 700),
        np.arange(3000),
        np.repeat(rng.integers(0, 9, 400), 3),
        np.array([], dtype=np.int64),
        np.array([I64_MIN, I64_MAX, I64_MIN, 0, I64_MAX]),
    ):
        bits = np.asarray(values, dtype=np.int64)
        fast, fast_distinct = recent.references(bits)
        slow, slow_distinct = recent._references_numpy(bits)
        assert fast.tolist() == slow.tolist() and fast_distinct == slow_distinct
        for i, k in enumerate(slow.tolist()):
            if k:
                assert 2 <= k <= recent.WINDOW and bits[i - k] == bits[i]
                assert not (bits[i - k + 1 : i] == bits[i]).any()  # the most recent one


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2048, 5000),
    st.integers(2, 400),
    st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from([np.nan, -0.0, np.inf, 5e-324]), max_size=4),
)
def test_property_recent_values_round_trip_is_bit_exact(
    rows: int, levels: int, seed: int, specials: list[float]
) -> None:
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 100, levels)
    values = table[rng.integers(0, levels, rows)] + np.repeat(rng.normal(0, 1e-3, rows // 64 + 1), 64)[:rows]
    for k, x in enumerate(specials):
        values[(k * 997) % rows] = x
    seg = Segment(new_segment_id(), "g", np.arange(rows, dtype=np.int64), {3: values}, {3: DataType.FLOAT64})
    roundtrip(seg)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p[:-1], "lengths|truncated|impossible"),
        (lambda p: p + b"\x00", "bytes after the literals"),
        (lambda p: bytes([CODEC_F64_RAW]) + p[1:], "references in codec 16"),
        (lambda p: p, None),  # unchanged: decodes (the forging itself is sound)
    ],
)
def test_forged_recent_value_blocks_are_refused_with_a_reason(edit: Any, message: str | None) -> None:
    seg = dithering_imu(3, rows=3000)
    forged = forge_block(encode_segment(seg), CODEC_F64_RECENT, edit)
    if message is None:
        assert decode_segment(forged) == seg
    else:
        expect_corrupt(forged, message)


def test_forged_recent_references_pointing_before_the_first_row_are_refused() -> None:
    from fleetloop_shared.segment.codecs import intstream

    refs = np.zeros(3000, dtype=np.int64)
    refs[0] = 5  # row 0 naming a row before it (checked before the literals are counted)
    stream = intstream.encode(refs)

    def edit(payload: bytes) -> bytes:
        rest = payload[9 + struct.unpack_from("<BII", payload, 0)[2] :]  # the literals as they were
        return struct.pack("<BII", CODEC_I64_INTSTREAM, len(stream), len(stream)) + stream + rest

    expect_corrupt(
        forge_block(encode_segment(dithering_imu(4, rows=3000)), CODEC_F64_RECENT, edit),
        "a reference points outside",
    )


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_resealed_random_mutations_of_recent_value_segments_never_raise_anything_else(
    data: st.DataObject,
) -> None:
    mutate_resealed(data, encode_segment(dithering_imu(5, rows=2500)))


# --------------------------------------------------------------------------- dictionaries (format 5)


def pressure_gauge(seed: int, rows: int = 4000) -> Segment:
    """Generated (not the corpus): a gauge with 9 ADC levels printed to 6 significant digits (so the
    levels are not on a grid), noisy between them; and an INT64 mode with 5 odd codes."""
    rng = np.random.default_rng(seed)
    levels = np.array([float(f"{0.327927 * k - 1.257:.6g}") for k in range(9)])
    fresh = rng.random(rows) < 0.55  # a new reading lands on any level; otherwise the last one holds
    level = rng.integers(0, 9, rows)[np.maximum.accumulate(np.where(fresh, np.arange(rows), 0))]
    codes = np.array([3, 1_000_003, -77, 2**40 + 1, 12345], dtype=np.int64)
    return Segment(
        new_segment_id(),
        "pump/gauge",
        np.arange(rows, dtype=np.int64) * 1_000_000_000,
        {1: levels[level], 2: codes[rng.integers(0, 5, rows)]},
        {1: DataType.FLOAT64, 2: DataType.INT64},
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_dictionaries_store_few_off_grid_values_as_indices(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetloop_shared.segment import CODEC_I64_DICT

    seg = pressure_gauge(seed)
    data = encode_segment(seg)
    assert _version(data) == 5
    codecs = _column_codecs(data)
    assert codecs[1] == CODEC_F64_DICT and codecs[2] == CODEC_I64_DICT
    roundtrip(seg)
    from fleetloop_shared.segment import plan_values

    monkeypatch.setattr(plan_values, "with_dictionary", lambda data_type, values, plain: plain)
    assert len(data) < 0.7 * len(encode_segment(seg))


def test_dictionary_kernel_and_numpy_agree() -> None:
    from fleetloop_shared.segment.codecs import recent

    rng = np.random.default_rng(9)
    for x in (
        rng.integers(-5, 5, 3000),
        np.array([7, 7, 7]),
        np.array([I64_MAX, I64_MIN, 0, I64_MIN]),
        rng.integers(0, 10**6, 500),
    ):
        bits = np.asarray(x, dtype=np.int64)
        want_table, want_index = np.unique(bits, return_inverse=True)
        for limit in (1, 5, 300, len(bits)):
            found = recent.dictionary(bits, limit)
            if len(want_table) > limit:
                assert found is None
            else:
                assert found is not None
                table, index = found
                assert table.tolist() == want_table.tolist()
                assert index.tolist() == want_index.ravel().tolist()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: struct.pack("<I", 0) + p[4:], "0 dictionary entries impossible"),
        (lambda p: struct.pack("<I", 300) + p[4:], "300 dictionary entries impossible"),
        (
            lambda p: struct.pack("<I", 8) + p[4:],
            "an index outside the 8 dictionary entries|integer stream holds",
        ),
        (lambda p: p + b"\x00", "bytes after the indices"),
        (lambda p: p[:4] + bytes([CODEC_F64_RAW]) + p[5:], "dictionary entries in codec 16"),
        (lambda p: p, None),
    ],
)
def test_forged_dictionary_blocks_are_refused_with_a_reason(edit: Any, message: str | None) -> None:
    seg = pressure_gauge(3, rows=1000)
    forged = forge_block(encode_segment(seg), CODEC_F64_DICT, edit)
    if message is None:
        assert decode_segment(forged) == seg
    else:
        expect_corrupt(forged, message)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(256, 3000), st.integers(1, 256), st.integers(0, 2**32 - 1), st.booleans())
def test_property_dictionary_round_trip_is_bit_exact(rows: int, levels: int, seed: int, floats: bool) -> None:
    rng = np.random.default_rng(seed)
    if floats:
        table = rng.normal(0, 1e3, levels)
        table[: min(levels, 3)] = [np.nan, -0.0, np.inf][: min(levels, 3)]
        values: npt.NDArray[Any] = table[rng.integers(0, levels, rows)]
        dt = DataType.FLOAT64
    else:
        values = rng.integers(I64_MIN, I64_MAX, levels, dtype=np.int64, endpoint=True)[
            rng.integers(0, levels, rows)
        ]
        dt = DataType.INT64
    roundtrip(Segment(new_segment_id(), "g", np.arange(rows, dtype=np.int64), {5: values}, {5: dt}))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_resealed_random_mutations_of_dictionary_segments_never_raise_anything_else(
    data: st.DataObject,
) -> None:
    mutate_resealed(data, encode_segment(pressure_gauge(5, rows=1200)))
