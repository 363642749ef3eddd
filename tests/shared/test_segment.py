"""Segment codec: bit-exact round trips (synthetic, property-based, real recordings) and hostile bytes."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import CorruptSegmentError, UserError
from fleetloop_shared.samples import GroupBatch
from fleetloop_shared.segment import (
    CODEC_F64_BITS_INTSTREAM,
    CODEC_F64_DICT,
    CODEC_F64_DIFF,
    CODEC_F64_KEYED,
    CODEC_F64_RAW,
    CODEC_F64_RECENT,
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


def reseal(body: bytes) -> bytes:
    """Recompute the trailing checksum, as a forger (not a random bit flip) would."""
    return body + struct.pack("<I", zlib.crc32(body))


def expect_corrupt(data: bytes, match: str | None = None) -> CorruptSegmentError:
    with pytest.raises(CorruptSegmentError, match=match) as info:
        decode_segment(data)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("make", [small_segment, text_segment])
def test_every_single_byte_flip_is_detected(make: Any) -> None:
    good = encode_segment(make())
    for i in range(len(good)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[i] ^= mask
            expect_corrupt(bytes(bad))


@pytest.mark.parametrize("make", [small_segment, text_segment])
def test_every_truncation_is_detected(make: Any) -> None:
    good = encode_segment(make())
    for n in range(len(good)):
        err = expect_corrupt(good[:n])
        if n >= 6:
            assert "truncated" in str(err) or "checksum" in str(err), (n, err)
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


# ------------------------------------------------------------------ multi-group segments (format 4)


def multi_segment() -> Segment:
    """Four groups of one bus: two share most arrival times (one USB batch), one shares none, one has
    exactly the first one's times; plus text, NaN payloads, int64 extremes and negative times."""
    sid = bytes(range(32, 48))
    batch = np.array([-30_000_000, -20_000_000, -10_000_000, 0, 10_000_000, 20_000_000], dtype=np.int64)
    a = Segment(
        sid,
        "can0/A",
        batch.copy(),
        {
            1: floats_from_bits([0x7FF4DEADBEEF0001, 0x8000000000000000, 0x7FF0000000000000] * 2),
            2: np.array([I64_MIN, I64_MAX, 0, -1, 1, I64_MIN], dtype=np.int64),
        },
        {1: DataType.FLOAT64, 2: DataType.INT64},
    )
    b = Segment(
        sid,
        "can0/B",
        batch[[0, 1, 1, 3, 5]],
        {3: np.array([True, False, True, True, False])},
        {3: DataType.BOOL},
    )
    c = Segment(
        sid,
        "can0/C",
        np.array([I64_MIN, 7, I64_MAX], dtype=np.int64),
        {4: text(["", "ÉTAT ✓", ""]), 5: np.array([0.1, -0.0, np.nan])},
        {4: DataType.STRING, 5: DataType.FLOAT64},
    )
    d = Segment(sid, "can0/D", batch.copy(), {6: np.arange(6, dtype=np.int64) % 2 == 0}, {6: DataType.BOOL})
    return Segment(sid, a.group, a.t_ns, a.columns, a.data_types, (b, c, d))


def _version(data: bytes) -> int:
    return int(struct.unpack_from("<H", data, 4)[0])


def test_multi_group_segment_round_trips_as_version_4() -> None:
    seg = multi_segment()
    data = encode_segment(seg)
    assert _version(data) == 4
    decoded = decode_segment(data)
    assert decoded == seg
    for want, got in zip(seg.groups(), decoded.groups(), strict=True):
        assert_bit_exact(want, got)
    assert decoded.sample_count == 6 * 2 + 5 + 3 * 2 + 6
    same_as = struct.pack("<BIIH", 4, 2, 2, 0)  # group D's time block: "the times of group 0"
    assert data.count(same_as) == 1
    assert decoded.more_groups[2].t_ns is not decoded.t_ns  # a copy, not a shared array
    assert decoded.time_range() == (I64_MIN, I64_MAX)


def test_single_group_segments_keep_their_version_2_and_3_bytes() -> None:
    # Format 4 is only for several groups: one group is written exactly as before.
    for make in (small_segment, text_segment):
        seg = make()
        assert encode_segment(seg) == encode_segment(Segment(*vars(seg).values()))
        assert _version(encode_segment(seg)) in (2, 3)
        assert list(bundle_segments([seg])) == [seg]


def batched_bus(seed: int, messages: int = 12, seconds: float = 20.0, batch_ms: int = 1) -> list[Segment]:
    """Generated CAN arrivals (not the corpus): periodic messages whose frames reach the host in USB
    batches every ``batch_ms`` (jittered), stamped with the batch's ns-resolved arrival time, so
    different messages share timestamps as on a real bus; values are rolling counters and scaled sensor
    readings."""
    rng = np.random.default_rng(seed)
    step = batch_ms * 1_000_000
    batch_times = np.cumsum(rng.integers(step * 9 // 10, step * 11 // 10, int(seconds * 1000) // batch_ms))
    out = []
    for m in range(messages):
        period = int(rng.choice([10, 20, 50, 100])) * 1_000_000
        sent = np.arange(int(rng.integers(0, period)), int(batch_times[-1]) - period, period, dtype=np.int64)
        t = batch_times[np.searchsorted(batch_times, sent + rng.integers(0, 300_000, sent.size))]
        rows = t.shape[0]
        out.append(
            Segment(
                new_segment_id(),
                f"bus/M{m}",
                t,
                {
                    2 * m: (np.arange(rows) % 16).astype(np.int64),
                    2 * m + 1: np.round(np.cumsum(rng.normal(0, 0.5, rows)), 2),
                },
                {2 * m: DataType.INT64, 2 * m + 1: DataType.FLOAT64},
            )
        )
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_shared_clock_pays_on_generated_batched_arrivals(seed: int) -> None:
    """The gain holds on data the codec was not tuned on: a generated bus, not the recordings."""
    for batch_ms, most in ((1, 1.0), (5, 0.85)):
        singles = batched_bus(seed, batch_ms=batch_ms)
        (bundle,) = bundle_segments(singles)
        data = encode_segment(bundle)
        assert decode_segment(data) == bundle
        separate = sum(len(encode_segment(s)) for s in singles)
        # never worse; clearly better when several frames arrive per batch (as from a panda)
        assert len(data) <= most * separate, (batch_ms, len(data), separate)


def test_groups_without_shared_times_use_no_clock_and_cost_no_more() -> None:
    rng = np.random.default_rng(9)
    singles = [
        Segment(
            new_segment_id(),
            f"g{i}",
            np.cumsum(rng.integers(1, 10**7, 3000)).astype(np.int64) + i,
            {i: rng.integers(0, 5, 3000).astype(np.int64)},
            {i: DataType.INT64},
        )
        for i in range(5)
    ]
    (bundle,) = bundle_segments(singles)
    data = encode_segment(bundle)
    assert decode_segment(data) == bundle
    assert struct.unpack_from("<I", data, 50)[0] == 0  # clock of 0 rows
    assert len(data) <= sum(len(encode_segment(s)) for s in singles)


def test_bundle_segments_limits() -> None:
    segs = batched_bus(4, messages=6, seconds=2.0)
    rows = [int(s.t_ns.shape[0]) for s in segs]
    bundles = list(bundle_segments(segs, max_rows=rows[0] + rows[1]))
    assert all(
        sum(int(g.t_ns.shape[0]) for g in b.groups()) <= rows[0] + rows[1] or not b.more_groups
        for b in bundles
    )
    assert [g.group for b in bundles for g in b.groups()] == [s.group for s in segs]
    assert all(g.segment_id == b.segment_id for b in bundles for g in b.groups())
    assert list(bundle_segments(segs, max_rows=0)) == segs
    # the next chunk of a group (same signal ids) and a group with text start new segments
    again = Segment(
        new_segment_id(), segs[0].group, segs[0].t_ns + 10**10, segs[0].columns, segs[0].data_types
    )
    texty = text_segment()
    out = list(bundle_segments([segs[0], segs[1], again, texty, segs[2]]))
    assert [len(b.groups()) for b in out] == [2, 1, 1, 1]
    assert out[2] is texty


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segments(), min_size=2, max_size=4), st.data())
def test_property_multi_group_round_trip_is_bit_exact(parts: list[Segment], data: st.DataObject) -> None:
    # Give the groups disjoint signal ids and let some share timestamps (so the clock is exercised).
    sid = parts[0].segment_id
    groups = []
    pool = np.concatenate([p.t_ns for p in parts])
    for k, p in enumerate(parts):
        t = p.t_ns
        if pool.size and t.size and data.draw(st.booleans()):
            picks = data.draw(st.lists(st.integers(0, pool.size - 1), min_size=t.size, max_size=t.size))
            t = pool[np.array(picks, dtype=np.int64)]
            if data.draw(st.booleans()):
                t = np.sort(t)
        cols = {k * 2**28 + (s % 2**28): v for s, v in p.columns.items()}
        types = {k * 2**28 + (s % 2**28): v for s, v in p.data_types.items()}
        if len(cols) != len(p.columns):
            return  # ids collided after the remap: nothing to test
        groups.append(Segment(sid, p.group, t, cols, types))
    seg = Segment(
        sid, groups[0].group, groups[0].t_ns, groups[0].columns, groups[0].data_types, tuple(groups[1:])
    )
    decoded = decode_segment(encode_segment(seg))
    assert decoded == seg
    for want, got in zip(seg.groups(), decoded.groups(), strict=True):
        assert_bit_exact(want, got)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: setattr(s.more_groups[0], "segment_id", bytes(16)), "another segment_id"),
        (lambda s: setattr(s.more_groups[0], "more_groups", (s.more_groups[1],)), "more_groups of its own"),
        (lambda s: s.more_groups[1].columns.__setitem__(1, s.more_groups[1].columns.pop(5)), "two groups"),
    ],
)
def test_encode_refuses_invalid_multi_group_segments(mutate: Any, message: str) -> None:
    seg = multi_segment()
    if "two groups" in message:
        seg.more_groups[1].data_types[1] = seg.more_groups[1].data_types.pop(5)
    mutate(seg)
    with pytest.raises(UserError, match=message):
        encode_segment(seg)


def test_every_single_byte_flip_and_truncation_of_a_multi_group_segment_is_detected() -> None:
    good = encode_segment(multi_segment())
    for i in range(len(good)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[i] ^= mask
            expect_corrupt(bytes(bad))
    for n in range(len(good)):
        err = expect_corrupt(good[:n])
        if n >= 6:
            assert "truncated" in str(err) or "checksum" in str(err), (n, err)
    expect_corrupt(good + b"\x00", "unexpected bytes")


def test_forged_multi_group_headers_are_refused_with_a_reason() -> None:
    good = encode_segment(multi_segment())
    rows = struct.unpack_from("<Q", good, 24)[0]
    expect_corrupt(reseal(good[:24] + struct.pack("<Q", rows + 1) + good[32:-4]), "rows")
    expect_corrupt(reseal(good[:48] + struct.pack("<H", 0) + good[50:-4]), "group count")
    expect_corrupt(reseal(good[:50] + struct.pack("<I", rows + 1) + good[54:-4]), "clock of")
    expect_corrupt(reseal(good[:48] + struct.pack("<H", 9) + good[50:-4]))


def test_a_time_column_naming_a_later_group_is_refused() -> None:
    good = encode_segment(multi_segment())
    at = good.index(struct.pack("<BIIH", 4, 2, 2, 0))
    for j in (3, 1, 9):  # itself, an earlier group of other rows, no such group
        forged = good[: at + 9] + struct.pack("<H", j) + good[at + 11 : -4]
        expect_corrupt(reseal(forged), "not an earlier group")


def test_clock_indices_outside_the_clock_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetloop_shared.segment import plan_times

    real = plan_times.choose_clock

    def short_clock(times: list[npt.NDArray[np.int64]]) -> Any:
        clock, index = real(times)
        assert index, "the fixture's groups share times"
        return clock[:1], index  # indices now point past the clock

    monkeypatch.setattr(plan_times, "choose_clock", short_clock)
    data = encode_segment(multi_segment())
    expect_corrupt(data, "clock index outside|time range")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_resealed_random_mutations_of_multi_group_segments_never_raise_anything_else(
    data: st.DataObject,
) -> None:
    mutate_resealed(data, encode_segment(multi_segment()))


def test_real_comma2k19_can_bundle_round_trips_and_shrinks(recordings: Path) -> None:
    from fleetloop_agent.store_import import real_corpus, to_segments

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


def _column_codecs(data: bytes) -> dict[int, int]:
    """signal id -> codec id of every column of a format 4/5 segment (walks the framing)."""
    from fleetloop_shared.segment import framing

    header = framing.parse(data)
    return {
        sid: block.codec
        for g in header.groups
        for (sid, _), block in zip(g.columns, g.blocks[1:], strict=True)
    }


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


def test_real_gnss_measurements_are_keyed_by_satellite(recordings: Path) -> None:
    """On the real comma2k19 u-blox raw measurements (one row per satellite), keying by the satellite
    id shrinks the message by more than a fifth; every value round-trips."""
    from fleetloop_agent.store_import import real_corpus, to_segments

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
