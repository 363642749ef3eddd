"""One repository per aggregate, as the services see them.

Each interface is what its users need of one aggregate and nothing more; the SQL repositories
(:mod:`.sql`, SQLite or PostgreSQL) and the in-memory fakes (:mod:`.memory`) implement all of them with
the same semantics — the same contract tests run against all three backends. Every write is one
transaction within its aggregate; nothing here spans two aggregates, so no caller needs a transaction
of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetloop_cloud.repositories.records import (
    AuditEntry,
    AuditFilter,
    AuditRecord,
    CampaignSet,
    CaptureRecord,
    DeviceChange,
    DeviceRecord,
    DeviceTelemetry,
    ErasureRecord,
    Fence,
    GateEvaluationRecord,
    IngestTotals,
    Inventory,
    NewAuditEntry,
    NewRollout,
    Registration,
    ReleaseRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    RolloutUpdate,
    SegmentReceipt,
    TokenRecord,
)
from fleetloop_shared.catalog import Catalog, DataType, SignalSpec
from fleetloop_shared.catalog_ids import Assignment


class DeviceRepository(Protocol):
    """Devices: registration (hello), inventory, campaign shadow, and which coordinator holds the session."""

    def register(self, device_id: str, registration: Registration, *, owner: str, now: float) -> None:
        """Register a device from its hello, or refresh what the hello says (inventory stays); the
        device's session is now held by coordinator ``owner``."""
        ...

    def update_inventory(self, device_id: str, inventory: Inventory, now: float) -> None:
        """NotFoundError for a device that never said hello."""
        ...

    def set_campaign_status(
        self, device_id: str, version: int, running: Sequence[str], refused: dict[str, str], captures: int
    ) -> None:
        """The device's report of what it runs; NotFoundError for an unknown device."""
        ...

    def touch(
        self, device_id: str, now: float, *, owner: str, telemetry: DeviceTelemetry | None = None
    ) -> None:
        """A sign of life through coordinator ``owner`` (last_seen, and that coordinator holds the
        session now), with what its heartbeat reported when it is one; an unknown device is ignored."""
        ...

    def telemetry(self) -> dict[str, DeviceTelemetry]:
        """The latest heartbeat report of every device that sent one, by device id."""
        ...

    def end_session(self, device_id: str, *, owner: str | None) -> bool:
        """The device's session ended: held by no coordinator. With ``owner``, only if that coordinator
        still holds it (a device that moved to another coordinator stays there). True if it ended."""
        ...

    def get(self, device_id: str) -> DeviceRecord | None: ...

    def all(self) -> list[DeviceRecord]:
        """Every device, by id."""
        ...

    def catalog(self, device_id: str) -> Catalog:
        """The catalog from the device's hello; NotFoundError for an unknown device."""
        ...


class FleetCatalogRepository(Protocol):
    """Each fleet's signal catalog: one id per path, assigned once, forever
    (``repositories.fleet_catalog``)."""

    def assign(self, fleet: str, signals: Sequence[tuple[str, DataType, str]]) -> Assignment:
        """Each declared path's fleet id (a new path gets the next free one); a path the fleet has with
        another datatype is refused with the reason, never re-typed."""
        ...

    def lookup(self, fleet: str, paths: Sequence[str]) -> list[SignalSpec]:
        """The fleet's entries of ``paths`` (those it has), without assigning anything."""
        ...

    def signals(self, fleet: str) -> list[SignalSpec]:
        """The fleet's catalog in id order."""
        ...


class SegmentRepository(Protocol):
    """The ingest ledger: which segments were stored (the exactly-once key) and the captures they form."""

    def has(self, device_id: str, segment_id: bytes) -> bool: ...

    def record(self, device_id: str, segment_id: bytes, receipt: SegmentReceipt, now: float) -> bool:
        """Record an ingested segment and fold it into its capture; False (and no change) for a repeat."""
        ...

    def record_many(self, entries: Sequence[tuple[str, bytes, SegmentReceipt, float]]) -> list[bool]:
        """:meth:`record` for each ``(device_id, segment_id, receipt, now)``, in one transaction."""
        ...

    def receipt(self, device_id: str, segment_id: bytes) -> SegmentReceipt | None:
        """What was recorded of one segment (None: not stored)."""
        ...

    def captures(self) -> list[CaptureRecord]:
        """Every capture, by first arrival."""
        ...

    def totals(self) -> IngestTotals: ...

    def forget(self, device_id: str, *, before_ns: int | None = None, limit: int = 10_000) -> int:
        """Delete at most ``limit`` segment and capture rows of ``device_id`` (all, or those whose last
        sample is before ``before_ns``); how many went (0: none left)."""
        ...


class RetentionRepository(Protocol):
    """Retention per fleet, erasure requests per device, and the lease of the job that carries both out."""

    def set_days(self, fleet: str, days: int, now: float) -> int | None:
        """Keep ``fleet``'s data ``days`` days; the days before (None: kept forever)."""
        ...

    def clear(self, fleet: str) -> int | None:
        """Keep ``fleet``'s data forever again; the days before."""
        ...

    def days(self) -> dict[str, int]:
        """Fleet → days, for every fleet with a retention."""
        ...

    def request_erasure(self, device_id: str, now: float, by: str) -> ErasureRecord:
        """Ask for (again: renew) the erasure of ``device_id``'s data before ``now``."""
        ...

    def finish_erasure(self, device_id: str, requested_at: float, now: float, detail: str) -> bool:
        """Mark the request of ``requested_at`` done (False: renewed since, so not done)."""
        ...

    def erasures(self, *, pending: bool = False) -> list[ErasureRecord]:
        """Every erasure request (``pending``: those not done), oldest first."""
        ...

    def erasure(self, device_id: str) -> ErasureRecord | None: ...

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        """Take or renew the lifecycle job's lease: its fencing token, None while another holds it."""
        ...

    def release(self, holder: str) -> None: ...


class CampaignRepository(Protocol):
    """The desired campaigns and their global version."""

    def put(self, name: str, document: str, now: float) -> int:
        """Store a campaign document; returns the new global version (unchanged for an identical one)."""
        ...

    def delete(self, name: str, now: float) -> int:
        """Remove a campaign; returns the new global version. NotFoundError if there is none by that name."""
        ...

    def desired(self) -> CampaignSet: ...


class ReleaseRepository(Protocol):
    """Signed releases (manifest and signature as the artifact store made them)."""

    def put(self, release: ReleaseRecord) -> None:
        """StateError when this name, hardware and version already exist."""
        ...

    def get(self, version: str, name: str = "") -> ReleaseRecord | None:
        """The release with this version (and name, when given); the latest registered of several."""
        ...

    def names(self, version: str) -> list[str]:
        """Names of the releases with this version (a firmware and a model pack may share one)."""
        ...

    def all(self) -> list[ReleaseRecord]:
        """Every release, oldest first."""
        ...


class RolloutRepository(Protocol):
    """Rollouts with their executions, audit trail and signal-gate evaluations — one aggregate, written
    atomically — and the controller lease whose fencing token guards the controller's writes."""

    def create(self, rollout: NewRollout, now: float, *, fence: Fence | None = None) -> bool:
        """Store a new rollout (its revision is the next of its release name). StateError when the id
        exists already; False, and nothing written, when ``fence`` no longer holds the lease."""
        ...

    def get(self, rollout_id: str) -> RolloutRecord | None: ...

    def all(self, *, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        """Every rollout, oldest first; only those in ``states`` when given."""
        ...

    def update(self, rollout_id: str, update: RolloutUpdate, now: float) -> bool:
        """Apply one step atomically (rollout fields, device changes with their audit rows, audit rows,
        gate evaluations, joining devices, spawned rollouts). False, and nothing written, when
        ``update.expect`` or ``update.fence`` no longer holds; NotFoundError for an unknown rollout or a
        device outside it."""
        ...

    def set_device(self, rollout_id: str, device_id: str, change: DeviceChange, now: float) -> None: ...

    def devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        """The rollout's devices by phase, then id."""
        ...

    def of_device(self, device_id: str) -> list[RolloutDeviceRecord]:
        """Every rollout entry of one device."""
        ...

    def audit(self, rollout_id: str) -> list[AuditRecord]:
        """The audit trail, oldest first (bounded: the newest ``AUDIT_READ_LIMIT`` rows)."""
        ...

    def evaluations(self, rollout_id: str) -> list[GateEvaluationRecord]:
        """Signal-gate evaluations, oldest first (bounded: the newest ``GATE_READ_LIMIT``)."""
        ...

    def latest_evaluations(self, rollout_id: str, phase: int) -> dict[str, GateEvaluationRecord]:
        """The latest evaluation of each gate in ``phase``, by gate name."""
        ...

    def acquire(self, holder: str, now: float, ttl_s: float) -> int | None:
        """Take or renew the controller lease until ``now + ttl_s``: its fencing token (bumped whenever
        the holder changes), or None while another holder's lease runs."""
        ...

    def release(self, holder: str) -> None:
        """End ``holder``'s lease now (a clean stop); the token stays, so the next holder's is higher."""
        ...

    def lease(self) -> tuple[str, int, float] | None:
        """(holder, token, expires_at) of the controller lease, if anyone ever held it."""
        ...


class CoordinatorLeases(Protocol):
    """Which coordinators are alive: each beats its lease; a device session held by a coordinator whose
    lease lapsed (it crashed, or was killed) counts for nothing."""

    def beat(self, coordinator_id: str, now: float) -> None: ...

    def alive(self, since: float) -> set[str]:
        """Coordinators that beat at or after ``since``."""
        ...

    def retire(self, coordinator_id: str) -> None:
        """A clean stop: the lease ends now."""
        ...

    def reap(self, before: float) -> int:
        """Forget coordinators whose last beat is older than ``before``; returns how many."""
        ...

    def take(self, name: str, holder: str, now: float, ttl_s: float) -> bool:
        """Take (or renew) the writer lock ``name`` until ``now + ttl_s``; False while another holder's
        runs. What several coordinators writing one object-store file agree through."""
        ...

    def give_up(self, name: str, holder: str) -> None:
        """End ``holder``'s writer lock ``name`` now (nothing when it is not theirs)."""
        ...


class TokenRepository(Protocol):
    """API tokens, by name and by the hash of their secret."""

    def add(self, token: TokenRecord) -> None:
        """StateError when a token of this name exists (revoked ones too: names are never reused)."""
        ...

    def by_hash(self, token_hash: str) -> TokenRecord | None: ...

    def get(self, name: str) -> TokenRecord | None: ...

    def all(self) -> list[TokenRecord]:
        """Every token, oldest first."""
        ...

    def revoke(self, name: str, now: float) -> TokenRecord:
        """Mark revoked (kept for the record); NotFoundError for an unknown name, StateError if it is
        revoked already. Returns the token as it was before."""
        ...

    def used(self, name: str, now: float) -> None:
        """Note when the token was last used."""
        ...


class AuditLog(Protocol):
    """The append-only, hash-chained log of every write."""

    def append(self, entry: NewAuditEntry) -> AuditEntry:
        """Add an entry at the end of the chain (one transaction: read the head, write the next)."""
        ...

    def entries(self, where: AuditFilter) -> list[AuditEntry]:
        """Entries matching ``where``, oldest first."""
        ...

    def chain(self, after_seq: int, limit: int) -> list[AuditEntry]:
        """Every entry after ``after_seq``, oldest first, at most ``limit``: what verification walks."""
        ...


#: Audit rows a read returns at most (the newest kept); the trail itself is append-only.
AUDIT_READ_LIMIT = 10_000
#: Gate evaluations a read returns at most (the newest kept).
GATE_READ_LIMIT = 10_000


@dataclass(frozen=True)
class Repositories:
    """One repository per aggregate, over one shared connection (or one in-memory state)."""

    devices: DeviceRepository
    fleet_catalog: FleetCatalogRepository
    segments: SegmentRepository
    campaigns: CampaignRepository
    releases: ReleaseRepository
    rollouts: RolloutRepository
    leases: CoordinatorLeases
    tokens: TokenRepository
    audit_log: AuditLog
    retention: RetentionRepository
    #: Where the state lives, for messages ("memory", a file path, a redacted URL).
    where: str
    #: Releases the connection (the repositories are unusable afterwards).
    close: Callable[[], None]
