"""Capture assembly: a capture waits for its post-window, is cut from the ring buffers (pre-window from
history, post-window as it arrived), holds only the collected signals, and pending fires are bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetloop_agent.capture import Capture, CaptureAssembler
from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.trigger_engine import Fire, TriggerEngine
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.rules import parse_campaign
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000


@pytest.fixture
def catalog() -> Catalog:
    cat = Catalog()
    cat.add("Vehicle.Speed", DataType.FLOAT64)  # 1
    cat.add("Vehicle.Chassis.Brake", DataType.FLOAT64)  # 2
    cat.add("Vehicle.Chassis.Steering", DataType.FLOAT64)  # 3
    cat.add("Cabin.Temp", DataType.FLOAT64)  # 4
    return cat


def second_batches(t0: int, t1: int) -> list[GroupBatch]:
    """One sample per second in two groups: speed (id 1) and chassis (ids 2, 3)."""
    t = np.arange(t0, t1, dtype=np.int64) * S
    v = np.arange(t0, t1, dtype=np.float64)
    return [
        GroupBatch("speed", t, {1: v}),
        GroupBatch("chassis", t, {2: v * 10, 3: v * 100}),
        GroupBatch("cabin", t, {4: v + 0.5}),
    ]


def test_capture_waits_for_post_window_then_cuts_pre_and_post(catalog: Catalog) -> None:
    buffers = RingBuffers(catalog, horizon_ns=60 * S)
    assembler = CaptureAssembler(catalog)
    for b in second_batches(0, 21):
        buffers.append(b)
    assembler.on_fire(Fire("brake", 20 * S, 10 * S, 25 * S, 7), ["Vehicle.Speed", "Vehicle.Chassis.*"])
    assert assembler.poll(20 * S, buffers) == []
    assert assembler.poll(24 * S, buffers) == []
    assert assembler.pending == 1
    for b in second_batches(21, 30):
        buffers.append(b)
    (capture,) = assembler.poll(29 * S, buffers)
    assert assembler.pending == 0 and assembler.poll(40 * S, buffers) == []
    assert isinstance(capture, Capture)
    assert (capture.campaign, capture.priority, capture.fire_ns) == ("brake", 7, 20 * S)
    assert (capture.from_ns, capture.to_ns) == (10 * S, 25 * S)
    groups = {b.group: b for b in capture.batches}
    assert set(groups) == {"speed", "chassis"}  # Cabin.Temp is not collected
    assert groups["speed"].t_ns.tolist() == [s * S for s in range(10, 26)]  # both ends included
    assert groups["speed"].values[1].tolist() == [float(s) for s in range(10, 26)]
    assert set(groups["chassis"].values) == {2, 3}
    assert groups["chassis"].values[3].tolist() == [s * 100.0 for s in range(10, 26)]
    assert capture.sample_count == 16 + 2 * 16


def test_exactly_at_to_ns_is_complete(catalog: Catalog) -> None:
    buffers = RingBuffers(catalog, horizon_ns=60 * S)
    for b in second_batches(0, 6):
        buffers.append(b)
    assembler = CaptureAssembler(catalog)
    assembler.on_fire(Fire("c", 3 * S, 1 * S, 5 * S, 1), ["Vehicle.Speed"])
    (capture,) = assembler.poll(5 * S, buffers)
    assert capture.batches[0].t_ns.tolist() == [1 * S, 2 * S, 3 * S, 4 * S, 5 * S]


def test_captures_come_out_in_fire_order_with_stable_ids(catalog: Catalog) -> None:
    buffers = RingBuffers(catalog, horizon_ns=60 * S)
    for b in second_batches(0, 30):
        buffers.append(b)
    assembler = CaptureAssembler(catalog)
    assembler.on_fire(Fire("b", 9 * S, 8 * S, 10 * S, 1), ["Cabin.*"])
    assembler.on_fire(Fire("a", 5 * S, 4 * S, 6 * S, 1), ["Cabin.*"])
    assembler.on_fire(Fire("a", 5 * S, 4 * S, 6 * S, 1), ["Cabin.*"])  # the same fire again
    out = assembler.poll(30 * S, buffers)
    assert [(c.campaign, c.fire_ns) for c in out] == [("a", 5 * S), ("b", 9 * S)]
    assert len({c.capture_id for c in out}) == 2
    assert out[0].capture_id == "a-5000000000"  # deterministic: a replayed fire maps to the same capture


def test_patterns_matching_nothing_give_an_empty_capture(catalog: Catalog) -> None:
    buffers = RingBuffers(catalog, horizon_ns=60 * S)
    for b in second_batches(0, 5):
        buffers.append(b)
    assembler = CaptureAssembler(catalog)
    assembler.on_fire(Fire("c", 2 * S, 1 * S, 3 * S, 1), ["Nothing.*"])
    (capture,) = assembler.poll(5 * S, buffers)
    assert capture.batches == [] and capture.sample_count == 0


def test_pending_is_bounded_drop_newest(catalog: Catalog) -> None:
    assembler = CaptureAssembler(catalog, max_pending=3)
    for i in range(5):
        assembler.on_fire(Fire("c", i * S, i * S, (i + 100) * S, 1), ["Vehicle.Speed"])
    assert assembler.pending == 3 and assembler.dropped_fires_total == 2
    buffers = RingBuffers(catalog, horizon_ns=S)
    assert [c.fire_ns for c in assembler.poll(200 * S, buffers)] == [0, S, 2 * S]  # the oldest were kept
    with pytest.raises(ConfigError):
        CaptureAssembler(catalog, max_pending=0)


def test_real_drive_capture_holds_exactly_the_recorded_samples(recordings: Path) -> None:
    """Engine + ring buffers + assembler on the comma2k19 drive: each capture's content equals the
    recording's samples in [fire - pre, fire + post], for both collected groups."""
    seg = comma2k19_segment(recordings) / "processed_log" / "CAN"
    t_speed = np.round(np.load(seg / "speed" / "t") * 1e9).astype(np.int64)
    kmh = np.load(seg / "speed" / "value")[:, 0] * 3.6
    t_steer = np.round(np.load(seg / "steering_angle" / "t") * 1e9).astype(np.int64)
    steer = np.load(seg / "steering_angle" / "value").astype(np.float64)
    cat = Catalog()
    cat.add("Vehicle.Speed", DataType.FLOAT64, "km/h")
    cat.add("Vehicle.Chassis.SteeringWheel.Angle", DataType.FLOAT64, "deg")
    cat.add("Vehicle.Unused", DataType.FLOAT64)
    spec = parse_campaign(
        "apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: braking, version: 1}\nspec:\n"
        "  trigger: {when: 'Vehicle.Speed > 40 and delta(Vehicle.Speed, 2s) < -3', min_interval: 10s}\n"
        "  collect: {signals: [Vehicle.Speed, Vehicle.Chassis.*], pre: 3s, post: 1s}\n  priority: 6\n",
        "braking.yaml",
    )
    engine = TriggerEngine(cat)
    assert engine.set_campaigns([spec], 0) == {}
    buffers = RingBuffers(cat, horizon_ns=engine.required_horizon_ns())
    assembler = CaptureAssembler(cat)
    captures: list[Capture] = []
    step = 200_000_000  # deliver 200 ms of both groups at a time
    for start in range(int(t_speed[0]), int(t_speed[-1]) + step, step):
        batches = []
        for group, t, v, sid in (("speed", t_speed, kmh, 1), ("steer", t_steer, steer, 2)):
            lo, hi = np.searchsorted(t, [start, start + step])
            if hi > lo:
                batches.append(GroupBatch(group, t[lo:hi], {sid: v[lo:hi]}))
        for b in batches:
            buffers.append(b)
        for fire in engine.process(batches, buffers):
            assembler.on_fire(fire, spec.collect_signals)
        captures += assembler.poll(start + step - 1, buffers)

    assert len(captures) >= 2
    assert buffers.dropped_samples_total == 0
    for cap in captures:
        assert cap.priority == 6 and cap.to_ns - cap.from_ns == 4 * S
        groups = {b.group: b for b in cap.batches}
        assert set(groups) == {"speed", "steer"}
        for group, t, v, sid in (("speed", t_speed, kmh, 1), ("steer", t_steer, steer, 2)):
            want = (t >= cap.from_ns) & (t <= cap.to_ns)
            assert groups[group].t_ns.tolist() == t[want].tolist()
            assert groups[group].values[sid].tolist() == v[want].tolist()
        assert cap.sample_count == sum(len(b) for b in cap.batches)


def test_max_per_hour_drops_fires_beyond_the_limit(catalog: Catalog) -> None:
    assembler = CaptureAssembler(catalog)
    for minute in (0, 10, 20, 30, 61, 75):
        assembler.on_fire(
            Fire("c", minute * 60 * S, minute * 60 * S, minute * 60 * S, 5, 2), ["Vehicle.Speed"]
        )
    # kept: 0, 10 (two in the first hour), then 61 (0 has left the hour) and 75 (10 has left it)
    assert assembler.pending == 4 and assembler.rate_limited_total == 2


def test_full_queue_evicts_a_lower_priority_fire(catalog: Catalog) -> None:
    assembler = CaptureAssembler(catalog, max_pending=2)
    assembler.on_fire(Fire("low", 1 * S, 0, 100 * S, 1), ["Vehicle.Speed"])
    assembler.on_fire(Fire("mid", 2 * S, 0, 100 * S, 5), ["Vehicle.Speed"])
    assembler.on_fire(Fire("high", 3 * S, 0, 100 * S, 9), ["Vehicle.Speed"])  # evicts "low"
    assembler.on_fire(Fire("low2", 4 * S, 0, 100 * S, 1), ["Vehicle.Speed"])  # dropped
    assert assembler.dropped_fires_total == 2
    buffers = RingBuffers(catalog, horizon_ns=600 * S)
    assert [c.campaign for c in assembler.poll(100 * S, buffers)] == ["mid", "high"]


def test_min_period_thins_only_the_named_signals(catalog: Catalog) -> None:
    buffers = RingBuffers(catalog, horizon_ns=60 * S)
    t = np.arange(0, 10, dtype=np.int64) * (S // 4)  # 4 Hz for 2.5 s
    v = np.arange(10, dtype=np.float64)
    buffers.append(GroupBatch("chassis", t, {2: v, 3: v * 2}))
    assembler = CaptureAssembler(catalog)
    assembler.on_fire(
        Fire("c", 2 * S, 0, 2 * S, 5, None, (("Vehicle.Chassis.Brake", S),)), ["Vehicle.Chassis.*"]
    )
    assert assembler.required_horizon_ns() == 2 * S
    (capture,) = assembler.poll(3 * S, buffers)
    by_signal = {
        sid: (b.t_ns.tolist(), col.tolist()) for b in capture.batches for sid, col in b.values.items()
    }
    assert by_signal[2] == ([0, S, 2 * S], [0.0, 4.0, 8.0])  # one per second
    assert len(by_signal[3][0]) == 9  # untouched: every sample in [0, 2 s]


def test_capture_segments_pack_its_groups_and_round_trip() -> None:
    from fleetloop_shared.segment import decode_segment, encode_segment

    cat = Catalog()
    a, b, c = (cat.add(name, DataType.FLOAT64).id for name in ("can0/A/x", "can0/B/y", "can0/B/z"))
    t = np.arange(0, 1_000_000_000, 10_000_000, dtype=np.int64)
    batches = [
        GroupBatch("can0/A", t, {a: np.linspace(0, 1, t.size)}),
        GroupBatch("can0/B", t[::2], {b: np.arange(t.size // 2, dtype=np.float64), c: np.zeros(t.size // 2)}),
        GroupBatch("empty", t[:0], {a: np.zeros(0)}),
    ]
    capture = Capture("cap", "camp", 5, 0, 0, 10**9, batches)
    (seg,) = capture.segments(cat)
    assert [g.group for g in seg.groups()] == ["can0/A", "can0/B"]
    assert seg.sample_count == capture.sample_count
    assert decode_segment(encode_segment(seg)) == seg
    assert [s.group for s in capture.segments(cat, bundle_rows=0)] == ["can0/A", "can0/B"]
