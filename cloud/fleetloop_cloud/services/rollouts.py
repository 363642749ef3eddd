"""Rollouts as release managers drive them: create, watch, pause, resume, abort, approve, roll back,
undo, retry, remove a device.

The controller decides and persists (:mod:`fleetloop_cloud.rollout.controller`); the operator's commands
live in :mod:`fleetloop_cloud.rollout.actions`. This is the operator's door to both, where the caller is
checked, every write is recorded in the audit log, and the answer is the rollout's status as it now
stands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import AuditRecord, NewGateEvaluation
from fleetloop_cloud.rollout.actions import RolloutActions
from fleetloop_cloud.rollout.controller import RolloutController
from fleetloop_cloud.rollout.gating import summary
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_cloud.rollout.views import (
    Execution,
    Revision,
    RolloutHistory,
    RolloutStatus,
    RolloutSummary,
    executions,
    history,
    record_of,
    revisions,
    rollout_status,
    rollout_summaries,
)
from fleetloop_cloud.services.access import Access, Caller

T = TypeVar("T")


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
    """``changed`` is told after every write here (the coordinator steps its controller now and tells
    the other coordinators, so whichever leads acts on it at once)."""

    def __init__(
        self,
        controller: RolloutController,
        rollouts: RolloutRepository,
        access: Access,
        *,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._controller = controller
        self._actions = RolloutActions(controller, rollouts)
        self._rollouts = rollouts
        self._access = access
        self._changed = changed

    def create(self, caller: Caller, policy: Mapping[str, Any], now: float) -> RolloutStatus:
        """A rollout of the policy (a document or a bare spec; UserError naming the field that is wrong)."""
        self._access.operator(caller, "rollouts.create")
        parsed = parse_policy(policy)
        rollout_id = self._controller.create(parsed, now)
        status = rollout_status(self._rollouts, rollout_id)
        self._access.record(
            caller,
            "rollouts.create",
            rollout_id,
            now,
            after=status.state,
            detail=f"release {status.release_name} {parsed.release_version} (revision {status.revision}); "
            f"selector {parsed.selector!r}; {len(status.devices)} devices",
        )
        self._changed()
        return status

    def status(self, caller: Caller, rollout_id: str) -> RolloutStatus:
        self._access.operator(caller, "rollouts.get")
        return rollout_status(self._rollouts, rollout_id)

    def all(self, caller: Caller) -> list[RolloutSummary]:
        self._access.operator(caller, "rollouts.list")
        return rollout_summaries(self._rollouts)

    def history(self, caller: Caller, rollout_id: str) -> RolloutHistory:
        """The rollout's audit trail and gate evaluations, oldest first."""
        self._access.operator(caller, "rollouts.get")
        return history(self._rollouts, rollout_id)

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

    def executions(self, caller: Caller, rollout_id: str) -> list[Execution]:
        self._access.operator(caller, "rollouts.get")
        return executions(self._rollouts, rollout_id)

    def revisions(self, caller: Caller, release_name: str = "") -> list[Revision]:
        self._access.operator(caller, "rollouts.list")
        return revisions(self._rollouts, release_name)

    def _act(
        self,
        caller: Caller,
        action: str,
        rollout_id: str,
        now: float,
        run: Callable[[], T],
        detail: Callable[[T], str] = lambda _: "",
    ) -> RolloutStatus:
        self._access.operator(caller, f"rollouts.{action}")
        before = record_of(self._rollouts, rollout_id).state
        result = run()
        self._changed()
        status = rollout_status(self._rollouts, rollout_id)
        self._access.record(
            caller,
            f"rollouts.{action}",
            rollout_id,
            now,
            before=before,
            after=status.state,
            detail=detail(result),
        )
        return status

    def pause(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._act(caller, "pause", rollout_id, now, lambda: self._actions.pause(rollout_id, now))

    def resume(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._act(caller, "resume", rollout_id, now, lambda: self._actions.resume(rollout_id, now))

    def abort(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._act(caller, "abort", rollout_id, now, lambda: self._actions.abort(rollout_id, now))

    def approve(self, caller: Caller, rollout_id: str, now: float) -> RolloutStatus:
        return self._act(caller, "approve", rollout_id, now, lambda: self._actions.approve(rollout_id, now))

    def rollback(
        self, caller: Caller, rollout_id: str, now: float, *, to_revision: int | None = None
    ) -> RolloutStatus:
        """Abort and roll back (``to_revision``: ``rollout undo --to-revision``); the status names the
        roll-back rollouts in ``rollbacks``."""
        action = "rollback" if to_revision is None else "undo"
        return self._act(
            caller,
            action,
            rollout_id,
            now,
            lambda: self._actions.roll_back(rollout_id, now, to_revision=to_revision),
            lambda spawned: "created " + ", ".join(spawned),
        )

    def retry(
        self, caller: Caller, rollout_id: str, now: float, devices: Sequence[str] = ()
    ) -> RolloutStatus:
        return self._act(
            caller,
            "retry",
            rollout_id,
            now,
            lambda: self._actions.retry(rollout_id, now, devices),
            lambda retried: f"retried {len(retried)} devices",
        )

    def remove(
        self, caller: Caller, rollout_id: str, device_id: str, now: float, *, reason: str = ""
    ) -> RolloutStatus:
        """Take one device out of the rollout (written before anything is sent; removing it again changes
        nothing and says so in the audit entry)."""
        why = " ".join(reason.split())
        return self._act(
            caller,
            "remove",
            rollout_id,
            now,
            lambda: self._actions.remove(rollout_id, device_id, caller.name, why, now),
            lambda removed: f"{device_id} " + ("removed" if removed else "was removed already")
            + (f": {why}" if why else ""),
        )


class ControllerAudit:
    """The controller's own actions in the audit log, with the controller as their actor: each
    transition it decides, each signal-gate evaluation, each roll-back it creates."""

    def __init__(self, access: Access, caller: Caller) -> None:
        self._access = access
        self._caller = caller

    def transition(self, rollout_id: str, before: str, after: str, reason: str, now: float) -> None:
        self._access.record(
            self._caller, "rollouts.transition", rollout_id, now, before=before, after=after, detail=reason
        )

    def gate(self, rollout_id: str, evaluation: NewGateEvaluation, now: float) -> None:
        self._access.record(
            self._caller,
            "rollouts.gate",
            rollout_id,
            now,
            after=evaluation.decision,
            detail=summary(evaluation.gate, evaluation),
        )

    def created(self, rollout_id: str, parent_id: str, detail: str, now: float) -> None:
        self._access.record(
            self._caller,
            "rollouts.rollback",
            rollout_id,
            now,
            before=parent_id,
            after="RUNNING",
            detail=detail,
        )
