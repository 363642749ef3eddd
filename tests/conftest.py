"""Shared fixtures: where the real recordings are; the agent runtimes a test starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetloop_shared.datapaths import find_recordings
from tests.fixtures.agent_runtime import AgentRuns


@pytest.fixture(scope="session")
def recordings() -> Path:
    """The real recordings directory; tests that need it skip (loudly) only when it is absent."""
    root = find_recordings()
    if root is None:
        pytest.skip("real recordings not found (../shared/data/real or $FLEETLOOP_DATA)")
    return root


@pytest.fixture
def agent_runs() -> Iterator[AgentRuns]:
    """Runtimes (each on its thread) and gRPC servers the test starts; all stopped after it."""
    runs = AgentRuns()
    try:
        yield runs
    finally:
        runs.stop()
