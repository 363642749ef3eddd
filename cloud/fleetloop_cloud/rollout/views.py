"""What an operator sees of rollouts: typed read models built from the rollouts repository.

Plain data (no I/O beyond the repository reads), so the REST surface renders them as JSON once and the
CLI, the console and tests read the same fields: a rollout's status with its progress per phase and the
latest evaluation of each signal gate, its executions (one per device), its history (audit trail and
every gate evaluation) and the revisions of a release.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import (
    AuditRecord,
    GateEvaluationRecord,
    RolloutDeviceRecord,
    RolloutRecord,
)
from fleetloop_cloud.rollout.planner import DevicePhaseState
from fleetloop_cloud.rollout.policy import policy_to_dict
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_shared.errors import NotFoundError

S = DevicePhaseState
_FAILED = (S.FAILED.value, S.ROLLED_BACK.value, S.REJECTED.value, S.TIMED_OUT.value)
_WORKING = (S.OFFERED.value, S.IN_PROGRESS.value, S.WAITING.value)


@dataclass(frozen=True)
class PhaseProgress:
    """One phase's devices by where they are: what a progress bar draws."""

    name: str
    devices: int
    committed: int
    failed: int
    in_progress: int
    pending: int
    #: Devices a release manager removed (not in the counts before: the phase counts without them).
    removed: int = 0


@dataclass(frozen=True)
class DeviceProgress:
    device_id: str
    phase: int
    state: str
    reason: str
    #: Removed from the rollout (``rollout remove``): when (None: it was not), by whom, why.
    removed_at: float | None = None
    removed_by: str = ""
    removed_reason: str = ""


@dataclass(frozen=True)
class GateDecision:
    """The latest evaluation of one signal gate in one phase."""

    gate: str
    phase: int
    at: float
    decision: str
    statistic: float | None
    p_value: float | None
    effect: float | None
    reason: str
    inputs: dict[str, float]


@dataclass(frozen=True)
class RolloutHeading:
    """What every view of a rollout starts with: which release it rolls out, as which revision, and
    where it stands (the list and the full status show these the same way, in this order)."""

    id: str
    release_version: str
    release_name: str
    revision: int
    state: str
    phase: int


def _heading(record: RolloutRecord, release_name: str) -> dict[str, Any]:
    """A stored rollout's :class:`RolloutHeading` fields, for the views that start with them."""
    return {
        "id": record.rollout_id,
        "release_version": record.release_version,
        "release_name": release_name,
        "revision": record.revision,
        "state": record.state,
        "phase": record.phase,
    }


@dataclass(frozen=True)
class RolloutStatus(RolloutHeading):
    """One rollout in full: its phases, every device's state, the counts per state, the latest gate
    decisions, and the rollouts it is linked with (the one it rolls back, its roll-backs)."""

    phase_name: str
    phase_started_at: float
    phases: tuple[PhaseProgress, ...]
    devices: tuple[DeviceProgress, ...]
    reason: str
    counts: dict[str, int]
    accepted_failures: list[str]
    gates: tuple[GateDecision, ...]
    parent_id: str
    rollbacks: list[str]
    created_at: float
    updated_at: float
    policy: dict[str, Any]


@dataclass(frozen=True)
class RolloutSummary(RolloutHeading):
    """One rollout in a list: its state and the counts per device state."""

    reason: str
    devices: int
    counts: dict[str, int]
    parent_id: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Execution:
    """One device's execution of a rollout (AWS IoT Jobs' word): attempts, offer, versions."""

    device_id: str
    phase: int
    state: str
    reason: str
    attempt: int
    delivered: bool
    offered_at: float | None
    retry_at: float | None
    changed_at: float
    install_windows: list[list[float]]
    hold: bool
    from_version: str
    running_version: str
    removed_at: float | None = None
    removed_by: str = ""
    removed_reason: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    at: float
    event: str
    detail: str


@dataclass(frozen=True)
class RolloutHistory:
    """A rollout's audit trail and every signal-gate evaluation, oldest first."""

    id: str
    events: tuple[HistoryEntry, ...]
    gate_evaluations: tuple[GateDecision, ...]


@dataclass(frozen=True)
class Revision:
    """One rollout as a revision of its release name (what ``rollout undo --to-revision`` names)."""

    revision: int
    id: str
    release_name: str
    release_version: str
    state: str
    parent_id: str
    created_at: float


def record_of(rollouts: RolloutRepository, rollout_id: str) -> RolloutRecord:
    record = rollouts.get(rollout_id)
    if record is None:
        raise NotFoundError(f"rollout {rollout_id!r} does not exist")
    return record


def _gate(e: GateEvaluationRecord) -> GateDecision:
    return GateDecision(
        e.gate, e.phase, e.at, e.decision, e.statistic, e.p_value, e.effect, e.reason, dict(e.inputs)
    )


def _counts(states: list[str]) -> dict[str, int]:
    found = Counter(states)
    return {s.value: found.get(s.value, 0) for s in DevicePhaseState}


def _name(record: RolloutRecord) -> str:
    release = record.policy.get("release")
    return (
        str(release.get("name", ""))
        if isinstance(release, dict)
        else str(record.policy.get("release_name", ""))
    )


def _removal(d: RolloutDeviceRecord) -> tuple[float | None, str, str]:
    return (d.removed_at or None, d.removed_by, d.removed_reason)


def rollout_status(rollouts: RolloutRepository, rollout_id: str) -> RolloutStatus:
    """NotFoundError for an unknown rollout."""
    record = record_of(rollouts, rollout_id)
    devices = rollouts.devices(rollout_id)
    policy = parse_policy(record.policy)
    phases = []
    for index, spec in enumerate(policy.phases):
        states = [d.state for d in devices if d.phase == index and not d.removed_at]
        phases.append(
            PhaseProgress(
                name=spec.name,
                devices=len(states),
                committed=states.count(S.COMMITTED.value),
                failed=sum(s in _FAILED for s in states),
                in_progress=sum(s in _WORKING for s in states),
                pending=states.count(S.PENDING.value),
                removed=sum(1 for d in devices if d.phase == index and d.removed_at),
            )
        )
    gates = sorted(
        (
            g
            for phase in range(len(policy.phases))
            for g in rollouts.latest_evaluations(rollout_id, phase).values()
        ),
        key=lambda g: (g.phase, g.gate),
    )
    return RolloutStatus(
        **_heading(record, policy.release_name),
        phase_name=policy.phases[record.phase].name if record.phase < len(policy.phases) else "",
        phase_started_at=record.phase_started_at,
        phases=tuple(phases),
        devices=tuple(
            DeviceProgress(d.device_id, d.phase, d.state, d.reason, *_removal(d)) for d in devices
        ),
        reason=record.reason,
        counts=_counts([d.state for d in devices]),
        accepted_failures=sorted(record.accepted_failures),
        gates=tuple(_gate(g) for g in gates),
        parent_id=record.parent_id,
        rollbacks=[r.rollout_id for r in rollouts.all() if r.parent_id == rollout_id],
        created_at=record.created_at,
        updated_at=record.updated_at,
        policy=policy_to_dict(policy),
    )


def rollout_summaries(rollouts: RolloutRepository) -> list[RolloutSummary]:
    """Every rollout, oldest first."""
    out = []
    for record in rollouts.all():
        states = [d.state for d in rollouts.devices(record.rollout_id)]
        out.append(
            RolloutSummary(
                **_heading(record, _name(record)),
                reason=record.reason,
                devices=len(states),
                counts=_counts(states),
                parent_id=record.parent_id,
                created_at=record.created_at,
                updated_at=record.updated_at,
            )
        )
    return out


def executions(rollouts: RolloutRepository, rollout_id: str) -> list[Execution]:
    record_of(rollouts, rollout_id)
    return [
        Execution(
            d.device_id,
            d.phase,
            d.state,
            d.reason,
            d.attempt,
            d.delivered,
            d.offered_at,
            d.retry_at or None,
            d.changed_at,
            [[a, b] for a, b in d.windows],
            d.hold,
            d.from_version,
            d.running_version,
            *_removal(d),
        )
        for d in rollouts.devices(rollout_id)
    ]


def history(rollouts: RolloutRepository, rollout_id: str) -> RolloutHistory:
    record_of(rollouts, rollout_id)
    events = tuple(HistoryEntry(a.seq, a.at, a.event, a.detail) for a in rollouts.audit(rollout_id))
    return RolloutHistory(rollout_id, events, tuple(_gate(e) for e in rollouts.evaluations(rollout_id)))


def audit_rows(rollouts: RolloutRepository, rollout_id: str) -> list[AuditRecord]:
    record_of(rollouts, rollout_id)
    return rollouts.audit(rollout_id)


def revisions(rollouts: RolloutRepository, release_name: str = "") -> list[Revision]:
    """Rollouts as revisions, by release name then revision (only ``release_name``'s when given)."""
    out = [
        Revision(r.revision, r.rollout_id, _name(r), r.release_version, r.state, r.parent_id, r.created_at)
        for r in rollouts.all()
        if not release_name or _name(r) == release_name
    ]
    return sorted(out, key=lambda r: (r.release_name, r.revision))
