"""When and on what the controller evaluates a rollout's signal gates.

The statistics are pure (:mod:`.gates`: an exact test for the ratio of two Poisson rates, a two-sample
test on per-device values); their inputs come from the fleet store (:mod:`.gate_inputs`, SQL over
``samples`` and ``captures``). This module sits between them and the controller: it forms the two
cohorts of a phase — the devices that run the release (each since it committed) against the devices of
the rollout that have not been offered it yet (observed over the same time) — asks the inputs for
events, exposure and values, and turns the test's answer into an evaluation the controller persists and
audits. A gate is evaluated every ``interval`` while its phase is current; the planner acts on the
latest evaluation only.
"""

from __future__ import annotations

import logging
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
MAX_REASON_CHARS = 400


@dataclass(frozen=True)
class Cohorts:
    """The two groups a gate compares, each device with the time (Unix seconds) from which its data
    counts: a treated device since it committed the release, a control device since the earliest of
    those (the same stretch of time, so time of day and weather affect both alike)."""

    treated: Mapping[str, float]
    control: Mapping[str, float]


@dataclass(frozen=True)
class RateCounts:
    treated_events: int
    treated_exposure_h: float
    control_events: int
    control_exposure_h: float


class GateInputs(Protocol):
    """What a gate needs from the fleet's data (implemented over the fleet store by
    :class:`.gate_inputs.FleetStoreGateInputs`; an in-memory fake stands beside it in the tests)."""

    def capture_counts(self, campaign: str, cohorts: Cohorts, now: float) -> RateCounts:
        """Captures of ``campaign`` and device-hours of data of each cohort, each device from its time."""
        ...

    def signal_values(self, sql: str, cohorts: Cohorts, now: float) -> tuple[list[float], list[float]]:
        """One value per device of each cohort from ``sql`` (columns ``device_id, value``)."""
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


def _insufficient(reason: str, inputs: Mapping[str, float]) -> GateEvaluation:
    return GateEvaluation("insufficient", 0.0, 1.0, 0.0, reason, dict(inputs))


def evaluate(gate: SignalGate, cohorts: Cohorts, inputs: GateInputs, now: float) -> GateEvaluation:
    """One evaluation of ``gate``; a failing input (a bad query, the store unreachable) is an
    "insufficient" evaluation with the reason — it never trips a gate, never passes one."""
    sizes = {"treated_devices": float(len(cohorts.treated)), "control_devices": float(len(cohorts.control))}
    if min(len(cohorts.treated), len(cohorts.control)) < gate.min_devices:
        return _insufficient(
            f"{len(cohorts.treated)} updated and {len(cohorts.control)} not-yet-updated devices; "
            f"need {gate.min_devices} in each",
            sizes,
        )
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
            treated, control = inputs.signal_values(gate.sql, cohorts, now)
            result = mean_shift_gate(
                treated,
                control,
                confidence=gate.confidence,
                min_effect=gate.min_effect,
                min_devices=gate.min_devices,
                direction=gate.direction.value,
            )
    except FleetloopError as exc:
        log.warning("gate %s: inputs unavailable: %s", gate.name, exc)
        return _insufficient(f"inputs unavailable: {exc}", sizes)
    return GateEvaluation(
        result.decision,
        result.statistic,
        result.p_value,
        result.effect,
        result.reason,
        {**sizes, **dict(result.inputs)},
    )


def as_record(phase: int, gate: SignalGate, result: GateEvaluation) -> NewGateEvaluation:
    return NewGateEvaluation(
        phase=phase,
        gate=gate.name,
        decision=result.decision,
        statistic=float(result.statistic),
        p_value=float(result.p_value),
        effect=float(result.effect),
        reason=_clip(result.reason),
        inputs=dict(result.inputs),
    )


def summary(gate: str, e: NewGateEvaluation) -> str:
    """One line for the audit trail."""
    numbers = f"statistic {e.statistic:.3g}, p {e.p_value:.3g}, effect {e.effect:.3g}"
    return f"{gate}: {e.decision} ({numbers}) — {e.reason}"
