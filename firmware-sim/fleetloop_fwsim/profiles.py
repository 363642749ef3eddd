"""Device profiles: what a simulated car, robot or PLC gateway feeds its agent, and a campaign that suits it.

A profile yields the ``sources:`` entries of an agent config — replaying the real recordings when they
are there, generated stand-ins (:mod:`fleetloop_fwsim.signals`) otherwise. Either way a kind's signals
have the same catalog paths, units and datatypes, so one campaign runs unchanged on both. The car's paths
follow COVESA VSS where VSS has the signal; the recorded Toyota's brake pressure, pedal and gear codes
have no exact VSS equivalent, so they keep the car's own units (raw counts, fraction, Toyota gear codes),
and the simulated car reproduces those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import yaml

from fleetloop_fwsim.signals import (
    SIM_VEHICLE_DBC,
    generate_imu_csv,
    generate_pump_csv,
    generate_vehicle_can,
)
from fleetloop_shared.choices import check_choice
from fleetloop_shared.datapaths import comma2k19_segment

KINDS: Final = ("car", "robot", "plc")


def _wheel_speeds(message: str) -> dict[str, str]:
    """``message``'s four WHEEL_SPEED_FL/FR/RL/RR signals → the catalog's wheel speed paths."""
    return {
        f"{message}.WHEEL_SPEED_{axle}{side[0]}": f"Vehicle.Chassis.Axle.Row{row}.Wheel.{side}.Speed"
        for axle, row in (("F", 1), ("R", 2))
        for side in ("Left", "Right")
    }


#: The recorded Toyota RAV4 (opendbc ``toyota_rav4_2017_pt_generated.dbc``): MESSAGE.SIGNAL → catalog path.
TOYOTA_MAPPING: Final[dict[str, str]] = {
    "SPEED.SPEED": "Vehicle.Speed",
    **_wheel_speeds("WHEEL_SPEEDS"),
    "STEER_ANGLE_SENSOR.STEER_ANGLE": "Vehicle.Chassis.SteeringWheel.Angle",
    "BRAKE_MODULE.BRAKE_PRESSED": "Vehicle.Chassis.Brake.IsPressed",
    "BRAKE_MODULE.BRAKE_PRESSURE": "Vehicle.Chassis.Brake.PedalPressure",
    "GAS_PEDAL.GAS_PEDAL": "Vehicle.Chassis.Accelerator.PedalPosition",
    "GEAR_PACKET.GEAR": "Vehicle.Powertrain.Transmission.SelectedGear",
    "ENGINE_RPM.RPM": "Vehicle.Powertrain.CombustionEngine.Speed",
    "ACCELEROMETER.ACCEL_X": "Vehicle.Acceleration.Longitudinal",
    "KINEMATICS.ACCEL_Y": "Vehicle.Acceleration.Lateral",
    "KINEMATICS.YAW_RATE": "Vehicle.AngularVelocity.Yaw",
}

#: The simulated car (``data/sim_vehicle.dbc``): MESSAGE.SIGNAL → the same catalog paths.
SIM_MAPPING: Final[dict[str, str]] = {
    "SIM_VEHICLE_SPEED.VEHICLE_SPEED": "Vehicle.Speed",
    **_wheel_speeds("SIM_WHEEL_SPEEDS"),
    "SIM_STEERING.STEERING_ANGLE": "Vehicle.Chassis.SteeringWheel.Angle",
    "SIM_BRAKE.BRAKE_PRESSED": "Vehicle.Chassis.Brake.IsPressed",
    "SIM_BRAKE.BRAKE_PRESSURE": "Vehicle.Chassis.Brake.PedalPressure",
    "SIM_ACCEL_PEDAL.PEDAL_POSITION": "Vehicle.Chassis.Accelerator.PedalPosition",
    "SIM_TRANSMISSION.GEAR": "Vehicle.Powertrain.Transmission.SelectedGear",
    "SIM_ENGINE.ENGINE_SPEED": "Vehicle.Powertrain.CombustionEngine.Speed",
    "SIM_DYNAMICS.ACCEL_LONGITUDINAL": "Vehicle.Acceleration.Longitudinal",
    "SIM_DYNAMICS.ACCEL_LATERAL": "Vehicle.Acceleration.Lateral",
    "SIM_DYNAMICS.YAW_RATE": "Vehicle.AngularVelocity.Yaw",
}

#: x-io IMU columns → catalog path and unit.
IMU_COLUMNS: Final[dict[str, list[str]]] = (
    {f"Gyroscope {a} (deg/s)": [f"Robot.IMU.Gyro.{a}", "deg/s"] for a in "XYZ"}
    | {f"Accelerometer {a} (g)": [f"Robot.IMU.Accel.{a}", "g"] for a in "XYZ"}
    | {f"Magnetometer {a} (uT)": [f"Robot.IMU.Mag.{a}", "uT"] for a in "XYZ"}
)

#: SKAB pump columns → catalog path and unit (units as the SKAB test bed documents them).
PUMP_COLUMNS: Final[dict[str, list[str]]] = {
    "Accelerometer1RMS": ["Plant.Pump.Accelerometer1RMS", "g"],
    "Accelerometer2RMS": ["Plant.Pump.Accelerometer2RMS", "g"],
    "Current": ["Plant.Pump.Current", "A"],
    "Pressure": ["Plant.Pump.Pressure", "bar"],
    "Temperature": ["Plant.Pump.Temperature", "degC"],
    "Thermocouple": ["Plant.Pump.Thermocouple", "degC"],
    "Voltage": ["Plant.Pump.Voltage", "V"],
    "Volume Flow RateRMS": ["Plant.Pump.FlowRate", "l/min"],
}

_TRIGGERS: Final = {
    # Real drive: fires at ~24 s (SPEED 69.7 → 65.7 km/h) ; simulated: at ~29 s (harsh brake).
    "car": (
        "harsh-braking",
        "Vehicle.Speed > 40 and delta(Vehicle.Speed, 2s) < -3",
        8,
        ["Vehicle.Speed", "Vehicle.Chassis.*", "Vehicle.Acceleration.*", "Vehicle.AngularVelocity.*"],
    ),
    # Real IMU: first fast rotation at ~12 s (up to 155 deg/s); simulated: at ~12 s.
    # (the largest axis rate: the rule language's abs/max, no square root needed)
    "robot": (
        "fast-rotation",
        "max(abs(Robot.IMU.Gyro.X), abs(Robot.IMU.Gyro.Y), abs(Robot.IMU.Gyro.Z)) > 90",
        6,
        ["Robot.IMU.*"],
    ),
    # Real pump: 3.10 A at the 7th row; simulated: load surge at 20 s.
    "plc": ("pump-overcurrent", "Plant.Pump.Current > 3.0", 7, ["Plant.Pump.*"]),
    # A home hub (live zigbee2mqtt devices only, fleetloop_fwsim.hub): the kettle's plug draws 2.2 kW
    # for 4 s of every 30 s of its scene.
    "hub": ("kettle-on", "Home.Kitchen.Kettle.Power > 1500", 5, ["Home.*"]),
}


def _check_kind(kind: str) -> None:
    check_choice(kind, KINDS, "device kind")


def frames_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("t", "address", "src", "data"))


def source_specs(kind: str, recordings: Path | None, workdir: Path) -> tuple[list[dict[str, Any]], str]:
    """The ``sources:`` entries for a device of ``kind`` and where their data comes from.

    With ``recordings`` the real logs are replayed in place ("recordings"); without, stand-ins are
    generated into ``workdir`` once (kept for later runs) and replayed ("simulated").
    """
    _check_kind(kind)
    origin = "recordings" if recordings is not None else "simulated"
    workdir = Path(workdir)
    if kind == "car":
        if recordings is not None:
            frames = comma2k19_segment(Path(recordings)) / "processed_log" / "CAN" / "raw_can"
            dbc = Path(recordings) / "opendbc" / "toyota_rav4_2017_pt_generated.dbc"
            mapping = TOYOTA_MAPPING
        else:
            frames = workdir / "vehicle_can"
            if not frames_complete(frames):
                generate_vehicle_can(frames)
            dbc, mapping = SIM_VEHICLE_DBC, SIM_MAPPING
        spec: dict[str, Any] = {
            "kind": "can_replay",
            "name": "can0",
            "frames": str(frames),
            "dbc": str(dbc),
            "bus": 0,
            "mapping": dict(mapping),
            "origin": origin,
        }
        return [spec], origin
    csv = _CSV_REPLAYS[kind]
    if recordings is not None:
        path = Path(recordings) / csv.recording
    else:
        path = workdir / f"{csv.name}.csv"
        if not path.is_file():
            csv.generate(path)
    spec = {
        "kind": "csv_replay",
        "name": csv.name,
        "path": str(path),
        "time_column": csv.time_column,
        "time_format": csv.time_format,
        "delimiter": csv.delimiter,
        "group": csv.name,
        "columns": {k: list(v) for k, v in csv.columns.items()},
        "origin": origin,
    }
    return [spec], origin


class _CsvReplay(NamedTuple):
    """A device kind whose data is one CSV: a recording (under the recordings directory), or a stand-in
    that ``generate`` writes into the work directory as ``<name>.csv``; and how to read it."""

    name: str
    recording: str
    generate: Callable[[Path], object]
    time_column: str
    time_format: str
    delimiter: str
    columns: Mapping[str, Sequence[str]]


_CSV_REPLAYS: Final = {
    "robot": _CsvReplay(
        "imu", "xio-fusion-imu/sensor_data.csv", generate_imu_csv, "Time (s)", "seconds", ",", IMU_COLUMNS
    ),
    "plc": _CsvReplay(
        "pump", "skab/anomaly-free.csv", generate_pump_csv, "datetime", "datetime", ";", PUMP_COLUMNS
    ),
}


#: Decelerations beyond ~4.2 m/s²: the harsh brakes of :mod:`fleetloop_fwsim.vehicle`'s drive (17 km/h
#: lost within a second), not its ordinary brakes (12.6 km/h) — the campaign a signal gate counts.
HARD_BRAKING_WHEN: Final = "Vehicle.Speed > 40 and delta(Vehicle.Speed, 1s) < -15"


def hard_braking_campaign(name: str = "hard-braking", *, version: int = 1) -> str:
    """A campaign YAML for cars capturing only harsh brakes (one capture per brake): on a simulated car,
    15 per device-hour of driving on the default firmware, 4× that on ``harsh-braking`` firmware."""
    document = {
        "apiVersion": "fleetloop/v1",
        "kind": "Campaign",
        "metadata": {"name": name, "version": version},
        "spec": {
            "target": {"selector": "kind=car"},
            "trigger": {"when": HARD_BRAKING_WHEN, "mode": "rising", "min_interval": "10s"},
            "collect": {
                "signals": ["Vehicle.Speed", "Vehicle.Chassis.Brake.*", "Vehicle.Acceleration.Longitudinal"],
                "pre": "2s",
                "post": "2s",
            },
            "priority": 8,
            "upload": {"network": ["wifi", "cellular"]},
        },
    }
    return str(yaml.safe_dump(document, sort_keys=False, default_flow_style=False))


def default_campaign(
    kind: str, extra_signals: tuple[str, ...] = (), privacy: dict[str, Any] | None = None
) -> str:
    """A campaign YAML for ``kind`` that fires within the first ~40 s of its data, real or simulated;
    ``extra_signals``: more patterns to collect (a live car's OBD-II signals); ``privacy``: its
    ``spec.privacy`` (docs/privacy.md). Every kind with a trigger has one, the home hub too (it has no
    replay sources, so it is not one of :data:`KINDS`)."""
    check_choice(kind, _TRIGGERS, "device kind")
    name, when, priority, signals = _TRIGGERS[kind]
    signals = [*signals, *extra_signals]
    document: dict[str, Any] = {
        "apiVersion": "fleetloop/v1",
        "kind": "Campaign",
        "metadata": {"name": name, "version": 1},
        "spec": {
            "target": {"selector": f"kind={kind}"},
            "trigger": {"when": when, "mode": "rising", "min_interval": "10s"},
            "collect": {"signals": list(signals), "pre": "5s", "post": "2s"},
            "priority": priority,
            "upload": {"network": ["wifi", "cellular"]},
        },
    }
    if privacy is not None:
        document["spec"]["privacy"] = privacy
    return str(yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
