"""The ingest ledger aggregate (segments and the captures they form): SQL and its in-memory fake.

The (device, segment id) key is what makes a retried upload harmless: recording a segment twice changes
nothing the second time, in one transaction with its capture's totals.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.records import CaptureRecord, IngestTotals, SegmentReceipt

#: One segment to record in the ingest ledger: device, segment id, receipt, arrival (unix s).
LedgerEntry = tuple[str, bytes, SegmentReceipt, float]


class SqlSegments:
    def __init__(self, db: Database) -> None:
        self._db = db

    def has(self, device_id: str, segment_id: bytes) -> bool:
        rows = self._db.read(
            "SELECT 1 FROM segments WHERE device_id = ? AND segment_id = ?", (device_id, bytes(segment_id))
        )
        return bool(rows)

    def record(self, device_id: str, segment_id: bytes, receipt: SegmentReceipt, now: float) -> bool:
        return self.record_many([(device_id, segment_id, receipt, now)])[0]

    def record_many(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        with self._db.write() as tx:
            return [self._record(tx, *entry) for entry in entries]

    @staticmethod
    def _record(tx: Any, device_id: str, segment_id: bytes, receipt: SegmentReceipt, now: float) -> bool:
        r = receipt
        cur = tx.execute(
            """INSERT INTO segments (device_id, segment_id, capture_id, campaign, priority,
                                     samples, first_ns, last_ns, received_at, clock_offset_ns,
                                     clock_round_trip_ns, clock_status)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (device_id, segment_id) DO NOTHING""",
            (device_id, bytes(segment_id), r.capture_id, r.campaign, r.priority, r.samples, r.first_ns,
             r.last_ns, now, r.clock_offset_ns, r.clock_round_trip_ns, r.clock_status),
        )  # fmt: skip
        if cur.rowcount == 0:
            return False
        tx.execute(
            """INSERT INTO captures (device_id, capture_id, campaign, first_ns, last_ns, samples,
                                     segments, first_received, last_received, privacy)
               VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)
               ON CONFLICT (device_id, capture_id) DO UPDATE SET
                 first_ns = CASE WHEN excluded.first_ns < captures.first_ns
                                 THEN excluded.first_ns ELSE captures.first_ns END,
                 last_ns = CASE WHEN excluded.last_ns > captures.last_ns
                                THEN excluded.last_ns ELSE captures.last_ns END,
                 samples = captures.samples + excluded.samples,
                 segments = captures.segments + 1,
                 last_received = excluded.last_received""",
            (device_id, r.capture_id, r.campaign, r.first_ns, r.last_ns, r.samples, now, now, r.privacy),
        )
        return True

    def receipt(self, device_id: str, segment_id: bytes) -> SegmentReceipt | None:
        rows = self._db.read(
            """SELECT capture_id, campaign, priority, samples, first_ns, last_ns, clock_offset_ns,
                      clock_round_trip_ns, clock_status
               FROM segments WHERE device_id = ? AND segment_id = ?""",
            (device_id, bytes(segment_id)),
        )
        if not rows:
            return None
        r = rows[0]
        return SegmentReceipt(
            str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]),
            clock_offset_ns=None if r[6] is None else int(r[6]),
            clock_round_trip_ns=None if r[7] is None else int(r[7]), clock_status=str(r[8]),
        )  # fmt: skip

    def captures(self) -> list[CaptureRecord]:
        rows = self._db.read(
            """SELECT capture_id, device_id, campaign, first_ns, last_ns, samples, segments, first_received,
                      last_received, privacy FROM captures ORDER BY first_received, device_id, capture_id"""
        )
        return [
            CaptureRecord(
                r[0],
                r[1],
                r[2],
                int(r[3]),
                int(r[4]),
                int(r[5]),
                int(r[6]),
                float(r[7]),
                float(r[8]),
                str(r[9]),
            )
            for r in rows
        ]

    def forget(self, device_id: str, *, before_ns: int | None = None, limit: int = 10_000) -> int:
        """Delete at most ``limit`` ledger rows of ``device_id`` (segments, then captures) — all, or
        those whose last sample is before ``before_ns`` — and return how many (call again until 0)."""
        cond, args = ("device_id = ?", (device_id,)) if before_ns is None else (
            "device_id = ? AND last_ns < ?", (device_id, before_ns))  # fmt: skip
        with self._db.write() as tx:
            gone = 0
            for table, key in (("segments", "segment_id"), ("captures", "capture_id")):
                keys = [r[0] for r in tx.execute(
                    f"SELECT {key} FROM {table} WHERE {cond} ORDER BY {key} LIMIT ?", (*args, limit - gone)
                ).fetchall()]  # fmt: skip
                for k in keys:
                    tx.execute(f"DELETE FROM {table} WHERE device_id = ? AND {key} = ?", (device_id, k))
                gone += len(keys)
                if gone >= limit:
                    break
            return gone

    def totals(self) -> IngestTotals:
        rows = self._db.read(
            "SELECT COUNT(*), COALESCE(SUM(samples), 0), (SELECT COUNT(*) FROM captures) FROM segments"
        )
        segments, samples, captures = rows[0]
        return IngestTotals(int(segments), int(samples), int(captures))


class MemorySegments:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[tuple[str, bytes], SegmentReceipt] = {}
        self._captures: dict[tuple[str, str], CaptureRecord] = {}

    def has(self, device_id: str, segment_id: bytes) -> bool:
        with self._lock:
            return (device_id, bytes(segment_id)) in self._segments

    def record(self, device_id: str, segment_id: bytes, receipt: SegmentReceipt, now: float) -> bool:
        return self.record_many([(device_id, segment_id, receipt, now)])[0]

    def record_many(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        with self._lock:
            return [self._record(*entry) for entry in entries]

    def _record(self, device_id: str, segment_id: bytes, receipt: SegmentReceipt, now: float) -> bool:
        r = receipt
        key = (device_id, bytes(segment_id))
        if key in self._segments:
            return False
        self._segments[key] = r
        old = self._captures.get((device_id, r.capture_id))
        if old is None:
            self._captures[(device_id, r.capture_id)] = CaptureRecord(
                r.capture_id, device_id, r.campaign, r.first_ns, r.last_ns, r.samples, 1, now, now,
                r.privacy,
            )  # fmt: skip
        else:
            self._captures[(device_id, r.capture_id)] = dataclasses.replace(
                old,
                first_ns=min(old.first_ns, r.first_ns),
                last_ns=max(old.last_ns, r.last_ns),
                samples=old.samples + r.samples,
                segments=old.segments + 1,
                last_received=now,
            )
        return True

    def receipt(self, device_id: str, segment_id: bytes) -> SegmentReceipt | None:
        with self._lock:
            return self._segments.get((device_id, bytes(segment_id)))

    def captures(self) -> list[CaptureRecord]:
        with self._lock:
            records = list(self._captures.values())
        return sorted(records, key=lambda c: (c.first_received, c.device_id, c.capture_id))

    def forget(self, device_id: str, *, before_ns: int | None = None, limit: int = 10_000) -> int:
        with self._lock:
            segments = [k for k, r in self._segments.items()
                        if k[0] == device_id and (before_ns is None or r.last_ns < before_ns)]  # fmt: skip
            segments = segments[:limit]
            captures = [k for k, c in self._captures.items()
                        if k[0] == device_id and (before_ns is None or c.last_ns < before_ns)]  # fmt: skip
            captures = captures[: limit - len(segments)]
            for seg in segments:
                del self._segments[seg]
            for cap in captures:
                del self._captures[cap]
        return len(segments) + len(captures)

    def totals(self) -> IngestTotals:
        with self._lock:
            samples = sum(r.samples for r in self._segments.values())
            return IngestTotals(len(self._segments), samples, len(self._captures))
