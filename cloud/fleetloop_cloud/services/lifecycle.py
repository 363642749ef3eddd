"""Retention per fleet and erasure of one device's data: the operator actions and the periodic job.

**Erasure** (``fleetloop devices erase ID``) is a request first: written to the metadata database with
its time before anything is touched, and audited. From that moment ingest refuses the device's data
from before that time (a device that uploads again after an erasure: what it captured before is refused
as a privacy violation, which the device drops for good; what it captures afterwards is taken). Then, in
this order, each step idempotent so that a crash anywhere is resumed by the next pass of any
coordinator:

1. the device's partial uploads in the upload staging area;
2. its rows in the fleet store (Parquet: files deleted or rewritten; Iceberg: row deletes, then every
   snapshot but the current expired and the files only they held deleted, with the old metadata files
   that list their receipts);
3. its segment and capture rows in the ingest ledger (after the store: an Iceberg reconciliation of
   snapshots not yet expired would bring them back);
4. the capture caches of this coordinator (the console's signal statistics).

A segment in flight when the request is written (checked by ingest just before, written just after the
store's pass) would survive the first pass; so an erasure is only marked done by a pass that starts
:data:`SETTLE_S` after the request, which runs every step again. The audit log keeps the fact (who asked,
when, what was removed: counts), never the data. Exports an operator already downloaded are outside the
coordinator's reach; the audit log's ``captures.export`` entries name them.

**Retention** keeps a fleet's data a number of days: each pass deletes the fleet store's partitions of
days before the cut (whole days, UTC) and the ledger rows whose last sample is before it, a bounded
amount per pass (:data:`PARTITIONS_PER_PASS`, :data:`ROWS_PER_PASS`; the next pass goes on).

One coordinator at a time runs the job (a lease in the shared database, like the rollout controller's);
several asking at once is safe all the same, since every step is idempotent.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fleetloop_cloud.repositories.interfaces import DeviceRepository, RetentionRepository, SegmentRepository
from fleetloop_cloud.repositories.records import ErasureRecord
from fleetloop_cloud.services.access import Access, Caller, CallerKind
from fleetloop_shared.errors import NotFoundError, UserError

log = logging.getLogger("fleetloop.cloud.lifecycle")

#: An erasure is confirmed (its steps run again, then marked done) by a pass this long after the request:
#: longer than any one segment's ingest takes between its checks and its write.
SETTLE_S = 30.0
#: Most partitions retention deletes per fleet in one pass; most ledger rows per device.
PARTITIONS_PER_PASS = 64
ROWS_PER_PASS = 10_000
#: The job's lease: renewed each pass, so a coordinator that dies hands it over within this.
LEASE_TTL_S = 120.0
#: Longest retention accepted (100 years).
MAX_DAYS = 36_500
_NS_PER_S = 1_000_000_000


class Reported(Protocol):
    def as_dict(self) -> Mapping[str, object]: ...


class StoredData(Protocol):
    """The fleet store as erasure and retention see it (Parquet or Iceberg)."""

    def erase_device(self, device_id: str) -> Reported:
        """Every row of ``device_id`` gone from every file a reader can open; idempotent."""
        ...

    def drop_before(self, date: datetime.date, fleet: str | None = None) -> Reported:
        """Rows of days before ``date`` (of ``fleet``) gone, a bounded amount; idempotent."""
        ...


class StagedUploads(Protocol):
    def discard_device(self, device_id: str) -> int:
        """Remove ``device_id``'s partial uploads; how many."""
        ...


@dataclass(frozen=True)
class ErasureStatus:
    device_id: str
    state: str  # erasing | done
    requested_at: float
    requested_by: str
    done_at: float | None
    removed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, record: ErasureRecord) -> ErasureStatus:
        removed = json.loads(record.detail) if record.detail else {}
        return cls(record.device_id, "done" if record.done_at is not None else "erasing", record.requested_at,
                   record.requested_by, record.done_at, removed)  # fmt: skip


def retention_cut(days: int, now: float) -> datetime.date:
    """The first day kept under a retention of ``days`` at ``now`` (UTC days; today counts as one)."""
    today = datetime.datetime.fromtimestamp(now, tz=datetime.UTC).date()
    return today - datetime.timedelta(days=days - 1)


def _cut_ns(day: datetime.date) -> int:
    midnight = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return int(midnight.timestamp()) * _NS_PER_S


class DataLifecycle:
    """The retention and erasure actions of operators and the job that carries them out."""

    def __init__(
        self,
        retention: RetentionRepository,
        segments: SegmentRepository,
        devices: DeviceRepository,
        store: StoredData,
        staging: StagedUploads,
        access: Access,
        *,
        holder: str,
        forget_cached: Callable[[str], None] = lambda device_id: None,
    ) -> None:
        self._retention = retention
        self._segments = segments
        self._devices = devices
        self._store = store
        self._staging = staging
        self._access = access
        self._holder = holder
        self._forget_cached = forget_cached
        self._caller = Caller(CallerKind.COORDINATOR, "data-lifecycle", "internal", True, address=holder)
        self._lock = threading.Lock()
        #: Rows deleted (by reason: retention, erasure) and passes (by outcome) — the job's metrics.
        self.rows_deleted: Counter[str] = Counter({"retention": 0, "erasure": 0})
        self.passes: Counter[str] = Counter({"ran": 0, "busy": 0, "failed": 0})

    # -- operator actions ----------------------------------------------------------------------------
    def set_retention(self, caller: Caller, fleet: str, days: int, now: float) -> dict[str, object]:
        self._access.operator(caller, "retention.set")
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
            raise UserError(f"days must be a whole number from 1 to {MAX_DAYS}, got {days!r}")
        before = self._retention.set_days(fleet, days, now)
        self._access.record(caller, "retention.set", f"fleet/{fleet}", now, before=before or "", after=days)
        return self._describe(fleet, days, now)

    def clear_retention(self, caller: Caller, fleet: str, now: float) -> dict[str, object]:
        self._access.operator(caller, "retention.set")
        before = self._retention.clear(fleet)
        self._access.record(caller, "retention.set", f"fleet/{fleet}", now, before=before or "", after="")
        return self._describe(fleet, None, now)

    def retention(self, caller: Caller, fleet: str, now: float) -> dict[str, object]:
        self._access.operator(caller, "retention.get")
        return self._describe(fleet, self._retention.days().get(fleet), now)

    @staticmethod
    def _describe(fleet: str, days: int | None, now: float) -> dict[str, object]:
        out: dict[str, object] = {"fleet": fleet, "days": days}
        if days is not None:
            out["keeps_from"] = retention_cut(days, now).isoformat()
        return out

    def erase(self, caller: Caller, device_id: str, now: float) -> ErasureStatus:
        """Ask for the erasure of ``device_id``'s data (audited), and run a first pass now."""
        self._access.operator(caller, "devices.erase")
        if self._devices.get(device_id) is None and self._retention.erasure(device_id) is None:
            raise NotFoundError(f"unknown device {device_id!r}")
        record = self._retention.request_erasure(device_id, now, caller.name)
        with self._lock:
            removed = self._erase(record, now, confirm=False)
        self._access.record(caller, "devices.erase", f"device/{device_id}", now, after="erasing",
                            detail=json.dumps(dict(removed)))  # fmt: skip
        status = ErasureStatus.of(self._retention.erasure(device_id) or record)
        return dataclasses.replace(status, removed=dict(removed))

    def erasure(self, caller: Caller, device_id: str) -> ErasureStatus:
        self._access.operator(caller, "devices.get")
        record = self._retention.erasure(device_id)
        if record is None:
            raise NotFoundError(f"no erasure was asked for device {device_id!r}")
        return ErasureStatus.of(record)

    def erased_before(self, device_id: str) -> float | None:
        """Ingest's check: the device's data before this time (s) was erased and is refused."""
        record = self._retention.erasure(device_id)
        return record.requested_at if record is not None else None

    def pending(self) -> int:
        return len(self._retention.erasures(pending=True))

    # -- the job ------------------------------------------------------------------------------------
    def run_once(self, now: float) -> bool:
        """One pass, if this coordinator holds the lease: pending erasures, then retention. False when
        another coordinator runs the job."""
        if self._retention.acquire(self._holder, now, LEASE_TTL_S) is None:
            self.passes["busy"] += 1
            return False
        try:
            with self._lock:
                for record in self._retention.erasures(pending=True):
                    self._erase(record, now, confirm=now - record.requested_at >= SETTLE_S)
                for fleet, days in sorted(self._retention.days().items()):
                    self._retain(fleet, days, now)
        except Exception:
            self.passes["failed"] += 1
            raise
        self.passes["ran"] += 1
        return True

    def stop(self) -> None:
        self._retention.release(self._holder)

    def _erase(self, record: ErasureRecord, now: float, *, confirm: bool) -> Counter[str]:
        device_id = record.device_id
        removed: Counter[str] = Counter()
        removed["staged_uploads"] = self._staging.discard_device(device_id)
        for key, value in self._store.erase_device(device_id).as_dict().items():
            if isinstance(value, int) and key in ("files_deleted", "files_rewritten", "rows_deleted",
                                                  "snapshots_expired"):  # fmt: skip
                removed[f"store_{key}"] += value
        while gone := self._segments.forget(device_id, limit=ROWS_PER_PASS):
            removed["ledger_rows"] += gone
        self._forget_cached(device_id)
        self.rows_deleted["erasure"] += removed["store_rows_deleted"]
        log.info("erasure of device %s: %s", device_id, dict(removed))
        if confirm and self._retention.finish_erasure(device_id, record.requested_at, now,
                                                      json.dumps(dict(removed))):  # fmt: skip
            self._access.record(self._caller, "devices.erase", f"device/{device_id}", now,
                                after="done", detail=json.dumps(dict(removed)))  # fmt: skip
        return removed

    def _retain(self, fleet: str, days: int, now: float) -> None:
        cut = retention_cut(days, now)
        report = self._store.drop_before(cut, fleet).as_dict()
        rows = report.get("rows_deleted", 0)
        gone = 0
        for device in self._devices.all():
            if device.fleet == fleet and gone < ROWS_PER_PASS:
                left = ROWS_PER_PASS - gone
                gone += self._segments.forget(device.device_id, before_ns=_cut_ns(cut), limit=left)
        if isinstance(rows, int):
            self.rows_deleted["retention"] += rows
        if rows or gone:
            detail = {"before": cut.isoformat(), "ledger_rows": gone} | dict(report)
            self._access.record(self._caller, "retention.apply", f"fleet/{fleet}", now,
                                detail=json.dumps(detail, default=str))  # fmt: skip
