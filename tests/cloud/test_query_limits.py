"""The SQL time limit: real DuckDB interrupted in the engine and through ``POST /v1/query`` over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fleetloop_cloud.fleet_store.query import QUERY_TIMEOUT_S, QueryEngine, QueryLimits, QueryTimeoutError
from fleetloop_shared.errors import QueryError, UserError

RunningCoordinator = Any
#: Seconds of work for DuckDB on any machine: a 10^11-row cross join it cannot shortcut.
SLOW_SQL = "SELECT count(*) FROM range(1000000) a, range(100000) b WHERE (a.range * 7 + b.range) % 13 = 5"


def post_query(rc: RunningCoordinator, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, data = rc.call("POST", "/v1/query", json.dumps(body).encode(),
                              {"Content-Type": "application/json"})  # fmt: skip
    return status, json.loads(data)


def test_a_slow_query_is_interrupted_at_its_time_limit(tmp_path: Path) -> None:
    engine = QueryEngine(tmp_path / "fleet")
    started = time.monotonic()
    with pytest.raises(QueryTimeoutError) as err:
        engine.query(SLOW_SQL, timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5.0
    assert err.value.timeout_s == 0.5
    assert "0.5 s" in str(err.value)
    assert isinstance(err.value, QueryError) and err.value.http_status == 400 and err.value.exit_code == 2
    assert err.value.grpc_code == "DEADLINE_EXCEEDED"
    # the engine is not left broken: the next query answers
    assert engine.query("SELECT 42 AS x", timeout_s=0.5).rows == [(42,)]


def test_a_quick_query_under_a_short_limit_answers(tmp_path: Path) -> None:
    assert QueryEngine(tmp_path / "fleet").query("SELECT 1 + 1", timeout_s=0.05).rows == [(2,)]


@pytest.mark.parametrize("bad", [0, -1, QUERY_TIMEOUT_S + 1, float("nan"), float("inf"), True, "5"])
def test_a_time_limit_outside_the_bounds_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(UserError, match="timeout_s must be"):
        QueryEngine(tmp_path / "fleet").query("SELECT 1", timeout_s=bad)  # type: ignore[arg-type]


def test_a_configured_maximum_bounds_and_defaults_the_time_limit(tmp_path: Path) -> None:
    # With the coordinator's maximum lowered (query.timeout_s), a query asking for more is refused, and
    # one asking for nothing gets the maximum.
    engine = QueryEngine(tmp_path / "fleet", limits=QueryLimits(timeout_s=1.0))
    with pytest.raises(UserError, match="at most 1"):
        engine.query("SELECT 1", timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(QueryTimeoutError, match="time limit of 1 s"):
        engine.query(SLOW_SQL)
    assert time.monotonic() - started < 5.0


def test_rest_query_takes_a_time_limit(running_coordinator: RunningCoordinator) -> None:
    base = running_coordinator
    status, body = post_query(base, {"sql": "SELECT 41 + 1 AS answer", "timeout_s": 5})
    assert status == 200 and body["rows"] == [[42]]
    started = time.monotonic()
    status, body = post_query(base, {"sql": SLOW_SQL, "timeout_s": 0.5})
    assert time.monotonic() - started < 5.0
    assert status == 400
    assert body["type"] == "QueryTimeoutError"
    assert "time limit of 0.5 s" in body["error"]
    # the server keeps answering after an interrupted query
    status, body = post_query(base, {"sql": "SELECT 1 AS one"})
    assert status == 200 and body["rows"] == [[1]]


@pytest.mark.parametrize("bad", [0, -3, 1e9, "soon", None, [1]])
def test_rest_refuses_a_bad_time_limit(running_coordinator: RunningCoordinator, bad: object) -> None:
    status, body = post_query(running_coordinator, {"sql": "SELECT 1", "timeout_s": bad})
    assert status == 400
    assert body["type"] == "UserError"
    assert "timeout_s must be" in body["error"]


# -- docs/query.md: every SQL example runs, against a real store --------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "query.md"


def doc_examples() -> list[str]:
    text = DOC.read_text()
    blocks = text.split("```sql\n")[1:]
    return [b.split("```", 1)[0] for b in blocks]


@pytest.fixture
def store(tmp_path: Path) -> QueryEngine:
    """Two devices, speed (float, 10 Hz) and gear (int, 1 Hz) at different instants, as ingest writes them."""
    import datetime as dt

    import numpy as np

    from fleetloop_cloud.fleet_store.parquet import FleetStore
    from fleetloop_cloud.repositories import open_repositories
    from fleetloop_cloud.repositories.records import SegmentReceipt
    from fleetloop_shared.catalog import Catalog, DataType
    from fleetloop_shared.segment import Segment, new_segment_id

    start = int(dt.datetime(2018, 8, 2, 8, 34, 47, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
    received = start / 1e9 + 3600
    speed_cat, gear_cat = Catalog(), Catalog()
    speed_cat.add("Vehicle.Speed", DataType.FLOAT64, "m/s")
    gear_cat.add("Vehicle.Gear", DataType.INT64)
    fleet = FleetStore(tmp_path / "fleet")
    meta = open_repositories(tmp_path / "meta.sqlite").segments
    for n, device in enumerate(("car-1", "car-2")):
        t_speed = start + n * 10**9 + np.arange(100, dtype=np.int64) * 100_000_000
        t_gear = start + n * 10**9 + 50_000_000 + np.arange(10, dtype=np.int64) * 1_000_000_000
        parts = [
            (speed_cat, Segment(new_segment_id(), "can0/SPEED", t_speed,
                                {1: np.linspace(0, 30, 100)}, {1: DataType.FLOAT64})),
            (gear_cat, Segment(new_segment_id(), "can0/GEAR", t_gear,
                               {1: np.arange(10, dtype=np.int64) % 6}, {1: DataType.INT64})),
        ]
        for cat, seg in parts:
            samples = fleet.write_segment(fleet="taxi", device_id=device, capture_id=f"cap-{device}",
                                          campaign="braking", segment=seg, catalog=cat,
                                          received_unix=received)
            receipt = SegmentReceipt(f"cap-{device}", "braking", 8, samples, int(seg.t_ns.min()),
                                     int(seg.t_ns.max()))
            meta.record(device, seg.segment_id, receipt, received)
    return QueryEngine(tmp_path / "fleet", captures=meta.captures)


def test_docs_have_the_examples() -> None:
    examples = doc_examples()
    assert len(examples) >= 5
    assert any("ASOF LEFT JOIN" in sql for sql in examples)


@pytest.mark.parametrize("index", range(5))
def test_every_doc_example_runs(store: QueryEngine, index: int) -> None:
    sql = doc_examples()[index]
    result = store.query(sql, timeout_s=30)
    assert result.rows, sql


def test_the_asof_example_pairs_each_speed_with_the_last_gear(store: QueryEngine) -> None:
    (sql,) = [s for s in doc_examples() if "ASOF" in s]
    result = store.query(sql.replace("LIMIT 20", ""), timeout_s=30)
    assert result.columns == ["device_id", "t_ns", "speed", "gear", "gear_age_ms"]
    rows = result.rows
    assert len(rows) == 200  # every speed sample, LEFT join
    by_device = {d: [r for r in rows if r[0] == d] for d in ("car-1", "car-2")}
    for device_rows in by_device.values():
        # the gear is sampled at +50 ms then every second: the first speed sample has none before it
        assert device_rows[0][3] is None
        for _, _t_ns, _, gear, age_ms in device_rows[1:]:
            assert gear is not None and 0 <= age_ms < 1000
        # 1.05 s after the first gear the second one (gear 1) applies
        assert [r[3] for r in device_rows[11:20]] == [1] * 9
