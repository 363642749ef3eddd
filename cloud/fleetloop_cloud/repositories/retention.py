"""Retention per fleet and erasure requests per device: SQL and its in-memory fake.

An erasure request is written before any data is touched, so the request itself is the state a crashed
erasure resumes from (any coordinator's next pass finds it not done), and ingest can refuse the device's
earlier data from the moment it is asked for.
"""

from __future__ import annotations

import dataclasses
import threading

from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.leases import MemoryLease, acquire_named, release_named
from fleetloop_cloud.repositories.records import ErasureRecord

_ERASURE_COLUMNS = "device_id, requested_at, requested_by, done_at, detail"


def _erasure(row: tuple[object, ...]) -> ErasureRecord:
    done = row[3]
    return ErasureRecord(str(row[0]), float(str(row[1])), str(row[2]),
                         None if done is None else float(str(done)), str(row[4]))  # fmt: skip


class SqlRetention:
    def __init__(self, db: Database) -> None:
        self._db = db

    def set_days(self, fleet: str, days: int, now: float) -> int | None:
        with self._db.write() as tx:
            row = tx.execute("SELECT days FROM fleet_retention WHERE fleet = ?", (fleet,)).fetchone()
            tx.execute(
                """INSERT INTO fleet_retention (fleet, days, updated_at) VALUES (?, ?, ?)
                   ON CONFLICT (fleet) DO UPDATE SET days = excluded.days,
                     updated_at = excluded.updated_at""",
                (fleet, days, now),
            )
            return None if row is None else int(row[0])

    def clear(self, fleet: str) -> int | None:
        with self._db.write() as tx:
            row = tx.execute("SELECT days FROM fleet_retention WHERE fleet = ?", (fleet,)).fetchone()
            tx.execute("DELETE FROM fleet_retention WHERE fleet = ?", (fleet,))
            return None if row is None else int(row[0])

    def days(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.read("SELECT fleet, days FROM fleet_retention")}

    def request_erasure(self, device_id: str, now: float, by: str) -> ErasureRecord:
        with self._db.write() as tx:
            tx.execute(
                """INSERT INTO erasures (device_id, requested_at, requested_by, done_at, detail)
                   VALUES (?, ?, ?, NULL, '')
                   ON CONFLICT (device_id) DO UPDATE SET requested_at = excluded.requested_at,
                     requested_by = excluded.requested_by, done_at = NULL, detail = ''""",
                (device_id, now, by),
            )
        return ErasureRecord(device_id, now, by)

    def finish_erasure(self, device_id: str, requested_at: float, now: float, detail: str) -> bool:
        with self._db.write() as tx:
            cur = tx.execute(
                "UPDATE erasures SET done_at = ?, detail = ? WHERE device_id = ? AND requested_at = ?",
                (now, detail, device_id, requested_at),
            )
            return bool(cur.rowcount)

    def erasures(self, *, pending: bool = False) -> list[ErasureRecord]:
        where = " WHERE done_at IS NULL" if pending else ""
        rows = self._db.read(f"SELECT {_ERASURE_COLUMNS} FROM erasures{where} ORDER BY requested_at")
        return [_erasure(tuple(r)) for r in rows]

    def erasure(self, device_id: str) -> ErasureRecord | None:
        rows = self._db.read(f"SELECT {_ERASURE_COLUMNS} FROM erasures WHERE device_id = ?", (device_id,))
        return _erasure(tuple(rows[0])) if rows else None

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        return acquire_named(self._db, LEASE_NAME, holder, now, ttl_s)

    def release(self, holder: str) -> None:
        release_named(self._db, LEASE_NAME, holder)


#: The lease of the data lifecycle job (retention and erasure): one coordinator at a time runs it.
LEASE_NAME = "data-lifecycle"


class MemoryRetention:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._days: dict[str, int] = {}
        self._erasures: dict[str, ErasureRecord] = {}
        self._lease = MemoryLease()

    def set_days(self, fleet: str, days: int, now: float) -> int | None:
        with self._lock:
            before = self._days.get(fleet)
            self._days[fleet] = days
            return before

    def clear(self, fleet: str) -> int | None:
        with self._lock:
            return self._days.pop(fleet, None)

    def days(self) -> dict[str, int]:
        with self._lock:
            return dict(self._days)

    def request_erasure(self, device_id: str, now: float, by: str) -> ErasureRecord:
        with self._lock:
            self._erasures[device_id] = record = ErasureRecord(device_id, now, by)
            return record

    def finish_erasure(self, device_id: str, requested_at: float, now: float, detail: str) -> bool:
        with self._lock:
            old = self._erasures.get(device_id)
            if old is None or old.requested_at != requested_at:
                return False
            self._erasures[device_id] = dataclasses.replace(old, done_at=now, detail=detail)
            return True

    def erasures(self, *, pending: bool = False) -> list[ErasureRecord]:
        with self._lock:
            out = [e for e in self._erasures.values() if not pending or e.done_at is None]
        return sorted(out, key=lambda e: e.requested_at)

    def erasure(self, device_id: str) -> ErasureRecord | None:
        with self._lock:
            return self._erasures.get(device_id)

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        return self._lease.acquire(holder, now, ttl_s)

    def release(self, holder: str) -> None:
        self._lease.release(holder)
