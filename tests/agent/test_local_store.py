"""Local store: ordering, acks, quota eviction, crash recovery (including kill -9), disk full, threads."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetloop_agent.local_store import COMMIT_RESERVE_BYTES, LocalStore, StoredSegment
from fleetloop_shared.catalog import DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import (
    ConfigError,
    NotFoundError,
    StateError,
    StorageFullError,
    UserError,
)
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, new_segment_id

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("shared", "agent", "cloud", "firmware-sim", "cli"))


def make_segment(rows: int = 50, seed: int = 0, segment_id: bytes | None = None) -> Segment:
    rng = np.random.default_rng(seed)
    t = 1_000_000_000 + np.arange(rows, dtype=np.int64) * 10_000_000
    return Segment(
        segment_id=segment_id or new_segment_id(),
        group="imu",
        t_ns=t,
        columns={
            1: rng.normal(size=rows),
            2: rng.integers(-5, 5, rows).astype(np.int64),
            3: rng.random(rows) > 0.5,
        },
        data_types={1: DataType.FLOAT64, 2: DataType.INT64, 3: DataType.BOOL},
    )


def seg_files(root: Path) -> set[str]:
    return {p.name for p in (root / "segments").iterdir()}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


# ------------------------------------------------------------------------------------- read API


def test_query_by_signal_group_capture_and_time_range(store: LocalStore) -> None:
    a = make_segment(rows=100, seed=1)  # t = 1.00 s .. 1.99 s
    b = make_segment(rows=100, seed=2)
    b.group = "can0/SPEED"
    b.t_ns = b.t_ns + 5_000_000_000  # 6.00 s .. 6.99 s
    store.append(a, capture_id="c1", campaign="x", priority=5, now_ns=1)
    store.append(b, capture_id="c2", campaign="x", priority=5, now_ns=2)

    everything = list(store.query())
    assert [seg.segment_id for _, seg in everything] == [a.segment_id, b.segment_id]
    assert everything[0][1] == a

    window = list(store.query(from_ns=1_500_000_000, to_ns=1_599_999_999, signal_ids=[1]))
    assert len(window) == 1
    entry, seg = window[0]
    assert entry.capture_id == "c1" and set(seg.columns) == {1}
    assert seg.t_ns.tolist() == list(range(1_500_000_000, 1_600_000_000, 10_000_000))
    assert seg.columns[1].tobytes() == a.columns[1][50:60].tobytes()

    assert [e.capture_id for e, _ in store.query(group="can0/SPEED")] == ["c2"]
    assert [e.capture_id for e, _ in store.query(capture_id="c1")] == ["c1"]
    assert list(store.query(signal_ids=[999])) == []
    assert list(store.query(from_ns=3_000_000_000, to_ns=4_000_000_000)) == []

    inv = store.inventory()
    assert (inv.segments, inv.samples, inv.groups) == (2, a.sample_count + b.sample_count, 2)
    assert inv.signals == len(a.columns)
    assert inv.segment_bytes == sum(p.stat().st_size for p in (store._root / "segments").iterdir())
    assert inv.disk_bytes > inv.segment_bytes
    assert (inv.first_ns, inv.last_ns) == (int(a.t_ns[0]), int(b.t_ns[-1]))


def test_text_columns_are_stored_queried_and_counted(store: LocalStore) -> None:
    seg = make_segment(rows=40, seed=3)
    modes = np.empty(40, dtype=object)
    modes[:] = ["", "PARK", "DRIVE ✓", "x" * 5000] * 10
    seg.columns[4] = modes
    seg.data_types[4] = DataType.STRING
    store.append(seg, capture_id="c", campaign="x", priority=5, now_ns=1)
    assert decode_segment(store.read(seg.segment_id)) == seg
    ((_, window),) = store.query(signal_ids=[4], from_ns=int(seg.t_ns[1]), to_ns=int(seg.t_ns[3]))
    assert window.columns[4].tolist() == ["PARK", "DRIVE ✓", "x" * 5000]
    inv = store.inventory()
    assert (inv.samples, inv.signals) == (40 * 4, 4)


# --------------------------------------------------------------------------------- basic behaviour


def test_append_read_ack_and_stats(store: LocalStore, tmp_path: Path) -> None:
    seg = make_segment(rows=40)
    stored = store.append(seg, capture_id="cap-1", campaign="harsh-braking", priority=8, now_ns=123)
    assert stored == StoredSegment(
        seg.segment_id,
        "cap-1",
        "harsh-braking",
        8,
        "imu",
        120,
        len(encode_segment(seg)),
        int(seg.t_ns[0]),
        int(seg.t_ns[-1]),
        123,
    )
    assert store.pending() == [stored]
    data = store.read(seg.segment_id)
    assert data == encode_segment(seg)
    assert decode_segment(data) == seg
    stats = store.stats()
    assert (stats.segments_pending, stats.bytes_pending, stats.samples_stored_total) == (1, len(data), 120)

    store.mark_uploaded(seg.segment_id)
    store.mark_uploaded(seg.segment_id)  # idempotent
    store.mark_uploaded(b"\x00" * 16)  # unknown id: a late or duplicate ack is harmless
    assert store.pending() == []
    assert seg_files(tmp_path / "store") == set()
    with pytest.raises(NotFoundError):
        store.read(seg.segment_id)
    stats = store.stats()
    assert (stats.segments_pending, stats.bytes_pending, stats.segments_uploaded_total) == (0, 0, 1)
    with pytest.raises(StateError, match="already"):
        store.append(seg, capture_id="cap-1", campaign="c", priority=1, now_ns=124)


def test_pending_is_priority_desc_then_oldest_first(store: LocalStore) -> None:
    plan = [(3, 50), (9, 40), (3, 10), (0, 1), (9, 41), (3, 10)]
    ids = []
    for i, (prio, created) in enumerate(plan):
        ids.append(
            store.append(
                make_segment(seed=i), capture_id=f"c{i}", campaign="x", priority=prio, now_ns=created
            ).segment_id
        )
    order = [ids.index(s.segment_id) for s in store.pending()]
    assert order == [1, 4, 2, 5, 0, 3]
    assert [ids.index(s.segment_id) for s in store.pending(limit=2)] == [1, 4]
    assert store.pending(limit=0) == []
    with pytest.raises(UserError):
        store.pending(limit=-1)


def test_empty_and_real_segments_are_stored_exactly(store: LocalStore, recordings: Path) -> None:
    empty = Segment(new_segment_id(), "none", np.zeros(0, dtype=np.int64), {}, {})
    e = store.append(empty, capture_id="", campaign="", priority=0, now_ns=-5)
    assert (e.samples, e.first_ns, e.last_ns, e.created_ns) == (0, 0, 0, -5)
    assert decode_segment(store.read(empty.segment_id)) == empty

    accel = comma2k19_segment(recordings) / "processed_log" / "IMU" / "accelerometer"
    t_ns = np.round(np.load(accel / "t") * 1e9).astype(np.int64)
    value = np.load(accel / "value")
    columns = {i + 1: np.ascontiguousarray(value[:, i]) for i in range(3)}
    seg = Segment(new_segment_id(), "imu/accel", t_ns, columns, dict.fromkeys(columns, DataType.FLOAT64))
    stored = store.append(seg, capture_id="real", campaign="c", priority=5, now_ns=1)
    assert stored.first_ns == int(t_ns.min()) and stored.last_ns == int(t_ns.max())
    assert decode_segment(store.read(seg.segment_id)) == seg


def test_bad_arguments_are_user_errors(store: LocalStore, tmp_path: Path) -> None:
    seg = make_segment()
    for prio in (-1, 10):
        with pytest.raises(UserError, match="priority"):
            store.append(seg, capture_id="c", campaign="x", priority=prio, now_ns=0)
    with pytest.raises(UserError, match="capture_id"):
        store.append(seg, capture_id="x" * 300, campaign="x", priority=1, now_ns=0)
    with pytest.raises(UserError, match="now_ns"):
        store.append(seg, capture_id="c", campaign="x", priority=1, now_ns=2**63)
    assert store.pending() == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        LocalStore(tmp_path / "afile")
    with pytest.raises(ConfigError, match="quota"):
        LocalStore(tmp_path / "q", quota_bytes=0)


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "s")
    s.close()
    s.close()
    with pytest.raises(StateError, match="closed"):
        s.pending()
    with pytest.raises(StateError, match="closed"):
        s.append(make_segment(), capture_id="c", campaign="x", priority=1, now_ns=0)


def test_state_and_counters_survive_reopen(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = LocalStore(root)
    a = s.append(make_segment(seed=1), capture_id="a", campaign="x", priority=2, now_ns=1)
    b = s.append(make_segment(seed=2), capture_id="b", campaign="x", priority=7, now_ns=2)
    s.mark_uploaded(a.segment_id)
    before = s.stats()
    s.close()
    s = LocalStore(root)
    assert s.pending() == [b]
    assert s.stats() == before
    s.mark_uploaded(a.segment_id)  # still remembered as acknowledged
    assert s.stats().segments_uploaded_total == 1
    s.close()


# ------------------------------------------------------------------------------------------- quota


def du(root: Path) -> int:
    """What ``du`` says a directory takes: the allocated blocks of every file under it."""
    return sum(os.stat(Path(d) / n).st_blocks * 512 for d, _, names in os.walk(root) for n in names)


def test_quota_evicts_lowest_priority_then_oldest_and_counts(tmp_path: Path) -> None:
    rows = 20_000  # ~170 kB segments: the index and its log change by a few pages, far less than half one
    probe = LocalStore(tmp_path / "probe")
    probe.append(make_segment(rows=rows), capture_id="c0", campaign="x", priority=1, now_ns=0)
    (path,) = (tmp_path / "probe" / "segments").iterdir()
    size = path.stat().st_size
    allocated = path.stat().st_blocks * 512
    overhead = probe.disk_usage() - allocated  # the index, its log and shared memory
    probe.close()

    root = tmp_path / "s"
    s = LocalStore(root, quota_bytes=overhead + COMMIT_RESERVE_BYTES + 3 * allocated + allocated // 2)
    made = {}
    for name, prio, created in [("A", 1, 1), ("B", 5, 2), ("C", 1, 3)]:
        made[name] = s.append(
            make_segment(rows=rows), capture_id="c0", campaign="x", priority=prio, now_ns=created
        ).segment_id
    made["D"] = s.append(
        make_segment(rows=rows), capture_id="c0", campaign="x", priority=5, now_ns=4
    ).segment_id
    names = {v: k for k, v in made.items()}
    assert sorted(names[p.segment_id] for p in s.pending()) == ["B", "C", "D"]  # A: lowest, oldest
    made["E"] = s.append(
        make_segment(rows=rows), capture_id="c0", campaign="x", priority=1, now_ns=5
    ).segment_id
    names = {v: k for k, v in made.items()}
    assert sorted(names[p.segment_id] for p in s.pending()) == ["B", "D", "E"]  # C: only one <= 1
    stats = s.stats()
    assert (stats.evicted_segments_total, stats.evicted_bytes_total) == (2, 2 * size)

    # A less urgent segment never pushes out more urgent data: refused, nothing evicted.
    with pytest.raises(StorageFullError, match="more urgent"):
        s.append(make_segment(rows=rows), capture_id="c0", campaign="x", priority=0, now_ns=6)
    assert len(s.pending()) == 3 and s.stats().evicted_segments_total == 2
    with pytest.raises(NotFoundError):
        s.read(made["A"])
    assert len(seg_files(root)) == 3

    with pytest.raises(StorageFullError, match="whole store quota"):
        s.append(make_segment(rows=10 * rows), capture_id="c0", campaign="x", priority=9, now_ns=7)
    assert len(seg_files(root)) == 3
    # Acknowledged data frees quota.
    for p in s.pending():
        s.mark_uploaded(p.segment_id)
    s.append(make_segment(rows=rows), capture_id="c0", campaign="x", priority=0, now_ns=8)
    assert s.stats().evicted_segments_total == 2
    s.close()


def test_quota_counts_what_the_store_takes_on_disk(tmp_path: Path) -> None:
    """Small segments take whole blocks, and the index and its log take disk too: the store never takes
    more than its quota as ``du`` measures it, although its segment files alone add up to far less."""
    root = tmp_path / "s"
    quota = 256 * 1024
    (root / "segments").mkdir(parents=True)
    (root / "segments" / "notes.txt").write_bytes(b"n" * 9_000)  # not a segment, where segments are
    s = LocalStore(root, quota_bytes=quota)
    (root / "catalog.json").write_bytes(b"x" * 20_000)  # an operator's file under the root counts too
    file_bytes = 0
    for i in range(120):
        s.append(make_segment(seed=i), capture_id="c", campaign="x", priority=5, now_ns=i)
        file_bytes += s.pending(limit=10_000)[-1].size_bytes
        assert du(root) <= quota, i
        assert s.disk_usage() == du(root)
    assert file_bytes < quota  # counting segment bytes alone, nothing would ever have been evicted
    assert s.stats().evicted_segments_total > 60
    inventory = s.inventory()
    assert inventory.disk_bytes == du(root) and inventory.disk_bytes > inventory.segment_bytes
    s.close()


# ---------------------------------------------------------------------------------------- recovery


def test_recovery_deletes_tmp_drops_rows_without_files_and_reindexes_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = LocalStore(root)
    keep = s.append(make_segment(seed=1), capture_id="keep", campaign="k", priority=4, now_ns=10)
    lost_file = s.append(make_segment(seed=2), capture_id="lost", campaign="k", priority=4, now_ns=11)
    lost_row = s.append(make_segment(seed=3), capture_id="orphan", campaign="camp", priority=6, now_ns=12)
    acked = s.append(make_segment(seed=4), capture_id="acked", campaign="k", priority=4, now_ns=13)
    short = s.append(make_segment(seed=5), capture_id="short", campaign="k", priority=4, now_ns=14)
    s.close()
    segdir = root / "segments"
    acked_bytes = (segdir / (acked.segment_id.hex() + ".seg")).read_bytes()
    s = LocalStore(root)
    s.mark_uploaded(acked.segment_id)
    s.close()

    (segdir / (acked.segment_id.hex() + ".seg")).write_bytes(acked_bytes)  # crash before the delete
    (segdir / (lost_file.segment_id.hex() + ".seg")).unlink()
    short_path = segdir / (short.segment_id.hex() + ".seg")
    short_path.write_bytes(short_path.read_bytes()[:-10])
    with sqlite3.connect(root / "index.sqlite3") as db:
        db.execute("DELETE FROM segments WHERE segment_id = ?", (lost_row.segment_id,))
    db.close()
    (segdir / "0123.seg.tmp").write_bytes(b"half a segment")
    (segdir / ("ab" * 16 + ".seg")).write_bytes(b"garbage that does not decode")
    (segdir / ("cd" * 16 + ".seg")).write_bytes(  # valid file under the wrong name
        (segdir / (keep.segment_id.hex() + ".seg")).read_bytes()
    )
    (segdir / "README").write_text("not ours to judge")

    s = LocalStore(root)
    assert s.pending() == [lost_row, keep]  # priority 6 first; the orphan kept its metadata
    assert seg_files(root) == {keep.segment_id.hex() + ".seg", lost_row.segment_id.hex() + ".seg", "README"}
    for p in s.pending():
        assert decode_segment(s.read(p.segment_id)).segment_id == p.segment_id
    s.close()


def test_unreadable_index_is_rebuilt_from_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = LocalStore(root)
    entries = [
        s.append(make_segment(seed=i), capture_id=f"c{i}", campaign="x", priority=i, now_ns=i)
        for i in range(3)
    ]
    s.close()
    for suffix in ("-wal", "-shm"):
        Path(str(root / "index.sqlite3") + suffix).unlink(missing_ok=True)
    (root / "index.sqlite3").write_bytes(b"this is not an sqlite database" * 100)
    s = LocalStore(root)
    assert s.pending() == list(reversed(entries))
    assert (root / "index.sqlite3.corrupt").exists()
    s.close()


_KILL_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from pathlib import Path
    from fleetloop_agent.local_store import LocalStore
    from fleetloop_shared.catalog import DataType
    from fleetloop_shared.segment import Segment, new_segment_id

    store = LocalStore(Path(sys.argv[1]), quota_bytes=1 << 30)
    rng = np.random.default_rng(int(sys.argv[2]))
    i = 0
    while True:
        rows = int(rng.integers(1, 400))
        seg = Segment(new_segment_id(), "imu", np.cumsum(rng.integers(0, 10**7, rows)),
                      {1: rng.normal(size=rows).round(3), 2: rng.integers(0, 9, rows)},
                      {1: DataType.FLOAT64, 2: DataType.INT64})
        store.append(seg, capture_id=f"c{i}", campaign="loop", priority=int(rng.integers(0, 10)), now_ns=i)
        print("A", seg.segment_id.hex(), flush=True)  # acknowledged: append returned
        if i == 0:
            print("ready", flush=True)
        if i % 3 == 0:
            for p in store.pending(limit=2):
                store.read(p.segment_id)
                store.mark_uploaded(p.segment_id)
                print("U", p.segment_id.hex(), flush=True)
        i += 1
    """
)

KILL_ROUNDS = 50


def test_kill_9_at_random_points_never_loses_an_acknowledged_segment(tmp_path: Path) -> None:
    """A writer is killed (SIGKILL) at random points 50 times; after every restart the index agrees with
    the files, no temporary file survives, and every segment whose append returned and that was not
    acknowledged by the uplink reads back and decodes (checksums pass)."""
    root = tmp_path / "s"
    # the kernels' bytes equal numpy's (tested in test_codecs); skipping the numba import keeps rounds short
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "FLEETLOOP_NO_NUMBA": "1"}
    rnd = random.Random(1234)
    appended: set[str] = set()
    uploaded: set[str] = set()
    for round_no in range(KILL_ROUNDS):
        child = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(root), str(round_no)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout is not None
        lines = []
        while True:
            line = child.stdout.readline().decode().split()
            assert line, child.stderr.read() if child.stderr else ""
            if line == ["ready"]:
                break
            lines.append(line)
        time.sleep(rnd.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        lines += [ln.decode().split() for ln in child.stdout.read().splitlines()]
        child.stdout.close()
        if child.stderr:
            child.stderr.close()
        for line in lines:
            if len(line) == 2 and line[0] == "A":
                appended.add(line[1])
            elif len(line) == 2 and line[0] == "U":
                uploaded.add(line[1])

        s = LocalStore(root, quota_bytes=1 << 30)
        pending = s.pending(limit=10_000)
        pending_ids = {p.segment_id.hex() for p in pending}
        names = seg_files(root)
        assert not any(n.endswith(".tmp") for n in names), round_no
        assert names == {i + ".seg" for i in pending_ids}, round_no
        # a kill between mark_uploaded's commit and the child's "U" line: the index remembers the ack
        with sqlite3.connect(root / "index.sqlite3") as db:
            acked = {
                bytes(r[0]).hex()
                for r in db.execute("SELECT segment_id FROM segments WHERE uploaded_seq IS NOT NULL")
            }
        missing = appended - uploaded - acked - pending_ids
        assert not missing, f"round {round_no}: acknowledged segments lost: {sorted(missing)[:3]}"
        for p in pending:
            seg = decode_segment(s.read(p.segment_id))
            assert (seg.segment_id, seg.group, seg.sample_count) == (p.segment_id, p.group, p.samples)
        assert s.stats().segments_pending == len(pending)
        s.close()
    assert len(appended) > KILL_ROUNDS and uploaded


# ------------------------------------------------------------------------------------- disk full


_FULL_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, numpy as np
    from pathlib import Path
    from fleetloop_agent.local_store import LocalStore
    from fleetloop_shared.catalog import DataType
    from fleetloop_shared.errors import StorageFullError
    from fleetloop_shared.segment import Segment, new_segment_id

    store = LocalStore(Path(sys.argv[1]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceeding the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
    rng = np.random.default_rng(0)
    n = 200_000
    big = Segment(new_segment_id(), "imu", np.arange(n), {1: rng.random(n)}, {1: DataType.FLOAT64})
    try:
        store.append(big, capture_id="big", campaign="x", priority=5, now_ns=1)
        print("stored")
    except StorageFullError as exc:
        print("full:", exc)
    small = Segment(new_segment_id(), "imu", np.arange(10), {1: rng.random(10)}, {1: DataType.FLOAT64})
    store.append(small, capture_id="small", campaign="x", priority=5, now_ns=2)
    print("pending", len(store.pending()))
    store.close()
    """
)


def test_disk_full_raises_storage_full_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    root = tmp_path / "s"
    out = subprocess.run(
        [sys.executable, "-c", _FULL_CHILD, str(root)],
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("full: ") and "no space" in lines[0]
    assert lines[1] == "pending 1"
    assert len(seg_files(root)) == 1 and not any(n.endswith(".tmp") for n in seg_files(root))


# ---------------------------------------------------------------------------------------- threads


def test_appender_and_uplink_threads_share_the_store(store: LocalStore, tmp_path: Path) -> None:
    total = 150
    errors: list[BaseException] = []
    acked: set[bytes] = set()

    def appender() -> None:
        try:
            for i in range(total):
                store.append(
                    make_segment(rows=20, seed=i), capture_id=f"c{i}", campaign="x", priority=i % 10, now_ns=i
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def uplink() -> None:
        deadline = time.monotonic() + 20
        try:
            while len(acked) < total and time.monotonic() < deadline:
                for p in store.pending(limit=10):
                    assert decode_segment(store.read(p.segment_id)).segment_id == p.segment_id
                    store.mark_uploaded(p.segment_id)
                    acked.add(p.segment_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender), threading.Thread(target=uplink)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(acked) == total
    stats = store.stats()
    assert (stats.segments_pending, stats.segments_uploaded_total, stats.samples_stored_total) == (
        0,
        total,
        total * 20 * 3,
    )
    assert seg_files(tmp_path / "store") == set()


def _multi_group_segment() -> Segment:
    """Two groups in one (format 4) segment: ``imu`` at 1.00–1.49 s and ``can0/SPEED`` at 5.00–5.49 s."""
    a = make_segment(rows=50, seed=7)
    b = make_segment(rows=50, seed=8, segment_id=a.segment_id)
    b.group = "can0/SPEED"
    b.t_ns = b.t_ns + 4_000_000_000
    b.columns = {10 + k: v for k, v in b.columns.items()}
    b.data_types = {10 + k: v for k, v in b.data_types.items()}
    return Segment(a.segment_id, a.group, a.t_ns, a.columns, a.data_types, (b,))


def test_multi_group_segments_are_indexed_queried_and_reindexed_per_group(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = LocalStore(root)
    seg = _multi_group_segment()
    other = make_segment(rows=10, seed=9)
    entry = s.append(seg, capture_id="c", campaign="k", priority=5, now_ns=1)
    s.append(other, capture_id="d", campaign="k", priority=5, now_ns=2)
    assert (entry.first_ns, entry.last_ns) == (1_000_000_000, 5_490_000_000)
    assert entry.samples == seg.sample_count == 2 * 50 * 3
    assert entry.group == "imu\ncan0/SPEED"
    inv = s.inventory()
    assert (inv.groups, inv.signals, inv.samples) == (2, 6, seg.sample_count + other.sample_count)

    assert [g.group for _, g in s.query(capture_id="c")] == ["imu", "can0/SPEED"]
    speed = list(s.query(group="can0/SPEED"))
    assert len(speed) == 1 and speed[0][1] == seg.more_groups[0]
    imu = [e.capture_id for e, _ in s.query(group="imu")]
    assert imu == ["c", "d"]
    late = list(s.query(from_ns=5_000_000_000, signal_ids=[11]))
    assert len(late) == 1 and set(late[0][1].columns) == {11} and late[0][1].t_ns.shape == (50,)
    s.close()

    # Lose the index row: recovery re-indexes the file with the same per-group metadata.
    with sqlite3.connect(root / "index.sqlite3") as db:
        db.execute("DELETE FROM segments WHERE segment_id = ?", (seg.segment_id,))
    db.close()
    s = LocalStore(root)
    again = next(p for p in s.pending() if p.segment_id == seg.segment_id)
    assert (again.group, again.first_ns, again.last_ns, again.samples) == (
        entry.group,
        entry.first_ns,
        entry.last_ns,
        entry.samples,
    )
    assert decode_segment(s.read(seg.segment_id)) == seg
    s.close()
