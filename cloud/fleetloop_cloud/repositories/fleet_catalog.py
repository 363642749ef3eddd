"""Each fleet's signal catalog — one id per path, fleet-wide — SQL (SQLite / PostgreSQL) and its in-memory
fake, side by side.

The database is the arbiter: ``(fleet, signal_id)`` is the primary key and ``(fleet, path)`` is unique,
so however many coordinators assign at once, a path never gets two ids nor an id two paths. New paths
are inserted under the write transaction (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's write lock) with
``ON CONFLICT DO NOTHING``, and what is answered is what the table holds afterwards, never what this
process meant to write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from fleetloop_cloud.repositories.database import Database
from fleetloop_shared.catalog import DataType, SignalSpec
from fleetloop_shared.catalog_ids import FLEET_ID_MAX, Assignment
from fleetloop_shared.errors import UnavailableError

#: A signal a device or an operator declares: path, datatype, unit.
Declared = tuple[str, DataType, str]
#: Tries at assigning when a row another writer inserted took our id (only a writer outside the
#: write lock can cause that; each try sees the other's row).
ASSIGN_TRIES = 3


def datatype_conflict(spec: SignalSpec, declared: DataType) -> str:
    """The reason a path declared with another datatype than the fleet registered is refused."""
    return (
        f"signal {spec.path!r} is {spec.data_type.name} in the fleet's catalog (id {spec.id}); "
        f"declared as {declared.name}"
    )


def decide(fleet: str, have: dict[str, SignalSpec], next_id: int, signals: Sequence[Declared]) -> tuple[
    list[SignalSpec], Assignment
]:  # fmt: skip
    """Pure: the rows to insert for the paths of ``signals`` not in ``have`` (the fleet's rows of those
    paths; new ones numbered from ``next_id``) and the assignment, assuming they go in."""
    new: list[SignalSpec] = []
    assigned: list[SignalSpec] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path, data_type, unit in signals:
        if path in seen:
            continue
        seen.add(path)
        spec = have.get(path)
        if spec is None:
            if next_id > FLEET_ID_MAX:
                refused.append((path, f"fleet {fleet!r}: the catalog is full ({FLEET_ID_MAX} signals)"))
                continue
            spec = SignalSpec(next_id, path, data_type, unit)
            new.append(spec)
            next_id += 1
        if spec.data_type != data_type:
            refused.append((path, datatype_conflict(spec, data_type)))
            continue
        assigned.append(spec)
    return new, Assignment(fleet, tuple(assigned), tuple(refused))


#: Paths looked up per statement (bounded parameter lists on both databases).
LOOKUP_CHUNK = 500
_COLUMNS = "signal_id, path, data_type, unit"


def _spec(row: Sequence[object]) -> SignalSpec:
    return SignalSpec(int(str(row[0])), str(row[1]), DataType[str(row[2])], str(row[3]))


class SqlFleetCatalog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def _lookup(self, read: Callable[[str, Sequence[object]], list[tuple[object, ...]]], fleet: str,
                paths: Sequence[str]) -> dict[str, SignalSpec]:  # fmt: skip
        unique = list(dict.fromkeys(paths))
        out: dict[str, SignalSpec] = {}
        for i in range(0, len(unique), LOOKUP_CHUNK):
            chunk = unique[i : i + LOOKUP_CHUNK]
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT {_COLUMNS} FROM fleet_signals WHERE fleet = ? AND path IN ({marks})"
            out.update((str(r[1]), _spec(r)) for r in read(sql, [fleet, *chunk]))
        return out

    def lookup(self, fleet: str, paths: Sequence[str]) -> list[SignalSpec]:
        return list(self._lookup(self._db.read, fleet, paths).values())

    def assign(self, fleet: str, signals: Sequence[Declared]) -> Assignment:
        paths = [p for p, _t, _u in signals]
        have = self._lookup(self._db.read, fleet, paths)
        if len(have) == len(set(paths)):  # nothing new: no write, no lock (every hello after the first)
            return decide(fleet, have, 0, signals)[1]
        for _ in range(ASSIGN_TRIES):
            with self._db.write() as tx:

                def read(sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
                    return tx.execute(sql, params).fetchall()

                have = self._lookup(read, fleet, paths)
                top = tx.execute(
                    "SELECT MAX(signal_id) FROM fleet_signals WHERE fleet = ?", (fleet,)
                ).fetchone()
                next_id = int(top[0] or 0) + 1 if top else 1
                new, _planned = decide(fleet, have, next_id, signals)
                for spec in new:
                    tx.execute(
                        """INSERT INTO fleet_signals (fleet, signal_id, path, data_type, unit)
                           VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                        (fleet, spec.id, spec.path, spec.data_type.name, spec.unit),
                    )
                have = self._lookup(read, fleet, paths)
            if all(spec.path in have for spec in new):  # each new path is in, ours or another writer's
                return decide(fleet, have, next_id, signals)[1]
        raise UnavailableError(f"fleet {fleet!r}: signal ids kept being taken by another writer; try again")

    def signals(self, fleet: str) -> list[SignalSpec]:
        sql = f"SELECT {_COLUMNS} FROM fleet_signals WHERE fleet = ? ORDER BY signal_id"
        rows = self._db.read(sql, (fleet,))
        return [_spec(r) for r in rows]


class MemoryFleetCatalog:
    """The same semantics in a dict, for service tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fleets: dict[str, dict[str, SignalSpec]] = {}

    def lookup(self, fleet: str, paths: Sequence[str]) -> list[SignalSpec]:
        with self._lock:
            have = self._fleets.get(fleet, {})
            return [have[p] for p in dict.fromkeys(paths) if p in have]

    def assign(self, fleet: str, signals: Sequence[Declared]) -> Assignment:
        with self._lock:
            have = self._fleets.setdefault(fleet, {})
            next_id = max((s.id for s in have.values()), default=0) + 1
            new, assignment = decide(fleet, have, next_id, signals)
            have.update((s.path, s) for s in new)
            return assignment

    def signals(self, fleet: str) -> list[SignalSpec]:
        with self._lock:
            return sorted(self._fleets.get(fleet, {}).values(), key=lambda s: s.id)
