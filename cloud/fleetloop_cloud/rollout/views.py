"""What an operator sees of rollouts: typed read models built from the rollouts repository.

Plain data (no I/O beyond the repository reads), so the REST surface renders them as JSON once and the
CLI, the console and tests read the same fields.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import RolloutRecord
from fleetloop_cloud.rollout.planner import DevicePhaseState, policy_from_dict, policy_to_dict
from fleetloop_shared.errors import NotFoundError

_FAILED = (DevicePhaseState.FAILED.value, DevicePhaseState.ROLLED_BACK.value)


@dataclass(frozen=True)
class PhaseProgress:
    name: str
    devices: int
    committed: int
    failed: int


@dataclass(frozen=True)
class DeviceProgress:
    device_id: str
    phase: int
    state: str
    reason: str


@dataclass(frozen=True)
class RolloutStatus:
    """One rollout in full: its phases, every device's state and the counts per state."""

    id: str
    release_version: str
    state: str
    phase: int
    phase_name: str
    phase_started_at: float
    phases: tuple[PhaseProgress, ...]
    devices: tuple[DeviceProgress, ...]
    reason: str
    counts: dict[str, int]
    accepted_failures: list[str]
    created_at: float
    updated_at: float
    policy: dict[str, Any]


@dataclass(frozen=True)
class RolloutSummary:
    """One rollout in a list: its state and the counts per device state."""

    id: str
    release_version: str
    state: str
    phase: int
    reason: str
    devices: int
    counts: dict[str, int]
    created_at: float
    updated_at: float


def record_of(rollouts: RolloutRepository, rollout_id: str) -> RolloutRecord:
    record = rollouts.get(rollout_id)
    if record is None:
        raise NotFoundError(f"rollout {rollout_id!r} does not exist")
    return record


def rollout_status(rollouts: RolloutRepository, rollout_id: str) -> RolloutStatus:
    """NotFoundError for an unknown rollout."""
    record = record_of(rollouts, rollout_id)
    devices = rollouts.devices(rollout_id)
    policy = policy_from_dict(record.policy)
    phases = []
    for index, spec in enumerate(policy.phases):
        members = [d for d in devices if d.phase == index]
        phases.append(
            PhaseProgress(
                name=spec.name,
                devices=len(members),
                committed=sum(d.state == DevicePhaseState.COMMITTED.value for d in members),
                failed=sum(d.state in _FAILED for d in members),
            )
        )
    counts = {s.value: 0 for s in DevicePhaseState}
    for d in devices:
        counts[d.state] = counts.get(d.state, 0) + 1
    return RolloutStatus(
        id=rollout_id,
        release_version=record.release_version,
        state=record.state,
        phase=record.phase,
        phase_name=policy.phases[record.phase].name if record.phase < len(policy.phases) else "",
        phase_started_at=record.phase_started_at,
        phases=tuple(phases),
        devices=tuple(DeviceProgress(d.device_id, d.phase, d.state, d.reason) for d in devices),
        reason=record.reason,
        counts=counts,
        accepted_failures=sorted(record.accepted_failures),
        created_at=record.created_at,
        updated_at=record.updated_at,
        policy=policy_to_dict(policy),
    )


def rollout_summaries(rollouts: RolloutRepository) -> list[RolloutSummary]:
    """Every rollout, oldest first."""
    out = []
    for record in rollouts.all():
        counts: Counter[str] = Counter(d.state for d in rollouts.devices(record.rollout_id))
        out.append(
            RolloutSummary(
                id=record.rollout_id,
                release_version=record.release_version,
                state=record.state,
                phase=record.phase,
                reason=record.reason,
                devices=sum(counts.values()),
                counts={s.value: counts.get(s.value, 0) for s in DevicePhaseState},
                created_at=record.created_at,
                updated_at=record.updated_at,
            )
        )
    return out
