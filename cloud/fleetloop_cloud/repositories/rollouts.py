"""The rollouts aggregate (rollouts, their device snapshots and their audit trail): SQL and its fake.

Every write is one transaction. The rollout controller relies on that: a rollout transition, the device
states it changes and its audit rows are committed together, *before* any job is published, so a
restarted coordinator resumes exactly where the last one stopped. A device's state change always writes
its own audit row (``device``), so the trail shows every transition even when the caller lists only the
rollout-level ones.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import Any

from fleetloop_cloud.repositories.database import Database, Transaction
from fleetloop_cloud.repositories.interfaces import AUDIT_READ_LIMIT
from fleetloop_cloud.repositories.records import (
    AuditRecord,
    DeviceChange,
    NewRollout,
    RolloutDeviceRecord,
    RolloutRecord,
    RolloutUpdate,
    device_transition_detail,
)
from fleetloop_shared.errors import NotFoundError, StateError

_ROLLOUT_COLUMNS = (
    "rollout_id, release_version, policy_json, state, phase, phase_started_at, reason, "
    "accepted_failures_json, created_at, updated_at"
)
_DEVICE_COLUMNS = "rollout_id, device_id, phase, state, reason, delivered, updated_at"


def _no_rollout(rollout_id: str) -> NotFoundError:
    return NotFoundError(f"rollout {rollout_id!r} does not exist")


def _not_in(rollout_id: str, device_id: str) -> NotFoundError:
    return NotFoundError(f"device {device_id!r} is not part of rollout {rollout_id!r}")


def _rollout(r: tuple[Any, ...]) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=r[0],
        release_version=r[1],
        policy=dict(json.loads(r[2])),
        state=r[3],
        phase=int(r[4]),
        phase_started_at=float(r[5]),
        reason=r[6],
        accepted_failures=frozenset(json.loads(r[7])),
        created_at=float(r[8]),
        updated_at=float(r[9]),
    )


def _device(r: tuple[Any, ...]) -> RolloutDeviceRecord:
    return RolloutDeviceRecord(r[0], r[1], int(r[2]), r[3], r[4], bool(r[5]), float(r[6]))


class SqlRollouts:
    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def _audit(tx: Transaction, rollout_id: str, now: float, rows: Sequence[tuple[str, str]]) -> None:
        for event, detail in rows:
            tx.execute(
                "INSERT INTO rollout_audit (rollout_id, at, event, detail) VALUES (?, ?, ?, ?)",
                (rollout_id, now, event, detail),
            )

    def create(self, rollout: NewRollout, now: float) -> None:
        r = rollout
        with self._db.write() as tx:
            cur = tx.execute(
                """INSERT INTO rollouts (rollout_id, release_version, policy_json, state, phase,
                                         phase_started_at, reason, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rollout_id) DO NOTHING""",
                (r.rollout_id, r.release_version, json.dumps(dict(r.policy), sort_keys=True), r.state,
                 r.phase, now, r.reason, now, now),
            )  # fmt: skip
            if cur.rowcount == 0:
                raise StateError(f"rollout {r.rollout_id} already exists")
            tx.executemany(
                """INSERT INTO rollout_devices (rollout_id, device_id, phase, state, reason, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                [
                    (r.rollout_id, d, p, *r.initial.get(d, (r.device_state, "")), now)
                    for d, p in sorted(r.devices.items())
                ],
            )
            self._audit(tx, r.rollout_id, now, r.audit)

    def get(self, rollout_id: str) -> RolloutRecord | None:
        rows = self._db.read(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return _rollout(rows[0]) if rows else None

    def all(self, *, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        rows = self._db.read(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at, rollout_id")
        records = [_rollout(r) for r in rows]
        return records if states is None else [r for r in records if r.state in states]

    def update(self, rollout_id: str, update: RolloutUpdate, now: float) -> bool:
        with self._db.write() as tx:
            if update.expect is not None:
                row = tx.execute(
                    "SELECT state, phase FROM rollouts WHERE rollout_id = ?", (rollout_id,)
                ).fetchone()
                if row is None:
                    raise _no_rollout(rollout_id)
                if (str(row[0]), int(row[1])) != update.expect:
                    return False
            sets: list[str] = ["updated_at = ?"]
            params: list[Any] = [now]
            for column, value in (
                ("state", update.state),
                ("phase", update.phase),
                ("phase_started_at", update.phase_started_at),
                ("reason", update.reason),
            ):
                if value is not None:
                    sets.append(f"{column} = ?")
                    params.append(value)
            if update.accepted_failures is not None:
                sets.append("accepted_failures_json = ?")
                params.append(json.dumps(sorted(update.accepted_failures)))
            cur = tx.execute(
                f"UPDATE rollouts SET {', '.join(sets)} WHERE rollout_id = ?", (*params, rollout_id)
            )
            if cur.rowcount == 0:
                raise _no_rollout(rollout_id)
            self._audit(tx, rollout_id, now, update.audit)
            for device_id, change in sorted(update.devices.items()):
                self._change_device(tx, rollout_id, device_id, change, now)
        return True

    def _change_device(
        self, tx: Transaction, rollout_id: str, device_id: str, change: DeviceChange, now: float
    ) -> None:
        row = tx.execute(
            "SELECT state FROM rollout_devices WHERE rollout_id = ? AND device_id = ?",
            (rollout_id, device_id),
        ).fetchone()
        if row is None:
            raise _not_in(rollout_id, device_id)
        if change.only_from is not None and row[0] != change.only_from:
            return
        sets: list[str] = ["updated_at = ?"]
        params: list[Any] = [now]
        for column, value in (("state", change.state), ("reason", change.reason)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        if change.delivered is not None:
            sets.append("delivered = ?")
            params.append(int(change.delivered))
        tx.execute(
            f"UPDATE rollout_devices SET {', '.join(sets)} WHERE rollout_id = ? AND device_id = ?",
            (*params, rollout_id, device_id),
        )
        if change.state is not None and change.state != row[0]:
            detail = device_transition_detail(device_id, row[0], change.state, change.reason)
            self._audit(tx, rollout_id, now, [("device", detail)])

    def set_device(self, rollout_id: str, device_id: str, change: DeviceChange, now: float) -> None:
        self.update(rollout_id, RolloutUpdate(devices={device_id: change}), now)

    def devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        rows = self._db.read(
            f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE rollout_id = ? ORDER BY phase, device_id",
            (rollout_id,),
        )
        return [_device(r) for r in rows]

    def of_device(self, device_id: str) -> list[RolloutDeviceRecord]:
        rows = self._db.read(
            f"""SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE device_id = ?
                ORDER BY updated_at, rollout_id""",
            (device_id,),
        )
        return [_device(r) for r in rows]

    def audit(self, rollout_id: str) -> list[AuditRecord]:
        rows = self._db.read(
            """SELECT seq, rollout_id, at, event, detail FROM (
                   SELECT * FROM rollout_audit WHERE rollout_id = ? ORDER BY seq DESC LIMIT ?
               ) AS recent ORDER BY seq""",
            (rollout_id, AUDIT_READ_LIMIT),
        )
        return [AuditRecord(int(r[0]), r[1], float(r[2]), r[3], r[4]) for r in rows]


class MemoryRollouts:
    """The same aggregate in dicts; an update is checked whole before any of it is applied (atomic)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[str, RolloutRecord] = {}
        self._devices: dict[str, dict[str, RolloutDeviceRecord]] = {}
        self._audit: list[AuditRecord] = []

    def _log(self, rollout_id: str, now: float, rows: Sequence[tuple[str, str]]) -> None:
        for event, detail in rows:
            self._audit.append(AuditRecord(len(self._audit) + 1, rollout_id, now, event, detail))

    def create(self, rollout: NewRollout, now: float) -> None:
        r = rollout
        with self._lock:
            if r.rollout_id in self._rollouts:
                raise StateError(f"rollout {r.rollout_id} already exists")
            self._rollouts[r.rollout_id] = RolloutRecord(
                r.rollout_id, r.release_version, json.loads(json.dumps(dict(r.policy))), r.state, r.phase,
                now, r.reason, frozenset(), now, now,
            )  # fmt: skip
            self._devices[r.rollout_id] = {
                d: RolloutDeviceRecord(
                    r.rollout_id, d, p, *r.initial.get(d, (r.device_state, "")), False, now
                )
                for d, p in sorted(r.devices.items())
            }
            self._log(r.rollout_id, now, r.audit)

    def get(self, rollout_id: str) -> RolloutRecord | None:
        with self._lock:
            return self._rollouts.get(rollout_id)

    def all(self, *, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        with self._lock:
            records = sorted(self._rollouts.values(), key=lambda r: (r.created_at, r.rollout_id))
        return records if states is None else [r for r in records if r.state in states]

    def update(self, rollout_id: str, update: RolloutUpdate, now: float) -> bool:
        with self._lock:
            record = self._rollouts.get(rollout_id)
            if record is None:
                raise _no_rollout(rollout_id)
            if update.expect is not None and (record.state, record.phase) != update.expect:
                return False
            devices = self._devices[rollout_id]
            for device_id in update.devices:
                if device_id not in devices:
                    raise _not_in(rollout_id, device_id)
            self._rollouts[rollout_id] = dataclasses.replace(
                record,
                state=record.state if update.state is None else update.state,
                phase=record.phase if update.phase is None else update.phase,
                phase_started_at=(
                    record.phase_started_at if update.phase_started_at is None else update.phase_started_at
                ),
                reason=record.reason if update.reason is None else update.reason,
                accepted_failures=(
                    record.accepted_failures if update.accepted_failures is None else update.accepted_failures
                ),
                updated_at=now,
            )
            self._log(rollout_id, now, update.audit)
            for device_id, change in sorted(update.devices.items()):
                old = devices[device_id]
                if change.only_from is not None and old.state != change.only_from:
                    continue
                devices[device_id] = dataclasses.replace(
                    old,
                    state=old.state if change.state is None else change.state,
                    reason=old.reason if change.reason is None else change.reason,
                    delivered=old.delivered if change.delivered is None else change.delivered,
                    updated_at=now,
                )
                if change.state is not None and change.state != old.state:
                    detail = device_transition_detail(device_id, old.state, change.state, change.reason)
                    self._log(rollout_id, now, [("device", detail)])
        return True

    def set_device(self, rollout_id: str, device_id: str, change: DeviceChange, now: float) -> None:
        self.update(rollout_id, RolloutUpdate(devices={device_id: change}), now)

    def devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        with self._lock:
            members = list(self._devices.get(rollout_id, {}).values())
        return sorted(members, key=lambda d: (d.phase, d.device_id))

    def of_device(self, device_id: str) -> list[RolloutDeviceRecord]:
        with self._lock:
            entries = [m[device_id] for m in self._devices.values() if device_id in m]
        return sorted(entries, key=lambda d: (d.updated_at, d.rollout_id))

    def audit(self, rollout_id: str) -> list[AuditRecord]:
        with self._lock:
            return [a for a in self._audit if a.rollout_id == rollout_id][-AUDIT_READ_LIMIT:]
