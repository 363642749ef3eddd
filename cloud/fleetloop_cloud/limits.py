"""The bounds one coordinator works within, in one object a configuration file fills
(:mod:`fleetloop_cloud.config`): the upload scheduler's budgets, the resumable-upload staging's limits
and what one SQL query may take. The defaults are what a coordinator uses without a file."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetloop_cloud.fleet_store.query import QueryLimits
from fleetloop_cloud.services.ingest import UPLOAD_BUDGET
from fleetloop_cloud.uploads.scheduler import Budget
from fleetloop_cloud.uploads.staging import StagingLimits


@dataclass(frozen=True)
class Limits:
    upload_budget: Budget = UPLOAD_BUDGET
    staging: StagingLimits = field(default_factory=StagingLimits)
    query: QueryLimits = field(default_factory=QueryLimits)
