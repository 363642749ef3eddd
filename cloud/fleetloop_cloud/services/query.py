"""What an operator asks of the data: SQL over the fleet store, the captures, and the coordinator's
summary (devices, ingest totals, campaigns, refusals).

Each SQL query's run time is observed here, by outcome (``ok``, ``error``, ``timeout``), through the
narrow :class:`QueryMetrics` this service owns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from fleetloop_cloud.fleet_store.query import QueryEngine, QueryResult, QueryTimeoutError
from fleetloop_cloud.metrics.memory import MemoryMetrics
from fleetloop_cloud.repositories.interfaces import CampaignRepository, SegmentRepository
from fleetloop_cloud.repositories.records import CaptureRecord
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_cloud.services.devices import Census
from fleetloop_shared.classification import ClassView, SignalClass

#: Rows a query returns unless it asks for another number.
DEFAULT_MAX_ROWS = 10_000


class CensusSource(Protocol):
    def census(self, now: float) -> Census: ...


class QueryMetrics(Protocol):
    """Where the run time of each SQL query goes (the coordinator's metrics)."""

    def query(self, outcome: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class Summary:
    devices: int
    online: int
    segments_ingested: int
    samples_ingested: int
    captures_ingested: int
    campaigns: int
    campaigns_version: int
    #: Messages refused from devices, by reason, over every transport.
    refused: dict[str, int]


def record_read(
    access: Access,
    caller: Caller,
    action: str,
    target: str,
    now: float,
    view: ClassView,
    touched: Collection[SignalClass],
    detail: dict[str, object],
) -> None:
    """An access record: what ``caller`` read (``detail``: the SQL or the capture, the rows), which
    classes the rows it read were of, and how its view limited them; JSON in the entry's ``detail``."""
    classes = sorted(c.value for c in touched)
    body = detail | {"classes": classes, "limited": view.limited()}
    access.record(caller, action, target, now, detail=json.dumps(body, sort_keys=True))


class QueryService:
    def __init__(
        self,
        engine: QueryEngine,
        segments: SegmentRepository,
        campaigns: CampaignRepository,
        devices: CensusSource,
        access: Access,
        *,
        metrics: QueryMetrics | None = None,
        timer: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._segments = segments
        self._campaigns = campaigns
        self._devices = devices
        self._access = access
        self._metrics: QueryMetrics = metrics if metrics is not None else MemoryMetrics()
        self._timer = timer
        self._clock = clock

    def sql(
        self,
        caller: Caller,
        sql: str,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        timeout_s: float | None = None,
    ) -> QueryResult:
        """One read-only SELECT over ``samples`` and ``captures`` (QueryError, QueryTimeoutError).
        ``max_rows`` above the engine's limit is lowered to it; ``timeout_s`` None is the limit.

        ``samples`` is what the caller's role may see of each signal class (Access.view), whatever the
        SQL; every query, answered or not, leaves an access record in the audit log: the SQL, the rows
        returned and the classes read."""
        self._access.operator(caller, "query")
        max_rows = max(1, min(max_rows, self._engine.limits.max_rows))
        view = self._access.view(caller)
        touched: set[SignalClass] = set()
        started, outcome, rows = self._timer(), "error", 0
        try:
            result = self._engine.query(
                sql, max_rows=max_rows, timeout_s=timeout_s, view=view, touched=touched
            )
            outcome, rows = "ok", len(result.rows)
            return result
        except QueryTimeoutError:
            outcome = "timeout"
            raise
        finally:
            self._metrics.query(outcome, self._timer() - started)
            record_read(self._access, caller, "query", "samples", self._clock(), view, touched,
                        {"sql": sql, "rows": rows, "outcome": outcome})  # fmt: skip

    def captures(self, caller: Caller) -> list[CaptureRecord]:
        self._access.operator(caller, "query")
        return self._segments.captures()

    def summary(self, caller: Caller, now: float) -> Summary:
        self._access.operator(caller, "summary")
        totals = self._segments.totals()
        desired = self._campaigns.desired()
        census = self._devices.census(now)
        return Summary(
            devices=census.devices,
            online=census.online,
            segments_ingested=totals.segments,
            samples_ingested=totals.samples,
            captures_ingested=totals.captures,
            campaigns=len(desired.campaigns),
            campaigns_version=desired.version,
            refused=dict(self._access.refusals.totals()),
        )
