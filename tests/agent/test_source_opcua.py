"""OPC UA against asyncua's own server playing the SKAB pump: data-change notifications stamped through
the server's timestamps onto the device clock, a node that does not exist, a server that restarts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.opcua import OpcUaSource
from fleetloop_fwsim.signals import SKAB_COLUMNS
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from tests.fixtures.plc_servers import OpcUaPump, opcua_pump

S = 1_000_000_000
SKEW = 3600 * S
WATCHED = ("Pressure", "Temperature", "Volume Flow RateRMS")


class SkewedClock:
    def now_ns(self) -> int:
        return time.time_ns() + SKEW


def wait_for(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def pump() -> Iterator[OpcUaPump]:
    with opcua_pump(rows_per_s=20.0) as p:
        yield p


def make_source(pump: OpcUaPump, *, extra_nodes: dict[str, Any] | None = None) -> OpcUaSource:
    nodes: dict[str, Any] = {
        pump.node_id(c): {"signal": f"Pump.{c.replace(' ', '')}", "unit": "x"} for c in WATCHED
    }
    nodes[pump.node_id("Running")] = {"signal": "Pump.Running", "type": "bool"}
    nodes.update(extra_nodes or {})
    spec = {
        "kind": "opcua",
        "name": "ua",
        "url": pump.url,
        "nodes": nodes,
        "publishing_ms": 50,
        "sampling_ms": 0,
    }
    src = build_source(spec, base_dir=Path("."), start_ns=0, clock=SkewedClock())
    assert isinstance(src, OpcUaSource)
    return src


def test_notifications_carry_server_time_on_the_device_clock_and_a_missing_node_is_named(
    pump: OpcUaPump,
) -> None:
    missing = f"ns={pump.namespace_index};s=Pump.NoSuchSensor"
    src = make_source(pump, extra_nodes={missing: {"signal": "Pump.NoSuchSensor"}})
    catalog = Catalog()
    src.declare(catalog)
    before = time.time_ns()
    src.start()
    try:
        temperature = catalog.by_path("Pump.Temperature").id
        wait_for(lambda: src.counters.samples >= 60)
        batches = {b.group: b for b in src.read(time.time_ns() + 2 * SKEW)}
    finally:
        src.close()
    after = time.time_ns()
    assert missing in src.node_errors and "BadNodeIdUnknown" in src.node_errors[missing]
    assert "Pump.NoSuchSensor" in (src.last_error or "") and src.counters.errors >= 1
    assert set(batches) == {f"ua/Pump.{c.replace(' ', '')}" for c in WATCHED} | {"ua/Pump.Running"}
    b = batches["ua/Pump.Temperature"]  # changes on (almost) every row; unchanged values are not notified
    assert len(b) >= 10
    # server time brought onto the device clock (an hour ahead), never later than it was read
    assert before + SKEW - S <= int(b.t_ns[0]) and int(b.t_ns[-1]) <= after + SKEW
    assert src.server_clock.offset_ns is not None and abs(src.server_clock.offset_ns - SKEW) < S
    column = SKAB_COLUMNS.index("Temperature")
    table = {row[column] for row in pump.table.rows}
    assert all(v in table for v in b.values[temperature].tolist())  # the pump's own values, exactly
    # the server writes a new row every 50 ms: its timestamps keep that spacing (not delivery jitter)
    steps = np.diff(b.t_ns) / 1e6
    assert float(np.median(steps)) == pytest.approx(50, abs=15)
    assert batches["ua/Pump.Running"].values[catalog.by_path("Pump.Running").id].dtype == np.bool_


def test_a_server_restart_is_reconnected_and_counted(pump: OpcUaPump) -> None:
    src = make_source(pump)
    src.declare(Catalog())
    src.start()
    try:
        wait_for(lambda: src.connected and src.counters.samples > 0)
        pump.stop()
        wait_for(lambda: not src.connected)
        samples = src.counters.samples
        pump.start()
        wait_for(lambda: src.counters.reconnects == 1 and src.counters.samples > samples + 4)
        assert src.alive() and src.counters.errors >= 1
    finally:
        src.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "http://x"}, "key 'url': expected opc.tcp://"),
        ({"nodes": {}}, "key 'nodes': maps no node"),
        ({"nodes": {"ns=2;s=A": {"unit": "bar"}}}, "key 'nodes': node 'ns=2;s=A': key 'signal'"),
        (
            {"nodes": {"ns=2;s=A": {"signal": "A", "type": "double"}}},
            "key 'nodes': node 'ns=2;s=A': key 'type': must be one of",
        ),
        ({"timestamps": "client"}, "key 'timestamps': must be one of server, source, device"),
    ],
)
def test_config_mistakes_name_the_source_and_the_key(change: dict[str, Any], message: str) -> None:
    spec: dict[str, Any] = {
        "kind": "opcua",
        "name": "ua",
        "url": "opc.tcp://127.0.0.1:4840",
        "nodes": {"ns=2;s=A": {"signal": "A"}},
    }
    spec.update(change)
    with pytest.raises(ConfigError, match=f"source 'ua': {message}"):
        build_source(spec, base_dir=Path("."), start_ns=0)
