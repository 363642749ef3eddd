"""The rollout driver: turns planner decisions into persisted transitions and published OTA jobs.

Order matters and is the point of this module: every decision (rollout state, phase, the devices now
OFFERED) and its audit rows are committed to the rollouts repository *before* a job is published. If the
coordinator dies between the two, the restarted one finds those devices OFFERED but not delivered and
publishes again; the device side is idempotent by job id. Nothing is kept in memory between calls, so a
new controller object on the same database simply carries on.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from fleetloop_cloud.repositories.interfaces import DeviceRepository, ReleaseRepository, RolloutRepository
from fleetloop_cloud.repositories.records import (
    DeviceChange,
    NewRollout,
    ReleaseRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    RolloutUpdate,
)
from fleetloop_cloud.rollout.planner import (
    TERMINAL_DEVICE_STATES,
    DevicePhaseState,
    RolloutPlanner,
    RolloutPolicy,
    RolloutState,
    RolloutView,
    assign_phases,
    policy_from_dict,
    policy_to_dict,
)
from fleetloop_cloud.rollout.views import record_of
from fleetloop_shared.errors import NotFoundError, StateError, UserError
from fleetloop_shared.rules import selector_matches
from fleetloop_shared.update.artifact import manifest_from_bytes

#: Agent OTA state name -> the device's state in the rollout.
OTA_TO_PHASE_STATE: dict[str, DevicePhaseState] = {
    "QUEUED": DevicePhaseState.IN_PROGRESS,
    "DOWNLOADING": DevicePhaseState.IN_PROGRESS,
    "DOWNLOADED": DevicePhaseState.IN_PROGRESS,
    "VERIFIED": DevicePhaseState.IN_PROGRESS,
    "INSTALLING": DevicePhaseState.IN_PROGRESS,
    "REBOOTING": DevicePhaseState.IN_PROGRESS,
    "HEALTH_CHECK": DevicePhaseState.IN_PROGRESS,
    "COMMITTED": DevicePhaseState.COMMITTED,
    "ROLLED_BACK": DevicePhaseState.ROLLED_BACK,
    "FAILED": DevicePhaseState.FAILED,
    "REJECTED": DevicePhaseState.REJECTED,
    # A job canceled on the device did not install: for the brake that is a failure, not a success.
    "CANCELED": DevicePhaseState.FAILED,
}
#: Reasons stored per device are cut to this many characters (a hostile device cannot bloat the DB).
MAX_REASON_CHARS = 500
#: Rollouts that ``tick`` acts on.
ACTIVE_STATES = (RolloutState.CREATED.value, RolloutState.RUNNING.value)
#: How often an operator's action is re-checked when coordinators step the rollout concurrently.
_OPERATOR_ATTEMPTS = 5


class JobPublisher(Protocol):
    """How the controller reaches devices; owned here, implemented by :class:`~.jobs.OtaJobs` (the
    director signs the device's targets, its session carries the job)."""

    def publish_job(
        self, device_id: str, job_id: str, rollout_id: str, manifest: bytes, signature: bytes
    ) -> bool:
        """Send the job; True if it was delivered to a connected device now."""
        ...


def job_id_for(rollout_id: str, device_id: str) -> str:
    """A device's job id in a rollout; the rollout id never contains ':' so the split is unambiguous."""
    return f"{rollout_id}:{device_id}"


def _clip(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


class TransitionLog(Protocol):
    """Where the controller's own rollout transitions are recorded with the controller as their actor
    (the coordinator's audit log); operators' transitions are recorded by the rollouts service."""

    def __call__(self, rollout_id: str, before: str, after: str, reason: str, now: float) -> None: ...


class RolloutController:
    """Creates rollouts, steps them with the planner, publishes jobs and folds device reports back in.

    One lock serialises the controller's own steps (tick, status, operator commands) so a device report
    cannot interleave with a decision that is being persisted.
    """

    def __init__(
        self,
        rollouts: RolloutRepository,
        releases: ReleaseRepository,
        devices: DeviceRepository,
        publisher: JobPublisher,
        transitions: TransitionLog | None = None,
    ) -> None:
        self._rollouts = rollouts
        self._transitions = transitions
        self._releases = releases
        self._devices = devices
        self._publisher = publisher
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ helpers

    def _record(self, rollout_id: str) -> RolloutRecord:
        return record_of(self._rollouts, rollout_id)

    def _release(self, version: str, name: str = "") -> ReleaseRecord:
        """The release a policy names. A version alone must be unambiguous: a firmware and a model pack
        may both be "1.2.0", and rolling out the wrong one would reach every targeted device."""
        if not name:
            names = self._releases.names(version)
            if len(names) > 1:
                raise UserError(
                    f"several releases have version {version!r} ({', '.join(names)}); "
                    "say which with release_name (fleetloop rollout create --name NAME)"
                )
        release = self._releases.get(version, name)
        if release is None:
            what = f"{name} {version}" if name else repr(version)
            raise NotFoundError(f"release {what} does not exist; upload it first")
        return release

    def _release_of(self, record: RolloutRecord) -> ReleaseRecord:
        return self._release(record.release_version, str(record.policy.get("release_name", "")))

    @staticmethod
    def _view(record: RolloutRecord, devices: list[RolloutDeviceRecord]) -> RolloutView:
        return RolloutView(
            state=RolloutState(record.state),
            phase=record.phase,
            phase_started_at=record.phase_started_at,
            devices={d.device_id: (d.phase, DevicePhaseState(d.state)) for d in devices},
            accepted_failures=record.accepted_failures,
        )

    # ------------------------------------------------------------------ commands

    def create(self, policy: RolloutPolicy, now: float) -> str:
        """Snapshot the target devices, assign phases and persist the rollout as RUNNING (phase 1).

        Targets are the devices whose labels match the selector and whose reported hardware id is the
        release's (a device that has not reported one yet is included; it refuses what does not fit).
        Devices already running the release's version start COMMITTED.
        """
        release = self._release(policy.release_version, policy.release_name)
        if not policy.release_name:
            # Persist the resolved name: a release of another name with this version uploaded later must
            # not change what this rollout delivers.
            policy = dataclasses.replace(policy, release_name=release.name)
        planner = RolloutPlanner(policy)
        targets = []
        for device in self._devices.all():
            if not selector_matches(policy.selector, device.selector_labels()):
                continue
            if device.hardware_id and device.hardware_id != release.hardware_id:
                continue
            targets.append(device)
        if not targets:
            raise UserError(
                f"selector {policy.selector!r} matches no device with hardware {release.hardware_id!r}"
            )
        phases = assign_phases([d.device_id for d in targets], planner.policy)
        rollout_id = f"ro-{int(now):x}-{secrets.token_hex(4)}"
        # Only a slot image's version is reported back by devices; a bundle (model pack, software) is
        # never "already running" from the inventory's point of view and the device settles it itself.
        is_slot_image = manifest_from_bytes(release.manifest).install == "slot"
        up_to_date = {
            d.device_id for d in targets if is_slot_image and d.firmware_version == release.version
        }
        counts = Counter(phases.values())
        layout = ", ".join(
            f"{spec.name}={counts.get(i, 0)}" for i, spec in enumerate(planner.policy.phases)
        )
        rollout = NewRollout(
            rollout_id=rollout_id,
            release_version=policy.release_version,
            policy=policy_to_dict(planner.policy),
            state=RolloutState.RUNNING.value,
            phase=0,
            reason="created",
            devices=phases,
            device_state=DevicePhaseState.PENDING.value,
            audit=[
                ("created", f"release {release.name} {release.version} for {release.hardware_id}; "
                            f"selector {policy.selector!r}; {len(phases)} devices ({layout})"),
            ],
            initial={
                d: (DevicePhaseState.COMMITTED.value, f"already running {release.version}")
                for d in up_to_date
            },
        )
        with self._lock:
            self._rollouts.create(rollout, now)
        return rollout_id

    def pause(self, rollout_id: str, now: float) -> None:
        """Stop offering the update (devices already working on it finish); StateError unless running."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state not in ACTIVE_STATES:
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; only a running one can pause"
                )
            return RolloutUpdate(
                state=RolloutState.PAUSED.value,
                reason="paused by operator",
                audit=[("paused", "by operator")],
            )

        self._operator_change(rollout_id, change, now)

    def resume(self, rollout_id: str, now: float) -> None:
        """Continue a paused rollout. Resuming accepts the failures seen so far (they no longer count
        against the brake or block their phase's gate) and restarts the phase's timeout clock."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state != RolloutState.PAUSED.value:
                raise StateError(
                    f"rollout {rollout_id} is {record.state.lower()}; only a paused one can resume"
                )
            failed = {
                d.device_id
                for d in self._rollouts.devices(rollout_id)
                if DevicePhaseState(d.state) in TERMINAL_DEVICE_STATES
                and d.state != DevicePhaseState.COMMITTED.value
            }
            newly = sorted(failed - record.accepted_failures)
            detail = "by operator" + (f"; accepted failures of {', '.join(newly)}" if newly else "")
            return RolloutUpdate(
                state=RolloutState.RUNNING.value,
                phase_started_at=now,
                reason="resumed by operator",
                accepted_failures=record.accepted_failures | failed,
                audit=[("resumed", _clip(detail))],
            )

        self._operator_change(rollout_id, change, now)

    def abort(self, rollout_id: str, now: float) -> None:
        """End the rollout for good: no device is offered the update any more (finished ones stay)."""

        def change(record: RolloutRecord) -> RolloutUpdate:
            if record.state in (RolloutState.SUCCEEDED.value, RolloutState.ABORTED.value):
                raise StateError(f"rollout {rollout_id} is already {record.state.lower()}")
            return RolloutUpdate(
                state=RolloutState.ABORTED.value,
                reason="aborted by operator",
                audit=[("aborted", "by operator")],
            )

        self._operator_change(rollout_id, change, now)

    def _operator_change(
        self, rollout_id: str, change: Callable[[RolloutRecord], RolloutUpdate], now: float
    ) -> None:
        """Check and write an operator's action against the state it was checked on. Another coordinator
        sharing the database may step the rollout in between; then the check runs again on the new state
        (a few times at most: steps are rare, an operator's click is not worth a livelock)."""
        with self._lock:
            for _ in range(_OPERATOR_ATTEMPTS):
                record = self._record(rollout_id)
                update = dataclasses.replace(change(record), expect=(record.state, record.phase))
                if self._rollouts.update(rollout_id, update, now):
                    return
        raise StateError(f"rollout {rollout_id} kept changing under this request; try again")

    # ------------------------------------------------------------------ the loop

    def tick(self, now: float) -> None:
        """One step of every running rollout: decide, persist (with audit), then publish."""
        for record in self._rollouts.all(states=ACTIVE_STATES):
            self._step(record.rollout_id, now)

    def _step(self, rollout_id: str, now: float) -> None:
        with self._lock:
            record = self._record(rollout_id)
            if record.state not in ACTIVE_STATES:
                return
            planner = RolloutPlanner(policy_from_dict(record.policy))
            devices = self._rollouts.devices(rollout_id)
            view = self._view(record, devices)
            decision = planner.decide(view, now)
            changed = decision.state != view.state or decision.phase != view.phase
            offer = [d for d in decision.offer if view.devices[d][1] is DevicePhaseState.PENDING]
            if changed or offer or decision.reason != record.reason:
                audit: list[tuple[str, str]] = []
                if decision.phase != view.phase:
                    audit.append(("phase", decision.reason))
                if decision.state != view.state:
                    audit.append((decision.state.value.lower(), decision.reason))
                written = self._rollouts.update(
                    rollout_id,
                    RolloutUpdate(
                        state=decision.state.value,
                        phase=decision.phase,
                        phase_started_at=now if decision.phase != view.phase else None,
                        reason=decision.reason,
                        devices={
                            d: DeviceChange(
                                state=DevicePhaseState.OFFERED.value,
                                reason="",
                                delivered=False,
                                only_from=DevicePhaseState.PENDING.value,
                            )
                            for d in offer
                        },
                        audit=audit,
                        expect=(record.state, record.phase),
                    ),
                    now,
                )
                if not written:
                    # Another coordinator or an operator changed the rollout since we read it: decide
                    # again from the new state on the next tick.
                    return
                if self._transitions is not None and (
                    decision.state != view.state or decision.phase != view.phase
                ):
                    self._transitions(
                        rollout_id, f"{view.state.value} phase {view.phase + 1}",
                        f"{decision.state.value} phase {decision.phase + 1}", decision.reason, now,
                    )  # fmt: skip
            if decision.state is not RolloutState.RUNNING:
                return
            # Persisted; now reach the devices. Offered-but-undelivered ones (offline at offer time,
            # or a coordinator that died right after persisting) get the job again on every tick.
            undelivered = [
                d.device_id
                for d in self._rollouts.devices(rollout_id)
                if d.state == DevicePhaseState.OFFERED.value and not d.delivered
            ]
            if not undelivered:
                return
            release = self._release_of(record)
            delivered = {}
            for device_id in undelivered:
                ok = self._publisher.publish_job(
                    device_id, job_id_for(rollout_id, device_id), rollout_id, release.manifest,
                    release.signature,
                )
                if ok:
                    delivered[device_id] = DeviceChange(delivered=True)
            if delivered:
                self._rollouts.update(rollout_id, RolloutUpdate(devices=delivered), now)

    def on_device_status(self, device_id: str, job_id: str, state: str, reason: str, now: float) -> None:
        """Fold an OTA status report into the rollout. Reports for unknown jobs, other devices' jobs or
        unknown states are ignored (a device replays old reports after reconnecting); a device's terminal
        state in a rollout is final."""
        rollout_id, sep, job_device = job_id.partition(":")
        if not sep or job_device != device_id:
            return
        ota_state = state.upper().removeprefix("OTA_STATE_")
        phase_state = OTA_TO_PHASE_STATE.get(ota_state)
        if phase_state is None:
            return
        if phase_state is DevicePhaseState.IN_PROGRESS:
            # Keep the agent's finer state visible (DOWNLOADING, REBOOTING, ...) for the release manager.
            reason = f"{ota_state}: {reason}" if reason else ota_state
        with self._lock:
            if self._rollouts.get(rollout_id) is None:
                return
            current = {d.device_id: d for d in self._rollouts.devices(rollout_id)}.get(device_id)
            if current is None:
                return
            old = DevicePhaseState(current.state)
            if old in TERMINAL_DEVICE_STATES or old is DevicePhaseState.PENDING:
                return
            if old is phase_state and current.reason == _clip(reason):
                return
            self._rollouts.update(
                rollout_id,
                RolloutUpdate(devices={device_id: DeviceChange(
                    state=phase_state.value, reason=_clip(reason), delivered=True)}),
                now,
            )

    # ------------------------------------------------------------------ reads

    def offered_jobs(self, device_id: str) -> list[tuple[str, str, bytes, bytes]]:
        """Jobs waiting for this device as (job_id, rollout_id, manifest, signature): the polling path,
        so a device that missed the push (asleep, NAT) still finds its job."""
        jobs: list[tuple[str, str, bytes, bytes]] = []
        for entry in self._rollouts.of_device(device_id):
            if entry.state != DevicePhaseState.OFFERED.value:
                continue
            record = self._rollouts.get(entry.rollout_id)
            if record is None or record.state != RolloutState.RUNNING.value:
                continue
            release = self._releases.get(record.release_version, str(record.policy.get("release_name", "")))
            if release is not None:
                jobs.append((job_id_for(entry.rollout_id, device_id), entry.rollout_id, release.manifest,
                             release.signature))
        return jobs
