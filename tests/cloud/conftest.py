"""A real coordinator in the test process: gRPC and HTTP on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleetloop_cloud.coordinator import Coordinator
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.http_api import start_http_server


@dataclass
class RunningCoordinator:
    coordinator: Coordinator
    grpc_target: str
    http_base: str
    channel: grpc.Channel


@pytest.fixture
def running_coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    c = Coordinator(tmp_path / "cloud")
    gserver, gport = start_grpc_server(c, "127.0.0.1", 0)
    hserver, hport = start_http_server(c, "127.0.0.1", 0)
    c.artifact_base_url = f"http://127.0.0.1:{hport}"
    c.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
    try:
        yield RunningCoordinator(c, f"127.0.0.1:{gport}", f"http://127.0.0.1:{hport}", channel)
    finally:
        channel.close()
        c.stop()
        gserver.stop(grace=0).wait(2)
        hserver.shutdown()
