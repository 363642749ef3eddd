"""Query benchmark: what reading ``samples`` through a role's class views costs.

A Parquet fleet store (the layout ingest writes) holds ``--rows`` samples per signal of seven signals —
the real comma2k19 drive's speed (generated values of the same rate when the recordings are absent), a
VIN, latitude, longitude, altitude, a heart rate and a badge id — in ``--files`` segment files over two
days. Each query runs ``--repeat`` times (best kept) through the query engine as an admin (every class
whole, one scan) and as a viewer (personal and sensitive withheld, positions coarsened), and — the
**reference, measured in the same run** — as DuckDB read the files before class views existed:
``read_parquet`` over the layout's files, no class filter. One JSON object on stdout with milliseconds and
the ratios ``admin_ms / reference_ms`` and ``viewer_ms / reference_ms`` per query.

The machine is shared and noisy: compare the ratios.

Usage: ``.venv/bin/python benchmarks/query_views.py [--data DIR] [--rows 500000] [--files 40]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np

from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.identity.roles import CLASS_ACCESS, Role
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.classification import ClassView
from fleetloop_shared.datapaths import comma2k19_segment, find_recordings
from fleetloop_shared.segment import Segment, new_segment_id

QUERIES = {
    "count_all": "SELECT count(*) FROM samples",
    "speed_avg": "SELECT avg(value) FROM samples WHERE signal = 'Vehicle.Speed'",
    "per_signal": "SELECT signal, count(*), min(value), max(value) FROM samples GROUP BY signal",
    "one_day": "SELECT count(*) FROM samples WHERE date = DATE '2026-01-02' AND signal LIKE '%Latitude'",
}


def speed(rows: int, data: Path | None) -> np.ndarray:
    root = data or find_recordings()
    if root is not None:
        try:
            base = comma2k19_segment(root) / "processed_log" / "CAN" / "speed"
            v = np.load(base / "value").reshape(-1).astype(np.float64)
            return np.resize(v, rows)
        except (FileNotFoundError, OSError):
            pass
    return 20 + 5 * np.sin(np.arange(rows) / 100.0)


def build(root: Path, rows: int, files: int, data: Path | None) -> None:
    catalog = Catalog()
    for path, kind in (
        ("Vehicle.Speed", DataType.FLOAT64),
        ("Vehicle.VehicleIdentification.VIN", DataType.STRING),
        ("Vehicle.CurrentLocation.Latitude", DataType.FLOAT64),
        ("Vehicle.CurrentLocation.Longitude", DataType.FLOAT64),
        ("Vehicle.CurrentLocation.Altitude", DataType.FLOAT64),
        ("Vehicle.Driver.HeartRate", DataType.FLOAT64),
        ("Vehicle.Custom.Badge", DataType.STRING),
    ):
        catalog.add(path, kind)  # fmt: skip
    store = FleetStore(root)
    v = speed(rows, data)
    day0 = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
    per = rows // files
    for i in range(files):
        n = per
        t = day0 + (i * 2 // files) * 86_400_000_000_000 + i * 1_000_000_000_000 + np.arange(n) * 10_000_000
        cols = {1: v[i * per : i * per + n], 2: np.array(["WVWZZZ1JZXW000001"] * n, dtype=object),
                3: np.full(n, 48.137154), 4: np.full(n, 11.576124), 5: np.full(n, 512.0),
                6: np.full(n, 73.0), 7: np.array(["badge-1"] * n, dtype=object)}  # fmt: skip
        types = {k: catalog.by_id(k).data_type for k in cols}
        seg = Segment(new_segment_id(), "g", t.astype(np.int64), cols, types)
        store.write_segment(fleet="taxi", device_id=f"car-{i % 4}", capture_id=f"c-{i}", campaign="b",
                            segment=seg, catalog=catalog, received_unix=day0 / 1e9)  # fmt: skip


def best(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return round(min(times), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "fleet"
        build(root, args.rows, args.files, args.data)
        engine = QueryEngine(root)
        admin = ClassView(CLASS_ACCESS[Role.ADMIN])
        viewer = ClassView(CLASS_ACCESS[Role.VIEWER])
        pattern = (root / "samples" / "**" / "*.parquet").as_posix()

        def reference(sql: str) -> object:
            conn = duckdb.connect(":memory:")
            conn.execute("SET threads=2")
            options = "hive_partitioning=true, hive_types={'fleet': VARCHAR, 'date': DATE}"
            conn.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{pattern}', {options})")
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        queries: dict[str, dict[str, float]] = {}
        out = {"rows": args.rows * 7, "files": args.files, "queries": queries}
        for name, sql in QUERIES.items():
            ref = best(args.repeat, lambda sql=sql: reference(sql))
            # as the API asks: with the classes read recorded (what an access record needs)
            a = best(args.repeat, lambda sql=sql: engine.query(sql, view=admin, touched=set()))
            w = best(args.repeat, lambda sql=sql: engine.query(sql, view=viewer, touched=set()))
            queries[name] = {
                "reference_ms": ref, "admin_ms": a, "viewer_ms": w,
                "admin_ratio": round(a / ref, 2), "viewer_ratio": round(w / ref, 2),
            }  # fmt: skip
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
