"""Captures over the REST API on a real coordinator, with a capture of the real comma2k19 drive ingested
through its own ingest service: the timeline's reads (signals, trigger and windows, min/max envelopes,
state bands, the trajectory) and the exports, each read back with its tool's own library — the MCAP
with the ``mcap`` reader, every value compared; Parquet with pyarrow; CSV with pyarrow's CSV reader."""

from __future__ import annotations

import io
import json
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from mcap.reader import make_reader

from fleetloop_cloud.services import captures as capture_service
from fleetloop_cloud.services.access import Caller
from tests.cloud.conftest import RunningCoordinator
from tests.fixtures.recorded_capture import (
    DRIVE_START_NS,
    FIRE_OFFSET_S,
    Signal,
    campaign_document,
    connect,
    drive_signals,
    ingest_capture,
)


@pytest.fixture
def drive(running_coordinator: RunningCoordinator, recordings: Path) -> tuple[str, list[Signal]]:
    c = running_coordinator.coordinator
    c.campaigns.apply(Caller.local(), campaign_document(), now=c.clock())
    signals = drive_signals(recordings)
    caller = connect(c, "car-rec", signals)
    return ingest_capture(c, caller, signals), signals


def get(rc: RunningCoordinator, path: str, **query: Any) -> Any:
    status, _, body = rc.call("GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))
    assert status == 200, body
    return json.loads(body)


def test_capture_detail_names_trigger_windows_kinds_and_trajectory(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]]
) -> None:
    capture_id, signals = drive
    listed = get(running_coordinator, "/v1/captures", device="car-rec")
    assert [c["capture_id"] for c in listed] == [capture_id]
    assert listed[0]["state"] == "arriving"  # its segments came in just now
    detail = get(running_coordinator, f"/v1/captures/{capture_id}")
    assert detail["trigger_ns"] == DRIVE_START_NS + int(FIRE_OFFSET_S * 1e9)
    assert (detail["pre_ns"], detail["post_ns"], detail["windows_from"]) == (5_000_000_000, 2_000_000_000,
                                                                             "campaign")
    kinds = {s["signal"]: s["kind"] for s in detail["signals"]}
    assert kinds["Vehicle.Speed"] == "number"
    assert kinds["Vehicle.ADAS.CruiseControl.IsActive"] == "enum"
    assert kinds["Vehicle.Powertrain.Transmission.SelectedGear"] == "enum"
    assert {s["signal"]: s["samples"] for s in detail["signals"]} == {s.path: len(s.t_ns) for s in signals}
    units = {s["signal"]: s["unit"] for s in detail["signals"]}
    assert units["Vehicle.Speed"] == "m/s"
    assert detail["trajectory"] == ["Vehicle.CurrentLocation.Longitude", "Vehicle.CurrentLocation.Latitude"]


def test_envelope_keeps_every_columns_low_and_high(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]]
) -> None:
    capture_id, signals = drive
    speed = next(s for s in signals if s.path == "Vehicle.Speed")
    first, last = int(speed.t_ns.min()), int(speed.t_ns.max())
    columns = 100
    series = get(running_coordinator, f"/v1/captures/{capture_id}/series", signals="Vehicle.Speed",
                 from_ns=first, to_ns=last, columns=columns)  # fmt: skip
    line = series["lines"][0]
    assert line["reduced"] and line["samples"] == len(speed.t_ns)
    assert len(line["t_ns"]) <= 2 * columns and line["t_ns"] == sorted(line["t_ns"])
    col = np.floor((speed.t_ns - first) * columns / (last - first + 1.0)).astype(int)
    for c in range(columns):
        values = speed.values[col == c]
        if len(values):
            inside = [v for t, v in zip(line["t_ns"], line["values"], strict=True)
                      if int(np.floor((t - first) * columns / (last - first + 1.0))) == c]  # fmt: skip
            assert min(inside) == values.min() and max(inside) == values.max()
    # a window narrower than the columns: every sample, as stored
    narrow = get(running_coordinator, f"/v1/captures/{capture_id}/series", signals="Vehicle.Speed",
                 from_ns=first, to_ns=first + 200_000_000, columns=4000)["lines"][0]  # fmt: skip
    keep = speed.t_ns <= first + 200_000_000
    assert not narrow["reduced"]
    assert narrow["t_ns"] == speed.t_ns[keep].tolist() and narrow["values"] == speed.values[keep].tolist()


def test_state_bands_are_the_runs_of_one_value(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]]
) -> None:
    capture_id, signals = drive
    cruise = next(s for s in signals if s.path == "Vehicle.ADAS.CruiseControl.IsActive")
    assert len(set(cruise.values.tolist())) == 2, "the driver engages cruise control: both states are there"
    order = np.argsort(cruise.t_ns, kind="stable")
    t, v = cruise.t_ns[order], cruise.values[order]
    changes = [0, *(np.nonzero(v[1:] != v[:-1])[0] + 1).tolist()]
    mid = int(t[len(t) // 2])
    signal = "Vehicle.ADAS.CruiseControl.IsActive"
    series = get(running_coordinator, f"/v1/captures/{capture_id}/series", signals=signal, from_ns=int(t[0]),
                 to_ns=int(t[-1]))  # fmt: skip
    bands = series["bands"][0]["bands"]
    assert [b["from_ns"] for b in bands] == [int(t[i]) for i in changes]
    assert [b["value"] for b in bands] == [str(int(v[i])) for i in changes]
    assert bands[-1]["to_ns"] == int(t[-1])
    # a window starting mid-run starts with the value holding then
    later = get(running_coordinator, f"/v1/captures/{capture_id}/series", signals=signal, from_ns=mid,
                to_ns=int(t[-1]))["bands"][0]["bands"]  # fmt: skip
    holding = int(v[np.searchsorted(t, mid, side="right") - 1])
    assert later[0]["from_ns"] == mid and later[0]["value"] == str(holding)


def _rows(signals: list[Signal]) -> dict[tuple[str, int], list[Any]]:
    out: dict[tuple[str, int], list[Any]] = {}
    for s in signals:
        for t, v in zip(s.t_ns.tolist(), s.values.tolist(), strict=True):
            out.setdefault((s.path, t), []).append(v)
    return out


def test_mcap_export_holds_every_sample(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]]
) -> None:
    capture_id, signals = drive
    status, headers, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/export?format=mcap")
    assert status == 200 and headers["Content-Disposition"].endswith('.mcap"')
    reader = make_reader(io.BytesIO(body))
    summary = reader.get_summary()
    assert summary is not None
    assert {c.compression for c in summary.chunk_indexes} == {"zstd"}
    topics = {ch.topic for ch in summary.channels.values()}
    assert "/Vehicle/ADAS/CruiseControl" in topics and "/Vehicle/CurrentLocation" in topics
    assert all(s.encoding == "jsonschema" for s in summary.schemas.values())
    got: dict[tuple[str, int], list[Any]] = {}
    for schema, channel, message in reader.iter_messages():
        assert message.log_time == message.publish_time
        fields = json.loads(message.data)
        declared = json.loads(schema.data)["properties"]
        for name, value in fields.items():
            assert name in declared
            path = channel.topic[1:].replace("/", ".") + "." + name
            got.setdefault((path, message.log_time), []).append(value)
    expected = _rows(signals)
    assert got == expected  # every sample, at its own time, with its exact value
    metadata = {m.name: m.metadata for m in reader.iter_metadata()}
    assert metadata["fleetloop.capture"]["capture_id"] == capture_id


def test_parquet_and_csv_exports_hold_the_rows_of_samples(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]]
) -> None:
    capture_id, signals = drive
    c = running_coordinator.coordinator
    sql = c.queries.sql(Caller.local(), f"SELECT * FROM samples WHERE capture_id = '{capture_id}' "
                        "ORDER BY t_ns, signal", max_rows=1_000_000)  # fmt: skip
    status, _, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/export?format=parquet")
    assert status == 200
    table = pq.read_table(io.BytesIO(body))
    assert table.column_names == sql.columns
    assert table.num_rows == len(sql.rows) == sum(len(s.t_ns) for s in signals)
    as_rows = [tuple(r.values()) for r in table.to_pylist()]
    assert [r[:8] for r in as_rows] == [r[:8] for r in sql.rows]
    status, _, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/export?format=csv")
    assert status == 200
    csv = pa_csv.read_csv(io.BytesIO(body))
    assert csv.column_names == sql.columns and csv.num_rows == len(sql.rows)
    assert csv.column("t_ns").to_pylist() == [r[4] for r in sql.rows]
    assert csv.column("value").to_pylist() == [r[5] for r in sql.rows]


def test_bad_requests_are_named(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]], monkeypatch: pytest.MonkeyPatch
) -> None:
    capture_id, _ = drive
    monkeypatch.setattr(capture_service, "MAX_EXPORT_SAMPLES", 1000)
    status, _, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/export?format=csv")
    assert status == 400 and b"an export at most 1,000" in body and b"/v1/query" in body
    assert running_coordinator.coordinator.captures.exports_refused_total == 1
    monkeypatch.undo()
    status, _, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/export?format=xls")
    assert status == 400 and b"unknown export format 'xls'" in body
    status, _, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/series?signals=No.Such")
    assert status == 400 and b"holds no signal 'No.Such'" in body
    status, _, body = running_coordinator.call("GET", "/v1/captures/nothing-1/series")
    assert status == 404 and b"no capture 'nothing-1'" in body
    status, _, body = running_coordinator.call("GET", f"/v1/captures/{capture_id}/series?from_ns=2&to_ns=1")
    assert status == 400 and b"ends (1) before it starts (2)" in body


def test_the_cli_exports_a_capture_to_a_file_or_stdout(
    running_coordinator: RunningCoordinator, drive: tuple[str, list[Signal]], tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``fleetloop captures export``: the file the coordinator names (or ``-o``), every sample intact;
    ``-o -`` writes to standard output; a capture that does not exist is an error that says so."""
    from fleetloop_cli.main import main as cli_main

    capture_id, signals = drive
    rc = running_coordinator
    monkeypatch.setenv("FLEETLOOP_TOKEN", rc.token)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["captures", "export", capture_id, "--format", "mcap", "--cloud", rc.http_base]) == 0
    written = tmp_path / f"car-rec_{capture_id}.mcap"
    assert f"wrote {written.name}".encode() in capsysbinary.readouterr().err
    messages = list(make_reader(io.BytesIO(written.read_bytes()), validate_crcs=True).iter_messages())
    assert sum(len(json.loads(m.data)) for _, _, m in messages) == sum(len(s.t_ns) for s in signals)
    assert cli_main(["captures", "export", capture_id, "--format", "csv", "-o", "-", "--cloud", rc.http_base,
                     "--device", "car-rec"]) == 0  # fmt: skip
    csv = pa_csv.read_csv(io.BytesIO(capsysbinary.readouterr().out))
    assert csv.num_rows == sum(len(s.t_ns) for s in signals)
    out = tmp_path / "drive.parquet"
    assert cli_main(["captures", "export", capture_id, "--format", "parquet", "-o", str(out),
                     "--cloud", rc.http_base]) == 0  # fmt: skip
    assert pq.read_table(out).num_rows == csv.num_rows and not list(tmp_path.glob("*.part"))
    capsysbinary.readouterr()
    assert cli_main(["captures", "export", "nothing-1", "--cloud", rc.http_base]) != 0
    err = capsysbinary.readouterr().err.decode()
    assert "no capture 'nothing-1'" in err and "Traceback" not in err
    assert not (tmp_path / "nothing-1.mcap").exists()
