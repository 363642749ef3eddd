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
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from fleetloop_cloud.metadata import CaptureRecord
from fleetloop_shared.errors import QueryError, UserError

#: Largest ``max_rows`` a caller may ask for (the API's result cap; larger exports go through files).
MAX_ROWS_LIMIT = 1_000_000
#: A query running longer than this is interrupted (policy: interrupt and report, never hang a thread).
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
                pattern = (self._samples.resolve() / "**" / "*.parquet").as_posix()
                conn.execute(
                    "CREATE VIEW samples AS SELECT device_id, capture_id, campaign, signal, t_ns, value, "
                    f"value_int, fleet, date FROM read_parquet({_sql_string(pattern)}, "
                    "hive_partitioning=true, union_by_name=true, "
                    "hive_types={'fleet': VARCHAR, 'date': DATE})"
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

    def query(self, sql: str, *, max_rows: int = 10000) -> QueryResult:
        """Run one SELECT; at most ``max_rows`` rows come back (``truncated`` says whether more existed).

        Any DuckDB error (syntax, unknown column, ...) becomes a QueryError with DuckDB's one-line message.
        """
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_ROWS_LIMIT:
            raise UserError(f"max_rows must be between 1 and {MAX_ROWS_LIMIT}, got {max_rows!r}")
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

        timer = threading.Timer(QUERY_TIMEOUT_S, interrupt)
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
                raise QueryError(f"query interrupted after {QUERY_TIMEOUT_S:g} s") from None
            raise QueryError(_first_line(exc)) from None
        finally:
            timer.cancel()
            conn.close()
        truncated = len(fetched) > max_rows
        rows = [tuple(_plain(v) for v in row) for row in fetched[:max_rows]]
        return QueryResult(columns=columns, rows=rows, truncated=truncated)
