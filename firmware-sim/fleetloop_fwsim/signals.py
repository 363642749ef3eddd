"""Generated stand-ins for the real recordings, for a fresh clone without ``../shared/data/real``.

Each generator writes files in exactly the layout of the recording it replaces, so the agent replays them
through the same sources and the same configs (only the DBC and its mapping differ for the car):

* :func:`generate_vehicle_can` — comma2k19-style raw CAN (``t``, ``address``, ``src``, ``data`` numpy
  arrays without extension) from a small longitudinal/lateral vehicle model, encoded with our own
  ``data/sim_vehicle.dbc``;
* :func:`generate_imu_csv` — an x-io style 9-axis IMU log at 100 Hz;
* :func:`generate_pump_csv` — a SKAB style water-pump log at 1 Hz.

The scenarios are chosen so that each kind's default campaign fires within the first ~40 s, as it does on
the real data: a harsh brake from ~60 to ~45 km/h at ~29 s, fast rotations of the IMU from ~12 s, a
motor-current surge of the pump at ~20 s. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from fleetloop_shared.dbc import DbcDatabase, load_dbc

#: Our own DBC for the simulated car.
SIM_VEHICLE_DBC: Final = Path(__file__).resolve().parent / "data" / "sim_vehicle.dbc"
#: The vehicle scenario repeats with this period (it ends at standstill, where it starts).
VEHICLE_CYCLE_S: Final = 60.0
#: Boot-time clock value of the first frame, like a logger's monotonic clock.
BOOT_TIME_S: Final = 1000.0
#: Standard deviation of frame timing jitter.
JITTER_S: Final = 0.00015

WHEELBASE_M: Final = 2.7
TRACK_M: Final = 1.6
STEERING_RATIO: Final = 15.5

IMU_HEADER: Final = (
    "Time (s)",
    "Gyroscope X (deg/s)",
    "Gyroscope Y (deg/s)",
    "Gyroscope Z (deg/s)",
    "Accelerometer X (g)",
    "Accelerometer Y (g)",
    "Accelerometer Z (g)",
    "Magnetometer X (uT)",
    "Magnetometer Y (uT)",
    "Magnetometer Z (uT)",
)
#: SKAB anomaly-free columns (after ``datetime``), in file order.
SKAB_COLUMNS: Final = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
PUMP_HEADER: Final = ("datetime", *SKAB_COLUMNS)

FloatArray = npt.NDArray[np.float64]


# -- vehicle ---------------------------------------------------------------------------------------------

#: (from s, to s, longitudinal acceleration m/s²) within one cycle; elsewhere 0.
_ACCEL_PLAN: Final = (
    (2.0, 14.0, 1.4),  # pull away to ~60 km/h
    (29.0, 30.3, -3.5),  # harsh brake, ~60 -> ~44 km/h
    (44.0, 49.0, -0.3),  # coast down below 40 km/h
    (49.0, 60.0, -1.5),  # brake to a stop (speed is clipped at 0)
)
#: The brake of a cycle listed in ``harsh_brake_cycles``, instead of the one at 29 s above: about the same
#: speed lost (~60 -> ~43 km/h) in half the time, 17 km/h within one second — what a campaign like
#: ``delta(Vehicle.Speed, 1s) < -15`` catches and the ordinary brake (12.6 km/h in a second) does not.
HARSH_BRAKE: Final = (29.0, 29.6, -8.0)


def _smooth_window(t: FloatArray, start: float, end: float, ramp: float) -> FloatArray:
    """0 outside [start, end], 1 inside, with cosine ramps of ``ramp`` seconds at both ends."""
    up = np.clip((t - start) / ramp, 0.0, 1.0)
    down = np.clip((end - t) / ramp, 0.0, 1.0)
    return np.asarray(0.25 * (1 - np.cos(np.pi * up)) * (1 - np.cos(np.pi * down)), dtype=np.float64)


@dataclass(frozen=True)
class _VehicleState:
    """The vehicle's true state on a fine time grid (one cycle)."""

    t: FloatArray  # s within the cycle
    speed: FloatArray  # m/s
    accel: FloatArray  # m/s²
    steering: FloatArray  # steering wheel angle, deg, positive to the left

    @property
    def steering_rate(self) -> FloatArray:
        return np.asarray(np.gradient(self.steering, self.t), dtype=np.float64)

    @property
    def yaw(self) -> FloatArray:
        """Yaw rate, rad/s (a kinematic bicycle)."""
        road_wheel = np.radians(self.steering / STEERING_RATIO)
        return np.asarray(self.speed * np.tan(road_wheel) / WHEELBASE_M, dtype=np.float64)


@functools.lru_cache(maxsize=2)
def _vehicle_cycle(*, harsh_brake: bool = False, dt: float = 0.001) -> _VehicleState:
    t = np.arange(0.0, VEHICLE_CYCLE_S + dt, dt)
    accel = np.zeros_like(t)
    for start, end, a in _ACCEL_PLAN:
        if harsh_brake and start == HARSH_BRAKE[0]:
            start, end, a = HARSH_BRAKE
        accel[(t >= start) & (t < end)] = a
    cruise = (t >= 14.0) & (t < 29.0)
    accel[cruise] = 0.15 * np.sin(2 * np.pi * (t[cruise] - 14.0) / 7.5)
    speed = np.zeros_like(t)
    for i in range(1, t.size):  # integrate with a floor at standstill (a car does not roll backwards)
        speed[i] = max(speed[i - 1] + accel[i - 1] * dt, 0.0)
    accel = np.where((speed <= 0.0) & (accel < 0), 0.0, accel)
    lane_change = np.where((t >= 20.0) & (t < 23.0), 12.0 * np.sin(2 * np.pi * (t - 20.0) / 3.0), 0.0)
    curve = 45.0 * _smooth_window(t, 33.0, 39.0, 1.2)
    return _VehicleState(t, speed, accel, lane_change + curve)


def _frame_times(rng: np.random.Generator, period: float, phase: float, seconds: float) -> FloatArray:
    nominal = np.arange(phase, seconds, period)
    jitter = np.clip(rng.normal(0.0, JITTER_S, nominal.size), -3 * JITTER_S, 3 * JITTER_S)
    return np.asarray(np.sort(nominal + jitter), dtype=np.float64)


class _Drive:
    """Which cycle the car drives when: the ordinary one, or the harsh-brake one in the listed cycles."""

    def __init__(self, harsh_brake_cycles: Collection[int]) -> None:
        self.normal = _vehicle_cycle()
        self.harsh = _vehicle_cycle(harsh_brake=True) if harsh_brake_cycles else None
        self.harsh_cycles = np.array(sorted(set(harsh_brake_cycles)), dtype=np.int64)
        self._derived: dict[tuple[bool, str], FloatArray] = {}

    def _field(self, state: _VehicleState, harsh: bool, name: str) -> FloatArray:
        """A state field, derived ones (steering rate, yaw) computed once per drive."""
        key = (harsh, name)
        if key not in self._derived:
            self._derived[key] = np.asarray(getattr(state, name), dtype=np.float64)
        return self._derived[key]

    def sample(self, name: str, times: FloatArray) -> FloatArray:
        """State ``name`` (a :class:`_VehicleState` field) at frame ``times`` (s since the first cycle)."""
        within = np.mod(times, VEHICLE_CYCLE_S)
        normal = self._field(self.normal, False, name)
        values = np.asarray(np.interp(within, self.normal.t, normal), dtype=np.float64)
        if self.harsh is not None:
            harsh = np.isin(np.floor(times / VEHICLE_CYCLE_S).astype(np.int64), self.harsh_cycles)
            if harsh.any():
                values[harsh] = np.interp(within[harsh], self.harsh.t, self._field(self.harsh, True, name))
        return values


def generate_vehicle_can(
    out_dir: Path, *, seconds: float = 60, seed: int = 1, harsh_brake_cycles: Collection[int] = ()
) -> None:
    """Write ``seconds`` of simulated car bus to ``out_dir`` as comma-style ``t``, ``address``, ``src``,
    ``data`` arrays.

    Message rates are those of a real car: steering and body dynamics 100 Hz, wheel speeds 80 Hz, speed,
    brake, pedal and engine 50 Hz, transmission 10 Hz; each frame has a little timing jitter. The drive
    repeats every :data:`VEHICLE_CYCLE_S`; in the cycles numbered (from 0) in ``harsh_brake_cycles`` the
    brake at 29 s is :data:`HARSH_BRAKE` instead of the ordinary one.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    t, address, data = _vehicle_frames(float(seconds), seed, tuple(sorted(set(harsh_brake_cycles))))
    _write_frames(Path(out_dir), t, address, np.zeros(t.size, dtype=np.int64), data)


@functools.lru_cache(maxsize=8)
def _vehicle_frames(
    seconds: float, seed: int, harsh_brake_cycles: tuple[int, ...]
) -> tuple[FloatArray, npt.NDArray[np.int64], npt.NDArray[np.bytes_]]:
    """(times, addresses, payloads) of the bus, time-ordered; cached, as a fleet's cars share drives."""
    rng = np.random.default_rng(seed)
    dbc = load_dbc(SIM_VEHICLE_DBC)
    sample = _Drive(harsh_brake_cycles).sample

    def noisy(values: FloatArray, sigma: float) -> FloatArray:
        return np.asarray(values + rng.normal(0.0, sigma, values.size), dtype=np.float64)

    frames: list[tuple[FloatArray, int, list[bytes]]] = []

    def emit(
        message: str, period: float, phase: float, build: Callable[[FloatArray], list[dict[str, float]]]
    ) -> None:
        times = _frame_times(rng, period, phase, seconds)
        payloads = [dbc.encode(message, values) for values in build(times)]
        frames.append((times, dbc.frame_id(message), payloads))

    def steering(times: FloatArray) -> list[dict[str, float]]:
        angle = np.clip(noisy(sample("steering", times), 0.05), -780, 780)
        rate = np.clip(sample("steering_rate", times), -1500, 1500)
        return [
            {"STEERING_ANGLE": a, "STEERING_RATE": r, "ALIVE_COUNTER": k % 16}
            for k, (a, r) in enumerate(zip(angle.tolist(), rate.tolist(), strict=True))
        ]

    def wheel_speeds(times: FloatArray) -> list[dict[str, float]]:
        v_kmh = sample("speed", times) * 3.6
        yaw_kmh = sample("yaw", times) * (TRACK_M / 2) * 3.6
        moving = v_kmh > 0.05
        columns = {}
        for name, side, tyre in (("FL", -1, 1.002), ("FR", 1, 0.999), ("RL", -1, 1.001), ("RR", 1, 0.998)):
            wheel = np.where(moving, noisy(v_kmh * tyre + side * yaw_kmh, 0.03), 0.0)
            columns[f"WHEEL_SPEED_{name}"] = np.clip(wheel, 0.0, 320.0).tolist()
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]

    def vehicle_speed(times: FloatArray) -> list[dict[str, float]]:
        v_kmh = sample("speed", times) * 3.6
        shown = np.clip(np.where(v_kmh > 0.05, noisy(v_kmh, 0.02), 0.0), 0.0, 320.0)
        return [
            {"VEHICLE_SPEED": v, "STANDSTILL": float(v < 0.05), "ALIVE_COUNTER": k % 16}
            for k, v in enumerate(shown.tolist())
        ]

    def brake(times: FloatArray) -> list[dict[str, float]]:
        v = sample("speed", times)
        a = sample("accel", times)
        pressed = (a < -0.2) | (v < 0.01)
        pressure = np.where(v < 0.01, 600.0, np.maximum(-a, 0.0) * 450.0)
        pressure = np.where(pressed, np.clip(np.rint(noisy(pressure, 8.0)), 0, 4095), 0.0)
        return [
            {"BRAKE_PRESSED": float(p), "BRAKE_PRESSURE": q}
            for p, q in zip(pressed.tolist(), pressure.tolist(), strict=True)
        ]

    def accelerator(v: FloatArray, a: FloatArray) -> FloatArray:
        pedal = np.where(a > 0.05, 0.1 + 0.15 * a, np.where((a >= -0.05) & (v > 0.5), 0.12 + 0.2 * a, 0.0))
        return np.asarray(np.clip(pedal, 0.0, 1.0), dtype=np.float64)

    def pedal(times: FloatArray) -> list[dict[str, float]]:
        position = accelerator(sample("speed", times), sample("accel", times))
        return [{"PEDAL_POSITION": p} for p in position.tolist()]

    def dynamics(times: FloatArray) -> list[dict[str, float]]:
        v = sample("speed", times)
        yaw = sample("yaw", times)
        lon = np.clip(noisy(sample("accel", times), 0.04), -20, 20)
        lat = np.clip(noisy(v * yaw, 0.03), -20, 20)
        yaw_deg = np.clip(noisy(np.degrees(yaw), 0.05), -300, 300)
        return [
            {"ACCEL_LONGITUDINAL": x, "ACCEL_LATERAL": y, "YAW_RATE": z}
            for x, y, z in zip(lon.tolist(), lat.tolist(), yaw_deg.tolist(), strict=True)
        ]

    def engine(times: FloatArray) -> list[dict[str, float]]:
        v_kmh = sample("speed", times) * 3.6
        throttle = accelerator(sample("speed", times), sample("accel", times))
        # a crude automatic gearbox: rpm climbs with speed, drops at each upshift (every 25 km/h)
        within_gear = np.mod(v_kmh, 25.0) / 25.0
        rpm = 750.0 + 900.0 * within_gear * (v_kmh > 1.0) + 8.0 * v_kmh + 600.0 * throttle
        return [{"ENGINE_SPEED": r} for r in np.clip(noisy(rpm, 5.0), 0, 16000).tolist()]

    def transmission(times: FloatArray) -> list[dict[str, float]]:
        cycle_t = np.mod(times, VEHICLE_CYCLE_S)
        gear = np.where((cycle_t < 1.0) | (cycle_t >= 58.0), 32.0, 0.0)  # P at both ends, else D
        return [{"GEAR": g} for g in gear.tolist()]

    emit("SIM_STEERING", 0.010, 0.0011, steering)
    emit("SIM_WHEEL_SPEEDS", 0.0125, 0.0023, wheel_speeds)
    emit("SIM_VEHICLE_SPEED", 0.020, 0.0047, vehicle_speed)
    emit("SIM_BRAKE", 0.020, 0.0091, brake)
    emit("SIM_ACCEL_PEDAL", 0.020, 0.0133, pedal)
    emit("SIM_DYNAMICS", 0.010, 0.0057, dynamics)
    emit("SIM_ENGINE", 0.020, 0.0171, engine)
    emit("SIM_TRANSMISSION", 0.100, 0.0419, transmission)

    t = np.concatenate([f[0] for f in frames])
    address = np.concatenate([np.full(f[0].size, f[1], dtype=np.int64) for f in frames])
    data = np.array([p for f in frames for p in f[2]], dtype="S8")
    order = np.argsort(t, kind="stable")
    t, address, data = np.clip(t[order], 0.0, None) + BOOT_TIME_S, address[order], data[order]
    for array in (t, address, data):
        array.flags.writeable = False  # shared by every caller of the cache
    return t, address, data


def _write_frames(
    out_dir: Path,
    t: FloatArray,
    address: npt.NDArray[np.int64],
    src: npt.NDArray[np.int64],
    data: npt.NDArray[np.bytes_],
) -> None:
    """np.save each column, then rename it to drop the ``.npy`` extension (the real layout)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in (("t", t), ("address", address), ("src", src), ("data", data)):
        staged = out_dir / f".{name}.tmp.npy"
        np.save(staged, array)
        os.replace(staged, out_dir / name)


def vehicle_dbc() -> DbcDatabase:
    """The simulated car's DBC, parsed."""
    return load_dbc(SIM_VEHICLE_DBC)


# -- IMU -------------------------------------------------------------------------------------------------

#: (start s, axis, peak deg/s, duration s): there-and-back rotations (a full sine of angular rate, so
#: the orientation returns to where it was).
_IMU_MOVES: Final = (
    (12.0, 0, 150.0, 1.0),
    (20.5, 1, 220.0, 0.8),
    (27.0, 2, 120.0, 1.5),
    (34.0, 0, -180.0, 0.8),
    (45.0, 2, 160.0, 1.2),
    (52.0, 1, -130.0, 1.0),
)
_IMU_CYCLE_S: Final = 60.0
_MAG_WORLD_UT: Final = (15.3, 0.4, -41.0)


def _rotation(axis_angle: FloatArray) -> FloatArray:
    """Rotation matrix of a rotation vector (Rodrigues)."""
    angle = float(np.linalg.norm(axis_angle))
    if angle < 1e-12:
        return np.eye(3)
    k = axis_angle / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.asarray(np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * (kx @ kx), dtype=np.float64)


def generate_imu_csv(path: Path, *, seconds: float = 60, seed: int = 1) -> None:
    """Write ``seconds`` of a 9-axis IMU at ~100 Hz (gyro deg/s, accel g, mag µT), x-io's CSV layout."""
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    rng = np.random.default_rng(seed)
    steps = np.full(int(seconds * 100) + 1, 0.01008)
    steps[0] = 0.0
    t = np.cumsum(steps + np.concatenate(([0.0], rng.normal(0.0, 2e-6, steps.size - 1))))
    t = t[t <= seconds]
    cycle_t = np.mod(t, _IMU_CYCLE_S)
    rate = np.zeros((t.size, 3))
    for start, axis, peak, duration in _IMU_MOVES:
        inside = (cycle_t >= start) & (cycle_t < start + duration)
        rate[inside, axis] += peak * np.sin(2 * np.pi * (cycle_t[inside] - start) / duration)
    orientation = np.eye(3)  # body -> world
    gravity_body = np.empty((t.size, 3))
    mag_body = np.empty((t.size, 3))
    up = np.array([0.0, 0.0, 1.0])
    mag_world = np.array(_MAG_WORLD_UT)
    for i in range(t.size):
        if i:
            orientation = orientation @ _rotation(np.radians(rate[i - 1]) * (t[i] - t[i - 1]))
        gravity_body[i] = orientation.T @ up
        mag_body[i] = orientation.T @ mag_world
    gyro = rate + np.array([0.02, -0.15, 0.10]) + rng.normal(0.0, 0.12, rate.shape)
    # the sensor sits off the rotation axis: a fast turn adds a little centripetal acceleration
    accel = gravity_body + 0.002 * np.abs(rate)[:, [1, 2, 0]] ** 0.5 + rng.normal(0.0, 0.002, rate.shape)
    mag = mag_body + rng.normal(0.0, 0.25, rate.shape)
    lines = [",".join(IMU_HEADER)]
    for i in range(t.size):
        fields = [f"{t[i]:.9g}"] + [f"{x:.7g}" for x in (*gyro[i], *accel[i], *mag[i])]
        lines.append(",".join(fields))
    _write_text(Path(path), "\n".join(lines) + "\n")


# -- pump ------------------------------------------------------------------------------------------------

_PUMP_START: Final = datetime(2024, 3, 4, 8, 0, 0)
_PRESSURE_STEP: Final = 0.327927  # the pressure transmitter's resolution, as in SKAB
_PRESSURE_BASE: Final = 0.054711
#: Load surges: first one ``_SURGE_FIRST_S`` after start, then every ``_SURGE_EVERY_S``.
_SURGE_FIRST_S: Final = 20
_SURGE_EVERY_S: Final = 300
_SURGE_LENGTH_S: Final = 4


def generate_pump_csv(path: Path, *, seconds: float = 3600, seed: int = 1) -> None:
    """Write ``seconds`` of a water pump test bed at 1 Hz in SKAB's layout (``;``-separated, CRLF,
    ``datetime`` column, about one second in seventy missing as in the real log)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    rng = np.random.default_rng(seed)
    t = np.arange(0, int(seconds), dtype=np.int64)
    keep = rng.random(t.size) > 1 / 70
    keep[:2] = True
    t = t[keep]
    n = t.size
    surge = (t >= _SURGE_FIRST_S) & ((t - _SURGE_FIRST_S) % _SURGE_EVERY_S < _SURGE_LENGTH_S)
    current = np.clip(rng.normal(2.45, 0.22, n), 1.0, 2.95)
    current = np.where(surge, rng.normal(3.25, 0.05, n), current)
    level = rng.choice([-1, 0, 0, 0, 0, 1], size=n) + np.where(surge, 2, 0)
    pressure = _PRESSURE_BASE + _PRESSURE_STEP * level
    accel1 = rng.normal(0.211, 0.004, n) + np.where(surge, 0.01, 0.0)
    accel2 = rng.normal(0.268, 0.002, n)
    temperature = 89.5 + 1.5 * np.sin(2 * np.pi * t / 3600.0) + rng.normal(0.0, 0.05, n)
    thermocouple = 26.85 + 2.5 * (1 - np.exp(-t / 2400.0)) + rng.normal(0.0, 0.005, n)
    voltage = rng.normal(229.0, 9.0, n)
    flow = rng.normal(125.0, 1.5, n) - np.where(surge, 3.0, 0.0)
    lines = [";".join(PUMP_HEADER)]
    for i in range(n):
        stamp = (_PUMP_START + timedelta(seconds=int(t[i]))).strftime("%Y-%m-%d %H:%M:%S")
        values = (
            accel1[i],
            accel2[i],
            current[i],
            pressure[i],
            temperature[i],
            thermocouple[i],
            voltage[i],
            flow[i],
        )
        lines.append(";".join([stamp, *(f"{v:.6g}" for v in values)]))
    _write_text(Path(path), "\r\n".join(lines) + "\r\n")


def _write_text(path: Path, text: str) -> None:
    """Write atomically, so a reader never sees half a recording."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    with staged.open("w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(staged, path)
