"""When and on what the controller evaluates a rollout's signal gates.

The statistics are pure (:mod:`.gates`: an exact test for the ratio of two Poisson rates, Welch's test on
per-device values); their inputs come from the fleet store (:mod:`.gate_inputs`, SQL over ``samples``
and ``captures``). This module sits between them and the controller: it forms the two cohorts of a
phase — the devices that run the release (each since it committed) against the devices of the rollout
that have not been offered it yet (observed over the same time) — asks the inputs (:class:`GateInputs`,
the one interface the controller needs from the fleet's data) for events, exposure and values, and turns
the test's answer into an evaluation the controller persists and audits. A gate is evaluated every
``interval`` while its phase is current; the planner acts on the latest evaluation only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetloop_cloud.repositories.records import NewGateEvaluation, RolloutDeviceRecord
from fleetloop_cloud.rollout.gates import GateEvaluation, mean_shift_gate, rate_ratio_gate
from fleetloop_cloud.rollout.planner import DevicePhaseState
from fleetloop_cloud.rollout.policy import GateKind, SignalGate
from fleetloop_shared.errors import FleetloopError

log = logging.getLogger("fleetloop.cloud.rollout.gates")

#: Longest reason kept with an evaluation.
MAX_REASON_CHARS = 600


@dataclass(frozen=True)
class Cohorts:
    """The two groups a gate compares, each device with the time (Unix seconds) from which its data
    counts: a treated device since it committed the release, a control device since the earliest of
    those (the same stretch of time, so time of day and weather affect both alike). Both count until
    the evaluation's ``now``."""

    treated: Mapping[str, float]
    control: Mapping[str, float]


@dataclass(frozen=True)
class RateCounts:
    """Captures and device-hours of each cohort: what :func:`~.gates.rate_ratio_gate` takes."""

    treated_events: int
    treated_exposure_h: float
    control_events: int
    control_exposure_h: float


@dataclass(frozen=True)
class DeviceValues:
    """One value per device of each cohort that had data (a device that did not drive has no mean
    brake pressure, not zero): what :func:`~.gates.mean_shift_gate` takes."""

    treated: Sequence[float]
    control: Sequence[float]


class GateInputs(Protocol):
    """What a gate needs from the fleet's data (:class:`.gate_inputs.FleetStoreGateInputs` over the
    fleet store; the tests put an in-memory fake beside it)."""

    def capture_counts(self, campaign: str, cohorts: Cohorts, now: float) -> RateCounts:
        """Captures of ``campaign`` and device-hours of each cohort, each device from its time to now."""
        ...

    def device_values(self, aggregate: str, where: str, cohorts: Cohorts, now: float) -> DeviceValues:
        """``aggregate`` over each device's ``samples`` matching ``where``, from its time to now."""
        ...


def cohorts_of(devices: Sequence[RolloutDeviceRecord]) -> Cohorts:
    """Treated: devices that committed the release; control: devices not offered it yet."""
    treated = {
        d.device_id: d.changed_at
        for d in devices
        if d.state == DevicePhaseState.COMMITTED.value and d.attempt > 0
    }
    start = min(treated.values(), default=0.0)
    control = {
        d.device_id: start for d in devices if d.state == DevicePhaseState.PENDING.value and d.attempt == 0
    }
    return Cohorts(treated, control)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def evaluate(gate: SignalGate, cohorts: Cohorts, inputs: GateInputs, now: float) -> GateEvaluation:
    """One evaluation of ``gate``. Too few devices in a cohort, or a failing input (a bad query, the
    store unreachable), is an "insufficient" evaluation with the reason: it never trips a gate, never
    passes one."""
    sizes = {"treated_devices": float(len(cohorts.treated)), "control_devices": float(len(cohorts.control))}
    if min(len(cohorts.treated), len(cohorts.control)) < gate.min_devices:
        reason = (
            f"insufficient devices: {len(cohorts.treated)} updated and {len(cohorts.control)} not updated "
            f"(each needs ≥ {gate.min_devices})"
        )
        return GateEvaluation("insufficient", math.nan, math.nan, math.nan, reason, sizes)
    try:
        if gate.kind is GateKind.CAPTURE_RATE:
            c = inputs.capture_counts(gate.campaign, cohorts, now)
            result = rate_ratio_gate(
                c.treated_events,
                c.treated_exposure_h,
                c.control_events,
                c.control_exposure_h,
                confidence=gate.confidence,
                min_effect=gate.min_effect,
                min_exposure_h=gate.min_exposure_h,
            )
        else:
            v = inputs.device_values(gate.aggregate, gate.where, cohorts, now)
            result = mean_shift_gate(
                v.treated,
                v.control,
                confidence=gate.confidence,
                min_effect=gate.min_effect,
                min_devices=gate.min_devices,
                direction=gate.direction.value,
            )
    except FleetloopError as exc:
        log.warning("gate %s: inputs unavailable: %s", gate.name, exc)
        reason = f"inputs unavailable: {exc}"
        return GateEvaluation("insufficient", math.nan, math.nan, math.nan, reason, sizes)
    return GateEvaluation(
        result.decision,
        result.statistic,
        result.p_value,
        result.effect,
        result.reason,
        {**sizes, **dict(result.inputs)},
    )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def as_record(phase: int, gate: SignalGate, result: GateEvaluation) -> NewGateEvaluation:
    """The evaluation as persisted: a number that is not finite (no statistic while insufficient; an
    infinite ratio when the control cohort had no event) is stored as absent — the reason says why."""
    return NewGateEvaluation(
        phase=phase,
        gate=gate.name,
        decision=result.decision,
        statistic=_finite(result.statistic),
        p_value=_finite(result.p_value),
        effect=_finite(result.effect),
        reason=_clip(result.reason),
        inputs={k: float(v) for k, v in result.inputs.items() if math.isfinite(v)},
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def summary(gate: str, e: NewGateEvaluation) -> str:
    """One line for the audit trail."""
    numbers = f"statistic {_num(e.statistic)}, p {_num(e.p_value)}, effect {_num(e.effect)}"
    return f"{gate}: {e.decision} ({numbers}) — {e.reason}"
