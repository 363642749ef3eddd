"""A device removed from a rollout through one coordinator is told to drop its job by the coordinator
holding its session, within a second (the change feed): two ``fleetloop cloud serve`` processes on one
private PostgreSQL, the device's link over gRPC to the other one."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from fleetloop_cloud.changes import CATCH_UP_S
from fleetloop_fwsim import firmware
from fleetloop_fwsim.fleet import CoordinatorProcess
from fleetloop_fwsim.rollout_kill import HARDWARE_ID
from fleetloop_fwsim.swarm import Swarm
from fleetloop_shared.errors import NotFoundError
from fleetloop_shared.update.release_keys import load_key_file, publish_release
from tests.cloud.test_stateless_coordinators import (
    DEADLINE_S,
    REACH_S,
    HoldingDevice,
    call,
    pair,
    wait_for,
)

__all__ = ["pair"]  # the fixture, imported


def test_a_removal_through_one_coordinator_withdraws_the_job_on_the_other_within_a_second(
    pair: tuple[CoordinatorProcess, CoordinatorProcess],
) -> None:
    a, b = pair
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
        body = json.dumps({"reason": "sold"}).encode()
        path = f"/v1/rollouts/{created['id']}/devices/dev-b/remove"
        status = call(a, "POST", path, body, "application/json")
        removed = time.time()
        assert status["devices"][0]["removed_reason"] == "sold"
        wait_for("the withdrawal on dev-b", lambda: job_id in on_b.cancels, timeout_s=3 * CATCH_UP_S)
        at, reason = on_b.cancels[job_id]
        assert at - removed < REACH_S, f"the withdrawal took {at - removed:.3f} s"
        assert reason.startswith("removed from the rollout by ") and reason.endswith(": sold")
        # the rollout does not wait for the removed device: nothing is left to do
        wait_for("the rollout to end", lambda: call(a, "GET", f"/v1/rollouts/{created['id']}", None, "")[
            "state"] == "SUCCEEDED", timeout_s=30)  # fmt: skip
    finally:
        on_b.link.stop()
        swarm.close()
