"""Modbus TCP against pymodbus's own server playing the SKAB pump: every encoding, the fewest requests,
the device clock, a server that goes away and comes back, a refused block, config mistakes."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.modbus import ModbusSource
from fleetloop_fwsim.plc import SKAB_COLUMNS
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.samples import GroupBatch
from tests.fixtures.agent_config import agent_yaml
from tests.fixtures.plc_servers import ModbusPump, modbus_pump
from tests.fixtures.waiting import wait_for

S = 1_000_000_000
SKEW = 3600 * S


class SkewedClock:
    """A device clock an hour ahead of the system's: samples must carry it, not the system time."""

    def now_ns(self) -> int:
        return time.time_ns() + SKEW


def pump_tags(poll_ms: int = 20) -> dict[str, dict[str, Any]]:
    tags: dict[str, dict[str, Any]] = {}
    for i, column in enumerate(SKAB_COLUMNS):
        key = column.replace(" ", "")
        tags[f"Pump.ABCD.{key}"] = {"register": "holding", "address": 2 * i, "type": "float32"}
        tags[f"Pump.CDAB.{key}"] = {
            "register": "holding",
            "address": 100 + 2 * i,
            "type": "float32",
            "word_order": "little",
        }
        tags[f"Pump.X100.{key}"] = {"register": "input", "address": i, "type": "int16", "scale": 0.01}
    tags["Pump.MotorOn"] = {"register": "coil", "address": 0}
    tags["Pump.PressureUp"] = {"register": "coil", "address": 1}
    tags["Pump.FlowOk"] = {"register": "discrete", "address": 0}
    for t in tags.values():
        t["poll_ms"] = poll_ms
    return tags


def make_source(pump: ModbusPump, tags: dict[str, Any], **extra: Any) -> ModbusSource:
    spec = {"kind": "modbus_tcp", "name": "pump", "host": pump.host, "port": pump.port, "tags": tags, **extra}
    src = build_source(spec, base_dir=Path("."), start_ns=0, clock=SkewedClock())
    assert isinstance(src, ModbusSource)
    return src


@pytest.fixture
def pump() -> Iterator[ModbusPump]:
    with modbus_pump(rows_per_s=10.0) as p:
        yield p


def columns(batch: GroupBatch, catalog: Catalog, prefix: str) -> np.ndarray:
    keys = [c.replace(" ", "") for c in SKAB_COLUMNS]
    return np.column_stack([batch.values[catalog.by_path(f"{prefix}.{k}").id] for k in keys])


def test_polls_the_skab_pump_in_every_encoding_with_the_fewest_requests(pump: ModbusPump) -> None:
    src = make_source(pump, pump_tags())
    catalog = Catalog()
    src.declare(catalog)
    assert src.requests_per_cycle == 4  # holding 0-115, input 0-7, coils 0-1, discrete 0
    before = time.time_ns() + SKEW
    src.start()
    try:
        wait_for("40 polls of samples", lambda: src.counters.samples >= 40 * 27)
        (batch,) = src.read(time.time_ns() + 2 * SKEW)
    finally:
        src.close()
    after = time.time_ns() + SKEW
    assert before <= int(batch.t_ns[0]) and int(batch.t_ns[-1]) <= after  # the device clock, not the system's
    assert len(batch) >= 40 and bool(np.all(np.diff(batch.t_ns) > 0))
    rows32 = np.asarray(pump.table.rows, dtype=np.float32).astype(np.float64)
    index = {tuple(r): i for i, r in enumerate(rows32)}
    abcd, cdab, x100 = (columns(batch, catalog, p) for p in ("Pump.ABCD", "Pump.CDAB", "Pump.X100"))
    matched = [index[tuple(r)] for r in abcd]  # every poll is one whole SKAB row, exact as float32
    assert all(tuple(r) in index for r in cdab)
    assert len(set(matched)) >= 3 and matched == sorted(matched)  # the pump plays on, in order
    for r, i in zip(x100, matched, strict=True):
        row = np.asarray(pump.table.rows[i])
        # the int16 block is read in the same poll; it may show the next row if the row changed meanwhile
        near = [np.asarray(pump.table.rows[j]) for j in (i, (i + 1) % len(pump.table.rows))]
        assert any(np.allclose(r, np.round(n * 100) / 100, atol=1e-9) for n in near), (r, row)
    motor = batch.values[catalog.by_path("Pump.MotorOn").id]
    flow = batch.values[catalog.by_path("Pump.FlowOk").id]
    assert motor.dtype == np.bool_ and flow.dtype == np.bool_
    rows = pump.table.rows
    for m, f, i in zip(motor.tolist(), flow.tolist(), matched, strict=True):
        near = (rows[i], rows[(i + 1) % len(rows)])
        assert any(m == (r[2] > 1.0) for r in near) and any(f == (r[7] > 100.0) for r in near)
    assert pump.reads >= 4 * len(batch)
    assert src.counters.errors == 0 and src.counters.dropped == 0


def test_server_going_away_counts_missed_polls_and_reconnects(pump: ModbusPump) -> None:
    src = make_source(pump, pump_tags(poll_ms=20))
    src.declare(Catalog())
    src.start()
    try:
        wait_for("a sample", lambda: src.counters.samples > 0)
        pump.stop()
        wait_for(
            "missed polls and the disconnection",
            lambda: src.counters.missed_polls >= 10 and not src.connected,
        )
        assert src.counters.errors >= 1 and src.alive()
        samples = src.counters.samples
        pump.start()
        wait_for(
            "the reconnection and new samples",
            lambda: src.counters.reconnects == 1 and src.counters.samples > samples,
        )
        assert src.alive() and src.connected
    finally:
        src.close()
    assert src.read(time.time_ns() + 2 * SKEW)  # what was captured before and after is all there


def test_a_refused_block_is_a_clear_error_and_the_other_tags_keep_polling(pump: ModbusPump) -> None:
    tags = pump_tags(poll_ms=20)
    tags["Pump.Nowhere"] = {"register": "holding", "address": 500, "type": "uint16", "poll_ms": 30}
    src = make_source(pump, tags)
    catalog = Catalog()
    src.declare(catalog)
    src.start()
    try:
        wait_for(
            "20 polls of samples and missed polls",
            lambda: src.counters.samples >= 20 * 27 and src.counters.missed_polls >= 3,
        )
    finally:
        src.close()
    assert "device 1 holding 500-500" in (src.last_error or "")
    assert "illegal data address (exception 2)" in (src.last_error or "")
    batches = src.read(time.time_ns() + 2 * SKEW)
    assert [b.group for b in batches] == ["pump/20ms"]
    assert src.counters.reconnects == 0


def test_float_word_order_is_what_the_server_sends() -> None:
    # the pump's own encoding of one value, checked independently of the source's decoder
    from fleetloop_fwsim.plc import registers_of

    regs = registers_of((1.5,) * 8)
    assert struct.pack(">HH", *regs["float_abcd"][:2]) == struct.pack(">f", 1.5)
    assert struct.pack(">HH", *regs["float_cdab"][1::-1]) == struct.pack(">f", 1.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host": None}, "source 'pump': missing key 'host'"),
        ({"port": "502"}, "source 'pump': key 'port': expected a non-negative integer"),
        ({"tags": {}}, "source 'pump': key 'tags': maps no tag"),
        (
            {"tags": {"A": {"register": "holdng", "address": 0}}},
            "key 'tags': tag 'A': key 'register': must be one of",
        ),
        (
            {"tags": {"A": {"address": 0, "type": "float"}}},
            "key 'tags': tag 'A': key 'type': must be one of",
        ),
        ({"tags": {"A": {"address": 0, "adress": 1}}}, "key 'tags': tag 'A': unknown key 'adress'"),
        (
            {"tags": {"A": {"register": "coil", "address": 0, "type": "int16"}}},
            "tag 'A': a coil holds one bit",
        ),
        ({"tags": {"A": {"address": 0, "poll_ms": 0}}}, "tag 'A': key 'poll_ms': expected a positive number"),
        ({"max_registers": 200}, "max_registers must be 1-125"),
        ({"pol_ms": 5}, "source 'pump': unknown key 'pol_ms'"),
    ],
)
def test_config_mistakes_name_the_source_and_the_key(change: dict[str, Any], message: str) -> None:
    spec: dict[str, Any] = {
        "kind": "modbus_tcp",
        "name": "pump",
        "host": "127.0.0.1",
        "tags": {"A": {"address": 0}},
    }
    spec.update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_source(spec, base_dir=Path("."), start_ns=0)


def test_a_wrong_config_file_is_refused_with_file_line_and_column(tmp_path: Path) -> None:
    from fleetloop_agent.config import load_agent_config

    path = tmp_path / "agent.yaml"
    path.write_text(
        agent_yaml(
            "  - kind: modbus_tcp\n"
            "    name: pump\n"
            "    host: 127.0.0.1\n"
            "    tags:\n"
            "      Plant.Pump.Pressure:\n"
            "        register: holding\n"
            "        address: 0\n"
            "        type: float\n"
            "      Plant.Pump.Flow: {register: input, adress: 3}\n",
            device_id="pump-1",
        )
    )
    config = load_agent_config(path)
    with pytest.raises(ConfigError) as info:
        build_source(config.sources[0], base_dir=config.base_dir, start_ns=0)
    assert info.value.message.startswith(f"{path}:12:9: source 'pump': key 'tags': tag 'Plant.Pump.Pressure'")
    path.write_text(path.read_text().replace("type: float\n", "type: float32\n"))
    config = load_agent_config(path)
    with pytest.raises(ConfigError, match=rf"^{path}:13:42: .* unknown key 'adress'"):
        build_source(config.sources[0], base_dir=config.base_dir, start_ns=0)
