"""The DBC adapter: lenient loading, decoding that never raises on outside bytes, encoding for the sim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_shared.dbc import MAX_DBC_BYTES, DbcDatabase, load_dbc
from fleetloop_shared.errors import ConfigError

SIM_DBC = (
    Path(__file__).resolve().parents[2] / "firmware-sim" / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc"
)

# A community-style DBC: no BS_: and no BU_: section, so NS_ would swallow the first BO_.
NO_SECTIONS_DBC = """VERSION ""

NS_ :
    NS_DESC_
    CM_

BO_ 256 MOTOR: 8 XXX
 SG_ RPM : 0|16@1+ (0.5,0) [0|30000] "rpm" XXX
 SG_ MODE : 16|4@1+ (1,0) [0|15] "" XXX
 SG_ TORQUE : 24|16@1- (2,0) [-60000|60000] "Nm" XXX
 SG_ TEMP : 40|8@1+ (1,-40.5) [-40|215] "degC" XXX

BO_ 257 DOOR: 2 XXX
 SG_ OPEN : 0|1@1+ (1,0) [0|1] "" XXX
"""


@pytest.fixture(scope="module")
def sim_db() -> DbcDatabase:
    return load_dbc(SIM_DBC)


def _write(tmp_path: Path, text: str, name: str = "x.dbc") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_sections_are_inserted(tmp_path: Path) -> None:
    db = load_dbc(_write(tmp_path, NO_SECTIONS_DBC))
    assert db.message_names() == ["MOTOR", "DOOR"]
    assert db.frame_id("DOOR") == 257
    # integer scale 2 stays INT64, fractional scale or offset needs FLOAT64
    assert db.signals_of("MOTOR") == [
        ("RPM", "rpm", True),
        ("MODE", "", False),
        ("TORQUE", "Nm", False),
        ("TEMP", "degC", True),
    ]


def test_only_bu_missing(tmp_path: Path) -> None:
    text = NO_SECTIONS_DBC.replace("BO_ 256", "BS_:\n\nBO_ 256", 1)
    assert load_dbc(_write(tmp_path, text)).message_names() == ["MOTOR", "DOOR"]


def test_without_ns_section(tmp_path: Path) -> None:
    text = 'VERSION ""\n\nBO_ 257 DOOR: 2 XXX\n SG_ OPEN : 0|1@1+ (1,0) [0|1] "" XXX\n'
    assert load_dbc(_write(tmp_path, text)).message_names() == ["DOOR"]


def test_latin1_comment_loads(tmp_path: Path) -> None:
    path = tmp_path / "l1.dbc"
    path.write_bytes(NO_SECTIONS_DBC.encode() + 'CM_ BO_ 257 "Türe";\n'.encode("latin-1"))
    assert load_dbc(path).frame_id("DOOR") == 257


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("this is not a dbc at all {", "not a valid DBC: "),
        ("", "not a valid DBC: "),
        ('VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_:\n', "defines no messages"),
        ("BO_ abc M: 8 X\n", "not a valid DBC: Invalid syntax at line 1, column 5"),
    ],
)
def test_invalid_dbc_is_config_error(tmp_path: Path, text: str, reason: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_dbc(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and reason in message
    assert "\n" not in message


def test_parse_error_cites_the_users_line(tmp_path: Path) -> None:
    # sections are inserted above line 7; the error must still name line 8 of the file as written
    broken = NO_SECTIONS_DBC.replace('(0.5,0) [0|30000] "rpm"', '(0.5,0) [0|30000 "rpm"')
    assert broken.splitlines()[7].startswith(" SG_ RPM")
    with pytest.raises(ConfigError, match=r"Invalid syntax at line 8, column"):
        load_dbc(_write(tmp_path, broken))


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_dbc(tmp_path / "absent.dbc")
    big = tmp_path / "big.dbc"
    with big.open("wb") as f:
        f.truncate(MAX_DBC_BYTES + 1)
    with pytest.raises(ConfigError, match="byte limit"):
        load_dbc(big)


def test_unknown_message_is_config_error(sim_db: DbcDatabase) -> None:
    for call in (sim_db.signals_of, sim_db.frame_id, lambda m: sim_db.decoder([m])):
        with pytest.raises(ConfigError, match="no message named 'NOPE'"):
            call("NOPE")


def test_decoder_selects_and_counts_malformed(sim_db: DbcDatabase) -> None:
    decoder = sim_db.decoder(["SIM_VEHICLE_SPEED"])
    speed_id = sim_db.frame_id("SIM_VEHICLE_SPEED")
    assert decoder.frame_ids == {speed_id}
    payload = sim_db.encode("SIM_VEHICLE_SPEED", {"VEHICLE_SPEED": 61.23, "ALIVE_COUNTER": 7})
    assert decoder.decode(speed_id, payload) == (
        "SIM_VEHICLE_SPEED",
        {"VEHICLE_SPEED": pytest.approx(61.23), "STANDSTILL": 0, "ALIVE_COUNTER": 7},
    )
    # other ids are not selected: None, and not an error
    assert decoder.decode(sim_db.frame_id("SIM_STEERING"), payload) is None
    assert decoder.errors_total == 0
    # too short: None and counted; padding beyond the length is ignored
    assert decoder.decode(speed_id, payload[:3]) is None
    assert decoder.errors_total == 1
    assert decoder.decode(speed_id, payload + b"\xff" * 8) is not None
    assert decoder.errors_total == 1


@settings(max_examples=300, deadline=None)
@given(
    frame_id=st.sampled_from([288, 304, 320, 336, 352, 368, 384, 960, 0, 2047]), data=st.binary(max_size=70)
)
def test_decoder_never_raises_on_hostile_bytes(sim_db: DbcDatabase, frame_id: int, data: bytes) -> None:
    decoder = sim_db.decoder(sim_db.message_names())
    result = decoder.decode(frame_id, data)
    if result is None:
        assert decoder.errors_total == (1 if frame_id in decoder.frame_ids else 0)
    else:
        message, values = result
        assert [name for name, _, _ in sim_db.signals_of(message)] == sorted(values, key=list(values).index)
        assert all(np.isfinite(v) for v in values.values())


@settings(max_examples=200, deadline=None)
@given(
    angle=st.floats(-780, 780),
    rate=st.floats(-1500, 1500),
    counter=st.integers(0, 15),
)
def test_encode_decode_round_trip(sim_db: DbcDatabase, angle: float, rate: float, counter: int) -> None:
    payload = sim_db.encode(
        "SIM_STEERING", {"STEERING_ANGLE": angle, "STEERING_RATE": rate, "ALIVE_COUNTER": counter}
    )
    assert len(payload) == 8
    decoded = sim_db.decoder(["SIM_STEERING"]).decode(sim_db.frame_id("SIM_STEERING"), payload)
    assert decoded is not None
    _, values = decoded
    assert values["STEERING_ANGLE"] == pytest.approx(angle, abs=0.05 + 1e-9)
    assert values["STEERING_RATE"] == pytest.approx(rate, abs=0.25 + 1e-9)
    assert values["ALIVE_COUNTER"] == counter


def test_encode_rejects_bad_values(sim_db: DbcDatabase) -> None:
    with pytest.raises(ConfigError, match="no signal 'SPEED'"):
        sim_db.encode("SIM_VEHICLE_SPEED", {"SPEED": 1.0})
    with pytest.raises(ConfigError, match="cannot encode SIM_VEHICLE_SPEED"):
        sim_db.encode("SIM_VEHICLE_SPEED", {"VEHICLE_SPEED": 1000.0})
    with pytest.raises(ConfigError, match="cannot encode"):
        sim_db.encode("SIM_VEHICLE_SPEED", {"VEHICLE_SPEED": float("nan")})
    # signals not given encode as raw zero
    assert sim_db.encode("SIM_BRAKE", {}) == bytes(8)


def test_real_toyota_dbc(recordings: Path) -> None:
    db = load_dbc(recordings / "opendbc" / "toyota_rav4_2017_pt_generated.dbc")
    assert {"SPEED", "WHEEL_SPEEDS", "STEER_ANGLE_SENSOR", "BRAKE_MODULE", "GAS_PEDAL"} <= set(
        db.message_names()
    )
    assert db.frame_id("WHEEL_SPEEDS") == 0xAA
    assert ("SPEED", "km/h", True) in db.signals_of("SPEED")
    assert ("BRAKE_PRESSED", "", False) in db.signals_of("BRAKE_MODULE")
    # the first WHEEL_SPEEDS frame of the comma2k19 segment: 28.86 km/h front right, as comma decoded it
    seg = next((recordings / "comma2k19").rglob("raw_can"))
    address = np.load(seg / "address")
    data = np.load(seg / "data")
    first = int(np.flatnonzero((address == 0xAA) & (np.load(seg / "src") == 0))[0])
    decoded = db.decoder(["WHEEL_SPEEDS"]).decode(0xAA, data[first : first + 1].tobytes())
    assert decoded is not None
    assert decoded[1]["WHEEL_SPEED_FR"] == pytest.approx(28.86)
    comma = np.load(seg.parent / "wheel_speed" / "value")[0] * 3.6  # FL FR RL RR
    ours = [decoded[1][f"WHEEL_SPEED_{w}"] for w in ("FL", "FR", "RL", "RR")]
    assert ours == pytest.approx(comma.tolist(), abs=1e-6)


def test_community_dbcs_without_sections_load(recordings: Path) -> None:
    for name in ("pcan", "ccan", "bcan", "comp_can"):
        path = recordings / "kona-ev" / "dbc" / f"{name}.dbc"
        text = path.read_text(errors="replace")
        assert "BS_:" not in text  # the point of the test: these files lack the section
        assert load_dbc(path).message_names()
