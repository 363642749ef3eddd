"""Erasure of one device's data and retention per fleet, against a real coordinator's stores: Parquet
files on disk, Iceberg tables in a folder and in an S3 bucket (moto) with PostgreSQL, the metadata
database, the upload staging area.

What must hold: after an erasure no row of the device remains anywhere a reader can reach — no file
holds its id or its values (scanned as bytes and decoded), SQL through the coordinator, DuckDB on the
files, pyiceberg on the tables and the metadata tables find nothing — while the other devices' data is
whole; the device's earlier data is refused when it comes again, its later data is taken; an erasure a
killed coordinator left half done is finished by the next one; one coordinator at a time runs the job.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleetloop_cloud.fleet_store.compaction import CompactionPolicy, Compactor
from fleetloop_cloud.fleet_store.erasure import ParquetLifecycle
from fleetloop_cloud.fleet_store.iceberg import CAPTURES, SAMPLES
from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.identity.roles import Role
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.lifecycle import LEASE_TTL_S, SETTLE_S, DataLifecycle, retention_cut
from fleetloop_cloud.storage import S3Settings
from fleetloop_cloud.storage.s3 import S3ObjectStore
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import PermissionDeniedError, PrivacyViolationError
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

GONE, KEPT = "car-erase-me", "car-keep"
#: Values only the erased device ever sent: a VIN and a speed no other device reaches.
GONE_VIN, KEPT_VIN = "WVWZZZ1JZXW424242", "WVWZZZ1JZXW000007"
GONE_SPEED = 987.654321
NS = 1_000_000_000
ADMIN = Caller.operator("alice", Role.ADMIN)
LOCAL = Caller.local()


def hello(device_id: str) -> device_pb2.Hello:
    h = device_pb2.Hello(device_id=device_id, fleet="taxi", data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    h.catalog.add(id=2, path="Vehicle.VehicleIdentification.VIN", data_type=device_pb2.DATA_TYPE_STRING)
    return h


def segment(device: str, t0_ns: int, rows: int = 100) -> Segment:
    t = t0_ns + np.arange(rows, dtype=np.int64) * 10_000_000
    speed = np.full(rows, GONE_SPEED) if device == GONE else np.linspace(0, 50, rows)
    vin = np.array([GONE_VIN if device == GONE else KEPT_VIN] * rows, dtype=object)
    return Segment(new_segment_id(), "g", t, {1: speed, 2: vin}, {1: DataType.FLOAT64, 2: DataType.STRING})


def upload(c: Coordinator, device: str, seg: Segment, now: float) -> int:
    request = ingest_pb2.UploadSegmentRequest(
        device_id=device, segment_id=seg.segment_id, capture_id=f"cap-{device}-{seg.t_ns[0]}",
        campaign="trips", priority=5, segment=encode_segment(seg),
    )  # fmt: skip
    return c.ingest.segment(Caller.device(device, transport="test", proven=True), request, now).samples


def stage_partial(c: Coordinator, device: str, seg: Segment) -> None:
    """Half of a resumable upload, left in the staging area (the device went away mid-upload)."""
    import hashlib

    whole = ingest_pb2.UploadSegmentRequest(
        device_id=device, segment_id=seg.segment_id, capture_id="cap-partial", campaign="trips",
        segment=encode_segment(seg),
    ).SerializeToString()  # fmt: skip
    c.staging.put(device, seg.segment_id, offset=0, total_bytes=len(whole),
                  total_sha256=hashlib.sha256(whole).digest(), data=whole[: len(whole) // 2])  # fmt: skip


def fill(c: Coordinator, now: float, days: int = 3) -> None:
    """Both devices upload over ``days`` days up to ``now``; the erased one leaves a partial upload."""
    for device in (GONE, KEPT):
        c.devices.connect(Caller.device(device, transport="test", proven=True), hello(device), now)
        for day in range(days):
            for k in range(3):
                upload(c, device, segment(device, int((now - day * 86400 - 60 * (k + 1)) * NS)), now)
    stage_partial(c, GONE, segment(GONE, int((now - 60) * NS)))


def parquet_cells(table: pa.Table) -> set[Any]:
    return {v for column in table.columns for v in column.to_pylist()}


def assert_no_trace(c: Coordinator, files: list[tuple[str, bytes]]) -> None:
    """Nothing of the erased device in ``files`` (name, bytes), in SQL, in DuckDB or in the metadata."""
    needles = (GONE.encode(), GONE_VIN.encode())
    holding = [name for name, data in files if any(n in data for n in needles)]
    assert holding == [], f"files holding the erased device's bytes: {holding}"
    parquet = [(name, data) for name, data in files if name.endswith(".parquet")]
    assert parquet, "no Parquet files to look into"
    for name, data in parquet:  # compressed pages hide bytes: decode every cell too
        cells = parquet_cells(pq.read_table(pa.BufferReader(data)))
        assert not cells & {GONE, GONE_VIN, GONE_SPEED}, name
    # through the coordinator's SQL, for both tables
    assert c.queries.sql(LOCAL, "SELECT DISTINCT device_id FROM samples").rows == [(KEPT,)]
    assert c.queries.sql(LOCAL, f"SELECT count(*) FROM samples WHERE value_str = '{GONE_VIN}' "
                                f"OR value = {GONE_SPEED}").rows == [(0,)]  # fmt: skip
    assert {r[0] for r in c.queries.sql(LOCAL, "SELECT device_id FROM captures").rows} == {KEPT}
    # the metadata: ledger and captures rows, staging
    segments = c.repositories.segments
    assert {cap.device_id for cap in segments.captures()} == {KEPT}
    assert segments.forget(GONE) == 0
    assert c.staging.staged_bytes() == 0


def local_files(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


@pytest.fixture
def now() -> float:
    """The wall clock, or the last second of yesterday (UTC) in the first minutes of a day: ``fill``
    puts each day's uploads up to three minutes before ``now``, and the retention tests expect today's
    to be dated today (a run at 00:00:45 once put them all on the day before)."""
    t = time.time()
    into_day = t % 86400
    return t - into_day - 1 if into_day < 600 else t


def erase_and_settle(c: Coordinator, now: float) -> dict[str, int]:
    status = c.lifecycle.erase(ADMIN, GONE, now)
    assert status.state == "erasing" and status.removed["store_rows_deleted"] > 0
    assert status.removed["staged_uploads"] == 1 and status.removed["ledger_rows"] > 0
    assert c.lifecycle.run_once(now + SETTLE_S + 1)  # the confirming pass
    done = c.lifecycle.erasure(ADMIN, GONE)
    assert done.state == "done" and done.done_at is not None
    return status.removed


def check_reuploads(c: Coordinator, now: float) -> None:
    """Its data from before the erasure is refused as a privacy violation; what it captures after is
    taken (and the erasure's refusal is counted like the policy's)."""
    with pytest.raises(PrivacyViolationError, match="before its erasure"):
        upload(c, GONE, segment(GONE, int((now - 7200) * NS)), now + 2)
    assert upload(c, GONE, segment(GONE, int((now + 5) * NS)), now + 10) == 200


def test_parquet_erasure_leaves_nothing_a_reader_can_reach(tmp_path: Path, now: float) -> None:
    c = Coordinator(tmp_path / "cloud")
    fill(c, now)
    # compacted files hold both devices' rows (and name the erased device's files as absorbed)
    assert isinstance(c.compactor, Compactor)
    eager = Compactor(c.fleet_store, c.repositories.segments.has,  # type: ignore[arg-type]
                      CompactionPolicy(min_files=2, min_age_s=0.0, grace_s=3600.0))  # fmt: skip
    assert eager.run_once().files_written >= 3
    before = c.queries.sql(LOCAL, "SELECT count(*) FROM samples WHERE device_id = 'car-keep'").rows
    tmp = next((tmp_path / "cloud" / "fleet" / "samples").glob("fleet=taxi/date=*"))
    (tmp / ".stray.parquet.0123.tmp").write_bytes(GONE.encode())  # a write a crash interrupted

    erase_and_settle(c, now)

    cloud = tmp_path / "cloud"
    assert_no_trace(c, local_files(cloud / "fleet") + local_files(cloud / "staging"))
    assert c.queries.sql(LOCAL, "SELECT count(*) FROM samples WHERE device_id = 'car-keep'").rows == before
    glob = str(tmp_path / "cloud" / "fleet" / "samples" / "**" / "*.parquet")
    direct = duckdb.sql(f"SELECT DISTINCT device_id FROM read_parquet('{glob}', hive_partitioning=true, "
                        "union_by_name=true)").fetchall()  # fmt: skip
    assert direct == [(KEPT,)]  # DuckDB alone, absorbed files and all
    with sqlite3.connect(tmp_path / "cloud" / "metadata.sqlite") as db:
        for table in ("segments", "captures"):
            assert db.execute(f"SELECT count(*) FROM {table} WHERE device_id = ?", (GONE,)).fetchone() == (0,)
    # audited: who asked, and that it was done; the entries hold counts, not data
    entries = [e for e in c.access.audit.entries(_all()) if e.action == "devices.erase"]
    assert [(e.actor, e.after) for e in entries] == [("alice", "erasing"), ("data-lifecycle", "done")]
    assert not any(GONE_VIN in e.detail for e in entries)
    check_reuploads(c, now)
    c.stop()
    c.close()


def _all() -> Any:
    from fleetloop_cloud.repositories.records import AuditFilter

    return AuditFilter()


def test_iceberg_erasure_on_s3_and_postgresql(tmp_path: Path, s3: Any, pg_url: str, now: float) -> None:
    storage = S3Settings(bucket=s3.bucket, prefix="prod", endpoint=s3.url, request_timeout_s=5.0)
    c = Coordinator(tmp_path / "cloud", db=pg_url, storage=storage,
                    tables=TableSettings(format="iceberg", batch_wait_s=0.0))  # fmt: skip
    fill(c, now)
    removed = erase_and_settle(c, now)
    assert removed["store_snapshots_expired"] > 0 and removed["store_files_deleted"] > 0

    objects = S3ObjectStore(storage, area="fleet")
    bucket = [(o.key, objects.get(o.key)) for o in objects.list()]
    staged = S3ObjectStore(storage, area="staging")
    assert staged.list() == []
    assert_no_trace(c, bucket)
    # pyiceberg alone: no row, and no live or deleted manifest entry naming the device in its bounds
    assert c.tables is not None
    for name in (SAMPLES, CAPTURES):
        table = c.tables.load(name)
        rows = table.scan().to_arrow()
        assert GONE not in set(rows["device_id"].to_pylist()) and KEPT in set(rows["device_id"].to_pylist())
        for snapshot in table.metadata.snapshots:
            assert GONE not in json.dumps(snapshot.summary.additional_properties if snapshot.summary else {})
            for manifest in snapshot.manifests(table.io):
                for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                    bounds = (entry.data_file.lower_bounds or {}) | (entry.data_file.upper_bounds or {})
                    assert not any(GONE.encode() in b or GONE_VIN.encode() in b for b in bounds.values())
    check_reuploads(c, now)
    c.stop()
    c.close()


def test_retention_drops_old_days_from_store_and_ledger(tmp_path: Path, now: float) -> None:
    c = Coordinator(tmp_path / "cloud")
    fill(c, now, days=5)
    with pytest.raises(PermissionDeniedError, match=r"retention\.set needs role admin"):
        c.lifecycle.set_retention(Caller.operator("olga", Role.OPERATOR), "taxi", 2, now)
    assert c.lifecycle.set_retention(ADMIN, "taxi", 2, now) == {
        "fleet": "taxi", "days": 2, "keeps_from": retention_cut(2, now).isoformat()}  # fmt: skip
    assert c.lifecycle.run_once(now)
    cut = retention_cut(2, now).isoformat()
    dates = {str(r[0]) for r in c.queries.sql(LOCAL, "SELECT DISTINCT date FROM samples").rows}
    assert dates and min(dates) >= cut
    partitions = [p.name for p in (tmp_path / "cloud" / "fleet" / "samples" / "fleet=taxi").iterdir()]
    assert partitions and all(p >= f"date={cut}" for p in partitions)
    cut_ns = int(dt.datetime.fromisoformat(cut).replace(tzinfo=dt.UTC).timestamp()) * NS
    assert min(cap.last_ns for cap in c.repositories.segments.captures()) >= cut_ns
    assert c.lifecycle.rows_deleted["retention"] > 0
    assert [e.action for e in c.access.audit.entries(_all()) if e.action.startswith("retention")] == [
        "retention.set", "retention.apply"]  # fmt: skip
    assert c.lifecycle.clear_retention(ADMIN, "taxi", now) == {"fleet": "taxi", "days": None}
    c.stop()
    c.close()


def test_iceberg_retention(tmp_path: Path, now: float) -> None:
    c = Coordinator(tmp_path / "cloud", tables=TableSettings(format="iceberg", batch_wait_s=0.0))
    fill(c, now, days=4)
    c.lifecycle.set_retention(ADMIN, "taxi", 1, now)
    assert c.lifecycle.run_once(now)
    today = retention_cut(1, now).isoformat()
    assert {str(r[0]) for r in c.queries.sql(LOCAL, "SELECT DISTINCT date FROM samples").rows} <= {today}
    assert c.tables is not None
    captures = c.tables.load(CAPTURES).scan().to_arrow()
    assert captures.num_rows and {str(d) for d in captures["date"].to_pylist()} <= {today}
    # a pass with nothing to delete leaves the snapshots (and their receipts) to the ordinary expiry
    upload(c, KEPT, segment(KEPT, int((now - 1) * NS)), now)
    before = len(c.tables.load(SAMPLES).metadata.snapshots)
    assert c.lifecycle.run_once(now + 1)
    assert len(c.tables.load(SAMPLES).metadata.snapshots) == before > 1
    c.stop()
    c.close()


def test_one_coordinator_at_a_time_runs_the_job(tmp_path: Path, now: float) -> None:
    repos = open_repositories(tmp_path / "metadata.sqlite")
    store = ParquetLifecycle(FleetStore(tmp_path / "fleet"))

    def job(holder: str) -> DataLifecycle:
        from fleetloop_cloud.services.access import Access, Refusals
        from fleetloop_cloud.uploads.staging import UploadStaging

        staging = UploadStaging(tmp_path / "staging", max_upload_bytes=1 << 20)
        return DataLifecycle(repos.retention, repos.segments, repos.devices, store, staging,
                             Access(Refusals(), repos.audit_log), holder=holder)  # fmt: skip

    a, b = job("a"), job("b")
    assert a.run_once(now) and not b.run_once(now + 1)
    assert b.passes["busy"] == 1
    a.stop()  # a coordinator stopping hands the lease over at once
    assert b.run_once(now + 2) and not a.run_once(now + 3)
    assert a.run_once(now + 3 + LEASE_TTL_S)  # one that died loses it after the lease
    repos.close()


_KILLED_ERASER = """
import sys, time
from pathlib import Path
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.identity.roles import Role
c = Coordinator(Path(sys.argv[1]))
c.lifecycle.run_once(time.time())  # takes the job's lease, then dies holding it
print("ready", flush=True)
c.lifecycle.erase(Caller.operator("alice", Role.ADMIN), sys.argv[2], time.time())
print("erased", flush=True)
time.sleep(60)
"""


def test_an_erasure_killed_half_way_is_finished_by_the_next_coordinator(tmp_path: Path, now: float) -> None:
    data = tmp_path / "cloud"
    c = Coordinator(data)
    fill(c, now, days=6)
    c.stop()
    c.close()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_ERASER, str(data), GONE],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # killed as soon as its request is in the database
            with sqlite3.connect(data / "metadata.sqlite", timeout=30) as db:
                if db.execute("SELECT count(*) FROM erasures").fetchone() == (1,):
                    break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    restarted = Coordinator(data)
    later = time.time()
    assert restarted.lifecycle.erasure(ADMIN, GONE).state == "erasing"
    assert not restarted.lifecycle.run_once(later)  # the dead one's lease holds until it runs out
    assert restarted.lifecycle.run_once(later + LEASE_TTL_S + 1)
    assert restarted.lifecycle.erasure(ADMIN, GONE).state == "done"
    assert_no_trace(restarted, local_files(data / "fleet") + local_files(data / "staging"))
    restarted.stop()
    restarted.close()


def test_the_cli_and_http_surface(
    running_coordinator: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetloop_cli.main import main

    rc = running_coordinator
    c: Coordinator = rc.coordinator
    now = time.time()
    fill(c, now, days=1)
    monkeypatch.setenv("FLEETLOOP_TOKEN", rc.token)
    cloud = ["--cloud", rc.http_base]
    assert main(["fleet", "retention", "set", "taxi", "--days", "30", *cloud, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["days"] == 30
    assert main(["fleet", "retention", "get", "taxi", "--cloud", rc.http_base, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["days"] == 30
    assert main(["fleet", "retention", "set", "taxi", "--days", "0", "--cloud", rc.http_base]) != 0
    assert "days must be a whole number from 1" in capsys.readouterr().err
    assert main(["devices", "erase", GONE, "--cloud", rc.http_base, "-o", "json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["state"] == "erasing" and "confirmed by the coordinators' next pass" in out.err
    assert main(["devices", "erase", "no-such-car", "--cloud", rc.http_base]) != 0
    assert "unknown device 'no-such-car'" in capsys.readouterr().err
    # a viewer may read, not erase; the erasure is audited
    status, _, body = rc.call("POST", "/v1/tokens", b'{"name": "vera", "role": "viewer"}')
    viewer = json.loads(body)["token"]
    assert rc.call("POST", f"/v1/devices/{KEPT}/erase", token=viewer)[0] == 403
    assert rc.call("GET", f"/v1/devices/{GONE}/erasure", token=viewer)[0] == 200
    assert rc.call("PUT", "/v1/fleets/taxi/retention", b'{"days": 1}', token=viewer)[0] == 403
    status, _, body = rc.call("GET", "/v1/audit?kind=devices.erase")
    assert status == 200 and [e["target"] for e in json.loads(body)] == [f"device/{GONE}"]
    assert c.queries.sql(LOCAL, "SELECT DISTINCT device_id FROM samples").rows == [(KEPT,)]
    status, _, body = rc.call("GET", "/metrics")
    assert b'fleetloop_lifecycle_rows_deleted_total{reason="erasure"}' in body
