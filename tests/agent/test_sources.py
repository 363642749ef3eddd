"""Signal sources: CAN and CSV replay on the real recordings, looping, bounded backlog, hostile input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.recordings import float_seconds_to_ns
from fleetloop_agent.sources import CanReplaySource, CsvReplaySource, SignalSource, build_source
from fleetloop_agent.sources.base import MAX_BACKLOG_NS, ReplayCursor
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch

SIM_DBC = (
    Path(__file__).resolve().parents[2] / "firmware-sim" / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc"
)
S = 1_000_000_000
START = 1_700_000_000 * S

TOYOTA = "toyota_rav4_2017_pt_generated.dbc"
WHEELS = {
    "WHEEL_SPEEDS.WHEEL_SPEED_FL": "Vehicle.Chassis.Axle.Row1.Wheel.Left.Speed",
    "WHEEL_SPEEDS.WHEEL_SPEED_FR": "Vehicle.Chassis.Axle.Row1.Wheel.Right.Speed",
    "WHEEL_SPEEDS.WHEEL_SPEED_RL": "Vehicle.Chassis.Axle.Row2.Wheel.Left.Speed",
    "WHEEL_SPEEDS.WHEEL_SPEED_RR": "Vehicle.Chassis.Axle.Row2.Wheel.Right.Speed",
}
CAR_MAPPING = {
    "SPEED.SPEED": "Vehicle.Speed",
    "STEER_ANGLE_SENSOR.STEER_ANGLE": "Vehicle.Chassis.SteeringWheel.Angle",
    "BRAKE_MODULE.BRAKE_PRESSED": "Vehicle.Chassis.Brake.IsPressed",
    **WHEELS,
}


def by_group(batches: list[GroupBatch]) -> dict[str, GroupBatch]:
    groups = [b.group for b in batches]
    assert len(groups) == len(set(groups)), "one batch per group"
    return {b.group: b for b in batches}


def column(batch: GroupBatch, catalog: Catalog, path: str) -> npt.NDArray[Any]:
    return batch.values[catalog.by_path(path).id]


# -- real comma2k19 CAN ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comma(recordings: Path) -> dict[str, Any]:
    segment = comma2k19_segment(recordings)
    can = segment / "processed_log" / "CAN"
    source = CanReplaySource(
        can / "raw_can", recordings / "opendbc" / TOYOTA, start_ns=START, mapping=CAR_MAPPING
    )
    catalog = Catalog()
    source.declare(catalog)
    batches = by_group(source.read(START + 60 * S))
    t_raw = np.load(can / "raw_can" / "t")
    return {
        "can": can,
        "source": source,
        "catalog": catalog,
        "batches": batches,
        "t0": float(t_raw[0]),
        "duration": float(t_raw[-1] - t_raw[0]),
        "t_raw": t_raw,
    }


def _data_ns(t: npt.NDArray[np.float64], t0: float) -> npt.NDArray[np.int64]:
    # the one rule for float seconds: each time rounded to the nearest ns, then made relative
    return START + float_seconds_to_ns(t) - float_seconds_to_ns(t0)


def test_catalog_declaration(comma: dict[str, Any]) -> None:
    catalog: Catalog = comma["catalog"]
    assert catalog.by_path("Vehicle.Speed").data_type is DataType.FLOAT64
    assert catalog.by_path("Vehicle.Speed").unit == "km/h"
    assert catalog.by_path("Vehicle.Chassis.SteeringWheel.Angle").unit == "deg"
    assert catalog.by_path("Vehicle.Chassis.Brake.IsPressed").data_type is DataType.INT64
    assert len(catalog) == len(CAR_MAPPING)
    assert set(comma["batches"]) == {
        "can0/SPEED",
        "can0/WHEEL_SPEEDS",
        "can0/STEER_ANGLE_SENSOR",
        "can0/BRAKE_MODULE",
    }
    assert isinstance(comma["source"], SignalSource)
    assert comma["source"].alive() and comma["source"].origin == "recordings"


def test_wheel_speeds_match_commas_decode(comma: dict[str, Any]) -> None:
    can, catalog, t0 = comma["can"], comma["catalog"], comma["t0"]
    batch: GroupBatch = comma["batches"]["can0/WHEEL_SPEEDS"]
    comma_t = np.load(can / "wheel_speed" / "t")
    comma_v = np.load(can / "wheel_speed" / "value") * 3.6  # m/s -> km/h, columns FL FR RL RR
    n = comma_t.size
    assert np.array_equal(batch.t_ns[:n], _data_ns(comma_t, t0))
    ours = np.stack([column(batch, catalog, p)[:n] for p in WHEELS.values()], axis=1)
    assert np.abs(ours - comma_v).max() < 0.01


def test_speed_matches_commas_speed(comma: dict[str, Any]) -> None:
    """comma's processed ``speed`` is the mean of the four wheel speeds at the WHEEL_SPEEDS frame times;
    the car's own ``SPEED`` frame (Vehicle.Speed) is the speedometer value, ~2 % above it and sent at half
    the rate."""
    can, catalog, t0 = comma["can"], comma["catalog"], comma["t0"]
    comma_t = np.load(can / "speed" / "t")
    comma_kmh = np.load(can / "speed" / "value")[:, 0] * 3.6
    n = comma_t.size
    wheels: GroupBatch = comma["batches"]["can0/WHEEL_SPEEDS"]
    assert np.array_equal(wheels.t_ns[:n], _data_ns(comma_t, t0))
    mean = np.mean([column(wheels, catalog, p)[:n] for p in WHEELS.values()], axis=0)
    assert np.abs(mean - comma_kmh).max() < 0.1
    speed: GroupBatch = comma["batches"]["can0/SPEED"]
    shown = column(speed, catalog, "Vehicle.Speed")
    held = np.searchsorted(speed.t_ns, _data_ns(comma_t, t0), side="right") - 1
    ok = held >= 0
    ratio = shown[held[ok]] / comma_kmh[ok]
    assert 1.01 < np.median(ratio) < 1.03
    assert np.percentile(np.abs(shown[held[ok]] - comma_kmh[ok]), 90) < 2.0
    assert 29 < shown[0] < 30 and 70 < shown.max() < 75


def test_steering_matches_commas_decode(comma: dict[str, Any]) -> None:
    can, catalog, t0 = comma["can"], comma["catalog"], comma["t0"]
    batch: GroupBatch = comma["batches"]["can0/STEER_ANGLE_SENSOR"]
    comma_t = np.load(can / "steering_angle" / "t")
    comma_deg = np.load(can / "steering_angle" / "value").ravel()
    n = comma_t.size
    assert np.array_equal(batch.t_ns[:n], _data_ns(comma_t, t0))
    # comma adds STEER_FRACTION (±0.7°) to the 1.5° STEER_ANGLE steps
    assert np.abs(column(batch, catalog, "Vehicle.Chassis.SteeringWheel.Angle")[:n] - comma_deg).max() <= 0.75


def test_only_mapped_messages_and_bus(comma: dict[str, Any], recordings: Path) -> None:
    t_raw, t0 = comma["t_raw"], comma["t0"]
    raw = comma["can"] / "raw_can"
    address, src = np.load(raw / "address"), np.load(raw / "src")
    for group, frame_id in (("can0/SPEED", 0xB4), ("can0/BRAKE_MODULE", 0x224)):
        expected = _data_ns(t_raw[(address == frame_id) & (src == 0)], t0)
        got = comma["batches"][group].t_ns
        assert np.array_equal(got[: expected.size], expected)
        assert np.all(got[expected.size :] > START + 59 * S)  # the rest is the next loop's start
    # bus 1 (radar) carries 0x224 too, but none of the other mapped ids
    radar = CanReplaySource(raw, recordings / "opendbc" / TOYOTA, start_ns=START, bus=1, mapping=CAR_MAPPING)
    radar.declare(Catalog())
    (brake,) = radar.read(START + 5 * S)
    expected = _data_ns(t_raw[(address == 0x224) & (src == 1)], t0)
    assert brake.group == "can0/BRAKE_MODULE"
    assert np.array_equal(brake.t_ns, expected[expected <= START + 5 * S])


def test_include_unmapped(recordings: Path, comma: dict[str, Any]) -> None:
    source = CanReplaySource(
        comma["can"] / "raw_can",
        recordings / "opendbc" / TOYOTA,
        start_ns=START,
        mapping={"SPEED.SPEED": "Vehicle.Speed"},
        include_unmapped=True,
        name="pt",
    )
    catalog = Catalog()
    source.declare(catalog)
    assert "Vehicle.Speed" in catalog and "CAN.SPEED.SPEED" not in catalog
    assert "CAN.SPEED.CHECKSUM" in catalog and "CAN.WHEEL_SPEEDS.WHEEL_SPEED_FL" in catalog
    batches = by_group(source.read(START + 2 * S))
    assert {"pt/SPEED", "pt/WHEEL_SPEEDS", "pt/ENGINE_RPM"} <= set(batches)
    rpm = column(batches["pt/ENGINE_RPM"], catalog, "CAN.ENGINE_RPM.RPM")
    assert rpm.min() > 900 and rpm.max() < 2600
    assert source.decode_errors_total == 0


def test_incremental_reads_equal_one_read(comma: dict[str, Any], recordings: Path) -> None:
    source = CanReplaySource(
        comma["can"] / "raw_can", recordings / "opendbc" / TOYOTA, start_ns=START, mapping=CAR_MAPPING
    )
    source.declare(Catalog())
    pieces: dict[str, list[GroupBatch]] = {}
    now = START - S
    while now < START + 60 * S:
        for batch in source.read(now):
            assert len(batch) > 0
            pieces.setdefault(batch.group, []).append(batch)
        now += 373_000_000
    for batch in source.read(START + 60 * S):
        pieces.setdefault(batch.group, []).append(batch)
    whole: dict[str, GroupBatch] = comma["batches"]
    assert set(pieces) == set(whole)
    for group, parts in pieces.items():
        t = np.concatenate([p.t_ns for p in parts])
        assert np.array_equal(t, whole[group].t_ns)
        for sid, values in whole[group].values.items():
            assert np.array_equal(np.concatenate([p.values[sid] for p in parts]), values)


def declared_speed_source(comma: dict[str, Any], recordings: Path) -> CanReplaySource:
    """The recorded drive's CAN replayed from its start with only the speed mapped, declared."""
    source = CanReplaySource(
        comma["can"] / "raw_can",
        recordings / "opendbc" / TOYOTA,
        start_ns=START,
        mapping={"SPEED.SPEED": "Vehicle.Speed"},
    )
    source.declare(Catalog())
    return source


def test_recording_loops_forever(comma: dict[str, Any], recordings: Path) -> None:
    source = declared_speed_source(comma, recordings)
    first = by_group(source.read(START + 59 * S))["can0/SPEED"]
    rest = by_group(source.read(START + 200 * S))["can0/SPEED"]
    t = np.concatenate([first.t_ns, rest.t_ns])
    assert np.all(np.diff(t) > 0)
    raw = comma["can"] / "raw_can"
    n = int(np.sum((np.load(raw / "address") == 0xB4) & (np.load(raw / "src") == 0)))  # frames per loop
    assert n == 2487
    # every loop is the same recording shifted by one period: duration + one median frame interval
    periods = t[n : 2 * n] - t[:n]
    assert np.all(periods == periods[0])
    assert 0 < periods[0] - round(comma["duration"] * 1e9) < 1_000_000
    assert np.array_equal(t[2 * n : 3 * n] - t[n : 2 * n], periods)
    values = np.concatenate([first.values[1], rest.values[1]])
    assert np.array_equal(values[n : 2 * n], values[:n])
    assert t[-1] <= START + 200 * S < t[-1] + S
    assert source.dropped_total == 0


def test_backlog_is_bounded_drop_oldest(comma: dict[str, Any], recordings: Path) -> None:
    source = declared_speed_source(comma, recordings)
    until = START + 3600 * S
    speed = by_group(source.read(until))["can0/SPEED"]
    assert speed.t_ns[0] >= until - MAX_BACKLOG_NS
    assert speed.t_ns[-1] <= until
    assert len(speed) == pytest.approx(MAX_BACKLOG_NS / S * 41.5, rel=0.02)
    assert source.dropped_total > 50 * 135_000
    after = by_group(source.read(until + 10 * S))["can0/SPEED"]
    assert speed.t_ns[-1] < after.t_ns[0] and after.t_ns[-1] <= until + 10 * S


def test_read_before_declare_and_bad_mapping(comma: dict[str, Any], recordings: Path) -> None:
    raw, dbc = comma["can"] / "raw_can", recordings / "opendbc" / TOYOTA
    source = CanReplaySource(raw, dbc, start_ns=START, mapping={"SPEED.SPEED": "Vehicle.Speed"})
    with pytest.raises(StateError, match="before declare"):
        source.read(START)
    for mapping, reason in (
        ({"SPEED.NOPE": "x"}, "has no signal 'NOPE'"),
        ({"NOPE.SPEED": "x"}, "has no message 'NOPE'"),
        ({"SPEED": "x"}, "expected MESSAGE.SIGNAL"),
        ({"SPEED.SPEED": "x", "SPEED.ENCODER": "x"}, "target of two keys"),
    ):
        with pytest.raises(ConfigError, match=reason):
            CanReplaySource(raw, dbc, start_ns=START, mapping=mapping)


# -- synthetic CAN logs: hostile files and payloads ----------------------------------------------------


def save_column(directory: Path, name: str, array: npt.NDArray[Any]) -> None:
    np.save(directory / f"{name}.npy", array, allow_pickle=array.dtype.hasobject)
    os.replace(directory / f"{name}.npy", directory / name)


def write_log(directory: Path, t: Any, address: Any, data: Any, src: Any = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    columns = {"t": np.asarray(t), "address": np.asarray(address), "data": np.asarray(data)}
    columns["src"] = np.zeros(len(columns["t"]), dtype=np.int64) if src is None else np.asarray(src)
    for name, array in columns.items():
        save_column(directory, name, array)
    return directory


def speed_log(directory: Path, n: int = 200, period: float = 0.02) -> Path:
    db = load_dbc(SIM_DBC)
    speeds = np.linspace(10, 60, n)
    payloads = [db.encode("SIM_VEHICLE_SPEED", {"VEHICLE_SPEED": float(v)}) for v in speeds]
    return write_log(directory, 5.0 + np.arange(n) * period, np.full(n, 320), np.array(payloads, dtype="S8"))


SIM_SPEED = {"SIM_VEHICLE_SPEED.VEHICLE_SPEED": "Vehicle.Speed"}


def test_malformed_payloads_do_not_crash(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    ids = rng.choice([288, 304, 320, 336, 352, 368, 384, 960, 7], size=n)
    # two-byte payloads: every frame of an 8-byte message is malformed
    short = write_log(
        tmp_path / "short", np.arange(n) * 0.001, ids, rng.integers(0, 256, (n, 2), dtype=np.uint8)
    )
    source = CanReplaySource(short, SIM_DBC, start_ns=0, include_unmapped=True)
    source.declare(Catalog())
    assert source.read(10 * S) == []
    # 3 s loops: three whole loops, then the 4th loop's frames at 9.000 .. 10.000 s
    assert source.decode_errors_total == int(np.sum(ids != 7)) * 3 + int(np.sum(ids[:1001] != 7))
    assert source.alive()
    # random full-length payloads decode to (garbage) values without error
    noise = write_log(
        tmp_path / "noise", np.arange(n) * 0.001, ids, rng.integers(0, 256, (n, 8), dtype=np.uint8)
    )
    source = CanReplaySource(noise, SIM_DBC, start_ns=0, include_unmapped=True)
    catalog = Catalog()
    source.declare(catalog)
    batches = source.read(2 * S)
    assert sum(len(b) for b in batches) == int(np.sum(ids[:2001] != 7))
    assert source.decode_errors_total == 0


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: save_column(d, "t", np.array([object()] * 3)), "refused|not a numpy"),
        (lambda d: (d / "t").write_bytes(b"\x93NUMPY garbage"), "not a numpy array file"),
        (lambda d: (d / "t").write_bytes((d / "t").read_bytes()[:-100]), "truncated"),
        (lambda d: (d / "address").unlink(), "column missing"),
        (
            lambda d: (
                write_log(d, [1.0, 2.0], [1, 2], np.zeros((2, 8), np.uint8)) and (d / "src").write_bytes(b"")
            ),
            "not a numpy array file",
        ),
        (
            lambda d: write_log(d, [1.0, 3.0, 2.0], [1, 2, 3], np.zeros((3, 8), np.uint8)),
            "time goes backwards",
        ),
        (lambda d: write_log(d, [1.0, np.nan], [1, 2], np.zeros((2, 8), np.uint8)), "unusable|not finite"),
        (lambda d: write_log(d, [1.0, 2.0], [1, 2], np.zeros((2, 70), np.uint8)), "payload width"),
        (lambda d: write_log(d, [1.0, 2.0], [1.0, 2.0], np.zeros((2, 8), np.uint8)), "unexpected dtype"),
        (lambda d: write_log(d, [], np.zeros(0, np.int64), np.zeros((0, 8), np.uint8)), "no frames"),
        (lambda d: save_column(d, "src", np.arange(3)), "differ in length"),
    ],
)
def test_hostile_frame_files_are_config_errors(tmp_path: Path, mutate: Any, reason: str) -> None:
    log = speed_log(tmp_path / "log")
    mutate(log)
    with pytest.raises(ConfigError, match=reason):
        CanReplaySource(log, SIM_DBC, start_ns=0, mapping=SIM_SPEED)


def test_vanished_log_makes_source_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fleetloop_agent.sources.can_replay as can_replay

    monkeypatch.setattr(can_replay, "CHUNK_FRAMES", 64)
    log = speed_log(tmp_path / "log")
    source = CanReplaySource(log, SIM_DBC, start_ns=0, mapping=SIM_SPEED)
    source.declare(Catalog())
    assert len(source.read(S // 2)[0]) == 26  # frames at 0, 20 ms, ... 500 ms
    (log / "data").unlink()
    assert source.read(10 * S) == []
    assert not source.alive()
    assert source.failure is not None and "data" in source.failure
    assert source.read(20 * S) == []


def test_tiny_recording_loops_at_bounded_rate(tmp_path: Path) -> None:
    log = speed_log(tmp_path / "log", n=1)
    source = CanReplaySource(log, SIM_DBC, start_ns=0, mapping=SIM_SPEED)
    source.declare(Catalog())
    (batch,) = source.read(10 * S)
    assert len(batch) == 11  # one frame per loop, loops padded to 1 s (the fallback period)
    assert np.all(np.diff(batch.t_ns) == S)


# -- the looping cursor, as a property --------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    reads=st.lists(st.integers(-100, 4000), min_size=1, max_size=12),
    step=st.integers(1, 9),
    backlog=st.integers(200, 3000),
)
def test_cursor_delivers_each_record_once_in_order(
    gaps: list[int], reads: list[int], step: int, backlog: int
) -> None:
    rel = np.cumsum(np.array([0, *gaps[1:]], dtype=np.int64))
    period = max(int(rel[-1]) + 7, 1)
    cursor = ReplayCursor(len(rel), 1000, period, max_backlog_ns=backlog)

    def times(lo: int, hi: int) -> npt.NDArray[np.int64]:
        assert (0 <= lo <= hi <= len(rel) and lo // step == (hi - 1) // step) or hi == lo
        return rel[lo:hi]

    delivered: list[int] = []
    until = 1000
    for inc in reads:
        until += inc
        for span in cursor.advance(until, times, step):
            assert 0 <= span.lo < span.hi <= len(rel)
            delivered.extend((span.offset_ns + rel[span.lo : span.hi]).tolist())
    # strictly ordered by (loop, index): data times never go backwards, nothing delivered twice
    assert delivered == sorted(delivered)
    final = 1000 + int(np.cumsum(reads).max())
    everything = [1000 + loop * period + int(r) for loop in range(final // period + 2) for r in rel]
    expected = [x for x in everything if x <= final]
    assert set(delivered) <= set(expected)
    missing = len(expected) - len(delivered)
    assert missing == cursor.dropped_total
    if cursor.dropped_total == 0:
        assert delivered == expected


# -- CSV replay --------------------------------------------------------------------------------------------

IMU_COLUMNS = {
    "Gyroscope X (deg/s)": ("Robot.IMU.Gyro.X", "deg/s"),
    "Accelerometer Z (g)": ("Robot.IMU.Accel.Z", "g"),
}


def test_imu_csv_real(recordings: Path) -> None:
    path = recordings / "xio-fusion-imu" / "sensor_data.csv"
    source = CsvReplaySource(
        path,
        start_ns=START,
        time_column="Time (s)",
        time_format="seconds",
        columns=IMU_COLUMNS,
        group="imu",
        name="imu",
    )
    catalog = Catalog()
    source.declare(catalog)
    assert catalog.by_path("Robot.IMU.Gyro.X").unit == "deg/s"
    (batch,) = source.read(START + 10_078_907)
    assert batch.group == "imu"
    assert batch.t_ns.tolist() == [START, START + 10_078_907]
    assert column(batch, catalog, "Robot.IMU.Gyro.X").tolist() == [0.01644619, 0.01654156]
    assert column(batch, catalog, "Robot.IMU.Accel.Z").tolist() == [0.9970807, 0.9990417]
    (rest,) = source.read(START + 300 * S)
    t = np.concatenate([batch.t_ns, rest.t_ns])
    assert np.all(np.diff(t) > 0)
    rows = 13514
    # second loop starts one median period (~10.08 ms) after the last row at 135.3266420 s
    assert t[rows] - START - round(135.326642 * 1e9) == pytest.approx(10_079_380, abs=2000)
    assert np.array_equal(
        np.concatenate([batch.values[1], rest.values[1]])[rows : 2 * rows],
        np.concatenate([batch.values[1], rest.values[1]])[:rows],
    )
    assert source.alive()


def test_pump_csv_real(recordings: Path) -> None:
    path = recordings / "skab" / "anomaly-free.csv"
    source = CsvReplaySource(
        path,
        start_ns=START,
        time_column="datetime",
        time_format="datetime",
        delimiter=";",
        columns={
            "Current": ("Plant.Pump.Current", "A"),
            "Volume Flow RateRMS": ("Plant.Pump.FlowRate", "l/min"),
        },
        group="pump",
        name="pump",
    )
    catalog = Catalog()
    source.declare(catalog)
    (batch,) = source.read(START + 10 * S)
    # 13:30:47, :48, then :50 (the log skips :49)
    assert ((batch.t_ns[:4] - START) // S).tolist() == [0, 1, 3, 4]
    assert column(batch, catalog, "Plant.Pump.Current")[:3].tolist() == [2.16975, 2.07999, 2.52577]
    assert column(batch, catalog, "Plant.Pump.FlowRate")[0] == 122.664


@pytest.mark.parametrize(
    ("content", "kwargs", "reason"),
    [
        ("a,b\n1,2\n", {}, r"no column 'Time \(s\)'"),
        ("Time (s),x\n0,1\n0.1,\n", {}, r":3: empty value"),
        ("Time (s),x\n0,1\n-1,2\n", {}, r":3: time goes backwards"),
        ("Time (s),x\n0,1\nyesterday,2\n", {}, r":3: column 'Time \(s\)': time 'yesterday' is not a number"),
        ("Time (s),x\n0,1\n1,2,3\n", {}, r":3: expected 2 fields, found 3"),
        ("Time (s),x\n", {}, "no data rows"),
        ("", {}, "empty file"),
        ("Time (s),x\n0,1\n", {"time_format": "weeks"}, "time_format must be one of"),
        ("Time (s),x\n0,1\n", {"delimiter": ";;"}, "delimiter must be one character"),
        ("Time (s),x\n0,\x001\n", {}, "NUL"),
    ],
)
def test_bad_csv_is_config_error(tmp_path: Path, content: str, kwargs: dict[str, Any], reason: str) -> None:
    path = tmp_path / "x.csv"
    path.write_text(content)
    args: dict[str, Any] = {"time_column": "Time (s)", "time_format": "seconds", "columns": {"x": ("X", "")}}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=reason):
        CsvReplaySource(path, start_ns=0, **args)


def test_csv_not_utf8_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"Time (s),x\n0,1\n\xff\xfe,2\n")
    cols = {"x": ("X", "")}
    with pytest.raises(ConfigError, match=r"x.csv:3: not UTF-8"):
        CsvReplaySource(path, start_ns=0, time_column="Time (s)", time_format="seconds", columns=cols)
    with pytest.raises(ConfigError, match="file not found"):
        CsvReplaySource(
            tmp_path / "no.csv", start_ns=0, time_column="Time (s)", time_format="seconds", columns=cols
        )


def test_csv_read_before_declare(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("t,x\n0,1\n")
    source = CsvReplaySource(
        path, start_ns=0, time_column="t", time_format="seconds", columns={"x": ("X", "")}
    )
    with pytest.raises(StateError):
        source.read(0)


# -- build_source --------------------------------------------------------------------------------------------


def test_build_sources_with_relative_paths(tmp_path: Path) -> None:
    speed_log(tmp_path / "frames")
    (tmp_path / "dbc").mkdir()
    (tmp_path / "dbc" / "car.dbc").write_bytes(SIM_DBC.read_bytes())
    (tmp_path / "imu.csv").write_text("Time (s),g\n0,1.5\n0.01,2.5\n")
    can = build_source(
        {
            "kind": "can_replay",
            "name": "can1",
            "frames": "frames",
            "dbc": "dbc/car.dbc",
            "bus": 0,
            "mapping": SIM_SPEED,
            "origin": "simulated",
        },
        base_dir=tmp_path,
        start_ns=START,
    )
    assert isinstance(can, CanReplaySource) and can.name == "can1" and can.origin == "simulated"
    csv = build_source(
        {
            "kind": "csv_replay",
            "name": "imu",
            "path": "imu.csv",
            "time_column": "Time (s)",
            "time_format": "seconds",
            "columns": {"g": ["Robot.G", "deg/s"]},
        },
        base_dir=tmp_path,
        start_ns=START,
    )
    catalog = Catalog()
    can.declare(catalog)
    csv.declare(catalog)
    assert [s.path for s in catalog] == ["Vehicle.Speed", "Robot.G"]
    (imu,) = csv.read(START + S // 20)
    assert imu.group == "imu" and imu.values[2].tolist() == [1.5, 2.5]
    (speed,) = can.read(START + S)
    assert speed.group == "can1/SIM_VEHICLE_SPEED" and len(speed) == 51


def refusal(spec: dict[str, Any], change: dict[str, Any], base_dir: Path) -> str:
    """Why ``build_source`` refuses ``spec`` with ``change`` applied (a None value removes the key)."""
    changed = {**spec, **change}
    for key in [key for key, value in change.items() if value is None]:
        del changed[key]
    with pytest.raises(ConfigError) as info:
        build_source(changed, base_dir=base_dir, start_ns=0)
    return str(info.value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kind": None}, "source 'c': missing key 'kind'"),
        ({"kind": "modbus"}, "source 'c': key 'kind': must be one of can_replay, csv_replay"),
        ({"name": None}, "source: missing key 'name'"),
        ({"frames": None}, "source 'c': missing key 'frames'"),
        ({"frames": "nowhere"}, "source 'c': key 'frames': directory not found"),
        ({"dbc": "nowhere.dbc"}, "source 'c': key 'dbc': file not found"),
        ({"bus": "zero"}, "source 'c': key 'bus': expected a non-negative integer"),
        ({"bus": True}, "source 'c': key 'bus'"),
        ({"mapping": ["SPEED"]}, "source 'c': key 'mapping': expected a mapping"),
        ({"mapping": {"SIM_VEHICLE_SPEED.VEHICLE_SPEED": 3}}, "source 'c': key 'mapping': entries must be"),
        ({"mapping": {"SIM_VEHICLE_SPEED.NOPE": "x"}}, "source 'c': mapping key 'SIM_VEHICLE_SPEED.NOPE'"),
        ({"mapping": {}}, "source 'c': key 'mapping': maps no signal"),
        ({"include_unmapped": "yes"}, "source 'c': key 'include_unmapped': expected true or false"),
        ({"origin": "dreamt"}, "source 'c': key 'origin': must be one of recordings, simulated"),
        ({"colour": "red"}, "source 'c': unknown key 'colour'"),
    ],
)
def test_bad_can_spec(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    speed_log(tmp_path / "frames")
    spec: dict[str, Any] = {
        "kind": "can_replay",
        "name": "c",
        "frames": "frames",
        "dbc": str(SIM_DBC),
        "mapping": SIM_SPEED,
    }
    assert refusal(spec, change, tmp_path).startswith(reason)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"path": "missing.csv"}, "source 'p': key 'path': file not found"),
        ({"time_column": None}, "source 'p': missing key 'time_column'"),
        ({"time_format": "ms"}, "source 'p': key 'time_format': must be one of seconds, datetime"),
        ({"columns": {"x": "X"}}, "source 'p': key 'columns': entry 'x' must be [catalog.path, unit]"),
        ({"columns": {}}, "source 'p': key 'columns': maps no column"),
        ({"delimiter": ";;"}, "source 'p': key 'delimiter': expected one character"),
        ({"columns": {"nope": ["X", ""]}}, "source 'p': "),
        ({"time_column": "t"}, "source 'p': "),
    ],
)
def test_bad_csv_spec(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    (tmp_path / "p.csv").write_text("datetime;x\n2020-02-08 13:30:47;1\n")
    spec: dict[str, Any] = {
        "kind": "csv_replay",
        "name": "p",
        "path": "p.csv",
        "time_column": "datetime",
        "time_format": "datetime",
        "delimiter": ";",
        "columns": {"x": ["X", ""]},
    }
    build_source(dict(spec), base_dir=tmp_path, start_ns=0)  # the unchanged spec is fine
    message = refusal(spec, change, tmp_path)
    assert message.startswith(reason)
    assert "\n" not in message


def test_spec_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="each entry must be a mapping"):
        build_source(["can_replay"], base_dir=tmp_path, start_ns=0)  # type: ignore[arg-type]
