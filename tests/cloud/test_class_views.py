"""Signal classes enforced where the data is read: a viewer, over the real HTTP API and the real CLI,
against a Parquet and an Iceberg fleet store, tries every trick we know to read a VIN, a driver's
heart rate or an exact position — and gets none; every query and export leaves an access record that
reads back from the audit log, whose chain still verifies.

The data is a real drive's speed (comma2k19) with identifying and position signals beside it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.repositories.records import AuditFilter, SegmentReceipt
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.classification import SignalClass, classification_from_document
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.segment import Segment, new_segment_id

from .conftest import http_call

VIN = "WVWZZZ1JZXW000001"
BADGE = "badge-4711-anna"
LAT, LON = 48.137154, 11.576124
#: The centre of their 0.01° cell: what a viewer may see.
LAT_CELL, LON_CELL = 48.135, 11.575
HEART = 73.25
RECEIVED = 1_767_000_000.0
#: Texts no reader below admin may ever see, in any cell or error message (exact positions included:
#: their first five decimals).
SECRETS = (VIN, "WVWZZZ", BADGE, "48.13715", "11.57612", "73.25")
#: Tricks a viewer tries; each must answer without a secret (or be refused).
ATTACKS = (
    "SELECT * FROM samples",
    "SELECT value_str FROM samples WHERE signal LIKE '%VIN%'",
    "SELECT a.value_str, b.value FROM samples a JOIN samples b USING (device_id, t_ns) LIMIT 5000",
    "SELECT (SELECT max(value_str) FROM samples), (SELECT max(value) FROM samples WHERE signal LIKE '%Lat%')",
    "WITH x AS (SELECT * FROM samples) SELECT * FROM x WHERE value_str IS NOT NULL",
    "SELECT value_str FROM samples UNION SELECT CAST(value AS VARCHAR) FROM samples",
    "SELECT CAST(value_str AS BLOB), CAST(value AS VARCHAR), printf('%.9f', value) FROM samples",
    "SELECT string_agg(DISTINCT value_str, ','), list(DISTINCT value) FROM samples",
    "SELECT count(*) FROM samples WHERE value_str = 'WVWZZZ1JZXW000001'",
    "SELECT value FROM samples WHERE signal LIKE '%Latitude' AND value BETWEEN 48.1371 AND 48.1372",
    "SELECT t_ns FROM samples WHERE signal LIKE '%Latitude' AND value > 48.136",
    "SELECT CAST(value_str AS INTEGER) FROM samples WHERE signal LIKE '%VIN%'",
    "SELECT * FROM query('SELECT * FROM samples WHERE value_str IS NOT NULL')",
    "SELECT * FROM query_table('samples')",
    "SELECT * FROM samples_files",
    "SELECT * FROM stored_samples",
    "SELECT * FROM dataset",
    "SELECT * FROM source",
    "SELECT * FROM python_arrow_scan()",
    "SELECT * FROM read_parquet('{store}/**/*.parquet')",
    "SELECT * FROM parquet_scan('{store}/**/*.parquet', hive_partitioning=true)",
    "SELECT * FROM read_csv('{store}/**/*.parquet')",
    "SELECT * FROM glob('{store}/**')",
    "SELECT * FROM '{store}/**/*.parquet'",
    "SELECT sql FROM duckdb_views()",
    "SELECT * FROM duckdb_tables()",
    "SELECT fleetloop_read('personal')",
)


def catalog() -> Catalog:
    c = Catalog()
    c.add("Vehicle.Speed", DataType.FLOAT64, "m/s")
    c.add("Vehicle.VehicleIdentification.VIN", DataType.STRING)
    c.add("Vehicle.CurrentLocation.Latitude", DataType.FLOAT64, "degrees")
    c.add("Vehicle.CurrentLocation.Longitude", DataType.FLOAT64, "degrees")
    c.add("Vehicle.CurrentLocation.Altitude", DataType.FLOAT64, "m")
    c.add("Vehicle.Driver.HeartRate", DataType.FLOAT64, "bpm")
    c.add("Vehicle.Custom.Badge", DataType.STRING)
    return c


@dataclass
class Fleet:
    coordinator: Coordinator
    http: str
    tokens: dict[str, str]
    #: Where the store's files are (what read_parquet would be pointed at).
    store: Path
    speed_rows: int


@pytest.fixture(params=["parquet", "iceberg"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, recordings: Path) -> Iterator[Fleet]:
    # the fleet classifies its own badge reader as personal, beside the built-in defaults
    classes = classification_from_document(
        {"rules": [{"fleet": "taxi", "signal": "Vehicle.Custom.Badge", "class": "personal"}]}, "test"
    )
    tables = TableSettings(format=request.param, batch_wait_s=0.01)
    c = Coordinator(tmp_path / "cloud", tables=tables, classification=classes)
    admin = c.tokens.bootstrap(c.clock()).secret
    tokens = {"admin": admin}
    for role in ("viewer", "operator", "release-manager"):
        tokens[role] = c.tokens.create(Caller.local(), f"a-{role}", role, c.clock()).secret
    base = comma2k19_segment(recordings) / "processed_log" / "CAN" / "speed"
    v = np.load(base / "value").reshape(-1).astype(np.float64)[:400]
    t = 1_766_000_000_000_000_000 + np.arange(len(v), dtype=np.int64) * 10_000_000
    n = len(t)
    seg = Segment(
        new_segment_id(), "g", t,
        {1: v, 2: np.array([VIN] * n, dtype=object), 3: np.full(n, LAT), 4: np.full(n, LON),
         5: np.full(n, 512.5), 6: np.full(n, HEART), 7: np.array([BADGE] * n, dtype=object)},
        {1: DataType.FLOAT64, 2: DataType.STRING, 3: DataType.FLOAT64, 4: DataType.FLOAT64,
         5: DataType.FLOAT64, 6: DataType.FLOAT64, 7: DataType.STRING},
    )  # fmt: skip
    samples = c.fleet_store.write_segment(
        fleet="taxi", device_id="car-1", capture_id="trips-1", campaign="trips", segment=seg,
        catalog=catalog(), received_unix=RECEIVED,
    )  # fmt: skip
    receipt = SegmentReceipt("trips-1", "trips", 8, samples, int(t[0]), int(t[-1]))
    c.repositories.segments.record("car-1", seg.segment_id, receipt, RECEIVED)
    server, port = start_http_server(c, "127.0.0.1", 0)
    store = tmp_path / "cloud" / "fleet"
    try:
        yield Fleet(c, f"http://127.0.0.1:{port}", tokens, store, n)
    finally:
        server.shutdown()
        c.stop()


def query(f: Fleet, role: str, sql: str) -> tuple[int, str]:
    body = json.dumps({"sql": sql, "max_rows": 100000}).encode()
    status, _, answer = http_call(f.http, "POST", "/v1/query", body, {"Content-Type": "application/json"},
                                  token=f.tokens[role])  # fmt: skip
    return status, answer.decode()


def test_a_viewer_reads_no_personal_or_sensitive_value_and_only_coarse_positions(fleet: Fleet) -> None:
    answered = 0
    for attack in ATTACKS:
        sql = attack.format(store=fleet.store.as_posix())
        status, body = query(fleet, "viewer", sql)
        assert status in (200, 400), (sql, status, body)
        for secret in SECRETS:
            assert secret not in body, (sql, secret, body[:400])
        answered += status == 200
    assert answered >= 12  # the tricks that are plain SQL run; they just find nothing to reveal

    status, body = query(fleet, "viewer", "SELECT signal, count(*), min(value), max(value), count(value_str) "
                                          "FROM samples GROUP BY signal ORDER BY signal")  # fmt: skip
    assert status == 200
    rows = {r[0]: r[1:] for r in json.loads(body)["rows"]}
    assert rows == {
        "Vehicle.CurrentLocation.Latitude": [fleet.speed_rows, LAT_CELL, LAT_CELL, 0],
        "Vehicle.CurrentLocation.Longitude": [fleet.speed_rows, LON_CELL, LON_CELL, 0],
        "Vehicle.Speed": [fleet.speed_rows, rows["Vehicle.Speed"][1], rows["Vehicle.Speed"][2], 0],
    }  # altitude cannot be coarsened on a grid: withheld; VIN, badge, heart rate: withheld

    # files are out of reach for every role: no SQL reads the store around the views
    files = f"{fleet.store.as_posix()}/**/*.parquet"
    status, body = query(fleet, "admin", f"SELECT * FROM read_parquet('{files}')")
    assert status == 400 and "disabled" in body

    # no filter is an oracle: it sees the values the view holds, not the stored ones
    for oracle in (
        f"value_str = '{VIN}'",
        "value_str LIKE 'WVW%'",
        "value BETWEEN 48.1371 AND 48.1372",
        "value = 73.25",
        "signal LIKE '%Heart%'",
        "signal LIKE '%VIN%'",
        "value_int IS NOT NULL",
    ):
        status, body = query(fleet, "viewer", f"SELECT count(*) FROM samples WHERE {oracle}")
        assert json.loads(body)["rows"] == [[0]], oracle
        status, body = query(fleet, "admin", f"SELECT count(*) FROM samples WHERE {oracle}")
        assert json.loads(body)["rows"] != [[0]] or oracle == "value_int IS NOT NULL", oracle


def test_each_role_sees_its_classes(fleet: Fleet) -> None:
    sql = "SELECT signal, max(value), max(value_str) FROM samples GROUP BY signal ORDER BY signal"
    seen = {}
    for role in ("viewer", "operator", "release-manager", "admin"):
        status, body = query(fleet, role, sql)
        assert status == 200, body
        seen[role] = {r[0]: r[1] if r[2] is None else r[2] for r in json.loads(body)["rows"]}
    assert seen["admin"]["Vehicle.VehicleIdentification.VIN"] == VIN
    assert seen["admin"]["Vehicle.Custom.Badge"] == BADGE
    assert seen["admin"]["Vehicle.Driver.HeartRate"] == HEART
    assert seen["admin"]["Vehicle.CurrentLocation.Latitude"] == LAT
    assert seen["operator"]["Vehicle.CurrentLocation.Latitude"] == LAT
    assert seen["operator"]["Vehicle.CurrentLocation.Altitude"] == 512.5
    assert "Vehicle.VehicleIdentification.VIN" not in seen["operator"]
    assert "Vehicle.Driver.HeartRate" not in seen["operator"]
    assert seen["release-manager"] == seen["viewer"]
    assert set(seen["viewer"]) == {"Vehicle.Speed", "Vehicle.CurrentLocation.Latitude",
                                   "Vehicle.CurrentLocation.Longitude"}  # fmt: skip


def test_exports_and_the_console_timeline_use_the_same_views(fleet: Fleet) -> None:
    def export(role: str, fmt: str) -> tuple[int, bytes]:
        status, _, body = http_call(fleet.http, "GET", f"/v1/captures/trips-1/export?format={fmt}",
                                    token=fleet.tokens[role])  # fmt: skip
        return status, body

    for fmt in ("csv", "parquet", "mcap"):
        status, body = export("viewer", fmt)
        assert status == 200
        for secret in SECRETS:
            assert secret.encode() not in body, (fmt, secret)
    status, body = export("viewer", "csv")
    signals = {row["signal"] for row in csv.DictReader(io.StringIO(body.decode()))}
    assert signals == {"Vehicle.Speed", "Vehicle.CurrentLocation.Latitude",
                       "Vehicle.CurrentLocation.Longitude"}  # fmt: skip
    status, body = export("admin", "csv")
    assert status == 200 and VIN.encode() in body and BADGE.encode() in body

    # the console's capture page and timeline
    status, _, body = http_call(fleet.http, "GET", "/v1/captures/trips-1", token=fleet.tokens["viewer"])
    assert status == 200
    for secret in SECRETS:
        assert secret not in body.decode()
    listed = [s["signal"] for s in json.loads(body)["signals"]]
    assert "Vehicle.VehicleIdentification.VIN" not in listed and "Vehicle.Speed" in listed
    for signal in ("Vehicle.VehicleIdentification.VIN", "Vehicle.Driver.HeartRate"):
        status, _, body = http_call(fleet.http, "GET", f"/v1/captures/trips-1/series?signals={signal}",
                                    token=fleet.tokens["viewer"])  # fmt: skip
        assert status == 400 and b"holds no signal" in body
    status, _, body = http_call(
        fleet.http, "GET", "/v1/captures/trips-1/series?signals=Vehicle.CurrentLocation.Latitude",
        token=fleet.tokens["viewer"],
    )  # fmt: skip
    assert status == 200 and b"48.13715" not in body and b"48.135" in body


def test_every_query_and_export_is_recorded_in_the_audit_log(fleet: Fleet) -> None:
    c = fleet.coordinator
    assert query(fleet, "viewer", "SELECT * FROM samples")[0] == 200
    assert query(fleet, "admin", f"SELECT count(*) FROM samples WHERE value_str = '{VIN}'")[0] == 200
    assert query(fleet, "viewer", "SELECT * FROM nowhere")[0] == 400
    path = "/v1/captures/trips-1/export?format=csv"
    assert http_call(fleet.http, "GET", path, token=fleet.tokens["admin"])[0] == 200
    entries = [e for e in c.audit.entries(Caller.local(), AuditFilter(limit=1000))
               if e.action in ("query", "captures.export")]  # fmt: skip
    records = [(e.actor, e.role, e.action, json.loads(e.detail)) for e in entries]
    assert [(a, r, act) for a, r, act, _ in records] == [
        ("a-viewer", "viewer", "query"), ("admin", "admin", "query"), ("a-viewer", "viewer", "query"),
        ("admin", "admin", "captures.export"),
    ]  # fmt: skip
    viewer_all, admin_vin, failed, exported = (d for *_, d in records)
    assert viewer_all["sql"] == "SELECT * FROM samples" and viewer_all["outcome"] == "ok"
    assert viewer_all["rows"] == 3 * fleet.speed_rows
    assert viewer_all["classes"] == ["internal", "location"]
    assert viewer_all["limited"] == {"location": "coarsened", "personal": "withheld", "sensitive": "withheld"}
    assert admin_vin["classes"] == ["personal"] and admin_vin["limited"] == {}  # the filter ran in the scan
    assert failed["outcome"] == "error" and failed["rows"] == 0
    assert exported["capture_id"] == "trips-1" and exported["format"] == "csv"
    assert exported["rows"] == 7 * fleet.speed_rows
    assert exported["classes"] == ["internal", "location", "personal", "sensitive"]
    assert c.audit.verify(Caller.local()).ok

    # a viewer reading the log sees that the admin looked for something, not the VIN it looked for
    status, _, body = http_call(fleet.http, "GET", "/v1/audit?limit=1000", token=fleet.tokens["viewer"])
    assert status == 200 and VIN not in body.decode()
    shown = [json.loads(e["detail"]) for e in json.loads(body) if e["action"] == "query"]
    assert "sql" not in shown[1] and len(shown[1]["sql_sha256"]) == 64 and shown[1]["classes"] == ["personal"]
    status, _, body = http_call(fleet.http, "GET", "/v1/audit?limit=1000", token=fleet.tokens["admin"])
    assert VIN in body.decode()


def test_a_viewer_with_the_cli_gets_no_personal_value(fleet: Fleet) -> None:
    env = {**os.environ, "FLEETLOOP_CLOUD": fleet.http, "FLEETLOOP_TOKEN": fleet.tokens["viewer"]}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True,
                              text=True, timeout=120, env=env)  # fmt: skip

    out = cli("query", "-o", "json", "SELECT signal, value, value_str FROM samples")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 3 * fleet.speed_rows
    refused = cli("query", f"SELECT * FROM read_parquet('{fleet.store.as_posix()}/**/*.parquet')")
    assert refused.returncode == 2 and "disabled" in refused.stderr
    exported = cli("captures", "export", "trips-1", "--format", "csv", "-o", "-")
    assert exported.returncode == 0 and "Vehicle.Speed" in exported.stdout
    for text in (out.stdout, out.stderr, refused.stdout, refused.stderr, exported.stdout):
        for secret in SECRETS:
            assert secret not in text


def test_the_role_table_in_the_privacy_guide_is_the_one_enforced() -> None:
    import re

    from fleetloop_cloud.identity.roles import CLASS_ACCESS, Role

    doc = (Path(__file__).resolve().parents[2] / "docs" / "privacy.md").read_text()
    rows = re.findall(r"^\| `(viewer|operator|release-manager|admin)` \|(.*)\|$", doc, re.M)
    table = {Role(role): [cell.strip() for cell in cells.split("|")] for role, cells in rows}
    assert table == {role: [CLASS_ACCESS[role][c].value for c in SignalClass] for role in Role}
