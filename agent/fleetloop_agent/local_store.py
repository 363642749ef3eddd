"""The agent's local segment store: crash-safe files on disk, an SQLite index, a disk quota.

Captures must survive power cuts and ``kill -9`` while the uplink may be offline for days, so:

* A segment file is written to ``*.tmp``, fsynced, renamed into place and the directory fsynced; only
  then is its index row committed. At every instant the disk holds either nothing of a segment, a
  ``*.tmp`` leftover (deleted on open), a complete file without a row (re-indexed on open from the file
  itself), or a complete file with its row.
* Each file carries its store metadata (capture, campaign, priority, creation time) in a small envelope
  (:mod:`.store_envelope`) before the segment bytes, so a file that lost its row in a crash is
  re-indexed without losing what campaign it belongs to or how urgent it is.
* Uploads are acknowledged state-first: the row is marked uploaded, then the file deleted; a crash in
  between leaves a file the next open deletes. Evictions go file-first, so a crash never resurrects an
  evicted segment (at worst a row without file, which the next open drops).
* The quota is enforced before writing, on what the store takes on disk: the blocks its segment files
  occupy, plus the index, its write-ahead log and anything else under the root (:meth:`disk_usage`).
  The log is bounded (checkpointed every :data:`WAL_AUTOCHECKPOINT_PAGES` pages, truncated to
  :data:`JOURNAL_SIZE_LIMIT_BYTES`) and, when the quota is tight, checkpointed to nothing before any data
  is evicted. Overflow policy: evict pending segments of priority lower than or equal to the new one,
  lowest priority first, then oldest; never evict more urgent data to make room for less urgent data —
  the new segment is refused with :class:`StorageFullError` instead. Evictions are counted in
  :class:`StoreStats` so metrics can say what was lost.

One lock serializes every operation: the agent's main loop appends while the uplink thread reads and
acknowledges. Encoding (the CPU-heavy part) runs outside the lock.

Reading back (operators' ``fleetloop store export``, local inspection): :meth:`LocalStore.query` selects
pending segments by group, capture and time range through the index, then decodes one at a time and cuts
them to the requested signals and range; :meth:`LocalStore.inventory` counts samples, signals, groups and
bytes from the index (the index keeps each segment's signal ids for that).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetloop_agent.store_envelope import ENVELOPE_VERSION as ENVELOPE_VERSION
from fleetloop_agent.store_envelope import ENVELOPE_VERSION_PRIVACY as ENVELOPE_VERSION_PRIVACY
from fleetloop_agent.store_envelope import MAX_LABEL_BYTES, MAX_PRIORITY, decode_envelope, encode_envelope
from fleetloop_shared.durable import fsync_directory
from fleetloop_shared.errors import (
    ConfigError,
    CorruptSegmentError,
    NotFoundError,
    StateError,
    StorageFullError,
    UserError,
)
from fleetloop_shared.segment import FORMAT_VERSION, READ_VERSIONS, Segment, decode_segment, encode_segment

#: Where the store keeps its files, relative to its root.
SEGMENTS_DIR = "segments"
INDEX_FILE = "index.sqlite3"
HELD_DIR = "held"
SEGMENT_SUFFIX = ".seg"
TMP_SUFFIX = ".tmp"

#: Acknowledged segments remembered so a repeated ack stays a no-op; older ones are forgotten (bounded).
MAX_UPLOADED_REMEMBERED = 10_000
#: Upper bound of one ``pending()`` page, whatever the caller asks for.
MAX_PENDING_PAGE = 10_000
#: Index pages the write-ahead log may hold before SQLite checkpoints it into the index.
WAL_AUTOCHECKPOINT_PAGES = 256
#: Size the write-ahead log is truncated to after a checkpoint.
JOURNAL_SIZE_LIMIT_BYTES = 1024 * 1024
#: Page size of the index (set when it is created).
INDEX_PAGE_BYTES = 4096
#: What one append may add to the index's log, reserved before the segment is written: its eviction and
#: its insert touch about five pages each (table, three indexes, counters), a page split a few more.
COMMIT_RESERVE_BYTES = 12 * (INDEX_PAGE_BYTES + 24) + 32  # WAL frames carry a 24-byte header; 32: file header

_STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    segment_id BLOB NOT NULL UNIQUE,
    capture_id TEXT NOT NULL,
    campaign TEXT NOT NULL,
    priority INTEGER NOT NULL,
    grp TEXT NOT NULL,
    samples INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    uploaded_seq INTEGER,
    signal_ids TEXT NOT NULL DEFAULT '',
    privacy TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS segments_pending_order
    ON segments (priority DESC, created_ns, seq) WHERE uploaded_seq IS NULL;
CREATE INDEX IF NOT EXISTS segments_uploaded ON segments (uploaded_seq) WHERE uploaded_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_COUNTERS = (
    "segments_uploaded_total",
    "samples_stored_total",
    "evicted_segments_total",
    "evicted_bytes_total",
    "upload_seq",
)

_ROW_COLUMNS = (
    "segment_id, capture_id, campaign, priority, grp, samples, size_bytes, first_ns, last_ns, created_ns, "
    "privacy"
)


@dataclass(frozen=True)
class StoredSegment:
    """Index entry of one stored segment. ``size_bytes`` is the encoded segment (what the uplink sends);
    ``first_ns``/``last_ns`` are its earliest and latest timestamps over all its groups (0 for an empty
    segment); ``group`` names its groups, separated by newlines when it holds several (format 4)."""

    segment_id: bytes
    capture_id: str
    campaign: str
    priority: int
    group: str
    samples: int
    size_bytes: int
    first_ns: int
    last_ns: int
    created_ns: int
    #: The privacy policy the capture was taken under (``NAME@VERSION#KEYID``), "" for none.
    privacy: str = ""


@dataclass(frozen=True)
class StoreStats:
    """Counters for metrics. Totals persist across restarts (they live in the index)."""

    segments_pending: int
    bytes_pending: int
    segments_uploaded_total: int
    samples_stored_total: int
    evicted_segments_total: int
    evicted_bytes_total: int


@dataclass(frozen=True)
class StoreInventory:
    """What a store holds now (pending segments), for operators and the store benchmark.

    ``segment_bytes`` is the size of every segment file (envelope included); ``disk_bytes`` is what the
    store takes on disk, as the quota counts it (the blocks of its segment files, the index, its log and
    everything else under the root); ``encoded_bytes`` is the segments alone (what the uplink sends).
    """

    segments: int
    samples: int
    signals: int
    groups: int
    encoded_bytes: int
    segment_bytes: int
    disk_bytes: int
    first_ns: int | None
    last_ns: int | None

    @property
    def bytes_per_sample(self) -> float:
        return self.segment_bytes / self.samples if self.samples else 0.0


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class LocalStore:
    """Segments pending upload, on disk under ``root``, within ``quota_bytes`` of disk.

    ``segment_version``: the newest segment format written (``encode_segment(max_version=...)``), for a
    fleet whose cloud does not read the newest yet.
    """

    def __init__(
        self, root: Path, *, quota_bytes: int = 256 * 1024 * 1024, segment_version: int = FORMAT_VERSION
    ) -> None:
        if segment_version not in READ_VERSIONS:
            raise ConfigError(
                f"segment format version {segment_version} unknown "
                f"(this build writes {', '.join(map(str, sorted(READ_VERSIONS)))})"
            )
        self.segment_version = segment_version
        if quota_bytes <= 0:
            raise ConfigError(f"store quota must be positive, got {quota_bytes}")
        self._root = Path(root)
        self._dir = self._root / SEGMENTS_DIR
        self._quota = quota_bytes
        #: Allocated bytes of files in the segment directory that are not segments (see _overhead_bytes).
        self._strays = 0
        self._lock = threading.Lock()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._block = os.statvfs(self._dir).f_frsize or 4096
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"store root {self._root}: a path component is not a directory") from None
        except PermissionError:
            raise ConfigError(f"store root {self._root}: permission denied") from None
        self._db: sqlite3.Connection | None = self._open_index()
        self._recover()

    # ------------------------------------------------------------------------------------ public API

    def append(
        self,
        segment: Segment,
        *,
        capture_id: str,
        campaign: str,
        priority: int,
        now_ns: int,
        privacy: str = "",
    ) -> StoredSegment:
        """Store ``segment`` durably and index it; evicts older, less urgent data if the quota needs it.
        ``privacy`` is the stamp of the policy its capture was taken under (it travels with the upload)."""
        if not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise UserError(f"priority must be an integer 0..{MAX_PRIORITY}, got {priority!r}")
        for what, label in (("capture_id", capture_id), ("campaign", campaign), ("privacy", privacy)):
            if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
                raise UserError(f"{what} longer than {MAX_LABEL_BYTES} bytes: {label[:40]!r}...")
        if not -(2**63) <= now_ns < 2**63:
            raise UserError(f"now_ns {now_ns} is outside the int64 range")
        encoded = encode_segment(segment, max_version=self.segment_version)
        blob = encode_envelope(capture_id, campaign, priority, now_ns, privacy) + encoded
        first, last = segment.time_range() or (0, 0)
        entry = StoredSegment(
            segment_id=segment.segment_id,
            capture_id=capture_id,
            campaign=campaign,
            priority=priority,
            group=_group_label(segment),
            samples=segment.sample_count,
            size_bytes=len(encoded),
            first_ns=first,
            last_ns=last,
            created_ns=now_ns,
            privacy=privacy,
        )
        with self._lock:
            db = self._require_open()
            if db.execute("SELECT 1 FROM segments WHERE segment_id = ?", (entry.segment_id,)).fetchone():
                raise StateError(f"segment {entry.segment_id.hex()} is already in the store")
            self._make_room(db, len(blob), priority, entry.segment_id)
            final = self._path(entry.segment_id)
            self._write_file(final, blob)
            try:
                with db:
                    self._insert_row(db, entry, len(blob), _ids_text(segment))
            except sqlite3.Error as exc:
                _unlink_quietly(final)
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise StorageFullError(f"store index {self._root / INDEX_FILE}: disk full") from None
                raise
        return entry

    def pending(self, limit: int = 100) -> list[StoredSegment]:
        """Segments not yet acknowledged by the cloud, most urgent first, then oldest first."""
        if limit < 0:
            raise UserError(f"pending(limit) must be >= 0, got {limit}")
        with self._lock:
            db = self._require_open()
            cur = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM segments WHERE uploaded_seq IS NULL "
                "ORDER BY priority DESC, created_ns ASC, seq ASC LIMIT ?",
                (min(limit, MAX_PENDING_PAGE),),
            )
            return [_row_to_entry(row) for row in cur.fetchall()]

    def read(self, segment_id: bytes) -> bytes:
        """The encoded segment (exactly what ``encode_segment`` produced) of a pending segment."""
        with self._lock:
            db = self._require_open()
            row = db.execute(
                "SELECT 1 FROM segments WHERE segment_id = ? AND uploaded_seq IS NULL", (segment_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"segment {segment_id.hex()} is not pending in the store")
        path = self._path(segment_id)
        try:
            # Files are never rewritten in place, only created by rename and deleted, so reading outside
            # the lock sees either the whole file or none.
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"segment {segment_id.hex()} was removed from the store") from None
        envelope = decode_envelope(data, str(path))
        return data[envelope.segment_offset :]

    def mark_uploaded(self, segment_id: bytes) -> None:
        """The cloud acknowledged the segment: record that, then delete its file. Repeats are no-ops."""
        with self._lock:
            db = self._require_open()
            row = db.execute(
                "SELECT uploaded_seq FROM segments WHERE segment_id = ?", (segment_id,)
            ).fetchone()
            if row is None or row[0] is not None:
                return  # unknown (evicted, or acknowledged long ago) or already acknowledged
            with db:
                seq = self._bump(db, "upload_seq", 1)
                db.execute("UPDATE segments SET uploaded_seq = ? WHERE segment_id = ?", (seq, segment_id))
                self._bump(db, "segments_uploaded_total", 1)
                db.execute(
                    "DELETE FROM segments WHERE uploaded_seq IS NOT NULL AND uploaded_seq <= ?",
                    (seq - MAX_UPLOADED_REMEMBERED,),
                )
            _unlink_quietly(self._path(segment_id))

    def pending_ids(self) -> list[bytes]:
        """Every pending segment's id, oldest first (bounded by the quota: each takes a file)."""
        with self._lock:
            db = self._require_open()
            rows = db.execute("SELECT segment_id FROM segments WHERE uploaded_seq IS NULL ORDER BY seq")
            return [bytes(r[0]) for r in rows.fetchall()]

    def replace(self, segment: Segment) -> None:
        """Put ``segment`` in place of the pending segment of the same id, keeping its envelope (capture,
        campaign, priority, time, privacy stamp): for rewriting ids. The file is replaced by rename, so a
        crash leaves the old segment or the new; a crash before the index follows is mended on the next
        open (a file whose size the index does not know is indexed afresh from its own bytes)."""
        with self._lock:
            db = self._require_open()
            found = db.execute(
                "SELECT 1 FROM segments WHERE segment_id = ? AND uploaded_seq IS NULL", (segment.segment_id,)
            ).fetchone()
            if found is None:
                raise NotFoundError(f"segment {segment.segment_id.hex()} is not pending in the store")
            final = self._path(segment.segment_id)
            old = final.read_bytes()
            envelope = decode_envelope(old, str(final))
            encoded = encode_segment(segment, max_version=self.segment_version)
            blob = old[: envelope.segment_offset] + encoded
            self._write_file(final, blob)
            with db:
                db.execute(
                    "UPDATE segments SET size_bytes = ?, disk_bytes = ?, signal_ids = ?, grp = ? "
                    "WHERE segment_id = ?",
                    (len(encoded), len(blob), _ids_text(segment), _group_label(segment), segment.segment_id),
                )

    @property
    def root(self) -> Path:
        return self._root

    @property
    def held_dir(self) -> Path:
        """Segments set aside (kept, never uploaded): :meth:`hold`."""
        return self._root / HELD_DIR

    def hold(self, segment_id: bytes) -> None:
        """Take a pending segment out of the upload queue but keep its file, in :attr:`held_dir` (its
        bytes still count against the quota). Rename first, then the index: a crash between leaves a row
        without a file, which the next open drops."""
        with self._lock:
            db = self._require_open()
            src = self._path(segment_id)
            self.held_dir.mkdir(exist_ok=True)
            if src.exists():
                os.replace(src, self.held_dir / src.name)
                fsync_directory(self.held_dir)
                fsync_directory(self._dir)
            with db:
                db.execute(
                    "DELETE FROM segments WHERE segment_id = ? AND uploaded_seq IS NULL", (segment_id,)
                )

    @property
    def quota_bytes(self) -> int:
        """The disk quota the store keeps within."""
        return self._quota

    def disk_usage(self) -> int:
        """Bytes the store takes on disk, as the quota counts them: the blocks of the pending segment
        files, plus everything else under the root (the index, its log, leftovers) as allocated."""
        with self._lock:
            return self._segments_on_disk(self._require_open()) + self._overhead_bytes()

    def stats(self) -> StoreStats:
        with self._lock:
            db = self._require_open()
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM segments WHERE uploaded_seq IS NULL"
            ).fetchone()
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        return StoreStats(
            segments_pending=int(count),
            bytes_pending=int(size),
            segments_uploaded_total=int(counters.get("segments_uploaded_total", 0)),
            samples_stored_total=int(counters.get("samples_stored_total", 0)),
            evicted_segments_total=int(counters.get("evicted_segments_total", 0)),
            evicted_bytes_total=int(counters.get("evicted_bytes_total", 0)),
        )

    def inventory(self) -> StoreInventory:
        """Counts and sizes of the pending segments (index only, plus a directory listing for sizes)."""
        with self._lock:
            db = self._require_open()
            count, samples, encoded, disk, first, last = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(samples), 0), COALESCE(SUM(size_bytes), 0), "
                "COALESCE(SUM(disk_bytes), 0), MIN(first_ns), MAX(last_ns) FROM segments "
                "WHERE uploaded_seq IS NULL"
            ).fetchone()
            names: set[str] = set()
            for (label,) in db.execute("SELECT DISTINCT grp FROM segments WHERE uploaded_seq IS NULL"):
                names.update(str(label).split("\n"))
            groups = len(names)
            signals: set[str] = set()
            for (text,) in db.execute("SELECT DISTINCT signal_ids FROM segments WHERE uploaded_seq IS NULL"):
                signals.update(x for x in str(text).split(",") if x)
            total = self._segments_on_disk(db) + self._overhead_bytes()
        return StoreInventory(
            segments=int(count),
            samples=int(samples),
            signals=len(signals),
            groups=int(groups),
            encoded_bytes=int(encoded),
            segment_bytes=int(disk),
            disk_bytes=total,
            first_ns=None if first is None else int(first),
            last_ns=None if last is None else int(last),
        )

    def query(
        self,
        *,
        signal_ids: Iterable[int] | None = None,
        group: str | None = None,
        capture_id: str | None = None,
        from_ns: int | None = None,
        to_ns: int | None = None,
    ) -> Iterator[tuple[StoredSegment, Segment]]:
        """Pending segments that match, decoded and cut to ``from_ns <= t <= to_ns`` and to the requested
        signals (segments holding none of them are skipped), oldest first. A multi-group (format 4)
        segment yields one single-group segment per matching group, so callers see groups as before.

        The index narrows by group, capture and time range before any file is read; one segment is
        decoded at a time, so memory stays bounded by the largest segment.
        """
        wanted = None if signal_ids is None else {int(s) for s in signal_ids}
        lo = -(2**63) if from_ns is None else int(from_ns)
        hi = 2**63 - 1 if to_ns is None else int(to_ns)
        sql = (
            f"SELECT {_ROW_COLUMNS}, signal_ids FROM segments WHERE uploaded_seq IS NULL "
            "AND last_ns >= ? AND first_ns <= ?"
        )
        args: list[Any] = [lo, hi]
        if group is not None:
            sql += " AND (grp = ? OR instr(grp, char(10)) > 0)"  # multi-group rows: filtered once decoded
            args.append(group)
        if capture_id is not None:
            sql += " AND capture_id = ?"
            args.append(capture_id)
        sql += " ORDER BY first_ns ASC, seq ASC"
        with self._lock:
            rows = self._require_open().execute(sql, args).fetchall()
        for row in rows:
            entry = _row_to_entry(row[:-1])
            ids = {int(x) for x in str(row[-1]).split(",") if x}
            if wanted is not None and ids and not ids & wanted:
                continue
            try:
                decoded = decode_segment(self.read(entry.segment_id))
            except NotFoundError:
                continue  # acknowledged or evicted since the index was read
            for segment in decoded.groups():  # a format 4 segment yields one entry per matching group
                if group is not None and segment.group != group:
                    continue
                keep = (segment.t_ns >= lo) & (segment.t_ns <= hi)
                columns = {k: v[keep] for k, v in segment.columns.items() if wanted is None or k in wanted}
                if wanted is not None and not columns:
                    continue
                yield (
                    entry,
                    Segment(
                        segment.segment_id,
                        segment.group,
                        segment.t_ns[keep],
                        columns,
                        {k: segment.data_types[k] for k in columns},
                    ),
                )

    def close(self) -> None:
        """Close the index; further calls raise StateError. Closing twice is harmless."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------------------------ internals

    def _require_open(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"local store {self._root} is closed")
        return self._db

    def _path(self, segment_id: bytes) -> Path:
        return self._dir / (segment_id.hex() + SEGMENT_SUFFIX)

    def _open_index(self) -> sqlite3.Connection:
        """Open (or create) the index; an unreadable index is set aside and rebuilt from the files."""
        path = self._root / INDEX_FILE
        try:
            return self._connect(path)
        except sqlite3.DatabaseError:
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(path) + ".corrupt" + suffix))
            return self._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        try:
            # WAL survives kill -9 with every committed row; synchronous=NORMAL may lose the last commits
            # on power loss, which recovery repairs from the files (row-less files are re-indexed).
            db.execute(f"PRAGMA page_size={INDEX_PAGE_BYTES}")  # only takes effect on a new index
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(segments)")}
            for column in ("signal_ids", "privacy"):  # an index written before the column existed
                if column not in columns:
                    db.execute(f"ALTER TABLE segments ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            with db:
                db.executemany(
                    "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(n,) for n in _COUNTERS]
                )
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: int) -> int:
        db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))
        value: int = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]
        return value

    def _insert_row(
        self, db: sqlite3.Connection, entry: StoredSegment, disk_bytes: int, signal_ids: str
    ) -> None:
        db.execute(
            "INSERT INTO segments (segment_id, capture_id, campaign, priority, grp, samples, size_bytes, "
            "disk_bytes, first_ns, last_ns, created_ns, signal_ids, privacy) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.segment_id,
                entry.capture_id,
                entry.campaign,
                entry.priority,
                entry.group,
                entry.samples,
                entry.size_bytes,
                disk_bytes,
                entry.first_ns,
                entry.last_ns,
                entry.created_ns,
                signal_ids,
                entry.privacy,
            ),
        )
        self._bump(db, "samples_stored_total", entry.samples)

    def _allocated(self, size: int) -> int:
        """Disk a file of ``size`` bytes occupies: whole filesystem blocks."""
        return -(-size // self._block) * self._block

    def _segments_on_disk(self, db: sqlite3.Connection) -> int:
        block = self._block
        (used,) = db.execute(
            "SELECT COALESCE(SUM((disk_bytes + ? - 1) / ? * ?), 0) FROM segments WHERE uploaded_seq IS NULL",
            (block, block, block),
        ).fetchone()
        return int(used)

    def _overhead_bytes(self) -> int:
        """Allocated bytes of every file under the root but the segment files (index, log, shared memory,
        an operator's catalog, a set-aside corrupt index, held segments): counted as they are, not
        estimated.

        The segment directory is not listed here: every append asks, and listing it made each append
        cost as much as the segments already stored (a store of 7,000 took minutes to fill). Its other
        files are counted once, when the store opens (:meth:`_recover`): only this store writes there,
        and only segment files and their ``*.tmp`` (the one being written is counted as needed)."""
        total = self._strays
        for dirpath, dirnames, filenames in os.walk(self._root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d != self._dir]
            for name in filenames:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(here / name).st_blocks * 512
        return total

    def _make_room(self, db: sqlite3.Connection, size: int, priority: int, segment_id: bytes) -> None:
        """Evict so that a segment file of ``size`` bytes (and its commit) fits the quota, or refuse before
        evicting anything. The index's log is checkpointed to nothing first: it holds no data."""
        needed = self._allocated(size) + COMMIT_RESERVE_BYTES
        excess = self._segments_on_disk(db) + self._overhead_bytes() + needed - self._quota
        if excess > 0:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            overhead = self._overhead_bytes()
            excess = self._segments_on_disk(db) + overhead + needed - self._quota
            if needed + overhead > self._quota:
                raise StorageFullError(
                    f"segment {segment_id.hex()} needs {needed} bytes of disk; the whole store quota of "
                    f"{self._quota} bytes leaves {max(self._quota - overhead, 0)} beside the index"
                )
        if excess <= 0:
            return
        victims: list[tuple[int, bytes, int]] = []
        freed = 0
        for seq, victim_id, disk_bytes in self._eviction_candidates(db, priority):
            victims.append((seq, victim_id, disk_bytes))
            freed += self._allocated(disk_bytes)
            if freed >= excess:
                break
        if freed < excess:
            raise StorageFullError(
                f"store quota of {self._quota} bytes is full of segments more urgent than priority "
                f"{priority}; segment {segment_id.hex()} refused"
            )
        for _, victim_id, _ in victims:
            _unlink_quietly(self._path(victim_id))
        with db:
            db.executemany("DELETE FROM segments WHERE seq = ?", [(v[0],) for v in victims])
            self._bump(db, "evicted_segments_total", len(victims))
            self._bump(db, "evicted_bytes_total", sum(v[2] for v in victims))

    @staticmethod
    def _eviction_candidates(db: sqlite3.Connection, priority: int) -> Iterator[tuple[int, bytes, int]]:
        cur = db.execute(
            "SELECT seq, segment_id, disk_bytes FROM segments WHERE uploaded_seq IS NULL AND priority <= ? "
            "ORDER BY priority ASC, created_ns ASC, seq ASC",
            (priority,),
        )
        for seq, victim_id, disk_bytes in cur:
            yield int(seq), bytes(victim_id), int(disk_bytes)

    def _write_file(self, final: Path, blob: bytes) -> None:
        """tmp → write → fsync → rename → fsync dir; on any failure nothing of the segment remains."""
        tmp = final.with_name(final.name + TMP_SUFFIX)
        renamed = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(blob)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            renamed = True
            fsync_directory(self._dir)
        except OSError as exc:
            _unlink_quietly(tmp)
            if renamed:
                _unlink_quietly(final)
            if exc.errno in _STORAGE_FULL_ERRNOS:
                raise StorageFullError(f"{self._dir}: no space left writing {final.name}") from None
            raise

    def _recover(self) -> None:
        """Bring index and files back into agreement after whatever crash came before this open."""
        db = self._require_open()
        on_disk: dict[str, Path] = {}
        self._strays = 0
        for path in self._dir.iterdir():
            if path.name.endswith(TMP_SUFFIX):
                _unlink_quietly(path)  # a write that never reached its rename
            elif path.name.endswith(SEGMENT_SUFFIX):
                on_disk[path.name] = path
            else:  # not ours (someone's copy, an editor's backup): it takes disk all the same
                with contextlib.suppress(FileNotFoundError):
                    self._strays += os.stat(path).st_blocks * 512
        known: set[str] = set()
        dead_rows: list[int] = []
        for seq, segment_id, uploaded_seq, disk_bytes in db.execute(
            "SELECT seq, segment_id, uploaded_seq, disk_bytes FROM segments"
        ).fetchall():
            name = bytes(segment_id).hex() + SEGMENT_SUFFIX
            known.add(name)
            found = on_disk.get(name)
            if uploaded_seq is not None:
                if found is not None:
                    _unlink_quietly(found)  # acknowledged, but the crash came before the delete
                continue
            if found is None or found.stat().st_size != disk_bytes:
                # files appear only by rename, whole: one the index does not know the size of was replaced
                # (``replace``) before the index followed, and is indexed afresh from its bytes below
                dead_rows.append(int(seq))
                known.discard(name)
        with db:
            db.executemany("DELETE FROM segments WHERE seq = ?", [(s,) for s in dead_rows])
        for name, path in sorted(on_disk.items()):
            if name not in known:
                self._reindex(db, path)
        fsync_directory(self._dir)

    def _reindex(self, db: sqlite3.Connection, path: Path) -> None:
        """Index a complete file whose row was lost; a file that does not decode is deleted."""
        try:
            data = path.read_bytes()
            envelope = decode_envelope(data, str(path))
            segment = decode_segment(data[envelope.segment_offset :])
            if segment.segment_id.hex() + SEGMENT_SUFFIX != path.name:
                raise CorruptSegmentError(f"{path}: file name does not match segment id")
        except CorruptSegmentError:
            _unlink_quietly(path)
            return
        first, last = segment.time_range() or (0, 0)
        entry = StoredSegment(
            segment_id=segment.segment_id,
            capture_id=envelope.capture_id,
            campaign=envelope.campaign,
            priority=envelope.priority,
            group=_group_label(segment),
            samples=segment.sample_count,
            size_bytes=len(data) - envelope.segment_offset,
            first_ns=first,
            last_ns=last,
            created_ns=envelope.created_ns,
            privacy=envelope.privacy,
        )
        with db:
            self._insert_row(db, entry, len(data), _ids_text(segment))


def _ids_text(segment: Segment) -> str:
    """Signal ids of a segment as the index stores them (``"1,5,9"``), for inventory and queries."""
    return ",".join(str(int(k)) for k in sorted(k for g in segment.groups() for k in g.columns))


def _group_label(segment: Segment) -> str:
    """The index's ``grp``: the group name, or every group's name on its own line (format 4 segments).

    Why not a second table: the index stays one row per segment (what eviction and upload work on);
    a query by group pre-selects rows holding a newline as well and then filters the decoded groups.
    """
    return "\n".join(g.group for g in segment.groups())


def _row_to_entry(row: tuple[Any, ...]) -> StoredSegment:
    (segment_id, capture_id, campaign, priority, group, samples, size_bytes, first_ns, last_ns, created,
     privacy) = row  # fmt: skip
    return StoredSegment(
        segment_id=bytes(segment_id),
        capture_id=str(capture_id),
        campaign=str(campaign),
        priority=int(priority),
        group=str(group),
        samples=int(samples),
        size_bytes=int(size_bytes),
        first_ns=int(first_ns),
        last_ns=int(last_ns),
        created_ns=int(created),
        privacy=str(privacy),
    )
