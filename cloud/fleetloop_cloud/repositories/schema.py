"""The metadata schema, created on open and versioned so a newer database is refused, not misread.

Version 2 replaced the devices' ``online`` flag — which nothing reset when a coordinator
died — by ``session_owner`` and the ``coordinators`` leases: a device is online while a coordinator
whose lease is current holds its session. A version 1 database is upgraded in place on open (the column
is added; the old flag stays, unread). Version 3 added the operator plane: ``api_tokens``
(only the SHA-256 of each secret) and the hash-chained ``audit_log``; an older database gains both
tables, empty, on open. Version 4 added what rollouts need beyond phases and a brake: per
execution its attempt, offer time, retry time, install windows, and the versions before and after; the
rollouts' revision and parent (a roll-back); the signal-gate evaluations; the controller lease with its
fencing token; and each device's reported time zone. An older database gains the columns (with their
defaults) and the tables on open. ``device_telemetry`` (each device's latest heartbeat report) is
added to any database on open without a new version: older code never reads it. Version 5 (this one)
added the devices' ``delta_formats`` (the OTA delta formats a device's inventory says it reads,
comma-separated, preferred first); an older database gains the column, empty for every device (read as
FLDELTA1 only, what agents before the report read), on open. The segments' clock columns (the offset
each upload carried, its round trip, and whether it was applied) are added to any database on open
without a new version, like ``device_telemetry``: older code inserts without them (NULL, ''). So is
``fleet_signals`` (each fleet's catalog: one id per signal path), which older code never reads.
``fleet_retention`` (days kept per fleet) and ``erasures`` (erasure requests per device) are created in
any database on open without a new version: older code never reads them.
"""

from __future__ import annotations

from fleetloop_cloud.repositories.database import Database, Transaction
from fleetloop_shared.errors import ConfigError

#: Version of the schema this code writes; bumped with every incompatible change.
SCHEMA_VERSION = 5

_TABLES = """
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
    session_owner TEXT NOT NULL DEFAULT '',
    last_seen REAL NOT NULL,
    registered_at REAL NOT NULL,
    time_zone TEXT NOT NULL DEFAULT '',
    delta_formats TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS device_telemetry (
    device_id TEXT PRIMARY KEY,
    reported_at REAL NOT NULL,
    telemetry_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_signals (
    fleet TEXT NOT NULL,
    signal_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    data_type TEXT NOT NULL,
    unit TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (fleet, signal_id),
    UNIQUE (fleet, path)
);
CREATE TABLE IF NOT EXISTS coordinators (
    coordinator_id TEXT PRIMARY KEY,
    beat_at REAL NOT NULL
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
    clock_offset_ns INTEGER,
    clock_round_trip_ns INTEGER,
    clock_status TEXT NOT NULL DEFAULT '',
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
    privacy TEXT NOT NULL DEFAULT '',
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
    updated_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    parent_id TEXT NOT NULL DEFAULT '',
    release_name TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    phase INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    delivered INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    changed_at REAL NOT NULL DEFAULT 0,
    offered_at REAL,
    retry_at REAL NOT NULL DEFAULT 0,
    windows_json TEXT NOT NULL DEFAULT '[]',
    hold INTEGER NOT NULL DEFAULT 0,
    from_version TEXT NOT NULL DEFAULT '',
    running_version TEXT NOT NULL DEFAULT '',
    removed_at REAL NOT NULL DEFAULT 0,
    removed_by TEXT NOT NULL DEFAULT '',
    removed_reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_devices_by_device ON rollout_devices (device_id);
CREATE TABLE IF NOT EXISTS rollout_gates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    at REAL NOT NULL,
    phase INTEGER NOT NULL,
    gate TEXT NOT NULL,
    decision TEXT NOT NULL,
    statistic REAL,
    p_value REAL,
    effect REAL,
    reason TEXT NOT NULL,
    inputs_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_gates_by_rollout ON rollout_gates (rollout_id, phase, gate, seq);
CREATE TABLE IF NOT EXISTS controller_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_audit_by_rollout ON rollout_audit (rollout_id, seq);
CREATE TABLE IF NOT EXISTS api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    transport TEXT NOT NULL,
    address TEXT NOT NULL,
    request_id TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before_value TEXT NOT NULL,
    after_value TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_by_time ON audit_log (at);
CREATE TABLE IF NOT EXISTS fleet_retention (
    fleet TEXT PRIMARY KEY,
    days INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS erasures (
    device_id TEXT PRIMARY KEY,
    requested_at REAL NOT NULL,
    requested_by TEXT NOT NULL,
    done_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
"""


def ensure_schema(db: Database) -> None:
    """Create what is missing, upgrade an older version, refuse a newer one (ConfigError)."""
    with db.write() as tx:
        for statement in _TABLES.split(";"):
            if statement.strip():
                tx.execute(db.ddl(statement))
        _add_clock_columns(tx, db)
        row = tx.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"metadata database {db.where} has schema version {version}; "
                f"this fleetloop understands up to {SCHEMA_VERSION}"
            )
        if version < 2:
            _upgrade_to_2(tx)
        if version < 4:
            _add_rollout_controller_columns(tx, db)
        if version < 5:
            _add_delta_formats_column(tx, db)
        _add_capture_privacy_column(tx, db)
        _add_removal_columns(tx, db)
        tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _upgrade_to_2(tx: Transaction) -> None:
    """Version 1 devices carry ``online`` and no ``session_owner``: add the owner, leave the flag."""
    tx.execute("ALTER TABLE devices ADD COLUMN session_owner TEXT NOT NULL DEFAULT ''")


#: The rollout controller's migration (schema version 4): columns it added to tables that existed before
#: it; its new tables (``rollout_gates``, ``controller_lease``) are created above with the rest.
_ROLLOUT_CONTROLLER_COLUMNS = (
    ("devices", "time_zone TEXT NOT NULL DEFAULT ''"),
    ("rollouts", "revision INTEGER NOT NULL DEFAULT 0"),
    ("rollouts", "parent_id TEXT NOT NULL DEFAULT ''"),
    ("rollouts", "release_name TEXT NOT NULL DEFAULT ''"),
    ("rollout_devices", "attempt INTEGER NOT NULL DEFAULT 0"),
    ("rollout_devices", "changed_at REAL NOT NULL DEFAULT 0"),
    ("rollout_devices", "offered_at REAL"),
    ("rollout_devices", "retry_at REAL NOT NULL DEFAULT 0"),
    ("rollout_devices", "windows_json TEXT NOT NULL DEFAULT '[]'"),
    ("rollout_devices", "hold INTEGER NOT NULL DEFAULT 0"),
    ("rollout_devices", "from_version TEXT NOT NULL DEFAULT ''"),
    ("rollout_devices", "running_version TEXT NOT NULL DEFAULT ''"),
)


def _add_rollout_controller_columns(tx: Transaction, db: Database) -> None:
    """Version 3 rollouts carry no executions' details: add the columns, with their defaults. Each is
    added only if missing, so the step can run at any version number."""
    for table, column in _ROLLOUT_CONTROLLER_COLUMNS:
        if column.split()[0] not in _columns(tx, db, table):  # tables made since came with it
            tx.execute(db.ddl(f"ALTER TABLE {table} ADD COLUMN {column}"))


def _columns(tx: Transaction, db: Database, table: str) -> set[str]:
    if db.postgres:
        rows = tx.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,)
        ).fetchall()
        return {str(r[0]) for r in rows}
    return {str(r[1]) for r in tx.execute(f"PRAGMA table_info({table})").fetchall()}


def _add_delta_formats_column(tx: Transaction, db: Database) -> None:
    """Devices before version 5 never reported delta formats: add the column, empty for all of them."""
    if "delta_formats" not in _columns(tx, db, "devices"):
        tx.execute(db.ddl("ALTER TABLE devices ADD COLUMN delta_formats TEXT NOT NULL DEFAULT ''"))


def _add_capture_privacy_column(tx: Transaction, db: Database) -> None:
    """Captures recorded before privacy policies carry none: add the column, empty for all of them. Run at
    any version (it checks), so it needs no version number of its own."""
    if "privacy" not in _columns(tx, db, "captures"):
        tx.execute(db.ddl("ALTER TABLE captures ADD COLUMN privacy TEXT NOT NULL DEFAULT ''"))


#: A release manager's removal of one device from a rollout (``rollout remove``): when, by whom, why.
_REMOVAL_COLUMNS = (
    "removed_at REAL NOT NULL DEFAULT 0",
    "removed_by TEXT NOT NULL DEFAULT ''",
    "removed_reason TEXT NOT NULL DEFAULT ''",
)


def _add_removal_columns(tx: Transaction, db: Database) -> None:
    """Executions recorded before devices could be removed from a rollout were none of them removed: add
    the columns (0, ''). Checked at any version, like the capture privacy column."""
    have = _columns(tx, db, "rollout_devices")
    for column in _REMOVAL_COLUMNS:
        if column.split()[0] not in have:
            tx.execute(db.ddl(f"ALTER TABLE rollout_devices ADD COLUMN {column}"))


#: The clock offset each upload carried (``uploads.clock_check``); added on open to a ledger made before.
_CLOCK_COLUMNS = (
    "clock_offset_ns INTEGER",
    "clock_round_trip_ns INTEGER",
    "clock_status TEXT NOT NULL DEFAULT ''",
)


def _add_clock_columns(tx: Transaction, db: Database) -> None:
    """Segments recorded before the clock exchange have no offset: add the columns (NULL, '')."""
    have = _columns(tx, db, "segments")
    for column in _CLOCK_COLUMNS:
        if column.split()[0] not in have:
            tx.execute(db.ddl(f"ALTER TABLE segments ADD COLUMN {column}"))
