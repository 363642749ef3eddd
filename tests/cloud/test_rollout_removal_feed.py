"""A device removed from a rollout through one coordinator is told to drop its job by the coordinator
holding its session, within a second (the change feed): two ``fleetloop cloud serve`` processes on one
private PostgreSQL, the device's link over gRPC to the other one."""

from __future__ import annotations

import json
import time

from fleetloop_cloud.changes import CATCH_UP_S
from fleetloop_fwsim.fleet import CoordinatorProcess
from tests.cloud.test_stateless_coordinators import REACH_S, call, job_held_on_b, pair, wait_for

__all__ = ["pair"]  # the fixture, imported


def test_a_removal_through_one_coordinator_withdraws_the_job_on_the_other_within_a_second(
    pair: tuple[CoordinatorProcess, CoordinatorProcess],
) -> None:
    a, _ = pair
    with job_held_on_b(pair) as (on_b, created, job_id):
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
