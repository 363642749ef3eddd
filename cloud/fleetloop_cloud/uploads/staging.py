"""Resumable uploads: pieces of an encoded ``UploadSegmentRequest`` collected on disk until whole.

A device on a cellular link that drops every few minutes cannot move a large segment in one message: each
attempt starts from zero and may never finish. So the device cuts the encoded request into pieces
(``UploadChunk``), and the cloud keeps what arrived in a staging file per (device, segment id). After a
cut the device asks where the cloud is and goes on from there — also after a coordinator restart, since
the staging file is the state. When the last piece is in and the whole matches its SHA-256, the request
is handed to the same ingest path as ``UploadSegment``, so identity checks and exactly-once dedupe are
the same ones.

Bounded, with named policies (counted in :attr:`UploadStaging.counters`):

- a piece carries at most :data:`MAX_CHUNK_BYTES`; a whole upload at most ``max_upload_bytes``;
- ``max_per_device`` partial uploads per device — a new one *evicts that device's oldest* partial
  (``evicted``): a device can only crowd out itself;
- ``max_total_bytes`` staged over all devices — a piece beyond it is *refused* (``StorageFullError``,
  gRPC RESOURCE_EXHAUSTED: the device backs off and resumes later; nothing it sent is lost);
- partial uploads untouched for ``ttl_s`` are removed by :meth:`expire` (``expired``).

Pieces are written without fsync: after a crash the file may be short (the device resends from its
size) or hold garbage that the whole-upload SHA-256 refuses (the staging restarts from zero,
``restarted``). The durable point stays where it was: the ingest of the whole request.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fleetloop_shared.errors import MalformedMessageError, StorageFullError, UserError

#: Largest piece a device may send in one UploadChunk (well under the gRPC message limit).
MAX_CHUNK_BYTES = 1 << 20
_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PART = re.compile(r"^([0-9a-f]{32})-(\d+)-([0-9a-f]{64})\.part$")


@dataclass(frozen=True)
class StagingLimits:
    """The bounds of :class:`UploadStaging` (``uploads.staging`` in the coordinator's config)."""

    #: Largest whole upload, in bytes.
    max_upload_bytes: int = 256 << 20
    #: Bytes staged over all devices; a piece beyond it is refused (the device resumes later).
    max_total_bytes: int = 1 << 30
    #: Partial uploads per device; a new one evicts that device's oldest.
    max_per_device: int = 4
    #: Partial uploads untouched this long (seconds) are removed.
    ttl_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if min(self.max_upload_bytes, self.max_total_bytes, self.max_per_device) <= 0 or self.ttl_s <= 0:
            raise UserError("upload staging limits must be above 0")


@dataclass(frozen=True)
class ChunkOutcome:
    """Where an upload stands after a piece: ``next_offset`` to send from, or the whole request."""

    next_offset: int
    whole: bytes | None = None


class UploadStaging:
    """Staging files under ``directory/<device>/<segment id>-<total>-<sha256>.part``."""

    def __init__(
        self,
        directory: Path,
        *,
        max_upload_bytes: int,
        max_total_bytes: int = 1 << 30,
        max_per_device: int = 4,
        ttl_s: float = 24 * 3600.0,
    ) -> None:
        self._dir = directory
        self._max_upload = max_upload_bytes
        self._max_total = max_total_bytes
        self._max_per_device = max_per_device
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ the one entry point

    def put(
        self,
        device_id: str,
        segment_id: bytes,
        *,
        offset: int,
        total_bytes: int,
        total_sha256: bytes,
        data: bytes,
    ) -> ChunkOutcome:
        """Take one piece (or, with empty ``data``, answer "where are we"). Returns the offset to send
        from next, or the whole request once it is complete and matches its hash (the staging file is
        gone then; ingest it, and a retry of the last piece starts a fresh staging that the ingest's
        dedupe answers as a duplicate)."""
        self._check(device_id, segment_id, offset, total_bytes, total_sha256, data)
        path = self._dir / device_id / f"{segment_id.hex()}-{total_bytes}-{total_sha256.hex()}.part"
        with self._lock:
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                if not data and offset == 0 and total_bytes > 0:
                    return ChunkOutcome(0)
                self._make_room(device_id, segment_id, len(data))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                size = 0
            elif size > total_bytes:
                path.unlink()
                self.counters["restarted"] += 1
                return ChunkOutcome(0)
            if data and offset <= size < offset + len(data):
                # Append what is new; a resent piece overlapping what we hold only adds its tail.
                new = data[size - offset :]
                if self._staged_bytes() + len(new) > self._max_total:
                    self.counters["refused_full"] += 1
                    raise StorageFullError(
                        f"upload staging is full ({self._max_total} bytes); resume later"
                    )
                with open(path, "r+b") as fh:
                    fh.seek(size)
                    fh.write(new)
                size += len(new)
                self.counters["pieces"] += 1
            elif data and offset > size:
                self.counters["gaps"] += 1  # the device is ahead of us (a lost piece): resend from size
            if size < total_bytes:
                os.utime(path)
                return ChunkOutcome(size)
            whole = path.read_bytes()
            path.unlink()
            if hashlib.sha256(whole).digest() != total_sha256:
                self.counters["restarted"] += 1
                return ChunkOutcome(0)
            self.counters["completed"] += 1
            return ChunkOutcome(total_bytes, whole)

    def expire(self, now: float) -> int:
        """Remove partial uploads untouched for ``ttl_s`` (a device that went away for good)."""
        removed = 0
        with self._lock:
            for path in self._dir.glob("*/*.part"):
                try:
                    if now - path.stat().st_mtime > self._ttl_s:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        self.counters["expired"] += removed
        return removed

    def staged_bytes(self) -> int:
        with self._lock:
            return self._staged_bytes()

    # ------------------------------------------------------------------ internals

    def _check(
        self, device_id: str, segment_id: bytes, offset: int, total: int, sha: bytes, data: bytes
    ) -> None:
        if not _DEVICE.fullmatch(device_id):
            raise MalformedMessageError(f"device id {device_id!r} is not a valid device id")
        if len(segment_id) != 16:
            raise MalformedMessageError(f"segment id must be 16 bytes, got {len(segment_id)}")
        if len(sha) != 32:
            raise MalformedMessageError(f"total_sha256 must be 32 bytes, got {len(sha)}")
        if not 0 < total <= self._max_upload:
            raise MalformedMessageError(f"total_bytes {total} is outside 1..{self._max_upload}")
        if len(data) > MAX_CHUNK_BYTES:
            raise MalformedMessageError(f"a piece carries at most {MAX_CHUNK_BYTES} bytes, got {len(data)}")
        if offset + len(data) > total:
            raise MalformedMessageError(
                f"piece at offset {offset} with {len(data)} bytes runs past total_bytes {total}"
            )

    def _staged_bytes(self) -> int:
        total = 0
        for path in self._dir.glob("*/*.part"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def _make_room(self, device_id: str, segment_id: bytes, first_piece: int) -> None:
        """Per-device bound: evict this device's oldest partial uploads (and any stale staging of the
        same segment with another size/hash — the device re-encoded it)."""
        folder = self._dir / device_id
        if not folder.is_dir():
            return
        partials = []
        for path in folder.glob("*.part"):
            m = _PART.fullmatch(path.name)
            if m is None:
                continue
            if m.group(1) == segment_id.hex():
                path.unlink(missing_ok=True)
                self.counters["restarted"] += 1
                continue
            partials.append((path.stat().st_mtime, path))
        partials.sort()
        while len(partials) >= self._max_per_device:
            _, oldest = partials.pop(0)
            oldest.unlink(missing_ok=True)
            self.counters["evicted"] += 1
