"""What a release manager does to a rollout: pause, resume, abort, approve, roll back, undo, retry,
remove one device.

Each action checks the rollout's state and writes its change against the state it checked
(``RolloutUpdate.expect``): another coordinator may step the rollout in between, and then the check runs
again on the new state (a few times at most: steps are rare, an operator's click is not worth a
livelock). Operators act through any coordinator, so these writes are not fenced by the controller lease;
the optimistic check is what keeps them and the controller's decisions from overwriting each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import DeviceChange, RolloutRecord, RolloutUpdate
from fleetloop_cloud.rollout.controller import RolloutController, clip
from fleetloop_cloud.rollout.planner import (
    RATE_WINDOW_S,
    TERMINAL_DEVICE_STATES,
    DevicePhaseState,
    RolloutState,
)
from fleetloop_cloud.rollout.views import record_of
from fleetloop_cloud.rollout.withdrawals import removal
from fleetloop_shared.errors import NotFoundError, StateError

S = DevicePhaseState
R = RolloutState
#: How often an operator's action is re-checked when coordinators step the rollout concurrently.
OPERATOR_ATTEMPTS = 5
_FAILED = frozenset(s.value for s in TERMINAL_DEVICE_STATES - {S.COMMITTED})
_OPEN = (R.CREATED.value, R.RUNNING.value, R.PAUSED.value, R.WAITING_APPROVAL.value)


class RolloutActions:
    """Operators' commands on rollouts; returns what each spawned (roll-backs) where it matters."""

    def __init__(self, controller: RolloutController, rollouts: RolloutRepository) -> None:
        self._controller = controller
        self._rollouts = rollouts

    def _change(
        self, rollout_id: str, change: Callable[[RolloutRecord], RolloutUpdate], now: float
    ) -> RolloutUpdate:
        for _ in range(OPERATOR_ATTEMPTS):
            record = record_of(self._rollouts, rollout_id)
            update = dataclasses.replace(change(record), expect=(record.state, record.phase))
            if self._rollouts.update(rollout_id, update, now):
                return update
        raise StateError(f"rollout {rollout_id} kept changing under this request; try again")

    def pause(self, rollout_id: str, now: float) -> None:
        """Stop offering the update (devices already working on it finish); StateError unless running."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state not in (R.CREATED.value, R.RUNNING.value, R.WAITING_APPROVAL.value):
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; only a running one can pause"
                )
            return RolloutUpdate(
                state=R.PAUSED.value, reason="paused by operator", audit=[("paused", "by operator")]
            )

        self._change(rollout_id, change, now)

    def resume(self, rollout_id: str, now: float) -> None:
        """Continue a paused rollout. Resuming accepts the failures seen so far (they no longer count
        against the brake or block their phase's success condition) and restarts the phase's timeout."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state != R.PAUSED.value:
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; only a paused one can resume"
                )
            failed = {d.device_id for d in self._rollouts.devices(rollout_id) if d.state in _FAILED}
            newly = sorted(failed - record.accepted_failures)
            detail = "by operator" + (f"; accepted failures of {', '.join(newly)}" if newly else "")
            return RolloutUpdate(
                state=R.RUNNING.value,
                phase_started_at=now,
                reason="resumed by operator",
                accepted_failures=record.accepted_failures | failed,
                audit=[("resumed", clip(detail))],
            )

        self._change(rollout_id, change, now)

    def abort(self, rollout_id: str, now: float) -> None:
        """End the rollout for good: no device is offered the update any more (finished ones stay)."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state in (R.SUCCEEDED.value, R.ABORTED.value):
                raise StateError(f"rollout {rollout_id} is already {record.state.lower()}")
            return RolloutUpdate(
                state=R.ABORTED.value, reason="aborted by operator", audit=[("aborted", "by operator")]
            )

        self._change(rollout_id, change, now)

    def approve(self, rollout_id: str, now: float) -> None:
        """Open the next phase of a rollout waiting for approval (a success condition with action pause)."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state != R.WAITING_APPROVAL.value:
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; nothing waits for approval"
                )
            phases = self._controller.planner_of(record).policy.phases
            nxt = min(record.phase + 1, len(phases) - 1)
            reason = f"approved by operator: opening phase {nxt + 1} {phases[nxt].name!r}"
            return RolloutUpdate(
                state=R.RUNNING.value,
                phase=nxt,
                phase_started_at=now,
                reason=reason,
                audit=[("approved", reason), ("phase", reason)],
            )

        self._change(rollout_id, change, now)

    def roll_back(self, rollout_id: str, now: float, *, to_revision: int | None = None) -> list[str]:
        """Abort the rollout (if still open) and create the roll-back of its devices that took the
        release: to the version each ran before, or to the release of ``to_revision`` (``rollout undo``).
        Returns the ids of the roll-back rollouts."""
        to_version = None
        if to_revision is not None:
            to_version = self._revision_version(rollout_id, to_revision)
        spawned: list[str] = []

        def change(record: RolloutRecord) -> RolloutUpdate:
            spawned.clear()
            if record.state == R.ABORTED.value and to_revision is None and self._has_rollback(rollout_id):
                raise StateError(f"rollout {rollout_id} is rolled back already")
            why = "undo by operator" if to_revision is not None else "rolled back by operator"
            children, notes = self._controller.targets.rollbacks(
                record, self._rollouts.devices(rollout_id), now, why=why, to_version=to_version
            )
            if not children:
                raise StateError(
                    f"rollout {rollout_id}: nothing to roll back ({'; '.join(notes) or 'no device took it'})"
                )
            spawned.extend(c.rollout_id for c in children)
            audit = [("rollback", note) for note in notes]
            state = None
            if record.state in _OPEN:
                state = R.ABORTED.value
                audit.append(("aborted", why))
            return RolloutUpdate(
                state=state, reason=clip(f"{why}: " + "; ".join(notes)), audit=audit, spawn=children
            )

        self._change(rollout_id, change, now)
        return spawned

    def _has_rollback(self, rollout_id: str) -> bool:
        return any(r.parent_id == rollout_id for r in self._rollouts.all())

    def _revision_version(self, rollout_id: str, revision: int) -> str:
        record = record_of(self._rollouts, rollout_id)
        name = record.policy["release"].get("name", "")
        for other in self._rollouts.all():
            if other.revision == revision and other.policy["release"].get("name", "") == name:
                if other.release_version == record.release_version:
                    raise StateError(
                        f"revision {revision} is {name} {other.release_version}, "
                        f"the release {rollout_id} rolls out already"
                    )
                return other.release_version
        raise NotFoundError(f"no revision {revision} of {name or 'this release'}")

    def retry(self, rollout_id: str, now: float, devices: Sequence[str] = ()) -> list[str]:
        """Offer the update again to failed devices (all of them, or those named): PENDING on their next
        attempt, their failures no longer accepted. Returns the devices retried."""
        retried: list[str] = []

        def change(record: RolloutRecord) -> RolloutUpdate:
            retried.clear()
            if record.state not in _OPEN:
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; only an open one can retry"
                )
            members = {d.device_id: d for d in self._rollouts.devices(rollout_id)}
            for device_id in devices:
                if device_id not in members:
                    raise NotFoundError(f"device {device_id!r} is not part of rollout {rollout_id!r}")
            wanted = set(devices) or set(members)
            retried.extend(
                sorted(d for d in wanted if members[d].state in _FAILED and not members[d].removed_at)
            )
            if not retried:
                raise StateError(f"rollout {rollout_id}: no failed device to retry")
            return RolloutUpdate(
                accepted_failures=record.accepted_failures - set(retried),
                devices={
                    d: DeviceChange(
                        state=S.PENDING.value,
                        reason="retry requested by operator",
                        retry_at=(members[d].offered_at or 0.0) + RATE_WINDOW_S,
                        only_from=members[d].state,
                    )
                    for d in retried
                },
                audit=[("retry", f"by operator: {len(retried)} devices")],
            )

        self._change(rollout_id, change, now)
        return retried

    def remove(self, rollout_id: str, device_id: str, by: str, why: str, now: float) -> bool:
        """Take ``device_id`` out of an open rollout (persisted here; the controller's next tick tells the
        device to drop its job, on whichever coordinator holds its session). True if this removed it,
        False if it was removed already (the first removal stands). NotFoundError for a device not in the
        rollout, StateError for a rollout that is over."""
        for _ in range(OPERATOR_ATTEMPTS):
            record = record_of(self._rollouts, rollout_id)
            member = next((d for d in self._rollouts.devices(rollout_id) if d.device_id == device_id), None)
            if member is None:
                raise NotFoundError(f"device {device_id!r} is not part of rollout {rollout_id!r}")
            if member.removed_at:
                return False
            if record.state not in _OPEN:
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; only an open one can remove a device"
                )
            change = removal(member, by, why, now)
            detail = clip(f"{device_id}: removed by {by}" + (f": {why}" if why else ""))
            update = RolloutUpdate(
                devices={device_id: change}, audit=[("removed", detail)], expect=(record.state, record.phase)
            )
            # a PENDING device offered in between does not take the change (``only_from``): decided
            # again on its new state (the audit log then shows the first try too)
            if self._rollouts.update(rollout_id, update, now) and any(
                d.device_id == device_id and d.removed_at for d in self._rollouts.devices(rollout_id)
            ):
                return True
        raise StateError(f"rollout {rollout_id} kept changing under this request; try again")
