"""What changed in the fleet since the last look: the events the console's pages update from.

One watcher per coordinator process takes a :class:`Snapshot` every :data:`FEED_TICK_S` through the same
services the REST API calls — so a device that connected to *another* coordinator sharing the database
shows up too — and :func:`changes` turns two snapshots into events: a device whose row changed (anything
but ``last_seen``, which moves with every heartbeat and which the page ages by itself), the summary,
a rollout, the campaigns' version, new captures, new audit entries. The page never polls; it loads once
and applies these.

Bounded: at most :data:`MAX_EVENTS` events per tick; past that (a fleet reconnecting at once) the tick
is one ``resync`` event, after which a page reloads what it shows — the overflow policy, counted by the
adapter that fans events out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleetloop_cloud.repositories.records import AuditFilter
from fleetloop_cloud.services.access import Caller

#: Seconds between two snapshots while anyone listens.
FEED_TICK_S = 1.0
#: Events one tick may carry; more become one ``resync``.
MAX_EVENTS = 200
#: Audit entries read per tick at most (more wait for the next tick: the log is append-only).
AUDIT_PAGE = 100

Json = dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """The fleet as the console shows it, rendered as the REST API renders it."""

    devices: Mapping[str, Json]
    summary: Json
    rollouts: Mapping[str, Json]
    campaigns_version: int
    captures: int
    audit: tuple[Json, ...] = field(default=())


def _without_last_seen(device: Json) -> Json:
    return {k: v for k, v in device.items() if k != "last_seen"}


def changes(before: Snapshot | None, after: Snapshot) -> list[Json]:
    """Events that bring a page showing ``before`` to ``after`` (none for the first snapshot: a page
    loads what it shows when it subscribes)."""
    if before is None:
        return []
    events: list[Json] = []
    for device_id, device in after.devices.items():
        old = before.devices.get(device_id)
        if old is None or _without_last_seen(old) != _without_last_seen(device):
            events.append({"type": "device", "device": device})
    gone = [d for d in before.devices if d not in after.devices]
    events.extend({"type": "device_removed", "device_id": d} for d in gone)
    if after.summary != before.summary:
        events.append({"type": "summary", "summary": after.summary})
    for rollout_id, rollout in after.rollouts.items():
        if before.rollouts.get(rollout_id) != rollout:
            events.append({"type": "rollout", "rollout": rollout})
    if after.campaigns_version != before.campaigns_version:
        events.append({"type": "campaigns", "version": after.campaigns_version})
    if after.captures != before.captures:
        events.append({"type": "captures", "count": after.captures})
    events.extend({"type": "audit", "entry": entry} for entry in after.audit)
    if len(events) > MAX_EVENTS:
        return [{"type": "resync", "reason": f"{len(events)} changes at once"}]
    return events


class FleetReads(Protocol):
    """What a snapshot reads, as JSON-ready data (the HTTP surface renders it like its routes)."""

    def devices(self, caller: Caller, now: float) -> list[Json]: ...

    def summary(self, caller: Caller, now: float) -> Json: ...

    def rollouts(self, caller: Caller) -> list[Json]: ...

    def audit(self, caller: Caller, where: AuditFilter) -> list[Json]: ...


class Watcher:
    """Takes snapshots (blocking reads: run it on a worker thread) and says what changed."""

    def __init__(self, reads: FleetReads, caller: Caller) -> None:
        self._reads = reads
        self._caller = caller
        self._last: Snapshot | None = None
        self._audit_after = 0
        self._audit_since: float | None = None

    def reset(self) -> None:
        """Forget the last snapshot (nobody listened for a while: start afresh)."""
        self._last = None
        self._audit_since = None
        self._audit_after = 0

    def step(self, now: float) -> list[Json]:
        c = self._caller
        summary = self._reads.summary(c, now)
        if self._audit_since is None:  # only what is written from now on
            self._audit_since = now
        where = AuditFilter(after_seq=self._audit_after, since=self._audit_since, limit=AUDIT_PAGE)
        audit = self._reads.audit(c, where) if self._last is not None else []
        if audit:
            self._audit_after = int(audit[-1]["seq"])
        snapshot = Snapshot(
            devices={d["device_id"]: d for d in self._reads.devices(c, now)},
            summary=summary,
            rollouts={r["id"]: r for r in self._reads.rollouts(c)},
            campaigns_version=int(summary.get("campaigns_version", 0)),
            captures=int(summary.get("captures_ingested", 0)),
            audit=tuple(audit),
        )
        events = changes(self._last, snapshot)
        self._last = snapshot
        return events
