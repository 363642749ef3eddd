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
from collections.abc import Sequence

from fleetloop_cloud.repositories.database import Database, Transaction
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


def decide(fleet: str, have: dict[str, SignalSpec], signals: Sequence[Declared]) -> tuple[
    list[SignalSpec], Assignment
]:  # fmt: skip
    """Pure: the rows to insert for the new paths of ``signals`` (next ids after the highest in
    ``have``) and the assignment, assuming they go in."""
    next_id = max((s.id for s in have.values()), default=0) + 1
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


class SqlFleetCatalog:
    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def _rows(tx: Transaction, fleet: str) -> dict[str, SignalSpec]:
        rows = tx.execute(
            "SELECT signal_id, path, data_type, unit FROM fleet_signals WHERE fleet = ?", (fleet,)
        ).fetchall()
        return {str(r[1]): SignalSpec(int(r[0]), str(r[1]), DataType[str(r[2])], str(r[3])) for r in rows}

    def assign(self, fleet: str, signals: Sequence[Declared]) -> Assignment:
        for _ in range(ASSIGN_TRIES):
            with self._db.write() as tx:
                new, _planned = decide(fleet, self._rows(tx, fleet), signals)
                for s in new:
                    tx.execute(
                        """INSERT INTO fleet_signals (fleet, signal_id, path, data_type, unit)
                           VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                        (fleet, s.id, s.path, s.data_type.name, s.unit),
                    )
                have = self._rows(tx, fleet)
            if all(path in have for path, _t, _u in signals):
                return decide(fleet, have, signals)[1]
        raise UnavailableError(f"fleet {fleet!r}: signal ids kept being taken by another writer; try again")

    def signals(self, fleet: str) -> list[SignalSpec]:
        rows = self._db.read(
            "SELECT signal_id, path, data_type, unit FROM fleet_signals WHERE fleet = ? ORDER BY signal_id",
            (fleet,),
        )
        return [SignalSpec(int(r[0]), str(r[1]), DataType[str(r[2])], str(r[3])) for r in rows]


class MemoryFleetCatalog:
    """The same semantics in a dict, for service tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fleets: dict[str, dict[str, SignalSpec]] = {}

    def assign(self, fleet: str, signals: Sequence[Declared]) -> Assignment:
        with self._lock:
            have = self._fleets.setdefault(fleet, {})
            new, assignment = decide(fleet, have, signals)
            have.update((s.path, s) for s in new)
            return assignment

    def signals(self, fleet: str) -> list[SignalSpec]:
        with self._lock:
            return sorted(self._fleets.get(fleet, {}).values(), key=lambda s: s.id)
