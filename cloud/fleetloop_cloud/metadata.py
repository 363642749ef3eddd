"""The coordinator's metadata: devices, ingested segments and captures, campaigns, releases, rollouts.

Embedded default is one SQLite file (stdlib ``sqlite3``, WAL so readers never block the writer); with a
``postgresql://`` URL (``fleetloop cloud serve --db``) the same statements run on PostgreSQL (psycopg), so
several coordinators can share one metadata database. One code path: the SQL below is written in the
dialect both understand (``ON CONFLICT``, ``CASE`` instead of two-argument ``MIN``), and :class:`_Conn`
only swaps placeholders and column types. This module is the adapter for both drivers: their errors
become :mod:`fleetloop_shared.errors`. One connection guarded by one lock keeps it thread-safe: the gRPC
ingest threads, the REST API and the rollout controller all share one :class:`MetadataStore`. The schema
is created on open and carries a version so a newer database is refused instead of being misread.

Write transactions are serialized: SQLite by ``BEGIN IMMEDIATE``, PostgreSQL by a transaction-scoped
advisory lock taken first in every write transaction — the same semantics across coordinator processes,
which is what the read-modify-write steps here (campaign versions, rollout transitions) rely on.

Every write is one transaction. The rollout controller relies on that: a rollout transition, the device
states it changes and its audit row are committed together, *before* any job is published, so a restarted
coordinator resumes exactly where the last one stopped.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import (
    ConfigError,
    MalformedMessageError,
    NotFoundError,
    StateError,
    UnavailableError,
)

#: Version of the schema this code writes; bumped with every incompatible change.
SCHEMA_VERSION = 1
#: Audit rows returned by :meth:`MetadataStore.audit` at most (newest kept); the table itself is append-only.
AUDIT_READ_LIMIT = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    catalog_json TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    data_origin TEXT NOT NULL,
    hardware_id TEXT NOT NULL DEFAULT '',
    firmware_version TEXT NOT NULL DEFAULT '',
    firmware_sha256 TEXT NOT NULL DEFAULT '',
    active_slot TEXT NOT NULL DEFAULT '',
    campaigns_version INTEGER NOT NULL DEFAULT 0,
    campaigns_running_json TEXT NOT NULL DEFAULT '[]',
    campaigns_refused_json TEXT NOT NULL DEFAULT '{}',
    captures_total INTEGER NOT NULL DEFAULT 0,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL,
    registered_at REAL NOT NULL,
    delta_formats TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS segments (
    device_id TEXT NOT NULL,
    segment_id BLOB NOT NULL,
    capture_id TEXT NOT NULL,
    campaign TEXT NOT NULL,
    priority INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (device_id, segment_id)
);
CREATE TABLE IF NOT EXISTS captures (
    device_id TEXT NOT NULL,
    capture_id TEXT NOT NULL,
    campaign TEXT NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    segments INTEGER NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    PRIMARY KEY (device_id, capture_id)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS campaigns (
    name TEXT PRIMARY KEY,
    campaign_version INTEGER NOT NULL,
    document TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    hardware_id TEXT NOT NULL,
    manifest BLOB NOT NULL,
    signature BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, hardware_id, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    release_version TEXT NOT NULL,
    policy_json TEXT NOT NULL,
    state TEXT NOT NULL,
    phase INTEGER NOT NULL,
    phase_started_at REAL NOT NULL,
    reason TEXT NOT NULL,
    accepted_failures_json TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    phase INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    delivered INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS rollout_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_audit_by_rollout ON rollout_audit (rollout_id, seq);
"""


@dataclass(frozen=True)
class DeviceRecord:
    """What the coordinator knows of one device: its hello, its inventory and its campaign shadow."""

    device_id: str
    fleet: str
    labels: dict[str, str]
    catalog: list[dict[str, Any]]
    agent_version: str
    data_origin: str
    hardware_id: str
    firmware_version: str
    firmware_sha256: str
    active_slot: str
    campaigns_version: int
    campaigns_running: list[str]
    campaigns_refused: dict[str, str]
    captures_total: int
    online: bool
    last_seen: float
    registered_at: float
    #: OTA delta formats the device applies, preferred first, as its inventory says ('' before it says).
    delta_formats: tuple[str, ...] = ()

    def selector_labels(self) -> dict[str, str]:
        """Labels a selector is matched against: the device's own labels plus ``fleet`` and ``hardware_id``.

        The implicit ones let an operator write ``fleet=taxi`` without every device repeating its fleet
        as a label; explicit labels of the same key win.
        """
        implicit = {"fleet": self.fleet}
        if self.hardware_id:
            implicit["hardware_id"] = self.hardware_id
        return implicit | self.labels


@dataclass(frozen=True)
class CaptureRecord:
    """One capture as assembled from its uploaded segments (a capture may span several segments)."""

    capture_id: str
    device_id: str
    campaign: str
    first_ns: int
    last_ns: int
    samples: int
    segments: int
    first_received: float
    last_received: float


@dataclass(frozen=True)
class ReleaseRecord:
    """A signed release as registered by the artifact store (manifest bytes are exactly what was signed)."""

    name: str
    version: str
    hardware_id: str
    manifest: bytes
    signature: bytes
    created_at: float


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout's persisted state; ``policy`` is the policy as a plain dict (``policy_to_dict``)."""

    rollout_id: str
    release_version: str
    policy: dict[str, Any]
    state: str
    phase: int
    phase_started_at: float
    reason: str
    accepted_failures: frozenset[str]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RolloutDeviceRecord:
    """One device's place in a rollout: its phase, its state and whether the job reached it."""

    rollout_id: str
    device_id: str
    phase: int
    state: str
    reason: str
    delivered: bool
    updated_at: float


@dataclass(frozen=True)
class AuditRecord:
    """One audit row: every rollout transition and every device state change leaves one."""

    seq: int
    rollout_id: str
    at: float
    event: str
    detail: str


@dataclass(frozen=True)
class DeviceChange:
    """A change to one device of a rollout, applied in the same transaction as its rollout update.

    ``state`` None leaves the state as it is (e.g. only ``delivered`` changes).
    """

    state: str | None = None
    reason: str | None = None
    delivered: bool | None = None
    #: Apply only while the device is still in this state (an offer is for a PENDING device; another
    #: coordinator may have moved it since the caller looked).
    only_from: str | None = None


@dataclass(frozen=True)
class RolloutUpdate:
    """Everything one controller step persists at once: rollout fields, device changes, audit rows."""

    state: str | None = None
    phase: int | None = None
    phase_started_at: float | None = None
    reason: str | None = None
    accepted_failures: frozenset[str] | None = None
    devices: Mapping[str, DeviceChange] = field(default_factory=dict)
    audit: Sequence[tuple[str, str]] = ()
    #: Optimistic concurrency: apply only if the rollout still has this (state, phase). Coordinators
    #: sharing the database decide from what they read; a decision made from a state an operator (or
    #: another coordinator) has changed since is dropped, not written over the newer state.
    expect: tuple[str, int] | None = None


#: Key of the PostgreSQL advisory lock that serializes metadata write transactions across coordinators.
_PG_WRITE_LOCK = 0x666C6F6F70  # "floop"
_PG_TYPES = (
    (re.compile(r"INTEGER PRIMARY KEY AUTOINCREMENT"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def _driver_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.Error,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _integrity_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:  # PostgreSQL support is optional; SQLite needs nothing
        return (sqlite3.IntegrityError,)
    return (sqlite3.IntegrityError, psycopg.errors.IntegrityError)


_INTEGRITY_ERRORS = _integrity_errors()


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


class _Cursor:
    """What the statements here use of a DB-API cursor, for both drivers."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())


class _Conn:
    """One connection, SQLite or PostgreSQL; statements are written once with ``?`` placeholders."""

    def __init__(self, raw: Any, postgres: bool) -> None:
        self.raw = raw
        self.postgres = postgres

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        if self.postgres:
            return _Cursor(self.raw.execute(self._sql(sql), tuple(params)))
        return _Cursor(self.raw.execute(sql, tuple(params)))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.postgres:
            with self.raw.cursor() as cur:
                cur.executemany(self._sql(sql), [tuple(r) for r in rows])
        else:
            self.raw.executemany(sql, [tuple(r) for r in rows])

    def ddl(self, statement: str) -> str:
        if not self.postgres:
            return statement
        for pattern, replacement in _PG_TYPES:
            statement = pattern.sub(replacement, statement)
        if "CREATE TABLE IF NOT EXISTS releases" in statement:
            # SQLite orders releases of the same time by rowid; PostgreSQL gets an explicit one
            statement = statement.replace(
                "created_at DOUBLE PRECISION NOT NULL,",
                "created_at DOUBLE PRECISION NOT NULL,\n    rowid BIGSERIAL,",
            )
        return statement

    def begin_write(self) -> None:
        if self.postgres:
            self.raw.execute("BEGIN")
            self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))
        else:
            self.raw.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        self.raw.close()


class MetadataStore:
    """Metadata in SQLite (a file path) or PostgreSQL (a ``postgresql://`` URL), with one connection and
    one lock (safe to share between threads)."""

    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        if is_database_url(path):
            url = str(path)
            self._where = _redact(url)
            self._db = self._connect_postgres(url)
            self._path = Path(self._where)
        else:
            self._path = Path(path)
            self._where = str(self._path)
            self._db = self._connect_sqlite(self._path)
        unusable: tuple[type[BaseException], ...] = (sqlite3.DatabaseError, *_driver_errors())
        try:
            self._create_schema()
        except unusable as exc:
            self._db.close()
            raise ConfigError(
                f"metadata database {self._where}: not a usable fleetloop database ({_first_line(exc)})"
            ) from None

    @staticmethod
    def _connect_sqlite(path: Path) -> _Conn:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"metadata database {path}: cannot open: {exc}") from None
        try:
            raw.execute("PRAGMA journal_mode=WAL")
            raw.execute("PRAGMA synchronous=NORMAL")
            raw.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raw.close()
            raise ConfigError(f"metadata database {path}: not a usable fleetloop database ({exc})") from None
        return _Conn(raw, postgres=False)

    @staticmethod
    def _connect_postgres(url: str) -> _Conn:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("--db postgresql://... needs psycopg (pip install 'psycopg[binary]')") from None
        try:
            raw = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise UnavailableError(f"metadata database {_redact(url)}: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise ConfigError(f"metadata database {_redact(url)}: {_first_line(exc)}") from None
        return _Conn(raw, postgres=True)

    def _create_schema(self) -> None:
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(db.ddl(statement))
            self._add_missing_columns(db)
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif int(row[0]) > SCHEMA_VERSION:
                raise ConfigError(
                    f"metadata database {self._where} has schema version {row[0]}; "
                    f"this fleetloop understands up to {SCHEMA_VERSION}"
                )

    @staticmethod
    def _add_missing_columns(db: _Conn) -> None:
        """Columns added after a database was created (``CREATE TABLE IF NOT EXISTS`` keeps old tables)."""
        if db.postgres:
            db.execute("ALTER TABLE devices ADD COLUMN IF NOT EXISTS delta_formats TEXT NOT NULL DEFAULT ''")
            return
        columns = {row[1] for row in db.execute("PRAGMA table_info(devices)").fetchall()}
        if "delta_formats" not in columns:
            db.execute("ALTER TABLE devices ADD COLUMN delta_formats TEXT NOT NULL DEFAULT ''")

    @contextmanager
    def _tx(self) -> Iterator[_Conn]:
        """One write transaction under the lock (and, on PostgreSQL, the cross-process write lock);
        rolled back on any exception."""
        with self._lock:
            self._db.begin_write()
            try:
                yield self._db
            except BaseException:
                self._db.raw.execute("ROLLBACK")
                raise
            self._db.raw.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql, tuple(params)).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ devices

    def upsert_device(
        self,
        device_id: str,
        *,
        fleet: str,
        labels: Mapping[str, str],
        catalog: list[dict[str, Any]],
        agent_version: str,
        data_origin: str,
        now: float,
    ) -> None:
        """Register a device from its hello, or refresh what the hello says (inventory stays)."""
        labels_json = json.dumps(dict(labels), sort_keys=True)
        catalog_json = json.dumps(catalog, sort_keys=True)
        with self._tx() as db:
            db.execute(
                """INSERT INTO devices (device_id, fleet, labels_json, catalog_json, agent_version,
                                        data_origin, online, last_seen, registered_at)
                   VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)
                   ON CONFLICT (device_id) DO UPDATE SET
                     fleet = excluded.fleet, labels_json = excluded.labels_json,
                     catalog_json = excluded.catalog_json, agent_version = excluded.agent_version,
                     data_origin = excluded.data_origin, online = 1, last_seen = excluded.last_seen""",
                (device_id, fleet, labels_json, catalog_json, agent_version, data_origin, now, now),
            )

    def update_inventory(
        self,
        device_id: str,
        *,
        hardware_id: str,
        firmware_version: str,
        firmware_sha256: str,
        active_slot: str,
        campaigns_version: int,
        now: float,
        delta_formats: Sequence[str] = (),
    ) -> None:
        """Record what the device reports it runs; NotFoundError for a device that never said hello."""
        with self._tx() as db:
            cur = db.execute(
                """UPDATE devices SET hardware_id = ?, firmware_version = ?, firmware_sha256 = ?,
                          active_slot = ?, campaigns_version = ?, last_seen = ?, delta_formats = ?
                   WHERE device_id = ?""",
                (
                    hardware_id,
                    firmware_version,
                    firmware_sha256,
                    active_slot,
                    campaigns_version,
                    now,
                    ",".join(delta_formats),
                    device_id,
                ),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"device {device_id!r} is not registered")

    def touch_device(self, device_id: str, now: float, *, online: bool | None = None) -> None:
        """Heartbeat: refresh last_seen (and online when given). An unknown device is ignored: a
        heartbeat carries nothing worth registering."""
        with self._tx() as db:
            if online is None:
                db.execute("UPDATE devices SET last_seen = ? WHERE device_id = ?", (now, device_id))
            else:
                db.execute(
                    "UPDATE devices SET last_seen = ?, online = ? WHERE device_id = ?",
                    (now, int(online), device_id),
                )

    _DEVICE_COLUMNS = (
        "device_id, fleet, labels_json, catalog_json, agent_version, data_origin, hardware_id, "
        "firmware_version, firmware_sha256, active_slot, campaigns_version, campaigns_running_json, "
        "campaigns_refused_json, captures_total, online, last_seen, registered_at, delta_formats"
    )

    @staticmethod
    def _device_from_row(row: tuple[Any, ...]) -> DeviceRecord:
        return DeviceRecord(
            device_id=row[0],
            fleet=row[1],
            labels=dict(json.loads(row[2])),
            catalog=list(json.loads(row[3])),
            agent_version=row[4],
            data_origin=row[5],
            hardware_id=row[6],
            firmware_version=row[7],
            firmware_sha256=row[8],
            active_slot=row[9],
            campaigns_version=int(row[10]),
            campaigns_running=list(json.loads(row[11])),
            campaigns_refused=dict(json.loads(row[12])),
            captures_total=int(row[13]),
            online=bool(row[14]),
            last_seen=float(row[15]),
            registered_at=float(row[16]),
            delta_formats=tuple(f for f in str(row[17]).split(",") if f),
        )

    def device(self, device_id: str) -> DeviceRecord | None:
        rows = self._read(f"SELECT {self._DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
        return self._device_from_row(rows[0]) if rows else None

    def devices(self) -> list[DeviceRecord]:
        rows = self._read(f"SELECT {self._DEVICE_COLUMNS} FROM devices ORDER BY device_id")
        return [self._device_from_row(r) for r in rows]

    def device_catalog(self, device_id: str) -> Catalog:
        """The catalog from the device's hello, used to name the signal ids of its segments."""
        rows = self._read("SELECT catalog_json FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            raise NotFoundError(f"device {device_id!r} is not registered")
        try:
            return Catalog.from_records(json.loads(rows[0][0]))
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedMessageError(f"device {device_id!r}: stored catalog is invalid: {exc}") from None

    # ------------------------------------------------------------------ segments / captures

    def has_segment(self, device_id: str, segment_id: bytes) -> bool:
        rows = self._read(
            "SELECT 1 FROM segments WHERE device_id = ? AND segment_id = ?", (device_id, bytes(segment_id))
        )
        return bool(rows)

    def record_segment(
        self,
        device_id: str,
        segment_id: bytes,
        *,
        capture_id: str,
        campaign: str,
        priority: int,
        samples: int,
        first_ns: int,
        last_ns: int,
        now: float,
    ) -> bool:
        """Index an ingested segment and fold it into its capture; False (and no change) for a repeat.

        The (device, segment id) key is what makes a retried upload harmless.
        """
        with self._tx() as db:
            cur = db.execute(
                """INSERT INTO segments (device_id, segment_id, capture_id, campaign, priority,
                                         samples, first_ns, last_ns, received_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (device_id, segment_id) DO NOTHING""",
                (
                    device_id,
                    bytes(segment_id),
                    capture_id,
                    campaign,
                    priority,
                    samples,
                    first_ns,
                    last_ns,
                    now,
                ),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                """INSERT INTO captures (device_id, capture_id, campaign, first_ns, last_ns, samples,
                                         segments, first_received, last_received)
                   VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)
                   ON CONFLICT (device_id, capture_id) DO UPDATE SET
                     first_ns = CASE WHEN excluded.first_ns < captures.first_ns
                                     THEN excluded.first_ns ELSE captures.first_ns END,
                     last_ns = CASE WHEN excluded.last_ns > captures.last_ns
                                    THEN excluded.last_ns ELSE captures.last_ns END,
                     samples = captures.samples + excluded.samples,
                     segments = captures.segments + 1,
                     last_received = excluded.last_received""",
                (device_id, capture_id, campaign, first_ns, last_ns, samples, now, now),
            )
            return True

    def captures(self) -> list[CaptureRecord]:
        rows = self._read(
            """SELECT capture_id, device_id, campaign, first_ns, last_ns, samples, segments, first_received,
                      last_received FROM captures ORDER BY first_received, device_id, capture_id"""
        )
        return [
            CaptureRecord(
                r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), int(r[6]), float(r[7]), float(r[8])
            )
            for r in rows
        ]

    def ingest_totals(self) -> tuple[int, int, int]:
        """(segments, samples, captures) ingested so far."""
        rows = self._read(
            "SELECT COUNT(*), COALESCE(SUM(samples), 0), (SELECT COUNT(*) FROM captures) FROM segments"
        )
        seg, samples, caps = rows[0]
        return int(seg), int(samples), int(caps)

    # ------------------------------------------------------------------ campaigns

    @staticmethod
    def _bump_campaigns_version(db: _Conn) -> int:
        db.execute(
            """INSERT INTO settings (key, value) VALUES ('campaigns_version', 1)
               ON CONFLICT (key) DO UPDATE SET value = settings.value + 1"""
        )
        return int(db.execute("SELECT value FROM settings WHERE key = 'campaigns_version'").fetchone()[0])

    def put_campaign(self, name: str, document: str, now: float) -> int:
        """Store a campaign document; returns the new global campaigns version.

        Re-applying an identical document changes nothing (and returns the current version), so
        ``rules apply`` can be re-run without making every device reload.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT campaign_version, document FROM campaigns WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[1] == document:
                cur = db.execute("SELECT value FROM settings WHERE key = 'campaigns_version'").fetchone()
                return int(cur[0]) if cur else 0
            revision = 1 if row is None else int(row[0]) + 1
            db.execute(
                """INSERT INTO campaigns (name, campaign_version, document, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET campaign_version = excluded.campaign_version,
                     document = excluded.document, updated_at = excluded.updated_at""",
                (name, revision, document, now),
            )
            return self._bump_campaigns_version(db)

    def delete_campaign(self, name: str, now: float) -> int:
        """Remove a campaign from the desired state; NotFoundError if there is none by that name."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM campaigns WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFoundError(f"campaign {name!r} does not exist")
            return self._bump_campaigns_version(db)

    def campaigns(self) -> tuple[int, list[tuple[str, int, str]]]:
        """(global version, [(name, campaign revision, document)]) — the desired state devices converge to."""
        with self._lock:
            cur = self._db.execute("SELECT value FROM settings WHERE key = 'campaigns_version'").fetchone()
            rows = self._db.execute(
                "SELECT name, campaign_version, document FROM campaigns ORDER BY name"
            ).fetchall()
        return (int(cur[0]) if cur else 0), [(r[0], int(r[1]), r[2]) for r in rows]

    def set_device_campaign_status(
        self,
        device_id: str,
        version: int,
        running: list[str],
        refused: Mapping[str, str],
        captures_total: int,
    ) -> None:
        """The device's report of what it runs (its shadow's "reported" half)."""
        with self._tx() as db:
            cur = db.execute(
                """UPDATE devices SET campaigns_version = ?, campaigns_running_json = ?,
                          campaigns_refused_json = ?, captures_total = ? WHERE device_id = ?""",
                (
                    version,
                    json.dumps(list(running)),
                    json.dumps(dict(refused), sort_keys=True),
                    captures_total,
                    device_id,
                ),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"device {device_id!r} is not registered")

    # ------------------------------------------------------------------ releases

    def put_release(
        self, name: str, version: str, hardware_id: str, manifest: bytes, signature: bytes, now: float
    ) -> None:
        """Register a signed release; StateError when this name/hardware/version already exists."""
        with self._tx() as db:
            try:
                db.execute(
                    """INSERT INTO releases (name, version, hardware_id, manifest, signature, created_at)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (name, version, hardware_id, bytes(manifest), bytes(signature), now),
                )
            except _INTEGRITY_ERRORS:
                raise StateError(
                    f"release {name} {version} for hardware {hardware_id} already exists"
                ) from None

    @staticmethod
    def _release_from_row(r: tuple[Any, ...]) -> ReleaseRecord:
        return ReleaseRecord(r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), float(r[5]))

    def release(self, version: str, name: str = "") -> ReleaseRecord | None:
        """The release with this version (and name, when given): the most recently registered one if
        several hardware ids share it."""
        rows = self._read(
            """SELECT name, version, hardware_id, manifest, signature, created_at FROM releases
               WHERE version = ? AND (? = '' OR name = ?) ORDER BY created_at DESC, rowid DESC LIMIT 1""",
            (version, name, name),
        )
        return self._release_from_row(rows[0]) if rows else None

    def release_names(self, version: str) -> list[str]:
        """Names of the releases registered with this version (a firmware and a model pack may share one)."""
        rows = self._read("SELECT DISTINCT name FROM releases WHERE version = ? ORDER BY name", (version,))
        return [str(r[0]) for r in rows]

    def releases(self) -> list[ReleaseRecord]:
        rows = self._read(
            """SELECT name, version, hardware_id, manifest, signature, created_at FROM releases
               ORDER BY created_at, rowid"""
        )
        return [self._release_from_row(r) for r in rows]

    # ------------------------------------------------------------------ rollouts

    def create_rollout(
        self,
        rollout_id: str,
        *,
        release_version: str,
        policy: Mapping[str, Any],
        state: str,
        phase: int,
        reason: str,
        devices: Mapping[str, int],
        device_state: str,
        now: float,
        audit: Sequence[tuple[str, str]] = (),
        initial: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """Persist a new rollout with its device snapshot (device → phase) and its first audit rows.

        ``initial`` overrides ``device_state`` for some devices as (state, reason), e.g. devices that
        already run the release.
        """
        overrides = dict(initial or {})
        with self._tx() as db:
            try:
                db.execute(
                    """INSERT INTO rollouts (rollout_id, release_version, policy_json, state, phase,
                                             phase_started_at, reason, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        rollout_id,
                        release_version,
                        json.dumps(dict(policy), sort_keys=True),
                        state,
                        phase,
                        now,
                        reason,
                        now,
                        now,
                    ),
                )
            except _INTEGRITY_ERRORS:
                raise StateError(f"rollout {rollout_id} already exists") from None
            db.executemany(
                """INSERT INTO rollout_devices (rollout_id, device_id, phase, state, reason, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                [
                    (rollout_id, d, p, *overrides.get(d, (device_state, "")), now)
                    for d, p in sorted(devices.items())
                ],
            )
            for event, detail in audit:
                db.execute(
                    "INSERT INTO rollout_audit (rollout_id, at, event, detail) VALUES (?, ?, ?, ?)",
                    (rollout_id, now, event, detail),
                )

    _ROLLOUT_COLUMNS = (
        "rollout_id, release_version, policy_json, state, phase, phase_started_at, reason, "
        "accepted_failures_json, created_at, updated_at"
    )

    @staticmethod
    def _rollout_from_row(r: tuple[Any, ...]) -> RolloutRecord:
        return RolloutRecord(
            rollout_id=r[0],
            release_version=r[1],
            policy=dict(json.loads(r[2])),
            state=r[3],
            phase=int(r[4]),
            phase_started_at=float(r[5]),
            reason=r[6],
            accepted_failures=frozenset(json.loads(r[7])),
            created_at=float(r[8]),
            updated_at=float(r[9]),
        )

    def rollout(self, rollout_id: str) -> RolloutRecord | None:
        rows = self._read(f"SELECT {self._ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return self._rollout_from_row(rows[0]) if rows else None

    def rollouts(self, *, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        """All rollouts, oldest first; only those in ``states`` when given."""
        rows = self._read(f"SELECT {self._ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at, rollout_id")
        records = [self._rollout_from_row(r) for r in rows]
        return records if states is None else [r for r in records if r.state in states]

    def update_rollout(self, rollout_id: str, update: RolloutUpdate, now: float) -> bool:
        """Apply one controller step atomically: rollout fields, device changes and audit rows.

        A device state change writes its own audit row (``device``), so the audit trail shows every
        transition even when the caller only lists the rollout-level ones. False (nothing written) when
        ``update.expect`` no longer holds.
        """
        with self._tx() as db:
            if update.expect is not None:
                row = db.execute(
                    "SELECT state, phase FROM rollouts WHERE rollout_id = ?", (rollout_id,)
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"rollout {rollout_id!r} does not exist")
                if (str(row[0]), int(row[1])) != update.expect:
                    return False
            sets: list[str] = ["updated_at = ?"]
            params: list[Any] = [now]
            for column, value in (
                ("state", update.state),
                ("phase", update.phase),
                ("phase_started_at", update.phase_started_at),
                ("reason", update.reason),
            ):
                if value is not None:
                    sets.append(f"{column} = ?")
                    params.append(value)
            if update.accepted_failures is not None:
                sets.append("accepted_failures_json = ?")
                params.append(json.dumps(sorted(update.accepted_failures)))
            cur = db.execute(
                f"UPDATE rollouts SET {', '.join(sets)} WHERE rollout_id = ?", (*params, rollout_id)
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"rollout {rollout_id!r} does not exist")
            for event, detail in update.audit:
                db.execute(
                    "INSERT INTO rollout_audit (rollout_id, at, event, detail) VALUES (?, ?, ?, ?)",
                    (rollout_id, now, event, detail),
                )
            for device_id, change in sorted(update.devices.items()):
                self._apply_device_change(db, rollout_id, device_id, change, now)
        return True

    @staticmethod
    def _apply_device_change(
        db: _Conn, rollout_id: str, device_id: str, change: DeviceChange, now: float
    ) -> None:
        row = db.execute(
            "SELECT state FROM rollout_devices WHERE rollout_id = ? AND device_id = ?",
            (rollout_id, device_id),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"device {device_id!r} is not part of rollout {rollout_id!r}")
        if change.only_from is not None and row[0] != change.only_from:
            return
        sets: list[str] = ["updated_at = ?"]
        params: list[Any] = [now]
        if change.state is not None:
            sets.append("state = ?")
            params.append(change.state)
        if change.reason is not None:
            sets.append("reason = ?")
            params.append(change.reason)
        if change.delivered is not None:
            sets.append("delivered = ?")
            params.append(int(change.delivered))
        db.execute(
            f"UPDATE rollout_devices SET {', '.join(sets)} WHERE rollout_id = ? AND device_id = ?",
            (*params, rollout_id, device_id),
        )
        if change.state is not None and change.state != row[0]:
            detail = f"{device_id}: {row[0]} -> {change.state}"
            if change.reason:
                detail += f" ({change.reason})"
            db.execute(
                "INSERT INTO rollout_audit (rollout_id, at, event, detail) VALUES (?, ?, 'device', ?)",
                (rollout_id, now, detail),
            )

    def set_rollout_device(self, rollout_id: str, device_id: str, change: DeviceChange, now: float) -> None:
        """Change one device of a rollout (with its audit row), leaving the rollout itself as it is."""
        self.update_rollout(rollout_id, RolloutUpdate(devices={device_id: change}), now)

    def rollout_devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        rows = self._read(
            """SELECT rollout_id, device_id, phase, state, reason, delivered, updated_at FROM rollout_devices
               WHERE rollout_id = ? ORDER BY phase, device_id""",
            (rollout_id,),
        )
        return [RolloutDeviceRecord(r[0], r[1], int(r[2]), r[3], r[4], bool(r[5]), float(r[6])) for r in rows]

    def device_rollouts(self, device_id: str) -> list[RolloutDeviceRecord]:
        """Every rollout entry of one device (for the polling path and ``devices describe``)."""
        rows = self._read(
            """SELECT rollout_id, device_id, phase, state, reason, delivered, updated_at FROM rollout_devices
               WHERE device_id = ? ORDER BY updated_at, rollout_id""",
            (device_id,),
        )
        return [RolloutDeviceRecord(r[0], r[1], int(r[2]), r[3], r[4], bool(r[5]), float(r[6])) for r in rows]

    def audit(self, rollout_id: str) -> list[AuditRecord]:
        """The rollout's audit trail, oldest first (the newest AUDIT_READ_LIMIT rows)."""
        rows = self._read(
            """SELECT seq, rollout_id, at, event, detail FROM (
                   SELECT * FROM rollout_audit WHERE rollout_id = ? ORDER BY seq DESC LIMIT ?
               ) AS recent ORDER BY seq""",
            (rollout_id, AUDIT_READ_LIMIT),
        )
        return [AuditRecord(int(r[0]), r[1], float(r[2]), r[3], r[4]) for r in rows]
