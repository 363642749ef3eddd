"""What an operator sees of rollouts: typed read models built from the rollouts repository.

Plain data (no I/O beyond the repository reads), so the REST surface renders them as JSON once and the
CLI, the console and tests read the same fields: a rollout's status with its progress per phase and the
latest evaluation of each signal gate, its executions (one per device), its history (audit trail and
every gate evaluation) and the revisions of a release.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import (
    AuditRecord,
    GateEvaluationRecord,
    NewGateEvaluation,
    RolloutRecord,
)
from fleetloop_cloud.rollout.planner import DevicePhaseState
from fleetloop_cloud.rollout.policy import policy_to_dict
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_shared.errors import NotFoundError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

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
    """Where one device of a rollout is (the full status lists one per device)."""

    device_id: str
    phase: int
    state: str
    reason: str
    #: Removed from the rollout (``rollout remove``): when (None: it was not), by whom, why.
    removed_at: float | None = None
    removed_by: str = ""
    removed_reason: str = ""


@dataclass(frozen=True, kw_only=True)
class GateDecision(NewGateEvaluation):
    """One evaluation of a signal gate in one phase, as the controller persisted it (its inputs as a
    plain dict), and when it was made."""

    at: float


@dataclass(frozen=True)
class RolloutHeading:
    """What every view of a rollout starts with: which release it rolls out, as which revision, where
    it stands and why, its devices by state, the rollout it rolls back, and when it was made and last
    changed (the list and the full status show these the same way, in this order)."""

    id: str
    release_version: str
    release_name: str
    revision: int
    state: str
    phase: int
    reason: str
    counts: dict[str, int]
    parent_id: str
    created_at: float
    updated_at: float


def _heading(record: RolloutRecord, release_name: str, states: list[str]) -> dict[str, Any]:
    """The :class:`RolloutHeading` fields a stored rollout does not hold under the same name
    (``states``: its devices' states), for :func:`_view`."""
    found = Counter(states)
    return {
        "id": record.rollout_id,
        "release_name": release_name,
        "counts": {s.value: found.get(s.value, 0) for s in DevicePhaseState},
    }


@dataclass(frozen=True)
class RolloutStatus(RolloutHeading):
    """One rollout in full: its phases, every device's state, the counts per state, the latest gate
    decisions, and the rollouts it is linked with (the one it rolls back, its roll-backs)."""

    phase_name: str
    phase_started_at: float
    phases: tuple[PhaseProgress, ...]
    devices: tuple[DeviceProgress, ...]
    accepted_failures: list[str]
    gates: tuple[GateDecision, ...]
    rollbacks: list[str]
    policy: dict[str, Any]


@dataclass(frozen=True)
class RolloutSummary(RolloutHeading):
    """One rollout in a list: its heading and how many devices it has."""

    devices: int


@dataclass(frozen=True, kw_only=True)
class Execution(DeviceProgress):
    """One device's execution of a rollout (AWS IoT Jobs' word): its progress, with its attempts, offer
    and versions."""

    attempt: int
    delivered: bool
    offered_at: float | None
    retry_at: float | None
    changed_at: float
    install_windows: list[list[float]]
    hold: bool
    from_version: str
    running_version: str


#: One event of a rollout's history: its audit row as stored (the rows a device's OTA view lists too).
HistoryEntry = AuditRecord


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


V = TypeVar("V", bound="DataclassInstance")


def _view(view: type[V], record: object, **shown: Any) -> V:
    """``record`` as ``view``: a field the view shares with the stored record by name is the record's
    (so a view restates no record field by hand); ``shown`` gives the rest: the fields the view names
    or shows otherwise (None for 0, lists for tuples) and what the record does not hold."""
    same = {f.name: getattr(record, f.name) for f in dataclasses.fields(view) if f.name not in shown}
    return view(**same, **shown)


def _gate(e: GateEvaluationRecord) -> GateDecision:
    return _view(GateDecision, e, inputs=dict(e.inputs))


def _name(record: RolloutRecord) -> str:
    release = record.policy.get("release")
    return (
        str(release.get("name", ""))
        if isinstance(release, dict)
        else str(record.policy.get("release_name", ""))
    )


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
    return _view(
        RolloutStatus,
        record,
        **_heading(record, policy.release_name, [d.state for d in devices]),
        phase_name=policy.phases[record.phase].name if record.phase < len(policy.phases) else "",
        phases=tuple(phases),
        devices=tuple(_view(DeviceProgress, d, removed_at=d.removed_at or None) for d in devices),
        accepted_failures=sorted(record.accepted_failures),
        gates=tuple(_gate(g) for g in gates),
        rollbacks=[r.rollout_id for r in rollouts.all() if r.parent_id == rollout_id],
        policy=policy_to_dict(policy),
    )


def rollout_summaries(rollouts: RolloutRepository) -> list[RolloutSummary]:
    """Every rollout, oldest first."""
    out = []
    for record in rollouts.all():
        states = [d.state for d in rollouts.devices(record.rollout_id)]
        out.append(
            _view(RolloutSummary, record, **_heading(record, _name(record), states), devices=len(states))
        )
    return out


def executions(rollouts: RolloutRepository, rollout_id: str) -> list[Execution]:
    record_of(rollouts, rollout_id)
    return [
        _view(
            Execution,
            d,
            removed_at=d.removed_at or None,
            retry_at=d.retry_at or None,
            install_windows=[[a, b] for a, b in d.windows],
        )
        for d in rollouts.devices(rollout_id)
    ]


def history(rollouts: RolloutRepository, rollout_id: str) -> RolloutHistory:
    record_of(rollouts, rollout_id)
    events = tuple(rollouts.audit(rollout_id))
    return RolloutHistory(rollout_id, events, tuple(_gate(e) for e in rollouts.evaluations(rollout_id)))


def audit_rows(rollouts: RolloutRepository, rollout_id: str) -> list[AuditRecord]:
    record_of(rollouts, rollout_id)
    return rollouts.audit(rollout_id)


def revisions(rollouts: RolloutRepository, release_name: str = "") -> list[Revision]:
    """Rollouts as revisions, by release name then revision (only ``release_name``'s when given)."""
    out = [
        _view(Revision, r, id=r.rollout_id, release_name=_name(r))
        for r in rollouts.all()
        if not release_name or _name(r) == release_name
    ]
    return sorted(out, key=lambda r: (r.release_name, r.revision))
