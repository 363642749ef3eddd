"""The fleet store as Iceberg tables: each ingest batch one atomic append, exactly once across retries,
restarts and concurrent coordinators; compaction as a rewrite; erasure that leaves no byte behind;
partition pruning; and engines that are not ours (pyiceberg alone, DuckDB) reading exactly the rows
``fleetloop query`` returns — on a local folder with SQLite, and on S3 (moto) with PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyiceberg.schema import Schema

from fleetloop_cloud.fleet_store import iceberg
from fleetloop_cloud.fleet_store.iceberg import (
    CAPTURES,
    SAMPLES,
    IcebergFleetStore,
    IcebergTables,
    catalog_uri,
    io_properties,
)
from fleetloop_cloud.fleet_store.iceberg_maintenance import IcebergMaintenance
from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.storage import S3Settings
from fleetloop_cloud.storage.s3 import S3ObjectStore
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import QueryError, UnavailableError
from fleetloop_shared.segment import Segment, new_segment_id

DAY0 = int(dt.datetime(2026, 3, 1, 8, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
NS_PER_DAY = 86_400 * 1_000_000_000
ORDERED = "SELECT * FROM samples ORDER BY fleet, date, device_id, signal, t_ns"


def signals() -> Catalog:
    c = Catalog()
    c.add("Vehicle.Speed", DataType.FLOAT64, "m/s")
    c.add("Vehicle.Gear", DataType.INT64)
    c.add("Vehicle.Mode", DataType.STRING)
    return c


def segment(i: int, rows: int = 200, *, day: int = 0) -> Segment:
    t = DAY0 + day * NS_PER_DAY + i * 10_000_000_000 + np.arange(rows, dtype=np.int64) * 10_000_000
    rng = np.random.default_rng(i)
    mode = np.array([("eco", "sport")[k % 2] for k in range(rows)], dtype=object)
    columns = {1: rng.normal(20, 5, rows), 2: rng.integers(0, 6, rows), 3: mode}
    return Segment(
        new_segment_id(), "g", t, columns, {1: DataType.FLOAT64, 2: DataType.INT64, 3: DataType.STRING}
    )


def write(store: Any, seg: Segment, device: str, fleet: str = "taxi") -> int:
    received = DAY0 / 1e9 + 5 * 86400  # days after the samples: each is filed under its own day
    return int(
        store.write_segment(
            fleet=fleet,
            device_id=device,
            capture_id=f"cap-{device}",
            campaign="braking",
            segment=seg,
            catalog=signals(),
            received_unix=received,
        )
    )


def local_tables(root: Path) -> IcebergTables:
    return IcebergTables(catalog_uri(None, root / "metadata.sqlite"), (root / "fleet").as_uri())


def quick(**kw: Any) -> TableSettings:
    return TableSettings(format="iceberg", **{"batch_wait_s": 0.01, **kw})


def test_ingest_reads_back_like_the_parquet_layout_and_other_engines_agree(tmp_path: Path) -> None:
    tables = local_tables(tmp_path / "ice")
    store, parquet = IcebergFleetStore(tables, quick()), FleetStore(tmp_path / "pq")
    segs = [(segment(i, day=i % 2), f"car-{i % 3}", ("taxi", "bus")[i % 2]) for i in range(12)]
    threads = [threading.Thread(target=write, args=(store, s, d, f)) for s, d, f in segs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, d, f in segs:
        write(parquet, s, d, f)
        assert write(store, s, d, f) == 600  # again: the count it had, nothing appended
    ours = QueryEngine(tmp_path / "ice", tables=tables).query(ORDERED, max_rows=100_000)
    theirs = QueryEngine(tmp_path / "pq").query(ORDERED, max_rows=100_000)
    assert len(ours.rows) == 12 * 600 and ours.rows == theirs.rows and ours.columns == theirs.columns
    assert store.counters["segments"] == 12 and store.counters["batches"] < 12  # batches grouped segments

    # pyiceberg alone, and DuckDB over pyiceberg's scan, return exactly these rows
    table = tables.load(SAMPLES)
    keys = ("fleet", "date", "device_id", "signal", "t_ns")
    alone = table.scan().to_arrow().sort_by([(c, "ascending") for c in keys])
    assert [tuple(r.values()) for r in alone.to_pylist()] == [
        tuple(dt.date.fromisoformat(v) if k == "date" else v for k, v in zip(ours.columns, row, strict=True))
        for row in ours.rows
    ]
    con = table.scan().to_duckdb("fleet_samples")
    duck = con.execute(ORDERED.replace("samples", "fleet_samples")).fetchall()
    assert [tuple(str(v) if isinstance(v, dt.date) else v for v in r) for r in duck] == ours.rows
    captures = QueryEngine(tmp_path / "ice", tables=tables).query(
        "SELECT device_id, samples, segments FROM captures ORDER BY device_id"
    )
    assert captures.rows == [("car-0", 2400, 4), ("car-1", 2400, 4), ("car-2", 2400, 4)]


def test_two_coordinators_appending_the_same_segments_at_once_store_each_once(tmp_path: Path) -> None:
    root = tmp_path / "ice"
    first, second = (
        IcebergFleetStore(local_tables(root), quick()),
        IcebergFleetStore(local_tables(root), quick()),
    )
    segs = [segment(i, rows=50) for i in range(30)]
    errors: list[BaseException] = []

    def run(store: IcebergFleetStore, order: list[int]) -> None:
        try:
            for i in order:
                assert write(store, segs[i], f"car-{i % 4}") == 150
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(first, list(range(30)))),
               threading.Thread(target=run, args=(second, list(range(29, -1, -1)))),
               threading.Thread(target=run, args=(first, list(range(0, 30, 2))))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    engine = QueryEngine(root, tables=local_tables(root))
    assert engine.query("SELECT count(*), count(DISTINCT t_ns) FROM samples").rows == [(30 * 150, 30 * 50)]
    assert engine.query("SELECT count(*) FROM captures").rows == [(4,)]
    assert sum(engine.query("SELECT sum(segments) FROM captures").rows[0]) == 30


def test_coordinators_each_retrying_others_segments_lose_no_captures_row(tmp_path: Path) -> None:
    """Devices sending their segments again to whichever coordinator answers: a store's leader appends
    one batch's captures while another thread restores those of a batch committed before. Both once
    worked on one pyiceberg table object that ``refresh`` changes in place, and a commit begun on the old
    metadata landed over the old parent with the new sequence number — a captures snapshot dropped from
    the table (a segment acknowledged and never counted), or "Cannot add snapshot with sequence number
    N older than last sequence number N" for the device."""
    root = tmp_path / "ice"
    stores = [IcebergFleetStore(local_tables(root), quick()) for _ in range(3)]
    segs = [segment(i, rows=20) for i in range(120)]
    wrong: list[BaseException] = []
    acked: set[int] = set()

    def device(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in rng.permutation(len(segs)).tolist():
            for _ in range(10):
                try:
                    assert write(stores[int(rng.integers(3))], segs[i], f"car-{i % 5}") == 60
                    acked.add(i)
                    break
                except UnavailableError as exc:  # a conflict the device sends again, not a broken commit
                    if "sequence number" in str(exc):
                        wrong.append(exc)
                except BaseException as exc:  # reported below
                    wrong.append(exc)

    threads = [threading.Thread(target=device, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and acked == set(range(len(segs)))
    tables = local_tables(root)
    for name in (SAMPLES, CAPTURES):  # each snapshot on top of the one before: none dropped by another
        parents = [s.parent_snapshot_id for s in tables.load(name).metadata.snapshots]
        assert len(parents) == len(set(parents)), f"{name}: two snapshots on one parent"
    engine = QueryEngine(root, tables=tables)
    assert engine.query("SELECT count(*) FROM samples").rows == [(len(segs) * 60,)]
    assert engine.query("SELECT sum(segments) FROM captures").rows == [(len(segs),)]


def test_a_batch_committed_before_a_crash_is_not_appended_again_and_the_ledger_catches_up(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ice"
    repos = open_repositories(root / "metadata.sqlite")
    seg = segment(1)
    assert write(IcebergFleetStore(local_tables(root), quick()), seg, "car-1") == 600
    # the coordinator died before its ledger row: the device retries through a fresh one
    assert not repos.segments.has("car-1", seg.segment_id)
    again = IcebergFleetStore(local_tables(root), quick())
    assert write(again, seg, "car-1") == 600 and again.counters["segments"] == 0
    report = IcebergMaintenance(local_tables(root), repos.segments, quick()).reconcile()
    assert report.reconciled == 1 and repos.segments.has("car-1", seg.segment_id)
    assert repos.segments.totals().samples == 600
    assert QueryEngine(root, tables=local_tables(root)).query("SELECT count(*) FROM samples").rows == [(600,)]
    repos.close()


def test_a_batchs_captures_appended_twice_count_each_segment_once(tmp_path: Path) -> None:
    """The maintenance pass restores the captures of a samples batch it finds without them; the writer,
    still alive between its two commits, then appends them as well: queries count each segment once."""
    root = tmp_path / "ice"
    tables = local_tables(root)
    for i in range(2):
        assert write(IcebergFleetStore(tables, quick()), segment(i), "car-1") == 600
    for snapshot in tables.load(SAMPLES).metadata.snapshots:
        iceberg.append_captures(tables.load(CAPTURES), iceberg.receipts_of(snapshot), "restored")
    engine = QueryEngine(root, tables=local_tables(root))
    assert engine.query("SELECT count(*) FROM captures_segments").rows == [(4,)]  # the rows are there twice
    assert engine.query("SELECT samples, segments FROM captures").rows == [(1200, 2)]


def test_a_retry_restores_the_captures_of_a_batch_whose_writer_died_before_appending_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ice"
    seg, other = segment(1), segment(2)
    dying = IcebergFleetStore(local_tables(root), quick())

    def died(*_: Any) -> Any:
        raise UnavailableError("killed between the samples commit and the captures append")

    with monkeypatch.context() as m:
        m.setattr(iceberg, "append_captures", died)
        with pytest.raises(UnavailableError):
            write(dying, seg, "car-1")
    engine = QueryEngine(root, tables=local_tables(root))
    assert engine.query("SELECT count(*) FROM samples").rows == [(600,)]
    assert engine.query("SELECT count(*) FROM captures").rows == [(0,)]
    # the device sends it again, to another coordinator, beside a new segment: both counted at once
    survivor = IcebergFleetStore(local_tables(root), quick())
    assert write(survivor, seg, "car-1") == 600 and write(survivor, other, "car-1") == 600
    assert survivor.counters["captures_restored"] == 1
    assert engine.query("SELECT samples, segments FROM captures").rows == [(1200, 2)]


def test_compaction_rewrites_a_partition_in_one_snapshot_and_expiry_deletes_the_old_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ice"
    tables = local_tables(root)
    repos = open_repositories(root / "metadata.sqlite")
    store = IcebergFleetStore(tables, quick(batch_wait_s=0))
    for i in range(20):
        write(store, segment(i, rows=100), f"car-{i % 5}")
    engine = QueryEngine(root, tables=tables)
    before = engine.query(ORDERED, max_rows=100_000).rows
    data = root / "fleet" / "samples" / "data"
    assert len(list(data.rglob("*.parquet"))) == 20
    old = tables.load(SAMPLES).current_snapshot()
    maintenance = IcebergMaintenance(tables, repos.segments, quick(compact_min_files=8))
    report = maintenance.compact()
    assert (report.files_absorbed, report.files_written, report.rows) == (20, 1, 20 * 300)
    assert engine.query(ORDERED, max_rows=100_000).rows == before
    assert (
        old is not None and tables.load(SAMPLES).scan(snapshot_id=old.snapshot_id).to_arrow().num_rows == 6000
    )
    assert len(tables.scan_files("samples").files) == 1
    expired = maintenance.expire(older_than_s=0)
    assert expired.snapshots_expired > 0 and expired.reconciled == 20
    assert len(list(data.rglob("*.parquet"))) == 1  # the rewritten files are gone from disk
    assert engine.query(ORDERED, max_rows=100_000).rows == before
    repos.close()


def test_tables_made_before_the_clock_and_privacy_columns_gain_them_and_old_rows_compact_with_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ice"
    with monkeypatch.context() as m:  # the tables as the release before made them
        m.setattr(iceberg, "SAMPLES_SCHEMA", Schema(*[f for f in iceberg.SAMPLES_SCHEMA.fields
                                                      if f.name != "clock_offset_ns"]))  # fmt: skip
        m.setattr(iceberg, "CAPTURES_SCHEMA", Schema(*[f for f in iceberg.CAPTURES_SCHEMA.fields
                                                       if f.name != "privacy"]))  # fmt: skip
        old = local_tables(root)
        assert "clock_offset_ns" not in {f.name for f in old.load(SAMPLES).schema().fields}
        old_store = IcebergFleetStore(old, quick(batch_wait_s=0))
        for i in range(6):
            write(old_store, segment(i, rows=100), "car-1")
    tables = local_tables(root)  # today's code: the new columns come by a schema evolution
    assert "clock_offset_ns" in {f.name for f in tables.load(SAMPLES).schema().fields}
    assert "privacy" in {f.name for f in tables.load(CAPTURES).schema().fields}
    seg = segment(50, rows=100)
    offset = 37_000_000_000  # the device's clock 37 s ahead
    assert IcebergFleetStore(tables, quick(batch_wait_s=0)).write_segment(
        fleet="taxi", device_id="car-2", capture_id="cap-car-2", campaign="braking", segment=seg,
        catalog=signals(), received_unix=DAY0 / 1e9 + 5 * 86400, clock_offset_ns=offset,
        privacy="eu-cars@2#k1",
    ) == 300  # fmt: skip
    engine = QueryEngine(root, tables=tables)
    assert engine.query(
        "SELECT device_id, count(*), count(clock_offset_ns), min(t_ns), max(clock_offset_ns) FROM samples "
        "GROUP BY device_id ORDER BY device_id"
    ).rows == [("car-1", 1800, 0, DAY0, None), ("car-2", 300, 300, int(seg.t_ns.min()) - offset, offset)]
    assert engine.query("SELECT capture_id, privacy FROM captures ORDER BY capture_id").rows == [
        ("cap-car-1", ""), ("cap-car-2", "eu-cars@2#k1"),
    ]  # fmt: skip
    # old files and new compact together; the ledger caught up from the receipts keeps the stamp
    before = engine.query(ORDERED, max_rows=100_000).rows
    repos = open_repositories(root / "metadata.sqlite")
    maintenance = IcebergMaintenance(tables, repos.segments, quick(compact_min_files=4))
    assert maintenance.compact().files_absorbed == 7
    assert engine.query(ORDERED, max_rows=100_000).rows == before
    assert maintenance.reconcile().reconciled == 7
    stamps = {c.device_id: c.privacy for c in repos.segments.captures()}
    assert stamps == {"car-1": "", "car-2": "eu-cars@2#k1"}
    repos.close()


def test_erasure_deletes_a_devices_rows_and_every_byte_of_them(tmp_path: Path) -> None:
    root = tmp_path / "ice"
    tables = local_tables(root)
    repos = open_repositories(root / "metadata.sqlite")
    store = IcebergFleetStore(tables, quick())
    for i in range(6):
        write(store, segment(i), ("car-erase-me", "car-keep")[i % 2])
    report = IcebergMaintenance(tables, repos.segments, quick()).erase_device("car-erase-me")
    assert report.files_deleted > 0
    engine = QueryEngine(root, tables=tables)
    assert engine.query("SELECT DISTINCT device_id FROM samples").rows == [("car-keep",)]
    assert engine.query("SELECT DISTINCT device_id FROM captures").rows == [("car-keep",)]
    leftovers = [p for p in (root / "fleet").rglob("*") if p.is_file() and b"car-erase-me" in p.read_bytes()]
    assert leftovers == []
    repos.close()


def test_queries_prune_partitions_by_fleet_and_date(tmp_path: Path) -> None:
    root = tmp_path / "ice"
    tables = local_tables(root)
    store = IcebergFleetStore(tables, quick())
    for day in range(3):
        write(store, segment(day, day=day), "car-1")
    engine = QueryEngine(root, tables=tables)
    # Remove the first day's file behind the table's back: a query that had to open it fails.
    lost = list((root / "fleet" / "samples" / "data" / "fleet=taxi" / "date=2026-03-01").glob("*.parquet"))
    assert lost
    for path in lost:
        path.unlink()
    pruned = engine.query("SELECT count(*) FROM samples WHERE fleet = 'taxi' AND date = DATE '2026-03-02'")
    assert pruned.rows == [(600,)]
    assert engine.query("SELECT count(*) FROM samples WHERE date > DATE '2026-03-01'").rows == [(1200,)]
    with pytest.raises(QueryError):
        engine.query("SELECT count(*) FROM samples")


def test_on_s3_with_postgresql_failures_are_retried_and_rows_land_exactly_once(
    tmp_path: Path, s3: Any, pg_url: str
) -> None:
    settings = S3Settings(
        bucket=s3.bucket, prefix="prod", endpoint=s3.url, request_timeout_s=1.0, max_attempts=10
    )
    warehouse = S3ObjectStore(settings, area="fleet").location
    tables = IcebergTables(catalog_uri(pg_url, tmp_path / "unused"), warehouse, io_properties(settings))
    store = IcebergFleetStore(tables, quick())
    segs = [segment(i, rows=100) for i in range(8)]
    for i, seg in enumerate(segs):
        if i % 2 == 0:
            s3.faults.fail_next = 3
        else:
            s3.faults.slow_next, s3.faults.delay_s = 1, 1.5
        assert write(store, seg, f"car-{i % 2}") == 300
    s3.faults.clear()
    for i, seg in enumerate(segs[:3]):  # retried uploads through a restarted coordinator: nothing doubled
        assert write(IcebergFleetStore(tables, quick()), seg, f"car-{i % 2}") == 300
    engine = QueryEngine(tmp_path, tables=tables)
    assert engine.query("SELECT count(*), count(DISTINCT t_ns) FROM samples").rows == [(8 * 300, 800)]
    assert s3.faults.counts["failed"] >= 12
    keys = [o.key for o in S3ObjectStore(settings, area="fleet").list()]
    assert any(k.startswith("samples/data/fleet=taxi/date=2026-03-01/") for k in keys)
    assert any(k.startswith("samples/metadata/") for k in keys)
    # an engine that is not ours: pyiceberg on the same catalog and bucket
    table = IcebergTables(catalog_uri(pg_url, tmp_path / "unused"), warehouse, io_properties(settings)).load(
        SAMPLES
    )
    assert table.scan().to_arrow().num_rows == 2400
    assert tables.load(CAPTURES).scan().to_arrow().num_rows == 8
