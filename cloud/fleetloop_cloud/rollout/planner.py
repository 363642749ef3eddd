"""Rollout planning: which devices get the update next, and when a rollout opens, pauses or finishes.

This is the pure half of the rollout controller (no I/O, ``now`` passed in), so every gate and brake can
be tested as a table of scenarios — and as properties over random fleets — and a restarted coordinator
reaches the same decision from the same persisted view. The policy (:mod:`.policy`) says what to do; the
view says where the rollout stands: every device's phase and execution state, the latest decision of
each signal gate, the devices another rollout holds.

The invariants everything else protects, each a property test (``tests/cloud/test_rollout_properties.py``):

* no device outside the current (or an earlier) phase is ever offered the update;
* no more devices are offered in any minute than the rate allows;
* a device asked to install inside maintenance windows is sent only windows of its policy, in its zone;
* a tripped brake (abort criterion) or signal gate always stops the rollout (no offers, paused or aborted).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from fleetloop_cloud.rollout.policy import (
    BrakeAction,
    EndBehavior,
    FailureType,
    InstallType,
    PhaseSpec,
    RateCriterion,
    RolloutPolicy,
    Selection,
    SuccessAction,
    WindowScope,
)
from fleetloop_cloud.rollout.windows import WINDOW_HORIZON_S, check_zone, inside, windows_between
from fleetloop_shared.errors import UserError

__all__ = ["DevicePhaseState", "PhaseSpec", "RolloutPolicy", "RolloutState"]


class DevicePhaseState(StrEnum):
    """A device's execution within a rollout (the agent's OTA states, folded to what the planner needs)."""

    PENDING = "PENDING"
    OFFERED = "OFFERED"
    IN_PROGRESS = "IN_PROGRESS"
    #: Downloaded and verified; the install waits for a maintenance window (or, download-only, is held).
    WAITING = "WAITING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    #: The rollout withdrew the offer before the device started (schedule end with ``cancel``).
    CANCELED = "CANCELED"


class RolloutState(StrEnum):
    CREATED = "CREATED"  # scheduled: waiting for its start time
    RUNNING = "RUNNING"
    WAITING_APPROVAL = "WAITING_APPROVAL"  # a phase passed; ``rollout approve`` opens the next
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    ABORTED = "ABORTED"


S = DevicePhaseState
#: Device states after which the device will not change any more in this rollout.
TERMINAL_DEVICE_STATES = frozenset(
    {S.COMMITTED, S.FAILED, S.ROLLED_BACK, S.REJECTED, S.TIMED_OUT, S.CANCELED}
)
#: Terminal device states that are failures, and the failure type each one is.
FAILURE_TYPES: Mapping[DevicePhaseState, FailureType] = {
    S.FAILED: FailureType.FAILED,
    S.ROLLED_BACK: FailureType.ROLLED_BACK,
    S.REJECTED: FailureType.REJECTED,
    S.TIMED_OUT: FailureType.TIMED_OUT,
}
FAILURE_DEVICE_STATES = frozenset(FAILURE_TYPES)
#: Devices still working on their job (an execution in progress, for "one update at a time").
ACTIVE_DEVICE_STATES = frozenset({S.OFFERED, S.IN_PROGRESS, S.WAITING})
#: Rollout states the planner never leaves on its own (only an operator acts on them).
SETTLED_ROLLOUT_STATES = frozenset(
    {RolloutState.PAUSED, RolloutState.WAITING_APPROVAL, RolloutState.SUCCEEDED, RolloutState.ABORTED}
)
#: Rollout states the controller steps.
ACTIVE_ROLLOUT_STATES = frozenset({RolloutState.CREATED, RolloutState.RUNNING})
#: A device is never offered twice within this many seconds (a retry waits at least this long), so the
#: rate, counted over the last offer of each device, is exact.
RATE_WINDOW_S = 60.0


def counts_as(state: DevicePhaseState, failure_type: FailureType) -> bool:
    """Whether a device in ``state`` failed in the way ``failure_type`` names."""
    actual = FAILURE_TYPES.get(state)
    if actual is None:
        return False
    if failure_type is FailureType.ALL or actual is failure_type:
        return True
    return failure_type is FailureType.FAILED and actual is FailureType.ROLLED_BACK


def _order_key(release_version: str, device_id: str) -> bytes:
    # Hash order spreads canaries over the fleet (not the alphabetically first ids) and, salted with
    # the release, does not make the same devices the canaries of every release.
    return hashlib.sha256(f"{release_version}\x00{device_id}".encode()).digest()


def hash_order(release_version: str, device_ids: Sequence[str]) -> list[str]:
    """``device_ids`` in the rollout's deterministic order (independent of the input order)."""
    return sorted(device_ids, key=lambda d: (_order_key(release_version, d), d))


def assign_phases(device_ids: Sequence[str], policy: RolloutPolicy) -> dict[str, int]:
    """Place every device in exactly one phase, deterministically (independent of the input order).

    Percents are cumulative and rounded up, and a phase with ``percent > 0`` gets at least one device
    while devices remain, so a 1 % canary on a small fleet is still a canary.
    """
    if len(set(device_ids)) != len(device_ids):
        raise UserError("assign_phases: device ids must be unique")
    ordered = hash_order(policy.release_version, device_ids)
    n = len(ordered)
    result: dict[str, int] = {}
    placed = 0
    last = len(policy.phases) - 1
    for index, phase in enumerate(policy.phases):
        if index == last:
            target = n
        elif phase.percent is not None:
            target = math.ceil(n * phase.percent / 100.0 - 1e-9)
            if phase.percent > 0:
                target = max(target, placed + 1)
        elif phase.count is not None:
            target = placed + phase.count
        else:
            target = n
        target = min(max(target, placed), n)
        for device_id in ordered[placed:target]:
            result[device_id] = index
        placed = target
    return result


class DeviceView(NamedTuple):
    """One device as the planner sees it. A tuple: the controller builds one per device of a rollout
    on every tick, and a tuple is built several times faster than a frozen dataclass."""

    phase: int
    state: DevicePhaseState
    #: Offers made to this device so far (its job id carries the attempt).
    attempt: int = 0
    #: When the state last changed (an execution in progress times out from here).
    changed_at: float = 0.0
    #: When the device was last offered the update.
    offered_at: float | None = None
    #: A PENDING device after a retryable failure is not offered before this.
    retry_at: float | None = None
    #: The IANA zone the device reported ("" if none).
    time_zone: str = ""
    #: The job the device holds says "install inside windows" (a timeforced rollout lifts that).
    windowed: bool = False


@dataclass(frozen=True)
class GateStatus:
    """The latest evaluation of one signal gate in the current phase."""

    decision: str  # "pass" | "trip" | "insufficient"
    reason: str = ""


@dataclass(frozen=True)
class RolloutView:
    """What the planner needs to decide: the rollout's state and every device's execution.

    ``accepted_failures`` are devices whose failure an operator accepted by resuming; they no longer
    count against the brake nor block their phase's gate. ``busy`` are devices another rollout holds
    (a device runs one update at a time; heavier rollouts first). ``gates`` holds the latest decision of
    each signal gate evaluated in the current phase.
    """

    state: RolloutState
    phase: int
    phase_started_at: float
    devices: Mapping[str, DeviceView]
    accepted_failures: frozenset[str] = field(default_factory=frozenset)
    gates: Mapping[str, GateStatus] = field(default_factory=dict)
    busy: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Offer:
    """The update for one device now: its attempt, and when it may install.

    ``windows`` non-empty: install only inside one of these ``[start, end)`` (Unix seconds). ``hold``:
    download and verify now, install only when a later offer of the same job lifts the hold.
    """

    device_id: str
    attempt: int
    windows: tuple[tuple[float, float], ...] = ()
    hold: bool = False


@dataclass(frozen=True)
class Decision:
    """The planner's answer: the rollout's next state and phase, and what changes for which devices."""

    state: RolloutState
    phase: int
    offers: tuple[Offer, ...]
    reason: str
    #: Devices whose execution in progress ran out of time (each then goes through :meth:`settle`).
    timeouts: tuple[str, ...] = ()
    #: Offered devices that have not started: their offer is withdrawn (CANCELED).
    cancel: tuple[str, ...] = ()
    #: Devices waiting to install whose job changes now (a timeforced rollout reached ``forced_at``).
    reoffers: tuple[Offer, ...] = ()
    #: An abort criterion or signal gate said abort-and-roll-back: the controller creates the rollback.
    roll_back: bool = False

    @property
    def offer(self) -> tuple[str, ...]:
        return tuple(o.device_id for o in self.offers)


@dataclass(frozen=True)
class Settlement:
    """What becomes of a device whose execution just ended: its state, reason and (retry) time."""

    state: DevicePhaseState
    reason: str
    retry_at: float | None = None


def _pct(numerator: int, denominator: int) -> str:
    return f"{100.0 * numerator / denominator:.0f}%" if denominator else "0%"


@dataclass
class _Tally:
    """One pass over the devices: what every rule below needs."""

    executed: int = 0
    failures: dict[DevicePhaseState, int] = field(default_factory=dict)
    total: int = 0
    succeeded: int = 0
    unfinished: int = 0
    notified: int = 0
    offered_last_minute: int = 0
    phase_members: int = 0
    phase_succeeded: int = 0
    done_up_to_phase: bool = True
    pending: list[tuple[int, str]] = field(default_factory=list)
    timeouts: list[str] = field(default_factory=list)
    offered_unstarted: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


class RolloutPlanner:
    """Decides one step of one rollout from its persisted view; holds nothing but the policy."""

    def __init__(self, policy: RolloutPolicy) -> None:
        if not policy.phases:
            raise UserError("phases: a rollout needs at least one phase")
        self._policy = policy

    @property
    def policy(self) -> RolloutPolicy:
        return self._policy

    def _phase_label(self, phase: int) -> str:
        return f"phase {phase + 1} {self._policy.phases[phase].name!r}"

    # -- per device -------------------------------------------------------------------------------
    def succeeded(self, state: DevicePhaseState) -> bool:
        """Committed — or, for a download-only rollout, holding the verified payload."""
        return state is S.COMMITTED or (
            state is S.WAITING and self._policy.install.type is InstallType.DOWNLOADONLY
        )

    def done(self, state: DevicePhaseState) -> bool:
        return state in TERMINAL_DEVICE_STATES or self.succeeded(state)

    def settle(self, device: DeviceView, ended: DevicePhaseState, reason: str, now: float) -> Settlement:
        """A device's execution ended in ``ended``: final, or PENDING again for a retry (Mender's
        retries; the backoff grows by the rule's factor per attempt, and is at least a minute)."""
        failure = FAILURE_TYPES.get(ended)
        if failure is not None:
            for rule in self._policy.execution.retries:
                if not counts_as(ended, rule.failure_type):
                    continue
                if device.attempt <= rule.max:
                    delay = rule.backoff_s * rule.factor ** max(device.attempt - 1, 0)
                    retry_at = max(now + delay, (device.offered_at or now) + RATE_WINDOW_S)
                    text = f"retry {device.attempt} of {rule.max} after {ended.value}"
                    return Settlement(S.PENDING, f"{text}: {reason}" if reason else text, retry_at)
                break
        return Settlement(ended, reason)

    def rate_per_minute(self, notified: int, succeeded: int) -> float | None:
        """The offers allowed per minute now (None: unlimited)."""
        rate = self._policy.rate
        limit = rate.max_per_minute
        if rate.exponential is not None:
            e = rate.exponential
            count = notified if e.criterion is RateCriterion.NOTIFIED else succeeded
            steps = min(count // e.increase_after, 1000)
            grown = (
                e.base_per_minute * e.increment_factor**steps if e.increment_factor > 1 else e.base_per_minute
            )
            limit = grown if limit is None else min(limit, grown)
        return limit

    def _windows_for(
        self, time_zone: str, now: float, cache: dict[str, tuple[tuple[float, float], ...]]
    ) -> tuple[tuple[float, float], ...]:
        m = self._policy.maintenance
        device_zone = time_zone if time_zone and check_zone(time_zone) else m.default_time_zone
        if device_zone not in cache:
            specs = [
                (w.cron, w.duration_s, device_zone if w.time_zone == "device" else w.time_zone)
                for w in m.windows
            ]
            cache[device_zone] = windows_between(specs, now, now + WINDOW_HORIZON_S)
        return cache[device_zone]

    def _install_terms(self, now: float) -> tuple[bool, bool]:
        """(install inside windows, hold the install) for offers made now."""
        install, m = self._policy.install, self._policy.maintenance
        if install.type is InstallType.DOWNLOADONLY:
            return False, True
        in_windows = bool(m.windows) and m.scope is WindowScope.INSTALL
        if install.type is InstallType.FORCED or (
            install.type is InstallType.TIMEFORCED
            and install.forced_at is not None
            and now >= install.forced_at
        ):
            in_windows = False
        return in_windows, False

    # -- the step ---------------------------------------------------------------------------------
    def _tally(self, view: RolloutView, phase: int, now: float) -> _Tally:
        t = _Tally()
        timeout = self._policy.execution.in_progress_timeout_s
        since = now - RATE_WINDOW_S
        for device_id, d in view.devices.items():
            state = d.state
            t.total += 1
            accepted = device_id in view.accepted_failures
            succeeded = self.succeeded(state)
            done = succeeded or state in TERMINAL_DEVICE_STATES
            t.succeeded += succeeded
            t.unfinished += not done
            if d.attempt > 0:
                t.notified += 1
            if d.offered_at is not None and d.offered_at > since:
                t.offered_last_minute += 1
            if done and not accepted and state is not S.CANCELED:
                t.executed += 1
                if state in FAILURE_TYPES:
                    t.failures[state] = t.failures.get(state, 0) + 1
            if d.phase == phase and not accepted:
                t.phase_members += 1
                t.phase_succeeded += succeeded
            if d.phase <= phase and not done:
                t.done_up_to_phase = False
            if state is S.PENDING:
                t.pending.append((d.phase, device_id))
            elif state is S.OFFERED:
                t.offered_unstarted.append(device_id)
            elif state is S.IN_PROGRESS and timeout is not None and now - d.changed_at > timeout:
                t.timeouts.append(device_id)
            elif state is S.WAITING:
                t.waiting.append(device_id)
        t.pending.sort()
        return t

    def _brake(self, t: _Tally) -> tuple[BrakeAction, str] | None:
        """The first abort criterion that holds: its action and why."""
        for rule in self._policy.abort:
            if t.executed < rule.min_executed or t.executed == 0:
                continue
            failures = sum(n for s, n in t.failures.items() if counts_as(s, rule.failure_type))
            if failures * 100.0 > rule.threshold_percent * t.executed:
                return rule.action, (
                    f"{rule.failure_type.value} rate {_pct(failures, t.executed)} ({failures} of "
                    f"{t.executed} executed) above {rule.threshold_percent:g}%"
                )
        return None

    def _tripped_gate(self, view: RolloutView, phase: int) -> tuple[BrakeAction, str] | None:
        for gate in self._policy.gates_of(phase):
            status = view.gates.get(gate.name)
            if status is not None and status.decision == "trip":
                return gate.action, f"signal gate {gate.name!r} tripped: {status.reason}"
        return None

    def _gates_pass(self, view: RolloutView, phase: int) -> tuple[bool, str]:
        waiting = [
            g.name
            for g in self._policy.gates_of(phase)
            if view.gates.get(g.name, GateStatus("insufficient")).decision != "pass"
        ]
        return not waiting, (f"gates not yet passed: {', '.join(waiting)}" if waiting else "")

    def _stop(self, action: BrakeAction, phase: int, reason: str) -> Decision:
        if action is BrakeAction.PAUSE:
            return Decision(RolloutState.PAUSED, phase, (), reason)
        return Decision(RolloutState.ABORTED, phase, (), reason, roll_back=action is BrakeAction.ROLL_BACK)

    def decide(self, view: RolloutView, now: float) -> Decision:
        """The next step. Settled rollouts (paused, waiting for approval, aborted, succeeded) are left
        exactly as they are."""
        if view.state in SETTLED_ROLLOUT_STATES:
            return Decision(view.state, view.phase, (), f"rollout is {view.state.value.lower()}")
        policy = self._policy
        phases = policy.phases
        phase = min(max(view.phase, 0), len(phases) - 1)
        schedule = policy.schedule
        if schedule.start_at is not None and now < schedule.start_at:
            return Decision(RolloutState.CREATED, phase, (), f"scheduled to start at {schedule.start_at:.0f}")
        t = self._tally(view, phase, now)
        timeouts = tuple(t.timeouts)

        if schedule.end_at is not None and now >= schedule.end_at:
            cancel = tuple(t.offered_unstarted) if schedule.end_behavior is EndBehavior.CANCEL else ()
            return Decision(
                RolloutState.ABORTED,
                phase,
                (),
                "schedule ended: no new offers" + ("; unstarted offers canceled" if cancel else ""),
                timeouts,
                cancel,
            )

        brake = self._brake(t)
        if brake is not None:
            return _with_timeouts(self._stop(brake[0], phase, brake[1]), timeouts)
        tripped = self._tripped_gate(view, phase)
        if tripped is not None:
            return _with_timeouts(self._stop(tripped[0], phase, tripped[1]), timeouts)

        continuous = policy.target.selection is Selection.CONTINUOUS
        if t.total and t.succeeded == t.total and not continuous:
            return Decision(RolloutState.SUCCEEDED, phase, (), f"all {t.total} devices succeeded")

        success = policy.success_of(phase)
        met = t.phase_succeeded * 100.0 >= success.percent * t.phase_members - 1e-9
        gates_ok, gates_note = self._gates_pass(view, phase)
        soaked = now - view.phase_started_at >= phases[phase].min_soak_s
        timed_out = now - view.phase_started_at > success.timeout_s
        last = phase == len(phases) - 1
        if last:
            # The last phase has nothing to open: it ends once its condition is met and every device
            # has finished, or its condition is met and the timeout says the stragglers are not coming.
            if met and (t.done_up_to_phase or timed_out) and not continuous:
                tail = (
                    f"; {t.unfinished} did not finish within {success.timeout_s:g}s" if t.unfinished else ""
                )
                return Decision(
                    RolloutState.SUCCEEDED,
                    phase,
                    (),
                    f"last phase condition met: {t.succeeded} of {t.total} devices succeeded{tail}",
                    timeouts,
                )
        elif met and soaked and gates_ok:
            nxt = phase + 1
            start_at = phases[nxt].start_at
            passed = f"{self._phase_label(phase)} passed ({t.phase_succeeded} of {t.phase_members} succeeded)"
            if start_at is not None and now < start_at:
                starts = f"{passed}; {self._phase_label(nxt)} starts at {start_at:.0f}"
                return self._running(view, t, phase, now, starts, timeouts)
            if success.action is SuccessAction.PAUSE:
                return Decision(
                    RolloutState.WAITING_APPROVAL,
                    phase,
                    (),
                    f"{passed}; approve to open {self._phase_label(nxt)}",
                    timeouts,
                )
            return self._running(view, t, nxt, now, f"{passed}; opening {self._phase_label(nxt)}", timeouts)

        if timed_out and not (met and gates_ok):
            need = f"need {success.percent:g}%" if not met else gates_note
            return Decision(
                RolloutState.PAUSED,
                phase,
                (),
                f"{self._phase_label(phase)} timed out after {success.timeout_s:g}s: "
                f"{t.phase_succeeded} of {t.phase_members} succeeded, {need}",
                timeouts,
            )

        if met and last:
            waiting = (
                "continuous: waiting for new devices"
                if continuous and not t.unfinished
                else f"condition met, waiting for {t.unfinished} devices to finish"
            )
        elif met and not soaked:
            waiting = f"condition met, soaking until {view.phase_started_at + phases[phase].min_soak_s:.0f}"
        elif met:
            waiting = f"condition met; {gates_note}"
        else:
            waiting = f"{t.phase_succeeded} of {t.phase_members} succeeded, need {success.percent:g}%"
        return self._running(view, t, phase, now, f"{self._phase_label(phase)}: {waiting}", timeouts)

    def _running(
        self, view: RolloutView, t: _Tally, phase: int, now: float, reason: str, timeouts: tuple[str, ...]
    ) -> Decision:
        """The rollout keeps running in ``phase``, offering what :meth:`_offers` allows now."""
        offers, reoffers = self._offers(view, t, phase, now)
        return Decision(RolloutState.RUNNING, phase, offers, reason, timeouts, reoffers=reoffers)

    def _offers(
        self, view: RolloutView, t: _Tally, phase: int, now: float
    ) -> tuple[tuple[Offer, ...], tuple[Offer, ...]]:
        """Offers to PENDING devices of phases up to ``phase`` — within the rate, outside other
        rollouts' devices, past their retry time, and (windows scoped to offers) inside a window."""
        m = self._policy.maintenance
        rate = self.rate_per_minute(t.notified, t.succeeded)
        allowance = math.inf if rate is None else max(0, math.floor(rate + 1e-9) - t.offered_last_minute)
        in_windows, hold = self._install_terms(now)
        offer_in_window_only = bool(m.windows) and m.scope is WindowScope.OFFER
        cache: dict[str, tuple[tuple[float, float], ...]] = {}
        offers: list[Offer] = []
        for device_phase, device_id in t.pending:
            if device_phase > phase or allowance <= 0:
                break
            if device_id in view.busy:
                continue
            d = view.devices[device_id]
            if d.retry_at is not None and d.retry_at > now:
                continue
            windows: tuple[tuple[float, float], ...] = ()
            if offer_in_window_only or in_windows:
                windows = self._windows_for(d.time_zone, now, cache)
                if offer_in_window_only:
                    if not inside(windows, now):
                        continue
                    windows = ()
            offers.append(Offer(device_id, d.attempt + 1, windows, hold))
            allowance -= 1
        reoffers: tuple[Offer, ...] = ()
        forced_at = self._policy.install.forced_at
        if forced_at is not None and not in_windows and not hold and t.waiting:
            # timeforced: the soft period is over; waiting devices get their job again, without windows
            reoffers = tuple(
                Offer(d, view.devices[d].attempt) for d in sorted(t.waiting) if view.devices[d].windowed
            )
        return tuple(offers), reoffers


def _with_timeouts(decision: Decision, timeouts: tuple[str, ...]) -> Decision:
    return Decision(
        decision.state,
        decision.phase,
        decision.offers,
        decision.reason,
        timeouts,
        decision.cancel,
        decision.reoffers,
        decision.roll_back,
    )
