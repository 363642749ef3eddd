"""The pure cores of the live sources: backoff, poll schedule, the bounded hand-off, the Modbus planner and
decoder, the OPC UA server clock, JSON paths and templates, the hub router and push admission."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.sources.hub_router import Field, HubRouter, Target, convert
from fleetloop_agent.sources.json_paths import MISSING, JsonPath, path_extractor, template_extractor
from fleetloop_agent.sources.live import Backoff, OverflowPolicy, PollSchedule, SampleQueue, SourceCounters
from fleetloop_agent.sources.modbus import MemoryModbusClient, ModbusSource
from fleetloop_agent.sources.modbus_map import MAX_REGISTERS, Tag, plan_requests, poll_groups
from fleetloop_agent.sources.opcua import ServerClock
from fleetloop_agent.sources.push_api import PushCatalog, PushSignal, RequestRefused
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.wire import push_pb2

S = 1_000_000_000


# -- backoff and poll schedule ------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_bounded_jitter_and_resets() -> None:
    b = Backoff(0.1, 2.0, jitter=0.2, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    for i, d in enumerate(delays):
        base = min(2.0, 0.1 * 2**i)
        assert 0.8 * base <= d <= 1.2 * base
    b.reset()
    assert b.next_delay() <= 0.12


def test_poll_schedule_counts_due_times_a_slow_poll_skipped() -> None:
    s = PollSchedule(100, first_ns=1000)
    assert not s.is_due(999) and s.is_due(1000)
    assert s.advance(1010) == 0 and s.due_ns == 1100  # on time
    assert s.advance(1450) == 3 and s.due_ns == 1500  # 1100 polled late; 1200, 1300, 1400 missed
    assert s.advance(1500) == 0 and s.due_ns == 1600


# -- the bounded hand-off --------------------------------------------------------------------------------


def _queue(capacity: int, policy: OverflowPolicy) -> tuple[SampleQueue, SourceCounters]:
    counters = SourceCounters()
    q = SampleQueue(capacity, policy, counters)
    q.dtypes = {1: "float64", 2: "int64", 3: "object"}
    return q, counters


def test_queue_drop_oldest_keeps_the_newest_and_counts_what_it_dropped() -> None:
    q, c = _queue(10, OverflowPolicy.DROP_OLDEST)
    for t in range(8):
        assert q.put("g", (1, 2), [t], [[float(t)], [t]])
    assert len(q) == 10 and c.samples == 16 and c.dropped == 6
    (batch,) = q.take(100)
    assert batch.t_ns.tolist() == [3, 4, 5, 6, 7]
    assert batch.values[1].dtype == np.float64 and batch.values[2].tolist() == [3, 4, 5, 6, 7]


def test_queue_refuse_newest_refuses_whole_requests() -> None:
    q, c = _queue(10, OverflowPolicy.REFUSE_NEWEST)
    assert q.put_all([("g", (1,), np.arange(6), [np.zeros(6)])])
    assert not q.put_all([("g", (1,), np.arange(3), [np.zeros(3)]), ("h", (2,), np.arange(2), [np.zeros(2)])])
    assert len(q) == 6 and c.dropped == 5 and c.samples == 6


def test_queue_take_splits_at_until_sorts_and_keeps_column_sets_apart() -> None:
    q, _ = _queue(100, OverflowPolicy.DROP_OLDEST)
    q.put("g", (1, 3), [5], [[0.5], ["a"]])
    q.put("g", (1, 3), [3], [[0.3], ["b"]])
    q.put("g", (1,), [4], [[0.4]])  # a message that lacked a field: its own column set
    q.put("g", (1, 3), [9], [[0.9], ["c"]])
    batches = q.take(6)
    assert sorted((b.group, tuple(sorted(b.values)), b.t_ns.tolist()) for b in batches) == [
        ("g", (1,), [4]),
        ("g", (1, 3), [3, 5]),
    ]
    full = next(b for b in batches if len(b.values) == 2)
    assert full.values[3].dtype == object and full.values[3].tolist() == ["b", "a"]
    assert len(q) == 2
    (rest,) = q.take(10)
    assert rest.t_ns.tolist() == [9]


# -- Modbus: the fewest requests, and decoding -----------------------------------------------------------


def test_planner_covers_a_map_with_the_fewest_requests() -> None:
    tags = [Tag(f"h{a}", "holding", a, "float32") for a in (0, 2, 10, 120, 124)]
    tags += [Tag(f"i{a}", "input", a, "int16") for a in (0, 1, 7)]
    tags += [Tag(f"c{a}", "coil", a, "bool") for a in (0, 1, 1999, 2000)]
    reqs = plan_requests(tags)
    got = [(r.register, r.address, r.count) for r in reqs]
    # 0..125 would be 126 registers: one more than a request may hold
    assert got == [
        ("holding", 0, 122),
        ("holding", 124, 2),
        ("input", 0, 8),
        ("coil", 0, 2000),
        ("coil", 2000, 1),
    ]
    gaps = plan_requests(tags[:5], max_gap=4)
    assert [(r.address, r.count) for r in gaps] == [(0, 4), (10, 2), (120, 6)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 400), min_size=1, max_size=40, unique=True),
    st.integers(1, MAX_REGISTERS),
    st.one_of(st.none(), st.integers(0, 30)),
)
def test_planner_requests_respect_limits_and_cover_every_tag(
    addresses: list[int], max_registers: int, max_gap: int | None
) -> None:
    tags = [Tag(f"t{a}", "holding", a, "uint16") for a in addresses]
    reqs = plan_requests(tags, max_registers=max_registers, max_gap=max_gap)
    covered = sorted(i for r in reqs for i in r.tags)
    assert covered == list(range(len(tags)))
    for r in reqs:
        assert 1 <= r.count <= max_registers
        for i in r.tags:
            assert r.address <= tags[i].address < r.address + r.count
    if max_gap is None:  # greedy from the lowest uncovered address is optimal
        lower_bound, start = 0, None
        for a in sorted(addresses):
            if start is None or a >= start + max_registers:
                lower_bound, start = lower_bound + 1, a
        assert len(reqs) == lower_bound


@given(st.floats(allow_nan=False, width=32), st.integers(-(2**31), 2**31 - 1))
def test_decoder_reads_every_word_and_byte_order(value: float, integer: int) -> None:
    f32 = struct.pack(">f", value)
    i32 = struct.pack(">i", integer)
    words_f = [int.from_bytes(f32[:2], "big"), int.from_bytes(f32[2:], "big")]
    words_i = [int.from_bytes(i32[:2], "big"), int.from_bytes(i32[2:], "big")]

    def swap(w: int) -> int:
        return ((w & 0xFF) << 8) | (w >> 8)

    layouts = {
        ("big", "big"): words_f + words_i,
        ("little", "big"): words_f[::-1] + words_i[::-1],
        ("big", "little"): [swap(w) for w in words_f + words_i],
        ("little", "little"): [swap(w) for w in words_f[::-1] + words_i[::-1]],
    }
    for (wo, bo), regs in layouts.items():
        tags = [
            Tag("f", "holding", 0, "float32", word_order=wo, byte_order=bo),
            Tag("i", "holding", 2, "int32", word_order=wo, byte_order=bo),
        ]
        (req,) = plan_requests(tags)
        got_f, got_i = req.decode(regs)
        assert got_f == struct.unpack(">f", f32)[0] and got_i == integer


def test_decoder_scales_offsets_and_reads_bits_of_registers() -> None:
    tags = [
        Tag("t", "input", 0, "int16", scale=0.1, offset=-40.0),
        Tag("b3", "input", 1, "bool", bit=3),
        Tag("u", "input", 2, "uint16"),
    ]
    (req,) = plan_requests(tags)
    assert req.decode([0xFFF6, 0b1000, 65535]) == [pytest.approx(-41.0), True, 65535]
    assert tags[0].catalog_type is DataType.FLOAT64 and tags[2].catalog_type is DataType.INT64


def test_tag_map_mistakes_are_config_errors_naming_the_tag() -> None:
    with pytest.raises(ConfigError, match="tag 'x': a coil holds one bit"):
        Tag("x", "coil", 0, "float32")
    with pytest.raises(ConfigError, match="tag 'y': a bool in a holding register needs 'bit'"):
        Tag("y", "holding", 0, "bool")
    with pytest.raises(ConfigError, match="outside 0-65535"):
        Tag("z", "holding", 65535, "float32")
    with pytest.raises(ConfigError, match="mapped twice"):
        poll_groups([Tag("a", "holding", 0), Tag("a", "holding", 1)], source="s")


def test_poller_against_the_in_memory_device_counts_refusals_and_outages() -> None:
    device = MemoryModbusClient({("holding", 1, 0): 7, ("holding", 1, 1): 8})
    src = ModbusSource("m", device, [Tag("a", "holding", 0), Tag("b", "holding", 1, poll_ns=S)])
    src.declare(Catalog())
    (group,) = src.groups
    device.connect()
    assert src.poll(group) and src.counters.samples == 2
    del device.values[("holding", 1, 1)]
    assert src.poll(group) and src.counters.missed_polls == 1
    assert "illegal data address" in (src.last_error or "")
    device.reachable = False
    assert not src.poll(group) and src.counters.missed_polls == 2


# -- OPC UA server clock ----------------------------------------------------------------------------------


def test_server_clock_keeps_the_least_delayed_offset_and_server_spacing() -> None:
    c = ServerClock(window=4)
    skew = 3600 * S
    for i, delay in enumerate([5_000_000, 1_000_000, 9_000_000]):
        server = 1000 * S + i * 100_000_000
        c.observe(server + skew + delay, server)
    assert c.offset_ns == skew + 1_000_000
    assert c.to_device(1000 * S + 200_000_000) - c.to_device(1000 * S + 100_000_000) == 100_000_000


# -- JSON paths and the template subset -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("temperature", 21.5),
        ("$.color.x", 0.3),
        ("color.x", 0.3),
        ("$['weird key'][1]", 2),
        ("list[0].v", "a"),
        ("list[-1].v", "b"),
        ("missing.deeper", MISSING),
        ("color[0]", MISSING),
    ],
)
def test_json_paths(path: str, expected: Any) -> None:
    doc = {"temperature": 21.5, "color": {"x": 0.3}, "weird key": [1, 2], "list": [{"v": "a"}, {"v": "b"}]}
    assert JsonPath.parse(path).get(doc) == expected


@pytest.mark.parametrize("bad", ["a..b", "a[x]", "a b", ""])
def test_bad_json_paths_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="JSON path"):
        JsonPath.parse(bad)


def test_templates_in_the_subset_extract_and_others_are_refused() -> None:
    doc = {"power": "12.34", "state": "ON", "nested": {"v": [3]}}
    assert template_extractor("{{ value_json.power | float | round(1) }}").extract(doc, "") == 12.3
    assert template_extractor("{{ value_json['nested'].v[0] }}").extract(doc, "") == 3
    assert template_extractor("{{ value_json.state | lower }}").extract(doc, "") == "on"
    assert template_extractor("{{ value }}").extract(None, "21.5") == "21.5"
    assert template_extractor("{{ value_json.nope | float(0) }}").extract(doc, "") is MISSING
    for bad in [
        "{{ states('sensor.x') }}",
        "{% if value_json.a %}1{% endif %}",
        "{{ value_json.a | regex_replace('x') }}",
        "{{ value_json.__class__ }}x{{ 1 }}",
        "{{ value_json.a + 1 }}",
    ]:
        with pytest.raises(ConfigError, match="outside the supported subset"):
            template_extractor(bad)


def test_convert_to_catalog_types() -> None:
    assert convert("ON", DataType.BOOL) is True and convert(0, DataType.BOOL) is False
    assert convert("open", DataType.BOOL, on="open", off="closed") is True
    assert convert("21.5", DataType.FLOAT64) == 21.5 and convert(3.0, DataType.INT64) == 3
    for value, dt in [
        (True, DataType.FLOAT64),
        ("warm", DataType.FLOAT64),
        (2.5, DataType.INT64),
        ("x", DataType.BOOL),
    ]:
        with pytest.raises(ValueError):
            convert(value, dt)


# -- the hub router ----------------------------------------------------------------------------------------


def _router(errors: list[str]) -> tuple[HubRouter, Catalog]:
    router = HubRouter(
        "hub",
        {"zigbee2mqtt/climate": [Field("temperature", path_extractor("temperature"), Target("T", unit="C"))]},
        discovery_prefix="homeassistant",
        entities={"plug_power": Target("P", unit="W"), "binary_sensor.door": Target("D", DataType.BOOL)},
        on_error=lambda key, message: errors.append(message),
    )
    catalog = Catalog()
    router.declare(catalog)
    return router, catalog


def test_router_follows_discovered_entities_with_abbreviations_and_tilde() -> None:
    errors: list[str] = []
    router, catalog = _router(errors)
    config = {
        "~": "zigbee2mqtt/plug",
        "stat_t": "~",
        "val_tpl": "{{ value_json.power }}",
        "uniq_id": "plug_power",
    }
    row, follow = router.on_message("homeassistant/sensor/plug/power/config", json.dumps(config).encode(), 1)
    assert row is None and follow == ["zigbee2mqtt/plug"]
    door = {"state_topic": "zigbee2mqtt/door", "value_template": "{{ value_json.contact }}", "pl_on": "false"}
    _, follow = router.on_message("homeassistant/binary_sensor/door/config", json.dumps(door).encode(), 2)
    assert follow == ["zigbee2mqtt/door"]
    row, _ = router.on_message("zigbee2mqtt/plug", b'{"power": 12, "state": "ON"}', 10)
    assert row is not None and row.values == (12.0,) and row.ids == (catalog.by_path("P").id,)
    row, _ = router.on_message("zigbee2mqtt/door", b'{"contact": "false"}', 11)
    assert row is not None and row.values == (True,)
    _, follow = router.on_message("homeassistant/sensor/other/x/config", b'{"state_topic": "a/b"}', 12)
    assert follow == [] and router.ignored_total == 1
    router.on_message("homeassistant/sensor/plug/power/config", b"", 13)  # removed
    assert router.on_message("zigbee2mqtt/plug", b'{"power": 13}', 14)[0] is None
    assert "homeassistant/+/+/config" in router.subscriptions() and errors == []


def test_router_counts_malformed_json_and_bad_values_and_drops_only_them() -> None:
    errors: list[str] = []
    router, _ = _router(errors)
    assert router.on_message("zigbee2mqtt/climate", b"{nope", 1)[0] is None
    assert router.on_message("zigbee2mqtt/climate", b'{"temperature": "warm"}', 2)[0] is None
    assert router.on_message("zigbee2mqtt/climate", b"x" * 70_000, 3)[0] is None
    row, _ = router.on_message("zigbee2mqtt/climate", b'{"temperature": 20.5}', 4)
    assert row is not None and row.values == (20.5,)
    assert router.malformed_total == 2 and len(errors) == 3
    assert "malformed JSON" in errors[0] and "not a number" in errors[1] and "exceeds" in errors[2]
    bad = {"state_topic": "t", "value_template": "{{ states('x') }}", "unique_id": "plug_power"}
    router.on_message("homeassistant/sensor/p/config", json.dumps(bad).encode(), 5)
    assert "plug_power" in errors[-1] and "outside the supported subset" in errors[-1]


# -- push admission ----------------------------------------------------------------------------------------


def _push() -> tuple[PushCatalog, Catalog]:
    pc = PushCatalog(
        "robot",
        [PushSignal(f"Imu.{a}", group="imu") for a in "XY"] + [PushSignal("Mode", DataType.STRING)],
    )
    catalog = Catalog()
    pc.declare(catalog)
    return pc, catalog


def _batch(times: list[int], **cols: Any) -> push_pb2.SampleBatch:
    columns = []
    for name, values in cols.items():
        signal = name.replace("_", ".")
        if values and isinstance(values[0], str):
            columns.append(push_pb2.Column(signal=signal, strings=push_pb2.StringValues(values=values)))
        else:
            columns.append(push_pb2.Column(signal=signal, doubles=push_pb2.DoubleValues(values=values)))
    return push_pb2.SampleBatch(time_ns=times, columns=columns)


def test_push_admission_accepts_whole_groups_and_stamps_single_rows() -> None:
    pc, _ = _push()
    now = 1_700_000_000 * S
    req = push_pb2.PublishValuesRequest(
        batches=[_batch([now - 2, now - 1], Imu_X=[1.0, 2.0], Imu_Y=[3.0, 4.0]), _batch([], Mode=["dock"])]
    )
    (imu, mode) = pc.admit(req, now)
    assert imu[0] == "robot/imu" and imu[2].tolist() == [now - 2, now - 1]
    assert [c.tolist() for c in imu[3]] == [[1.0, 2.0], [3.0, 4.0]]
    assert mode[2].tolist() == [now] and mode[3][0].tolist() == ["dock"]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (_batch([1], Imu_X=[1.0], Imu_Z=[1.0]), "'Imu.Z' is not in this agent's catalog"),
        (_batch([1], Imu_X=[1.0]), "travel together .missing Imu.Y"),
        (_batch([1, 2], Imu_X=[1.0], Imu_Y=[1.0, 2.0]), "unequal length"),
        (_batch([], Imu_X=[1.0, 2.0], Imu_Y=[1.0, 2.0]), "only a single row is stamped on arrival"),
        (_batch([1], Mode=[1.0]), "Mode is STRING; send its values as strings"),
        (_batch([1_700_000_100 * S], Imu_X=[1.0], Imu_Y=[1.0]), "not a time of the device clock"),
        (_batch([1_700_000 * S], Imu_X=[1.0], Imu_Y=[1.0]), None),
    ],
)
def test_push_admission_refuses_saying_why(batch: push_pb2.SampleBatch, message: str | None) -> None:
    pc, _ = _push()
    request = push_pb2.PublishValuesRequest(batches=[batch])
    if message is None:  # a time in the past (a replayed log) is the publisher's business
        assert pc.admit(request, 1_700_000_000 * S)
        return
    with pytest.raises(RequestRefused, match=message):
        pc.admit(request, 1_700_000_000 * S)


def test_router_reads_device_based_discovery_with_several_components() -> None:
    errors: list[str] = []
    router, catalog = _router(errors)
    config = {
        "dev": {"ids": ["0x00158d0001"]},
        "~": "zigbee2mqtt/plug",
        "stat_t": "~",
        "cmps": {
            "power": {"p": "sensor", "val_tpl": "{{ value_json.power }}", "uniq_id": "plug_power"},
            "energy": {"p": "sensor", "val_tpl": "{{ value_json.energy }}", "uniq_id": "plug_energy"},
        },
    }
    _, follow = router.on_message("homeassistant/device/0x00158d0001/config", json.dumps(config).encode(), 1)
    assert follow == ["zigbee2mqtt/plug"] and router.ignored_total == 1  # energy is not mapped
    row, _ = router.on_message("zigbee2mqtt/plug", b'{"power": 7.5, "energy": 1.2}', 2)
    assert row is not None and row.values == (7.5,) and row.ids == (catalog.by_path("P").id,)
    router.on_message("homeassistant/device/0x00158d0001/config", b"", 3)
    assert router.on_message("zigbee2mqtt/plug", b'{"power": 8}', 4)[0] is None and errors == []
