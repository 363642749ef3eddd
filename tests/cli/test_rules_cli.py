"""``fleetloop rules validate|test|eval`` as an operator meets them: exact outputs, and errors that say
where (``FILE:LINE:COL``) and why for the usual first mistakes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetloop_cli.main import main

CAMPAIGN = textwrap.dedent(
    """\
    apiVersion: fleetloop/v1
    kind: Campaign
    metadata: {name: harsh-braking, version: 3}
    spec:
      trigger:
        when: "Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15"
        mode: rising
        min_interval: 30s
      collect:
        signals: ["Vehicle.Speed"]
        pre: 10s
        post: 5s
    """
)
SAMPLES = (
    "t,signal,value\n0,Vehicle.Speed,80\n0.5,Vehicle.Speed,79\n1.0,Vehicle.Speed,60\n1.5,Vehicle.Speed,55\n"
)
SAMPLES += "3,Vehicle.Speed,80\n3.5,Vehicle.Speed,60\n40,Vehicle.Speed,90\n40.5,Vehicle.Speed,70\n"
CATALOG = {
    "signals": [
        {"id": 1, "path": "Vehicle.Speed", "data_type": "FLOAT64"},
        {"id": 2, "path": "Vehicle.Brake", "data_type": "BOOL"},
    ]
}


def fires_only(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The fires' times and windows (without what each would upload)."""
    return [{k: v for k, v in f.items() if k != "upload"} for f in doc["fires"]]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CAMPAIGN)
    (tmp_path / "s.csv").write_text(SAMPLES)
    (tmp_path / "catalog.json").write_text(json.dumps(CATALOG))
    return tmp_path


def test_rules_test_replays_through_the_engine(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "rules", "test", str(files / "c.yaml"), "--input", str(files / "s.csv"), "-o", "json"
    )
    assert code == 0
    # 1.0: 60 > 50 and delta -20 -> fire; 3.5: an edge again but within 30 s -> dropped; 40.5: fires
    assert json.loads(out) == {
        "campaign": "harsh-braking",
        "fires": [
            {"t": 1, "window": [-9, 6],
             "upload": {"signals": {"Vehicle.Speed": {"samples": 6, "first": 80.0}}}},
            {"t": 40.5, "window": [30.5, 45.5],
             "upload": {"signals": {"Vehicle.Speed": {"samples": 2, "first": 90.0}}}},
        ],
    }  # fmt: skip


def test_rules_test_with_nanosecond_input(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        "t_ns,signal,value",
        "0,Vehicle.Speed,80",
        "500000000,Vehicle.Speed,79",
        "1000000000,Vehicle.Speed,60",
    ]
    (files / "ns.csv").write_text("\n".join(rows) + "\n")
    code, out, _ = run(
        capsys, "rules", "test", str(files / "c.yaml"), "--input", str(files / "ns.csv"), "-o", "json"
    )
    assert code == 0
    assert fires_only(json.loads(out)) == [{"t": 1_000_000_000, "window": [-9_000_000_000, 6_000_000_000]}]


def test_rules_eval_prints_every_evaluation_time(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "e.csv").write_text(
        "t,signal,value\n0,A.i,7\n1,A.i,9223372036854775807\n1,B.f,2.5\n2,B.f,nan\n3,C.b,true\n"
    )
    code, out, _ = run(
        capsys, "rules", "eval", "A.i - 1 + 0 * floor(B.f)", "--input", str(files / "e.csv"), "-o", "json"
    )
    assert code == 0
    assert json.loads(out) == {
        "values": [
            {"t": 0, "value": None},  # B.f has no sample yet: missing
            {"t": 1, "value": 9223372036854775806},  # exact 64-bit integer, no float on the way
            {"t": 2, "value": None},  # NaN is missing
        ]
    }
    code, out, _ = run(
        capsys, "rules", "eval", "is_null(B.f) or C.b", "--input", str(files / "e.csv"), "-o", "json"
    )
    # t=1: false or missing is missing; t=2: NaN is missing, so is_null is true
    assert [v["value"] for v in json.loads(out)["values"]] == [None, True, True]


def test_validate_ok_and_catalog_typo(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "validate", str(files / "c.yaml"))
    assert code == 0 and "ok" in out
    (files / "typo.yaml").write_text(CAMPAIGN.replace("delta(Vehicle.Speed", "delta(Vehicle.Sped"))
    code, _, err = run(
        capsys, "rules", "validate", str(files / "typo.yaml"), "--catalog", str(files / "catalog.json")
    )
    assert code == 2
    assert err.strip() == (
        f"{files / 'typo.yaml'}:6:41: unknown signal 'Vehicle.Sped' (not in the catalog); "
        "did you mean 'Vehicle.Speed'?"
    )


def test_a_hand_written_yaml_catalog_works_and_its_mistakes_are_named(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What an operator writes by hand: YAML, no ids, datatypes in lower case."""
    (files / "typo.yaml").write_text(CAMPAIGN.replace("delta(Vehicle.Speed", "delta(Vehicle.Sped"))
    (files / "cat.yaml").write_text("signals:\n  - {path: Vehicle.Speed, data_type: float64, unit: km/h}\n")
    catalog = ["--catalog", str(files / "cat.yaml")]
    code, _, err = run(capsys, "rules", "validate", str(files / "typo.yaml"), *catalog)
    assert code == 2 and "did you mean 'Vehicle.Speed'?" in err
    for text, why in [
        (
            "- {path: Vehicle.Speed, type: strng}\n",
            "signals[0] (Vehicle.Speed): data_type must be one of float64, int64, bool, string, got 'strng'",
        ),
        ("- {path: Vehicle.Speed, data_type: bool, id: 0}\n", "id must be a positive integer, got 0"),
        ("signals: Vehicle.Speed\n", "expected a list of signals"),
        ("signals: [\n", "not YAML or JSON"),
    ]:
        (files / "bad.yaml").write_text(text)
        bad = ["--catalog", str(files / "bad.yaml")]
        code, _, err = run(capsys, "rules", "validate", str(files / "c.yaml"), *bad)
        assert code == 2 and why in err, (text, err)


@pytest.mark.parametrize(
    ("old", "new", "where", "why"),
    [
        ("delta(Vehicle.Speed, 1s)", "delta(Vehicle.Speed, 1)", ":6:56:", "must be a duration"),
        ("Vehicle.Speed > 50 and", "'fast' > 50 and", ":6:19:", "cannot compare string with number"),
        ("  collect:", " collect:", ":9:2:", "invalid YAML"),
        ("Vehicle.Speed > 50 and", "Vehicle.Speed ** 2 > 2500 and", "", ""),
    ],
)
def test_validate_first_mistakes_say_where_and_why(
    files: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, where: str, why: str
) -> None:
    assert old in CAMPAIGN
    path = files / "bad.yaml"
    path.write_text(CAMPAIGN.replace(old, new, 1))
    code, _, err = run(capsys, "rules", "validate", str(path))
    if not why:
        assert code == 0, err
        return
    assert code == 2
    line = err.strip()
    assert line.startswith(f"{path}{where}") and why in line and "\n" not in line, line


def test_rules_test_refuses_a_bad_rule_with_its_location(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (files / "bad.yaml").write_text(CAMPAIGN.replace("delta(Vehicle.Speed", "delta(Vehicle.Sped"))
    catalog = ["--catalog", str(files / "catalog.json")]
    code, _, err = run(
        capsys, "rules", "test", str(files / "bad.yaml"), "--input", str(files / "s.csv"), *catalog
    )
    assert code == 2
    assert err.strip().startswith(f"{files / 'bad.yaml'}:6:41: unknown signal 'Vehicle.Sped'")


def test_a_signal_the_input_never_has_is_missing_throughout_with_a_warning(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the catalog inferred from the input, the language's missing-data semantics decide: a
    comparison with a missing value is missing, so ``and`` never fires; ``or`` still does."""
    (files / "typo.yaml").write_text(CAMPAIGN.replace("delta(Vehicle.Speed", "delta(Vehicle.Sped"))
    code, out, err = run(
        capsys, "rules", "test", str(files / "typo.yaml"), "--input", str(files / "s.csv"), "-o", "json"
    )
    assert code == 0 and fires_only(json.loads(out)) == []
    assert (
        err.strip() == f"warning: signal Vehicle.Sped is not in {files / 's.csv'}; it is missing throughout"
    )
    code, out, err = run(
        capsys, "rules", "eval", "is_null(Gear) and Vehicle.Speed > 70 or Gear == 'D'",
        "--input", str(files / "s.csv"), "-o", "json",
    )  # fmt: skip
    assert code == 0 and "signal Gear is not in" in err
    # speed > 70 where it is, else (false or missing) missing: Gear (read as a string) never has a value
    assert [v["value"] for v in json.loads(out)["values"]] == [True, True, None, None, True, None, True, None]
    code, _, err = run(capsys, "rules", "eval", "Nope > 1 and not Nope", "--input", str(files / "s.csv"))
    assert code == 2 and "<expression>:1:" in err.splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("time,signal,value\n", ":1: expected the header t_ns,signal,value or t,signal,value"),
        ("t,signal,value\nabc,A.x,1\n", ":2: time 'abc' is not a number of seconds"),
        ("t,signal,value\n1,A.x,fast\n", "<expression>:1:5: cannot compare string with number using '>'"),
        ("t,signal,value\n1,A.x\n", ":2: expected 3 fields"),
        ("t,signal,value\n1,A.x,true\n2,A.x,3\n", "<expression>:1:5: cannot compare string with number"),
        ("t,signal,value\n1,A.x,\n", ':2: empty value (write "" for empty text, nan for a missing number)'),
        ('t,signal,value\n1,A.x,"3\n', ":2: malformed CSV"),
        ("t,signal,value\n1,A.x,99999999999999999999\n", "does not fit in 64 bits"),
        ("t_ns,signal,value\n1.5,A.x,1\n", ":2: time '1.5' is not a whole number of nanoseconds"),
        ("", "empty file"),
    ],
)
def test_bad_input_csv_is_one_clear_line(
    files: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (files / "bad.csv").write_text(content)
    code, _, err = run(capsys, "rules", "eval", "A.x > 1", "--input", str(files / "bad.csv"))
    assert code in (2, 3)
    assert message in err.splitlines()[-1], err


def test_eval_with_catalog_checks_types(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys,
        "rules",
        "eval",
        "Vehicle.Brake > 1",
        "--input",
        str(files / "s.csv"),
        "--catalog",
        str(files / "catalog.json"),
    )
    assert code == 2
    assert err.strip() == "<expression>:1:15: cannot compare true/false with number using '>'"


def test_input_signals_missing_from_the_catalog_are_named(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (files / "x.csv").write_text("t,signal,value\n0,Vehicle.Speed,1\n0,Vehicle.Sped,2\n")
    code, out, err = run(
        capsys,
        "rules",
        "eval",
        "Vehicle.Speed",
        "--input",
        str(files / "x.csv"),
        "--catalog",
        str(files / "catalog.json"),
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out) == {"values": [{"t": 0, "value": 1.0}]}
    assert err.strip() == f"{files / 'x.csv'}:3: note: signal Vehicle.Sped is not in the catalog; ignored"


STRINGS = 't,signal,value\n0,Gear,P\n0,Speed,0\n1,Gear,D\n2,Speed,20\n3,Gear, R \n3,Speed,5\n4,Gear,""\n'


def test_string_values_evaluate_and_print_as_json_strings(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (files / "g.csv").write_text(STRINGS)
    code, out, err = run(capsys, "rules", "eval", "Gear", "--input", str(files / "g.csv"), "-o", "json")
    assert code == 0 and err == ""
    # bare cells are stripped; "" is the empty string, a value (not missing)
    assert json.loads(out) == {
        "values": [
            {"t": 0, "value": "P"},
            {"t": 1, "value": "D"},
            {"t": 3, "value": "R"},
            {"t": 4, "value": ""},
        ]
    }
    code, out, _ = run(
        capsys, "rules", "eval", 'Gear == "D" and Speed > 10', "--input", str(files / "g.csv"), "-o", "json"
    )
    assert [v["value"] for v in json.loads(out)["values"]] == [False, False, True, False, False]
    code, out, _ = run(
        capsys, "rules", "eval", 'changed(Gear) or Gear < "Q"', "--input", str(files / "g.csv"), "-o", "csv"
    )
    assert out.splitlines()[1:] == ["0,True", "1,True", "3,True", "4,True"]


def test_rules_test_fires_on_strings(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "g.csv").write_text(STRINGS)
    (files / "g.yaml").write_text(
        CAMPAIGN.replace(
            "Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15", "Gear == 'D' and Speed > 10"
        ).replace('["Vehicle.Speed"]', "[Gear]")
    )
    code, out, _ = run(
        capsys, "rules", "test", str(files / "g.yaml"), "--input", str(files / "g.csv"), "-o", "json"
    )
    assert code == 0
    assert fires_only(json.loads(out)) == [{"t": 2, "window": [-8, 7]}]


def test_a_signal_with_any_text_is_a_string_signal(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "m.csv").write_text("t,signal,value\n1,A.x,1\n2,A.x,nan\n3,A.x,true\n4,A.x,oops\n")
    code, out, err = run(capsys, "rules", "eval", "A.x", "--input", str(files / "m.csv"), "-o", "json")
    assert code == 0  # every cell verbatim: "1", "nan" and "true" are text too
    assert [v["value"] for v in json.loads(out)["values"]] == ["1", "nan", "true", "oops"]
    assert err.strip() == (
        f"{files / 'm.csv'}:5: note: signal A.x has the text 'oops' (and '1' at line 2): "
        "all its values are read as strings"
    )
    # a rule that treats it as a number is then refused where it is written, the note says why
    code, _, err = run(capsys, "rules", "eval", "A.x > 1", "--input", str(files / "m.csv"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"{files / 'm.csv'}:5: note: signal A.x has the text 'oops' (and '1' at line 2): "
        "all its values are read as strings",
        "<expression>:1:5: cannot compare string with number using '>'",
    ]
    # a signal the rule does not read gets no note
    (files / "n.csv").write_text("t,signal,value\n1,A.x,1\n2,B.y,1\n3,B.y,oops\n")
    code, _, err = run(capsys, "rules", "eval", "A.x > 0", "--input", str(files / "n.csv"))
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    ("data_type", "content", "message"),
    [
        ("STRING", "t,signal,value\n1,Mode,1.5\n2,Mode,true\n", ""),
        (
            "FLOAT64",
            "t,signal,value\n1,Mode,1.5\n2,Mode,eco\n",
            ":3: signal Mode is a number in the catalog (FLOAT64), the input has text: 'eco'",
        ),
        (
            "INT64",
            "t,signal,value\n1,Mode,1\n2,Mode,1.5\n",
            ":3: signal Mode is an integer in the catalog (INT64), the input has a number: '1.5'",
        ),
        (
            "BOOL",
            "t,signal,value\n1,Mode,true\n2,Mode,0\n",
            ":3: signal Mode is true/false in the catalog (BOOL), the input has a number: '0'",
        ),
        (
            "FLOAT64",
            "t,signal,value\n1,Mode,99999999999999999999\n",
            ":2: integer 99999999999999999999 does not fit in 64 bits",
        ),
        ("STRING", "t,signal,value\n1,Mode,99999999999999999999\n", ""),
    ],
)
def test_catalog_datatypes_decide_how_cells_are_read(
    files: Path, capsys: pytest.CaptureFixture[str], data_type: str, content: str, message: str
) -> None:
    (files / "cat.json").write_text(
        json.dumps({"signals": [{"id": 1, "path": "Mode", "data_type": data_type}]})
    )
    (files / "v.csv").write_text(content)
    argv = [
        "rules",
        "eval",
        "is_null(Mode)",
        "--input",
        str(files / "v.csv"),
        "--catalog",
        str(files / "cat.json"),
    ]
    code, out, err = run(capsys, *argv, "-o", "json")
    if not message:
        assert code == 0 and err == ""
        code, out, _ = run(capsys, *argv[:2], "Mode", *argv[3:], "-o", "json")
        assert all(type(v["value"]) is str for v in json.loads(out)["values"])
        return
    assert code == 2 and err.strip() == f"error: {files / 'v.csv'}{message}"


def test_rules_test_runs_model_rules_offline_with_models_dir(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--models DIR`` installs model packs as a device does; a rule calling a model fires where the
    model's score says, and a model input the input lacks is missing throughout (no score, no fire)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    # score = mean of the speed over the window (1 s at 4 Hz), a real ONNX model run by onnxruntime
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["score"], axes=[1, 2], keepdims=0)], "mean", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    pack = files / "models" / "mean"
    pack.mkdir(parents=True)
    onnx.save(model, str(pack / "model.onnx"))
    (pack / "model.yaml").write_text(
        "name: mean\nfile: model.onnx\ninputs: [Vehicle.Speed]\nwindow: 1s\nsample_rate_hz: 4\n"
    )
    rows = ["t,signal,value"] + [f"{i / 4},Vehicle.Speed,{v}" for i, v in enumerate([10] * 8 + [90] * 8)]
    (files / "m.csv").write_text("\n".join(rows) + "\n")
    (files / "m.yaml").write_text(
        CAMPAIGN.replace("Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15", "model('mean', 1s) > 50")
    )
    argv = ["rules", "test", str(files / "m.yaml"), "--input", str(files / "m.csv"), "-o", "json"]
    code, out, err = run(capsys, *argv, "--models", str(files / "models"))
    assert code == 0, err
    # the mean of the last four samples passes 50 once three of them are 90: t = 2.5 s
    assert fires_only(json.loads(out)) == [{"t": 2.5, "window": [-7.5, 7.5]}]
    assert float(np.mean([10, 90, 90, 90])) > 50 >= float(np.mean([10, 10, 90, 90]))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "model 'mean' is not installed" in err
    (files / "other.csv").write_text("t,signal,value\n0,Other,1\n1,Other,2\n")
    argv[4] = str(files / "other.csv")
    code, out, err = run(capsys, *argv, "--models", str(files / "models"))
    assert code == 0 and fires_only(json.loads(out)) == []
    assert "signal Vehicle.Speed is not in" in err


def test_rules_test_reads_what_the_replay_sources_read(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wide CSV (the layout csv_replay replays) and a candump log decoded with a DBC (CAN signals named
    as a device names unmapped DBC signals) go through the same reader as the device and store import."""
    from fleetloop_shared.dbc import load_dbc

    (files / "wide.csv").write_text("time;Vehicle.Speed;Mode\n0;80;eco\n0.5;79;eco\n1.0;60;sport\n")
    code, out, err = run(
        capsys, "rules", "test", str(files / "c.yaml"), "--input", str(files / "wide.csv"), "-o", "json"
    )
    assert code == 0 and err == ""
    assert fires_only(json.loads(out)) == [{"t": 1, "window": [-9, 6]}]
    code, out, _ = run(capsys, "rules", "eval", "Mode", "--input", str(files / "wide.csv"), "-o", "json")
    assert [v["value"] for v in json.loads(out)["values"]] == ["eco", "eco", "sport"]

    dbc = (
        Path(__file__).resolve().parents[2] / "firmware-sim" / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc"
    )
    db = load_dbc(dbc)
    frame = db.frame_id("SIM_VEHICLE_SPEED")
    lines = [
        f"({100 + i * 0.5:.6f}) can0 {frame:03X}#{db.encode('SIM_VEHICLE_SPEED', {'VEHICLE_SPEED': v}).hex()}"
        for i, v in enumerate([80, 79, 60, 55])
    ]
    (files / "drive.log").write_text("\n".join(lines) + "\n")
    (files / "can.yaml").write_text(CAMPAIGN.replace("Vehicle.Speed", "CAN.SIM_VEHICLE_SPEED.VEHICLE_SPEED"))
    argv = ["rules", "test", str(files / "can.yaml"), "--input", str(files / "drive.log"), "-o", "json"]
    code, out, err = run(capsys, *argv, "--dbc", str(dbc))
    assert code == 0, err
    assert fires_only(json.loads(out)) == [{"t": 101, "window": [91, 106]}]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "needs a DBC (--dbc)" in err
    (files / "drive.log").write_text(
        "\n".join([*lines, *(ln.replace(" can0 ", " can1 ") for ln in lines)]) + "\n"
    )
    code, _, err = run(capsys, *argv, "--dbc", str(dbc))
    assert code == 2 and "comes from two buses; choose one with --bus N" in err
    code, out, err = run(capsys, *argv, "--dbc", str(dbc), "--bus", "1")
    assert code == 0 and fires_only(json.loads(out)) == [{"t": 101, "window": [91, 106]}]


PRIVATE = textwrap.dedent(
    """\
    apiVersion: fleetloop/v1
    kind: Campaign
    metadata: {name: trips, version: 2}
    spec:
      trigger: {when: "Vehicle.Speed > 50"}
      collect:
        signals: [Vehicle.Speed, Vehicle.CurrentLocation.*, Vehicle.VehicleIdentification.*, Vehicle.Cabin.*]
        pre: 5s
        post: 5s
      privacy:
        name: eu-cars
        version: 3
        drop: [Vehicle.Cabin.*]
        hash: [Vehicle.VehicleIdentification.VIN]
        coarsen: {position: {grid: 0.01}}
    """
)


def test_rules_test_shows_what_the_privacy_policy_lets_upload(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = ["t,signal,value"]
    for i in range(4):
        rows += [f"{i},Vehicle.Speed,{40 + 10 * i}",
                 f'{i},Vehicle.VehicleIdentification.VIN,"WVWZZZ1JZXW000001"',
                 f"{i},Vehicle.CurrentLocation.Latitude,{48.1234 + i / 1000}",
                 f"{i},Vehicle.CurrentLocation.Longitude,11.5678",
                 f"{i},Vehicle.Cabin.Temperature,21"]  # fmt: skip
    (files / "p.csv").write_text("\n".join(rows) + "\n")
    (files / "p.yaml").write_text(PRIVATE)
    argv = ["rules", "test", str(files / "p.yaml"), "--input", str(files / "p.csv")]
    code, out, _ = run(capsys, *argv, "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["privacy"] == "eu-cars@3"
    (fire,) = doc["fires"]
    upload = fire["upload"]
    assert upload["privacy"] == {"suppressed": False, "dropped_signals": 1, "hashed_values": 4,
                                 "removed_positions": 0}  # fmt: skip
    signals = upload["signals"]
    assert sorted(signals) == ["Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude",
                               "Vehicle.Speed", "Vehicle.VehicleIdentification.VIN"]  # fmt: skip
    vin = signals["Vehicle.VehicleIdentification.VIN"]["first"]
    assert vin.startswith("h:preview:") and "WVWZZZ" not in out  # what is stored: hashed, never clear
    assert signals["Vehicle.CurrentLocation.Latitude"]["first"] == pytest.approx(48.125)
    assert signals["Vehicle.CurrentLocation.Longitude"]["first"] == pytest.approx(11.565)
    code, out, _ = run(capsys, *argv)
    assert "1 dropped, 4 hashed, 0 positions removed" in out
