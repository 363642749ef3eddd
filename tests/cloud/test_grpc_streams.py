"""Control streams on the asyncio gRPC server, over real gRPC on loopback: pushes reach idle streams at
once, a newer stream of a device replaces the older one, a message that does not decode ends the stream
(INTERNAL, counted) and the device comes back with a fresh hello."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any as RunningCoordinator

import grpc
import pytest

from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_shared.wire import device_pb2
from tests.fixtures.control_stream import ControlStream


def hello_bytes(device_id: str) -> bytes:
    return device_pb2.DeviceMessage(
        hello=device_pb2.Hello(device_id=device_id, fleet="t")
    ).SerializeToString()


def grant(max_bytes: int) -> device_pb2.CloudMessage:
    return device_pb2.CloudMessage(upload_grant=device_pb2.UploadGrant(max_bytes=max_bytes, min_priority=0))


def test_a_push_reaches_an_idle_stream_at_once(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator
    s = ControlStream(rc.channel, hello_bytes("car-1"))
    try:
        s.next("desired_campaigns")
        time.sleep(0.3)  # the stream is idle, waiting
        for n in (1, 2, 3):
            t0 = time.monotonic()
            threading.Thread(target=rc.coordinator.sessions.publish, args=("car-1", grant(n))).start()
            assert s.next("upload_grant").upload_grant.max_bytes == n
            assert time.monotonic() - t0 < 0.5
    finally:
        s.close()


def test_a_newer_stream_of_a_device_replaces_the_older(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator
    old = ControlStream(rc.channel, hello_bytes("car-1"))
    old.next("welcome")
    new = ControlStream(rc.channel, hello_bytes("car-1"))
    try:
        new.next("welcome")
        assert old.ended.wait(5), "the replaced stream must end"
        assert old.error is None  # ended by the cloud with OK
        assert rc.coordinator.sessions.publish("car-1", grant(7))
        assert new.next("upload_grant").upload_grant.max_bytes == 7
        assert rc.coordinator.sessions.online() == ["car-1"]
    finally:
        old.close()
        new.close()


def test_a_later_undecodable_message_ends_the_stream(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator
    s = ControlStream(rc.channel, hello_bytes("car-1"))
    s.next("welcome")
    s.out.put(b"\xff\xff\xff\xff")
    assert s.ended.wait(5)
    assert s.error is not None and s.error.code() == grpc.StatusCode.INTERNAL
    assert rc.coordinator.refusals["undecodable"] == 1
    # the device reconnects with a fresh hello and is served
    again = ControlStream(rc.channel, hello_bytes("car-1"))
    try:
        again.next("welcome")
    finally:
        again.close()


@pytest.mark.parametrize("first", [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"])
def test_an_undecodable_first_message_is_internal(
    running_coordinator: RunningCoordinator, first: bytes
) -> None:
    s = ControlStream(running_coordinator.channel, first)
    assert s.ended.wait(5)
    assert s.error is not None and s.error.code() == grpc.StatusCode.INTERNAL
    assert s.error.details() == "Exception deserializing request!"
    assert running_coordinator.coordinator.refusals["undecodable"] == 1


def test_the_domain_executor_bounds_the_calls_in_flight() -> None:
    import asyncio

    from fleetloop_cloud.grpc_api import DomainExecutor

    running = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    async def main() -> None:
        domain = DomainExecutor(asyncio.get_running_loop(), threads=8, limit=3)
        calls = [asyncio.create_task(domain.run(work)) for _ in range(30)]
        await asyncio.sleep(0.005)
        calls[0].cancel()  # a cancelled caller keeps its slot until its call ends in the thread
        await asyncio.gather(*calls, return_exceptions=True)
        domain.shutdown()

    asyncio.run(main())
    assert peak == 3  # 8 threads, but never more than the 3 slots at once


def test_stopping_the_server_ends_idle_streams_while_its_loop_still_runs(tmp_path: Path) -> None:
    """An idle stream is not ended by the gRPC server's stop: its clean-up (the device goes offline)
    must still run before the loop closes — not at garbage collection on a closed loop, where it
    raised "Event loop is closed" and left the device marked online."""
    c = Coordinator(tmp_path / "cloud")
    gserver, gport = start_grpc_server(c, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
    s = ControlStream(channel, hello_bytes("car-1"))
    try:
        s.next("desired_campaigns")
        record = c.repositories.devices.get("car-1")
        assert record is not None and record.session_owner != ""
        time.sleep(0.3)  # the stream is idle, its handler waiting on its wake event
        assert gserver.stop(grace=0).wait(10), "the server did not stop"
        record = c.repositories.devices.get("car-1")
        assert record is not None and record.session_owner == "", "the idle stream's device stayed online"
    finally:
        s.close()
        channel.close()
        c.stop()
