"""The audit log: append-only, each entry chained to the one before by its hash. SQL and the fake.

Appending is one write transaction that reads the head and writes the next entry, so coordinators
sharing PostgreSQL extend one chain (write transactions are serialized across processes, see
:mod:`.database`). Nothing here updates or deletes an entry.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from fleetloop_cloud.identity.audit_chain import GENESIS, entry_hash
from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.records import AuditEntry, AuditFilter, NewAuditEntry

_COLUMNS = (
    "seq, at, actor, role, transport, address, request_id, action, target, before_value, after_value, "
    "detail, prev_hash, entry_hash"
)
#: Entries one read returns at most, whatever the caller asks.
MAX_READ = 10_000


def _chained(entry: NewAuditEntry, seq: int, prev_hash: str) -> AuditEntry:
    fields: dict[str, Any] = {"seq": seq, **dataclasses.asdict(entry), "prev_hash": prev_hash}
    return AuditEntry(**fields, hash=entry_hash(fields))


def _entry(r: tuple[Any, ...]) -> AuditEntry:
    """An entry from a row of :data:`_COLUMNS`."""
    *taken, prev_hash, hash_ = (str(v) for v in r[2:])
    return AuditEntry(float(r[1]), *taken, seq=int(r[0]), prev_hash=prev_hash, hash=hash_)


def _matches(e: AuditEntry, where: AuditFilter) -> bool:
    if e.seq <= where.after_seq or (where.since is not None and e.at < where.since):
        return False
    if where.actor is not None and e.actor != where.actor:
        return False
    return where.kind is None or e.action == where.kind or e.action.startswith(where.kind + ".")


class SqlAuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def append(self, entry: NewAuditEntry) -> AuditEntry:
        with self._db.write() as tx:
            head = tx.execute(
                "SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev = (int(head[0]) + 1, str(head[1])) if head else (1, GENESIS)
            e = _chained(entry, seq, prev)
            tx.execute(
                f"INSERT INTO audit_log ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.seq, e.at, e.actor, e.role, e.transport, e.address, e.request_id, e.action, e.target,
                 e.before, e.after, e.detail, e.prev_hash, e.hash),
            )  # fmt: skip
            return e

    def entries(self, where: AuditFilter) -> list[AuditEntry]:
        clauses: list[str] = ["seq > ?"]
        params: list[object] = [where.after_seq]
        if where.since is not None:
            clauses.append("at >= ?")
            params.append(where.since)
        if where.actor is not None:
            clauses.append("actor = ?")
            params.append(where.actor)
        if where.kind is not None:
            clauses.append("(action = ? OR substr(action, 1, ?) = ?)")
            params += [where.kind, len(where.kind) + 1, where.kind + "."]
        rows = self._db.read(
            f"SELECT {_COLUMNS} FROM audit_log WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?",
            (*params, max(1, min(where.limit, MAX_READ))),
        )
        return [_entry(r) for r in rows]

    def chain(self, after_seq: int, limit: int) -> list[AuditEntry]:
        rows = self._db.read(
            f"SELECT {_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, max(1, min(limit, MAX_READ))),
        )
        return [_entry(r) for r in rows]


class MemoryAuditLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[AuditEntry] = []

    def append(self, entry: NewAuditEntry) -> AuditEntry:
        with self._lock:
            prev = self._entries[-1].hash if self._entries else GENESIS
            e = _chained(entry, len(self._entries) + 1, prev)
            self._entries.append(e)
            return e

    def entries(self, where: AuditFilter) -> list[AuditEntry]:
        with self._lock:
            found = [e for e in self._entries if _matches(e, where)]
        return found[: max(1, min(where.limit, MAX_READ))]

    def chain(self, after_seq: int, limit: int) -> list[AuditEntry]:
        with self._lock:
            return self._entries[after_seq : after_seq + max(1, min(limit, MAX_READ))]
