"""Robot recordings (MCAP of ROS 2 messages, ROS 1 bag, ROS 2 bag) written by the real libraries from the
x-io IMU rows, read back by the one reader and replayed as a looping source."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetloop_agent.recordings import read_recording
from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.ros_replay import RosReplaySource
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.errors import ConfigError
from tests.agent.robot_logs import T0_NS, G, imu_rows, write_bag, write_mcap

S = 1_000_000_000
START = 1_800_000_000 * S


@pytest.fixture(scope="module")
def rows() -> list[tuple[int, tuple[float, ...]]]:
    return imu_rows(find_recordings(), n=300)


@pytest.fixture(scope="module", params=["mcap", "ros1", "ros2"])
def log_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rows: Any) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "mcap":
        return write_mcap(d / "walk.mcap", rows)
    if request.param == "ros1":
        return write_bag(d / "walk.bag", rows, ros2=False)
    return write_bag(d / "walk", rows, ros2=True)


def test_the_one_reader_gives_each_topic_as_a_group_of_fields(log_path: Path, rows: Any) -> None:
    rec = read_recording(log_path)
    groups = {g.name: g for g in rec.groups}
    assert set(groups) == {"/imu", "/mode"}
    imu = groups["/imu"]
    assert imu.t_ns.tolist() == [t for t, _ in rows]
    accel_z = [v[5] * G for _, v in rows]
    assert imu.columns["linear_acceleration.z"].tolist() == pytest.approx(accel_z, rel=1e-12)
    gyro_x = [v[0] * math.pi / 180 for _, v in rows]
    assert imu.columns["angular_velocity.x"].tolist() == pytest.approx(gyro_x, rel=1e-12)
    assert imu.columns["orientation_covariance[8]"].dtype == np.float64
    assert imu.columns["header.frame_id"].tolist()[0] == "imu_link"
    assert rec.path(imu, "linear_acceleration.z") == "/imu/linear_acceleration.z"
    assert groups["/mode"].columns["data"].tolist()[:3] == ["stand", "walk", "stand"]


def test_replay_loops_the_mapped_fields_with_their_recorded_timing(log_path: Path, rows: Any) -> None:
    spec = {
        "kind": "ros_replay",
        "name": "robot",
        "path": str(log_path),
        "mapping": {
            "/imu.linear_acceleration.x": ["Robot.Imu.Acceleration.X", "m/s^2"],
            "/imu.linear_acceleration.z": ["Robot.Imu.Acceleration.Z", "m/s^2"],
            "/mode.data": "Robot.Mode",
        },
    }
    src = build_source(spec, base_dir=log_path.parent, start_ns=START)
    assert isinstance(src, RosReplaySource)
    catalog = Catalog()
    src.declare(catalog)
    assert catalog.by_path("Robot.Mode").data_type is DataType.STRING
    assert catalog.by_path("Robot.Imu.Acceleration.Z").unit == "m/s^2"
    duration = rows[-1][0] - rows[0][0]
    first = {b.group: b for b in src.read(START + duration)}
    imu = first["robot/imu"]
    assert imu.t_ns.tolist() == [START + t - T0_NS for t, _ in rows]
    assert set(imu.values) == {
        catalog.by_path(p).id for p in ("Robot.Imu.Acceleration.X", "Robot.Imu.Acceleration.Z")
    }
    second = {b.group: b for b in src.read(START + 2 * duration + S)}
    again = second["robot/imu"]
    assert len(again) > len(rows) and int(again.t_ns[0]) > int(imu.t_ns[-1])  # looped, later in time
    z = catalog.by_path("Robot.Imu.Acceleration.Z").id
    assert again.values[z][: len(rows)].tolist() == imu.values[z].tolist()
    step = int(again.t_ns[0]) - int(imu.t_ns[-1])  # one sample period between loops, as on a live bus
    assert 0 < step <= 2 * int(np.median(np.diff(imu.t_ns)))
    assert second["robot/mode"].values[catalog.by_path("Robot.Mode").id].tolist()[:2] == ["stand", "walk"]


def test_mistakes_in_a_robot_replay_are_named(tmp_path: Path, rows: Any) -> None:
    path = write_mcap(tmp_path / "r.mcap", rows[:20])

    def build(mapping: dict[str, Any]) -> None:
        spec = {"kind": "ros_replay", "name": "r", "path": str(path), "mapping": mapping}
        build_source(spec, base_dir=tmp_path, start_ns=0)

    with pytest.raises(ConfigError, match=r"has no topic '/lidar' \(topics: /imu, /mode\)"):
        build({"/lidar.range": "R"})
    with pytest.raises(ConfigError, match=r"topic /imu has no field 'linear_acceleration\.w'"):
        build({"/imu.linear_acceleration.w": "W"})
    with pytest.raises(ConfigError, match=r"expected TOPIC\.FIELD"):
        build({"imu": "W"})
    with pytest.raises(ConfigError, match="maps no field"):
        build({})
    corrupt = tmp_path / "cut.mcap"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ConfigError, match=f"{corrupt}: not a readable MCAP file"):
        read_recording(corrupt)
    garbage = tmp_path / "junk.bag"
    garbage.write_bytes(b"#ROSBAG V2.0\n" + bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a readable ROS bag"):
        read_recording(garbage)
