"""The releases aggregate: SQL and its in-memory fake. A release is registered once per name, hardware
and version; registering it again is a conflict (StateError), never an overwrite."""

from __future__ import annotations

import threading
from typing import Any

from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.records import ReleaseRecord
from fleetloop_shared.errors import StateError

_COLUMNS = "name, version, hardware_id, manifest, signature, created_at"


def _exists(r: ReleaseRecord) -> StateError:
    return StateError(f"release {r.name} {r.version} for hardware {r.hardware_id} already exists")


def _record(r: tuple[Any, ...]) -> ReleaseRecord:
    return ReleaseRecord(r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), float(r[5]))


class SqlReleases:
    def __init__(self, db: Database) -> None:
        self._db = db

    def put(self, release: ReleaseRecord) -> None:
        r = release
        with self._db.write() as tx:
            cur = tx.execute(
                f"""INSERT INTO releases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT (name, hardware_id, version) DO NOTHING""",
                (r.name, r.version, r.hardware_id, bytes(r.manifest), bytes(r.signature), r.created_at),
            )
            if cur.rowcount == 0:
                raise _exists(r)

    def get(self, version: str, name: str = "") -> ReleaseRecord | None:
        rows = self._db.read(
            f"""SELECT {_COLUMNS} FROM releases WHERE version = ? AND (? = '' OR name = ?)
                ORDER BY created_at DESC, rowid DESC LIMIT 1""",
            (version, name, name),
        )
        return _record(rows[0]) if rows else None

    def names(self, version: str) -> list[str]:
        rows = self._db.read("SELECT DISTINCT name FROM releases WHERE version = ? ORDER BY name", (version,))
        return [str(r[0]) for r in rows]

    def all(self) -> list[ReleaseRecord]:
        rows = self._db.read(f"SELECT {_COLUMNS} FROM releases ORDER BY created_at, rowid")
        return [_record(r) for r in rows]


class MemoryReleases:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releases: list[ReleaseRecord] = []  # in registration order (the SQL rowid)

    def put(self, release: ReleaseRecord) -> None:
        key = (release.name, release.hardware_id, release.version)
        with self._lock:
            if any((r.name, r.hardware_id, r.version) == key for r in self._releases):
                raise _exists(release)
            self._releases.append(release)

    def get(self, version: str, name: str = "") -> ReleaseRecord | None:
        matching = [
            (r.created_at, i, r)
            for i, r in enumerate(self._snapshot())
            if r.version == version and (not name or r.name == name)
        ]
        return max(matching, key=lambda t: t[:2])[2] if matching else None

    def names(self, version: str) -> list[str]:
        return sorted({r.name for r in self._snapshot() if r.version == version})

    def all(self) -> list[ReleaseRecord]:
        ordered = list(enumerate(self._snapshot()))
        return [r for _, r in sorted(ordered, key=lambda t: (t[1].created_at, t[0]))]

    def _snapshot(self) -> list[ReleaseRecord]:
        with self._lock:
            return list(self._releases)
