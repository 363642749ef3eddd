"""Shared fixtures: where the real recordings are; the agent runtimes a test starts."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.jsonlog import JsonFormatter
from tests.fixtures.agent_runtime import AgentRuns


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need a kernel SocketCAN interface run only when ``FLEETLOOP_VCAN`` names one: the
    kernel's vcan module is missing from containers and CI machines, where such a test would be skipped
    on every run — it is left out instead (``make test-socketcan`` runs it)."""
    if os.environ.get("FLEETLOOP_VCAN"):
        return
    kept = [item for item in items if item.get_closest_marker("socketcan") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.fixture(autouse=True)
def _logger_levels_as_found() -> Iterator[None]:
    """Logger levels put back after each test, and a command's JSON log handler taken off. CLI commands
    run in-process set up the logging of the process they own (a simulated fleet sets ``fleetloop.agent``
    to ERROR; ``jsonlog.configure`` routes the root logger to that test's stderr); a later test in the
    same process that expects a warning in its log must not depend on which tests ran before it."""
    loggers = logging.Logger.manager.loggerDict
    before = {name: lg.level for name, lg in loggers.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
    for handler in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(handler)  # a command's JSON lines, to a stream this test captured
    for name, lg in list(loggers.items()):
        if isinstance(lg, logging.Logger) and lg.level != before.get(name, logging.NOTSET):
            lg.setLevel(before.get(name, logging.NOTSET))


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
