"""Coordinators sharing one PostgreSQL: a change made through one reaches a device connected to another
within a second — the change feed (LISTEN/NOTIFY), not a poll. Two ``fleetloop cloud serve`` processes
on a private PostgreSQL, and on each a real agent link over gRPC.

The catch-up of a lost notice is five seconds (``changes.follower.CATCH_UP_S``), so a campaign arriving
within one second arrived by its notice.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Greeting, Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.pacing import BackoffPolicy
from fleetloop_cloud.changes import CATCH_UP_S, MemoryChangeFeed, Topic
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim import firmware
from fleetloop_fwsim.fleet import CoordinatorProcess
from fleetloop_fwsim.rollout_kill import HARDWARE_ID, OtaDevice
from fleetloop_fwsim.swarm import Swarm
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import NotFoundError
from fleetloop_shared.update.release_keys import (
    generate_key_file,
    load_key_file,
    public_pem_path,
    publish_release,
)
from fleetloop_shared.wire import device_pb2

DEADLINE_S = 120.0
#: What the issue asks: a change through any coordinator reaches a device on any other within this.
REACH_S = 1.0

CAMPAIGN = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {{name: {name}, version: 1}}
spec:
  target: {{selector: "kind=car"}}
  trigger: {{when: "Vehicle.Speed > {limit}", mode: rising}}
  collect: {{signals: ["Vehicle.*"], pre: 1s, post: 1s}}
"""


def wait_for(what: str, done: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.005)


def call(coordinator: CoordinatorProcess, method: str, path: str, body: bytes | None, ctype: str) -> Any:
    req = urllib.request.Request(
        coordinator.http_url + path, data=body, method=method,
        headers={"Authorization": f"Bearer {coordinator.token}", "Content-Type": ctype},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}")


def scrape(coordinator: CoordinatorProcess, series: str) -> float:
    """One series of the coordinator's ``GET /metrics``."""
    req = urllib.request.Request(
        coordinator.http_url + "/metrics", headers={"Authorization": f"Bearer {coordinator.token}"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    pytest.fail(f"{series} is not in the metrics:\n{text[:2000]}")


class Car:
    """A device on one coordinator: the agent's own link over gRPC, noting when each campaigns version
    arrived."""

    def __init__(self, device_id: str, target: str) -> None:
        self._lock = threading.Lock()
        self.arrived: dict[int, tuple[float, list[str]]] = {}
        catalog = Catalog()
        catalog.add("Vehicle.Speed", DataType.FLOAT64, unit="km/h")
        self.link = Link(
            GrpcTransport(target), device_id=device_id, metrics=AgentMetrics(),
            greeting=Greeting(device_id, "test", catalog=catalog, labels={"kind": "car"}).messages,
            on_message=self._on_cloud, backoff=BackoffPolicy(0.05, 0.5),
        )  # fmt: skip

    def _on_cloud(self, msg: device_pb2.CloudMessage) -> None:
        if msg.WhichOneof("kind") == "desired_campaigns":
            desired = msg.desired_campaigns
            names = [c.name for c in desired.campaigns]
            with self._lock:
                self.arrived.setdefault(desired.version, (time.monotonic(), names))

    def got(self, version: int) -> tuple[float, list[str]] | None:
        with self._lock:
            return self.arrived.get(version)


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[CoordinatorProcess, CoordinatorProcess]]:
    shared = tmp_path / "cloud"
    # the release manager's key stays outside the shared data directory; releases are signed with it
    generate_key_file(tmp_path / "release-manager.pem", None)
    custody = ["--targets-key", str(public_pem_path(tmp_path / "release-manager.pem")),
               "--release-keys", str(tmp_path / "root-keys")]  # fmt: skip
    a = CoordinatorProcess(
        shared, log_path=tmp_path / "a.log", extra_args=["--db", pg_url], init_args=custody
    )
    b = CoordinatorProcess(
        shared, log_path=tmp_path / "b.log", extra_args=["--db", pg_url], init_args=custody
    )
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_a_campaign_applied_through_one_coordinator_reaches_a_device_on_the_other_within_a_second(
    pair: tuple[CoordinatorProcess, CoordinatorProcess],
) -> None:
    a, b = pair
    assert CATCH_UP_S > 4 * REACH_S  # so what arrives in time came by its notice
    on_a, on_b = Car("car-a", a.grpc_target), Car("car-b", b.grpc_target)
    for car in (on_a, on_b):
        car.link.start()
    try:
        for car in (on_a, on_b):
            assert car.link.connected.wait(DEADLINE_S)
        wait_for("both welcomes", lambda: on_a.got(0) is not None and on_b.got(0) is not None)
        # apply through A, B, A: each change reaches the device on the other coordinator in time
        for k, (through, other) in enumerate([(a, on_b), (b, on_a), (a, on_b)]):
            document = CAMPAIGN.format(name=f"speeding-{k}", limit=100 + k).encode()
            answer = call(through, "POST", f"/v1/campaigns?source=c{k}.yaml", document, "text/yaml")
            applied = time.monotonic()
            version = int(answer["campaigns_version"])
            wait_for(
                f"campaigns version {version} on the other coordinator's device",
                lambda v=version, car=other: car.got(v) is not None,
                timeout_s=3 * CATCH_UP_S,
            )
            arrived = other.got(version)
            assert arrived is not None
            assert arrived[1] == [f"speeding-{i}" for i in range(k + 1)]
            assert arrived[0] - applied < REACH_S, f"change {k} took {arrived[0] - applied:.3f} s"
        # a delete through B reaches the device on A as well
        answer = call(b, "DELETE", "/v1/campaigns/speeding-0", None, "application/json")
        deleted = time.monotonic()
        version = int(answer["campaigns_version"])
        wait_for("the delete on A's device", lambda: on_a.got(version) is not None, timeout_s=3 * CATCH_UP_S)
        arrived = on_a.got(version)
        assert arrived is not None and arrived[1] == ["speeding-1", "speeding-2"]
        assert arrived[0] - deleted < REACH_S
        # what the coordinators' metrics say of it: A heard B's two changes, B heard A's two
        for coordinator in (a, b):
            heard = scrape(coordinator, 'fleetloop_change_notices_heard_total{topic="campaigns"}')
            assert heard == 2.0
    finally:
        for car in (on_a, on_b):
            car.link.stop()


def publish_two_releases(a: CoordinatorProcess) -> None:
    """Firmware 1.0.0 and 2.0.0, signed by the release manager and published through ``a``."""
    key = load_key_file(a.data_dir.parent / "release-manager.pem", None)

    def request(method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> Any:
        if method == "GET":
            try:
                with urllib.request.urlopen(a.http_url + path, timeout=60) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise NotFoundError(path) from None
                raise
        return call(a, method, path, body, ctype)

    for major in (1, 2):
        image = firmware.build_image(f"{major}.0.0", HARDWARE_ID, size_hint=64 * 1024)
        publish_release(request, image, name="firmware", version=f"{major}.0.0", hardware=HARDWARE_ID,
                        keys=[key])  # fmt: skip


def test_a_rollout_created_through_one_coordinator_reaches_a_device_on_the_other_within_a_second(
    pair: tuple[CoordinatorProcess, CoordinatorProcess],
) -> None:
    a, b = pair
    publish_two_releases(a)
    swarm = Swarm()
    on_a = OtaDevice("dev-a", a.grpc_target, swarm, install_s=0.2, version="1.0.0")
    on_b = OtaDevice("dev-b", b.grpc_target, swarm, install_s=0.2, version="1.0.0")
    try:
        for device in (on_a, on_b):
            device.link.start()
        for device in (on_a, on_b):
            assert device.link.connected.wait(DEADLINE_S)
        wait_for("both devices registered", lambda: len(call(a, "GET", "/v1/devices", None, "")) == 2)
        for through, device in ((a, on_b), (b, on_a)):
            policy = {
                "release": {"name": "firmware", "version": "2.0.0"},
                "target": {"devices": [device.device_id]},
                "phases": [{"name": "all"}],
            }
            created = call(through, "POST", "/v1/rollouts", json.dumps(policy).encode(), "application/json")
            sent = time.time()
            wait_for(f"the job on {device.device_id}", lambda d=device: bool(d.seen.jobs), timeout_s=30)
            first = min(device.seen.jobs.values())
            assert all(job.startswith(created["id"]) for job in device.seen.jobs)
            assert first - sent < REACH_S, f"{device.device_id}: the job took {first - sent:.3f} s"
        for coordinator in (a, b):  # each heard of the other's rollout (or of the leader's decisions)
            assert scrape(coordinator, 'fleetloop_change_notices_heard_total{topic="rollouts"}') >= 1.0
    finally:
        for device in (on_a, on_b):
            device.link.stop()
        swarm.close()


class HoldingDevice(OtaDevice):
    """A device that takes its job and holds it (a long install), noting when a withdrawal arrives."""

    def __init__(self, device_id: str, target: str, swarm: Swarm) -> None:
        super().__init__(device_id, target, swarm, install_s=600.0, version="1.0.0")
        self.cancels: dict[str, tuple[float, str]] = {}

    def _on_cloud(self, msg: device_pb2.CloudMessage) -> None:
        if msg.WhichOneof("kind") == "ota_cancel":
            self.cancels.setdefault(msg.ota_cancel.job_id, (time.time(), msg.ota_cancel.reason))
            return
        super()._on_cloud(msg)


@contextmanager
def job_held_on_b(
    pair: tuple[CoordinatorProcess, CoordinatorProcess],
) -> Iterator[tuple[HoldingDevice, dict[str, Any], str]]:
    """Both releases published through A, and a rollout created through A whose job a device connected to
    B has taken and holds: that device, the rollout and the job's id. The device goes away after."""
    a, b = pair
    publish_two_releases(a)
    swarm = Swarm()
    on_b = HoldingDevice("dev-b", b.grpc_target, swarm)
    try:
        on_b.link.start()
        assert on_b.link.connected.wait(DEADLINE_S)
        wait_for("the device registered", lambda: len(call(a, "GET", "/v1/devices", None, "")) == 1)
        policy = {"release": {"name": "firmware", "version": "2.0.0"}, "target": {"devices": ["dev-b"]},
                  "phases": [{"name": "all"}]}  # fmt: skip
        created = call(a, "POST", "/v1/rollouts", json.dumps(policy).encode(), "application/json")
        wait_for("the job on dev-b", lambda: bool(on_b.seen.jobs), timeout_s=30)
        (job_id,) = on_b.seen.jobs
        yield on_b, created, job_id
    finally:
        on_b.link.stop()
        swarm.close()


def test_an_abort_through_one_coordinator_withdraws_the_job_on_the_other_within_a_second(
    pair: tuple[CoordinatorProcess, CoordinatorProcess],
) -> None:
    a, _ = pair
    with job_held_on_b(pair) as (on_b, created, job_id):
        call(a, "POST", f"/v1/rollouts/{created['id']}/abort", b"{}", "application/json")
        aborted = time.time()
        wait_for("the withdrawal on dev-b", lambda: job_id in on_b.cancels, timeout_s=3 * CATCH_UP_S)
        at, reason = on_b.cancels[job_id]
        assert at - aborted < REACH_S, f"the withdrawal took {at - aborted:.3f} s"
        assert reason.startswith(f"rollout {created['id']} aborted")


def test_a_lost_notice_only_delays_a_campaign_until_the_catch_up(tmp_path: Path, pg_url: str) -> None:
    """Two coordinators on one database whose feeds never reach each other (separate in-process buses:
    every notice lost): the device on B still gets A's campaign, from B's catch-up."""
    a = Coordinator(tmp_path / "a", db=pg_url, changes=MemoryChangeFeed())
    b = Coordinator(tmp_path / "b", db=pg_url, changes=MemoryChangeFeed())
    b.start()
    try:
        car = Caller.device("car-b", transport="test", proven=True)
        hello = device_pb2.Hello(device_id="car-b", fleet="test", labels={"kind": "car"})
        session = b.devices.connect(car, hello, time.time())
        applied = a.campaigns.apply(Caller.local(), CAMPAIGN.format(name="late", limit=90), now=time.time())
        started = time.monotonic()

        def pushed() -> bool:
            while not session.outbox.empty():
                msg = session.outbox.get_nowait()
                if msg.desired_campaigns.version == applied.campaigns_version:
                    return True
            return False

        wait_for("the campaign from B's catch-up", pushed, timeout_s=3 * CATCH_UP_S)
        assert time.monotonic() - started <= CATCH_UP_S + 2.0
        assert b.changes.catch_ups >= 1 and b.changes.heard[Topic.CAMPAIGNS] == 0
    finally:
        b.stop()
        b.close()
        a.close()
