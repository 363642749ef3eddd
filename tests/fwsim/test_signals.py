"""Generated signals and device profiles: real layouts, the recordings' catalog, campaigns that fire."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml

from fleetloop_agent.sources import CanReplaySource, build_source
from fleetloop_fwsim.profiles import KINDS, SIM_MAPPING, default_campaign, source_specs
from fleetloop_fwsim.signals import (
    IMU_HEADER,
    PUMP_HEADER,
    SIM_VEHICLE_DBC,
    generate_imu_csv,
    generate_pump_csv,
    generate_vehicle_can,
)
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.rules import check_against_catalog, parse_campaign
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000
START = 1_700_000_000 * S


@pytest.fixture(scope="module")
def simdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


def replay(
    kind: str, recordings: Path | None, workdir: Path, seconds: float = 60
) -> tuple[Catalog, list[GroupBatch], str]:
    specs, origin = source_specs(kind, recordings, workdir)
    assert len(specs) == 1 and specs[0]["origin"] == origin
    source = build_source(specs[0], base_dir=workdir, start_ns=START)
    catalog = Catalog()
    source.declare(catalog)
    return catalog, source.read(START + int(seconds * S)), origin


def series(
    catalog: Catalog, batches: list[GroupBatch], path: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[Any]]:
    """(seconds since start, values) of one signal."""
    sid = catalog.by_path(path).id
    (batch,) = [b for b in batches if sid in b.values]
    return (batch.t_ns - START) / 1e9, batch.values[sid]


def rising_edges(t: npt.NDArray[np.float64], condition: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Times where ``condition`` turns true after having been false (mode: rising)."""
    return t[1:][condition[1:] & ~condition[:-1]]


def car_fires(catalog: Catalog, batches: list[GroupBatch]) -> npt.NDArray[np.float64]:
    """``Vehicle.Speed > 40 and delta(Vehicle.Speed, 2s) < -3`` evaluated at every speed sample."""
    t, v = series(catalog, batches, "Vehicle.Speed")
    first = np.searchsorted(t, t - 2.0, side="left")
    return rising_edges(t, (v > 40) & (v - v[first] < -3))


def robot_fires(catalog: Catalog, batches: list[GroupBatch]) -> npt.NDArray[np.float64]:
    t, x = series(catalog, batches, "Robot.IMU.Gyro.X")
    _, y = series(catalog, batches, "Robot.IMU.Gyro.Y")
    _, z = series(catalog, batches, "Robot.IMU.Gyro.Z")
    return rising_edges(t, np.maximum(np.maximum(np.abs(x), np.abs(y)), np.abs(z)) > 90)


def plc_fires(catalog: Catalog, batches: list[GroupBatch]) -> npt.NDArray[np.float64]:
    t, current = series(catalog, batches, "Plant.Pump.Current")
    return rising_edges(t, current > 3.0)


FIRES = {"car": car_fires, "robot": robot_fires, "plc": plc_fires}


# -- vehicle CAN -------------------------------------------------------------------------------------------


def test_vehicle_can_has_the_comma_layout(simdir: Path) -> None:
    out = simdir / "layout"
    generate_vehicle_can(out)
    assert sorted(p.name for p in out.iterdir()) == ["address", "data", "src", "t"]
    t, address, src, data = (np.load(out / n) for n in ("t", "address", "src", "data"))
    assert (t.dtype, address.dtype, src.dtype, data.dtype) == (np.float64, np.int64, np.int64, np.dtype("S8"))
    assert len(t) == len(address) == len(src) == len(data)
    assert np.all(np.diff(t) >= 0) and np.all(src == 0)
    assert 59.9 < t[-1] - t[0] < 60.0
    rates = {int(a): int(np.sum(address == a)) / 60.0 for a in np.unique(address)}
    expected = {288: 100, 304: 80, 320: 50, 336: 50, 352: 50, 368: 100, 384: 50, 960: 10}
    assert rates == pytest.approx(expected, rel=0.01)
    steering = t[address == 288]
    jitter = np.diff(steering) - 0.010
    assert 0.00005 < jitter.std() < 0.0005 and np.abs(jitter).max() < 0.001


def test_vehicle_can_decodes_through_can_replay(simdir: Path) -> None:
    out = simdir / "decode"
    generate_vehicle_can(out)
    source = CanReplaySource(out, SIM_VEHICLE_DBC, start_ns=START, mapping=SIM_MAPPING, origin="simulated")
    catalog = Catalog()
    source.declare(catalog)
    batches = source.read(START + 60 * S - 1)
    assert source.decode_errors_total == 0 and source.skipped_frames_total == 0
    t, v = series(catalog, batches, "Vehicle.Speed")

    def at(when: float) -> float:
        return float(v[np.searchsorted(t, when)])

    assert at(1.0) == 0.0
    assert 58 < at(20.0) < 63  # cruising after pulling away
    assert 42 < at(31.0) < 47  # after the harsh brake
    assert at(59.0) == 0.0  # stopped again, so the loop seam is smooth
    tw, fl = series(catalog, batches, "Vehicle.Chassis.Axle.Row1.Wheel.Left.Speed")
    _, rr = series(catalog, batches, "Vehicle.Chassis.Axle.Row2.Wheel.Right.Speed")
    assert np.abs((fl + rr) / 2 - np.interp(tw, t, v)).max() < 1.5
    ts, angle = series(catalog, batches, "Vehicle.Chassis.SteeringWheel.Angle")
    assert 40 < angle[(ts > 35) & (ts < 37)].mean() < 50
    tb, pressed = series(catalog, batches, "Vehicle.Chassis.Brake.IsPressed")
    assert pressed.dtype == np.int64
    assert pressed[(tb > 29.2) & (tb < 30.2)].all() and not pressed[(tb > 15) & (tb < 28)].any()
    _, gear = series(catalog, batches, "Vehicle.Powertrain.Transmission.SelectedGear")
    assert set(gear.tolist()) == {0, 32}


def test_vehicle_generation_is_deterministic(simdir: Path) -> None:
    a, b, c = simdir / "a", simdir / "b", simdir / "c"
    generate_vehicle_can(a, seconds=5, seed=3)
    generate_vehicle_can(b, seconds=5, seed=3)
    generate_vehicle_can(c, seconds=5, seed=4)
    assert (a / "data").read_bytes() == (b / "data").read_bytes()
    assert (a / "t").read_bytes() == (b / "t").read_bytes()
    assert (a / "t").read_bytes() != (c / "t").read_bytes()


# -- IMU and pump CSV ----------------------------------------------------------------------------------------


def test_imu_csv_layout_and_physics(simdir: Path) -> None:
    path = simdir / "imu-layout.csv"
    generate_imu_csv(path, seconds=20)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(IMU_HEADER)
    rows = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    assert rows[0, 0] == 0.0 and np.median(np.diff(rows[:, 0])) == pytest.approx(0.01008, abs=1e-5)
    assert 1980 < len(rows) < 2000
    still = rows[rows[:, 0] < 10]
    assert np.linalg.norm(still[:, 4:7], axis=1) == pytest.approx(1.0, abs=0.02)  # gravity, in g
    assert np.abs(still[:, 1:4]).max() < 2  # deg/s of noise and bias at rest
    mag = np.linalg.norm(rows[:, 7:10], axis=1)
    assert mag == pytest.approx(np.linalg.norm([15.3, 0.4, -41.0]), abs=2.0)  # a rotation keeps |B|
    assert np.abs(rows[(rows[:, 0] > 12) & (rows[:, 0] < 13), 1]).max() > 140


def test_pump_csv_layout(simdir: Path) -> None:
    path = simdir / "pump-layout.csv"
    generate_pump_csv(path, seconds=600)
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n")  # CRLF like SKAB
    lines = raw.decode().splitlines()
    assert lines[0] == ";".join(PUMP_HEADER)
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(;-?[\d.]+(e-?\d+)?){8}", line) for line in lines[1:]
    )
    assert 570 < len(lines) - 1 < 600  # about one second in seventy is missing


# -- profiles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_default_campaign_fires_early_on_simulated_data(kind: str, simdir: Path) -> None:
    catalog, batches, origin = replay(kind, None, simdir / "profiles")
    assert origin == "simulated"
    fires = FIRES[kind](catalog, batches)
    assert fires.size and 2 < fires[0] < 40


@pytest.mark.parametrize("kind", KINDS)
def test_default_campaign_fires_early_on_real_data(kind: str, recordings: Path, tmp_path: Path) -> None:
    catalog, batches, origin = replay(kind, recordings, tmp_path)
    assert origin == "recordings"
    assert not list(tmp_path.iterdir())  # nothing generated when the recordings are there
    fires = FIRES[kind](catalog, batches)
    assert fires.size and 2 < fires[0] < 40


@pytest.mark.parametrize("kind", KINDS)
def test_real_and_simulated_catalogs_are_the_same(kind: str, recordings: Path, simdir: Path) -> None:
    real, _, _ = replay(kind, recordings, simdir / "profiles", seconds=0)
    simulated, _, _ = replay(kind, None, simdir / "profiles", seconds=0)
    assert real.to_records() == simulated.to_records()


def test_car_catalog_has_the_promised_paths(simdir: Path) -> None:
    catalog, _, _ = replay("car", None, simdir / "profiles", seconds=0)
    assert catalog.by_path("Vehicle.Speed").unit == "km/h"
    assert catalog.by_path("Vehicle.Chassis.SteeringWheel.Angle").unit == "deg"
    for row in (1, 2):
        for side in ("Left", "Right"):
            assert catalog.by_path(f"Vehicle.Chassis.Axle.Row{row}.Wheel.{side}.Speed").unit == "km/h"
    for path in (
        "Vehicle.Chassis.Brake.IsPressed",
        "Vehicle.Chassis.Accelerator.PedalPosition",
        "Vehicle.Powertrain.Transmission.SelectedGear",
    ):
        assert path in catalog


def test_real_file_headers_match_generated(recordings: Path) -> None:
    imu = (recordings / "xio-fusion-imu" / "sensor_data.csv").read_text().splitlines()[0]
    pump = (recordings / "skab" / "anomaly-free.csv").read_text().splitlines()[0]
    assert imu == ",".join(IMU_HEADER)
    assert pump == ";".join(PUMP_HEADER)


def test_simulated_files_are_generated_once(tmp_path: Path) -> None:
    specs, _ = source_specs("plc", None, tmp_path)
    path = Path(specs[0]["path"])
    assert path.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    source_specs("plc", None, tmp_path)
    assert path.stat().st_mtime_ns == stamp
    specs, _ = source_specs("car", None, tmp_path)
    assert sorted(p.name for p in Path(specs[0]["frames"]).iterdir()) == ["address", "data", "src", "t"]


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"device kind must be one of .*, got 'boat'"):
        source_specs("boat", None, Path("/nonexistent"))
    with pytest.raises(ConfigError, match="device kind must be one of"):
        default_campaign("boat")


@pytest.mark.parametrize("kind", KINDS)
def test_default_campaign_document(kind: str, simdir: Path) -> None:
    doc = yaml.safe_load(default_campaign(kind))
    assert doc["apiVersion"] == "fleetloop/v1" and doc["kind"] == "Campaign"
    assert doc["metadata"]["version"] == 1 and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["target"] == {"selector": f"kind={kind}"}
    assert spec["trigger"]["mode"] == "rising" and spec["trigger"]["min_interval"] == "10s"
    assert spec["collect"]["pre"] == "5s" and spec["collect"]["post"] == "2s"
    assert spec["upload"] == {"network": ["wifi", "cellular"]}
    assert 0 <= spec["priority"] <= 9
    catalog, _, _ = replay(kind, None, simdir / "profiles", seconds=0)
    # every signal the trigger reads exists, and every collect glob matches something
    for path in re.findall(r"[A-Z]\w*(?:\.\w+)+", spec["trigger"]["when"]):
        assert path in catalog
    for glob in spec["collect"]["signals"]:
        assert catalog.match([glob])
    # and the shared rule compiler (what the cloud validates and the agent runs) accepts it on this catalog
    check_against_catalog(parse_campaign(default_campaign(kind), f"{kind}.yaml"), catalog)
    if kind == "car":
        assert spec["trigger"]["when"] == "Vehicle.Speed > 40 and delta(Vehicle.Speed, 2s) < -3"
