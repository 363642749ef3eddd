"""Multi-group segments (format 4): a shared clock, the same times as an earlier group, bundling; round
trips and hostile bytes."""

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
    _version,
    assert_bit_exact,
    encode_segment,
    expect_corrupt,
    expect_every_byte_flip_corrupt,
    expect_every_truncation_corrupt,
    floats_from_bits,
    mutate_resealed,
    reseal,
    segments,
    small_segment,
    text,
    text_segment,
)

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.segment import (
    Segment,
    bundle_segments,
    decode_segment,
    new_segment_id,
)

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
    expect_every_byte_flip_corrupt(good)
    expect_every_truncation_corrupt(good)
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
