"""Change notices between coordinators sharing one database (see :mod:`.feed`)."""

from __future__ import annotations

from pathlib import Path

from fleetloop_cloud.changes.feed import ChangeFeed, Listener, MemoryChangeBus, MemoryChangeFeed, Topic
from fleetloop_cloud.changes.follower import CATCH_UP_S, ChangeFollower
from fleetloop_cloud.repositories.database import is_database_url

__all__ = [
    "CATCH_UP_S",
    "ChangeFeed",
    "ChangeFollower",
    "Listener",
    "MemoryChangeBus",
    "MemoryChangeFeed",
    "Topic",
    "open_change_feed",
]


def open_change_feed(db: str | Path | None) -> ChangeFeed:
    """LISTEN/NOTIFY on a PostgreSQL database; in-process for the embedded SQLite (one coordinator)."""
    if isinstance(db, str) and is_database_url(db):
        from fleetloop_cloud.changes.postgres import PostgresChangeFeed

        return PostgresChangeFeed(db)
    return MemoryChangeFeed()
