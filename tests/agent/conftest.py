"""Fixtures of the agent's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.agent_runtime import AgentRuns


@pytest.fixture
def agent_runs() -> Iterator[AgentRuns]:
    """Runtimes (each on its thread) and gRPC servers the test starts; all stopped after it."""
    runs = AgentRuns()
    try:
        yield runs
    finally:
        runs.stop()
