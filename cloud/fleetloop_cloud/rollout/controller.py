"""The rollout driver: turns planner decisions into persisted transitions and published OTA jobs.

Order matters and is the point of this module: every decision (rollout state, phase, the devices now
OFFERED with the terms of their offer, the gate evaluations behind it, a roll-back it spawns) and its
audit rows are committed to the rollouts repository *before* a job is published. If the coordinator dies
between the two, the restarted one finds those devices OFFERED but not delivered and publishes again;
the device side is idempotent by job id. Nothing is kept in memory between calls but a parse cache, so a
new controller object on the same database simply carries on.

With several coordinators exactly one decides: the holder of the controller lease
(:meth:`RolloutRepository.acquire`), and every write it makes carries the lease's fencing token, checked
by the database in the same transaction — a leader paused past its lease (a long GC, SIGSTOP, a VM
migration) that wakes up with a stale decision is refused. Every coordinator still delivers offered jobs
to the devices whose sessions it holds, and folds in their reports.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetloop_cloud.repositories.interfaces import DeviceRepository, ReleaseRepository, RolloutRepository
from fleetloop_cloud.repositories.records import (
    DeviceChange,
    Fence,
    NewGateEvaluation,
    NewRollout,
    ReleaseRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    RolloutUpdate,
)
from fleetloop_cloud.rollout import gating
from fleetloop_cloud.rollout.gating import GateInputs
from fleetloop_cloud.rollout.planner import (
    ACTIVE_DEVICE_STATES,
    ACTIVE_ROLLOUT_STATES,
    DevicePhaseState,
    DeviceView,
    GateStatus,
    RolloutPlanner,
    RolloutState,
    RolloutView,
)
from fleetloop_cloud.rollout.policy import RolloutPolicy, Selection
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_cloud.rollout.targets import TargetSelection, new_rollout
from fleetloop_cloud.rollout.withdrawals import (
    WINDOW_S,
    WITHDRAWN,
    Told,
    Withdrawal,
    in_play,
    withdrawn,
)
from fleetloop_shared.errors import NotFoundError, UserError

log = logging.getLogger("fleetloop.cloud.rollout")

S = DevicePhaseState
#: Agent OTA state name -> the device's state in the rollout.
OTA_TO_PHASE_STATE: dict[str, DevicePhaseState] = {
    "QUEUED": S.IN_PROGRESS,
    "DOWNLOADING": S.IN_PROGRESS,
    "DOWNLOADED": S.IN_PROGRESS,
    "VERIFIED": S.IN_PROGRESS,
    "INSTALLING": S.IN_PROGRESS,
    "REBOOTING": S.IN_PROGRESS,
    "HEALTH_CHECK": S.IN_PROGRESS,
    "COMMITTED": S.COMMITTED,
    "ROLLED_BACK": S.ROLLED_BACK,
    "FAILED": S.FAILED,
    "REJECTED": S.REJECTED,
    # A job canceled on the device did not install: for the brake that is a failure, not a success.
    "CANCELED": S.FAILED,
}
#: Reasons stored per device are cut to this many characters (a hostile device cannot bloat the DB).
MAX_REASON_CHARS = 500
#: Rollouts that ``tick`` steps.
ACTIVE_STATES = tuple(s.value for s in ACTIVE_ROLLOUT_STATES)
#: Rollouts whose devices may still hold an execution (a device runs one update at a time).
HOLDING_STATES = (*ACTIVE_STATES, RolloutState.PAUSED.value, RolloutState.WAITING_APPROVAL.value)
#: Seconds a controller lease lasts without renewal; a successor takes over after it.
LEASE_TTL_S = 15.0


@dataclass(frozen=True)
class Job:
    """One OTA job as a device receives it."""

    job_id: str
    rollout_id: str
    manifest: bytes
    signature: bytes
    #: Install only inside one of these ``[start, end)`` (Unix seconds); empty: at once.
    windows: tuple[tuple[float, float], ...] = ()
    #: Download and verify, then hold the install until a later offer of this job lifts it.
    hold: bool = False


class JobPublisher(Protocol):
    """How the controller reaches devices; owned here, implemented by :class:`~.jobs.OtaJobs` (the
    director signs the device's targets, its session carries the job)."""

    def publish(self, device_id: str, job: Job) -> bool:
        """Send the job; True if it was delivered to a connected device now."""
        ...

    def reachable(self) -> Collection[str]:
        """Devices this coordinator can deliver to now (their sessions are here)."""
        ...

    def withdraw(self, device_id: str, job_id: str, rollout_id: str, reason: str) -> bool:
        """Tell the device to drop the job; True if it was sent to a device connected here now."""
        ...


class ControllerLog(Protocol):
    """Where the controller's own actions are recorded with the controller as their actor (the
    coordinator's audit log); operators' actions are recorded by the rollouts service."""

    def transition(self, rollout_id: str, before: str, after: str, reason: str, now: float) -> None: ...

    def gate(self, rollout_id: str, evaluation: NewGateEvaluation, now: float) -> None: ...

    def created(self, rollout_id: str, parent_id: str, detail: str, now: float) -> None: ...


def job_id_for(rollout_id: str, device_id: str, attempt: int = 1) -> str:
    """A device's job id in a rollout (a retry is a new job: devices refuse to run a job id twice); the
    rollout id never contains ':' and a device id never '#', so the split is unambiguous."""
    return f"{rollout_id}:{device_id}" if attempt <= 1 else f"{rollout_id}:{device_id}#{attempt}"


def parse_job_id(job_id: str) -> tuple[str, str, int] | None:
    """(rollout id, device id, attempt) of a job id, or None for one that is not ours."""
    rollout_id, sep, rest = job_id.partition(":")
    if not sep or not rest:
        return None
    device_id, _, attempt = rest.partition("#")
    if attempt and not attempt.isdigit():
        return None
    return rollout_id, device_id, int(attempt) if attempt else 1


def clip(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


#: State names to states: a dict lookup, much cheaper per device per tick than the enum's constructor.
_STATES = {s.value: s for s in DevicePhaseState}


def device_view(d: RolloutDeviceRecord, time_zone: str = "") -> DeviceView:
    # positional: this runs once per device of every active rollout on every tick
    return DeviceView(
        d.phase, _STATES[d.state], d.attempt, d.changed_at, d.offered_at, d.retry_at or None, time_zone,
        bool(d.windows),
    )  # fmt: skip


def _views(devices: Sequence[RolloutDeviceRecord], zones: Mapping[str, str]) -> dict[str, DeviceView]:
    """The planner's view of every device (zones only matter for windows in device-local time)."""
    states, view = _STATES, DeviceView
    if zones:
        return {d.device_id: device_view(d, zones.get(d.device_id, "")) for d in devices}
    return {
        d.device_id: view(
            d.phase, states[d.state], d.attempt, d.changed_at, d.offered_at, d.retry_at or None, "",
            bool(d.windows),
        )
        for d in devices
    }  # fmt: skip


class RolloutController:
    """Creates rollouts, steps them with the planner (while it holds the lease), publishes jobs and folds
    device reports back in. One lock serialises this object's own steps so a device report cannot
    interleave with a decision that is being persisted."""

    def __init__(
        self,
        rollouts: RolloutRepository,
        releases: ReleaseRepository,
        devices: DeviceRepository,
        publisher: JobPublisher,
        *,
        log_to: ControllerLog | None = None,
        gate_inputs: GateInputs | None = None,
        holder: str = "",
        lease_ttl_s: float = LEASE_TTL_S,
        stepped: Callable[[], None] = lambda: None,
    ) -> None:
        self._rollouts = rollouts
        self._releases = releases
        self._devices = devices
        self._publisher = publisher
        self._log = log_to
        self._gate_inputs = gate_inputs
        #: This controller's name in the lease (unique per process: a paused process and its successor
        #: must never share one).
        self.holder = holder or f"controller-{secrets.token_hex(6)}"
        self.lease_ttl_s = lease_ttl_s
        #: Told after a tick whose decisions were written (the other coordinators deliver at once).
        self._stepped = stepped
        self._lock = threading.RLock()
        #: Held while jobs are published and marked delivered, and while a new session's offered jobs are
        #: marked undelivered: a job published on a session that a hello then replaced is never marked
        #: delivered after that hello's reset (it would wait for the success timeout).
        self._delivery = threading.Lock()
        self._planners: dict[str, tuple[str, RolloutPlanner]] = {}
        self.targets = TargetSelection(rollouts, releases, devices)
        self._told = Told()

    # ------------------------------------------------------------------ helpers

    def planner_of(self, record: RolloutRecord) -> RolloutPlanner:
        """The record's planner (parsing a policy costs more than a tick's decision: cached per policy)."""
        key = repr(sorted(record.policy.items()))
        cached = self._planners.get(record.rollout_id)
        if cached is None or cached[0] != key:
            cached = (key, RolloutPlanner(parse_policy(record.policy)))
            self._planners[record.rollout_id] = cached
        return cached[1]

    def release_of(self, record: RolloutRecord) -> ReleaseRecord:
        return self.targets.release(record.release_version, str(record.policy["release"].get("name", "")))

    def _zones(self, devices: Sequence[RolloutDeviceRecord], planner: RolloutPlanner) -> dict[str, str]:
        """Reported zones, read only when the policy has windows in device-local time."""
        if not any(w.time_zone == "device" for w in planner.policy.maintenance.windows):
            return {}
        zones = {}
        for d in devices:
            if d.state == S.PENDING.value:
                record = self._devices.get(d.device_id)
                if record is not None and record.time_zone:
                    zones[d.device_id] = record.time_zone
        return zones

    # ------------------------------------------------------------------ creating

    def create(self, policy: RolloutPolicy, now: float) -> str:
        """Select the target devices, assign phases and persist the rollout (RUNNING, or CREATED until
        its scheduled start). Devices already running the release start COMMITTED."""
        rollout = new_rollout(self.targets, policy, now)
        with self._lock:
            self._rollouts.create(rollout, now)
        return rollout.rollout_id

    # ------------------------------------------------------------------ the loop

    def lead(self, now: float) -> Fence | None:
        """Take or renew the controller lease: the fence to write under, or None (another leads)."""
        token = self._rollouts.acquire(self.holder, now, self.lease_ttl_s)
        return None if token is None else Fence(self.holder, token)

    def release_lease(self) -> None:
        """A clean stop: another coordinator may lead at once."""
        self._rollouts.release(self.holder)

    def tick(self, now: float) -> None:
        """Decide (if this controller holds the lease), then deliver offered jobs to devices here.

        The devices of each rollout are read once per tick; only a rollout whose step just offered
        devices is read again for delivery (a tick's reads are most of its cost on a large fleet)."""
        fence = self.lead(now)
        records = self._rollouts.all(states=HOLDING_STATES)
        members = {r.rollout_id: self._rollouts.devices(r.rollout_id) for r in records}
        wrote = False
        if fence is not None:
            busy = _busy(records, members)
            for record in records:
                if record.state not in ACTIVE_STATES:
                    continue
                written = self._step(
                    record, members[record.rollout_id], busy.get(record.rollout_id, frozenset()), now, fence
                )
                if written is None:
                    break  # the lease is gone: another coordinator decides from here on
                if written:
                    wrote = True
                    del members[record.rollout_id]  # changed: delivery reads it again
        if wrote:
            self._stepped()
        self.deliver(now, members)
        self.withdraw(now, records, members)

    def withdraw(
        self, now: float, records: Sequence[RolloutRecord], known: Mapping[str, Sequence[RolloutDeviceRecord]]
    ) -> int:
        """Tell each device here that holds a withdrawn job (its rollout aborted, its offer withdrawn, or
        the device removed) to drop it, once per job; returns how many were told. ``records``/``known``:
        the holding rollouts and devices this tick read."""
        reachable = set(self._publisher.reachable())
        if not reachable:
            return 0
        # ended lately: an abort withdraws its jobs; a success may leave removed devices holding one
        ended = [r for r in self._rollouts.all(states=_ENDED) if now - r.updated_at <= WINDOW_S]
        candidates: list[Withdrawal] = []
        for record in [*records, *ended]:
            members = known.get(record.rollout_id)
            if members is None:
                members = self._rollouts.devices(record.rollout_id)
            candidates += withdrawn(record, members, now, job_id_for)
        told = 0
        for w in self._told.due(candidates, reachable):
            if self._publisher.withdraw(w.device_id, w.job_id, w.rollout_id, w.reason):
                self._told.mark(w)
                told += 1
        return told

    def _step(
        self,
        record: RolloutRecord,
        devices: list[RolloutDeviceRecord],
        busy: frozenset[str],
        now: float,
        fence: Fence,
    ) -> bool | None:
        """One decision for one rollout: whether it wrote a change, None when the fence refused the
        write (this controller lost the lease)."""
        with self._lock:
            planner = self.planner_of(record)
            policy = planner.policy
            joined: dict[str, tuple[int, str]] = {}
            if policy.target.selection is Selection.CONTINUOUS:
                joined = self.targets.newcomers(record, policy, devices)
            devices = in_play(devices)  # removed devices: never offered again, counted nowhere
            evaluations = self._evaluate_gates(record, devices, planner, now)
            latest = {
                name: GateStatus(e.decision, e.reason)
                for name, e in self._rollouts.latest_evaluations(record.rollout_id, record.phase).items()
            }
            latest.update({e.gate: GateStatus(e.decision, e.reason) for e in evaluations})
            zones = self._zones(devices, planner)
            view = RolloutView(
                state=RolloutState(record.state),
                phase=record.phase,
                phase_started_at=record.phase_started_at,
                devices=_views(devices, zones),
                accepted_failures=record.accepted_failures,
                gates=latest,
                busy=busy,
            )
            decision = planner.decide(view, now)
            moved = decision.state != view.state or decision.phase != view.phase
            changes: dict[str, DeviceChange] = {}
            already = self.targets.already_running(record, [o.device_id for o in decision.offers])
            for offer in decision.offers:
                if offer.device_id in already:
                    changes[offer.device_id] = DeviceChange(
                        state=S.COMMITTED.value,
                        reason=f"already running {record.release_version}",
                        only_from=S.PENDING.value,
                    )
                    continue
                changes[offer.device_id] = DeviceChange(
                    state=S.OFFERED.value,
                    reason="",
                    delivered=False,
                    only_from=S.PENDING.value,
                    attempt=offer.attempt,
                    offered_at=now,
                    retry_at=0.0,
                    windows=offer.windows,
                    hold=offer.hold,
                )
            for device_id in decision.timeouts:
                settled = planner.settle(view.devices[device_id], S.TIMED_OUT, "in progress too long", now)
                changes[device_id] = DeviceChange(
                    state=settled.state.value,
                    reason=clip(settled.reason),
                    retry_at=settled.retry_at or 0.0,
                    only_from=S.IN_PROGRESS.value,
                )
            for device_id in decision.cancel:
                changes[device_id] = DeviceChange(
                    state=S.CANCELED.value,
                    reason=WITHDRAWN + decision.reason,
                    only_from=S.OFFERED.value,
                )
            for offer in decision.reoffers:
                changes[offer.device_id] = DeviceChange(
                    windows=(),
                    hold=False,
                    delivered=False,
                    reason="install forced now",
                    only_from=S.WAITING.value,
                )
            spawn: list[NewRollout] = []
            audit: list[tuple[str, str]] = [("gate", gating.summary(e.gate, e)) for e in evaluations]
            if decision.roll_back and moved:
                spawn, notes = self.targets.rollbacks(record, devices, now, why=decision.reason)
                audit += [("rollback", note) for note in notes]
            if decision.phase != view.phase:
                audit.append(("phase", decision.reason))
            if decision.state != view.state:
                audit.append((decision.state.value.lower(), decision.reason))
            if not (moved or changes or evaluations or joined or decision.reason != record.reason):
                return False
            written = self._rollouts.update(
                record.rollout_id,
                RolloutUpdate(
                    state=decision.state.value,
                    phase=decision.phase,
                    phase_started_at=now if decision.phase != view.phase else None,
                    reason=decision.reason,
                    devices=changes,
                    audit=audit,
                    expect=(record.state, record.phase),
                    fence=fence,
                    gates=evaluations,
                    joined=joined,
                    spawn=spawn,
                ),
                now,
            )
            if not written:
                # Another coordinator or an operator changed the rollout since we read it (decided again
                # on the next tick), or this controller lost the lease.
                lease = self._rollouts.lease()
                return False if lease is not None and lease[:2] == (fence.holder, fence.token) else None
            if self._log is not None:
                for e in evaluations:
                    self._log.gate(record.rollout_id, e, now)
                if moved:
                    self._log.transition(
                        record.rollout_id,
                        f"{view.state.value} phase {view.phase + 1}",
                        f"{decision.state.value} phase {decision.phase + 1}",
                        decision.reason,
                        now,
                    )
                for child in spawn:
                    self._log.created(child.rollout_id, record.rollout_id, child.reason, now)
            return True

    def _evaluate_gates(
        self,
        record: RolloutRecord,
        devices: Sequence[RolloutDeviceRecord],
        planner: RolloutPlanner,
        now: float,
    ) -> list[NewGateEvaluation]:
        """The gates of the current phase whose interval has passed, evaluated now."""
        gates = planner.policy.gates_of(record.phase)
        if not gates or self._gate_inputs is None or record.state != RolloutState.RUNNING.value:
            return []
        last = self._rollouts.latest_evaluations(record.rollout_id, record.phase)
        due = [g for g in gates if g.name not in last or now - last[g.name].at >= g.interval_s]
        if not due:
            return []
        cohorts = gating.cohorts_of(devices)
        return [
            gating.as_record(record.phase, g, gating.evaluate(g, cohorts, self._gate_inputs, now))
            for g in due
        ]

    # ------------------------------------------------------------------ delivery

    def job_for(self, record: RolloutRecord, d: RolloutDeviceRecord) -> Job:
        release = self.release_of(record)
        return Job(
            job_id_for(record.rollout_id, d.device_id, d.attempt),
            record.rollout_id,
            release.manifest,
            release.signature,
            d.windows,
            d.hold,
        )

    def deliver(self, now: float, known: Mapping[str, Sequence[RolloutDeviceRecord]] | None = None) -> int:
        """Publish every offered, undelivered job of a running rollout to its device, if the device's
        session is here; returns how many were delivered. Offered-but-undelivered jobs (the device was
        offline, or a coordinator died right after persisting) go out again on every tick. ``known``:
        devices of rollouts read earlier in this tick and not changed since by this controller."""
        reachable = set(self._publisher.reachable())
        if not reachable:
            return 0
        sent = 0
        for record in self._rollouts.all(states=(RolloutState.RUNNING.value,)):
            members = known.get(record.rollout_id) if known is not None else None
            if members is None:
                members = self._rollouts.devices(record.rollout_id)
            waiting = [
                d
                for d in members
                if not d.delivered and d.state in _DELIVERABLE and d.device_id in reachable
                and not d.removed_at
            ]  # fmt: skip
            delivered: dict[str, DeviceChange] = {}
            with self._delivery:
                for d in waiting:
                    if self._publisher.publish(d.device_id, self.job_for(record, d)):
                        delivered[d.device_id] = DeviceChange(delivered=True, only_attempt=d.attempt)
                if delivered:
                    self._rollouts.update(record.rollout_id, RolloutUpdate(devices=delivered), now)
                    sent += len(delivered)
        return sent

    def on_device_connected(self, device_id: str, now: float) -> None:
        """A new session of ``device_id`` (its hello): its offered jobs go out again. A job queued on a
        session that ended before the device read it (a coordinator killed, a link cut) was marked
        delivered, and would otherwise wait for its rollout's success timeout; a device that has the job
        already ignores it (jobs are idempotent by id). A device that reported on the job is past
        OFFERED and gets nothing again; only running rollouts deliver, so only their offers are reset (a
        paused rollout's offer stays delivered: the device may hold it, and no other rollout may offer it
        another job meanwhile)."""
        with self._delivery:
            for d in self._rollouts.of_device(device_id):
                if not (d.delivered and d.state == S.OFFERED.value and not d.removed_at):
                    continue
                record = self._rollouts.get(d.rollout_id)
                if record is None or record.state != RolloutState.RUNNING.value:
                    continue
                change = DeviceChange(delivered=False, only_from=S.OFFERED.value, only_attempt=d.attempt)
                self._rollouts.update(d.rollout_id, RolloutUpdate(devices={device_id: change}), now)

    def on_device_status(
        self,
        device_id: str,
        job_id: str,
        state: str,
        reason: str,
        now: float,
        *,
        running_version: str = "",
        waiting: bool = False,
    ) -> None:
        """Fold an OTA status report into the rollout. Reports for unknown jobs, other devices' jobs,
        older attempts or unknown states are ignored (a device replays old reports after reconnecting); a
        device's terminal state in a rollout is final. A failure may send the device round again
        (the policy's retries)."""
        parsed = parse_job_id(job_id)
        if parsed is None or parsed[1] != device_id:
            return
        rollout_id, _, attempt = parsed
        ota_state = state.upper().removeprefix("OTA_STATE_")
        phase_state = OTA_TO_PHASE_STATE.get(ota_state)
        if phase_state is None:
            return
        if phase_state is S.IN_PROGRESS:
            if waiting:
                phase_state = S.WAITING
            # Keep the agent's finer state visible (DOWNLOADING, REBOOTING, ...) for the release manager.
            reason = f"{ota_state}: {reason}" if reason else ota_state
        with self._lock:
            record = self._rollouts.get(rollout_id)
            if record is None:
                return
            entries = self._rollouts.of_device(device_id)
            current = next((d for d in entries if d.rollout_id == rollout_id), None)
            if current is None or current.attempt != attempt:
                return
            old = DevicePhaseState(current.state)
            held = withdrawn(record, [current], now, job_id_for, window_s=math.inf)
            if held and phase_state is not S.CANCELED and phase_state.value not in _FINAL:
                # told to drop it, the device still holds it (an agent that was offline, or restarted):
                # tell it again now, while it is here
                self._told.forget(device_id, job_id)
                self._publisher.withdraw(device_id, job_id, rollout_id, held[0].reason)
            if ota_state == "CANCELED" and held:
                phase_state = S.CANCELED  # dropped as asked: not a failure of the device
            if old in (S.PENDING, S.COMMITTED, S.CANCELED) or old.value in _FINAL:
                return
            running = clip(running_version) if running_version else None
            if (
                old is phase_state
                and current.reason == clip(reason)
                and running in (None, current.running_version)
            ):
                return
            retry_at = 0.0
            if phase_state.value in _FINAL and phase_state is not S.CANCELED and not current.removed_at:
                # (a removed device's end is recorded as it is: it is never offered again, so no retry)
                settled = self.planner_of(record).settle(device_view(current), phase_state, clip(reason), now)
                phase_state, reason, retry_at = settled.state, settled.reason, settled.retry_at or 0.0
            self._rollouts.update(
                rollout_id,
                RolloutUpdate(
                    devices={
                        device_id: DeviceChange(
                            state=phase_state.value,
                            reason=clip(reason),
                            delivered=True,
                            running_version=running,
                            retry_at=retry_at,
                            only_attempt=attempt,
                        )
                    }
                ),
                now,
            )

    # ------------------------------------------------------------------ reads

    def offered_jobs(self, device_id: str) -> list[Job]:
        """Jobs waiting for this device: the polling path, so a device that missed the push (asleep,
        NAT) still finds its job."""
        jobs: list[Job] = []
        for entry in self._rollouts.of_device(device_id):
            if entry.state not in (S.OFFERED.value, S.WAITING.value) or entry.removed_at:
                continue
            record = self._rollouts.get(entry.rollout_id)
            if record is None or record.state != RolloutState.RUNNING.value:
                continue
            try:
                jobs.append(self.job_for(record, entry))
            except (NotFoundError, UserError):
                continue
        return jobs


#: Failure states a report may end an execution in (COMMITTED is final too, but never retried).
_FINAL = frozenset(
    {S.COMMITTED.value, S.FAILED.value, S.ROLLED_BACK.value, S.REJECTED.value, S.TIMED_OUT.value}
)


def _busy(
    records: Sequence[RolloutRecord],
    members: Mapping[str, Sequence[RolloutDeviceRecord]],
) -> dict[str, frozenset[str]]:
    """Per rollout, the devices it must not offer now: those executing another rollout's job, and those
    pending in a heavier (or, equally heavy, older) active rollout too."""
    if len(records) == 1:  # alone: nothing of its own can be busy elsewhere
        return {records[0].rollout_id: frozenset()}
    holding: dict[str, str] = {}
    claims: dict[str, tuple[int, int, str]] = {}
    offered, pending = S.OFFERED.value, S.PENDING.value
    for rank, record in enumerate(records):
        weight = int(record.policy.get("weight", 0) or 0)
        active = record.state in ACTIVE_STATES
        for d in members[record.rollout_id]:
            state = d.state
            if state in _HOLDING and (state != offered or d.delivered or (active and not d.removed_at)):
                # (an offer withdrawn by a removal before it reached the device holds nothing)
                holding[d.device_id] = record.rollout_id
            elif active and state == pending:
                key = (-weight, rank, record.rollout_id)
                if d.device_id not in claims or key < claims[d.device_id]:
                    claims[d.device_id] = key
    out: dict[str, set[str]] = {r.rollout_id: set() for r in records}
    for record in records:
        if record.state not in ACTIVE_STATES:
            continue
        rid = record.rollout_id
        mine = out[rid]
        for d in members[rid]:
            owner = holding.get(d.device_id)
            if (owner is not None and owner != rid) or (
                d.state == pending and claims.get(d.device_id, (0, 0, rid))[2] != rid
            ):
                mine.add(d.device_id)
    return {rid: frozenset(v) for rid, v in out.items()}


_HOLDING = frozenset(s.value for s in ACTIVE_DEVICE_STATES)
_DELIVERABLE = frozenset({S.OFFERED.value, S.WAITING.value})
_ENDED = (RolloutState.ABORTED.value, RolloutState.SUCCEEDED.value)
