"""Coordinator leases: SQL and its in-memory fake.

A coordinator beats its lease every few seconds (``services.devices.LEASE_BEAT_S``); a device session
held by a coordinator whose last beat is older than the lease counts for nothing. So a coordinator that
crashes, is killed or loses its database takes its devices' "online" with it within one lease, in a
single-coordinator setup (where the restarted process has a new id) as with several sharing PostgreSQL.

Writer locks (:meth:`SqlLeases.take`) are the database's word on who may write one shared thing in the
object store now (a TUF repository's metadata, whose versions must only grow): a named row of the
controller lease's table, held until given up or until it expires (a holder that died frees it).
"""

from __future__ import annotations

import threading

from fleetloop_cloud.repositories.database import Database

#: A named lease: (holder, fencing token, expires at).
Lease = tuple[str, int, float]


def take_lease(current: Lease | None, holder: str, now: float, ttl_s: float) -> Lease | None:
    """The lease after ``holder`` asks for it at ``now``: renewed for its holder, taken over (with the
    next fencing token) once expired, None while another holds it."""
    if current is None:
        return holder, 1, now + ttl_s
    owner, token, expires = current
    if owner != holder:
        if expires > now:
            return None
        token += 1
    return holder, token, now + ttl_s


class MemoryLease:
    """One lease held in memory: the in-memory fakes' counterpart of a ``controller_lease`` row
    (:func:`acquire_named`, :func:`release_named`), so every fake takes, renews and gives up a lease
    by the same rule as the database does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lease: Lease | None = None

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        with self._lock:
            taken = take_lease(self._lease, holder, now, ttl_s)
            if taken is not None:
                self._lease = taken
            return None if taken is None else taken[1]

    def release(self, holder: str) -> None:
        with self._lock:
            if self._lease is not None and self._lease[0] == holder:
                self._lease = (holder, self._lease[1], 0.0)

    def current(self) -> Lease | None:
        with self._lock:
            return self._lease


def acquire_named(db: Database, name: str, holder: str, now: float, ttl_s: float) -> int | None:
    """Take or renew the lease ``name`` in the ``controller_lease`` table (one coordinator at a time
    does the work it guards); its fencing token, or None while another coordinator holds it."""
    with db.write() as tx:
        row = tx.execute(
            "SELECT holder, token, expires_at FROM controller_lease WHERE name = ?", (name,)
        ).fetchone()
        current = None if row is None else (str(row[0]), int(row[1]), float(row[2]))
        taken = take_lease(current, holder, now, ttl_s)
        if taken is None:
            return None
        if row is None:
            tx.execute("INSERT INTO controller_lease (name, holder, token, expires_at) VALUES (?, ?, ?, ?)",
                       (name, *taken))  # fmt: skip
        else:
            tx.execute("UPDATE controller_lease SET holder = ?, token = ?, expires_at = ? WHERE name = ?",
                       (*taken, name))  # fmt: skip
        return taken[1]


def release_named(db: Database, name: str, holder: str) -> None:
    """End ``holder``'s lease ``name`` now (another coordinator may take it at once)."""
    with db.write() as tx:
        tx.execute("UPDATE controller_lease SET expires_at = 0 WHERE name = ? AND holder = ?", (name, holder))


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

    def take(self, name: str, holder: str, now: float, ttl_s: float) -> bool:
        return acquire_named(self._db, _writer(name), holder, now, ttl_s) is not None

    def give_up(self, name: str, holder: str) -> None:
        release_named(self._db, _writer(name), holder)


def _writer(name: str) -> str:
    """Writer locks share the controller lease's table under their own names."""
    return f"writer:{name}"


class MemoryLeases:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._writers: dict[str, MemoryLease] = {}

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

    def take(self, name: str, holder: str, now: float, ttl_s: float) -> bool:
        with self._lock:
            writer = self._writers.setdefault(name, MemoryLease())
        return writer.acquire(holder, now, ttl_s) is not None

    def give_up(self, name: str, holder: str) -> None:
        with self._lock:
            writer = self._writers.get(name)
        if writer is not None:
            writer.release(holder)
