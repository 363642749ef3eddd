"""Signal classes: the built-in defaults, the order rules win in, classification files with positioned
errors, and classes carried by catalog records."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetloop_shared.catalog import Catalog, DataType, SignalSpec
from fleetloop_shared.classification import (
    DEFAULT_CLASS,
    Classification,
    ClassView,
    SignalClass,
    Visibility,
    classification_from_document,
    read_classification,
)
from fleetloop_shared.errors import UserError


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Vehicle.VehicleIdentification.VIN", "personal"),
        ("Vehicle.VehicleIdentification.Brand", "personal"),
        ("CAN.ECU.VIN", "personal"),
        ("Vehicle.CurrentLocation.Latitude", "location"),
        ("Vehicle.Trailer.CurrentLocation.Longitude", "location"),
        ("Vehicle.Driver.HeartRate", "sensitive"),
        ("Vehicle.Driver.Identifier.Subject", "personal"),  # more specific than Vehicle.Driver.*
        ("Vehicle.Cabin.Microphone.Level", "sensitive"),
        ("Vehicle.Speed", "internal"),  # no rule: fail closed, never public
    ],
)
def test_defaults(path: str, expected: str) -> None:
    assert Classification().classify("any-fleet", path) == SignalClass(expected)


def test_a_fleets_rules_win_over_every_fleets_and_those_over_the_defaults() -> None:
    classes = classification_from_document(
        {"rules": [
            {"signal": "Vehicle.Speed", "class": "public"},
            {"fleet": "eu-*", "signal": "Vehicle.Speed", "class": "internal"},
            {"signal": "Vehicle.CurrentLocation.*", "class": "internal"},  # every fleet: over a default
            {"signal": "Vehicle.Custom.*", "class": "public"},
            {"signal": "Vehicle.Custom.*", "class": "sensitive"},  # a tie: the stricter holds
        ]},
        "classes.yaml",
    )  # fmt: skip
    assert classes.classify("us-1", "Vehicle.Speed") is SignalClass.PUBLIC
    assert classes.classify("eu-1", "Vehicle.Speed") is SignalClass.INTERNAL
    assert classes.classify("us-1", "Vehicle.CurrentLocation.Latitude") is SignalClass.INTERNAL
    assert classes.classify("us-1", "Vehicle.Custom.X") is SignalClass.SENSITIVE
    assert classes.classify("us-1", "Vehicle.Other") is DEFAULT_CLASS


def test_a_catalog_file_with_classes_is_a_classification(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text("signals:\n  - {path: Vehicle.Speed, data_type: float64, class: public}\n"
                    "  - {path: Vehicle.Gear, data_type: int64}\n")  # fmt: skip
    classes = read_classification(path)
    assert classes.classify("f", "Vehicle.Speed") is SignalClass.PUBLIC
    assert classes.classify("f", "Vehicle.Gear") is DEFAULT_CLASS


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"rules": [{"signal": "Vehicle.Speed", "class": "secret"}]}, r"rules\[0\]\.class: unknown"),
        ({"rules": [{"signal": "Vehicle.[ab]", "class": "public"}]}, r"rules\[0\]\.signal: .* not a signal"),
        ({"rules": [{"fleet": "", "signal": "X", "class": "public"}]}, r"rules\[0\]\.fleet"),
        ({"rules": "x"}, "rules must be a list"),
        ({"rules": [3]}, r"rules\[0\]: must be a mapping"),
        ([], "a classification holds"),
    ],
)
def test_a_wrong_classification_is_refused_naming_the_entry(doc: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        classification_from_document(doc, "classes.yaml")


def test_catalog_records_carry_a_class_only_when_one_is_declared() -> None:
    catalog = Catalog([SignalSpec(1, "Vehicle.Speed", DataType.FLOAT64, "m/s"),
                       SignalSpec(2, "Vehicle.VehicleIdentification.VIN", DataType.STRING, "",
                                  SignalClass.PERSONAL)])  # fmt: skip
    records = catalog.to_records()
    assert "class" not in records[0] and records[1]["class"] == "personal"
    assert list(Catalog.from_records(records)) == list(catalog)
    with pytest.raises(UserError, match="unknown signal class 'secret'"):
        Catalog.from_records([{"id": 1, "path": "X", "data_type": "FLOAT64", "class": "secret"}])


def test_a_view_withholds_what_it_does_not_name() -> None:
    view = ClassView({SignalClass.PUBLIC: Visibility.FULL, SignalClass.LOCATION: Visibility.COARSENED})
    assert view.of(SignalClass.PERSONAL) is Visibility.WITHHELD
    assert view.limited() == {"internal": "withheld", "location": "coarsened", "personal": "withheld",
                              "sensitive": "withheld"}  # fmt: skip
