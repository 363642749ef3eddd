"""The one reader of recordings: the rule for cells and times (as properties), every format's bad lines
named ``FILE:LINE``, and CAN payloads read whole (real comma2k19 frames, and generated ones)."""

from __future__ import annotations

import math
import os
import struct
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.recordings import (
    CanFrames,
    decode_frames,
    float_seconds_to_ns,
    parse_time,
    read_recording,
    read_wide_csv,
)
from fleetloop_agent.recordings.can_logs import read_asc, read_candump, read_gvret
from fleetloop_agent.recordings.cells import BOOL, FLOAT, INT, TEXT, WIDE_INT, classify, guess_time_unit
from fleetloop_agent.recordings.numpy_can import NumpyCanLog, read_numpy_can
from fleetloop_agent.recordings.tables import read_long_csv
from fleetloop_agent.sources import CanReplaySource
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError

SIM_DBC = (
    Path(__file__).resolve().parents[2] / "firmware-sim" / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc"
)
INT64 = st.integers(-(2**63), 2**63 - 1)


# -- times -------------------------------------------------------------------------------------------------


@given(INT64)
def test_whole_nanoseconds_and_their_seconds_text_read_back_exactly(ns: int) -> None:
    assert parse_time(str(ns), "ns") == ns
    sign, whole, frac = ("-" if ns < 0 else ""), abs(ns) // 10**9, abs(ns) % 10**9
    assert parse_time(f" {sign}{whole}.{frac:09d} ", "s") == ns
    if ns % 1000 == 0:
        assert parse_time(f"{sign}{abs(ns) // 1000}", "us") == ns


@given(st.decimals(min_value=-9e9, max_value=9e9, allow_nan=False, allow_infinity=False, places=12))
def test_decimal_seconds_round_to_the_nearest_nanosecond_ties_to_even(seconds: Decimal) -> None:
    exact = Fraction(seconds) * 10**9
    got = parse_time(str(seconds), "s")
    assert abs(Fraction(got) - exact) <= Fraction(1, 2)
    if abs(Fraction(got) - exact) == Fraction(1, 2):
        assert got % 2 == 0


@given(
    st.datetimes(min_value=datetime(1700, 1, 1), max_value=datetime(2200, 1, 1)),
    st.integers(0, 999),
    st.sampled_from(["", "Z", "+02:00", "-05:30"]),
    st.sampled_from(["T", " "]),
)
def test_iso_datetimes_keep_nanoseconds_and_their_offset(
    moment: datetime, ns: int, zone: str, sep: str
) -> None:
    text = moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + f".{moment.microsecond:06d}{ns:03d}" + zone
    offset = {
        "": timedelta(0),
        "Z": timedelta(0),
        "+02:00": timedelta(hours=2),
        "-05:30": -timedelta(hours=5.5),
    }
    aware = moment.replace(tzinfo=UTC) - offset[zone]
    expected = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000 + ns
    assert parse_time(text, "datetime") == expected


@pytest.mark.parametrize(
    ("text", "unit", "reason"),
    [
        ("1.5", "ns", "not a whole number of nanoseconds"),
        ("1e3", "ns", "not a whole number"),
        ("nan", "s", "not a number of seconds"),
        ("1_000", "s", "not a number of seconds"),
        ("9223372036.854775808", "s", "outside the int64"),
        ("1e40", "s", "outside the int64"),
        ("9" * 30, "ns", "outside the int64"),
        ("2020-13-01 00:00:00", "datetime", "not an ISO 8601"),
        ("yesterday", "datetime", "not an ISO 8601"),
    ],
)
def test_times_that_are_not_times_say_why(text: str, unit: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_time(text, unit)


def test_float_seconds_and_guessed_units() -> None:
    assert float_seconds_to_ns(np.array([0.1, 1.0000000005, -2.5])).tolist() == [
        100_000_000,
        1_000_000_000,
        -2_500_000_000,
    ]
    assert [guess_time_unit(h, c) for h, c in [("Time (s)", "0.5"), ("t_ns", "5"), ("time_us", "5")]] == [
        "s",
        "ns",
        "us",
    ]
    assert [guess_time_unit(h, c) for h, c in [("Stamp (ms)", "1"), ("datetime", "2020-02-08 13:30:47")]] == [
        "ms",
        "datetime",
    ]


# -- cells -------------------------------------------------------------------------------------------------


@given(INT64)
def test_integers_are_int64(n: int) -> None:
    assert classify(f" {n} ", False) == (INT, n)
    assert classify(str(n), True) == (TEXT, str(n))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_every_float_repr_reads_back_to_the_identical_double(x: float) -> None:
    kind, value = classify(repr(x), False)
    assert kind == FLOAT  # "1.0" too: a number with a point is never an integer
    assert (math.isnan(x) and math.isnan(value)) or struct.pack("<d", value) == struct.pack("<d", x)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_quoted_cells_are_text_verbatim_and_bare_ones_follow_the_rule(text: str) -> None:
    assert classify(text, True) == (TEXT, text)
    bare = text.strip()
    if not bare:
        with pytest.raises(ValueError, match="empty value"):
            classify(text, False)
        return
    kind, value = classify(text, False)
    if bare.lower() in ("true", "false"):
        assert (kind, value) == (BOOL, bare.lower() == "true")
    elif kind == TEXT:
        assert value == bare
    else:
        assert kind in (INT, FLOAT, WIDE_INT)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            INT64.map(str),
            st.floats(allow_nan=True).map(repr),
            st.sampled_from(["true", "FALSE", "eco", "1_000", "99999999999999999999", '"1.5"', '" x "']),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_long_and_a_wide_csv_of_the_same_cells_read_alike(tmp_path_factory: Any, cells: list[str]) -> None:
    """``rules test`` and ``store import`` read long CSVs, a device's csv_replay wide ones: the same cells
    make the same datatype and the same values, or the same error on the same line."""
    root = tmp_path_factory.mktemp("alike")
    long_csv, wide_csv = root / "long.csv", root / "wide.csv"
    long_csv.write_text("t,signal,value\n" + "".join(f"{i},x,{c}\n" for i, c in enumerate(cells)))
    wide_csv.write_text("t,x\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells)))
    outcomes = []
    for reader in (read_long_csv, read_wide_csv):
        try:
            recording = reader(long_csv if reader is read_long_csv else wide_csv)
        except ConfigError as exc:
            outcomes.append(("error", str(exc).split(":", 1)[1]))
            continue
        (group,) = recording.groups
        values = group.columns["x"]
        outcomes.append(
            (values.dtype.kind, [repr(v) for v in values.tolist()], [str(n) for n in recording.notes])
        )
    long_outcome, wide_outcome = outcomes
    if long_outcome[0] == "error":
        assert long_outcome == wide_outcome
    else:
        assert long_outcome[:2] == wide_outcome[:2]
        assert [n.split(":", 1)[1] for n in long_outcome[2]] == [n.split(":", 1)[1] for n in wide_outcome[2]]


def test_datatypes_from_cells_and_from_a_catalog(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text(
        "t_ns,signal,value\n1,b,TRUE\n2,b,false\n1,i,-7\n2,i,9223372036854775807\n1,f,1\n2,f,nan\n"
        '1,s,"1.5"\n2,s,eco\n1,m,1\n2,m,true\n'
    )
    recording = read_long_csv(path)
    columns = {name: values for g in recording.groups for name, values in g.columns.items()}
    assert columns["b"].tolist() == [True, False] and columns["i"].tolist() == [-7, 2**63 - 1]
    assert columns["f"].dtype == np.float64 and math.isnan(columns["f"][1])
    assert columns["s"].tolist() == ["1.5", "eco"] and columns["m"].tolist() == ["1", "true"]
    assert [str(n) for n in recording.notes] == [
        f"{path}:11: note: signal m has the true/false value 'true' (and '1' at line 10): all its values are "
        "read as strings"
    ]
    types = {"f": DataType.FLOAT64, "i": DataType.FLOAT64, "s": DataType.STRING}.get
    typed = read_long_csv(path, types=types)
    columns = {name: values for g in typed.groups for name, values in g.columns.items()}
    assert set(columns) == {"f", "i", "s"} and columns["i"].dtype == np.float64
    assert {n.signal for n in typed.notes} == {"b", "m"}
    with pytest.raises(
        ConfigError,
        match=r"l.csv:2: signal b is an integer in the catalog \(INT64\), the input has true/false",
    ):
        read_long_csv(path, types=lambda name: DataType.INT64)


# -- bad lines, every format -------------------------------------------------------------------------------

GVRET = "Time Stamp,ID,Extended,Bus,LEN,D1,D2\n"


@pytest.mark.parametrize(
    ("name", "content", "where", "reason"),
    [
        ("l.csv", "t,signal,value\n1,a,1\n2,a\n", 3, "expected 3 fields"),
        ("l.csv", "t,signal,value\n1,a,1\nx,a,2\n", 3, "time 'x' is not a number of seconds"),
        ("l.csv", 't,signal,value\n1,a,1\n2,a,"open\n', 3, "malformed CSV"),
        ("l.csv", 't,signal,value\n1,a,1\n2,a,x"y\n', 3, "malformed CSV"),
        ("l.csv", "t,signal,value\n1,a,1\n2, ,1\n", 3, "empty signal name"),
        ("l.csv", "t,signal,value\n1,a,1\n2,a,1\n\xff", 4, "not UTF-8"),
        ("l.csv", "t,signal,value\n1,a,1\n2,a,\x00\n", 3, "NUL byte"),
        ("w.csv", "time;x\n0;1\n1;\n", 3, "empty value"),
        ("w.csv", "time;x\n0;1\n-1;2\n", 3, "time goes backwards"),
        ("w.csv", "time;x\n0;1\n1;2;3\n", 3, "expected 2 fields, found 3"),
        ("w.csv", "time;x;x\n0;1;2\n", 1, "column 'x' appears twice"),
        ("w.csv", "time,x\n2020-01-01 00:00:00,1\n2020-01-01 00:00:01x,1\n", 3, "not an ISO 8601"),
        ("d.log", "(1.000000) can0 123#00\n(1.1) can0 123#0\n", 2, "not a candump frame line"),
        ("d.log", "(1.000000) can0 123#00\n(x) can0 123#00\n", 2, "not a candump frame line"),
        ("v.asc", "date x\nbase hex\n 0.1 1 123 Rx d 8 01 02\n", 3, "malformed ASC frame"),
        ("v.asc", " 0.1 1 123 Rx d 2 01 02\n 0.2 1 123 Rx d 2 01 0Z\n", 2, "malformed ASC frame"),
        ("g.csv", GVRET + "1,0AB,false,0,2,01\n", 2, "malformed GVRET row"),
        ("g.csv", GVRET + "1,0AB,false,0,2,01,02\nx,0AB,false,0,1,01\n", 3, "malformed GVRET row"),
    ],
)
def test_every_reader_names_the_file_and_line_of_a_bad_line(
    tmp_path: Path, name: str, content: str, where: int, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", errors="surrogateescape").replace(b"\xc3\xbf", b"\xff"))
    dbc = SIM_DBC if name.endswith((".log", ".asc")) or name.startswith("g") else None
    with pytest.raises(ConfigError) as info:
        read_recording(path, dbc=dbc)
    message = str(info.value)
    assert message.startswith(f"{path}:{where}: ") and reason in message and "\n" not in message, message


def test_good_text_logs_of_every_can_format_decode_alike(tmp_path: Path) -> None:
    db = load_dbc(SIM_DBC)
    frame = db.frame_id("SIM_VEHICLE_SPEED")
    speeds = [10.0, 20.5, 0.0]
    payloads = [db.encode("SIM_VEHICLE_SPEED", {"VEHICLE_SPEED": v}) for v in speeds]
    (tmp_path / "d.log").write_text(
        "".join(f"({1.5 + i:.6f}) can0 {frame:03X}#{p.hex()}\n" for i, p in enumerate(payloads)) + "\n"
    )
    (tmp_path / "v.asc").write_text(
        "date Thu, 09 Nov 2023\nbase hex  timestamps absolute\n// a comment\n"
        + "".join(
            f"   {1.5 + i:.6f} 0  {frame:X}\tRx   d {len(p)} {p.hex(' ').upper()}\n"
            for i, p in enumerate(payloads)
        )
        + "   2.0 0 ErrorFrame\nend triggerblock\n"
    )
    (tmp_path / "g.csv").write_text(
        "Time Stamp,ID,Extended,Bus,LEN,D1,D2,D3,D4,D5,D6,D7,D8\n"
        + "".join(
            f"{1_500_000 + i * 1_000_000},{frame:08X},false,0,{len(p)},{','.join(f'{b:02X}' for b in p)}\n"
            for i, p in enumerate(payloads)
        )
    )
    for name in ("d.log", "v.asc", "g.csv"):
        recording = read_recording(tmp_path / name, dbc=SIM_DBC)
        (group,) = recording.groups
        assert group.name == "can0/SIM_VEHICLE_SPEED", name
        assert group.t_ns.tolist() == [1_500_000_000, 2_500_000_000, 3_500_000_000], name
        assert group.columns["VEHICLE_SPEED"].tolist() == pytest.approx(speeds), name
    with pytest.raises(ConfigError, match="needs a DBC"):
        read_recording(tmp_path / "d.log")
    with pytest.raises(ConfigError, match="takes no DBC"):
        (tmp_path / "l.csv").write_text("t,signal,value\n1,a,1\n")
        read_recording(tmp_path / "l.csv", dbc=SIM_DBC)
    for frames in (
        read_candump(tmp_path / "d.log"),
        read_asc(tmp_path / "v.asc"),
        read_gvret(tmp_path / "g.csv"),
    ):
        assert frames.data == payloads


# -- CAN payloads read whole -------------------------------------------------------------------------------


def save_column(directory: Path, name: str, array: Any) -> None:
    np.save(directory / f"{name}.npy", np.asarray(array))
    os.replace(directory / f"{name}.npy", directory / name)


def test_payloads_ending_in_zero_bytes_are_whole_frames(tmp_path: Path) -> None:
    """Generated: ``|S8`` payloads whose last bytes are zero (a speed of 0, a counter at 0) decode as the
    8-byte frames they are, in the reader and in the agent's replay alike."""
    db = load_dbc(SIM_DBC)
    frame = db.frame_id("SIM_VEHICLE_SPEED")
    speeds = [0.0, 12.5, 0.0, 250.0, 0.0]
    payloads = [db.encode("SIM_VEHICLE_SPEED", {"VEHICLE_SPEED": v}) for v in speeds]
    assert any(p.endswith(b"\x00") for p in payloads)
    log = tmp_path / "raw_can"
    log.mkdir()
    n = len(speeds)
    save_column(log, "t", 100.0 + np.arange(n) * 0.01)
    save_column(log, "address", np.full(n, frame, dtype=np.int64))
    save_column(log, "src", np.zeros(n, dtype=np.int64))
    save_column(log, "data", np.array(payloads, dtype="S8"))
    frames = read_numpy_can(log)
    assert frames.data == payloads and all(len(p) == 8 for p in frames.data)
    recording = decode_frames(frames, {None: db})
    assert recording.frames_skipped == 0
    assert recording.groups[0].columns["VEHICLE_SPEED"].tolist() == pytest.approx(speeds)
    source = CanReplaySource(log, SIM_DBC, start_ns=0, mapping={"SIM_VEHICLE_SPEED.VEHICLE_SPEED": "V"})
    catalog = Catalog()
    source.declare(catalog)
    (batch,) = source.read(10**9)
    assert batch.values[catalog.by_path("V").id][:n].tolist() == pytest.approx(speeds)
    assert (batch.t_ns[:n] - batch.t_ns[0]).tolist() == (
        recording.groups[0].t_ns - recording.groups[0].t_ns[0]
    ).tolist()


def test_every_real_comma2k19_frame_of_a_dbc_message_decodes(recordings: Path) -> None:
    """On the real comma2k19 car bus every frame of a message the DBC describes decodes: ACCELEROMETER
    and GEAR_PACKET (which end in zero bytes) included, as many as the agent's own replay decodes."""
    raw = comma2k19_segment(recordings) / "processed_log" / "CAN" / "raw_can"
    dbc_path = recordings / "opendbc" / "toyota_rav4_2017_pt_generated.dbc"
    db = load_dbc(dbc_path)
    log = NumpyCanLog(raw)
    frames = log.frames()
    bus0 = frames.bus == 0
    known = np.isin(frames.frame_id, sorted(db.decoder(db.message_names()).frame_ids))
    recording = decode_frames(
        CanFrames(
            frames.t_ns[bus0],
            frames.bus[bus0],
            frames.frame_id[bus0],
            [d for d, b in zip(frames.data, bus0, strict=True) if b],
        ),
        {0: db},
    )
    assert recording.frames_skipped == int(np.sum(bus0 & ~known))
    rows = {g.name: len(g.t_ns) for g in recording.groups}
    for message in ("ACCELEROMETER", "GEAR_PACKET", "SPEED", "WHEEL_SPEEDS", "KINEMATICS"):
        assert rows[f"can0/{message}"] == int(np.sum(bus0 & (frames.frame_id == db.frame_id(message)))), (
            message
        )
    assert rows["can0/ACCELEROMETER"] > 2000 and rows["can0/GEAR_PACKET"] > 50
    source = CanReplaySource(raw, dbc_path, start_ns=0, include_unmapped=True, mapping={})
    source.declare(Catalog())
    assert {b.group: len(b) for b in source.read(log.t_last_ns - log.t0_ns)} == rows
