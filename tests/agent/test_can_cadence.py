"""When CAN sources decode: :class:`DecodeCadence` (enough frames pending, or the oldest waited long
enough), on generated arrival patterns and on real sources — a replayed log and python-can's virtual
bus — and how an integrator sets it (``decode_frames``, ``decode_wait``; wrong values refused where
they are written).

What must hold whatever the cadence: nothing is lost or reordered (the samples delivered are exactly
those of decoding at every read), and after every read every frame older than ``decode_wait`` has been
delivered (the bound the agent adds to a capture's wait and the ring buffers' horizon)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import can
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.can_bus import CanBusSource
from fleetloop_agent.sources.can_log import CanLogSource
from fleetloop_agent.sources.can_signals import (
    DEFAULT_CADENCE,
    EVERY_READ,
    CanSignalMap,
    DecodeCadence,
)
from fleetloop_agent.sources.live import FrameQueue
from fleetloop_fwsim.signals import SIM_VEHICLE_DBC
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.samples import GroupBatch
from tests.fixtures.agent_config import agent_yaml

S = 1_000_000_000
START = 1_700_000_000 * S


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 3 * S), min_size=1, max_size=80),
    ticks=st.lists(st.integers(1, 2 * S), min_size=1, max_size=80),
    min_frames=st.integers(1, 40),
    wait_ns=st.integers(0, 5 * S),
)
def test_a_queue_read_at_the_cadence_loses_nothing_and_lags_at_most_the_wait(
    gaps: list[int], ticks: list[int], min_frames: int, wait_ns: int
) -> None:
    cadence = DecodeCadence(min_frames, wait_ns)
    arrivals = np.cumsum(gaps).tolist()
    queue = FrameQueue(capacity=1_000)
    delivered: list[int] = []
    now, k = 0, 0
    for step in [*ticks, None]:
        # the last read comes long after the last frame, wherever the ticks ended
        now = now + step if step is not None else max(now, arrivals[-1]) + 10 * S + wait_ns
        while k < len(arrivals) and arrivals[k] <= now:
            queue.put(arrivals[k], k, bytes([k % 256]))
            k += 1
        pending, oldest = len(queue), queue.oldest_ns()
        if cadence.due(pending, oldest, now):
            batch = queue.drain(now)
            assert len(batch) >= min_frames or now - int(batch.t_ns[0]) >= wait_ns
            delivered += batch.frame_id.tolist()
        else:
            assert pending < min_frames and (oldest is None or now - oldest < wait_ns)
        # the bound: every frame received at or before now - wait has been delivered
        assert all(i < len(delivered) for i, t in enumerate(arrivals) if t <= now - wait_ns)
    assert delivered == list(range(len(arrivals)))


def test_wrong_cadences_are_refused() -> None:
    for frames, wait in ((0, 1.0), (1, -1.0), (1, 61.0)):
        with pytest.raises(ConfigError):
            DecodeCadence.seconds(frames, wait)
    assert EVERY_READ.due(1, 5, 5) and not EVERY_READ.due(0, None, 5)
    assert DEFAULT_CADENCE.lag_ns == DEFAULT_CADENCE.max_wait_ns > 0


def _samples(batches: list[GroupBatch]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for b in batches:
        for sid, values in b.values.items():
            out.setdefault(sid, []).extend(values.tolist())
    return out


def test_a_replayed_log_at_the_cadence_delivers_what_every_read_does(recordings: Path) -> None:
    kona = recordings / "kona-ev"
    db = load_dbc(kona / "dbc" / "pcan.dbc")
    results = []
    for cadence in (EVERY_READ, DecodeCadence.seconds(1_000, 2.0)):
        signals = CanSignalMap(db, {}, include_unmapped=True, source="bms")
        src = CanLogSource(
            kona / "bms_idle_30sec.asc", signals, start_ns=START, loop=False, cadence=cadence, name="bms"
        )
        src.declare(Catalog())
        got: list[GroupBatch] = []
        reads = empty = 0
        t = START
        while not src.finished:
            t += S // 10
            batches = src.read(t)
            reads += 1
            empty += not batches
            got += batches
            if batches:  # the bound: nothing older than the wait is still held back
                newest = max(int(b.t_ns[-1]) for b in batches)
                assert newest > t - cadence.lag_ns - S // 10
        results.append((_samples(got), reads, empty))
    (every, _, few_empty), (paced, reads, many_empty) = results
    assert paced == every and sum(map(len, every.values())) > 0
    assert many_empty > few_empty and reads - many_empty < reads / 5  # decoded in far fewer batches


def test_a_live_bus_holds_frames_until_due_and_gives_them_all_when_closed() -> None:
    db = load_dbc(SIM_VEHICLE_DBC)
    speed = db.decoder(["SIM_VEHICLE_SPEED"])
    frame_id = next(iter(speed.frame_ids))
    signals = CanSignalMap(
        db, {"SIM_VEHICLE_SPEED.VEHICLE_SPEED": "Vehicle.Speed"}, include_unmapped=False, source="car"
    )
    cadence = DecodeCadence.seconds(20, 30.0)
    src = CanBusSource(signals, interface="virtual", channel="cadence-test", name="car", cadence=cadence)
    src.declare(Catalog())
    src.start()
    assert src.wait_connected(10) and src.decode_lag_ns == 30 * S
    sender = can.Bus(interface="virtual", channel="cadence-test")
    try:

        def send(n: int) -> None:
            for _ in range(n):
                sender.send(can.Message(arbitration_id=frame_id, data=bytes(8), is_extended_id=False))

        def pending(n: int) -> None:
            deadline = time.monotonic() + 10
            while len(src._queue) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(src._queue) == n

        send(10)
        pending(10)
        assert src.read(time.time_ns()) == []  # 10 < 20 frames, the oldest not 30 s old
        assert src.read(time.time_ns() + 31 * S) != []  # the oldest has waited long enough
        send(25)
        pending(25)
        got = src.read(time.time_ns())  # 25 >= 20 frames
        assert sum(b.sample_count for b in got) == 25
        send(5)
        pending(5)
        assert src.read(time.time_ns()) == []
    finally:
        sender.shutdown()
        src.close()
    assert sum(b.sample_count for b in src.read(time.time_ns())) == 5  # closed: nothing held back


@pytest.mark.parametrize("kind", ["can", "can_log"])
def test_the_cadence_is_set_in_the_config_and_refused_where_written(
    kind: str, recordings: Path, tmp_path: Path
) -> None:
    from fleetloop_agent.config import load_agent_config

    where = (
        "    interface: virtual\n    channel: car\n"
        if kind == "can"
        else f"    path: {recordings / 'kona-ev' / 'bms_idle_30sec.asc'}\n"
    )
    dbc = recordings / "kona-ev" / "dbc" / "pcan.dbc"

    def source(extra: str) -> Any:
        path = tmp_path / "agent.yaml"
        path.write_text(
            agent_yaml(
                f"  - kind: {kind}\n    name: bus\n{where}    dbc: {dbc}\n    include_unmapped: true\n{extra}"
            )
        )
        config = load_agent_config(path)
        return path, lambda: build_source(config.sources[0], base_dir=config.base_dir, start_ns=START)

    _, make = source("    decode_frames: 500\n    decode_wait: 0.5\n")
    src = make()
    assert src._cadence == DecodeCadence(500, S // 2) and src.decode_lag_ns == S // 2
    _, make = source("")
    assert make()._cadence == DEFAULT_CADENCE
    line = 11 if kind == "can" else 10  # the key's own line and column
    for extra, key, message in (
        ("    decode_frames: 0\n", "decode_frames", "expected a number of frames >= 1, got 0"),
        ("    decode_frames: many\n", "decode_frames", "expected a number of frames >= 1, got 'many'"),
        ("    decode_wait: -1\n", "decode_wait", "expected seconds between 0 and 60, got -1"),
        ("    decode_wait: 3600\n", "decode_wait", "expected seconds between 0 and 60, got 3600"),
    ):
        path, make = source(extra)
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.message == f"{path}:{line}:5: source 'bus': key {key!r}: {message}"
