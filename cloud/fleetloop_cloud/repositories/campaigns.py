"""The desired-campaigns aggregate: SQL and its in-memory fake.

Every change bumps one global version, which devices report back, so "has this device converged" is one
comparison. Re-applying an identical document changes nothing (and returns the current version), so
``rules apply`` can be re-run without making every device reload.
"""

from __future__ import annotations

import threading

from fleetloop_cloud.repositories.database import Database, Transaction
from fleetloop_cloud.repositories.records import CampaignDocument, CampaignSet
from fleetloop_shared.errors import NotFoundError


def _missing(name: str) -> NotFoundError:
    return NotFoundError(f"campaign {name!r} does not exist")


class SqlCampaigns:
    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def _version(tx: Transaction) -> int:
        row = tx.execute("SELECT value FROM settings WHERE key = 'campaigns_version'").fetchone()
        return int(row[0]) if row else 0

    def _bump(self, tx: Transaction) -> int:
        tx.execute(
            """INSERT INTO settings (key, value) VALUES ('campaigns_version', 1)
               ON CONFLICT (key) DO UPDATE SET value = settings.value + 1"""
        )
        return self._version(tx)

    def put(self, name: str, document: str, now: float) -> int:
        with self._db.write() as tx:
            row = tx.execute(
                "SELECT campaign_version, document FROM campaigns WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[1] == document:
                return self._version(tx)
            revision = 1 if row is None else int(row[0]) + 1
            tx.execute(
                """INSERT INTO campaigns (name, campaign_version, document, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET campaign_version = excluded.campaign_version,
                     document = excluded.document, updated_at = excluded.updated_at""",
                (name, revision, document, now),
            )
            return self._bump(tx)

    def delete(self, name: str, now: float) -> int:
        with self._db.write() as tx:
            if tx.execute("DELETE FROM campaigns WHERE name = ?", (name,)).rowcount == 0:
                raise _missing(name)
            return self._bump(tx)

    def desired(self) -> CampaignSet:
        version = self._db.read("SELECT value FROM settings WHERE key = 'campaigns_version'")
        rows = self._db.read("SELECT name, campaign_version, document FROM campaigns ORDER BY name")
        return CampaignSet(
            int(version[0][0]) if version else 0,
            tuple(CampaignDocument(r[0], int(r[1]), r[2]) for r in rows),
        )


class MemoryCampaigns:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._campaigns: dict[str, CampaignDocument] = {}

    def put(self, name: str, document: str, now: float) -> int:
        with self._lock:
            old = self._campaigns.get(name)
            if old is not None and old.document == document:
                return self._version
            self._campaigns[name] = CampaignDocument(name, 1 if old is None else old.revision + 1, document)
            self._version += 1
            return self._version

    def delete(self, name: str, now: float) -> int:
        with self._lock:
            if self._campaigns.pop(name, None) is None:
                raise _missing(name)
            self._version += 1
            return self._version

    def desired(self) -> CampaignSet:
        with self._lock:
            return CampaignSet(self._version, tuple(self._campaigns[n] for n in sorted(self._campaigns)))
