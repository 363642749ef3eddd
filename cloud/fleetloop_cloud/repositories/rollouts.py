"""The rollouts aggregate (rollouts, their executions, audit trail, signal-gate evaluations and the
controller lease): SQL and its fake.

Every write is one transaction. The rollout controller relies on that: a rollout transition, the device
states it changes, its audit rows, the gate evaluations that led to it and a roll-back rollout it spawns
are committed together, *before* any job is published, so a restarted coordinator resumes exactly where
the last one stopped and nothing is lost or made twice. A device's state change always writes its own
audit row (``device``), so the trail shows every transition even when the caller lists only the
rollout-level ones.

The controller lease lives here too, because its fencing token is checked inside the same transaction
as the write it guards (:class:`~.records.Fence`): a coordinator that was paused past its lease and
wakes up with a stale decision is refused by the database, whatever its own clock says.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import Any

from fleetloop_cloud.repositories.database import Database, Transaction
from fleetloop_cloud.repositories.interfaces import AUDIT_READ_LIMIT, GATE_READ_LIMIT
from fleetloop_cloud.repositories.leases import MemoryLease, acquire_named, release_named
from fleetloop_cloud.repositories.records import (
    AuditRecord,
    DeviceChange,
    Fence,
    GateEvaluationRecord,
    NewGateEvaluation,
    NewRollout,
    RolloutDeviceRecord,
    RolloutRecord,
    RolloutUpdate,
    device_transition_detail,
)
from fleetloop_shared.errors import NotFoundError, StateError

#: The one controller lease (a row; several coordinators compete for it).
LEASE_NAME = "rollout-controller"
_ROLLOUT_COLUMNS = (
    "rollout_id, release_version, policy_json, state, phase, phase_started_at, reason, "
    "accepted_failures_json, created_at, updated_at, revision, parent_id"
)
_DEVICE_COLUMNS = (
    "rollout_id, device_id, phase, state, reason, delivered, updated_at, attempt, changed_at, offered_at, "
    "retry_at, windows_json, hold, from_version, running_version, removed_at, removed_by, removed_reason"
)
_GATE_COLUMNS = "seq, rollout_id, at, phase, gate, decision, statistic, p_value, effect, reason, inputs_json"


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
        revision=int(r[10]),
        parent_id=str(r[11]),
    )


def _assignments(now: float, **columns: Any) -> tuple[list[str], list[Any]]:
    """The SET clauses and their parameters of a partial update: ``updated_at`` and every column
    given a value (None leaves a column as it is)."""
    sets: list[str] = ["updated_at = ?"]
    params: list[Any] = [now]
    for column, value in columns.items():
        if value is not None:
            sets.append(f"{column} = ?")
            params.append(value)
    return sets, params


def _windows_json(windows: Sequence[tuple[float, float]]) -> str:
    return json.dumps([[a, b] for a, b in windows]) if windows else "[]"


def _windows(text: str) -> tuple[tuple[float, float], ...]:
    if text == "[]":
        return ()
    return tuple((float(a), float(b)) for a, b in json.loads(text))


def _device(r: tuple[Any, ...]) -> RolloutDeviceRecord:
    return RolloutDeviceRecord(
        r[0],
        r[1],
        int(r[2]),
        r[3],
        r[4],
        bool(r[5]),
        float(r[6]),
        int(r[7]),
        float(r[8]),
        None if r[9] is None else float(r[9]),
        float(r[10]),
        _windows(r[11]),
        bool(r[12]),
        r[13],
        r[14],
        float(r[15]),
        r[16],
        r[17],
    )


def _gate(r: tuple[Any, ...]) -> GateEvaluationRecord:
    seq, rollout_id, at, phase, gate, decision, statistic, p_value, effect, reason, inputs = r
    return GateEvaluationRecord(
        int(phase), gate, decision, _maybe(statistic), _maybe(p_value), _maybe(effect), reason,
        {str(k): float(v) for k, v in json.loads(inputs).items()},
        seq=int(seq), rollout_id=rollout_id, at=float(at),
    )  # fmt: skip


def _maybe(value: Any) -> float | None:
    return None if value is None else float(value)


def _inputs_json(evaluation: NewGateEvaluation) -> str:
    return json.dumps({k: float(v) for k, v in evaluation.inputs.items()}, sort_keys=True)


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

    @staticmethod
    def _holds(tx: Transaction, fence: Fence | None) -> bool:
        if fence is None:
            return True
        row = tx.execute(
            "SELECT holder, token FROM controller_lease WHERE name = ?", (LEASE_NAME,)
        ).fetchone()
        return row is not None and (str(row[0]), int(row[1])) == (fence.holder, fence.token)

    def _insert(self, tx: Transaction, r: NewRollout, now: float) -> None:
        row = tx.execute(
            "SELECT COALESCE(MAX(revision), 0) FROM rollouts WHERE release_name = ?", (r.release_name,)
        ).fetchone()
        revision = int(row[0] if row is not None else 0) + 1
        cur = tx.execute(
            """INSERT INTO rollouts (rollout_id, release_version, policy_json, state, phase, phase_started_at,
                                     reason, created_at, updated_at, revision, parent_id, release_name)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rollout_id) DO NOTHING""",
            (
                r.rollout_id,
                r.release_version,
                json.dumps(dict(r.policy), sort_keys=True),
                r.state,
                r.phase,
                now,
                r.reason,
                now,
                now,
                revision,
                r.parent_id,
                r.release_name,
            ),
        )
        if cur.rowcount == 0:
            raise StateError(f"rollout {r.rollout_id} already exists")
        tx.executemany(
            f"INSERT INTO rollout_devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, ?, 0, ?, NULL, 0, "
            "'[]', 0, ?, '', 0, '', '')",
            [
                (
                    r.rollout_id,
                    d,
                    p,
                    *r.initial.get(d, (r.device_state, "")),
                    now,
                    now,
                    r.from_versions.get(d, ""),
                )
                for d, p in sorted(r.devices.items())
            ],
        )
        self._audit(tx, r.rollout_id, now, r.audit)

    def create(self, rollout: NewRollout, now: float, *, fence: Fence | None = None) -> bool:
        with self._db.write() as tx:
            if not self._holds(tx, fence):
                return False
            self._insert(tx, rollout, now)
        return True

    def get(self, rollout_id: str) -> RolloutRecord | None:
        rows = self._db.read(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return _rollout(rows[0]) if rows else None

    def all(self, *, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        if states is None:
            rows = self._db.read(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at, rollout_id")
        else:
            marks = ", ".join("?" for _ in states) or "''"
            rows = self._db.read(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ({marks}) "
                "ORDER BY created_at, rollout_id",
                tuple(states),
            )
        return [_rollout(r) for r in rows]

    def update(self, rollout_id: str, update: RolloutUpdate, now: float) -> bool:
        with self._db.write() as tx:
            if not self._holds(tx, update.fence):
                return False
            if update.expect is not None:
                row = tx.execute(
                    "SELECT state, phase FROM rollouts WHERE rollout_id = ?", (rollout_id,)
                ).fetchone()
                if row is None:
                    raise _no_rollout(rollout_id)
                if (str(row[0]), int(row[1])) != update.expect:
                    return False
            sets, params = _assignments(
                now, state=update.state, phase=update.phase, phase_started_at=update.phase_started_at,
                reason=update.reason,
            )  # fmt: skip
            if update.accepted_failures is not None:
                sets.append("accepted_failures_json = ?")
                params.append(json.dumps(sorted(update.accepted_failures)))
            cur = tx.execute(
                f"UPDATE rollouts SET {', '.join(sets)} WHERE rollout_id = ?", (*params, rollout_id)
            )
            if cur.rowcount == 0:
                raise _no_rollout(rollout_id)
            self._audit(tx, rollout_id, now, update.audit)
            for evaluation in update.gates:
                e = evaluation
                tx.execute(
                    """INSERT INTO rollout_gates (rollout_id, at, phase, gate, decision, statistic, p_value,
                                                  effect, reason, inputs_json)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        rollout_id,
                        now,
                        e.phase,
                        e.gate,
                        e.decision,
                        e.statistic,
                        e.p_value,
                        e.effect,
                        e.reason,
                        _inputs_json(e),
                    ),
                )
            for device_id, (phase, version) in sorted(update.joined.items()):
                tx.execute(
                    f"""INSERT INTO rollout_devices ({_DEVICE_COLUMNS})
                        VALUES (?, ?, ?, 'PENDING', 'joined', 0, ?, 0, ?, NULL, 0, '[]', 0, ?, '', 0, '', '')
                        ON CONFLICT (rollout_id, device_id) DO NOTHING""",
                    (rollout_id, device_id, phase, now, now, version),
                )
            for device_id, change in sorted(update.devices.items()):
                self._change_device(tx, rollout_id, device_id, change, now)
            for child in update.spawn:
                self._insert(tx, child, now)
        return True

    def _change_device(
        self, tx: Transaction, rollout_id: str, device_id: str, change: DeviceChange, now: float
    ) -> None:
        row = tx.execute(
            "SELECT state, attempt, removed_at FROM rollout_devices WHERE rollout_id = ? AND device_id = ?",
            (rollout_id, device_id),
        ).fetchone()
        if row is None:
            raise _not_in(rollout_id, device_id)
        if change.only_from is not None and row[0] != change.only_from:
            return
        if change.only_attempt is not None and int(row[1]) != change.only_attempt:
            return
        sets, params = _assignments(
            now, state=change.state, reason=change.reason, attempt=change.attempt,
            offered_at=change.offered_at, retry_at=change.retry_at, running_version=change.running_version,
        )  # fmt: skip
        if change.state is not None and change.state != row[0]:
            sets.append("changed_at = ?")
            params.append(now)
        for column, flag in (("delivered", change.delivered), ("hold", change.hold)):
            if flag is not None:
                sets.append(f"{column} = ?")
                params.append(int(flag))
        if change.windows is not None:
            sets.append("windows_json = ?")
            params.append(_windows_json(change.windows))
        if change.removal is not None and not float(row[2]):
            sets.append("removed_at = ?, removed_by = ?, removed_reason = ?")
            params.extend(change.removal)
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

    def evaluations(self, rollout_id: str) -> list[GateEvaluationRecord]:
        rows = self._db.read(
            f"""SELECT {_GATE_COLUMNS} FROM (
                    SELECT * FROM rollout_gates WHERE rollout_id = ? ORDER BY seq DESC LIMIT ?
                ) AS recent ORDER BY seq""",
            (rollout_id, GATE_READ_LIMIT),
        )
        return [_gate(r) for r in rows]

    def latest_evaluations(self, rollout_id: str, phase: int) -> dict[str, GateEvaluationRecord]:
        rows = self._db.read(
            f"""SELECT {_GATE_COLUMNS} FROM rollout_gates WHERE seq IN (
                    SELECT MAX(seq) FROM rollout_gates WHERE rollout_id = ? AND phase = ? GROUP BY gate)""",
            (rollout_id, phase),
        )
        return {r.gate: r for r in map(_gate, rows)}

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        return acquire_named(self._db, LEASE_NAME, holder, now, ttl_s)

    def release(self, holder: str) -> None:
        release_named(self._db, LEASE_NAME, holder)

    def lease(self) -> tuple[str, int, float] | None:
        rows = self._db.read(
            "SELECT holder, token, expires_at FROM controller_lease WHERE name = ?", (LEASE_NAME,)
        )
        return (str(rows[0][0]), int(rows[0][1]), float(rows[0][2])) if rows else None


class MemoryRollouts:
    """The same aggregate in dicts; an update is checked whole before any of it is applied (atomic)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[str, RolloutRecord] = {}
        self._release_names: dict[str, str] = {}
        self._devices: dict[str, dict[str, RolloutDeviceRecord]] = {}
        self._audit: list[AuditRecord] = []
        self._gates: list[GateEvaluationRecord] = []
        self._lease = MemoryLease()

    def _log(self, rollout_id: str, now: float, rows: Sequence[tuple[str, str]]) -> None:
        for event, detail in rows:
            self._audit.append(AuditRecord(len(self._audit) + 1, rollout_id, now, event, detail))

    def _holds(self, fence: Fence | None) -> bool:
        lease = self._lease.current()
        return fence is None or (lease is not None and lease[:2] == (fence.holder, fence.token))

    def _insert(self, r: NewRollout, now: float) -> None:
        revision = 1 + max(
            (
                x.revision
                for x in self._rollouts.values()
                if self._release_names[x.rollout_id] == r.release_name
            ),
            default=0,
        )
        self._rollouts[r.rollout_id] = RolloutRecord(
            r.rollout_id,
            r.release_version,
            json.loads(json.dumps(dict(r.policy))),
            r.state,
            r.phase,
            now,
            r.reason,
            frozenset(),
            now,
            now,
            revision,
            r.parent_id,
        )
        self._release_names[r.rollout_id] = r.release_name
        self._devices[r.rollout_id] = {
            d: RolloutDeviceRecord(
                r.rollout_id,
                d,
                p,
                *r.initial.get(d, (r.device_state, "")),
                False,
                now,
                changed_at=now,
                from_version=r.from_versions.get(d, ""),
            )
            for d, p in sorted(r.devices.items())
        }
        self._log(r.rollout_id, now, r.audit)

    def create(self, rollout: NewRollout, now: float, *, fence: Fence | None = None) -> bool:
        with self._lock:
            if not self._holds(fence):
                return False
            if rollout.rollout_id in self._rollouts:
                raise StateError(f"rollout {rollout.rollout_id} already exists")
            self._insert(rollout, now)
        return True

    def get(self, rollout_id: str) -> RolloutRecord | None:
        with self._lock:
            return self._rollouts.get(rollout_id)

    def all(self, *, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        with self._lock:
            records = sorted(self._rollouts.values(), key=lambda r: (r.created_at, r.rollout_id))
        return records if states is None else [r for r in records if r.state in states]

    def update(self, rollout_id: str, update: RolloutUpdate, now: float) -> bool:
        with self._lock:
            if not self._holds(update.fence):
                return False
            record = self._rollouts.get(rollout_id)
            if record is None:
                raise _no_rollout(rollout_id)
            if update.expect is not None and (record.state, record.phase) != update.expect:
                return False
            devices = self._devices[rollout_id]
            for device_id in update.devices:
                if device_id not in devices and device_id not in update.joined:
                    raise _not_in(rollout_id, device_id)
            for child in update.spawn:
                if child.rollout_id in self._rollouts:
                    raise StateError(f"rollout {child.rollout_id} already exists")
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
            for e in update.gates:
                made = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
                made["inputs"] = {k: float(v) for k, v in e.inputs.items()}  # a copy, as a database row is
                self._gates.append(
                    GateEvaluationRecord(
                        **made,
                        seq=len(self._gates) + 1,
                        rollout_id=rollout_id,
                        at=now,
                    )
                )
            for device_id, (phase, version) in sorted(update.joined.items()):
                if device_id not in devices:
                    devices[device_id] = RolloutDeviceRecord(
                        rollout_id,
                        device_id,
                        phase,
                        "PENDING",
                        "joined",
                        False,
                        now,
                        changed_at=now,
                        from_version=version,
                    )
            for device_id, change in sorted(update.devices.items()):
                self._change_device(rollout_id, devices, device_id, change, now)
            for child in update.spawn:
                self._insert(child, now)
        return True

    def _change_device(
        self,
        rollout_id: str,
        devices: dict[str, RolloutDeviceRecord],
        device_id: str,
        change: DeviceChange,
        now: float,
    ) -> None:
        old = devices[device_id]
        if change.only_from is not None and old.state != change.only_from:
            return
        if change.only_attempt is not None and old.attempt != change.only_attempt:
            return
        moved = change.state is not None and change.state != old.state

        def pick(new: Any, current: Any) -> Any:
            return current if new is None else new

        devices[device_id] = old._replace(
            state=pick(change.state, old.state),
            reason=pick(change.reason, old.reason),
            delivered=pick(change.delivered, old.delivered),
            attempt=pick(change.attempt, old.attempt),
            offered_at=pick(change.offered_at, old.offered_at),
            retry_at=pick(change.retry_at, old.retry_at),
            windows=pick(change.windows, old.windows),
            hold=pick(change.hold, old.hold),
            running_version=pick(change.running_version, old.running_version),
            changed_at=now if moved else old.changed_at,
            updated_at=now,
        )
        if change.removal is not None and not old.removed_at:
            at, by, why = change.removal
            devices[device_id] = devices[device_id]._replace(removed_at=at, removed_by=by, removed_reason=why)
        if moved:
            assert change.state is not None
            detail = device_transition_detail(device_id, old.state, change.state, change.reason)
            self._log(rollout_id, now, [("device", detail)])

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

    def evaluations(self, rollout_id: str) -> list[GateEvaluationRecord]:
        with self._lock:
            return [g for g in self._gates if g.rollout_id == rollout_id][-GATE_READ_LIMIT:]

    def latest_evaluations(self, rollout_id: str, phase: int) -> dict[str, GateEvaluationRecord]:
        with self._lock:
            return {g.gate: g for g in self._gates if g.rollout_id == rollout_id and g.phase == phase}

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        with self._lock:  # a takeover waits for a fenced update in progress (the database's write lock)
            return self._lease.acquire(holder, now, ttl_s)

    def release(self, holder: str) -> None:
        with self._lock:
            self._lease.release(holder)

    def lease(self) -> tuple[str, int, float] | None:
        return self._lease.current()
