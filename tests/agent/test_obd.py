"""OBD-II: service 01 PIDs and the VIN over ISO-TP (can-isotp) against firmware-sim's ECU on a python-can
bus (in-process, and across processes through the remote CAN server), and through an ELM327 adapter —
the ELM327-emulator package on a pseudo-terminal. Polling plans, multi-PID requests split for ECUs that
refuse them, unsupported PIDs learned and never asked."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import pytest

from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.live import Backoff
from fleetloop_agent.sources.obd import ObdSource
from fleetloop_agent.sources.obd_link import Elm327Link, IsoTpLink, parse_elm_lines
from fleetloop_agent.sources.obd_plan import ObdPollPlan
from fleetloop_fwsim.can_network import RemoteCanServer
from fleetloop_fwsim.obd_ecu import IsoTpEcu, ObdEcu
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.obd_pids import PIDS, VIN_PATH, parse_vin
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000
RPM, SPEED, COOLANT, FUEL_RATE, THROTTLE_REL = 0x0C, 0x0D, 0x05, 0x5E, 0x45
VALUES = {RPM: 1726.5, SPEED: 88.0, COOLANT: 91.0, 0x42: 14.2}


def _collect(
    src: ObdSource, catalog: Catalog, paths: list[str], per_path: int, timeout: float = 10.0
) -> dict[str, list[Any]]:
    """Values per path until each has ``per_path`` (the VIN: one)."""
    got: dict[str, list[Any]] = {p: [] for p in paths}
    ids = {catalog.by_path(p).id: p for p in paths}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        len(v) < (1 if p == VIN_PATH else per_path) for p, v in got.items()
    ):
        batch: GroupBatch
        for batch in src.read(time.time_ns() + S):
            for sid, column in batch.values.items():
                if sid in ids:
                    got[ids[sid]] += column.tolist()
        time.sleep(0.02)
    return got


def _isotp_source(interface: str, channel: str, **kw: Any) -> tuple[ObdSource, Catalog]:
    src = ObdSource(
        lambda: IsoTpLink(interface, channel),
        {RPM: 0.05, SPEED: 0.05, COOLANT: 0.2, FUEL_RATE: 0.1},
        name="obd",
        timeout_s=0.5,
        backoff=Backoff(initial_s=0.05, max_s=0.2),
        **kw,
    )
    catalog = Catalog()
    src.declare(catalog)
    return src, catalog


@pytest.mark.parametrize("refusal", ["answer", "first", "negative", "silent"])
def test_isotp_against_the_simulated_ecu(refusal: str) -> None:
    channel = f"obd-{refusal}"
    ecu_bus = can.Bus(interface="virtual", channel=channel)
    ecu = IsoTpEcu(ecu_bus, ObdEcu(values=lambda t: VALUES, multi_pid=refusal)).start()
    src, catalog = _isotp_source("virtual", channel)
    try:
        paths = [PIDS[RPM].path, PIDS[SPEED].path, PIDS[COOLANT].path]
        got = _collect(src, catalog, [*paths, VIN_PATH], per_path=1)
    finally:
        src.close()
        ecu.stop()
        ecu_bus.shutdown()
    assert got[PIDS[RPM].path][0] == 1726.5 and got[PIDS[SPEED].path][0] == 88.0
    assert got[PIDS[COOLANT].path][0] == 91.0
    assert got[VIN_PATH] == ["1FLEETL00PSIM0001"]
    # FUEL_RATE is outside the ECU's support bitmap: learned, never asked
    assert FUEL_RATE in src.plan.unsupported
    assert not any(r[0] == 0x01 and FUEL_RATE in r[1:] for r in ecu.ecu.requests)
    # an ECU that refuses multi-PID requests is asked one PID at a time once learned
    assert src.plan.multi_pid == (refusal == "answer")
    if refusal != "answer":
        multi = [r for r in ecu.ecu.requests if r[0] == 0x01 and len(r) > 2 and r[1] not in (0, 0x20, 0x40)]
        assert len(multi) == 1, "one multi-PID request, then single ones"
    counters = src.counters()
    assert counters["errors"] == 0 and counters["samples"] >= 4


def test_isotp_across_processes_and_a_link_that_goes_away(tmp_path: Path) -> None:
    server = RemoteCanServer(channel="obd", log=tmp_path / "server.log").start()
    ecu_bus = can.Bus(interface="remote", channel=server.url)
    ecu = IsoTpEcu(ecu_bus, ObdEcu(values=lambda t: VALUES)).start()
    src, catalog = _isotp_source("remote", server.url, vin=False)
    try:
        got = _collect(src, catalog, [PIDS[SPEED].path], per_path=3)
        assert got[PIDS[SPEED].path][:3] == [88.0] * 3
        ecu.stop()
        ecu_bus.shutdown()
        server.stop()
        deadline = time.monotonic() + 10
        while src.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not src.alive() and src.counters()["errors"] >= 1
        server.start()
        ecu_bus = can.Bus(interface="remote", channel=server.url)
        ecu = IsoTpEcu(ecu_bus, ObdEcu(values=lambda t: {**VALUES, SPEED: 42.0})).start()
        deadline = time.monotonic() + 15
        after: list[float] = []
        while 42.0 not in after and time.monotonic() < deadline:
            after += _collect(src, catalog, [PIDS[SPEED].path], per_path=1, timeout=1)[PIDS[SPEED].path]
        assert 42.0 in after and src.alive() and src.counters()["reconnects"] >= 1
    finally:
        src.close()
        ecu.stop()
        ecu_bus.shutdown()
        server.stop()


@pytest.fixture(scope="module")
def elm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from elm import Elm

    # the emulator configures logging from $ELM_LOG_CFG, by default into ./elm.log: keep it quiet
    quiet = tmp_path_factory.mktemp("elm") / "logging.yaml"
    quiet.write_text("version: 1\ndisable_existing_loggers: false\n")
    saved = os.environ.get("ELM_LOG_CFG")
    os.environ["ELM_LOG_CFG"] = str(quiet)
    try:
        yield from _emulator(Elm)
    finally:
        if saved is None:
            os.environ.pop("ELM_LOG_CFG", None)
        else:
            os.environ["ELM_LOG_CFG"] = saved


def _emulator(Elm: Any) -> Iterator[Any]:
    with Elm() as emulator:
        deadline = time.monotonic() + 10
        while emulator.threadState != Elm.THREAD.ACTIVE and time.monotonic() < deadline:
            time.sleep(0.01)
        thread = emulator.thread
        yield emulator
    thread.join(5)  # the emulator evaluates its scenario's code on this thread: let it finish


def test_elm327_emulator_on_a_pty(elm: Any) -> None:
    port = elm.get_pty()
    src = ObdSource(
        lambda: Elm327Link(port, protocol="6"),
        {RPM: 0.05, SPEED: 0.05, COOLANT: 0.1, THROTTLE_REL: 0.1},
        name="obd",
        timeout_s=1.0,
    )
    catalog = Catalog()
    src.declare(catalog)
    try:
        paths = [PIDS[RPM].path, PIDS[SPEED].path, PIDS[COOLANT].path]
        got = _collect(src, catalog, [*paths, VIN_PATH], per_path=3, timeout=20)
    finally:
        src.close()
    assert got[VIN_PATH] == ["WP0ZZZ99ZTS390000"]
    rpm = got[PIDS[RPM].path]
    assert len(rpm) >= 3 and all(0 <= v < 16384 and (v * 4).is_integer() for v in rpm)
    assert all(0 <= v <= 255 and v.is_integer() for v in got[PIDS[SPEED].path])
    assert all(-40 <= v <= 215 for v in got[PIDS[COOLANT].path])
    # 01 45 is not in the emulated car's bitmaps: never asked; its multi-PID answers leave PIDs out:
    # the plan learns to ask one at a time, and every PID still arrives
    assert THROTTLE_REL in src.plan.unsupported
    assert src.plan.multi_pid is False
    assert src.counters()["errors"] == 0


def test_an_absent_adapter_is_retried_not_fatal(tmp_path: Path) -> None:
    src = ObdSource(
        lambda: Elm327Link(str(tmp_path / "ttyUSB9")),
        {SPEED: 0.1},
        backoff=Backoff(initial_s=0.01, max_s=0.05),
    )
    src.declare(Catalog())
    try:
        assert src.read(time.time_ns()) == []
        deadline = time.monotonic() + 5
        while src.counters()["errors"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not src.alive() and "cannot open serial port" in (src.failure or "")
    finally:
        src.close()


def test_elm_lines_join_isotp_frames_per_ecu() -> None:
    lines = [
        "SEARCHING...",
        "7E81014490201575030",
        "7E8215A5A5A39395A54",
        "7E82253333930303030",
        "7EA03410D04",
    ]
    answers = dict(parse_elm_lines(lines))
    assert parse_vin(answers[0x7E8]) == "WP0ZZZ99ZTS390000"
    assert answers[0x7EA] == bytes([0x41, 0x0D, 0x04])
    # a consecutive frame out of order drops that ECU's answer
    assert parse_elm_lines(["7E81014490201575030", "7E8225A5A5A39395A54"]) == []


def test_plan_counts_missed_polls_and_drops_silent_pids() -> None:
    plan = ObdPollPlan({RPM: 0.1, SPEED: 1.0}, multi_pid=None)
    assert plan.due(0) == [(RPM, SPEED)]
    plan.answered(0, (RPM, SPEED), [RPM, SPEED])
    assert plan.due(int(0.35 * S)) == [(RPM,)]  # late by 2.5 intervals: 2 polls missed
    assert plan.stats.missed_polls == 2
    plan.answered(int(0.35 * S), (RPM,), [])
    plan.answered(int(0.36 * S), (RPM,), [])
    assert plan.pids == [SPEED] and RPM in plan.unsupported


def test_obd_config(tmp_path: Path) -> None:
    base = {
        "kind": "obd",
        "name": "obd",
        "transport": "isotp",
        "channel": "can0",
        "pids": {"RPM": 0.5, "0x0D": 1},
    }
    src = build_source(base, base_dir=tmp_path, start_ns=0)
    assert isinstance(src, ObdSource) and src.plan.pids == [RPM, SPEED]
    for change, message in [
        ({"transport": "bluetooth"}, "key 'transport': must be one of isotp, elm327"),
        ({"pids": {"WARP_DRIVE": 1}}, "key 'pids': unknown PID 'WARP_DRIVE'"),
        ({"pids": {"RPM": 0}}, "key 'pids': RPM: expected a polling interval"),
        ({"port": "/dev/ttyUSB0"}, "key 'port': belongs to transport elm327"),
        (
            {"transport": "elm327", "port": "/dev/ttyUSB0", "protocol": "3"},
            "key 'protocol': must be one of 0, 6, 7, 8, 9",
        ),
        ({"multi_pid": "sometimes"}, "key 'multi_pid': expected auto, true or false"),
    ]:
        spec = {**base, **change}
        if spec["transport"] == "elm327":
            spec.pop("channel")
        with pytest.raises(ConfigError, match=message):
            build_source(spec, base_dir=tmp_path, start_ns=0)


def test_the_simulated_ecu_refuses_a_multi_pid_mode_it_does_not_have() -> None:
    with pytest.raises(ValueError, match=r"^multi_pid must be one of answer, .*, got 'sometimes'$"):
        ObdEcu(multi_pid="sometimes")
