"""``fleetloop store import|stats|export``: what operators run against a device's store."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetloop_cli.main import main
from fleetloop_shared.dbc import load_dbc

SIM_DBC = (
    Path(__file__).resolve().parents[2] / "firmware-sim" / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc"
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


SPECIAL = [
    "1.5",
    "-0.0",
    "nan",
    "inf",
    "-inf",
    "5e-324",
    "0.1",
    "1.7976931348623157e+308",
    "28.650000000000006",
]


def write_long_csv(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    for i, v in enumerate(SPECIAL):
        rows.append((i * 10_000_000 - 20_000_000, "speed", v))  # negative timestamps too
        rows.append(
            (
                i * 10_000_000 - 20_000_000,
                "gear",
                str([0, -1, 9223372036854775807, -9223372036854775808][i % 4]),
            )
        )
    rows.append((5, "lonely", "3.25"))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_ns", "signal", "value"])
        w.writerows(rows)
    return rows


def test_import_stats_export_round_trip_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.csv"
    rows = write_long_csv(src)
    store = tmp_path / "store"
    code, out, err = run(capsys, "store", "import", "--input", str(src), "--store", str(store), "-o", "json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == len(rows) and summary["signals"] == 3
    assert summary["groups"] == 2  # speed+gear share their times; lonely is its own group

    code, out, _ = run(capsys, "store", "stats", "--store", str(store), "-o", "json")
    stats = json.loads(out)
    assert {"samples", "signals", "groups", "segment_bytes", "disk_bytes", "bytes_per_sample"} <= set(stats)
    assert (stats["samples"], stats["signals"], stats["groups"]) == (len(rows), 3, 2)
    seg_files = list((store / "segments").iterdir())
    assert stats["segment_bytes"] == sum(p.stat().st_size for p in seg_files)
    assert stats["disk_bytes"] > stats["segment_bytes"]
    assert stats["bytes_per_sample"] == pytest.approx(stats["segment_bytes"] / len(rows), abs=1e-3)

    out_csv = tmp_path / "out.csv"
    code, _, err = run(
        capsys, "store", "export", "--store", str(store), "--format", "csv", "-o", str(out_csv)
    )
    assert code == 0, err
    got = list(csv.reader(out_csv.open()))
    assert got[0] == ["t_ns", "signal", "value"]

    def key(r: tuple[int, str, str]) -> tuple[int, str]:
        return (int(r[0]), r[1])

    exported = sorted(((int(t), s, v) for t, s, v in got[1:]), key=key)
    expected = sorted(rows, key=key)
    assert [(t, s) for t, s, _ in exported] == [(t, s) for t, s, _ in expected]
    for (_, name, a), (_, _, b) in zip(exported, expected, strict=True):
        if name == "gear":
            assert int(a) == int(b)
        else:  # the identical double (sign of zero included; NaN stays NaN)
            fa, fb = float(a), float(b)
            assert (math.isnan(fa) and math.isnan(fb)) or struct.pack("<d", fa) == struct.pack("<d", fb)

    # stdout by default, and Parquet
    code, out, _ = run(capsys, "store", "export", "--store", str(store))
    assert out.splitlines()[0] == "t_ns,signal,value" and len(out.splitlines()) == len(rows) + 1
    pq_path = tmp_path / "out.parquet"
    code, _, err = run(
        capsys, "store", "export", "--store", str(store), "--format", "parquet", "-o", str(pq_path)
    )
    assert code == 0, err
    table = pq.read_table(pq_path)
    assert table.num_rows == len(rows)
    assert set(table.column("signal").to_pylist()) == {"speed", "gear", "lonely"}
    gear = [
        v
        for s, v in zip(
            table.column("signal").to_pylist(), table.column("value_int").to_pylist(), strict=True
        )
        if s == "gear"
    ]
    assert -9223372036854775808 in gear and 9223372036854775807 in gear


def test_import_seconds_csv_and_candump_with_dbc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secs = tmp_path / "secs.csv"
    secs.write_text("t,signal,value\n0.000000001,a,1\n1.5,a,2\n")
    store = tmp_path / "s"
    assert run(capsys, "store", "import", "--input", str(secs), "--store", str(store))[0] == 0
    code, out, _ = run(capsys, "store", "export", "--store", str(store))
    assert out.splitlines()[1:] == ["1,a,1", "1500000000,a,2"]

    db = load_dbc(SIM_DBC)
    log = tmp_path / "drive.log"
    lines = []
    for i in range(200):
        payload = db.encode("SIM_WHEEL_SPEEDS", {"WHEEL_SPEED_FL": 10 + i * 0.01, "WHEEL_SPEED_FR": 10.0})
        lines.append(
            f"({1_700_000_000 + i * 0.01:.6f}) can0 {db.frame_id('SIM_WHEEL_SPEEDS'):03X}#{payload.hex()}"
        )
        lines.append(f"({1_700_000_000 + i * 0.01 + 0.0005:.6f}) can0 7FF#00")  # not in the DBC: skipped
    log.write_text("\n".join(lines) + "\n")
    store2 = tmp_path / "can"
    code, out, err = run(
        capsys,
        "store",
        "import",
        "--input",
        str(log),
        "--dbc",
        str(SIM_DBC),
        "--store",
        str(store2),
        "-o",
        "json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames_skipped"] == 200 and summary["groups"] == 1 and summary["samples"] == 200 * 4
    code, out, _ = run(capsys, "store", "export", "--store", str(store2))
    first = next(csv.reader(io.StringIO(out.splitlines()[1])))
    assert first[0] == "1700000000000000000" and first[1].startswith("can0/SIM_WHEEL_SPEEDS/")


def test_bad_input_is_one_line_with_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,signal,value\n1,a,2\n")
    code, _, err = run(capsys, "store", "import", "--input", str(bad), "--store", str(tmp_path / "s"))
    assert code == 2 and "expected the header" in err and len(err.strip().splitlines()) == 1
    for body, message in [
        ("t_ns,signal,value\nx1,a,2\n", "bad.csv:2"),
        ("t_ns,signal,value\n1,a,2\n2,a,\n", "bad.csv:3: empty value"),
        ("t_ns,signal,value\n1.5,a,2\n", "bad.csv:2: time '1.5' is not a whole number of nanoseconds"),
        ("t,signal,value\n1,a,99999999999999999999\n", "bad.csv:2: integer 99999999999999999999 does not"),
        ("t,signal,value\n1,,2\n", "bad.csv:2: empty signal name"),
        ("Time,x\n0,1\n1,2,3\n", "bad.csv:3: expected 2 fields, found 3"),
        ("Time,x\n1,1\n0,2\n", "bad.csv:3: time goes backwards"),
        ("Time Stamp,ID,Extended,Bus,LEN,D1\n1,0AB,false,0,1,zz\n", "bad.csv:2: malformed GVRET row"),
        ('t_ns,signal,value\n1,a,"open\n', "bad.csv:2: malformed CSV"),
        ('t_ns,signal,value\n1,a,x"y\n', "bad.csv:2: malformed CSV"),
        ('t_ns,signal,value\n1,a,"x"y\n', "bad.csv:2: malformed CSV"),
        ("t_ns,signal,value\n1,a,2,3\n", "bad.csv:2: expected 3 fields"),
    ]:
        bad.write_text(body)
        code, _, err = run(capsys, "store", "import", "--input", str(bad), "--store", str(tmp_path / "s"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (body, err)
    assert not (tmp_path / "s" / "segments").exists() or not any((tmp_path / "s" / "segments").iterdir())
    code, _, err = run(capsys, "store", "stats", "--store", str(tmp_path / "nowhere"))
    assert code == 3 and "no store index" in err
    code, _, err = run(
        capsys, "store", "import", "--input", str(tmp_path / "missing.csv"), "--store", str(tmp_path / "s")
    )
    assert code == 3


TEXTS = [
    "",
    "plain",
    "1.5",  # looks like a number: must stay text
    "true",  # looks like a bool
    "nan",
    " padded ",
    'quote " inside',
    "comma, inside",
    "line\nbreak\r\nand CRLF",
    "ÉTAT ✓ 日本語 🚗",
    "x" * 100_000,
]


def test_strings_import_export_round_trip_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "text.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC)  # every text value quoted
        w.writerow(["t_ns", "signal", "value"])
        for i, v in enumerate(TEXTS):
            w.writerow([i, "status", v])
    # bare cells: the unquoted word is text, true/false are bools, a typo makes the signal text
    with src.open("a", newline="", encoding="utf-8") as fh:
        fh.write("0,state,IDLE\n1,state,RUN\n0,door,true\n1,door,FALSE\n0,odd,1\n1,odd,2x\n")
    store = tmp_path / "store"
    code, out, err = run(capsys, "store", "import", "--input", str(src), "--store", str(store), "-o", "json")
    assert code == 0, err
    # lines count from the file: one text value spans three of them
    assert err.strip() == (
        f"{src}:20: note: signal odd has the text '2x' (and '1' at line 19): "
        "all its values are read as strings"
    )
    catalog = {s["path"]: s["data_type"] for s in json.loads((store / "catalog.json").read_text())["signals"]}
    assert catalog == {"status": "STRING", "state": "STRING", "door": "BOOL", "odd": "STRING"}

    code, out, _ = run(capsys, "store", "stats", "--store", str(store), "-o", "json")
    stats = json.loads(out)
    assert stats["samples"] == len(TEXTS) + 6 and stats["signals"] == 4

    out_csv = tmp_path / "out.csv"
    code, _, err = run(capsys, "store", "export", "--store", str(store), "-o", str(out_csv))
    assert code == 0, err
    got = list(csv.reader(out_csv.open(newline="", encoding="utf-8")))
    status = [v for _, s, v in got[1:] if s == "status"]
    assert status == TEXTS
    assert [v for _, s, v in got[1:] if s == "door"] == ["true", "false"]
    assert [v for _, s, v in got[1:] if s == "odd"] == ["1", "2x"]

    # the export imports again to the identical store contents (quoted text stays text)
    store2 = tmp_path / "store2"
    code, _, err = run(capsys, "store", "import", "--input", str(out_csv), "--store", str(store2))
    assert code == 0, err
    again = tmp_path / "again.csv"
    assert run(capsys, "store", "export", "--store", str(store2), "-o", str(again))[0] == 0
    assert again.read_bytes() == out_csv.read_bytes()
    catalog2 = {
        s["path"]: s["data_type"] for s in json.loads((store2 / "catalog.json").read_text())["signals"]
    }
    assert catalog2 == catalog

    pq_path = tmp_path / "out.parquet"
    code, _, err = run(
        capsys, "store", "export", "--store", str(store), "--format", "parquet", "-o", str(pq_path)
    )
    assert code == 0, err
    table = pq.read_table(pq_path).to_pylist()
    assert [r["value_str"] for r in table if r["signal"] == "status"] == TEXTS
    assert all(r["value"] is None and r["value_int"] is None for r in table if r["signal"] == "status")
    assert [r["value_int"] for r in table if r["signal"] == "door"] == [1, 0]
    assert all(r["value_str"] is None for r in table if r["signal"] == "door")


def test_import_packs_groups_into_one_segment_and_the_cloud_stores_every_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``store import`` writes by default is one multi-group (format 4 or newer) segment;
    ``--bundle-rows 0`` writes one group per segment (format 2, or 6 where a compressed body pays). The
    cloud's fleet store turns every group of a multi-group segment into rows (the same code decodes it)."""
    from fleetloop_cloud.fleet_store.parquet import FleetStore
    from fleetloop_shared.catalog import Catalog
    from fleetloop_shared.segment import decode_segment

    src = tmp_path / "in.csv"
    rows = write_long_csv(src)
    for bundle_rows, files, versions in (("0", 2, {2, 6}), ("262144", 1, {4, 6})):
        store = tmp_path / f"store{bundle_rows}"
        args = ["store", "import", "--input", str(src), "--store", str(store), "--bundle-rows", bundle_rows]
        code, out, err = run(capsys, *args, "-o", "json")
        assert code == 0, err
        assert json.loads(out)["segments"] == files
        seg_files = sorted((store / "segments").iterdir())
        assert len(seg_files) == files
        for f in seg_files:
            blob = f.read_bytes()
            assert struct.unpack_from("<H", blob, blob.index(b"FLSG") + 4)[0] in versions
        code, out, _ = run(capsys, "store", "stats", "--store", str(store), "-o", "json")
        assert json.loads(out)["groups"] == 2
        code, out, _ = run(capsys, "store", "export", "--store", str(store), "--format", "csv")
        assert len(out.strip().splitlines()) == len(rows) + 1

    # --format-version 3 (a cloud of that age): one group per segment whatever --bundle-rows says
    store = tmp_path / "store_v3"
    args = ["store", "import", "--input", str(src), "--store", str(store), "--format-version", "3"]
    code, out, err = run(capsys, *args, "-o", "json")
    assert code == 0, err
    assert json.loads(out)["segments"] == 2
    for f in sorted((store / "segments").iterdir()):
        blob = f.read_bytes()
        assert struct.unpack_from("<H", blob, blob.index(b"FLSG") + 4)[0] <= 3
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit code 2
        run(capsys, *args[:-2], "--format-version", "7", "-o", "json")
    assert exit_info.value.code == 2 and "invalid choice: 7" in capsys.readouterr().err

    # The multi-group segment, as uploaded, through the cloud's fleet store.
    store = tmp_path / "store262144"
    seg_files = sorted((store / "segments").iterdir())
    data = seg_files[0].read_bytes()
    segment = decode_segment(data[data.index(b"FLSG") :])
    assert [g.group for g in segment.groups()] != [segment.group]
    catalog = Catalog.from_records(json.loads((store / "catalog.json").read_text())["signals"])
    fleet = FleetStore(tmp_path / "cloud")
    written = fleet.write_segment(
        fleet="f",
        device_id="d",
        capture_id="c",
        campaign="k",
        segment=segment,
        catalog=catalog,
        received_unix=1.7e9,
    )
    assert written == len(rows)
    (path,) = list((tmp_path / "cloud").rglob("*.parquet"))
    table = pq.read_table(path)
    assert table.num_rows == len(rows)
    assert sorted(zip(table["signal"].to_pylist(), table["t_ns"].to_pylist(), strict=True)) == sorted(
        (s, t) for t, s, _ in rows
    )
    assert table["signal"].to_pylist() == sorted(table["signal"].to_pylist())  # ordered by signal
