"""Ring buffers: windows and samples, the horizon, the byte budget (drop-oldest), late samples
(drop-late), refusal of inconsistent batches, exact int64 values, and a hypothesis model check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import ConfigError, MalformedMessageError, UserError
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000


@pytest.fixture
def catalog() -> Catalog:
    cat = Catalog()
    cat.add("Vehicle.Speed", DataType.FLOAT64)  # 1
    cat.add("Vehicle.Gear", DataType.INT64)  # 2
    cat.add("Imu.Ax", DataType.FLOAT64)  # 3
    cat.add("Imu.Ay", DataType.FLOAT64)  # 4
    cat.add("Vehicle.Braking", DataType.BOOL)  # 5
    return cat


def batch(group: str, t: list[int], **cols: list[object]) -> GroupBatch:
    ids = {"speed": 1, "gear": 2, "ax": 3, "ay": 4, "brake": 5}
    dtypes = {1: np.float64, 2: np.int64, 3: np.float64, 4: np.float64, 5: np.bool_}
    return GroupBatch(
        group, np.asarray(t, np.int64), {ids[k]: np.asarray(v, dtypes[ids[k]]) for k, v in cols.items()}
    )


def test_window_returns_only_groups_and_columns_asked_for(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=100 * S)
    rb.append(batch("car", [1 * S, 2 * S, 3 * S], speed=[10.0, 20.0, 30.0], gear=[1, 2, 3]))
    rb.append(batch("imu", [1 * S, 2 * S, 3 * S], ax=[0.1, 0.2, 0.3], ay=[1.0, 2.0, 3.0]))

    out = rb.window({1}, 2 * S, 3 * S)
    assert len(out) == 1
    assert out[0].group == "car" and set(out[0].values) == {1}
    assert out[0].t_ns.tolist() == [2 * S, 3 * S]  # both ends included
    assert out[0].values[1].tolist() == [20.0, 30.0]

    both = {b.group: b for b in rb.window({1, 4}, 0, 10 * S)}
    assert set(both) == {"car", "imu"} and set(both["imu"].values) == {4}
    assert rb.window({1}, 4 * S, 9 * S) == []  # nothing in range: left out
    assert rb.window({99}, 0, 10 * S) == []

    # the window is a copy: later writes and edits do not alias
    out[0].values[1][0] = -1.0
    assert rb.window({1}, 2 * S, 2 * S)[0].values[1].tolist() == [20.0]


def test_samples_is_exclusive_inclusive_and_typed(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=100 * S)
    rb.append(batch("car", [1 * S, 2 * S, 3 * S], speed=[10.0, 20.0, 30.0], gear=[1, 2, 3]))
    t, v = rb.samples("Vehicle.Speed", 1 * S, 3 * S)
    assert t.tolist() == [2 * S, 3 * S] and v.tolist() == [20.0, 30.0]
    t, v = rb.samples("Vehicle.Gear", 0, 1 * S)
    assert t.tolist() == [1 * S] and v.dtype == np.int64
    t, v = rb.samples("Imu.Ax", 0, 10 * S)
    assert t.shape == (0,) and v.shape == (0,)
    t, v = rb.samples("Not.In.Catalog", 0, 10 * S)
    assert t.shape == (0,) and v.shape == (0,)
    with pytest.raises(ValueError):
        rb.samples("Vehicle.Speed", 0, 10 * S)[1][0] = 5.0  # views are read-only


def test_int64_values_stay_exact(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=100 * S)
    big = 2**62 + 1
    rb.append(batch("car", [1 * S], gear=[big]))
    assert rb.samples("Vehicle.Gear", 0, S)[1].tolist() == [big]
    assert rb.window({2}, 0, S)[0].values[2].tolist() == [big]


def test_horizon_keeps_last_horizon_of_data_time_per_group(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=5 * S)
    for second in range(20):
        rb.append(batch("car", [second * S], speed=[float(second)]))
    rb.append(batch("imu", [3 * S], ax=[1.0]))  # another group keeps its own horizon
    t, _ = rb.samples("Vehicle.Speed", -1, 100 * S)
    assert t.tolist() == [s * S for s in range(14, 20)]  # newest - 5 s .. newest, both ends
    assert rb.samples("Imu.Ax", -1, 100 * S)[0].tolist() == [3 * S]
    assert rb.bytes_used == 6 * 16 + 1 * 16

    rb.set_horizon(2 * S)
    assert rb.samples("Vehicle.Speed", -1, 100 * S)[0].tolist() == [17 * S, 18 * S, 19 * S]
    assert rb.dropped_samples_total == 0  # aging out is not dropping
    with pytest.raises(ConfigError):
        rb.set_horizon(-1)


def test_byte_budget_drops_globally_oldest(catalog: Catalog) -> None:
    # 16 bytes per row (8 timestamp + 8 value): room for 10 rows
    rb = RingBuffers(catalog, horizon_ns=1000 * S, max_bytes=160)
    rb.append(batch("car", [s * S for s in range(0, 6)], speed=[float(s) for s in range(6)]))
    rb.append(batch("imu", [s * S for s in range(3, 9)], ax=[float(s) for s in range(3, 9)]))
    assert rb.bytes_used == 160
    assert rb.dropped_samples_total == 2
    # the two oldest rows overall (car at 0 s and 1 s) went
    assert rb.samples("Vehicle.Speed", -1, 100 * S)[0].tolist() == [s * S for s in range(2, 6)]
    assert rb.samples("Imu.Ax", -1, 100 * S)[0].tolist() == [s * S for s in range(3, 9)]

    # one batch larger than the whole budget keeps only its newest rows
    rb.append(batch("imu", [s * S for s in range(100, 130)], ax=[0.0] * 30))
    assert rb.bytes_used <= 160
    assert rb.samples("Imu.Ax", -1, 1000 * S)[0].tolist() == [s * S for s in range(120, 130)]
    assert rb.samples("Vehicle.Speed", -1, 1000 * S)[0].shape == (0,)
    assert rb.dropped_samples_total == 2 + 20 + 10  # earlier, skipped from the batch, evicted


def test_late_samples_are_dropped_and_counted(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=100 * S)
    rb.append(batch("car", [5 * S, 6 * S], speed=[5.0, 6.0], gear=[5, 6]))
    rb.append(batch("car", [4 * S, 6 * S, 7 * S], speed=[4.0, 6.5, 7.0], gear=[4, 6, 7]))
    assert rb.late_samples_total == 2  # one row × two columns
    assert rb.samples("Vehicle.Speed", -1, 100 * S)[1].tolist() == [5.0, 6.0, 6.5, 7.0]


def test_a_group_whose_columns_change_is_merged_in_time_order(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=100 * S)
    rb.append(batch("car", [1 * S, 3 * S], speed=[1.0, 3.0], gear=[1, 3]))
    rb.append(batch("car", [2 * S, 4 * S], speed=[2.0, 4.0]))
    t, v = rb.samples("Vehicle.Speed", -1, 10 * S)
    assert t.tolist() == [1 * S, 2 * S, 3 * S, 4 * S] and v.tolist() == [1.0, 2.0, 3.0, 4.0]
    groups = rb.window({1, 2}, 0, 10 * S)
    assert sorted(len(g.values) for g in groups) == [1, 2]


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (GroupBatch("car", np.array([1, 2], np.int64), {1: np.array([1.0])}), MalformedMessageError, "shape"),
        (
            GroupBatch("car", np.array([2, 1], np.int64), {1: np.array([1.0, 2.0])}),
            MalformedMessageError,
            "backwards",
        ),
        (GroupBatch("car", np.array([1], np.int64), {2: np.array([1.5])}), MalformedMessageError, "INT64"),
        (GroupBatch("car", np.array([1.0]), {1: np.array([1.0])}), MalformedMessageError, "integer"),
        (GroupBatch("car", np.array([1], np.int64), {42: np.array([1.0])}), UserError, "not in the catalog"),
    ],
)
def test_inconsistent_batches_are_refused(
    catalog: Catalog, bad: GroupBatch, error: type[Exception], words: str
) -> None:
    rb = RingBuffers(catalog, horizon_ns=S)
    with pytest.raises(error, match=words):
        rb.append(bad)
    assert rb.bytes_used == 0


def test_bool_and_int_inputs_are_stored_in_catalog_dtypes(catalog: Catalog) -> None:
    rb = RingBuffers(catalog, horizon_ns=S)
    rb.append(GroupBatch("car", np.array([1], np.int64), {1: np.array([3], np.int32), 5: np.array([True])}))
    assert rb.samples("Vehicle.Speed", 0, 1)[1].dtype == np.float64
    assert rb.samples("Vehicle.Braking", 0, 1)[1].tolist() == [True]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["car", "imu"]), st.integers(0, 30), st.integers(0, 3)),
        min_size=1,
        max_size=40,
    ),
    horizon=st.integers(0, 40),
    budget_rows=st.integers(1, 60),
)
def test_model_check_against_plain_lists(
    steps: list[tuple[str, int, int]], horizon: int, budget_rows: int
) -> None:
    """Random appends: what is held is exactly a newest-suffix of each group (after horizon) and the
    byte budget holds; nothing but budget drops is counted."""
    cat = Catalog()
    cat.add("car.v", DataType.INT64)
    cat.add("imu.v", DataType.INT64)
    rb = RingBuffers(cat, horizon_ns=horizon, max_bytes=16 * budget_rows)
    sent: dict[str, list[int]] = {"car": [], "imu": []}
    clock = {"car": 0, "imu": 0}
    for group, advance, count in steps:
        start = clock[group] + advance
        stamps = [start + i for i in range(count)]
        clock[group] = stamps[-1] if stamps else clock[group]
        column = np.asarray(stamps, np.int64)
        rb.append(GroupBatch(group, column, {1 if group == "car" else 2: column}))
        sent[group] += stamps
        assert rb.bytes_used <= 16 * budget_rows
    held_rows = 0
    for group, path in (("car", "car.v"), ("imu", "imu.v")):
        t, v = rb.samples(path, -1, 10**9)
        assert t.tolist() == v.tolist()
        held_rows += len(t)
        if not sent[group]:
            continue
        newest = sent[group][-1]
        in_horizon = [x for x in sent[group] if x >= newest - horizon]
        # held = a suffix of what the horizon allows (the budget only ever removes the oldest)
        assert t.tolist() == in_horizon[len(in_horizon) - len(t) :]
    assert rb.bytes_used == 16 * held_rows


def test_real_drive_fits_a_one_minute_horizon(recordings: Path) -> None:
    seg = comma2k19_segment(recordings) / "processed_log" / "CAN"
    t = np.round(np.load(seg / "wheel_speed" / "t") * 1e9).astype(np.int64)
    wheels = np.load(seg / "wheel_speed" / "value")
    cat = Catalog()
    ids = [cat.add(f"Vehicle.Wheel.{i}.Speed", DataType.FLOAT64).id for i in range(4)]
    rb = RingBuffers(cat, horizon_ns=10 * S)
    for lo in range(0, len(t), 97):
        rb.append(
            GroupBatch("wheels", t[lo : lo + 97], {sid: wheels[lo : lo + 97, i] for i, sid in enumerate(ids)})
        )
    held, values = rb.samples("Vehicle.Wheel.2.Speed", -1, int(t[-1]))
    expected = t >= t[-1] - 10 * S
    assert held.tolist() == t[expected].tolist()
    assert values.tolist() == wheels[expected, 2].tolist()
    assert rb.bytes_used == int(expected.sum()) * (8 + 4 * 8)


def test_string_signals_are_held_as_plain_str(catalog: Catalog) -> None:
    catalog.add("Vehicle.Mode", DataType.STRING)  # 6
    rb = RingBuffers(catalog, horizon_ns=2 * S, max_bytes=10_000)
    # a numpy text array, an object array and a list all become object arrays of plain str
    rb.append(GroupBatch("mode", np.array([1 * S, 2 * S], np.int64), {6: np.array(["eco", ""])}))
    rb.append(GroupBatch("mode", np.array([3 * S], np.int64), {6: np.array(["sport é"], dtype=object)}))
    rb.append(GroupBatch("mode", np.array([4 * S], np.int64), {6: ["x" * 1000]}))  # type: ignore[dict-item]
    t, v = rb.samples("Vehicle.Mode", 0, 10 * S)
    assert t.tolist() == [2 * S, 3 * S, 4 * S]  # the horizon (2 s) dropped the first one
    assert v.dtype == object and v.tolist() == ["", "sport é", "x" * 1000]
    assert all(type(s) is str for s in v.tolist())
    (window,) = rb.window({6}, 3 * S, 4 * S)
    assert window.values[6].tolist() == ["sport é", "x" * 1000]
    assert rb.bytes_used == 3 * 16  # a timestamp and a reference per sample
    # the dropped row's string is released at once, not when its slot is reused
    ring = next(iter(rb._rings.values()))
    assert ring.cols[6][: ring.start].tolist() == [None] * ring.start


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.array([1.5]), "float64 values, the catalog declares STRING"),
        (np.array([None], dtype=object), "NoneType value, the catalog declares STRING"),
        (np.array([b"raw"], dtype=object), "bytes value, the catalog declares STRING"),
    ],
)
def test_string_signals_refuse_values_that_are_not_text(
    catalog: Catalog,
    values: np.ndarray,
    words: str,  # type: ignore[type-arg]
) -> None:
    catalog.add("Vehicle.Mode", DataType.STRING)
    rb = RingBuffers(catalog, horizon_ns=S)
    with pytest.raises(MalformedMessageError, match=words):
        rb.append(GroupBatch("mode", np.array([1], np.int64), {6: values}))
    # and text is not accepted for a numeric signal
    with pytest.raises(MalformedMessageError, match="the catalog declares FLOAT64"):
        rb.append(GroupBatch("car", np.array([1], np.int64), {1: np.array(["fast"], dtype=object)}))
    assert rb.bytes_used == 0
