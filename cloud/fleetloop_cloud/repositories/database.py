"""The one connection the SQL repositories share: SQLite (stdlib ``sqlite3``) or PostgreSQL (psycopg).

Embedded default is one SQLite file (WAL, so readers never block the writer); with a ``postgresql://``
URL (``fleetloop cloud serve --db``) the same statements run on PostgreSQL, so several coordinators can
share one metadata database. One code path: statements are written once with ``?`` placeholders in the
dialect both understand (``ON CONFLICT``, ``CASE`` instead of two-argument ``MIN``); this module only
swaps placeholders and column types. It is the adapter for both drivers — the only module importing
them — and maps their errors to :mod:`fleetloop_shared.errors`: a database that cannot be opened or
read is a ConfigError, one that cannot be reached (or is busy past the timeout) an UnavailableError.

One connection guarded by one lock keeps it thread-safe: gRPC ingest threads, the REST API and the
rollout controller all share one :class:`Database`. Write transactions are serialized: SQLite by
``BEGIN IMMEDIATE``, PostgreSQL by a transaction-scoped advisory lock taken first in every write
transaction — the same semantics across coordinator processes, which the read-modify-write steps of the
repositories (campaign versions, rollout transitions) rely on.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleetloop_shared.errors import ConfigError, UnavailableError

#: Key of the PostgreSQL advisory lock that serializes metadata write transactions across coordinators.
_PG_WRITE_LOCK = 0x666C6F6F70  # "floop"
_PG_TYPES = (
    (re.compile(r"INTEGER PRIMARY KEY AUTOINCREMENT"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)
#: Seconds SQLite waits for another writer's lock before the statement fails (UnavailableError).
SQLITE_BUSY_TIMEOUT_S = 30.0


def _driver() -> Any:
    try:
        import psycopg
    except ImportError:  # PostgreSQL support is optional; SQLite needs nothing
        return None
    return psycopg


def _unusable_errors() -> tuple[type[BaseException], ...]:
    psycopg = _driver()
    return (sqlite3.DatabaseError,) if psycopg is None else (sqlite3.DatabaseError, psycopg.Error)


def _unreachable(exc: BaseException) -> bool:
    """A lost PostgreSQL connection, or SQLite busy past its timeout: worth retrying later."""
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    psycopg = _driver()
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


class Cursor:
    """What the repositories use of a DB-API cursor, for both drivers."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._cur.fetchall()]


class Transaction:
    """The statements of one write transaction; ``?`` placeholders in both dialects."""

    def __init__(self, raw: Any, postgres: bool) -> None:
        self._raw = raw
        self._postgres = postgres

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return Cursor(self._raw.execute(self._sql(sql), tuple(params)))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self._postgres:
            with self._raw.cursor() as cur:
                cur.executemany(self._sql(sql), [tuple(r) for r in rows])
        else:
            self._raw.executemany(sql, [tuple(r) for r in rows])


class Database:
    """One SQLite file (a path) or PostgreSQL database (a ``postgresql://`` URL), one connection, one
    lock; safe to share between threads."""

    def __init__(self, raw: Any, *, postgres: bool, where: str) -> None:
        self._raw = raw
        self.postgres = postgres
        #: Where the database is, for messages (a path, or the URL without its password).
        self.where = where
        self._lock = threading.Lock()
        self._tx = Transaction(raw, postgres)

    @classmethod
    def open(cls, location: Path | str) -> Database:
        if is_database_url(location):
            return cls._open_postgres(str(location))
        return cls._open_sqlite(Path(location))

    @classmethod
    def _open_sqlite(cls, path: Path) -> Database:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"metadata database {path}: cannot open: {exc}") from None
        try:
            raw.execute("PRAGMA journal_mode=WAL")
            raw.execute("PRAGMA synchronous=NORMAL")
            raw.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raw.close()
            raise ConfigError(f"metadata database {path}: not a usable fleetloop database ({exc})") from None
        return cls(raw, postgres=False, where=str(path))

    @classmethod
    def _open_postgres(cls, url: str) -> Database:
        psycopg = _driver()
        if psycopg is None:
            raise ConfigError("--db postgresql://... needs psycopg (pip install 'psycopg[binary]')")
        try:
            raw = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise UnavailableError(f"metadata database {redact(url)}: {first_line(exc)}") from None
        except psycopg.Error as exc:
            raise ConfigError(f"metadata database {redact(url)}: {first_line(exc)}") from None
        return cls(raw, postgres=True, where=redact(url))

    def ddl(self, statement: str) -> str:
        """A ``CREATE`` statement in this database's column types."""
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

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """One write transaction under the lock (and, on PostgreSQL, the cross-process write lock);
        committed at the end, rolled back on any exception."""
        with self._lock, self._mapped():
            if self.postgres:
                self._raw.execute("BEGIN")
                self._raw.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))
            else:
                self._raw.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
            except BaseException:
                self._raw.execute("ROLLBACK")
                raise
            self._raw.execute("COMMIT")

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._mapped():
            return self._tx.execute(sql, params).fetchall()

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """The drivers' "cannot reach / busy" errors as UnavailableError (the caller may retry)."""
        try:
            yield
        except Exception as exc:
            if _unreachable(exc):
                raise UnavailableError(f"metadata database {self.where}: {first_line(exc)}") from None
            raise

    def check_usable(self, create: Callable[[Database], None]) -> None:
        """Run ``create(self)`` (the schema); a file or database that is not ours becomes a ConfigError
        and the connection is closed."""
        try:
            create(self)
        except _unusable_errors() as exc:
            self.close()
            raise ConfigError(
                f"metadata database {self.where}: not a usable fleetloop database ({first_line(exc)})"
            ) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._raw.close()
