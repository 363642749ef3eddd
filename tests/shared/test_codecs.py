"""Column codecs: exact round trips (hypothesis), numba kernels == numpy fallback byte for byte, fuzzing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from real_corpus import real_corpus

from fleetloop_agent.store_import import to_segments
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.segment import decode_segment, encode_segment
from fleetloop_shared.segment.codecs import bitpack, decimal_float, grid_float, intstream, strings
from fleetloop_shared.segment.codecs.compiled import numpy_only

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)


# ------------------------------------------------------------------------------------------ bitpack


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 64), st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_bitpack_kernels_and_numpy_agree_and_round_trip(width: int, raw: list[int]) -> None:
    mask = (1 << width) - 1
    values = np.array([v & mask for v in raw], dtype=np.uint64)
    fast = bitpack.pack(values, width)
    slow = bitpack.pack(values, width, use_numba=False)
    assert fast == slow
    assert len(fast) == bitpack.packed_size(len(raw), width)
    assert bitpack.unpack(fast, len(raw), width).tolist() == values.tolist()
    assert bitpack.unpack(fast, len(raw), width, use_numba=False).tolist() == values.tolist()


def test_bitpack_numba_is_available_here() -> None:
    # numba is a declared dependency of this project; the fast path must be the one that runs here.
    assert bitpack.have_numba()


def test_bitpack_refuses_wrong_lengths() -> None:
    with pytest.raises(ValueError, match="packed data"):
        bitpack.unpack(b"\x00" * 3, 4, 8)


# ------------------------------------------------------------------------------------ integer streams

int64s = st.integers(I64_MIN, I64_MAX)


@st.composite
def int_columns(draw: st.DrawFn) -> npt.NDArray[np.int64]:
    kind = draw(st.sampled_from(["any", "steady", "rare", "small", "glitches"]))
    if kind == "glitches":
        # small residuals with a few values far below them, anywhere (the frame is moved above them)
        n = draw(st.integers(258, 700))
        x = np.cumsum(np.array(draw(st.lists(st.integers(-40, 40), min_size=n, max_size=n)), dtype=np.int64))
        for _ in range(draw(st.integers(1, 4))):
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([I64_MIN, -(2**40), -(2**20), I64_MAX]))
        return x
    n = draw(st.integers(0, 300))
    if kind == "any":
        return np.array(draw(st.lists(int64s, min_size=n, max_size=n)), dtype=np.int64)
    start = draw(int64s)
    if kind == "steady":
        step = draw(st.integers(-(10**12), 10**12))
        jitter = np.array(draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n)), dtype=np.int64)
        return start + np.arange(n, dtype=np.int64) * step + jitter
    if kind == "rare":
        vals = draw(st.lists(st.sampled_from([start, I64_MIN, I64_MAX, 0, 7]), min_size=n, max_size=n))
        return np.array(vals, dtype=np.int64)
    return np.array(draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), dtype=np.int64) * 1000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(int_columns())
def test_intstream_round_trips_and_kernels_match_numpy(x: npt.NDArray[np.int64]) -> None:
    data = intstream.encode(x)
    assert len(data) <= intstream.max_encoded_size(len(x))
    out, end = intstream.decode(data, 0, len(x))
    assert end == len(data)
    assert out.dtype == np.int64 and out.tobytes() == x.tobytes()
    with numpy_only():
        assert intstream.encode(x) == data
        again, _ = intstream.decode(data, 0, len(x))
    assert again.tobytes() == x.tobytes()


def test_intstream_stores_low_glitches_as_exceptions_not_as_width() -> None:
    """A few values far below the rest (a NaN's residual, the jump back between two series) must not
    make every value as wide as the glitch: the frame starts above them and they are exceptions."""
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.integers(-100, 101, 5000)).astype(np.int64)
    clean = len(intstream.encode(x))
    glitched = x.copy()
    glitched[[17, 2000, 4999]] = [I64_MIN, -(2**45), -(2**45) + 3]
    data = intstream.encode(glitched)
    assert len(data) < clean + 3 * 2 * 12 + 64  # each glitch costs two exceptions (order 1), not bits
    out, _ = intstream.decode(data, 0, glitched.size)
    assert out.tobytes() == glitched.tobytes()
    with numpy_only():
        assert intstream.encode(glitched) == data


def test_intstream_finds_the_clock_tick_and_steady_rates() -> None:
    t = 1_700_000_000_000_000_000 + np.arange(10_000, dtype=np.int64) * 10_000_000
    assert len(intstream.encode(t)) < 64  # a steady rate: second differences are all zero
    jittery = t + np.random.default_rng(0).integers(-5, 6, t.size) * 1000  # µs logger jitter
    assert len(intstream.encode(jittery)) < 10_000 * 5 // 8 + 200  # ~4-5 bits a row, the ns digits free


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 40))
def test_intstream_decoder_refuses_garbage_with_stream_error_only(blob: bytes, count: int) -> None:
    try:
        out, end = intstream.decode(blob, 0, count)
    except intstream.StreamError:
        return
    assert out.shape == (count,) and end <= len(blob)


# -------------------------------------------------------------------------------- scaled floats


def floats_from_bits(bits: list[int]) -> npt.NDArray[np.float64]:
    return np.array(bits, dtype=np.uint64).view(np.float64)


@st.composite
def float_columns(draw: st.DrawFn) -> npt.NDArray[np.float64]:
    n = draw(st.integers(0, 200))
    kind = draw(st.sampled_from(["bits", "floats", "decimal", "scaled"]))
    if kind == "bits":
        return floats_from_bits(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)))
    if kind == "floats":
        return np.array(draw(st.lists(st.floats(width=64), min_size=n, max_size=n)), dtype=np.float64)
    digits = draw(st.integers(0, 8))
    raw = np.array(draw(st.lists(st.integers(-(10**9), 10**9), min_size=n, max_size=n)), dtype=np.int64)
    if kind == "decimal":
        return np.round(raw / 10.0**digits, digits)
    scale, offset = draw(st.sampled_from([(0.01, -67.67), (0.1, -40.0), (0.03125, 0.0), (1 / 3.6, 0.0)]))
    return raw * scale + offset


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_columns())
def test_scaled_float_round_trip_is_bit_exact(v: npt.NDArray[np.float64]) -> None:
    data = decimal_float.encode(v)
    assert len(data) <= decimal_float.max_encoded_size(len(v))
    out = decimal_float.decode(data, len(v))
    assert out.tobytes() == v.tobytes()
    with numpy_only():
        assert decimal_float.encode(v) == data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_columns())
def test_scaled_float_choice_and_split_kernels_match_numpy(v: npt.NDArray[np.float64]) -> None:
    assert decimal_float._load_kernels() is not None  # numba is a dependency: the fast path runs here
    fast = decimal_float.choose(v)
    n, r = decimal_float._split(v, *fast)
    with numpy_only():
        assert decimal_float.choose(v) == fast
        n2, r2 = decimal_float._split(v, *fast)
    assert n.tobytes() == n2.tobytes() and r.tobytes() == r2.tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_columns())
def test_grid_step_search_kernel_matches_numpy(v: npt.NDArray[np.float64]) -> None:
    """The compiled grid search makes the numpy path's decisions (the same step, the same estimate)."""
    fast = grid_float.find_step(v, 64.0)
    with numpy_only():
        assert grid_float.find_step(v, 64.0) == fast
    if fast is not None:
        n, r = decimal_float.split_grid(v, fast[0])
        with numpy_only():
            n2, r2 = decimal_float.split_grid(v, fast[0])
        assert n.tobytes() == n2.tobytes() and r.tobytes() == r2.tobytes()


def test_scaled_float_special_values() -> None:
    special = floats_from_bits(
        [0x7FF8000000000001, 0xFFF0000000000001, 0x8000000000000000, 0x0000000000000001]
    )
    v = np.concatenate([special, [np.inf, -np.inf, 0.0, -0.0, 1e308, -5e-324, 28.65, 28.65]])
    assert decimal_float.decode(decimal_float.encode(v), len(v)).tobytes() == v.tobytes()


def test_dbc_arithmetic_is_cheap() -> None:
    # raw * 0.01 - 67.67 as cantools computes it: within an ulp or two of a 2-decimal number
    raw = 9000 + np.cumsum(np.random.default_rng(3).integers(-4, 5, 5000))
    v = raw * 0.01 - 67.67
    assert len(decimal_float.encode(v)) < 5000 * 8 * 0.15  # < ~10 bits a value (raw: 64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 20))
def test_scaled_float_decoder_refuses_garbage_with_stream_error_only(blob: bytes, count: int) -> None:
    try:
        out = decimal_float.decode(blob, count)
    except intstream.StreamError:
        return
    assert out.shape == (count,)


# ------------------------------------------------------------------------------ string dictionary


def text_array(values: list[str]) -> npt.NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


@st.composite
def text_columns(draw: st.DrawFn) -> npt.NDArray[np.object_]:
    n = draw(st.integers(0, 200))
    kind = draw(st.sampled_from(["any", "few", "runs", "distinct"]))
    if kind == "any":
        return text_array(draw(st.lists(st.text(), min_size=n, max_size=n)))
    if kind == "distinct":
        return text_array([f"{draw(st.text(max_size=3))}#{i}" for i in range(n)])
    pool = draw(st.lists(st.text(max_size=30), min_size=1, max_size=5))
    if kind == "few":
        return text_array(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)))
    runs = draw(st.lists(st.tuples(st.sampled_from(pool), st.integers(1, 40)), max_size=20))
    return text_array([v for v, k in runs for _ in range(k)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_columns())
def test_string_dictionary_round_trip_is_exact(v: npt.NDArray[np.object_]) -> None:
    data = strings.encode(v)
    assert len(data) <= strings.max_encoded_size(len(v))
    out, text = strings.decode(data, len(v))
    assert out.dtype == object and out.shape == v.shape
    assert all(type(a) is str and a == b for a, b in zip(out.tolist(), v.tolist(), strict=True))
    assert text == len(b"".join(s.encode() for s in dict.fromkeys(v.tolist())))
    with numpy_only():
        assert strings.encode(v) == data


def test_string_dictionary_is_small_for_states_and_free_for_distinct_indices() -> None:
    states = text_array(["IDLE"] * 5000 + ["DRIVE"] * 20_000 + ["CHARGING"] * 5000)
    assert len(strings.encode(states)) < 200  # two changes: exceptions of a width-0 stream
    rng = np.random.default_rng(2)
    modes = ["OFF", "ACC", "ON", "READY", "FAULT"]
    flapping = text_array([modes[m] for m in rng.integers(0, 5, 1000) for _ in range(rng.integers(20, 40))])
    data = strings.encode(flapping)
    assert data[0] == strings.INDEX_RUNS and len(data) < 1000 * 8 // 8 + 300  # ~8 bits a run, not a row
    distinct = text_array([f"VIN{i:014d}" for i in range(10_000)])
    data = strings.encode(distinct)
    assert data[0] == strings.INDEX_ROWS
    assert len(data) < 17 * 10_000 + 200  # the text, plus a constant: indices 0, 1, 2, ... cost nothing
    flicker = text_array(["on", "off"] * 5000)
    assert len(strings.encode(flicker)) < 10_000 // 8 + 200  # one bit a row


def test_string_encoder_refuses_what_it_cannot_store_exactly() -> None:
    with pytest.raises(strings.TextError, match="row 1 holds int"):
        strings.encode(text_array(["a", 1]))  # type: ignore[list-item]
    with pytest.raises(strings.TextError, match="row 0 holds NoneType"):
        strings.encode(text_array([None]))  # type: ignore[list-item]
    with pytest.raises(strings.TextError, match="UTF-8"):
        strings.encode(text_array(["\udc80"]))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 20))
def test_string_decoder_refuses_garbage_with_stream_error_only(blob: bytes, count: int) -> None:
    try:
        out, _ = strings.decode(blob, count)
    except intstream.StreamError:
        return
    assert out.shape == (count,) and all(type(x) is str for x in out.tolist())


@settings(max_examples=400, deadline=None)
@given(text_columns(), st.data())
def test_string_decoder_refuses_mutated_blocks_with_stream_error_only(
    v: npt.NDArray[np.object_], data: st.DataObject
) -> None:
    blob = bytearray(strings.encode(v))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        out, _ = strings.decode(bytes(blob[:cut] if data.draw(st.booleans()) else blob), len(v))
    except intstream.StreamError:
        return
    assert out.shape == v.shape and all(type(x) is str for x in out.tolist())


# ---------------------------------------------------------------------------------------- real data


def test_every_real_data_set_round_trips_bit_exactly_and_small(recordings: Path) -> None:
    samples = size = 0
    measured = []
    for name, result in real_corpus(recordings):
        for seg in to_segments(result, Catalog()):
            data = encode_segment(seg)
            assert decode_segment(data) == seg, (name, seg.group)
            samples += seg.sample_count
            size += len(data)
        measured.append(name)
    assert {"comma2k19-can", "comma2k19-sensors", "xio-fusion-imu", "skab"} <= set(measured)
    # a guard against silent regressions of the codec choice (the benchmark reports the figures)
    assert size / samples < 1.6


def test_multi_group_segments_of_the_real_corpus_are_identical_without_numba(recordings: Path) -> None:
    """Format 4/5 segments (as ``store import`` writes them) come out byte for byte the same with and
    without the kernels: the clock, key and difference choices are numpy only, the streams under them
    are the kernels'."""
    from fleetloop_shared.segment import bundle_segments

    checked = 0
    for name, result in real_corpus(recordings):
        if name not in ("comma2k19-can", "comma2k19-sensors"):
            continue
        (bundle,) = bundle_segments(to_segments(result, Catalog()))
        with_kernels = encode_segment(bundle)
        with numpy_only():
            assert encode_segment(bundle) == with_kernels, name
        assert decode_segment(with_kernels) == bundle
        checked += 1
    assert checked == 2
