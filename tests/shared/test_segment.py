"""Segment codec, formats 2 and 3: bit-exact round trips (synthetic, property-based, real recordings),
building segments, and hostile bytes; multi-group segments are in test_segment_groups.py, derived
columns in test_segment_derived.py, format 6 in test_segment_v6.py."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
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
    expect_every_byte_flip_corrupt,
    expect_every_truncation_corrupt,
    floats_from_bits,
    mutate_resealed,
    reseal,
    roundtrip,
    segments,
    small_segment,
    text,
    text_segment,
)

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import CorruptSegmentError, UserError
from fleetloop_shared.samples import GroupBatch
from fleetloop_shared.segment import (
    CODEC_F64_BITS_INTSTREAM,
    CODEC_F64_KEYED,
    CODEC_F64_RAW,
    CODEC_F64_SCALED,
    CODEC_F64_XOR,
    CODEC_I64_INTSTREAM,
    CODEC_I64_KEYED,
    CODEC_STR_DICT,
    FORMAT_VERSION,
    MAGIC,
    MAX_CELLS,
    MAX_ROWS,
    MAX_TEXT_BYTES,
    ZSTD_FLAG,
    Segment,
    bundle_segments,
    decode_segment,
    new_segment_id,
    segment_from_batch,
)

# ------------------------------------------------------------------------------------- round trips


def test_special_values_round_trip_bit_exact() -> None:
    special_nans = floats_from_bits(
        [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF4DEADBEEF0001, 0xFFFFFFFFFFFFFFFF]
    )
    seg = small_segment()
    seg.t_ns = np.arange(-5, 0, dtype=np.int64) * 7
    seg.columns = {1: special_nans, 2: np.array([I64_MIN, I64_MAX, I64_MIN, 0, I64_MAX], dtype=np.int64)}
    seg.data_types = {1: DataType.FLOAT64, 2: DataType.INT64}
    decoded = roundtrip(seg)
    assert decoded.columns[1].view(np.uint64).tolist() == special_nans.view(np.uint64).tolist()
    assert np.signbit(roundtrip(small_segment()).columns[3][1])  # -0.0 stays negative


def test_strings_round_trip_exactly() -> None:
    decoded = roundtrip(text_segment())
    assert decoded.columns[4].dtype == object and decoded.columns[4][0] == ""
    rng = np.random.default_rng(4)
    n = 5000
    cases = {
        "all equal": text(["same"] * n),
        "all equal empty": text([""] * n),
        "all distinct": text([f"fault-{i}-{'ü' * (i % 7)}" for i in range(n)]),
        "few, flapping": text([["OFF", "ON", "READY"][k] for k in rng.integers(0, 3, n)]),
        "runs": text(["P"] * 1000 + ["R"] * 10 + ["N"] * 2000 + ["D"] * 1990),
        "very long": text(["€" * 2_000_000 if i % 1000 == 0 else "short" for i in range(n)]),
        "scripts": text(
            ["日本語", "עברית", "Ελληνικά", "emoji 🚗💨", 'tab\tnewline\nquote"', "\x00nul"] * (n // 6)
        ),
    }
    for name, values in cases.items():
        seg = Segment(
            new_segment_id(), name, np.arange(len(values), dtype=np.int64), {1: values}, {1: DataType.STRING}
        )
        data = encode_segment(seg)
        assert struct.unpack_from("<H", data, 4)[0] == 3, name
        assert column_codec(data) & ~ZSTD_FLAG == CODEC_STR_DICT, name
        roundtrip(seg)
    # numpy's own text arrays are accepted and come back as Python str
    seg = Segment(
        new_segment_id(),
        "u",
        np.arange(3, dtype=np.int64),
        {1: np.array(["a", "", "bc"])},
        {1: DataType.STRING},
    )
    assert decode_segment(encode_segment(seg)).columns[1].tolist() == ["a", "", "bc"]


def test_writers_stamp_version_2_unless_a_column_is_text() -> None:
    # A cloud that reads only version 2 keeps accepting every segment without text.
    assert struct.unpack_from("<H", encode_segment(small_segment()), 4)[0] == 2
    assert struct.unpack_from("<H", encode_segment(text_segment()), 4)[0] == 3


#: ``small_segment()`` as the released version-2 writer encoded it (commit 8166566): readers keep
#: reading every released version, so these exact bytes must decode to it for ever.
V2_SMALL_SEGMENT = bytes.fromhex(
    "464c534702000000000102030405060708090a0b0c0d0e0f060000000000000018fcffffffffffffc005d90100000000"
    "0a0063616e302f53504545440203000300000001900700000002a1090000000330022600000026000000000600000018"
    "fcffffffffffffe8030000000000000f0000000000800040c429c419e2ccc80390300000002a00000028b52ffd20300d"
    "0100a00000f83f008000f87f00f0ff010000000000000005002b24c00dd030c061012ca14a0000003200000028b52ffd"
    "204a4d0100b80006008001004000ff7f0080ffffff2a000000000000800700398520450018080603a681e10ae0063001"
    "000000010000002db2570e0b"
)


def test_released_version_2_bytes_still_decode() -> None:
    assert_bit_exact(small_segment(), decode_segment(V2_SMALL_SEGMENT))
    assert encode_segment(small_segment()) == V2_SMALL_SEGMENT  # nothing changed for segments without text


def test_version_2_segment_naming_the_string_codec_is_refused() -> None:
    data = encode_segment(text_segment())
    expect_corrupt(reseal(data[:4] + struct.pack("<H", 2) + data[6:-4]), "needs format version 3")


def test_empty_segment_round_trips() -> None:
    seg = Segment(
        new_segment_id(),
        "imu",
        np.zeros(0, dtype=np.int64),
        {1: np.zeros(0), 2: np.zeros(0, dtype=np.int64), 3: np.zeros(0, dtype=bool), 4: text([])},
        {1: DataType.FLOAT64, 2: DataType.INT64, 3: DataType.BOOL, 4: DataType.STRING},
    )
    decoded = roundtrip(seg)
    assert decoded.sample_count == 0
    no_columns = Segment(new_segment_id(), "", np.array([5, 6], dtype=np.int64), {}, {})
    assert roundtrip(no_columns).sample_count == 0


def test_timestamps_extreme_and_unordered() -> None:
    t = np.array([I64_MAX, I64_MIN, 0, -1, I64_MAX, I64_MIN + 1, 123_456_789_012], dtype=np.int64)
    seg = Segment(new_segment_id(), "odd", t, {}, {})
    roundtrip(seg)


def test_decoded_arrays_are_native_and_writable() -> None:
    decoded = roundtrip(small_segment())
    for arr in [decoded.t_ns, *decoded.columns.values()]:
        assert arr.flags.writeable
        arr[:1] = arr[:1]  # must not raise


def test_sample_count_is_rows_times_columns() -> None:
    assert small_segment().sample_count == 6 * 3


def test_float_codec_picks_scaled_for_decimals_and_falls_back_for_true_doubles() -> None:
    # Decimals (a ramp of tenths, rounded noise) become integers; true doubles (a slowly changing value
    # computed in binary, white noise) fall back to XOR or plain bytes. All must round trip.
    rng = np.random.default_rng(0)
    ramp = np.arange(2000) * 0.1
    noise3 = rng.normal(size=2000).round(3)
    noise = rng.normal(size=2000)
    codecs = {}
    for name, values in (("ramp", ramp), ("noise3", noise3), ("noise", noise)):
        seg = Segment(
            new_segment_id(), "g", np.arange(2000, dtype=np.int64), {1: values}, {1: DataType.FLOAT64}
        )
        codecs[name] = column_codec(encode_segment(seg)) & ~ZSTD_FLAG
        roundtrip(seg)
    assert codecs["ramp"] == CODEC_F64_SCALED
    assert codecs["noise3"] == CODEC_F64_SCALED
    assert codecs["noise"] in {CODEC_F64_RAW, CODEC_F64_XOR, CODEC_F64_BITS_INTSTREAM}


def test_decimal_floats_cost_a_fraction_of_their_doubles() -> None:
    # A 2-decimal sensor (a DBC 0.01 scale): ~10 bits of range, small steps.
    rng = np.random.default_rng(1)
    values = np.round(20 + np.cumsum(rng.integers(-3, 4, 10_000)) * 0.01, 2)
    seg = Segment(
        new_segment_id(), "g", np.arange(10_000, dtype=np.int64), {1: values}, {1: DataType.FLOAT64}
    )
    assert len(encode_segment(seg)) < 10_000 * 0.5  # < 4 bits per value (raw: 64)
    roundtrip(seg)


def column_codec(data: bytes) -> int:
    group_len = struct.unpack_from("<H", data, 48)[0]
    first_column = 48 + 2 + group_len + 1 + 2
    return int(data[first_column + 5])


def test_steady_rate_timestamps_are_nearly_free() -> None:
    t = 1_700_000_000_000_000_000 + np.arange(100_000, dtype=np.int64) * 10_000_000
    seg = Segment(new_segment_id(), "imu", t, {}, {})
    assert len(encode_segment(seg)) < 200
    roundtrip(seg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments())
def test_property_round_trip_is_bit_exact(seg: Segment) -> None:
    roundtrip(seg)


# ---------------------------------------------------------------------------------------- real data


def _real_groups(recordings: Path) -> list[tuple[str, npt.NDArray[np.int64], list[npt.NDArray[Any]]]]:
    log = comma2k19_segment(recordings) / "processed_log"
    groups = []
    for name in [
        "IMU/accelerometer",
        "IMU/gyro",
        "IMU/magnetometer",
        "CAN/speed",
        "CAN/wheel_speed",
        "CAN/steering_angle",
        "CAN/radar",
        "GNSS/live_gnss_ublox",
        "GNSS/raw_gnss_ublox",
    ]:
        t = np.load(log / name / "t")
        value = np.load(log / name / "value").reshape(len(t), -1)
        t_ns = np.round(t * 1e9).astype(np.int64)
        groups.append((name, t_ns, [np.ascontiguousarray(value[:, j]) for j in range(value.shape[1])]))
    return groups


def test_real_comma2k19_arrays_round_trip_exactly(recordings: Path) -> None:
    total_bytes = 0
    total_samples = 0
    for name, t_ns, cols in _real_groups(recordings):
        seg = Segment(
            new_segment_id(),
            name,
            t_ns,
            {i + 1: c for i, c in enumerate(cols)},
            {i + 1: DataType.FLOAT64 for i in range(len(cols))},
        )
        encoded = encode_segment(seg)
        roundtrip(seg)
        total_bytes += len(encoded)
        total_samples += seg.sample_count
        print(f"{name}: {seg.sample_count} samples, {len(encoded) / seg.sample_count:.2f} bytes/sample")
    print(f"total: {total_bytes / total_samples:.2f} bytes/sample")
    # Raw would be 8 bytes per value plus 8 per timestamp; the codec must do clearly better than that.
    assert total_bytes / total_samples < 5.0


def test_real_raw_can_ints_and_bools_round_trip(recordings: Path) -> None:
    can = comma2k19_segment(recordings) / "processed_log" / "CAN" / "raw_can"
    t_ns = np.round(np.load(can / "t") * 1e9).astype(np.int64)
    address = np.load(can / "address").astype(np.int64)
    src = np.load(can / "src").astype(np.int64)
    payload = np.frombuffer(np.load(can / "data").astype("S8").tobytes(), dtype=">i8")
    catalog = Catalog()
    ids = [
        catalog.add(p, dt).id
        for p, dt in [
            ("Can.Address", DataType.INT64),
            ("Can.Bus", DataType.INT64),
            ("Can.Payload", DataType.INT64),
            ("Can.FromDevice", DataType.BOOL),
        ]
    ]
    batch = GroupBatch(
        "can0/raw", t_ns, dict(zip(ids, [address, src, payload.astype(np.int64), src >= 128], strict=True))
    )
    seg = segment_from_batch(batch, catalog)
    encoded = encode_segment(seg)
    decoded = roundtrip(seg)
    assert decoded.columns[ids[3]].dtype == np.bool_
    print(f"raw_can: {len(encoded) / seg.sample_count:.2f} bytes/sample")
    assert len(encoded) < seg.sample_count * 8


# ------------------------------------------------------------------------------------ construction


def test_segment_from_batch_types_columns_from_catalog() -> None:
    catalog = Catalog()
    speed = catalog.add("Vehicle.Speed", DataType.FLOAT64).id
    gear = catalog.add("Vehicle.Gear", DataType.INT64).id
    brake = catalog.add("Vehicle.Brake", DataType.BOOL).id
    batch = GroupBatch(
        "can0/x",
        np.array([1, 2, 3], dtype=np.int64),
        {
            speed: np.array([1, 2, 3], dtype=np.int32),  # ints widen to float64
            gear: np.array([True, False, True]),  # bools widen to int64
            brake: np.array([True, False, False]),
        },
    )
    seg = segment_from_batch(batch, catalog, segment_id=b"x" * 16)
    assert seg.segment_id == b"x" * 16
    assert seg.columns[speed].dtype == np.float64 and seg.columns[gear].dtype == np.int64
    assert seg.data_types == {speed: DataType.FLOAT64, gear: DataType.INT64, brake: DataType.BOOL}
    roundtrip(seg)
    auto = segment_from_batch(batch, catalog)
    assert len(auto.segment_id) == 16


def test_segment_from_batch_takes_text_for_string_signals_only() -> None:
    catalog = Catalog()
    mode = catalog.add("Vehicle.Mode", DataType.STRING).id
    gear = catalog.add("Vehicle.Gear", DataType.INT64).id
    batch = GroupBatch(
        "g", np.array([1, 2], dtype=np.int64), {mode: np.array(["P", "D"]), gear: np.array([0, 3])}
    )
    seg = segment_from_batch(batch, catalog)
    assert seg.columns[mode].dtype == object and seg.data_types[mode] is DataType.STRING
    assert roundtrip(seg).columns[mode].tolist() == ["P", "D"]
    with pytest.raises(UserError, match="STRING in the catalog but its values are int64"):
        segment_from_batch(GroupBatch("g", np.array([1], dtype=np.int64), {mode: np.array([3])}), catalog)
    with pytest.raises(UserError, match="INT64 in the catalog but its values are <U1"):
        segment_from_batch(GroupBatch("g", np.array([1], dtype=np.int64), {gear: np.array(["3"])}), catalog)


def test_segment_from_batch_refuses_lossy_kinds() -> None:
    catalog = Catalog()
    gear = catalog.add("Vehicle.Gear", DataType.INT64).id
    batch = GroupBatch("g", np.array([1], dtype=np.int64), {gear: np.array([1.5])})
    with pytest.raises(UserError, match="INT64"):
        segment_from_batch(batch, catalog)
    with pytest.raises(UserError, match="unknown signal id"):
        segment_from_batch(GroupBatch("g", np.array([1], dtype=np.int64), {99: np.array([1.0])}), catalog)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: setattr(s, "segment_id", b"short"), "16 bytes"),
        (lambda s: s.columns.__setitem__(3, np.zeros(2)), "shape"),
        (lambda s: s.data_types.pop(9), "different signal ids"),
        (lambda s: setattr(s, "t_ns", np.zeros(6)), "integer"),
        (lambda s: setattr(s, "group", "x" * 2000), "group name"),
        (lambda s: s.columns.__setitem__(7, np.full(6, 0.5)), "INT64"),
        (lambda s: s.columns.__setitem__(7, text(["1"] * 6)), "INT64 but holds object"),
        (lambda s: s.data_types.__setitem__(3, DataType.STRING), "STRING but holds float64"),
        (
            lambda s: (
                s.columns.__setitem__(3, text(["a", 1, "b", "c", "d", "e"])),  # type: ignore[list-item]
                s.data_types.__setitem__(3, DataType.STRING),
            ),
            "row 1 holds int",
        ),
        (
            lambda s: (
                s.columns.__setitem__(3, text(["a\ud800"] * 6)),
                s.data_types.__setitem__(3, DataType.STRING),
            ),
            "UTF-8",
        ),
    ],
)
def test_encode_refuses_invalid_segments(mutate: Any, message: str) -> None:
    seg = small_segment()
    mutate(seg)
    with pytest.raises(UserError, match=message):
        encode_segment(seg)


def test_new_segment_ids_are_unique_and_time_ordered() -> None:
    ids = [new_segment_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 16 for i in ids)
    time.sleep(0.002)
    later = new_segment_id()
    assert all(later > i for i in ids)
    now_ms = time.time_ns() // 1_000_000
    assert abs(int.from_bytes(later[:6], "big") - now_ms) < 5_000


# ----------------------------------------------------------------------------------- hostile bytes


@pytest.mark.parametrize("make", [small_segment, text_segment])
def test_every_single_byte_flip_is_detected(make: Any) -> None:
    good = encode_segment(make())
    expect_every_byte_flip_corrupt(good)


@pytest.mark.parametrize("make", [small_segment, text_segment])
def test_every_truncation_is_detected(make: Any) -> None:
    good = encode_segment(make())
    expect_every_truncation_corrupt(good)
    expect_corrupt(good + b"\x00", "unexpected bytes")


def test_header_errors_name_the_problem() -> None:
    good = encode_segment(small_segment())
    expect_corrupt(b"PK\x03\x04" + good[4:], "magic")
    expect_corrupt(
        good[:4] + struct.pack("<H", FORMAT_VERSION + 1) + good[6:], f"version {FORMAT_VERSION + 1}"
    )
    expect_corrupt(good[:4] + struct.pack("<H", 1) + good[6:], "version 1")
    expect_corrupt(good[:20], "truncated at byte 20")
    expect_corrupt(good[:-4] + b"\x00\x00\x00\x00", "checksum mismatch")
    expect_corrupt(reseal(good[:6] + b"\x01\x00" + good[8:-4]), "flags")
    rows_claim = good[:24] + struct.pack("<Q", MAX_ROWS + 1) + good[32:-4]
    expect_corrupt(reseal(rows_claim), "impossible row count")
    cells_claim = good[:24] + struct.pack("<Q", MAX_CELLS // 4 + 1) + good[32:-4]  # 3 columns + timestamps
    expect_corrupt(reseal(cells_claim), "impossible size")
    # a plausible row count that the blocks do not back
    expect_corrupt(
        reseal(good[:24] + struct.pack("<Q", 1000) + good[32:-4]), "impossible for 1000 rows|expected 1000"
    )
    expect_corrupt(reseal(good[:32] + struct.pack("<q", -5) + good[40:-4]), "time range")
    expect_corrupt(b"", "truncated at byte 0")
    with pytest.raises(CorruptSegmentError):
        decode_segment("not bytes")  # type: ignore[arg-type]


def _rebuild(seg: Segment, block_edit: Any, *, descriptor: bool = True) -> bytes:
    """Re-encode ``seg`` with the first value block's (codec, raw, payload) replaced by ``block_edit``."""
    good = encode_segment(seg)
    group_len = struct.unpack_from("<H", good, 48)[0]
    pos = 48 + 2 + group_len + 1
    ncols = struct.unpack_from("<H", good, pos)[0]
    pos += 2 + ncols * 6
    codec, raw_len, stored = struct.unpack_from("<BII", good, pos)
    ts_end = pos + 9 + stored
    codec, raw_len, stored = struct.unpack_from("<BII", good, ts_end)
    payload = good[ts_end + 9 : ts_end + 9 + stored]
    new_codec, new_raw, new_payload = block_edit(codec, raw_len, payload)
    body = (
        good[:ts_end]
        + struct.pack("<BII", new_codec, new_raw, len(new_payload))
        + new_payload
        + good[ts_end + 9 + stored : -4]
    )
    if descriptor:  # keep the column descriptor's codec in step with the forged block
        col0 = 48 + 2 + group_len + 1 + 2
        body = body[: col0 + 5] + bytes([new_codec]) + body[col0 + 6 :]
    return reseal(body)


def test_forged_blocks_are_refused_without_huge_allocations() -> None:
    ints = Segment(
        b"i" * 16,
        "g",
        np.arange(4, dtype=np.int64),
        {1: np.array([0, 1, 2, 3], dtype=np.int64)},
        {1: DataType.INT64},
    )
    zc = zstandard.ZstdCompressor()
    # zstd bomb: frame declares far more than the header allows
    expect_corrupt(
        _rebuild(ints, lambda c, r, p: (c | ZSTD_FLAG, r, zc.compress(b"\x00" * 10_000_000))), "declares"
    )
    # frame without content size whose output exceeds the header's size
    cobj = zstandard.ZstdCompressor(write_content_size=False)
    expect_corrupt(_rebuild(ints, lambda c, r, p: (c | ZSTD_FLAG, r, cobj.compress(b"\x00" * 4096))), "zstd")

    # well-framed integer streams with impossible contents
    def stream(
        order: int, count: int, heads: list[int], base: int, gcd: int, width: int, nexc: int, rest: bytes
    ) -> bytes:
        return (
            struct.pack("<BI", order, count)
            + b"".join(struct.pack("<q", h) for h in heads)
            + struct.pack("<qQBI", base, gcd, width, nexc)
            + rest
        )

    def forged(raw: bytes) -> bytes:
        return _rebuild(ints, lambda c, r, p: (CODEC_I64_INTSTREAM | ZSTD_FLAG, len(raw), zc.compress(raw)))

    expect_corrupt(forged(stream(0, 5, [], 0, 1, 0, 0, b"")), "holds 5 values, expected 4")
    expect_corrupt(forged(stream(3, 4, [0, 0, 0], 0, 1, 0, 0, b"")), "order 3")
    expect_corrupt(forged(stream(0, 4, [], 0, 1, 65, 0, b"\x00" * 40)), "bit width 65")
    expect_corrupt(forged(stream(0, 4, [], 0, 0, 0, 0, b"")), "divisor 0")
    expect_corrupt(forged(stream(0, 4, [], 0, 1, 0, 5, b"")), "exceptions")
    expect_corrupt(forged(stream(0, 4, [], 0, 1, 8, 0, b"\x00" * 3)), "truncated")
    expect_corrupt(forged(stream(0, 4, [], 0, 1, 0, 1, struct.pack("<IQ", 9, 1))), "exception positions")
    expect_corrupt(forged(stream(0, 4, [], 0, 1, 0, 0, b"xx")), "bytes after")
    plain = stream(0, 4, [], 0, 1, 0, 0, b"")
    expect_corrupt(
        _rebuild(ints, lambda c, r, p: (CODEC_I64_INTSTREAM, len(plain), plain + b"x")), "stored length"
    )
    expect_corrupt(_rebuild(ints, lambda c, r, p: (c | ZSTD_FLAG, r, b"not zstd at all")), "not a zstd frame")
    expect_corrupt(
        _rebuild(ints, lambda c, r, p: (CODEC_F64_RAW | ZSTD_FLAG, r, p), descriptor=False),
        "differs from header",
    )
    expect_corrupt(_rebuild(ints, lambda c, r, p: (c | ZSTD_FLAG, r, p + b"junk")), "zstd")
    bools = Segment(
        b"b" * 16, "g", np.arange(3, dtype=np.int64), {1: np.array([True, False, True])}, {1: DataType.BOOL}
    )
    expect_corrupt(_rebuild(bools, lambda c, r, p: (c | ZSTD_FLAG, 1, zc.compress(b"\xff"))), "padding")


def test_forged_string_blocks_are_refused_with_a_reason() -> None:
    from fleetloop_shared.segment.codecs import intstream

    seg = Segment(
        b"s" * 16, "g", np.arange(4, dtype=np.int64), {1: text(["a", "bb", "a", ""])}, {1: DataType.STRING}
    )
    zc = zstandard.ZstdCompressor()

    def ints(values: list[int]) -> bytes:
        return intstream.encode(np.array(values, dtype=np.int64))

    def block(layout: int, entries: int, lengths: list[int], body: bytes, rest: bytes) -> bytes:
        return (
            struct.pack("<BI", layout, entries) + ints(lengths) + struct.pack("<Q", len(body)) + body + rest
        )

    def forged(raw: bytes) -> bytes:
        return _rebuild(seg, lambda c, r, p: (CODEC_STR_DICT | ZSTD_FLAG, len(raw), zc.compress(raw)))

    good_rest = ints([0, 1, 0, 2])
    assert decode_segment(forged(block(0, 3, [1, 2, 0], b"abb", good_rest))).columns[1].tolist() == [
        "a",
        "bb",
        "a",
        "",
    ]
    expect_corrupt(forged(block(2, 3, [1, 2, 0], b"abb", good_rest)), "unknown string index layout 2")
    expect_corrupt(forged(block(0, 5, [1, 2, 0, 0, 0], b"abb", good_rest)), "5 dictionary entries impossible")
    expect_corrupt(forged(block(0, 0, [], b"", ints([0, 0, 0, 0]))), "0 dictionary entries impossible")
    expect_corrupt(forged(block(0, 3, [1, 2, 1], b"abb", good_rest)), "do not add up")
    expect_corrupt(forged(block(0, 3, [2, 2, -1], b"abb", good_rest)), "do not add up")
    expect_corrupt(forged(block(0, 3, [1, 2, 0], b"\xff\xfe\xfd", good_rest)), "not valid UTF-8")
    expect_corrupt(forged(block(0, 3, [1, 2, 0], b"abb", ints([0, 1, 0, 3]))), "index out of range")
    expect_corrupt(forged(block(0, 3, [1, 2, 0], b"abb", ints([0, 1, 0, -1]))), "index out of range")
    expect_corrupt(forged(block(0, 3, [1, 2, 0], b"abb", ints([0, 1, 0]))), "holds 3 values, expected 4")
    expect_corrupt(forged(block(0, 3, [1, 2, 0], b"abb", good_rest + b"x")), "bytes after the string")
    expect_corrupt(forged(block(0, 3, [1, 2, 0], b"abb", b"")[:-2]), "truncated|exceeds the block")
    runs = struct.pack("<I", 3) + ints([0, 1, 2]) + ints([1, 1, 2])
    assert decode_segment(forged(block(1, 3, [1, 2, 0], b"abb", runs))).columns[1].tolist() == [
        "a",
        "bb",
        "",
        "",
    ]
    expect_corrupt(
        forged(block(1, 3, [1, 2, 0], b"abb", struct.pack("<I", 3) + ints([0, 1, 2]) + ints([1, 1, 1]))),
        "cover 3 rows",
    )
    expect_corrupt(
        forged(block(1, 3, [1, 2, 0], b"abb", struct.pack("<I", 3) + ints([0, 1, 2]) + ints([0, 2, 2]))),
        "run lengths",
    )
    expect_corrupt(
        forged(block(1, 3, [1, 2, 0], b"abb", struct.pack("<I", 9) + ints([0] * 9) + ints([1] * 9))),
        "9 runs impossible",
    )
    expect_corrupt(forged(block(1, 3, [1, 2, 0], b"abb", struct.pack("<I", 2))), "truncated")
    # declared text beyond the limit is refused before anything is read or allocated
    huge = struct.pack("<BI", 0, 1) + ints([MAX_TEXT_BYTES + 1]) + struct.pack("<Q", MAX_TEXT_BYTES + 1)
    expect_corrupt(forged(huge), "exceeds the limit")
    # a block whose zstd frame claims more than a string block of 4 rows may hold
    expect_corrupt(
        _rebuild(seg, lambda c, r, p: (c | ZSTD_FLAG, MAX_TEXT_BYTES * 2, p)), "impossible for 4 rows"
    )


def test_text_of_a_segment_is_capped_across_columns() -> None:
    big = "y" * (MAX_TEXT_BYTES // 2 + 1)
    seg = Segment(
        new_segment_id(),
        "g",
        np.arange(1, dtype=np.int64),
        {1: text([big]), 2: text([big + "z"])},
        {1: DataType.STRING, 2: DataType.STRING},
    )
    with pytest.raises(UserError, match="exceed"):
        encode_segment(seg)


def test_forged_descriptors_are_refused() -> None:
    good = encode_segment(small_segment())
    group_len = struct.unpack_from("<H", good, 48)[0]
    col0 = 48 + 2 + group_len + 1 + 2
    expect_corrupt(reseal(good[: col0 + 4] + b"\x09" + good[col0 + 5 : -4]), "unknown data type 9")
    expect_corrupt(reseal(good[: col0 + 5] + b"\x30" + good[col0 + 6 : -4]), "not valid for FLOAT64")
    dup = good[: col0 + 6] + good[col0 : col0 + 4] + good[col0 + 10 : -4]
    expect_corrupt(reseal(dup), "appears twice")
    expect_corrupt(reseal(good[: col0 - 3] + b"\x63" + good[col0 - 2 : -4]), "timestamp codec")
    expect_corrupt(reseal(good[:48] + b"\x02\x00\xff\xfe" + good[50 + group_len : -4]), "UTF-8")
    expect_corrupt(reseal(good[:48] + b"\xff\xff" + good[50:-4]), "group name length")
    expect_corrupt(reseal(good[: col0 - 2] + b"\xff\xff" + good[col0:-4]), "column count")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_resealed_random_mutations_never_raise_anything_else(data: st.DataObject) -> None:
    """Forged bytes with a valid checksum: CorruptSegmentError or a self-consistent segment, never a crash."""
    source = data.draw(st.sampled_from([small_segment, text_segment]))
    mutate_resealed(data, encode_segment(source()))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_corrupt(blob: bytes) -> None:
    prefixed = MAGIC + struct.pack("<H", FORMAT_VERSION) + blob
    for candidate in (blob, prefixed, reseal(prefixed)):
        with pytest.raises(CorruptSegmentError):
            decode_segment(candidate)


def test_encoding_from_many_threads_at_once_is_safe() -> None:
    # The agent, the simulator and the cloud encode from several threads; a shared zstd compressor
    # would fail ("Src size is incorrect") or mix frames.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    segs = [
        Segment(
            new_segment_id(),
            f"g{i}",
            np.cumsum(rng.integers(1, 10**6, 20_000)),
            {1: rng.normal(size=20_000).round(4), 2: rng.integers(0, 1000, 20_000)},
            {1: DataType.FLOAT64, 2: DataType.INT64},
        )
        for i in range(16)
    ]
    with ThreadPoolExecutor(4) as pool:
        encoded = list(pool.map(encode_segment, segs * 4))
    for seg, data in zip(segs * 4, encoded, strict=True):
        assert decode_segment(data) == seg


# ------------------------------------------------------ real recordings in bundles and keyed columns


def test_real_comma2k19_can_bundle_round_trips_and_shrinks(recordings: Path) -> None:
    from real_corpus import real_corpus

    from fleetloop_agent.store_import import to_segments

    for name, result in real_corpus(recordings):
        if name != "comma2k19-can":
            continue
        singles = list(to_segments(result, Catalog()))
        bundles = list(bundle_segments(singles))
        encoded = [encode_segment(b) for b in bundles]
        assert [decode_segment(d) for d in encoded] == bundles
        assert sum(map(len, encoded)) < 0.9 * sum(len(encode_segment(s)) for s in singles)
        return
    pytest.skip("comma2k19 CAN log not in the recordings")


def test_real_gnss_measurements_are_keyed_by_satellite(recordings: Path) -> None:
    """On the real comma2k19 u-blox raw measurements (one row per satellite), keying by the satellite
    id shrinks the message by more than a fifth; every value round-trips."""
    from real_corpus import real_corpus

    from fleetloop_agent.store_import import to_segments

    for name, result in real_corpus(recordings):
        if name != "comma2k19-sensors":
            continue
        for seg in to_segments(result, Catalog()):
            if seg.group != "GNSS/raw_gnss_ublox":
                continue
            data = encode_segment(seg)
            assert _version(data) == 5
            assert decode_segment(data) == seg
            keyed = [c for c in _column_codecs(data).values() if c in (CODEC_F64_KEYED, CODEC_I64_KEYED)]
            assert len(keyed) >= 4
            from fleetloop_shared.segment import plan_columns

            saved = plan_columns.plan_key
            try:
                plan_columns.plan_key = lambda t_ns, columns: None  # type: ignore[assignment]
                plain = len(encode_segment(seg))
            finally:
                plan_columns.plan_key = saved
            assert len(data) < 0.8 * plain
            return
    pytest.skip("comma2k19 sensors not in the recordings")
