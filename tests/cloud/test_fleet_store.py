"""Fleet store: real comma2k19 speed samples through the real segment codec into Hive-partitioned Parquet."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest

from fleetloop_cloud.fleet_store.parquet import SAMPLES_SCHEMA, FleetStore, partition_date
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import MalformedMessageError, UserError
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, new_segment_id

#: The drive's start (from its directory name), used to put the boot-time stamps on the wall clock.
DRIVE_START_NS = int(dt.datetime(2018, 8, 2, 8, 34, 47, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
RECEIVED = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC).timestamp()


def speed_arrays(recordings: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    base = comma2k19_segment(recordings) / "processed_log" / "CAN" / "speed"
    t = np.load(base / "t")
    value = np.load(base / "value").reshape(-1)
    t_ns = DRIVE_START_NS + np.round((t - t[0]) * 1e9).astype(np.int64)
    return t_ns, value.astype(np.float64)


def catalog() -> Catalog:
    c = Catalog()
    c.add("Vehicle.Speed", DataType.FLOAT64, "m/s")
    c.add("Vehicle.Odometer", DataType.INT64, "m")
    c.add("Vehicle.IsMoving", DataType.BOOL)
    return c


def real_segment(recordings: Path) -> Segment:
    """A segment as ingest sees it: built from real data, encoded by the agent's codec, decoded again."""
    t_ns, speed = speed_arrays(recordings)
    odometer = (np.cumsum(speed * 0.01) * 1000).astype(np.int64) + (2**53 + 1)  # beyond float precision
    seg = Segment(new_segment_id(), "can0/SPEED", t_ns,
                  {1: speed, 2: odometer, 3: speed > 8.0},
                  {1: DataType.FLOAT64, 2: DataType.INT64, 3: DataType.BOOL})
    return decode_segment(encode_segment(seg))


def write(store: FleetStore, seg: Segment, *, device: str = "car-1", fleet: str = "taxi") -> int:
    return store.write_segment(fleet=fleet, device_id=device, capture_id="cap-1", campaign="braking",
                               segment=seg, catalog=catalog(), received_unix=RECEIVED)


def test_real_segment_becomes_sorted_narrow_parquet(tmp_path: Path, recordings: Path) -> None:
    store = FleetStore(tmp_path)
    seg = real_segment(recordings)
    rows = len(seg.t_ns)
    assert write(store, seg) == rows * 3
    files = list((tmp_path / "samples").rglob("*.parquet"))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        f"samples/fleet=taxi/date=2018-08-02/car-1-{seg.segment_id.hex()}.parquet"
    ]
    table = pq.read_table(files[0])
    assert table.schema.equals(SAMPLES_SCHEMA, check_metadata=False)
    assert table.num_rows == rows * 3
    data = table.to_pydict()
    assert set(data["device_id"]) == {"car-1"} and set(data["campaign"]) == {"braking"}
    # sorted by signal, then time
    keys = list(zip(data["signal"], data["t_ns"], strict=True))
    assert keys == sorted(keys)
    signals = np.array(data["signal"])
    speed = np.array(data["value"])[signals == "Vehicle.Speed"]
    np.testing.assert_array_equal(speed, seg.columns[1])  # exact: same doubles
    pairs = list(zip(data["value_int"], data["signal"], strict=True))
    assert all(v is None for v, s in pairs if s == "Vehicle.Speed")
    odo = np.array([v for v, s in pairs if s == "Vehicle.Odometer"])
    np.testing.assert_array_equal(odo, seg.columns[2])  # exact int64, beyond 2**53
    moving = [v for v, s in pairs if s == "Vehicle.IsMoving"]
    assert set(moving) == {0, 1} and sum(moving) == int(seg.columns[3].sum())


def test_rewriting_a_segment_is_idempotent(tmp_path: Path, recordings: Path) -> None:
    store = FleetStore(tmp_path)
    seg = real_segment(recordings)
    first = write(store, seg)
    path = next((tmp_path / "samples").rglob("*.parquet"))
    before = pq.read_table(path)
    assert write(store, seg) == first
    files = [p for p in (tmp_path / "samples").rglob("*") if p.is_file()]
    assert files == [path]  # same name, no temp files left
    assert pq.read_table(path).equals(before)


def test_unsorted_timestamps_are_sorted(tmp_path: Path) -> None:
    store = FleetStore(tmp_path)
    t = np.array([30, 10, 20], dtype=np.int64) + DRIVE_START_NS
    seg = Segment(new_segment_id(), "g", t, {1: np.array([3.0, 1.0, 2.0])}, {1: DataType.FLOAT64})
    write(store, seg)
    table = pq.read_table(next((tmp_path / "samples").rglob("*.parquet"))).to_pydict()
    assert table["value"] == [1.0, 2.0, 3.0]
    assert table["t_ns"] == sorted(t.tolist())


def test_boot_time_stamps_are_filed_under_arrival_date(tmp_path: Path) -> None:
    store = FleetStore(tmp_path)
    seg = Segment(new_segment_id(), "g", np.array([46_408_589_502_840], dtype=np.int64),
                  {1: np.array([7.97])}, {1: DataType.FLOAT64})
    write(store, seg)
    path = next((tmp_path / "samples").rglob("*.parquet"))
    assert path.parent.name == "date=2026-01-15"
    assert partition_date(None, RECEIVED) == "2026-01-15"
    assert partition_date(DRIVE_START_NS, RECEIVED) == "2018-08-02"
    far_future = int((RECEIVED + 10 * 86400) * 1e9)
    assert partition_date(far_future, RECEIVED) == "2026-01-15"


def test_empty_segment_writes_nothing(tmp_path: Path) -> None:
    store = FleetStore(tmp_path)
    empty = np.array([], dtype=np.int64)
    seg = Segment(new_segment_id(), "g", empty, {1: np.array([])}, {1: DataType.FLOAT64})
    assert write(store, seg) == 0
    assert list((tmp_path / "samples").rglob("*.parquet")) == []


def test_unknown_signal_and_ragged_columns_are_malformed(tmp_path: Path) -> None:
    store = FleetStore(tmp_path)
    t = np.array([1, 2], dtype=np.int64)
    with pytest.raises(MalformedMessageError, match="signal id 99"):
        write(store, Segment(new_segment_id(), "g", t, {99: np.array([1.0, 2.0])}, {99: DataType.FLOAT64}))
    with pytest.raises(MalformedMessageError, match=r"Vehicle\.Speed"):
        write(store, Segment(new_segment_id(), "g", t, {1: np.array([1.0])}, {1: DataType.FLOAT64}))
    assert [p for p in (tmp_path / "samples").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(("device", "fleet"), [("../evil", "taxi"), ("car-1", "a=b"), ("car/1", "taxi"),
                                               ("car-1", ".."), ("", "taxi")])
def test_names_that_would_escape_the_layout_are_refused(tmp_path: Path, device: str, fleet: str) -> None:
    # The store sits a few levels down so an escape of up to four levels still lands in this test's own
    # directory, which is then checked whole (no scan of other tests' directories).
    store = FleetStore(tmp_path / "a" / "b" / "c" / "store")
    seg = Segment(new_segment_id(), "g", np.array([1], dtype=np.int64), {1: np.array([1.0])},
                  {1: DataType.FLOAT64})
    with pytest.raises(UserError):
        write(store, seg, device=device, fleet=fleet)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_text_signals_land_in_value_str_exactly(tmp_path: Path) -> None:
    """A STRING signal's samples keep their exact text (empty, non-ASCII, long); value/value_int are
    NULL for them, and value_str is NULL for the numeric signals of the same segment."""
    c = Catalog()
    c.add("Vehicle.Speed", DataType.FLOAT64, "m/s")
    c.add("Vehicle.Gear", DataType.STRING)
    texts = ["P", "", "D", "Rückwärts ⚙", "x" * 10_000, "D"]
    t = np.arange(len(texts), dtype=np.int64) * 10**9 + DRIVE_START_NS
    seg = decode_segment(encode_segment(Segment(
        new_segment_id(), "gear", t,
        {1: np.linspace(0, 5, len(texts)), 2: np.asarray(texts, dtype=object)},
        {1: DataType.FLOAT64, 2: DataType.STRING},
    )))
    store = FleetStore(tmp_path)
    assert store.write_segment(fleet="taxi", device_id="car-1", capture_id="cap", campaign="c", segment=seg,
                               catalog=c, received_unix=RECEIVED) == 2 * len(texts)
    (path,) = (tmp_path / "samples").rglob("*.parquet")
    table = pq.read_table(path)
    assert table.schema.field("value_str").type == SAMPLES_SCHEMA.field("value_str").type
    rows = table.to_pylist()
    gear = [r for r in rows if r["signal"] == "Vehicle.Gear"]
    assert [r["value_str"] for r in gear] == texts
    assert {(r["value"], r["value_int"]) for r in gear} == {(None, None)}
    speed = [r for r in rows if r["signal"] == "Vehicle.Speed"]
    assert {r["value_str"] for r in speed} == {None} and None not in {r["value"] for r in speed}
    bad = Segment(new_segment_id(), "gear", t[:1], {2: np.asarray([7], dtype=object)}, {2: DataType.STRING})
    with pytest.raises(MalformedMessageError, match=r"Vehicle\.Gear is STRING but holds non-text"):
        store.write_segment(fleet="taxi", device_id="car-1", capture_id="cap", campaign="c", segment=bad,
                            catalog=c, received_unix=RECEIVED)
