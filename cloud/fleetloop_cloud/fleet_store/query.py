"""SQL over the fleet store: DuckDB reading the Parquet files in place, plus the captures table.

Each query gets a fresh in-memory DuckDB connection, so queries from many API threads never share state
and nothing a query does outlives it. That connection is locked down before the user's SQL runs: only
one read-only ``SELECT`` statement, file access only below the store's ``samples`` directory, the
configuration locked, a bounded result, memory and run time. A data team can explore freely without
being able to read the coordinator's keys or write into the store.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import math
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from fleetloop_cloud.fleet_store.parquet import COMPACTED_FILE, absorbed_by
from fleetloop_cloud.repositories.records import CaptureRecord
from fleetloop_shared.errors import QueryError, UserError

#: Largest ``max_rows`` a caller may ask for (the API's result cap; larger exports go through files).
MAX_ROWS_LIMIT = 1_000_000
#: A query running longer than this is interrupted (policy: interrupt and report, never hang a thread).
#: It is also the default and the largest time limit a caller may ask for (``timeout_s``).
QUERY_TIMEOUT_S = 120.0
#: DuckDB's memory limit per query.
QUERY_MEMORY_LIMIT = "1GB"
#: DuckDB threads per query.
QUERY_THREADS = 2

_SAMPLES_COLUMNS = (
    ("device_id", "VARCHAR"),
    ("capture_id", "VARCHAR"),
    ("campaign", "VARCHAR"),
    ("signal", "VARCHAR"),
    ("t_ns", "BIGINT"),
    ("value", "DOUBLE"),
    ("value_int", "BIGINT"),
    ("value_str", "VARCHAR"),
    ("fleet", "VARCHAR"),
    ("date", "DATE"),
)
CAPTURES_SCHEMA = pa.schema(
    [
        pa.field("capture_id", pa.string()),
        pa.field("device_id", pa.string()),
        pa.field("campaign", pa.string()),
        pa.field("first_ns", pa.int64()),
        pa.field("last_ns", pa.int64()),
        pa.field("samples", pa.int64()),
        pa.field("segments", pa.int64()),
        pa.field("first_received", pa.float64()),
        pa.field("last_received", pa.float64()),
    ]
)
_ALLOWED_STATEMENTS = frozenset({duckdb.StatementType.SELECT})
#: A compacted file's path ends so (fleet_store.COMPACTED_FILE).
_COMPACTED_SUFFIX = r"/compacted-[0-9a-f]{24}\.parquet$"


class QueryTimeoutError(QueryError):
    """A query ran past its time limit and was interrupted; nothing of it is returned.

    Still the caller's to fix (narrow the query, or ask for a longer ``timeout_s`` up to the server's
    :data:`QUERY_TIMEOUT_S`): HTTP 400 and exit code 2 like every :class:`QueryError`, gRPC name
    ``DEADLINE_EXCEEDED``; the REST body's ``type`` is ``QueryTimeoutError``.
    """

    grpc_code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, *, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


def check_timeout(timeout_s: object) -> float:
    """A caller's time limit in seconds: a finite number above 0 and at most :data:`QUERY_TIMEOUT_S`
    (UserError otherwise)."""
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or not 0 < timeout_s <= QUERY_TIMEOUT_S
    ):
        raise UserError(
            f"timeout_s must be a number above 0 and at most {QUERY_TIMEOUT_S:g}, got {timeout_s!r}"
        )
    return float(timeout_s)


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of plain Python values (str, int, float, bool, None, lists, dicts)."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _plain(value: Any) -> Any:
    """A value strict JSON can carry: dates become ISO strings, decimals floats, bytes base64, and
    non-finite floats None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # strict JSON has no NaN / Infinity
    if isinstance(value, decimal.Decimal):
        return _plain(float(value))
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return _plain(item())
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class QueryEngine:
    """Runs a user's SQL over the views ``samples`` and ``captures``."""

    def __init__(self, root: Path, captures: Callable[[], list[CaptureRecord]] | None = None) -> None:
        self._root = Path(root)
        self._samples = self._root / "samples"
        self._captures = captures
        self._absorbed: dict[str, tuple[int, tuple[str, ...]]] = {}

    def _snapshot(self, root: Path) -> tuple[list[str], list[str]]:
        """The compacted files present now, and the segment files present now that they absorbed (which
        this query leaves out: their rows are in the compacted files). Absolute paths, as DuckDB's
        ``filename`` column gives them."""
        compacted: list[str] = []
        absorbed_present: list[str] = []
        for partition in root.glob("fleet=*/date=*"):
            try:
                names = {e.name: e for e in os.scandir(partition)}
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name, entry in names.items():
                if not COMPACTED_FILE.match(name):
                    continue
                try:
                    mtime = entry.stat().st_mtime_ns
                    cached = self._absorbed.get(entry.path)
                    if cached is None or cached[0] != mtime:
                        cached = (mtime, tuple(absorbed_by(Path(entry.path))))
                        self._absorbed[entry.path] = cached
                except FileNotFoundError:
                    continue
                compacted.append(entry.path)
                absorbed_present.extend(os.path.join(partition, n) for n in cached[1] if n in names)
        return compacted, absorbed_present

    def _has_sample_files(self) -> bool:
        if not self._samples.is_dir():
            return False
        return next(self._samples.glob("**/*.parquet"), None) is not None

    def _captures_table(self) -> pa.Table:
        records = self._captures() if self._captures is not None else []
        return pa.Table.from_pylist(
            [
                {
                    "capture_id": r.capture_id,
                    "device_id": r.device_id,
                    "campaign": r.campaign,
                    "first_ns": r.first_ns,
                    "last_ns": r.last_ns,
                    "samples": r.samples,
                    "segments": r.segments,
                    "first_received": r.first_received,
                    "last_received": r.last_received,
                }
                for r in records
            ],
            schema=CAPTURES_SCHEMA,
        )

    def _connect(self) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(":memory:")
        try:
            conn.execute(f"SET memory_limit={_sql_string(QUERY_MEMORY_LIMIT)}")
            conn.execute(f"SET threads={QUERY_THREADS}")
            conn.execute("SET autoinstall_known_extensions=false")
            conn.execute("SET autoload_known_extensions=false")
            if self._has_sample_files():
                root = self._samples.resolve()
                pattern = (root / "**" / "*.parquet").as_posix()
                # Compaction (compaction.py): read each row once. Leave out the segment files a compacted
                # file absorbed, and any compacted file committed after this snapshot (its segment files
                # are still there, and in this snapshot). DuckDB prunes whole files on these filters.
                compacted, absorbed = self._snapshot(root)
                where = [f"NOT regexp_matches(filename, {_sql_string(_COMPACTED_SUFFIX)})"]
                if compacted:
                    where[0] = f"({where[0]} OR filename IN ({', '.join(map(_sql_string, compacted))}))"
                if absorbed:
                    where.append(f"filename NOT IN ({', '.join(map(_sql_string, absorbed))})")
                conn.execute(
                    f"CREATE VIEW stored_samples AS SELECT * FROM read_parquet({_sql_string(pattern)}, "
                    "hive_partitioning=true, union_by_name=true, filename=true, "
                    "hive_types={'fleet': VARCHAR, 'date': DATE}) "
                    f"WHERE {' AND '.join(where)}"
                )
                # Files from before text signals existed have no value_str; when none has it, say NULL.
                stored = {str(r[0]) for r in conn.execute("DESCRIBE stored_samples").fetchall()}
                value_str = "value_str" if "value_str" in stored else "CAST(NULL AS VARCHAR) AS value_str"
                conn.execute(
                    "CREATE VIEW samples AS SELECT device_id, capture_id, campaign, signal, t_ns, value, "
                    f"value_int, {value_str}, fleet, date FROM stored_samples"
                )
            else:
                cols = ", ".join(f"CAST(NULL AS {t}) AS {n}" for n, t in _SAMPLES_COLUMNS)
                conn.execute(f"CREATE VIEW samples AS SELECT {cols} WHERE false")
            conn.register("captures_arrow", self._captures_table())
            conn.execute("CREATE VIEW captures AS SELECT * FROM captures_arrow")
            allowed = self._samples.resolve().as_posix().rstrip("/") + "/"
            conn.execute(f"SET allowed_directories=[{_sql_string(allowed)}]")
            conn.execute("SET enable_external_access=false")
            conn.execute("SET lock_configuration=true")
        except BaseException:
            conn.close()
            raise
        return conn

    def query(self, sql: str, *, max_rows: int = 10000, timeout_s: float = QUERY_TIMEOUT_S) -> QueryResult:
        """Run one SELECT; at most ``max_rows`` rows come back (``truncated`` says whether more existed).

        The query (execution and fetching its rows) is interrupted after ``timeout_s`` seconds (above 0, at
        most :data:`QUERY_TIMEOUT_S`) and raises QueryTimeoutError. Any DuckDB error (syntax, unknown
        column, ...) becomes a QueryError with DuckDB's one-line message.
        """
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_ROWS_LIMIT:
            raise UserError(f"max_rows must be between 1 and {MAX_ROWS_LIMIT}, got {max_rows!r}")
        limit_s = check_timeout(timeout_s)
        if not isinstance(sql, str) or not sql.strip():
            raise QueryError("the query is empty")
        try:
            conn = self._connect()
        except duckdb.Error as exc:
            raise QueryError(f"cannot open the fleet store for querying: {_first_line(exc)}") from None
        timed_out = threading.Event()

        def interrupt() -> None:
            timed_out.set()
            conn.interrupt()

        timer = threading.Timer(limit_s, interrupt)
        timer.daemon = True
        try:
            statements = conn.extract_statements(sql)
            if len(statements) != 1:
                raise QueryError(f"send exactly one SQL statement, got {len(statements)}")
            if statements[0].type not in _ALLOWED_STATEMENTS:
                raise QueryError(
                    f"only SELECT queries are allowed, got {statements[0].type.name.replace('_', ' ')}"
                )
            timer.start()
            cursor = conn.execute(sql)
            description = cursor.description or []
            columns = [str(d[0]) for d in description]
            fetched = cursor.fetchmany(max_rows + 1)
        except duckdb.Error as exc:
            if timed_out.is_set():
                raise QueryTimeoutError(
                    f"query interrupted after its time limit of {limit_s:g} s (timeout_s; at most "
                    f"{QUERY_TIMEOUT_S:g} s): narrow it with WHERE on fleet, date, device_id or signal",
                    timeout_s=limit_s,
                ) from None
            raise QueryError(_first_line(exc)) from None
        finally:
            timer.cancel()
            conn.close()
        truncated = len(fetched) > max_rows
        rows = [tuple(_plain(v) for v in row) for row in fetched[:max_rows]]
        return QueryResult(columns=columns, rows=rows, truncated=truncated)
