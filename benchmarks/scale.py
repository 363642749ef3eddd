"""Scale benchmark: what one coordinator, the database and the object store do when the fleet store is
Apache Iceberg tables in S3, compared in the same run with today's local Parquet.

Prints one JSON object with five parts:

* ``ingest`` — ``IngestService.segment`` on segments cut from the real comma2k19 drive, from
  ``--writers`` threads at once (as a coordinator's gRPC and MQTT workers call it, so Iceberg's group
  commit batches them), into (a) the Parquet layout on local disk — the **reference** — and (b) the
  Iceberg tables in moto's S3 server with the catalog in SQLite. Samples per coordinator CPU-second
  (this process's CPU time, every thread; the S3 server's own CPU is the object store's, not the
  coordinator's). Goal: Iceberg ≥ 0.7 × Parquet; target ≥ 1 M samples per CPU-second.
* ``object_store_requests`` — the same Iceberg ingest through a counting relay in front of moto:
  requests (by method) per ingested segment and per commit. Batch sizes are the coordinator's own
  (``fleet_store.batch_wait_s`` as configured by default, 0.05 s): what its group commit forms from the
  ``--writers`` concurrent requests, reported as ``segments_per_batch``; the ingest ledger's rows per
  transaction likewise (concurrent acks share one).
* ``commit_cost`` — CPU per ingest batch as the tables' retained snapshots grow (every snapshot's
  summary is in each new metadata file, so each commit handles all of them): fleetloop's write path vs
  the same appends through pyiceberg's own ``Transaction`` (the reference in the same run).
* ``catalog_commits`` — the catalog's commit is one compare-and-swap of a table's metadata location
  (pyiceberg's SQL catalog: ``UPDATE iceberg_tables SET metadata_location = new WHERE ... AND
  metadata_location = old``); ``--catalog-writers`` threads, each its own connection, swap one row as
  fast as they can for ``--catalog-seconds``: commits per second the database sustains (and how many
  tries lost the race), on SQLite (embedded) and on a private PostgreSQL. Beside it, the commits per
  second the Iceberg ingest above actually made.
* ``query`` — a 1,000-device fleet (``--query-devices``) over ``--query-days`` days in the Iceberg
  tables (``--query-files-per-day`` data files per day, as compaction leaves them); one day's
  per-device aggregate through ``fleetloop query``'s engine with the partition filter (``date = …``:
  files of other days are never opened) and with only a time filter (every file's footer is read).
  Goal: the pruned query ≤ 1 s.

Each figure is the best of ``--repeat`` runs (the machine is shared and noisy).

Usage: ``.venv/bin/python benchmarks/scale.py [--repeat 3] [--writers 32] [--copies 5]``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from pyiceberg.table import Transaction

from fleetloop_cloud.fleet_store import iceberg as iceberg_module
from fleetloop_cloud.fleet_store.iceberg import SAMPLES, IcebergTables, catalog_uri
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.storage import S3Settings
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import CAR, NS, _commit, _hello, _upload, real_segments

ROOT = Path(__file__).resolve().parents[1]


def _fixture(name: str) -> ModuleType:
    """A test fixture module (moto's S3 server behind a counting relay, a private PostgreSQL)."""
    spec = importlib.util.spec_from_file_location(
        f"fleetloop_bench_{name}", ROOT / "tests" / "fixtures" / name
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


s3_fixture = _fixture("s3_server.py")
pg_fixture = _fixture("postgres_server.py")
_buckets = itertools.count()


# -- ingest ------------------------------------------------------------------------------------------
def _uploads(base: list[Segment], copies: int, run: int) -> list[Any]:
    out = []
    for k in range(copies):  # distinct segments: new ids, each copy later in time (same day)
        for s in base:
            seg = dataclasses.replace(
                s, segment_id=new_segment_id(), t_ns=s.t_ns + (k + run * copies) * 120 * NS
            )
            out.append(_upload(seg, f"cap-{run}-{k}"))
    return out


def _ingest_run(c: Coordinator, catalog: Catalog, uploads: list[Any], writers: int) -> dict[str, float]:
    """Every upload through ``c.ingest.segment`` from ``writers`` threads; CPU and wall seconds."""
    c.devices.connect(CAR, _hello("car-1", catalog), time.time())
    warm = _upload(dataclasses.replace(_WARM[0], segment_id=new_segment_id()), "warm-up")
    c.ingest.segment(CAR, warm, time.time())  # imports, caches, the tables' first metadata
    todo = iter(uploads)
    lock = threading.Lock()
    samples = [0] * writers

    def work(i: int) -> None:
        while True:
            with lock:
                request = next(todo, None)
            if request is None:
                return
            samples[i] += c.ingest.segment(CAR, request, time.time()).samples

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"samples": float(sum(samples)), "cpu_s": cpu, "wall_s": wall}


#: A segment far outside the measured day, for the warm-up upload (set once the drive is read).
_WARM: list[Segment] = []


def _coordinator(tmp: Path, s3: Any | None, *, counted: bool = False) -> Coordinator:
    """Parquet on local disk (``s3`` None), or Iceberg in a fresh bucket: straight to moto, or through the
    relay that counts requests (``counted``; the relay runs in this process, so it is not timed)."""
    if s3 is None:
        return Coordinator(tmp / "cloud")
    bucket = f"bench-{next(_buckets)}"
    s3.create_bucket(bucket)
    storage = S3Settings(bucket, endpoint=s3.url if counted else s3.backend_url, region=s3.region)
    return Coordinator(tmp / "cloud", storage=storage, tables=TableSettings(format="iceberg"))


def _stored_bytes(c: Coordinator, tmp: Path) -> int:
    """Bytes of the samples' data files: the Iceberg table's current files, or the Parquet folder."""
    if c.tables is None:
        return sum(p.stat().st_size for p in (tmp / "cloud" / "fleet").rglob("*.parquet"))
    files = c.tables.scan_files("samples")
    return sum(int(i.size or 0) for i in files.filesystem.get_file_info([p for p, _, _ in files.files]))


def bench_ingest(
    recordings: Path, s3: Any, repeat: int, seconds: float, copies: int, writers: int
) -> dict[str, Any]:
    catalog, base = real_segments(recordings, seconds)
    _WARM.append(dataclasses.replace(base[0], t_ns=base[0].t_ns - 10**6 * NS))
    per_set = sum(s.sample_count for s in base)
    best: dict[str, dict[str, float]] = {}
    commits: dict[str, float] = {}
    for r in range(repeat):
        for name in ("parquet_local", "iceberg_s3"):  # interleaved: the same noise for both
            with tempfile.TemporaryDirectory() as tmp:
                c = _coordinator(Path(tmp), s3 if name == "iceberg_s3" else None)
                try:
                    run = _ingest_run(c, catalog, _uploads(base, copies, r), writers)
                    assert run["samples"] == per_set * copies, (run, per_set * copies)
                    rate = run["samples"] / run["cpu_s"]
                    ledger = c.ingest.ledger.counters  # the ledger's rows share transactions
                    run["ledger_rows_per_transaction"] = ledger["rows"] / max(1, ledger["transactions"])
                    run["stored_bytes"] = float(_stored_bytes(c, Path(tmp)))
                    if rate > best.get(name, {}).get("rate", 0.0):
                        best[name] = {**run, "rate": rate}
                        if name == "iceberg_s3":
                            batches = c.fleet_store.counters["batches"]  # type: ignore[union-attr]
                            # two catalog commits per batch: the samples' append and the captures'
                            commits = {"batches": batches,
                                       "segments_per_batch": len(base) * copies / max(1, batches),
                                       "catalog_commits_per_s": 2 * batches / run["wall_s"]}  # fmt: skip
                finally:
                    c.close()
    ours, ref = best["iceberg_s3"], best["parquet_local"]
    return {
        "what": f"IngestService.segment from {writers} threads on real comma2k19 segments: Iceberg tables in "
                "moto's S3 server (catalog in SQLite) vs the Parquet layout on local disk",
        "segments_per_run": len(base) * copies,
        "samples_per_run": per_set * copies,
        "samples_per_segment": round(per_set / len(base)),
        "upload_bytes_per_sample": round(sum(len(encode_segment(x)) for x in base) / per_set, 3),
        "iceberg_s3": {"samples_per_cpu_s": round(ours["rate"]), "cpu_s": round(ours["cpu_s"], 3),
                       "wall_s": round(ours["wall_s"], 3),
                       "ledger_rows_per_transaction": round(ours["ledger_rows_per_transaction"], 1),
                       "stored_bytes_per_sample": round(ours["stored_bytes"] / ours["samples"], 3),
                       **{k: round(v, 2) for k, v in commits.items()}},
        "parquet_local": {"samples_per_cpu_s": round(ref["rate"]), "cpu_s": round(ref["cpu_s"], 3),
                          "wall_s": round(ref["wall_s"], 3),
                          "ledger_rows_per_transaction": round(ref["ledger_rows_per_transaction"], 1),
                          "stored_bytes_per_sample": round(ref["stored_bytes"] / ref["samples"], 3)},
        "ratio_iceberg_to_parquet": round(ours["rate"] / ref["rate"], 3),
        "goal_ratio": 0.7,
        "target_samples_per_cpu_s": 1_000_000,
        "meets_ratio": ours["rate"] >= 0.7 * ref["rate"],
        "meets_target": ours["rate"] >= 1_000_000,
    }  # fmt: skip


def bench_requests(recordings: Path, s3: Any, seconds: float, copies: int, writers: int) -> dict[str, Any]:
    """The Iceberg ingest once more, through the relay that counts every S3 request."""
    catalog, base = real_segments(recordings, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        c = _coordinator(Path(tmp), s3, counted=True)
        try:
            c.devices.connect(CAR, _hello("car-1", catalog), time.time())
            c.ingest.segment(CAR, _upload(dataclasses.replace(_WARM[0], segment_id=new_segment_id()), "w"),
                             time.time())  # fmt: skip
            counter = s3.front.faults.counts
            counter["relayed"] = 0
            s3.methods.clear()
            batches0 = c.fleet_store.counters["batches"]  # type: ignore[union-attr]
            uploads = _uploads(base, copies, 99)
            _ingest_run(c, catalog, uploads, writers)
            batches = c.fleet_store.counters["batches"] - batches0  # type: ignore[union-attr]
            total = counter["relayed"]
            methods = dict(s3.methods)
        finally:
            c.close()
    return {
        "what": "S3 requests the Iceberg ingest made (counted at a relay in front of moto), per segment and "
                "per "
                "batch (one batch = one samples append + one captures append)",
        "segments": len(uploads),
        "batches": batches,
        "requests": total,
        "by_method": methods,
        "requests_per_segment": round(total / len(uploads), 2),
        "requests_per_batch": round(total / max(1, batches), 1),
    }  # fmt: skip


# -- commit cost as snapshots accumulate -------------------------------------------------------------
def _commit_cpu(catalog: Catalog, seg: Segment, commits: int, every: int) -> list[float]:
    """One-segment batches into fresh Iceberg tables (a local folder: CPU, not the network): CPU ms per
    commit over each ``every`` commits, as the tables' retained snapshots grow."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        c = Coordinator(Path(tmp) / "cloud", tables=TableSettings(format="iceberg", batch_wait_s=0))
        try:
            c.devices.connect(CAR, _hello("car-1", catalog), time.time())
            t0 = time.process_time()
            for i, request in enumerate(_uploads([seg], commits, 7)):
                c.ingest.segment(CAR, request, time.time())
                if (i + 1) % every == 0:
                    now = time.process_time()
                    out.append(round((now - t0) * 1000 / every, 1))
                    t0 = now
        finally:
            c.close()
    return out


def bench_commit_cost(recordings: Path, commits: int, every: int) -> dict[str, Any]:
    """Our write path against the same appends through pyiceberg's own ``Transaction`` (the reference)."""
    catalog, base = real_segments(recordings, 1.0)
    seg = base[0]
    ours = _commit_cpu(catalog, seg, commits, every)
    memo = iceberg_module._AppendTransaction
    iceberg_module._AppendTransaction = Transaction  # type: ignore[misc]
    try:
        stock = _commit_cpu(catalog, seg, commits, every)
    finally:
        iceberg_module._AppendTransaction = memo  # type: ignore[misc]
    return {
        "what": "CPU ms per ingest batch (one samples + one captures commit) as the tables' snapshots grow "
                f"(averaged over each {every} commits): fleetloop's write path vs the same appends through "
                "pyiceberg's Transaction, which re-derives and deep-copies the whole metadata on every read",
        "snapshots": [every * (i + 1) for i in range(len(ours))],
        "ours_ms_per_batch": ours,
        "pyiceberg_transaction_ms_per_batch": stock,
        "ratio_at_last": round(stock[-1] / ours[-1], 2),
    }  # fmt: skip


# -- catalog commits ---------------------------------------------------------------------------------
_CAS_TABLE = ("CREATE TABLE IF NOT EXISTS iceberg_tables (catalog_name VARCHAR(255) NOT NULL, "
              "table_namespace VARCHAR(255) NOT NULL, table_name VARCHAR(255) NOT NULL, "
              "metadata_location VARCHAR(1000), previous_metadata_location VARCHAR(1000), "
              "PRIMARY KEY (catalog_name, table_namespace, table_name))")  # fmt: skip


def _cas_writers(connect: Callable[[], Any], param: str, writers: int, seconds: float) -> dict[str, Any]:
    """``writers`` threads swapping one table's metadata location as pyiceberg's SQL catalog does."""
    setup = connect()
    setup.execute(_CAS_TABLE)
    setup.execute("DELETE FROM iceberg_tables")
    setup.execute(f"INSERT INTO iceberg_tables VALUES ('c', 'fleetloop', 'samples', {param}, NULL)", ("m-0",))
    setup.commit()
    setup.close()
    done, lost = [0] * writers, [0] * writers
    stop = threading.Event()
    q = (f"UPDATE iceberg_tables SET metadata_location = {param}, previous_metadata_location = {param} "
         f"WHERE catalog_name = 'c' AND table_namespace = 'fleetloop' AND table_name = 'samples' "
         f"AND metadata_location = {param}")  # fmt: skip

    def work(i: int) -> None:
        conn = connect()
        n = 0
        while not stop.is_set():
            current = conn.execute("SELECT metadata_location FROM iceberg_tables").fetchone()[0]
            conn.commit()
            n += 1
            try:
                cur = conn.execute(q, (f"m-{i}-{n}", current, current))
                swapped = cur.rowcount == 1
                conn.commit()
            except (sqlite3.OperationalError, psycopg.errors.SerializationFailure):
                conn.rollback()
                swapped = False
            if swapped:
                done[i] += 1
            else:
                lost[i] += 1
        conn.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "writers": writers,
        "commits_per_s": round(sum(done) / wall),
        "lost_races_per_s": round(sum(lost) / wall),
    }


def bench_catalog(pg_url: str, writers: list[int], seconds: float, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": "compare-and-swap of a table's metadata location (pyiceberg SQL catalog's commit) from N "
                "threads, each its own connection: SQLite file (WAL) vs PostgreSQL (fsync off as in tests; "
                "synchronous_commit on)",
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.sqlite"

        def sqlite_conn() -> Any:
            conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            return conn

        for backend, connect, param in (("sqlite", sqlite_conn, "?"),
                                        ("postgresql", lambda: psycopg.connect(pg_url), "%s")):  # fmt: skip
            runs = []
            for n in writers:
                best = max((_cas_writers(connect, param, n, seconds) for _ in range(repeat)),
                           key=lambda r: r["commits_per_s"])  # fmt: skip
                runs.append(best)
            out[backend] = runs
    return out


# -- query -------------------------------------------------------------------------------------------
SIGNALS = ("Vehicle.Speed", "Vehicle.Powertrain.EngineSpeed", "Vehicle.Chassis.SteeringWheel.Angle",
           "Vehicle.Acceleration.Longitudinal")  # fmt: skip


def _day_table(day: datetime.date, devices: int, per_device: int, part: int, parts: int) -> pa.Table:
    """Part ``part`` of ``parts`` of one day's rows: ``per_device`` samples per device over the signals."""
    chosen = np.arange(part, devices, parts)
    n = len(chosen) * per_device
    rng = np.random.default_rng(day.toordinal() * 1000 + part)
    start = int(datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()) * NS
    device_idx = np.repeat(chosen, per_device)
    t = start + np.sort(rng.integers(0, 86_400 * NS, n)).astype(np.int64)
    names = np.array([f"car-{i:05d}" for i in range(devices)], dtype=object)
    signals = np.array(SIGNALS, dtype=object)
    return pa.table({
        "device_id": pa.array(names[device_idx], pa.string()),
        "capture_id": pa.array(names[device_idx], pa.string()),
        "campaign": pa.array(["bench"] * n, pa.string()),
        "signal": pa.array(signals[np.arange(n) % len(signals)], pa.string()),
        "t_ns": pa.array(t, pa.int64()),
        "value": pa.array(rng.normal(50, 20, n), pa.float64()),
        "value_int": pa.nulls(n, pa.int64()),
        "value_str": pa.nulls(n, pa.string()),
        "fleet": pa.array(["fleet-a"] * n, pa.string()),
        "date": pa.array([day] * n, pa.date32()),
        "clock_offset_ns": pa.nulls(n, pa.int64()),
    })  # fmt: skip


def bench_query(
    devices: int, days: int, per_device_day: int, files_per_day: int, repeat: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tables = IcebergTables(
            catalog_uri(None, Path(tmp) / "catalog.sqlite"), (Path(tmp) / "tables").as_uri()
        )
        table = tables.load(SAMPLES)
        first = datetime.date(2026, 11, 1)
        t0 = time.perf_counter()
        for d in range(days):
            day = first + datetime.timedelta(days=d)
            for part in range(files_per_day):
                rows = _day_table(day, devices, per_device_day, part, files_per_day)
                table.append(rows.cast(table.schema().as_arrow()))
        built_s = time.perf_counter() - t0
        engine = QueryEngine(Path(tmp) / "unused", tables=tables)
        day = first + datetime.timedelta(days=days // 2)
        lo = int(datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()) * NS
        hi = lo + 86_400 * NS
        select = "SELECT device_id, count(*) AS n, avg(value) AS mean FROM samples WHERE "
        queries = {
            "pruned": f"{select} fleet = 'fleet-a' AND date = DATE '{day.isoformat()}' GROUP BY device_id",
            "unpruned": f"{select} t_ns >= {lo} AND t_ns < {hi} GROUP BY device_id",
        }
        times: dict[str, float] = {}
        answers: dict[str, Any] = {}
        for _ in range(repeat):
            for name, sql in queries.items():
                q0 = time.perf_counter()
                result = engine.query(sql, max_rows=devices)
                spent = time.perf_counter() - q0
                times[name] = min(times.get(name, spent), spent)
                answers[name] = sorted(result.rows)
        assert answers["pruned"] == answers["unpruned"] and len(answers["pruned"]) == devices
        day_rows = sum(int(r[1]) for r in answers["pruned"])
        tables.close()
    return {
        "what": f"one day's per-device count and mean of a {devices}-device fleet ({days} days, "
                f"{files_per_day} "
                "data files per day) in the Iceberg tables through fleetloop query's DuckDB engine, with "
                "the partition filter (date) and with a time filter only",
        "rows_total": devices * per_device_day * days,
        "rows_in_day": day_rows,
        "data_files": days * files_per_day,
        "build_s": round(built_s, 1),
        "pruned_s": round(times["pruned"], 3),
        "unpruned_s": round(times["unpruned"], 3),
        "ratio_unpruned_to_pruned": round(times["unpruned"] / times["pruned"], 2),
        "goal_pruned_s": 1.0,
        "meets_goal": times["pruned"] <= 1.0,
    }  # fmt: skip


# -- the S3 endpoint with request counts by method -------------------------------------------------------
@contextmanager
def counted_s3() -> Iterator[Any]:
    """moto's S3 server; ``url`` goes through the fault-free relay that counts requests (also by method)."""
    with s3_fixture.s3_endpoint() as endpoint:
        methods: Counter[str] = Counter()
        take = endpoint.front.faults.take

        def counted(method: str) -> str:
            methods[method] += 1
            return str(take(method))

        endpoint.front.faults.take = counted
        endpoint.methods = methods
        yield endpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="recordings directory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of the drive per segment set")
    ap.add_argument("--copies", type=int, default=5, help="copies of the segment set ingested per run")
    ap.add_argument("--writers", type=int, default=32, help="threads calling ingest at once")
    ap.add_argument(
        "--catalog-writers", default="1,4,16", help="concurrent catalog writers (comma-separated)"
    )
    ap.add_argument("--catalog-seconds", type=float, default=3.0)
    ap.add_argument("--query-devices", type=int, default=1000)
    ap.add_argument("--query-days", type=int, default=7)
    ap.add_argument("--query-samples", type=int, default=2000, help="samples per device and day")
    ap.add_argument("--query-files-per-day", type=int, default=24)
    ap.add_argument("--commits", type=int, default=300, help="commits in the commit-cost runs")
    ap.add_argument(
        "--only", choices=("ingest", "requests", "commit-cost", "catalog", "query"), action="append"
    )
    args = ap.parse_args()
    recordings = Path(args.data) if args.data else find_recordings()
    only = set(args.only or ("ingest", "requests", "commit-cost", "catalog", "query"))
    if recordings is None and only & {"ingest", "requests", "commit-cost"}:
        print("real recordings not found (--data, $FLEETLOOP_DATA or ../shared/data/real)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "commit": _commit(),
    }
    os.environ.update({"AWS_ACCESS_KEY_ID": s3_fixture.ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": s3_fixture.SECRET_KEY,
                       "AWS_REGION": s3_fixture.REGION})  # fmt: skip
    if only & {"ingest", "requests"}:
        assert recordings is not None
        with counted_s3() as s3:
            if "ingest" in only:
                out["ingest"] = bench_ingest(
                    recordings, s3, args.repeat, args.seconds, args.copies, args.writers
                )
            if "requests" in only:
                if not _WARM:
                    _, base = real_segments(recordings, 1.0)
                    _WARM.append(dataclasses.replace(base[0], t_ns=base[0].t_ns - 10**6 * NS))
                out["object_store_requests"] = bench_requests(recordings, s3, args.seconds, 1, args.writers)
    if "commit-cost" in only:
        assert recordings is not None
        out["commit_cost"] = bench_commit_cost(recordings, args.commits, max(1, args.commits // 3))
    if "catalog" in only:
        with pg_fixture.private_postgres() as pg_url:
            writers = [int(x) for x in args.catalog_writers.split(",")]
            out["catalog_commits"] = bench_catalog(pg_url, writers, args.catalog_seconds, args.repeat)
        if "ingest" in out:
            out["catalog_commits"]["iceberg_ingest_made_per_s"] = out["ingest"]["iceberg_s3"][
                "catalog_commits_per_s"
            ]
    if "query" in only:
        out["query"] = bench_query(args.query_devices, args.query_days, args.query_samples,
                                   args.query_files_per_day, args.repeat)  # fmt: skip
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
