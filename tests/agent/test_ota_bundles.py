"""A bundle's name becomes a directory under the store: the shared plain-name rule guards it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetloop_agent.ota.bundles import BundleStore
from fleetloop_shared.errors import UserError


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", ".hidden", "-rf", "", "x" * 129])
def test_a_bundle_name_that_is_not_plain_is_refused_before_a_path_is_made(tmp_path: Path, name: str) -> None:
    store = BundleStore(tmp_path / "bundles")
    with pytest.raises(UserError, match=r"bundle name .* cannot name a directory: use 1-128 letters"):
        store.current(name)
    assert not (tmp_path / "bundles").exists()


def test_a_plain_bundle_name_that_is_not_installed_has_no_current(tmp_path: Path) -> None:
    assert BundleStore(tmp_path).current("road-model_2.1") is None
    assert BundleStore(tmp_path).installed("road-model_2.1") is None
