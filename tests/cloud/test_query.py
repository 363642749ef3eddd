"""Query engine: real DuckDB over real Parquet written from comma2k19 speed data, and its lock-down."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.repositories.records import SegmentReceipt
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import QueryError, UserError
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, new_segment_id

DRIVE_START_NS = int(dt.datetime(2018, 8, 2, 8, 34, 47, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
RECEIVED = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC).timestamp()


def catalog() -> Catalog:
    c = Catalog()
    c.add("Vehicle.Speed", DataType.FLOAT64, "m/s")
    c.add("Vehicle.Gear", DataType.INT64)
    return c


@pytest.fixture
def speed(recordings: Path) -> tuple[np.ndarray, np.ndarray]:
    base = comma2k19_segment(recordings) / "processed_log" / "CAN" / "speed"
    t = np.load(base / "t")
    v = np.load(base / "value").reshape(-1).astype(np.float64)
    return DRIVE_START_NS + np.round((t - t[0]) * 1e9).astype(np.int64), v


@pytest.fixture
def loaded(tmp_path: Path, speed: tuple[np.ndarray, np.ndarray]) -> tuple[QueryEngine, list[Segment], Path]:
    """Two devices: car-1 gets the first half of the drive, car-2 the second, as ingest would write them."""
    t, v = speed
    half = len(t) // 2
    fleet = FleetStore(tmp_path / "fleet")
    meta = open_repositories(tmp_path / "meta.sqlite").segments
    segments = []
    for device, sl in (("car-1", slice(0, half)), ("car-2", slice(half, None))):
        gear = np.full(len(t[sl]), 3, dtype=np.int64)
        seg = decode_segment(encode_segment(Segment(
            new_segment_id(), "can0/SPEED", t[sl], {1: v[sl], 2: gear},
            {1: DataType.FLOAT64, 2: DataType.INT64})))
        samples = fleet.write_segment(fleet="taxi", device_id=device, capture_id=f"cap-{device}",
                                      campaign="braking", segment=seg, catalog=catalog(),
                                      received_unix=RECEIVED)
        receipt = SegmentReceipt(f"cap-{device}", "braking", 8, samples, int(seg.t_ns.min()),
                                 int(seg.t_ns.max()))
        meta.record(device, seg.segment_id, receipt, RECEIVED)
        segments.append(seg)
    return QueryEngine(tmp_path / "fleet", captures=meta.captures), segments, tmp_path


def test_count_and_average_match_numpy(loaded: tuple[QueryEngine, list[Segment], Path],
                                       speed: tuple[np.ndarray, np.ndarray]) -> None:
    engine, _, _ = loaded
    t, v = speed
    result = engine.query(
        "SELECT count(*) AS n, avg(value) AS mean, min(t_ns) AS t0, max(date) AS d FROM samples "
        "WHERE signal = 'Vehicle.Speed'"
    )
    assert result.columns == ["n", "mean", "t0", "d"]
    n, mean, t0, day = result.rows[0]
    assert n == len(v)
    assert mean == pytest.approx(float(v.mean()), rel=1e-12)
    assert t0 == int(t[0]) and day == "2018-08-02"
    assert result.truncated is False
    per_device = engine.query(
        "SELECT device_id, fleet, count(*) FROM samples WHERE signal = 'Vehicle.Speed' "
        "GROUP BY ALL ORDER BY 1"
    )
    assert per_device.rows == [("car-1", "taxi", len(v) // 2), ("car-2", "taxi", len(v) - len(v) // 2)]
    gear = engine.query(
        "SELECT DISTINCT value_int, typeof(value_int) FROM samples WHERE signal = 'Vehicle.Gear'"
    )
    assert gear.rows == [(3, "BIGINT")]


def test_captures_view_joins_metadata(loaded: tuple[QueryEngine, list[Segment], Path]) -> None:
    engine, segments, _ = loaded
    result = engine.query(
        "SELECT c.capture_id, c.segments, c.samples, count(s.t_ns) FROM captures c "
        "JOIN samples s USING (device_id, capture_id) GROUP BY ALL ORDER BY 1"
    )
    assert [(r[0], r[1]) for r in result.rows] == [("cap-car-1", 1), ("cap-car-2", 1)]
    assert all(r[2] == r[3] for r in result.rows)
    assert sum(r[2] for r in result.rows) == sum(s.sample_count for s in segments)


def test_rewriting_a_segment_does_not_double_count(loaded: tuple[QueryEngine, list[Segment], Path]) -> None:
    engine, segments, tmp_path = loaded
    before = engine.query("SELECT count(*) FROM samples").rows[0][0]
    FleetStore(tmp_path / "fleet").write_segment(
        fleet="taxi", device_id="car-1", capture_id="cap-car-1", campaign="braking", segment=segments[0],
        catalog=catalog(), received_unix=RECEIVED)
    assert engine.query("SELECT count(*) FROM samples").rows[0][0] == before


def test_max_rows_truncates(loaded: tuple[QueryEngine, list[Segment], Path]) -> None:
    engine, _, _ = loaded
    result = engine.query("SELECT t_ns, value FROM samples ORDER BY t_ns", max_rows=5)
    assert len(result.rows) == 5 and result.truncated is True
    exact = engine.query("SELECT 1 UNION ALL SELECT 2", max_rows=2)
    assert exact.rows == [(1,), (2,)] and exact.truncated is False
    with pytest.raises(UserError):
        engine.query("SELECT 1", max_rows=0)


def test_empty_store_has_a_typed_empty_samples_view(tmp_path: Path) -> None:
    engine = QueryEngine(tmp_path / "nothing-yet")
    assert engine.query("SELECT count(*) FROM samples").rows == [(0,)]
    described = {r[0]: r[1] for r in engine.query("DESCRIBE samples").rows}
    assert described == {"device_id": "VARCHAR", "capture_id": "VARCHAR", "campaign": "VARCHAR",
                         "signal": "VARCHAR", "t_ns": "BIGINT", "value": "DOUBLE", "value_int": "BIGINT",
                         "value_str": "VARCHAR",
                         "fleet": "VARCHAR", "date": "DATE", "clock_offset_ns": "BIGINT"}
    assert engine.query("SELECT count(*) FROM captures").rows == [(0,)]


def test_results_are_json_friendly(tmp_path: Path) -> None:
    engine = QueryEngine(tmp_path)
    result = engine.query(
        "SELECT DATE '2018-08-02' AS d, TIMESTAMP '2018-08-02 08:34:47' AS ts, 1.5::DECIMAL(4,2) AS dec, "
        "'nan'::DOUBLE AS nan, [1, 2] AS l, {'a': 1} AS s, 'x'::BLOB AS b, INTERVAL 90 SECOND AS i, "
        "uuid() IS NOT NULL AS ok, 9007199254740993::BIGINT AS big"
    )
    row = result.rows[0]
    assert row == ("2018-08-02", "2018-08-02T08:34:47", 1.5, None, [1, 2], {"a": 1}, "eA==", 90.0, True,
                   9007199254740993)
    json.dumps(result.rows, allow_nan=False)


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELEC 1", "syntax error"),
        ("SELECT nope FROM samples", "nope"),
        ("SELECT * FROM no_such_table", "no_such_table"),
        ("SELECT 1; SELECT 2", "exactly one"),
        ("CREATE TABLE t AS SELECT 1", "only SELECT"),
        ("COPY (SELECT 1) TO 'out.csv'", "only SELECT"),
        ("ATTACH 'x.db'", "only SELECT"),
        ("SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd"),
        ("SELECT * FROM read_text('/etc/hostname')", "/etc/hostname"),
        ("", "empty"),
    ],
)
def test_bad_or_dangerous_sql_is_a_query_error(loaded: tuple[QueryEngine, list[Segment], Path], sql: str,
                                               fragment: str) -> None:
    engine, _, _ = loaded
    with pytest.raises(QueryError) as err:
        engine.query(sql)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_queries_run_locked_down(loaded: tuple[QueryEngine, list[Segment], Path]) -> None:
    engine, _, tmp_path = loaded
    settings = engine.query(
        "SELECT current_setting('enable_external_access'), current_setting('lock_configuration')"
    )
    assert settings.rows == [(False, True)]
    # no file is readable from SQL: not the metadata database, not even the store's own files (their
    # rows are reached through the samples view only, which withholds what a reader may not see)
    meta = (tmp_path / "meta.sqlite").as_posix()
    with pytest.raises(QueryError, match=r"meta\.sqlite"):
        engine.query(f"SELECT * FROM read_blob('{meta}')")
    sample_file = next((tmp_path / "fleet" / "samples").rglob("*.parquet")).as_posix()
    with pytest.raises(QueryError, match="disabled by configuration"):
        engine.query(f"SELECT count(*) > 0 FROM read_parquet('{sample_file}')")
