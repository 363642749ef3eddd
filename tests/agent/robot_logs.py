"""Small robot recordings written by the real libraries (mcap-ros2-support, rosbags) for the tests.

The IMU rows come from the x-io recording when it is there, else are generated; each writer stores
``sensor_msgs/msg/Imu`` on ``/imu`` and ``std_msgs/msg/String`` on ``/mode`` (every 10th row).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from rosbags.typesys import Stores, get_typestore

G = 9.80665
T0_NS = 1_700_000_000_000_000_000


def imu_rows(recordings: Path | None, n: int = 200) -> list[tuple[int, tuple[float, ...]]]:
    """(t_ns, gyro x y z deg/s, accel x y z g) rows."""
    rows = []
    if recordings is not None:
        with (recordings / "xio-fusion-imu" / "sensor_data.csv").open(newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            for r, _ in zip(reader, range(n), strict=False):
                rows.append((T0_NS + round(float(r[0]) * 1e9), tuple(float(x) for x in r[1:7])))
        return rows
    for i in range(n):
        rows.append((T0_NS + i * 10_000_000, (math.sin(i / 9), 0.1, -0.2, 0.0, 0.01 * i % 1, 1.0)))
    return rows


def _imu(ts: Any, t_ns: int, v: tuple[float, ...], *, ros1: bool = False) -> Any:
    Imu = ts.types["sensor_msgs/msg/Imu"]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    Quaternion = ts.types["geometry_msgs/msg/Quaternion"]
    Vector3 = ts.types["geometry_msgs/msg/Vector3"]
    import numpy as np

    rad = math.pi / 180
    return Imu(
        header=Header(
            **({"seq": 0} if ros1 else {}),
            stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9),
            frame_id="imu_link",
        ),
        orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0),
        orientation_covariance=np.zeros(9),
        angular_velocity=Vector3(x=v[0] * rad, y=v[1] * rad, z=v[2] * rad),
        angular_velocity_covariance=np.zeros(9),
        linear_acceleration=Vector3(x=v[3] * G, y=v[4] * G, z=v[5] * G),
        linear_acceleration_covariance=np.zeros(9),
    )


def write_mcap(path: Path, rows: list[tuple[int, tuple[float, ...]]]) -> Path:
    from mcap_ros2.writer import Writer

    ts = get_typestore(Stores.ROS2_HUMBLE)
    rad = math.pi / 180
    with path.open("wb") as fh:
        writer = Writer(fh)
        imu = writer.register_msgdef(
            "sensor_msgs/msg/Imu", ts.generate_msgdef("sensor_msgs/msg/Imu", ros_version=2)[0]
        )
        mode = writer.register_msgdef("std_msgs/msg/String", "string data\n")
        for i, (t_ns, v) in enumerate(rows):
            msg = {
                "header": {"stamp": {"sec": t_ns // 10**9, "nanosec": t_ns % 10**9}, "frame_id": "imu_link"},
                "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0},
                "orientation_covariance": [0.0] * 9,
                "angular_velocity": {"x": v[0] * rad, "y": v[1] * rad, "z": v[2] * rad},
                "angular_velocity_covariance": [0.0] * 9,
                "linear_acceleration": {"x": v[3] * G, "y": v[4] * G, "z": v[5] * G},
                "linear_acceleration_covariance": [0.0] * 9,
            }
            writer.write_message("/imu", imu, msg, log_time=t_ns, publish_time=t_ns)
            if i % 10 == 0:
                writer.write_message("/mode", mode, {"data": "walk" if i % 20 else "stand"}, log_time=t_ns)
        writer.finish()
    return path


def write_bag(path: Path, rows: list[tuple[int, tuple[float, ...]]], *, ros2: bool) -> Path:
    """A ROS 2 bag directory (``ros2``) or a ROS 1 ``.bag`` file with the same messages."""
    String = "std_msgs/msg/String"
    if ros2:
        from rosbags.rosbag2 import Writer as Writer2

        ts = get_typestore(Stores.ROS2_HUMBLE)
        writer2 = Writer2(path, version=8)
        with writer2:
            imu = writer2.add_connection("/imu", "sensor_msgs/msg/Imu", typestore=ts)
            mode = writer2.add_connection("/mode", String, typestore=ts)
            for i, (t_ns, v) in enumerate(rows):
                writer2.write(imu, t_ns, ts.serialize_cdr(_imu(ts, t_ns, v), "sensor_msgs/msg/Imu"))
                if i % 10 == 0:
                    msg = ts.types[String](data="walk" if i % 20 else "stand")
                    writer2.write(mode, t_ns, ts.serialize_cdr(msg, String))
        return path
    from rosbags.rosbag1 import Writer as Writer1

    ts = get_typestore(Stores.ROS1_NOETIC)
    with Writer1(path) as writer1:
        imu1 = writer1.add_connection("/imu", "sensor_msgs/msg/Imu", typestore=ts)
        mode1 = writer1.add_connection("/mode", String, typestore=ts)
        for i, (t_ns, v) in enumerate(rows):
            msg1 = _imu(ts, t_ns, v, ros1=True)
            writer1.write(imu1, t_ns, ts.serialize_ros1(msg1, "sensor_msgs/msg/Imu"))
            if i % 10 == 0:
                writer1.write(
                    mode1,
                    t_ns,
                    ts.serialize_ros1(ts.types[String](data="walk" if i % 20 else "stand"), String),
                )
    return path
