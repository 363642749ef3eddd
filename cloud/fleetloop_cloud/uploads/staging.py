"""Resumable uploads: pieces of an encoded ``UploadSegmentRequest`` collected in object storage until whole.

A device on a cellular link that drops every few minutes cannot move a large segment in one message: each
attempt starts from zero and may never finish. So the device cuts the encoded request into pieces
(``UploadChunk``), and the cloud keeps what arrived as one object per piece under
``<device>/<segment id>-<total>-<sha256>/<offset>.part`` in its object store (a local folder by default,
a bucket shared by every coordinator at scale). After a cut the device asks where the cloud is and goes
on from there — also after a coordinator restart, or through another coordinator sharing the bucket,
since the pieces are the state. Objects are never appended to: each new stretch of bytes is a new piece
named by its offset. When the last piece is in and the whole matches its SHA-256, the request
is handed to the same ingest path as ``UploadSegment``, so identity checks and exactly-once dedupe are
the same ones.

Bounded, with named policies (counted in :attr:`UploadStaging.counters`):

- a piece carries at most :data:`MAX_CHUNK_BYTES`; a whole upload at most ``max_upload_bytes``;
- ``max_per_device`` partial uploads per device — a new one *evicts that device's oldest* partial
  (``evicted``): a device can only crowd out itself;
- ``max_total_bytes`` staged over all devices — a piece beyond it is *refused* (``StorageFullError``,
  gRPC RESOURCE_EXHAUSTED: the device backs off and resumes later; nothing it sent is lost);
- partial uploads untouched for ``ttl_s`` are removed by :meth:`expire` (``expired``).

On local disk pieces are written without fsync: after a crash a piece may be missing (the device
resends from where the pieces end) or hold garbage that the whole-upload SHA-256 refuses (the staging
restarts from zero, ``restarted``). The durable point stays where it was: the ingest of the whole
request. The total bound is kept by each coordinator from a listing at start and at every
:meth:`~UploadStaging.expire` pass, plus what it staged itself since.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fleetloop_cloud.storage import LocalObjectStore, ObjectInfo, ObjectStore
from fleetloop_shared.errors import MalformedMessageError, StorageFullError, UserError

#: Largest piece a device may send in one UploadChunk (well under the gRPC message limit).
MAX_CHUNK_BYTES = 1 << 20
_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UPLOAD = re.compile(r"^([0-9a-f]{32})-(\d+)-([0-9a-f]{64})$")
_PIECE = re.compile(r"^(\d{12})\.part$")


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
    """Partial uploads as pieces in ``store`` (a folder given as a path is a local object store)."""

    def __init__(
        self,
        store: ObjectStore | Path,
        *,
        max_upload_bytes: int,
        max_total_bytes: int = 1 << 30,
        max_per_device: int = 4,
        ttl_s: float = 24 * 3600.0,
    ) -> None:
        if isinstance(store, Path):
            store = LocalObjectStore(store, durable=False)
        self._store: ObjectStore = store
        self._max_upload = max_upload_bytes
        self._max_total = max_total_bytes
        self._max_per_device = max_per_device
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._staged = sum(o.size for o in self._store.list())

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
        from next, or the whole request once it is complete and matches its hash (its pieces are gone
        then; ingest it, and a retry of the last piece starts a fresh staging that the ingest's dedupe
        answers as a duplicate)."""
        self._check(device_id, segment_id, offset, total_bytes, total_sha256, data)
        upload = f"{device_id}/{segment_id.hex()}-{total_bytes}-{total_sha256.hex()}/"
        with self._lock:
            pieces = self._store.list(upload)
            size = _contiguous(upload, pieces)
            if not pieces:
                if not data:
                    return ChunkOutcome(0)
                self._make_room(device_id, segment_id)
            elif size > total_bytes:
                self._remove(pieces)
                self.counters["restarted"] += 1
                return ChunkOutcome(0)
            if data and offset <= size < offset + len(data):
                # Store what is new; a resent piece overlapping what we hold only adds its tail.
                new = data[size - offset :]
                if self._staged + len(new) > self._max_total:
                    self.counters["refused_full"] += 1
                    raise StorageFullError(f"upload staging is full ({self._max_total} bytes); resume later")
                self._store.put(f"{upload}{size:012d}.part", new)
                self._staged += len(new)
                size += len(new)
                self.counters["pieces"] += 1
            elif data and offset > size:
                self.counters["gaps"] += 1  # the device is ahead of us (a lost piece): resend from size
            if size < total_bytes:
                return ChunkOutcome(size)
            pieces = self._store.list(upload)
            whole = b"".join(self._store.get(p.key) for p in pieces)
            self._remove(pieces)
            if len(whole) != total_bytes or hashlib.sha256(whole).digest() != total_sha256:
                self.counters["restarted"] += 1
                return ChunkOutcome(0)
            self.counters["completed"] += 1
            return ChunkOutcome(total_bytes, whole)

    def expire(self, now: float) -> int:
        """Remove partial uploads untouched for ``ttl_s`` (a device that went away for good), and take
        the total staged afresh from the store."""
        removed = 0
        with self._lock:
            for pieces in _uploads(self._store.list()).values():
                if now - max(p.modified for p in pieces) > self._ttl_s:
                    self._remove(pieces)
                    removed += 1
            self._staged = sum(o.size for o in self._store.list())
        self.counters["expired"] += removed
        return removed

    def discard_device(self, device_id: str) -> int:
        """Remove every partial upload of ``device_id`` (its data is being erased); how many."""
        with self._lock:
            uploads = _uploads(self._store.list(f"{device_id}/"))
            for pieces in uploads.values():
                self._remove(pieces)
        return len(uploads)

    def staged_bytes(self) -> int:
        with self._lock:
            return self._staged

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

    def _remove(self, pieces: list[ObjectInfo]) -> None:
        for piece in pieces:
            self._store.delete(piece.key)
            self._staged = max(0, self._staged - piece.size)

    def _make_room(self, device_id: str, segment_id: bytes) -> None:
        """Per-device bound: evict this device's oldest partial uploads (and any stale staging of the
        same segment with another size/hash — the device re-encoded it)."""
        partials = []
        for name, pieces in _uploads(self._store.list(f"{device_id}/")).items():
            m = _UPLOAD.fullmatch(name.split("/", 1)[1])
            if m is None:
                continue
            if m.group(1) == segment_id.hex():
                self._remove(pieces)
                self.counters["restarted"] += 1
                continue
            partials.append((max(p.modified for p in pieces), name, pieces))
        partials.sort()
        while len(partials) >= self._max_per_device:
            _, _, oldest = partials.pop(0)
            self._remove(oldest)
            self.counters["evicted"] += 1


def _uploads(objects: list[ObjectInfo]) -> dict[str, list[ObjectInfo]]:
    """Pieces grouped by upload (``<device>/<upload>``), each group ordered by offset."""
    out: dict[str, list[ObjectInfo]] = {}
    for obj in objects:
        upload, _, piece = obj.key.rpartition("/")
        if upload.count("/") == 1 and _PIECE.fullmatch(piece):
            out.setdefault(upload, []).append(obj)
    return out


def _contiguous(upload: str, pieces: list[ObjectInfo]) -> int:
    """How many bytes from 0 the pieces hold without a gap."""
    size = 0
    for piece in pieces:
        m = _PIECE.fullmatch(piece.key[len(upload) :])
        if m is None or int(m.group(1)) != size:
            break
        size += piece.size
    return size
