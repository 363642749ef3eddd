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
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fleetloop_cloud.fleet_store.class_views import FULL_SCHEMA, class_sources, coarsened_sql, parquet_files
from fleetloop_cloud.fleet_store.parquet import absorbed_by
from fleetloop_cloud.repositories.records import CaptureRecord
from fleetloop_shared.classification import FULL_VIEW, ClassView, SignalClass
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
#: Data files whose signal names the engine remembers (to classify rows by set membership).
SIGNALS_CACHED = 200_000
_MEMORY = re.compile(r"^[1-9][0-9]*(\.[0-9]+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


@dataclass(frozen=True)
class QueryLimits:
    """What one query may take; the defaults are the constants above, a configuration file changes
    them (``query:`` in the coordinator's config)."""

    #: Longest run, in seconds: the default and the largest ``timeout_s`` a caller may ask for.
    timeout_s: float = QUERY_TIMEOUT_S
    #: DuckDB's memory limit per query, as DuckDB spells it ("1GB", "512MiB").
    memory_limit: str = QUERY_MEMORY_LIMIT
    #: DuckDB threads per query.
    threads: int = QUERY_THREADS
    #: Rows a query may return at most (a larger ``max_rows`` is lowered to this).
    max_rows: int = 100_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise UserError(f"query timeout must be a number of seconds above 0, got {self.timeout_s!r}")
        if not _MEMORY.match(self.memory_limit):
            raise UserError(f"query memory limit must look like 1GB or 512MiB, got {self.memory_limit!r}")
        if not 1 <= self.threads <= 256:
            raise UserError(f"query threads must be from 1 to 256, got {self.threads!r}")
        if not 1 <= self.max_rows <= MAX_ROWS_LIMIT:
            raise UserError(f"query max rows must be from 1 to {MAX_ROWS_LIMIT}, got {self.max_rows!r}")


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
    ("clock_offset_ns", "BIGINT"),
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
        pa.field("privacy", pa.string()),
    ]
)
T = TypeVar("T")
_ALLOWED_STATEMENTS = frozenset({duckdb.StatementType.SELECT})


@dataclass(frozen=True)
class TableFiles:
    """A table's data files in one snapshot, as a table format's catalog lists them."""

    #: The pyarrow file system the paths are on.
    filesystem: Any
    #: (path, fleet, date) of each data file: the partition values prune files before any is opened.
    files: list[tuple[str, str, _dt.date]]
    schema: pa.Schema


class TableSource(Protocol):
    """Where the ``samples`` and ``captures`` tables' files are (the Iceberg catalog)."""

    def scan_files(self, name: str) -> TableFiles:
        """``name`` is ``samples`` or ``captures``; the snapshot current now."""
        ...


def _dataset(table: TableFiles) -> ds.Dataset:
    """The files as one pyarrow dataset whose fragments carry their partition values, so a query's
    filter on fleet and date skips whole files (DuckDB pushes its filters into the scan)."""
    fmt = ds.ParquetFileFormat()
    if not table.files:
        return ds.dataset(table.schema.empty_table())
    partitions = [(pc.field("fleet") == fleet) & (pc.field("date") == date) for _, fleet, date in table.files]
    return ds.FileSystemDataset.from_paths(
        [path for path, _, _ in table.files], schema=table.schema, format=fmt, filesystem=table.filesystem,
        partitions=partitions,
    )  # fmt: skip


_CAPTURES_FROM_SEGMENTS = (
    "SELECT capture_id, device_id, campaign, min(first_ns) AS first_ns, max(last_ns) AS last_ns, "
    "CAST(sum(samples) AS BIGINT) AS samples, CAST(sum(segments) AS BIGINT) AS segments, "
    "min(first_received) AS first_received, max(last_received) AS last_received, "
    "coalesce(max(privacy), '') AS privacy "
    "FROM (SELECT * FROM captures_segments "
    # A segment's row counted once: a batch's captures may be appended twice (the maintenance pass restores
    # a batch whose writer is still about to append them). Migrated rows (no segment id) each stand alone.
    "QUALIFY segment_id IS NULL OR row_number() OVER (PARTITION BY device_id, segment_id) = 1) "
    "GROUP BY capture_id, device_id, campaign"
)


class QueryTimeoutError(QueryError, grpc_code="DEADLINE_EXCEEDED"):
    """A query ran past its time limit and was interrupted; nothing of it is returned.

    Still the caller's to fix (narrow the query, or ask for a longer ``timeout_s`` up to the server's
    :attr:`QueryLimits.timeout_s`): HTTP 400 and exit code 2 like every :class:`QueryError`, gRPC name
    ``DEADLINE_EXCEEDED``; the REST body's ``type`` is ``QueryTimeoutError``.
    """

    def __init__(self, message: str, *, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


def check_timeout(timeout_s: object, maximum: float = math.inf) -> float:
    """A caller's time limit in seconds: a finite number above 0 and at most ``maximum`` (the
    engine's :attr:`QueryLimits.timeout_s`; UserError otherwise)."""
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or not 0 < timeout_s <= maximum
    ):
        most = f" and at most {maximum:g}" if math.isfinite(maximum) else ""
        raise UserError(f"timeout_s must be a number above 0{most}, got {timeout_s!r}")
    return float(timeout_s)


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of plain Python values (str, int, float, bool, None, lists, dicts)."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    #: Classes of the ``samples`` rows the query read (what its access record names).
    classes: frozenset[SignalClass] = frozenset()


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

    def __init__(
        self,
        root: Path,
        captures: Callable[[], list[CaptureRecord]] | None = None,
        limits: QueryLimits | None = None,
        tables: TableSource | None = None,
    ) -> None:
        """Over the Parquet layout below ``root`` (captures from ``captures``), or, with ``tables``,
        over a table format's current snapshot (both tables from there)."""
        self.limits = limits or QueryLimits()
        self._tables = tables
        self._root = Path(root)
        self._samples = self._root / "samples"
        self._captures = captures
        self._absorbed: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._file_signals: dict[str, frozenset[str]] = {}

    def _absorbed_names(self, path: str, mtime_ns: int) -> tuple[str, ...]:
        """The segment files the compacted file ``path`` absorbed, remembered while it is unchanged."""
        cached = self._absorbed.get(path)
        if cached is None or cached[0] != mtime_ns:
            cached = (mtime_ns, tuple(absorbed_by(Path(path))))
            self._absorbed[path] = cached
        return cached[1]

    def _signals_of(self, table: TableFiles) -> dict[str, set[str]]:
        """The signals of each fleet in ``table``'s files. Data files are never rewritten in place (a
        segment file, a compacted file, an Iceberg data file each has a name of its own), so each is
        read once (its ``signal`` column) and remembered, :data:`SIGNALS_CACHED` files at most (past
        that the memory starts over)."""
        out: dict[str, set[str]] = {}
        for path, fleet, _ in table.files:
            names = self._file_signals.get(path)
            if names is None:
                try:
                    column = pq.read_table(path, columns=["signal"], filesystem=table.filesystem)["signal"]
                except (OSError, pa.ArrowException):
                    continue  # gone or unreadable: a query that needs its rows fails when it reads them
                names = frozenset(str(s) for s in pc.unique(column).to_pylist())
                if len(self._file_signals) >= SIGNALS_CACHED:
                    self._file_signals.clear()
                self._file_signals[path] = names
            out.setdefault(fleet, set()).update(names)
        return out

    def _samples_files(self) -> TableFiles:
        """The ``samples`` files a query reads now: the table format's snapshot, or the Parquet layout's
        files (compaction: each row once — a compacted file present now stands for the segment files
        it absorbed, and one committed after this listing is not in it, while its segment files are)."""
        if self._tables is not None:
            return self._tables.scan_files("samples")
        files = parquet_files(self._samples, self._absorbed_names) if self._samples.is_dir() else []
        return TableFiles(pafs.LocalFileSystem(), files, FULL_SCHEMA)

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
                    "privacy": r.privacy,
                }
                for r in records
            ],
            schema=CAPTURES_SCHEMA,
        )

    def _samples_view(
        self,
        conn: duckdb.DuckDBPyConnection,
        view: ClassView,
        touched: set[SignalClass] | None,
        keep: list[Any],
    ) -> None:
        """``samples`` as ``view`` lets it be seen: the relations of class_views.class_sources, united
        under the one name a query can use. The rows a query reads from a relation (after the scan's
        pushed-down filters) pass a filter that adds that relation's classes to ``touched`` — once per
        chunk, a constant, so it costs nothing per row. The datasets beneath have no name of their own
        (``keep`` holds them while the connection lives). ``touched`` None: nobody asks (the coordinator's
        own reads), and a view showing everything reads the store as it is."""

        files = self._samples_files()
        sources = class_sources(_dataset(files), view, lambda: self._signals_of(files), touched is not None)

        def read(marks: pa.Array) -> pa.Array:
            for i in pc.unique(marks).to_pylist():
                if touched is not None:
                    touched.update(sources[i].classes)
            return pa.array(np.ones(len(marks), dtype=np.bool_))

        conn.create_function("fleetloop_read", read, [duckdb.sqltype("INTEGER")], duckdb.sqltype("BOOLEAN"),
                             type="arrow", side_effects=True)  # type: ignore[call-overload]  # fmt: skip
        whole = {n: f"CAST({n} AS {t})" for n, t in _SAMPLES_COLUMNS}
        rounded = whole | {
            "value": coarsened_sql("CAST(value AS DOUBLE)"),
            "value_int": "CAST(NULL AS BIGINT)",
            "value_str": "CAST(NULL AS VARCHAR)",
        }
        relation: Any = None
        for i, source in enumerate(sources):
            keep.append(source.dataset)
            chosen = rounded if source.coarsened else whole
            columns = ", ".join(f"{sql} AS {n}" for n, sql in chosen.items())
            part = conn.from_arrow(source.dataset).filter(f"fleetloop_read({i})").select(columns)
            relation = part if relation is None else relation.union(part)
        if relation is None:
            nothing = ", ".join(f"CAST(NULL AS {t}) AS {n}" for n, t in _SAMPLES_COLUMNS)
            conn.execute(f"CREATE VIEW samples AS SELECT {nothing} WHERE false")
        else:
            keep.append(relation)
            relation.create_view("samples")

    def _connect(
        self, view: ClassView, touched: set[SignalClass] | None, keep: list[Any]
    ) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(":memory:")
        try:
            conn.execute(f"SET memory_limit={_sql_string(self.limits.memory_limit)}")
            conn.execute(f"SET threads={int(self.limits.threads)}")
            conn.execute("SET autoinstall_known_extensions=false")
            conn.execute("SET autoload_known_extensions=false")
            self._samples_view(conn, view, touched, keep)
            if self._tables is not None:
                conn.register("captures_segments", _dataset(self._tables.scan_files("captures")))
                conn.execute(f"CREATE VIEW captures AS {_CAPTURES_FROM_SEGMENTS}")
            if self._tables is None:
                conn.register("captures_arrow", self._captures_table())
                conn.execute("CREATE VIEW captures AS SELECT * FROM captures_arrow")
            # Nothing of the store is read by DuckDB itself (pyarrow reads the files beneath the views), so
            # no SQL may open a file: read_parquet, read_csv, glob, COPY, ATTACH are refused. Nor may a
            # name in a query find a Python object of this process (DuckDB's replacement scans).
            conn.execute("SET python_enable_replacements=false")
            conn.execute("SET enable_external_access=false")
            conn.execute("SET lock_configuration=true")
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(
        self,
        limit_s: float,
        timeout_message: str,
        work: Callable[[duckdb.DuckDBPyConnection], T],
        check: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
        *,
        view: ClassView = FULL_VIEW,
        touched: set[SignalClass] | None = None,
    ) -> T:
        """``work`` on a fresh locked-down connection, interrupted after ``limit_s`` seconds
        (QueryTimeoutError with ``timeout_message``), after ``check`` (untimed: it runs nothing);
        DuckDB's errors become QueryError. ``samples`` is what ``view`` lets through; the classes read
        are added to ``touched``."""
        keep: list[Any] = []
        try:
            conn = self._connect(view, touched, keep)
        except duckdb.Error as exc:
            raise QueryError(f"cannot open the fleet store for querying: {_first_line(exc)}") from None
        timed_out = threading.Event()

        def interrupt() -> None:
            timed_out.set()
            conn.interrupt()

        timer = threading.Timer(limit_s, interrupt)
        timer.daemon = True
        try:
            if check is not None:
                check(conn)
            timer.start()
            return work(conn)
        except duckdb.Error as exc:
            if timed_out.is_set():
                raise QueryTimeoutError(timeout_message, timeout_s=limit_s) from None
            raise QueryError(_first_line(exc)) from None
        finally:
            timer.cancel()
            conn.close()
            keep.clear()

    def query(
        self,
        sql: str,
        *,
        max_rows: int = 10000,
        timeout_s: float | None = None,
        view: ClassView = FULL_VIEW,
        touched: set[SignalClass] | None = None,
    ) -> QueryResult:
        """Run one SELECT; at most ``max_rows`` rows come back (``truncated`` says whether more existed).

        The query (execution and fetching its rows) is interrupted after ``timeout_s`` seconds (above 0, at
        most the limits' ``timeout_s``, which is also the default) and raises QueryTimeoutError. Any
        DuckDB error (syntax, unknown column, ...) becomes a QueryError with DuckDB's one-line message.
        ``samples`` holds what ``view`` lets through; the classes the query read are added to ``touched``
        (also when it fails) and returned in the result's ``classes``.
        """
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_ROWS_LIMIT:
            raise UserError(f"max_rows must be between 1 and {MAX_ROWS_LIMIT}, got {max_rows!r}")
        most = self.limits.timeout_s
        limit_s = most if timeout_s is None else check_timeout(timeout_s, most)
        if not isinstance(sql, str) or not sql.strip():
            raise QueryError("the query is empty")

        def check(conn: duckdb.DuckDBPyConnection) -> None:
            statements = conn.extract_statements(sql)
            if len(statements) != 1:
                raise QueryError(f"send exactly one SQL statement, got {len(statements)}")
            if statements[0].type not in _ALLOWED_STATEMENTS:
                raise QueryError(
                    f"only SELECT queries are allowed, got {statements[0].type.name.replace('_', ' ')}"
                )

        def work(conn: duckdb.DuckDBPyConnection) -> tuple[list[str], list[Any]]:
            cursor = conn.execute(sql)
            columns = [str(d[0]) for d in cursor.description or []]
            return columns, cursor.fetchmany(max_rows + 1)

        columns, fetched = self._run(
            limit_s,
            f"query interrupted after its time limit of {limit_s:g} s (timeout_s; at most "
            f"{most:g} s): narrow it with WHERE on fleet, date, device_id or signal",
            work,
            check,
            view=view,
            touched=touched,
        )
        truncated = len(fetched) > max_rows
        rows = [tuple(_plain(v) for v in row) for row in fetched[:max_rows]]
        classes = frozenset(touched) if touched is not None else frozenset()
        return QueryResult(columns=columns, rows=rows, truncated=truncated, classes=classes)

    def read(
        self,
        sql: str,
        params: Sequence[object],
        *,
        timeout_s: float | None = None,
        view: ClassView = FULL_VIEW,
        touched: set[SignalClass] | None = None,
    ) -> pa.Table:
        """Run one of this package's own statements (``sql`` is ours, never a user's; values come as
        bound ``params``) on the same locked-down connection, as an Arrow table. What the console's
        timeline and the capture exports read; QueryTimeoutError past ``timeout_s``."""
        return self.read_many([(sql, params)], timeout_s=timeout_s, view=view, touched=touched)[0]

    def read_many(
        self,
        statements: Sequence[tuple[str, Sequence[object]]],
        *,
        timeout_s: float | None = None,
        view: ClassView = FULL_VIEW,
        touched: set[SignalClass] | None = None,
    ) -> list[pa.Table]:
        """:meth:`read` for several statements on one connection (opening one costs tens of ms); the
        limits' ``timeout_s`` unless a shorter one is given."""
        most = self.limits.timeout_s
        limit_s = most if timeout_s is None else check_timeout(timeout_s, most)

        def work(conn: duckdb.DuckDBPyConnection) -> list[pa.Table]:
            out = []
            for sql, params in statements:
                relation = conn.sql(sql, params=list(params))
                if relation is None:
                    out.append(pa.table({}))
                    continue
                fetch = getattr(relation, "to_arrow_table", None) or relation.arrow  # DuckDB 2 / 1.x
                result = fetch()
                out.append(result.read_all() if isinstance(result, pa.RecordBatchReader) else result)
            return out

        return self._run(limit_s, f"reading the fleet store took longer than {limit_s:g} s", work,
                         view=view, touched=touched)  # fmt: skip
