"""``fleetloop rollout`` as a release manager uses it, the real CLI against a real coordinator on loopback:
a policy file checked with FILE:LINE:COL before anything is sent, approval, roll-back, the history and
the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetloop_cli.rollout_commands import status_text
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.repositories.records import AuditFilter, Inventory
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.wire import device_pb2

LOCAL = Caller.local()
POLICY = """\
apiVersion: fleetloop/v1
kind: Rollout
spec:
  release: {name: firmware, version: 1.0.0}
  target: {selector: "hw=gen1"}
  phases:
    - {name: canary, count: 1}
    - {name: everyone}
  success: {action: pause}
"""


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Coordinator, dict[str, str], Path]]:
    tmp = Path(tmp_path_factory.mktemp("rollout-cli"))
    now = 1_800_000_000.0
    c = Coordinator(tmp / "cloud", clock=lambda: now)
    c.tokens.bootstrap(now)
    token = c.tokens.create(LOCAL, "rm", "release-manager", now).secret
    for version in ("0.9.0", "1.0.0"):
        c.releases.upload(LOCAL, ReleaseInput(build_image(version, "gen1", size_hint=4096), name="firmware",
                          version=version, hardware_id="gen1", now=now))  # fmt: skip
    for device_id in ("car-1", "car-2", "car-3"):
        hello = device_pb2.Hello(device_id=device_id, fleet="taxi", labels={"hw": "gen1"}, data_origin="sim")
        c.devices.connect(Caller.device(device_id, transport="test", proven=True), hello, now)
        c.repositories.devices.update_inventory(device_id, Inventory("gen1", "0.9.0", "", "a", 0), now)
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        yield c, {"FLEETLOOP_CLOUD": f"http://127.0.0.1:{port}", "FLEETLOOP_TOKEN": token}, tmp
    finally:
        server.shutdown()
        c.stop()


def test_a_bad_policy_file_is_reported_where_it_is_wrong(
    served: tuple[Coordinator, dict[str, str], Path],
) -> None:
    _, env, tmp = served
    bad = tmp / "bad.yaml"
    bad.write_text(POLICY.replace("{name: everyone}", "{name: everyone, percent: 50}"))
    out = cli("rollout", "create", "-f", str(bad), env=env)
    assert out.returncode == 2
    assert f"{bad}:8:24: spec.phases[1].percent: the last phase must reach 100" in out.stderr, out.stderr
    both = cli("rollout", "create", "-f", str(bad), "--release", "1.0.0", env=env)
    assert both.returncode == 2 and "use one of them" in both.stderr
    assert cli("rollout", "status", "ro-none", env=env).returncode == 3


def test_approve_roll_back_and_exit_codes(served: tuple[Coordinator, dict[str, str], Path]) -> None:
    c, env, tmp = served
    policy = tmp / "rollout.yaml"
    policy.write_text(POLICY)
    made = cli("rollout", "create", "-f", str(policy), "-o", "json", env=env)
    assert made.returncode == 0, made.stderr
    rid = json.loads(made.stdout)["id"]
    now = c.clock()
    c.controller.tick(now)
    (canary,) = [e.device_id for e in c.rollouts.executions(LOCAL, rid) if e.state == "OFFERED"]
    c.controller.on_device_status(canary, f"{rid}:{canary}", "COMMITTED", "", now, running_version="1.0.0")
    c.controller.tick(now)

    watched = cli("rollout", "status", rid, "--watch", env=env)
    assert watched.returncode == 11, watched.stderr  # waiting for approval
    assert "WAITING_APPROVAL" in watched.stdout and "] 1/1 committed" in watched.stdout
    approved = cli("rollout", "approve", rid, env=env)
    assert approved.returncode == 0 and "RUNNING, phase 2 'everyone'" in approved.stdout, approved.stdout
    again = cli("rollout", "approve", rid, env=env)
    assert again.returncode == 7 and "nothing waits for approval" in again.stderr

    back = cli("rollout", "rollback", rid, "-o", "json", env=env)
    assert back.returncode == 0, back.stderr
    status = json.loads(back.stdout)
    assert status["state"] == "ABORTED" and status["rollbacks"] == [f"{rid}-rb1"]
    assert cli("rollout", "status", rid, "--watch", env=env).returncode == 12  # aborted

    history = json.loads(cli("rollout", "history", rid, "-o", "json", env=env).stdout)
    events = [e["event"] for e in history["events"]]
    assert events[0] == "created" and events[-1] == "aborted"
    assert "approved" in events and "rollback" in events
    rows = json.loads(cli("rollout", "executions", f"{rid}-rb1", "-o", "json", env=env).stdout)
    assert [(r["device_id"], r["from_version"]) for r in rows] == [(canary, "1.0.0")]
    listed = cli("rollout", "list", env=env)
    assert listed.returncode == 0 and rid in listed.stdout and f"{rid}-rb1" in listed.stdout
    trail = [(a.actor, a.action) for a in c.audit.entries(LOCAL, AuditFilter(kind="rollouts"))]
    assert ("rm", "rollouts.approve") in trail and ("rm", "rollouts.rollback") in trail


def test_status_text_draws_a_bar_per_phase_and_the_gate_numbers() -> None:
    text = status_text(
        {
            "id": "ro-1", "release_name": "firmware", "release_version": "2.0.0", "revision": 2,
            "state": "ABORTED", "phase": 0, "phase_name": "canary", "reason": "signal gate tripped",
            "phases": [{"name": "canary", "devices": 4, "committed": 2, "failed": 1, "in_progress": 1},
                       {"name": "everyone", "devices": 36, "committed": 0}],
            "gates": [{"gate": "harsh", "phase": 0, "decision": "trip", "p_value": 0.0004, "effect": 3.9,
                       "reason": "ratio 3.9"}],
            "rollbacks": ["ro-1-rb1"],
        }
    )  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "rollout ro-1 (firmware 2.0.0, revision 2): ABORTED, phase 1 'canary'"
    assert "> 1. canary       [############xxxxxx~~~~~~] 2/4 committed, 1 failed, 1 in progress" in lines
    assert any(line.startswith("  2. everyone") and "0/36 committed" in line for line in lines)
    assert "gate harsh (phase 1): trip, p=0.0004, effect 3.9 — ratio 3.9" in text
    assert "rolled back by ro-1-rb1" in text
