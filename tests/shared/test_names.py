"""One rule for names that become file names, object keys and topic levels."""

from __future__ import annotations

import pytest

from fleetloop_shared.errors import ConfigError, UserError
from fleetloop_shared.names import safe_name


@pytest.mark.parametrize("name", ["car-1", "taxi", "fw_2.0", "A", "_x", "a" * 128])
def test_plain_names_pass_unchanged(name: str) -> None:
    assert safe_name(name, "device id", becomes="a file") == name


@pytest.mark.parametrize(
    "name",
    ["", "..", ".hidden", "-rf", "a/b", "fleet=x", "+", "#", "$SYS", "car 1", "car\n", "a" * 129, 7, None],
)
def test_anything_else_is_refused_naming_what_and_where(name: object) -> None:
    with pytest.raises(UserError, match=r"device id .* cannot name a file: use 1-128 letters"):
        safe_name(name, "device id", becomes="a file")


def test_the_caller_chooses_the_error_class() -> None:
    with pytest.raises(ConfigError, match="cannot name a broker identity"):
        safe_name("+", "fleet", becomes="a broker identity", error=ConfigError)
