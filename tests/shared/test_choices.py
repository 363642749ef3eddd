"""One test and one wording for a setting that takes one of a fixed set of values."""

from __future__ import annotations

import pytest

from fleetloop_shared.catalog import DataType, data_type_named
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError, UserError


def test_a_value_among_the_choices_passes_unchanged() -> None:
    assert check_choice("wifi", ("wifi", "cellular"), "cloud.upload.network") == "wifi"
    assert check_choice(4, (3, 4, 5), "store.segment_version") == 4
    assert check_choice("b", frozenset({"a", "b"})) == "b"


def test_a_refusal_names_the_setting_the_choices_and_the_value() -> None:
    with pytest.raises(ConfigError) as err:
        check_choice("lte", ("wifi", "cellular"), "agent.yaml:3:5: cloud.upload.network")
    assert str(err.value) == "agent.yaml:3:5: cloud.upload.network must be one of wifi, cellular, got 'lte'"


@pytest.mark.parametrize("value", [True, False, 1.0, [1], {"a": 1}, None, "1"])
def test_booleans_unhashables_and_look_alikes_are_not_choices(value: object) -> None:
    with pytest.raises(ValueError) as err:
        check_choice(value, frozenset({0, 1, 2}), error=ValueError)
    assert str(err.value) == f"must be one of 0, 1, 2, got {value!r}"


def test_the_caller_chooses_the_error_class() -> None:
    with pytest.raises(UserError, match=r"^fleet store format must be one of parquet, got 'csv'$") as err:
        check_choice("csv", ("parquet",), "fleet store format", error=UserError)
    assert type(err.value) is UserError
    with pytest.raises(ValueError, match="multi_pid must be one of answer, first"):
        check_choice("all", ("answer", "first"), "multi_pid", error=ValueError)


def test_an_error_that_names_the_setting_itself_gets_the_bare_problem() -> None:
    with pytest.raises(ValueError, match=r"^must be one of a, b, got 'c'$"):
        check_choice("c", ("a", "b"), error=ValueError)


def test_a_long_value_is_cut_so_the_refusal_stays_one_readable_line() -> None:
    with pytest.raises(ConfigError) as err:
        check_choice("x" * 10_000, ("a",), "name")
    assert str(err.value).endswith("got '" + "x" * 56 + "...") and len(str(err.value)) < 100


@pytest.mark.parametrize(("name", "expected"), [("float64", DataType.FLOAT64), ("INT64", DataType.INT64)])
def test_a_data_type_is_named_in_any_case(name: str, expected: DataType) -> None:
    assert data_type_named(name, "signal 'A': data_type") is expected


@pytest.mark.parametrize("name", ["double", "", None, 1, True, ["bool"]])
def test_a_name_that_is_no_data_type_is_refused_with_the_ones_there_are(name: object) -> None:
    with pytest.raises(UserError, match=r"^signal 'A': data_type must be one of float64, int64, bool, str"):
        data_type_named(name, "signal 'A': data_type")
