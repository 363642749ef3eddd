"""Whether a device is online survives no coordinator: sessions are held per coordinator under a lease,
so after a crash and a restart — of the only coordinator, or of one of several sharing PostgreSQL —
``devices list`` shows the device offline within one lease, and a clean stop ends its sessions at once.

In-process coordinators on a test clock (SQLite and PostgreSQL), and one real ``cloud serve`` process
killed with SIGKILL and started again.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.devices import LEASE_S
from fleetloop_fwsim.fleet import CoordinatorProcess
from fleetloop_shared.wire import device_pb2, device_pb2_grpc

LOCAL = Caller.local()
CAR = Caller.device("car-1", transport="grpc", proven=False)
T0 = 1_000_000.0


def hello(device_id: str = "car-1") -> device_pb2.Hello:
    return device_pb2.Hello(device_id=device_id, fleet="taxi", labels={"kind": "car"}, data_origin="sim")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def start(tmp_path: Path, sql_location: str | Path, clock: Clock) -> Iterator[Callable[[], Coordinator]]:
    """Coordinators on one data directory and one metadata database (SQLite in the directory, or a
    PostgreSQL database), on the test clock."""
    db = sql_location if isinstance(sql_location, str) else None
    made: list[Coordinator] = []

    def make() -> Coordinator:
        made.append(Coordinator(tmp_path / "cloud", clock=clock, db=db))
        return made[-1]

    yield make
    for c in made:
        c.close()


def online(c: Coordinator, device_id: str = "car-1") -> bool:
    return c.devices.describe(LOCAL, device_id, c.clock()).online


def devices_list(c: Coordinator) -> dict[str, bool]:
    """What ``fleetloop devices list`` shows: GET /v1/devices from this coordinator, as a viewer."""
    viewer = c.tokens.create(LOCAL, f"viewer-{secrets.token_hex(4)}", "viewer", c.clock()).secret
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/devices",
                                     headers={"Authorization": f"Bearer {viewer}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            return {d["device_id"]: d["online"] for d in json.loads(resp.read())}
    finally:
        server.shutdown()


def test_a_crashed_coordinators_devices_are_offline_after_its_restart_within_a_lease(
    start: Callable[[], Coordinator], clock: Clock
) -> None:
    first = start()
    first.devices.connect(CAR, hello(), clock())
    assert devices_list(first) == {"car-1": True}
    # the coordinator crashes (no clean stop) and the next one starts on the same data
    restarted = start()
    clock.now += LEASE_S / 2
    assert online(restarted)  # the first one's lease still runs: it may be alive and serving the device
    clock.now += LEASE_S
    restarted.devices.beat(clock())  # what the restarted one's tick does every few seconds
    assert devices_list(restarted) == {"car-1": False}
    assert restarted.queries.summary(LOCAL, clock()).online == 0
    # the device reconnects, to the coordinator that is there now
    restarted.devices.connect(CAR, hello(), clock())
    assert devices_list(restarted) == {"car-1": True}


def test_a_clean_stop_ends_the_coordinators_sessions_at_once(
    start: Callable[[], Coordinator], clock: Clock
) -> None:
    first, other = start(), start()
    first.devices.connect(CAR, hello(), clock())
    assert online(other)
    first.stop()
    assert not online(other)
    assert other.queries.summary(LOCAL, clock()).online == 0


def test_a_device_that_moved_stays_online_when_its_old_stream_ends(
    start: Callable[[], Coordinator], clock: Clock
) -> None:
    a, b = start(), start()
    old = a.devices.connect(CAR, hello(), clock())
    new = b.devices.connect(CAR, hello(), clock())  # reconnected to b before a saw the old stream end
    a.devices.disconnect(old)
    assert online(a) and online(b)
    clock.now += 2 * LEASE_S  # a is gone for good; b keeps beating
    b.devices.beat(clock())
    assert online(b)
    b.devices.disconnect(new)
    assert not online(b)


def test_the_mqtt_last_will_ends_the_session_wherever_it_is_held(
    start: Callable[[], Coordinator], clock: Clock
) -> None:
    a, b = start(), start()
    car = Caller.device("car-1", transport="mqtt", proven=True)
    a.devices.connect(car, hello(), clock())
    b.devices.gone(car, None)  # the broker delivered the will to the other coordinator
    assert not online(a) and not online(b)


def _get_devices(cp: CoordinatorProcess) -> dict[str, Any]:
    req = urllib.request.Request(f"{cp.http_url}/v1/devices", headers={"Authorization": f"Bearer {cp.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {d["device_id"]: d for d in json.loads(resp.read())}


def wait_for(what: str, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


def test_a_killed_coordinator_process_does_not_keep_its_devices_online(tmp_path: Path) -> None:
    """``cloud serve`` killed with SIGKILL and started again on the same data: the device it held, which
    does not come back, is offline in ``devices list`` within a lease of the restart."""
    cp = CoordinatorProcess(tmp_path / "cloud", log_path=tmp_path / "cloud.log")
    cp.start()
    hang_up = threading.Event()

    def messages() -> Iterator[device_pb2.DeviceMessage]:
        yield device_pb2.DeviceMessage(hello=hello())
        hang_up.wait()  # the stream stays open until the test ends

    channel = grpc.insecure_channel(cp.grpc_target)
    stream = device_pb2_grpc.DeviceServiceStub(channel).Connect(messages())
    try:
        next(stream)  # the welcome: the hello is registered
        wait_for("the device online", lambda: _get_devices(cp).get("car-1", {}).get("online"), 60)
        cp.kill()
        cp.start()
        # generous: a loaded machine may be slow; the lease itself is LEASE_S
        wait_for(
            "the device offline after the restart",
            lambda: _get_devices(cp)["car-1"]["online"] is False,
            LEASE_S + 120,
        )
    finally:
        hang_up.set()
        stream.cancel()
        channel.close()
        cp.stop()
