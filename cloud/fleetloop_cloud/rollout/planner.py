"""Rollout planning: which devices get the update next, and when a rollout opens, pauses or finishes.

This is the pure half of the rollout controller (no I/O, ``now`` passed in), so every gate and brake can
be tested as a table of scenarios and a restarted coordinator reaches the same decision from the same
persisted view. The words follow what release managers know from hawkBit, Mender and AWS IoT Jobs:
phases by percent or count with a soak time, a success gate per phase, an error brake.

The invariant everything else protects: **no device outside the current (or an earlier) phase is ever
offered the update.**
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleetloop_shared.errors import UserError


@dataclass(frozen=True)
class PhaseSpec:
    """One phase. ``percent`` is cumulative (33 then 100); ``count`` is this phase's own device count.

    With neither, the phase takes every device not yet placed. The last phase always takes every
    remaining device, so each device lands in exactly one phase.
    """

    name: str
    percent: float | None = None
    count: int | None = None
    min_soak_s: float = 0.0


@dataclass(frozen=True)
class RolloutPolicy:
    """The declarative policy of one rollout (``rollout create -f policy.yaml``)."""

    release_version: str
    selector: str
    phases: tuple[PhaseSpec, ...]
    #: The release's name ("fw", a model pack, ...) when several releases share ``release_version``;
    #: empty means "the only release with that version" (the controller refuses an ambiguous one).
    release_name: str = ""
    #: Percent of a phase's devices that must be committed before the next phase opens.
    success_percent: float = 100.0
    #: Brake: failed + rolled-back devices over executed (terminal) devices above this pauses the rollout.
    max_failure_percent: float = 20.0
    #: The brake only applies once this many devices have executed (a single early failure of a big
    #: fleet is not a rate).
    min_executed_for_brake: int = 1
    #: A phase whose gate is not met within this time pauses for an operator's approval.
    phase_timeout_s: float = 600.0


class DevicePhaseState(StrEnum):
    """A device's state within a rollout (the agent's OTA states, folded to what the planner needs)."""

    PENDING = "PENDING"
    OFFERED = "OFFERED"
    IN_PROGRESS = "IN_PROGRESS"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"


class RolloutState(StrEnum):
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    ABORTED = "ABORTED"


#: Device states after which the device will not change any more in this rollout.
TERMINAL_DEVICE_STATES = frozenset(
    {DevicePhaseState.COMMITTED, DevicePhaseState.FAILED, DevicePhaseState.ROLLED_BACK,
     DevicePhaseState.REJECTED}
)
#: Terminal device states the brake counts as failures.
FAILURE_DEVICE_STATES = frozenset({DevicePhaseState.FAILED, DevicePhaseState.ROLLED_BACK})
#: Rollout states the planner never leaves on its own (only an operator acts on them).
SETTLED_ROLLOUT_STATES = frozenset({RolloutState.PAUSED, RolloutState.SUCCEEDED, RolloutState.ABORTED})

_POLICY_FIELDS = frozenset(
    {"release_version", "release_name", "selector", "phases", "success_percent", "max_failure_percent",
     "min_executed_for_brake", "phase_timeout_s"}
)
_PHASE_FIELDS = frozenset({"name", "percent", "count", "min_soak_s"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _number(value: Any, where: str, *, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise UserError(f"{where}: must be between {lo:g} and {hi:g}, got {value!r}")
    return number


def _integer(value: Any, where: str, *, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: expected a whole number, got {value!r}")
    if value < lo:
        raise UserError(f"{where}: must be at least {lo}, got {value}")
    return value


def _duration(value: Any, where: str) -> float:
    """Seconds from a number or a string like ``90s``, ``10m``, ``1h`` (what people write in YAML)."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise UserError(f"{where}: expected a duration like 30s, 10m or 1h, got {value!r}")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return _number(value, where, lo=0.0, hi=10 * 365 * 86400.0)


def _string(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise UserError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _validate(policy: RolloutPolicy) -> RolloutPolicy:
    if not policy.phases:
        raise UserError("phases: a rollout needs at least one phase")
    seen: set[str] = set()
    last_percent = 0.0
    for i, phase in enumerate(policy.phases):
        where = f"phases[{i}]"
        if phase.name in seen:
            raise UserError(f"{where}.name: phase name {phase.name!r} is used twice")
        seen.add(phase.name)
        if phase.percent is not None and phase.count is not None:
            raise UserError(f"{where}: give either percent or count, not both")
        if phase.percent is not None:
            if phase.percent < last_percent:
                raise UserError(
                    f"{where}.percent: percents are cumulative and must not decrease "
                    f"({phase.percent:g} after {last_percent:g})"
                )
            last_percent = phase.percent
    last = policy.phases[-1]
    if last.percent is not None and last.percent < 100.0:
        raise UserError(
            f"phases[{len(policy.phases) - 1}].percent: the last phase must reach 100 (got {last.percent:g})"
        )
    return policy


def policy_from_dict(d: Mapping[str, Any]) -> RolloutPolicy:
    """Build and validate a policy from plain data (YAML/JSON); UserError naming the field on bad input."""
    if not isinstance(d, Mapping):
        raise UserError(f"rollout policy: expected a mapping, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in _POLICY_FIELDS)
    if unknown:
        raise UserError(f"rollout policy: unknown field {unknown[0]!r}")
    if "release_version" not in d:
        raise UserError("release_version: required")
    if "phases" not in d:
        raise UserError("phases: required")
    raw_phases = d["phases"]
    if not isinstance(raw_phases, Sequence) or isinstance(raw_phases, str | bytes):
        raise UserError(f"phases: expected a list of phases, got {raw_phases!r}")
    phases: list[PhaseSpec] = []
    for i, raw in enumerate(raw_phases):
        where = f"phases[{i}]"
        if not isinstance(raw, Mapping):
            raise UserError(f"{where}: expected a mapping with name and percent or count, got {raw!r}")
        bad = sorted(str(k) for k in raw if k not in _PHASE_FIELDS)
        if bad:
            raise UserError(f"{where}: unknown field {bad[0]!r}")
        if "name" not in raw:
            raise UserError(f"{where}.name: required")
        percent = raw.get("percent")
        count = raw.get("count")
        phases.append(
            PhaseSpec(
                name=_string(raw["name"], f"{where}.name"),
                percent=None if percent is None else _number(percent, f"{where}.percent", lo=0.0, hi=100.0),
                count=None if count is None else _integer(count, f"{where}.count", lo=0),
                min_soak_s=_duration(raw.get("min_soak_s", 0.0), f"{where}.min_soak_s"),
            )
        )
    policy = RolloutPolicy(
        release_version=_string(d["release_version"], "release_version"),
        release_name=_string(d.get("release_name", ""), "release_name", allow_empty=True),
        selector=_string(d.get("selector", ""), "selector", allow_empty=True),
        phases=tuple(phases),
        success_percent=_number(d.get("success_percent", 100.0), "success_percent", lo=0.0, hi=100.0),
        max_failure_percent=_number(
            d.get("max_failure_percent", 20.0), "max_failure_percent", lo=0.0, hi=100.0
        ),
        min_executed_for_brake=_integer(d.get("min_executed_for_brake", 1), "min_executed_for_brake", lo=1),
        phase_timeout_s=_duration(d.get("phase_timeout_s", 600.0), "phase_timeout_s"),
    )
    return _validate(policy)


def policy_to_dict(p: RolloutPolicy) -> dict[str, Any]:
    """Plain data for persistence and the API; ``policy_from_dict`` reads it back unchanged."""
    phases: list[dict[str, Any]] = []
    for phase in p.phases:
        entry: dict[str, Any] = {"name": phase.name, "min_soak_s": phase.min_soak_s}
        if phase.percent is not None:
            entry["percent"] = phase.percent
        if phase.count is not None:
            entry["count"] = phase.count
        phases.append(entry)
    return {
        "release_version": p.release_version,
        "release_name": p.release_name,
        "selector": p.selector,
        "phases": phases,
        "success_percent": p.success_percent,
        "max_failure_percent": p.max_failure_percent,
        "min_executed_for_brake": p.min_executed_for_brake,
        "phase_timeout_s": p.phase_timeout_s,
    }


def _order_key(release_version: str, device_id: str) -> bytes:
    # Hash order spreads canaries over the fleet (not the alphabetically first ids) and, salted with
    # the release, does not make the same devices the canaries of every release.
    return hashlib.sha256(f"{release_version}\x00{device_id}".encode()).digest()


def assign_phases(device_ids: Sequence[str], policy: RolloutPolicy) -> dict[str, int]:
    """Place every device in exactly one phase, deterministically (independent of the input order).

    Percents are cumulative and rounded up, and a phase with ``percent > 0`` gets at least one device
    while devices remain, so a 1 % canary on a small fleet is still a canary.
    """
    if len(set(device_ids)) != len(device_ids):
        raise UserError("assign_phases: device ids must be unique")
    ordered = sorted(device_ids, key=lambda d: (_order_key(policy.release_version, d), d))
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


@dataclass(frozen=True)
class RolloutView:
    """What the planner needs to decide: the rollout's state and every device's (phase, state).

    ``accepted_failures`` are devices whose failure an operator accepted by resuming; they no longer
    count against the brake nor block their phase's gate.
    """

    state: RolloutState
    phase: int
    phase_started_at: float
    devices: Mapping[str, tuple[int, DevicePhaseState]]
    accepted_failures: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Decision:
    """The planner's answer: the rollout's next state and phase, and the devices to offer the job now."""

    state: RolloutState
    phase: int
    offer: tuple[str, ...]
    reason: str


def _pct(numerator: int, denominator: int) -> str:
    return f"{100.0 * numerator / denominator:.0f}%" if denominator else "0%"


class RolloutPlanner:
    """Decides one step of one rollout from its persisted view; holds nothing but the policy."""

    def __init__(self, policy: RolloutPolicy) -> None:
        self._policy = _validate(policy)

    @property
    def policy(self) -> RolloutPolicy:
        return self._policy

    def _phase_label(self, phase: int) -> str:
        return f"phase {phase + 1} {self._policy.phases[phase].name!r}"

    def _pending_up_to(self, view: RolloutView, phase: int) -> tuple[str, ...]:
        return tuple(
            sorted(d for d, (p, s) in view.devices.items() if p <= phase and s is DevicePhaseState.PENDING)
        )

    def _brake(self, view: RolloutView) -> str | None:
        executed = failures = 0
        for device_id, (_, state) in view.devices.items():
            if device_id in view.accepted_failures or state not in TERMINAL_DEVICE_STATES:
                continue
            executed += 1
            failures += state in FAILURE_DEVICE_STATES
        policy = self._policy
        if executed < policy.min_executed_for_brake or executed == 0:
            return None
        if failures * 100.0 > policy.max_failure_percent * executed:
            return (
                f"failure rate {_pct(failures, executed)} ({failures} of {executed}) above "
                f"{policy.max_failure_percent:g}%"
            )
        return None

    def _gate(self, view: RolloutView, phase: int) -> tuple[bool, int, int]:
        """(met, committed, counted devices) for one phase; accepted failures are not counted."""
        members = [
            (d, s) for d, (p, s) in view.devices.items() if p == phase and d not in view.accepted_failures
        ]
        committed = sum(1 for _, s in members if s is DevicePhaseState.COMMITTED)
        met = committed * 100.0 >= self._policy.success_percent * len(members) - 1e-9
        return met, committed, len(members)

    def decide(self, view: RolloutView, now: float) -> Decision:
        """The next step. Settled rollouts (paused, aborted, succeeded) are left exactly as they are."""
        if view.state in SETTLED_ROLLOUT_STATES:
            return Decision(view.state, view.phase, (), f"rollout is {view.state.value.lower()}")
        phases = self._policy.phases
        phase = min(max(view.phase, 0), len(phases) - 1)

        brake = self._brake(view)
        if brake is not None:
            return Decision(RolloutState.PAUSED, phase, (), brake)

        states = [s for _, s in view.devices.values()]
        if states and all(s is DevicePhaseState.COMMITTED for s in states):
            return Decision(RolloutState.SUCCEEDED, phase, (), f"all {len(states)} devices committed")

        met, committed, members = self._gate(view, phase)
        soaked = now - view.phase_started_at >= phases[phase].min_soak_s
        in_phase_done = all(
            s in TERMINAL_DEVICE_STATES for d, (p, s) in view.devices.items() if p <= phase
        )
        timed_out = now - view.phase_started_at > self._policy.phase_timeout_s
        if phase == len(phases) - 1:
            # The last phase has nothing to open: it ends once its gate is met and every device has
            # finished, or its gate is met and the timeout says the stragglers are not coming.
            if met and (in_phase_done or timed_out):
                total = len(states)
                done = sum(1 for s in states if s is DevicePhaseState.COMMITTED)
                unfinished = sum(1 for s in states if s not in TERMINAL_DEVICE_STATES)
                tail = ""
                if unfinished:
                    tail = f"; {unfinished} did not finish within {self._policy.phase_timeout_s:g}s"
                return Decision(
                    RolloutState.SUCCEEDED, phase, (),
                    f"last phase gate met: {done} of {total} devices committed{tail}",
                )
        elif met and soaked:
            nxt = phase + 1
            return Decision(
                RolloutState.RUNNING,
                nxt,
                self._pending_up_to(view, nxt),
                f"{self._phase_label(phase)} passed ({committed} of {members} committed); "
                f"opening {self._phase_label(nxt)}",
            )

        if not met and timed_out:
            return Decision(
                RolloutState.PAUSED, phase, (),
                f"{self._phase_label(phase)} timed out after {self._policy.phase_timeout_s:g}s: "
                f"{committed} of {members} committed, need {self._policy.success_percent:g}%",
            )

        offer = self._pending_up_to(view, phase)
        if met and phase == len(phases) - 1:
            unfinished = sum(1 for s in states if s not in TERMINAL_DEVICE_STATES)
            waiting = f"gate met, waiting for {unfinished} devices to finish"
        elif met:
            waiting = f"gate met, soaking until {view.phase_started_at + phases[phase].min_soak_s:g}"
        else:
            waiting = f"{committed} of {members} committed, need {self._policy.success_percent:g}%"
        return Decision(RolloutState.RUNNING, phase, offer, f"{self._phase_label(phase)}: {waiting}")
