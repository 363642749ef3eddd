"""The rollout policy: what one rollout does, as frozen dataclasses, and its plain-data form.

Release managers know their words from hawkBit (groups by percent, success and error conditions with
their actions, approval, action types, maintenance windows, weight), Mender (phases with a batch size and a
start time, retries, ``max_devices``, dynamic groups) and AWS IoT Jobs (``maximumPerMinute``,
``exponentialRate``, ``abortConfig``, ``inProgressTimeoutInMinutes``, ``schedulingConfig`` and target
selection SNAPSHOT | CONTINUOUS). The policy is the union of those, plus fleetloop's own **signal
gates**: the updated devices' data, compared with the not-yet-updated devices', must not get worse.
``docs/rollouts.md`` documents every field with a worked example.

This module is the model, pure and without parsing: the document is read, with ``FILE:LINE:COL`` errors,
by :mod:`.policy_reader`. :func:`policy_to_dict` writes a policy as a plain spec that
:func:`.policy_reader.parse_policy` reads back to the same policy, so what is persisted is what runs after
a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

API_VERSION = "fleetloop/v1"
KIND = "Rollout"
#: Bounds that keep a policy sane (and its planner's work bounded).
MAX_PHASES = 50
MAX_GATES = 16
MAX_RULES = 16
MAX_LISTED_DEVICES = 100_000
TEN_YEARS_S = 10 * 365 * 86400.0


class Selection(StrEnum):
    """Which devices a rollout targets: those matching at creation, or also those that match later."""

    SNAPSHOT = "snapshot"
    CONTINUOUS = "continuous"


class SuccessAction(StrEnum):
    NEXT = "next"
    PAUSE = "pause"  # wait for ``fleetloop rollout approve``


class BrakeAction(StrEnum):
    PAUSE = "pause"
    ABORT = "abort"
    ROLL_BACK = "abort-and-roll-back"


class FailureType(StrEnum):
    """What an abort criterion or a retry rule counts (AWS IoT Jobs' failure types, plus ROLLED_BACK:
    the device installed, failed its health check and its bootloader fell back)."""

    FAILED = "FAILED"  # FAILED and ROLLED_BACK: the install did not take
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    ALL = "ALL"


class GateKind(StrEnum):
    CAPTURE_RATE = "capture_rate"
    SIGNAL = "signal"


class Direction(StrEnum):
    INCREASE = "increase"
    DECREASE = "decrease"


class InstallType(StrEnum):
    """hawkBit's action types: ``soft`` installs in a maintenance window (at once without windows),
    ``forced`` at once, ``timeforced`` soft until ``forced_at`` then forced, ``downloadonly`` downloads
    and verifies but does not install (the execution succeeds once the device holds the payload)."""

    SOFT = "soft"
    FORCED = "forced"
    TIMEFORCED = "timeforced"
    DOWNLOADONLY = "downloadonly"


class WindowScope(StrEnum):
    INSTALL = "install"  # offer at any time (download now), install only inside a window
    OFFER = "offer"  # offer only inside a window


class EndBehavior(StrEnum):
    STOP = "stop"  # no new offers; devices already working finish
    CANCEL = "cancel"  # also cancel offers the devices have not started


class RateCriterion(StrEnum):
    NOTIFIED = "notified"
    SUCCEEDED = "succeeded"


@dataclass(frozen=True)
class Target:
    selector: str = ""
    selection: Selection = Selection.SNAPSHOT
    #: At most this many devices (hash order picks which); None: every matching device.
    max_devices: int | None = None
    #: Exactly these devices (still filtered by selector and hardware); empty: by selector only.
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SuccessCondition:
    """hawkBit's success condition and action: ``percent`` of the phase's devices succeeded within
    ``timeout_s`` of the phase opening → ``action``; not met in time → the rollout pauses."""

    percent: float = 100.0
    timeout_s: float = 600.0
    action: SuccessAction = SuccessAction.NEXT


@dataclass(frozen=True)
class PhaseSpec:
    """One phase. ``percent`` is cumulative (5, 25, 100); ``count`` is this phase's own device count.

    With neither, the phase takes every device not yet placed. The last phase always takes every
    remaining device, so each device lands in exactly one phase.
    """

    name: str
    percent: float | None = None
    count: int | None = None
    min_soak_s: float = 0.0
    #: The phase does not open before this time (Unix seconds), even if the one before passed.
    start_at: float | None = None
    #: This phase's own success condition (None: the policy's).
    success: SuccessCondition | None = None


@dataclass(frozen=True)
class AbortCriterion:
    """AWS's abort criterion and hawkBit's error condition: once ``min_executed`` devices finished,
    more than ``threshold_percent`` of them failing with ``failure_type`` → ``action``."""

    failure_type: FailureType = FailureType.FAILED
    threshold_percent: float = 20.0
    min_executed: int = 1
    action: BrakeAction = BrakeAction.PAUSE


@dataclass(frozen=True)
class SignalGate:
    """A fleet-signal gate: the updated cohort against the not-yet-updated one, one-sided.

    ``capture_rate``: captures of ``campaign`` per device-hour (an exact test for the ratio of two
    Poisson rates); trips when the rate is shown above ``1 + min_effect`` times the control's (0.2 =
    +20 % allowed) at ``confidence``. ``signal``: ``aggregate`` (SQL over the columns of ``samples``,
    e.g. ``avg(value)``) of each device's samples that match ``where``, since the device's cohort time;
    Welch's test on the per-device values trips when they are shown to move beyond ``min_effect`` (in
    the aggregate's unit) in ``direction``. Evaluated every ``interval_s`` once both cohorts have
    ``min_devices`` devices (and, for the rate, ``min_exposure_h`` device-hours).
    """

    name: str
    kind: GateKind
    campaign: str = ""
    aggregate: str = ""
    where: str = ""
    direction: Direction = Direction.INCREASE
    confidence: float = 0.99
    min_effect: float = 0.2
    min_exposure_h: float = 1.0
    min_devices: int = 3
    interval_s: float = 60.0
    #: Names of the phases the gate applies to; empty: every phase but the last (the last one has no
    #: not-yet-updated cohort left to compare with once it is done).
    phases: tuple[str, ...] = ()
    action: BrakeAction = BrakeAction.ROLL_BACK


@dataclass(frozen=True)
class ExponentialRate:
    """AWS's ``exponentialRate``: start at ``base_per_minute`` and multiply by ``increment_factor``
    each time another ``increase_after`` devices were notified (or succeeded)."""

    base_per_minute: float
    increment_factor: float
    increase_after: int
    criterion: RateCriterion = RateCriterion.NOTIFIED


@dataclass(frozen=True)
class Rate:
    """How many devices are offered the update per minute; None everywhere: no limit."""

    max_per_minute: float | None = None
    exponential: ExponentialRate | None = None


@dataclass(frozen=True)
class Schedule:
    start_at: float | None = None
    end_at: float | None = None
    end_behavior: EndBehavior = EndBehavior.STOP


@dataclass(frozen=True)
class MaintenanceWindow:
    cron: str
    duration_s: float
    #: An IANA zone, or "device": the zone the device reports (``Maintenance.default_time_zone`` for a
    #: device that reported none).
    time_zone: str = "device"


@dataclass(frozen=True)
class Maintenance:
    windows: tuple[MaintenanceWindow, ...] = ()
    scope: WindowScope = WindowScope.INSTALL
    default_time_zone: str = "UTC"


@dataclass(frozen=True)
class Install:
    type: InstallType = InstallType.SOFT
    forced_at: float | None = None


@dataclass(frozen=True)
class RetryRule:
    """Mender's retries: a device whose execution ends with ``failure_type`` is offered the update
    again, up to ``max`` more times, after ``backoff_s`` × ``factor``^(attempt − 1)."""

    failure_type: FailureType
    max: int = 1
    backoff_s: float = 60.0
    factor: float = 2.0


@dataclass(frozen=True)
class Execution:
    retries: tuple[RetryRule, ...] = ()
    #: An execution in progress longer than this ends TIMED_OUT (None: no timeout). A device waiting
    #: for its maintenance window is not in progress.
    in_progress_timeout_s: float | None = None


@dataclass(frozen=True)
class RolloutPolicy:
    """The whole policy of one rollout."""

    release_version: str
    phases: tuple[PhaseSpec, ...]
    #: The release's name ("firmware", a model pack, ...); empty: the only release with that version.
    release_name: str = ""
    target: Target = field(default_factory=Target)
    success: SuccessCondition = field(default_factory=SuccessCondition)
    abort: tuple[AbortCriterion, ...] = (AbortCriterion(),)
    gates: tuple[SignalGate, ...] = ()
    rate: Rate = field(default_factory=Rate)
    schedule: Schedule = field(default_factory=Schedule)
    maintenance: Maintenance = field(default_factory=Maintenance)
    install: Install = field(default_factory=Install)
    execution: Execution = field(default_factory=Execution)
    #: Orders overlapping rollouts: a device in several active rollouts runs the heaviest one's first
    #: (a device runs at most one update at a time); ties go to the older rollout.
    weight: int = 0

    @property
    def selector(self) -> str:
        return self.target.selector

    def success_of(self, phase: int) -> SuccessCondition:
        own = self.phases[phase].success
        return own if own is not None else self.success

    def gates_of(self, phase: int) -> tuple[SignalGate, ...]:
        name, last = self.phases[phase].name, phase == len(self.phases) - 1
        return tuple(g for g in self.gates if (name in g.phases if g.phases else not last))


# -- the plain-data form ---------------------------------------------------------------------------


def _success_dict(s: SuccessCondition) -> dict[str, Any]:
    return {"percent": s.percent, "timeout": s.timeout_s, "action": s.action.value}


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def policy_to_dict(p: RolloutPolicy) -> dict[str, Any]:
    """The policy as a bare spec of plain data, every field explicit; :func:`parse_policy` reads it back
    to the same policy."""
    phases = []
    for ph in p.phases:
        entry: dict[str, Any] = {"name": ph.name, "soak": ph.min_soak_s}
        entry |= _drop_none({"percent": ph.percent, "count": ph.count, "start": ph.start_at})
        if ph.success is not None:
            entry["success"] = _success_dict(ph.success)
        phases.append(entry)
    rate: dict[str, Any] = _drop_none({"max_per_minute": p.rate.max_per_minute})
    if p.rate.exponential is not None:
        e = p.rate.exponential
        rate["exponential"] = {
            "base_per_minute": e.base_per_minute,
            "increment_factor": e.increment_factor,
            "increase_after": {e.criterion.value: e.increase_after},
        }
    out: dict[str, Any] = {
        "release": {"name": p.release_name, "version": p.release_version},
        "target": _drop_none(
            {
                "selector": p.target.selector,
                "selection": p.target.selection.value,
                "max_devices": p.target.max_devices,
            }
        ),
        "phases": phases,
        "success": _success_dict(p.success),
        "abort": [
            {
                "failure_type": a.failure_type.value,
                "threshold_percent": a.threshold_percent,
                "min_executed": a.min_executed,
                "action": a.action.value,
            }
            for a in p.abort
        ],
        "gates": [_gate_dict(g) for g in p.gates],
        "rate": rate,
        "schedule": _drop_none(
            {
                "start": p.schedule.start_at,
                "end": p.schedule.end_at,
                "end_behavior": p.schedule.end_behavior.value,
            }
        ),
        "install": _drop_none({"type": p.install.type.value, "forced_at": p.install.forced_at}),
        "execution": _drop_none(
            {
                "retries": [
                    {
                        "failure_type": x.failure_type.value,
                        "max": x.max,
                        "backoff": x.backoff_s,
                        "factor": x.factor,
                    }
                    for x in p.execution.retries
                ],
                "in_progress_timeout": p.execution.in_progress_timeout_s,
            }
        ),
        "weight": p.weight,
    }
    if p.target.devices:
        out["target"]["devices"] = list(p.target.devices)
    if p.maintenance.windows:
        out["maintenance"] = {
            "windows": [
                {"cron": w.cron, "duration": w.duration_s, "time_zone": w.time_zone}
                for w in p.maintenance.windows
            ],
            "scope": p.maintenance.scope.value,
            "default_time_zone": p.maintenance.default_time_zone,
        }
    return out


def _gate_dict(g: SignalGate) -> dict[str, Any]:
    source: dict[str, Any] = (
        {"capture_rate": {"campaign": g.campaign}}
        if g.kind is GateKind.CAPTURE_RATE
        else {"signal": {"aggregate": g.aggregate, "where": g.where, "direction": g.direction.value}}
    )
    return {
        "name": g.name,
        **source,
        "confidence": g.confidence,
        "min_effect": g.min_effect,
        "min_exposure": g.min_exposure_h * 3600.0,
        "min_devices": g.min_devices,
        "interval": g.interval_s,
        "phases": list(g.phases),
        "action": g.action.value,
    }
