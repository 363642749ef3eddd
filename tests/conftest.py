"""Shared fixtures: where the real recordings are."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetloop_shared.datapaths import find_recordings


@pytest.fixture(scope="session")
def recordings() -> Path:
    """The real recordings directory; tests that need it skip (loudly) only when it is absent."""
    root = find_recordings()
    if root is None:
        pytest.skip("real recordings not found (../shared/data/real or $FLEETLOOP_DATA)")
    return root
