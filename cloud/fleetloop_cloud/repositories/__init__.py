"""The coordinator's metadata, one repository per aggregate (devices, the ingest ledger, campaigns,
releases, rollouts, coordinator leases, API tokens, the audit log) behind the interfaces in
:mod:`.interfaces`.

:func:`open_repositories` puts them over one SQLite file or PostgreSQL database (:mod:`.database`, the
only module importing a database driver); :func:`memory_repositories` gives the in-memory fakes that
stand beside them, with the same semantics, for tests of the services.
"""

from __future__ import annotations

from pathlib import Path

from fleetloop_cloud.repositories.audit import MemoryAuditLog, SqlAuditLog
from fleetloop_cloud.repositories.campaigns import MemoryCampaigns, SqlCampaigns
from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.devices import MemoryDevices, SqlDevices
from fleetloop_cloud.repositories.fleet_catalog import MemoryFleetCatalog, SqlFleetCatalog
from fleetloop_cloud.repositories.interfaces import Repositories
from fleetloop_cloud.repositories.leases import MemoryLeases, SqlLeases
from fleetloop_cloud.repositories.releases import MemoryReleases, SqlReleases
from fleetloop_cloud.repositories.retention import MemoryRetention, SqlRetention
from fleetloop_cloud.repositories.rollouts import MemoryRollouts, SqlRollouts
from fleetloop_cloud.repositories.schema import ensure_schema
from fleetloop_cloud.repositories.segments import MemorySegments, SqlSegments
from fleetloop_cloud.repositories.tokens import MemoryTokens, SqlTokens

__all__ = ["Repositories", "memory_repositories", "open_repositories"]


def open_repositories(location: Path | str) -> Repositories:
    """The repositories over a SQLite file (a path) or a PostgreSQL database (a ``postgresql://`` URL),
    its schema created or upgraded first. ConfigError / UnavailableError when it cannot be used."""
    db = Database.open(location)
    db.check_usable(ensure_schema)
    return Repositories(
        devices=SqlDevices(db),
        fleet_catalog=SqlFleetCatalog(db),
        segments=SqlSegments(db),
        campaigns=SqlCampaigns(db),
        releases=SqlReleases(db),
        rollouts=SqlRollouts(db),
        leases=SqlLeases(db),
        tokens=SqlTokens(db),
        audit_log=SqlAuditLog(db),
        retention=SqlRetention(db),
        where=db.where,
        close=db.close,
    )


def memory_repositories() -> Repositories:
    """Fresh in-memory fakes of every repository (nothing persists)."""
    return Repositories(
        devices=MemoryDevices(),
        fleet_catalog=MemoryFleetCatalog(),
        segments=MemorySegments(),
        campaigns=MemoryCampaigns(),
        releases=MemoryReleases(),
        rollouts=MemoryRollouts(),
        leases=MemoryLeases(),
        tokens=MemoryTokens(),
        audit_log=MemoryAuditLog(),
        retention=MemoryRetention(),
        where="memory",
        close=lambda: None,
    )
