"""The far side of each demo machine against the agent's own live sources, in one process: the car's ECU
on a CAN network across processes (frames and OBD-II), the pump over Modbus TCP, the robot's controller
on the push API (started before the agent, as after a reboot), zigbee2mqtt devices on the hub's mosquitto.
Generated data (no recordings needed); the demo's end-to-end test runs the same on the recordings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetloop_agent.sources import build_source
from fleetloop_fwsim import hub, profiles
from fleetloop_fwsim.far_side import FarSide, start_far_side
from fleetloop_fwsim.obd_ecu import DEFAULT_VIN
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError

S = 1_000_000_000


@pytest.fixture
def far_side(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FarSide]:
    side = start_far_side(request.param, tmp_path / "side", recordings=None, speed=4.0)
    yield side
    side.stop()


def _values(side: FarSide, want: dict[str, int], timeout_s: float = 30.0) -> dict[str, list[Any]]:
    """Run the agent's sources for ``side`` until each path in ``want`` has that many values."""
    catalog = Catalog()
    sources = [build_source(spec, base_dir=Path("."), start_ns=time.time_ns()) for spec in side.sources]
    for src in sources:
        src.declare(catalog)
    got: dict[str, list[Any]] = {p: [] for p in want}
    ids = {catalog.by_path(p).id: p for p in want}
    for src in sources:
        src.start()  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + timeout_s
        while any(len(got[p]) < n for p, n in want.items()):
            assert time.monotonic() < deadline, {p: len(v) for p, v in got.items()}
            for src in sources:
                for batch in src.read(time.time_ns() + S):
                    for sid, column in batch.values.items():
                        if sid in ids:
                            got[ids[sid]] += column.tolist()
            time.sleep(0.05)
    finally:
        for src in sources:
            src.close()  # type: ignore[attr-defined]
    return got


@pytest.mark.parametrize("far_side", ["car"], indirect=True)
def test_the_car_reads_its_ecus_frames_and_obd_answers_that_follow_the_drive(far_side: FarSide) -> None:
    assert far_side.data == "simulated" and [s["kind"] for s in far_side.sources] == ["can", "can", "obd"]
    got = _values(far_side, {"Vehicle.Speed": 200, "Vehicle.OBD.Speed": 10, "Vehicle.OBD.EngineSpeed": 3,
                             "Vehicle.CurrentLocation.Latitude": 10, "Vehicle.CurrentLocation.Longitude": 10,
                             "Vehicle.VehicleIdentification.VIN": 2})  # fmt: skip
    # its GNSS fixes on the bus (a generated track in Mountain View) and its VIN asked again and again
    assert all(37.3 < v < 37.6 for v in got["Vehicle.CurrentLocation.Latitude"])
    assert all(-122.2 < v < -121.9 for v in got["Vehicle.CurrentLocation.Longitude"])
    assert set(got["Vehicle.VehicleIdentification.VIN"]) == {DEFAULT_VIN}
    can_speed = np.asarray(got["Vehicle.Speed"])
    obd_speed = np.asarray(got["Vehicle.OBD.Speed"])
    # the engine ECU reports the speed of the frames being played (whole km/h), not a curve of its own
    assert obd_speed.min() >= np.floor(can_speed.min()) - 1 and obd_speed.max() <= can_speed.max() + 1
    assert len(set(can_speed.tolist())) > 10


@pytest.mark.parametrize("far_side", ["plc"], indirect=True)
def test_the_gateway_polls_the_pump_over_modbus(far_side: FarSide) -> None:
    got = _values(far_side, {"Plant.Pump.Current": 8, "Plant.Pump.Voltage": 8, "Plant.Pump.Running": 8})
    assert all(0.0 < v < 10.0 for v in got["Plant.Pump.Current"])  # float32 ABCD words decoded as such
    assert all(150.0 < v < 300.0 for v in got["Plant.Pump.Voltage"])
    assert set(got["Plant.Pump.Running"]) <= {True, False}


@pytest.mark.parametrize("far_side", ["robot"], indirect=True)
def test_the_robots_controller_reaches_an_agent_that_starts_after_it(far_side: FarSide) -> None:
    time.sleep(0.5)  # the controller runs before the agent's socket exists, as after a reboot
    got = _values(far_side, {"Robot.IMU.Gyro.X": 200, "Robot.IMU.Accel.Z": 200})
    assert 0.5 < float(np.median(got["Robot.IMU.Accel.Z"])) < 1.5  # ~1 g lying flat


@pytest.mark.parametrize("far_side", ["hub"], indirect=True)
def test_the_hub_reads_zigbee2mqtt_devices_and_a_discovered_entity(far_side: FarSide) -> None:
    # at speed 4 the 30 s scene turns in 7.5 s: the kettle (announced through discovery) goes on once
    got = _values(
        far_side,
        {"Home.LivingRoom.Temperature": 5, "Home.Kitchen.Kettle.Power": 20, "Home.Kitchen.Kettle.On": 20},
    )
    assert max(got["Home.Kitchen.Kettle.Power"]) > 1500 and min(got["Home.Kitchen.Kettle.Power"]) < 5
    assert {True, False} <= set(got["Home.Kitchen.Kettle.On"])
    assert all(19.0 < v < 23.0 for v in got["Home.LivingRoom.Temperature"])


def test_the_hub_scene_fires_its_campaign_every_cycle() -> None:
    on = [
        t
        for t in np.arange(0, 2 * hub.SCENE_CYCLE_S, 0.5)
        if hub.scene_states(float(t))["kitchen_kettle_plug"]["power"] > 1500
    ]
    assert on and on[0] == hub.KETTLE_ON_S[0] and any(t >= hub.SCENE_CYCLE_S for t in on)
    assert "Home.Kitchen.Kettle.Power > 1500" in profiles.default_campaign("hub")


def test_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"machine kind must be one of .*, got 'boat'"):
        start_far_side("boat", tmp_path, recordings=None)
