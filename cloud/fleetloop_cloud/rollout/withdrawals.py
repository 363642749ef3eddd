"""Which devices hold a job the cloud no longer wants run, and which of them were told.

A job is withdrawn when its rollout is aborted (every device still offered it, working on it or waiting
to install it), when the planner withdraws an offer (schedule end with ``cancel``), or when a release
manager removes the device from the rollout (``rollout remove``: a device serviced, sold, scrapped).
Each coordinator tells the devices whose sessions it holds (``OtaCancel`` on the control stream), on
the tick the change feed's notice wakes, so a device on any coordinator hears within a tick of the
abort; the agent drops a job it has not committed to installing and reports CANCELED, or finishes one
already installing.

Pure: the records in, what to send out; :class:`Told` remembers what this coordinator sent (bounded,
oldest forgotten) so a device is told once per session, not on every tick.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from fleetloop_cloud.repositories.records import DeviceChange, RolloutDeviceRecord, RolloutRecord
from fleetloop_cloud.rollout.planner import ACTIVE_DEVICE_STATES, DevicePhaseState, RolloutState

#: Reasons of devices whose offer the planner withdrew start with this.
WITHDRAWN = "offer withdrawn: "
#: Withdrawals older than this are no longer pushed on ticks (a device that reports on such a job later
#: is told when it reports).
WINDOW_S = 3600.0
#: Withdrawals remembered as told (policy: the oldest is forgotten, and told again at worst).
MAX_TOLD = 100_000

_ACTIVE = frozenset(s.value for s in ACTIVE_DEVICE_STATES)
#: Reasons of devices removed before anything was offered to them start with this.
REMOVED = "removed from the rollout"


def in_play(devices: Sequence[RolloutDeviceRecord]) -> list[RolloutDeviceRecord]:
    """The devices a rollout still counts: a removed device is never offered the update again, and its
    phase neither waits for it nor counts it, whatever it ends in (the controller plans on these)."""
    return [d for d in devices if not d.removed_at]


def removal_text(by: str, why: str) -> str:
    return f"{REMOVED} by {by}" + (f": {why}" if why else "")


def removal(device: RolloutDeviceRecord, by: str, why: str, now: float) -> DeviceChange:
    """How removing ``device`` changes it. Recorded always (who, when, why), first removal kept. A device
    never offered the update ends CANCELED now (nothing to tell it); one holding the job keeps its state:
    it is told to drop the job (:func:`withdrawn`), and its own report says whether it did (CANCELED) or
    had committed to installing already and finished (COMMITTED, FAILED, ...): a removal never rolls a
    device back."""
    mark = (now, by, why)
    if device.state == DevicePhaseState.PENDING.value:
        return DeviceChange(
            state=DevicePhaseState.CANCELED.value,
            reason=removal_text(by, why),
            removal=mark,
            only_from=DevicePhaseState.PENDING.value,
        )
    return DeviceChange(removal=mark)


@dataclass(frozen=True)
class Withdrawal:
    device_id: str
    job_id: str
    rollout_id: str
    reason: str


def withdrawn(
    record: RolloutRecord,
    devices: Sequence[RolloutDeviceRecord],
    now: float,
    job_id: Callable[[str, str, int], str],
    *,
    window_s: float = WINDOW_S,
) -> list[Withdrawal]:
    """The jobs of ``record`` that devices may hold but must drop (withdrawn within ``window_s``)."""
    rid = record.rollout_id
    if record.state == RolloutState.ABORTED.value:
        if now - record.updated_at > window_s:
            return []
        why = f"rollout {record.rollout_id} aborted" + (f": {record.reason}" if record.reason else "")
        return [Withdrawal(d.device_id, job_id(rid, d.device_id, d.attempt), rid, why)
                for d in devices if d.state in _ACTIVE]  # fmt: skip
    out = [
        Withdrawal(d.device_id, job_id(rid, d.device_id, d.attempt), rid, d.reason)
        for d in devices
        if d.state == DevicePhaseState.CANCELED.value
        and d.reason.startswith(WITHDRAWN)
        and now - (d.changed_at or d.updated_at) <= window_s
    ]
    out += [
        Withdrawal(d.device_id, job_id(rid, d.device_id, d.attempt), rid,
                   removal_text(d.removed_by, d.removed_reason))
        for d in devices
        if d.removed_at and d.state in _ACTIVE and now - d.removed_at <= window_s
    ]  # fmt: skip
    return out


class Told:
    """Withdrawals this coordinator delivered, by (device, job)."""

    def __init__(self, capacity: int = MAX_TOLD) -> None:
        self._told: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._capacity = capacity

    def due(self, candidates: Iterable[Withdrawal], reachable: Collection[str]) -> list[Withdrawal]:
        told = self._told
        return [w for w in candidates if w.device_id in reachable and (w.device_id, w.job_id) not in told]

    def mark(self, w: Withdrawal) -> None:
        self._told[(w.device_id, w.job_id)] = None
        while len(self._told) > self._capacity:
            self._told.popitem(last=False)

    def forget(self, device_id: str, job_id: str) -> None:
        """The device still holds the job (it said so after being told): tell it again."""
        self._told.pop((device_id, job_id), None)
