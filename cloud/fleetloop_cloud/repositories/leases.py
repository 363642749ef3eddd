"""Coordinator leases: SQL and its in-memory fake.

A coordinator beats its lease every few seconds (``services.devices.LEASE_BEAT_S``); a device session
held by a coordinator whose last beat is older than the lease counts for nothing. So a coordinator that
crashes, is killed or loses its database takes its devices' "online" with it within one lease, in a
single-coordinator setup (where the restarted process has a new id) as with several sharing PostgreSQL.
"""

from __future__ import annotations

import threading

from fleetloop_cloud.repositories.database import Database


class SqlLeases:
    def __init__(self, db: Database) -> None:
        self._db = db

    def beat(self, coordinator_id: str, now: float) -> None:
        with self._db.write() as tx:
            tx.execute(
                """INSERT INTO coordinators (coordinator_id, beat_at) VALUES (?, ?)
                   ON CONFLICT (coordinator_id) DO UPDATE SET beat_at = excluded.beat_at""",
                (coordinator_id, now),
            )

    def alive(self, since: float) -> set[str]:
        return {str(r[0]) for r in self._db.read("SELECT coordinator_id FROM coordinators WHERE beat_at >= ?",
                                                 (since,))}  # fmt: skip

    def retire(self, coordinator_id: str) -> None:
        with self._db.write() as tx:
            tx.execute("DELETE FROM coordinators WHERE coordinator_id = ?", (coordinator_id,))

    def reap(self, before: float) -> int:
        with self._db.write() as tx:
            return tx.execute("DELETE FROM coordinators WHERE beat_at < ?", (before,)).rowcount


class MemoryLeases:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}

    def beat(self, coordinator_id: str, now: float) -> None:
        with self._lock:
            self._beats[coordinator_id] = now

    def alive(self, since: float) -> set[str]:
        with self._lock:
            return {c for c, at in self._beats.items() if at >= since}

    def retire(self, coordinator_id: str) -> None:
        with self._lock:
            self._beats.pop(coordinator_id, None)

    def reap(self, before: float) -> int:
        with self._lock:
            dead = [c for c, at in self._beats.items() if at < before]
            for c in dead:
                del self._beats[c]
            return len(dead)
