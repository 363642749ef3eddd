"""``fleetloop rollout remove ROLLOUT DEVICE --reason ...``: the real CLI against a real coordinator on
loopback with tokens of every role. A release manager (or admin) takes a device out; viewers and
operators are refused and change nothing; the removal is audited, idempotent, and shown in the status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.repositories.records import AuditFilter, Inventory
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.wire import device_pb2

LOCAL = Caller.local()


@dataclass
class Served:
    coordinator: Coordinator
    url: str
    tokens: dict[str, str]
    rollout_id: str

    def env(self, role: str) -> dict[str, str]:
        return {"FLEETLOOP_CLOUD": self.url, "FLEETLOOP_TOKEN": self.tokens[role]}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})  # fmt: skip


def post(s: Served, path: str, body: bytes, role: str = "release-manager") -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        s.url + path, data=body, method="POST",
        headers={"Authorization": f"Bearer {s.tokens[role]}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = Path(tmp_path_factory.mktemp("rollout-remove"))
    now = 1_800_000_000.0
    c = Coordinator(tmp / "cloud", clock=lambda: now)
    c.tokens.bootstrap(now)
    tokens = {
        role: c.tokens.create(LOCAL, name, role, now).secret
        for role, name in (("viewer", "vi"), ("operator", "op"), ("release-manager", "rm"), ("admin", "ad"))
    }
    for version in ("0.9.0", "1.0.0"):
        c.releases.upload(LOCAL, ReleaseInput(build_image(version, "gen1", size_hint=4096), name="firmware",
                          version=version, hardware_id="gen1", now=now))  # fmt: skip
    for device_id in ("car-1", "car-2", "car-3", "car-4"):
        hello = device_pb2.Hello(device_id=device_id, fleet="taxi", labels={"hw": "gen1"}, data_origin="sim")
        c.devices.connect(Caller.device(device_id, transport="test", proven=True), hello, now)
        c.repositories.devices.update_inventory(device_id, Inventory("gen1", "0.9.0", "", "a", 0), now)
    policy = {"release": {"name": "firmware", "version": "1.0.0"}, "target": {"selector": "hw=gen1"},
              "phases": [{"name": "canary", "count": 1}, {"name": "everyone"}]}  # fmt: skip
    rollout_id = c.rollouts.create(LOCAL, policy, now).id
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        yield Served(c, f"http://127.0.0.1:{port}", tokens, rollout_id)
    finally:
        server.shutdown()
        c.stop()


def removals(s: Served) -> list[tuple[str, str, str]]:
    entries = s.coordinator.audit.entries(LOCAL, AuditFilter(limit=1000))
    return [(e.actor, e.target, e.detail) for e in entries if e.action == "rollouts.remove"]


def test_viewers_and_operators_are_refused_and_change_nothing(served: Served) -> None:
    rid = served.rollout_id
    for role in ("viewer", "operator"):
        out = cli("rollout", "remove", rid, "car-2", "--reason", "mine now", env=served.env(role))
        assert out.returncode == 4, out.stderr
        assert "needs role release-manager" in out.stderr and "Traceback" not in out.stderr
        status, doc = post(served, f"/v1/rollouts/{rid}/devices/car-2/remove", b"{}", role)
        assert status == 403 and doc["type"] == "PermissionDeniedError"
    assert all(d.removed_at == 0.0 for d in served.coordinator.repositories.rollouts.devices(rid))
    assert removals(served) == []


def test_a_release_manager_removes_a_device_once_and_sees_it_in_the_status(served: Served) -> None:
    rid, env = served.rollout_id, served.env("release-manager")
    out = cli("rollout", "remove", rid, "car-2", "--reason", "sold to a private owner", env=env)
    assert out.returncode == 0, out.stderr
    assert "removed car-2" in out.stdout and "by rm" in out.stdout and "sold to a private owner" in out.stdout
    again = cli("rollout", "remove", rid, "car-2", env=env)
    assert again.returncode == 0, again.stderr  # idempotent: the first removal stands
    status = json.loads(cli("rollout", "status", rid, "-o", "json", env=env).stdout)
    car2 = next(d for d in status["devices"] if d["device_id"] == "car-2")
    assert (car2["removed_by"], car2["removed_reason"]) == ("rm", "sold to a private owner")
    assert car2["removed_at"] == 1_800_000_000.0
    assert sum(p["removed"] for p in status["phases"]) == 1
    assert removals(served) == [
        ("rm", rid, "car-2 removed: sold to a private owner"),
        ("rm", rid, "car-2 was removed already"),
    ]
    executions = json.loads(cli("rollout", "executions", rid, "-o", "json", env=env).stdout)
    assert next(e for e in executions if e["device_id"] == "car-2")["removed_by"] == "rm"
    # an admin may too
    assert cli("rollout", "remove", rid, "car-3", env=served.env("admin")).returncode == 0


def test_unknown_devices_bad_bodies_and_closed_rollouts_are_clear_errors(served: Served) -> None:
    rid, env = served.rollout_id, served.env("release-manager")
    out = cli("rollout", "remove", rid, "car-9", env=env)
    assert out.returncode == 3 and "device 'car-9' is not part of rollout" in out.stderr
    assert cli("rollout", "remove", "ro-none", "car-1", env=env).returncode == 3
    status, doc = post(served, f"/v1/rollouts/{rid}/devices/car-1/remove", b'{"reason": 5}')
    assert status == 400 and "reason must be text" in str(doc["error"])
    status, doc = post(served, f"/v1/rollouts/{rid}/devices/car-1/remove", b'{"why": "x"}')
    assert status == 400 and "unknown field 'why'" in str(doc["error"])
    status, doc = post(served, f"/v1/rollouts/{rid}/devices/car-1/remove", b"[1]")
    assert status == 400
    assert cli("rollout", "abort", rid, env=env).returncode == 0
    closed = cli("rollout", "remove", rid, "car-4", env=env)
    assert closed.returncode == 7 and "only an open one can remove a device" in closed.stderr
    devices = {d.device_id: d for d in served.coordinator.repositories.rollouts.devices(rid)}
    assert devices["car-1"].removed_at == 0.0 and devices["car-4"].removed_at == 0.0
