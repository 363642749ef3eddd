"""``fleetloop catalog import --dbc | --vspec``: a catalog file from a DBC or a VSS specification, that
``rules validate --catalog`` accepts; a wrong vspec refused with FILE:LINE:COL. ``catalog push`` of
such a file pre-registers a fleet's ids, ``catalog list`` shows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fleetloop_cli.main import main
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.vspec import read_vspec
from tests.cli.test_operator_cli import cli
from tests.cli.test_operator_cli import served as served  # a fixture: ``cloud init`` + ``cloud serve``

SIM_DBC = (
    Path(__file__).resolve().parents[2] / "firmware-sim" / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc"
)

VEHICLE = """\
Vehicle:
  type: branch
  description: High-level vehicle data.

#include Chassis.vspec Vehicle.Chassis

Vehicle.Speed:
  datatype: float
  type: sensor
  unit: km/h
  description: Vehicle speed.

Vehicle.IsMoving:
  datatype: boolean
  type: sensor
  description: Whether the vehicle is moving.

Vehicle.VehicleIdentification.VIN:
  datatype: string
  type: attribute
  description: 17-character VIN.
"""
CHASSIS = """\
SteeringWheel:
  type: branch
  description: Steering wheel.
SteeringWheel.Angle:
  datatype: int16
  type: sensor
  unit: degrees
  description: Steering wheel angle.
"""
CAMPAIGN = """\
apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: fast, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > 100 and Vehicle.IsMoving"}
  collect: {signals: ["Vehicle.Chassis.*"], pre: 5s, post: 2s}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def vspec(tmp_path: Path) -> Path:
    (tmp_path / "Chassis.vspec").write_text(CHASSIS)
    path = tmp_path / "Vehicle.vspec"
    path.write_text(VEHICLE)
    return path


def test_a_vspec_becomes_a_catalog_that_rules_validate_reads(
    vspec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "catalog.yaml"
    code, _, err = run(capsys, "catalog", "import", "--vspec", str(vspec), "--out", str(out))
    assert code == 0, err
    signals = {s["path"]: s for s in yaml.safe_load(out.read_text())["signals"]}
    assert signals["Vehicle.Chassis.SteeringWheel.Angle"]["data_type"] == "int64"  # included with its prefix
    assert signals["Vehicle.Chassis.SteeringWheel.Angle"]["unit"] == "degrees"
    assert signals["Vehicle.Speed"] | {} == {
        "path": "Vehicle.Speed",
        "data_type": "float64",
        "unit": "km/h",
        "kind": "sensor",
        "description": "Vehicle speed.",
        "class": "internal",
    }
    # each signal with the class the cloud's defaults would give it (the operator edits, the
    # coordinator takes the file as its classification)
    assert signals["Vehicle.VehicleIdentification.VIN"]["class"] == "personal"
    assert signals["Vehicle.IsMoving"]["data_type"] == "bool"
    assert signals["Vehicle.VehicleIdentification.VIN"]["data_type"] == "string"
    assert "Vehicle" not in signals  # branches are not signals
    rules = tmp_path / "fast.yaml"
    rules.write_text(CAMPAIGN)
    code, text, err = run(capsys, "rules", "validate", str(rules), "--catalog", str(out))
    assert code == 0 and "ok" in text, err


@pytest.mark.parametrize(
    ("file", "old", "new", "where", "message"),
    [
        (
            "Chassis.vspec",
            "datatype: int16",
            "datatype: unit16",
            "Chassis.vspec:5:13",
            "datatype must be one of boolean, string, float, double, int8, int16, int32, int64, uint8, ",
        ),
        (
            "Vehicle.vspec",
            "type: sensor\n  unit: km/h",
            "type: sensr\n  unit: km/h",
            "Vehicle.vspec:9:9",
            "type must be one of branch, sensor, actuator, attribute, got 'sensr'",
        ),
        ("Vehicle.vspec", "unit: km/h", "units: km/h", "Vehicle.vspec:10:3", "unknown key 'units'"),
        ("Vehicle.vspec", "datatype: boolean", "datatype: boolean[]", "Vehicle.vspec:14:13", "array"),
        ("Vehicle.vspec", "#include Chassis.vspec", "#include Chasis.vspec", "Vehicle.vspec:5:1", "no such"),
        (
            "Vehicle.vspec",
            "  description: Vehicle speed.",
            "  description: [",
            "Vehicle.vspec",
            "not valid YAML",
        ),
    ],
)
def test_a_wrong_vspec_is_refused_with_file_line_col(
    vspec: Path,
    capsys: pytest.CaptureFixture[str],
    file: str,
    old: str,
    new: str,
    where: str,
    message: str,
) -> None:
    target = vspec.parent / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    code, _, err = run(capsys, "catalog", "import", "--vspec", str(vspec))
    assert code != 0 and where in err and message in err, err
    assert "Traceback" not in err


def test_an_include_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.vspec").write_text("#include a.vspec A\n")
    with pytest.raises(Exception, match="nested deeper"):
        read_vspec(tmp_path / "a.vspec")


def test_a_dbc_becomes_a_catalog_with_the_sources_datatypes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text, err = run(capsys, "catalog", "import", "--dbc", str(SIM_DBC), "-o", "json")
    assert code == 0, err
    signals = yaml.safe_load(text)["signals"]
    db = load_dbc(SIM_DBC)
    want = [(m, s, f) for m in db.message_names() for s, _, f in db.signals_of(m)]
    assert [s["source"] for s in signals] == [f"{m}.{s}" for m, s, _ in want]
    assert [s["path"] for s in signals] == [f"CAN.{m}.{s}" for m, s, _ in want]
    assert [s["data_type"] for s in signals] == ["float64" if f else "int64" for _, _, f in want]
    speed = next(s for s in signals if s["source"] == "SIM_VEHICLE_SPEED.VEHICLE_SPEED")
    assert speed["unit"] == "km/h" and speed["data_type"] == "float64"


def test_catalog_import_wants_one_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "catalog", "import")
    assert code != 0 and "exactly one of --dbc FILE or --vspec FILE" in err
    code, _, err = run(capsys, "catalog", "import", "--dbc", str(tmp_path / "none.dbc"))
    assert code != 0 and "no such file" in err


def test_an_imported_catalog_pushed_to_a_fleet_gets_its_ids_and_lists_back(
    served: tuple[Path, str, str, Path], tmp_path: Path
) -> None:
    _data, url, admin, _log = served
    as_admin = {"FLEETLOOP_CLOUD": url, "FLEETLOOP_TOKEN": admin}
    made = tmp_path / "car.yaml"
    assert main(["catalog", "import", "--dbc", str(SIM_DBC), "--out", str(made)]) == 0
    imported = yaml.safe_load(made.read_text())["signals"]
    pushed = cli("catalog", "push", "taxi", str(made), "-o", "json", env=as_admin)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["added"] == len(imported)
    listed = cli("catalog", "list", "taxi", "-o", "json", env=as_admin)
    assert listed.returncode == 0, listed.stderr
    signals = json.loads(listed.stdout)["signals"]
    assert [(s["id"], s["path"], s["data_type"], s["unit"]) for s in signals] == [
        (i + 1, s["path"], s["data_type"], s["unit"]) for i, s in enumerate(imported)
    ]
    table = cli("catalog", "list", "taxi", env=as_admin)
    assert imported[0]["path"] in table.stdout and "data_type" in table.stdout
    # the same paths with another datatype are refused, each with its reason; the ids stay
    retyped = tmp_path / "retyped.yaml"
    flip = {"float64": "int64", "int64": "float64"}
    retyped.write_text(yaml.safe_dump({"signals": [{**s, "data_type": flip[s["data_type"]]}
                                                   for s in imported[:2]]}))  # fmt: skip
    refused = cli("catalog", "push", "taxi", str(retyped), env=as_admin)
    assert refused.returncode == 1 and f"refused: {imported[0]['path']}: signal" in refused.stderr
    assert json.loads(cli("catalog", "list", "taxi", "-o", "json", env=as_admin).stdout)["signals"] == signals
    # a mistake in the file is named where it is, and nothing is sent
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("signals:\n  - path: A\n    data_type: float64\n  - path: B\n    data_type: double\n")
    bad = cli("catalog", "push", "taxi", str(wrong), env=as_admin)
    assert bad.returncode != 0
    refusal = "data_type must be one of float64, int64, bool, string, got 'double'"
    assert f"{wrong}:4:5: signal 'B': {refusal}" in bad.stderr
    viewer = cli("tokens", "create", "eyes", "--role", "viewer", env=as_admin).stdout.strip()
    as_viewer = {"FLEETLOOP_CLOUD": url, "FLEETLOOP_TOKEN": viewer}
    denied = cli("catalog", "push", "taxi", str(made), env=as_viewer)
    assert denied.returncode == 4 and "catalog.push needs role operator or admin" in denied.stderr
    audit = json.loads(cli("audit", "list", "-o", "json", env=as_admin).stdout)
    assert [e["target"] for e in audit if e["action"] == "catalog.push"] == ["taxi", "taxi"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (None, "no such file"),
        ("signals: [\n", "not YAML or JSON"),
        ("signals: Vehicle.Speed\n", "expected a list of signals"),
    ],
)
def test_catalog_push_and_rules_validate_refuse_a_broken_catalog_file_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, why: str
) -> None:
    """One reader for the file both commands take: the same refusal, in the same words, before any
    cloud is asked (none is configured here)."""
    catalog = tmp_path / "cat.yaml"
    if text is not None:
        catalog.write_text(text)
    campaign = tmp_path / "c.yaml"
    campaign.write_text(CAMPAIGN)
    code, _, pushed = run(capsys, "catalog", "push", "taxi", str(catalog))
    assert code != 0 and f"catalog {catalog}: {why}" in pushed, pushed
    code, _, validated = run(capsys, "rules", "validate", str(campaign), "--catalog", str(catalog))
    assert code != 0 and f"catalog {catalog}: {why}" in validated, validated


def test_catalog_push_reads_the_bare_list_as_rules_validate_does(tmp_path: Path) -> None:
    from fleetloop_cli.catalog_commands import read_catalog_file

    bare = tmp_path / "cat.json"
    bare.write_text(json.dumps([{"path": "Vehicle.Speed", "data_type": "FLOAT64", "unit": "km/h", "id": 3}]))
    assert read_catalog_file(bare) == [{"path": "Vehicle.Speed", "data_type": "float64", "unit": "km/h"}]
