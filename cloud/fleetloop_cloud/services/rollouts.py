"""Rollouts as operators drive them: create, watch, pause, resume, abort.

The controller decides and persists (:mod:`fleetloop_cloud.rollout.controller`); this is the operator's
door to it, where the caller is checked and the answer is the rollout's status as it now stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import AuditRecord
from fleetloop_cloud.rollout.controller import RolloutController
from fleetloop_cloud.rollout.planner import policy_from_dict
from fleetloop_cloud.rollout.views import (
    RolloutStatus,
    RolloutSummary,
    record_of,
    rollout_status,
    rollout_summaries,
)
from fleetloop_cloud.services.access import Access, Caller


@dataclass(frozen=True)
class DeviceOta:
    """One rollout as one device lived it."""

    rollout_id: str
    release_version: str
    phase: int
    state: str
    reason: str
    updated_at: float
    events: list[AuditRecord]


class RolloutService:
    def __init__(self, controller: RolloutController, rollouts: RolloutRepository, access: Access) -> None:
        self._controller = controller
        self._rollouts = rollouts
        self._access = access

    def create(self, caller: Caller, policy: Mapping[str, Any], now: float) -> RolloutStatus:
        """A rollout of the policy (as the API takes it; UserError naming the field that is wrong)."""
        self._access.operator(caller, "rollouts.create")
        parsed = policy_from_dict(policy)
        rollout_id = self._controller.create(parsed, now)
        status = rollout_status(self._rollouts, rollout_id)
        self._access.record(
            caller, "rollouts.create", rollout_id, now, after=status.state,
            detail=f"release {status.policy.get('release_name', '')} {parsed.release_version}; "
                   f"selector {parsed.selector!r}; {len(status.devices)} devices",
        )  # fmt: skip
        return status

    def status(self, caller: Caller, rollout_id: str) -> RolloutStatus:
        self._access.operator(caller, "rollouts.get")
        return rollout_status(self._rollouts, rollout_id)

    def all(self, caller: Caller) -> list[RolloutSummary]:
        self._access.operator(caller, "rollouts.list")
        return rollout_summaries(self._rollouts)

    def history(self, caller: Caller, rollout_id: str) -> list[AuditRecord]:
        """The rollout's audit trail, oldest first."""
        self._access.operator(caller, "rollouts.get")
        record_of(self._rollouts, rollout_id)
        return self._rollouts.audit(rollout_id)

    def device_history(self, caller: Caller, device_id: str) -> list[DeviceOta]:
        """Every rollout that included ``device_id``, oldest first, each with the device's state, reason
        and the transitions the rollout's audit trail recorded for it."""
        self._access.operator(caller, "rollouts.get")
        out = []
        for entry in self._rollouts.of_device(device_id):
            record = self._rollouts.get(entry.rollout_id)
            trail = self._rollouts.audit(entry.rollout_id)
            events = [a for a in trail if a.detail.startswith(f"{device_id}:")]
            out.append(DeviceOta(entry.rollout_id, record.release_version if record else "", entry.phase,
                                 entry.state, entry.reason, entry.updated_at, events))  # fmt: skip
        return out

    def pause(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._transition(caller, "pause", rollout_id, now)

    def resume(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._transition(caller, "resume", rollout_id, now)

    def _transition(self, caller: Caller, action: str, rollout_id: str, now: float) -> RolloutStatus:
        self._access.operator(caller, f"rollouts.{action}")
        before = record_of(self._rollouts, rollout_id).state
        {"pause": self._controller.pause, "resume": self._controller.resume,
         "abort": self._controller.abort}[action](rollout_id, now)  # fmt: skip
        status = rollout_status(self._rollouts, rollout_id)
        self._access.record(caller, f"rollouts.{action}", rollout_id, now, before=before, after=status.state)
        return status

    def abort(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._transition(caller, "abort", rollout_id, now)
