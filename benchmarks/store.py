"""Store benchmark: bytes per sample and codec throughput of the segment format vs pyarrow Parquet.

Why: the local store's promise is "the smallest lossless on-device store we can build", at least as
fast as writing Parquet. This script measures exactly that on every real data set this build can decode
(``../shared/data/real`` through the same readers ``fleetloop store import`` uses), in one run, against
these references:

* ``parquet_zstd``: pyarrow Parquet + zstd, one file per group with ``t_ns`` int64 and one column per
  signal (the signals of a group share their timestamps there too — the fair comparison);
* ``parquet_bss``: the same with BYTE_STREAM_SPLIT for floats and DELTA_BINARY_PACKED for integers;
* ``parquet_long_zstd``: the narrow ``t_ns, value`` layout per signal (the layout of the first
  3.35 B/sample figures the store was measured against).

Segments are cut as ``fleetloop store import`` cuts them (``store_commands.import_segments``:
``store_import.to_segments``, ≤ 65,536 rows of a group per segment, then ``segment.bundle_segments``,
which packs consecutive groups into format 4 segments of ≤ 262,144 rows that share one clock). The
Parquet references get one file per *group*, as before; ``segments_one_group`` records what the same
groups cost as one single-group segment each (formats 2/3), the layout before format 4.
Every segment is decoded and compared bit for bit before anything is timed. Timings are best of
``--repeat`` (the machine has 2 noisy cores) with our codec and pyarrow interleaved in the same run; the
JSON reports ratios (``> 1`` = we are faster).

``generated_bus`` is the sanity check for multi-group segments on data nothing was tuned on: a
generated CAN bus whose frames arrive in USB batches. The real recordings hold no text, so
``generated_strings`` measures STRING columns (segment format 3) on
generated data in the same way: a few machine states in runs, fault codes, all-distinct identifiers —
bytes against the same Parquet+zstd layout, and the round trip checked first. Generated, so it is a
sanity figure, not a corpus result.

Usage: ``.venv/bin/python benchmarks/store.py [--data DIR] [--repeat N] [--kills N]``
(``--kills`` also runs the kill -9 loop against a store, N times).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from real_corpus import real_corpus

from fleetloop_agent.recordings import Recording
from fleetloop_agent.store_import import to_segments
from fleetloop_cli.store_commands import import_segments
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.segment import FORMAT_VERSION, Segment, decode_segment, encode_segment
from fleetloop_shared.segment.codecs import bitpack

GOAL_BYTES_PER_SAMPLE = 1.0
GOAL_VS_PARQUET_ZSTD = 0.30


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _wide_table(seg: Segment) -> pa.Table:
    cols: dict[str, Any] = {"t_ns": pa.array(seg.t_ns, pa.int64())}
    for sid in sorted(seg.columns):
        cols[f"s{sid}"] = pa.array(seg.columns[sid])
    return pa.table(cols)


def _parquet(table: pa.Table, **kw: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", **kw)
    return buf.getvalue()


def _bss_options(table: pa.Table) -> dict[str, Any]:
    enc: dict[str, str] = {}
    for field in table.schema:
        if pa.types.is_floating(field.type):
            enc[field.name] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_integer(field.type):
            enc[field.name] = "DELTA_BINARY_PACKED"
    return {"use_dictionary": False, "column_encoding": enc}


def measure_set(name: str, result: Recording, repeat: int) -> dict[str, Any]:
    segments = list(import_segments(result, Catalog(), to_segments))
    groups = [g for s in segments for g in s.groups()]
    samples = sum(s.sample_count for s in segments)
    encoded = [encode_segment(s) for s in segments]
    for seg, data in zip(segments, encoded, strict=True):
        if decode_segment(data) != seg:
            raise SystemExit(f"{name}: segment {seg.group} did not round-trip bit-exactly")
    one_group = sum(len(encode_segment(g)) for g in groups)
    tables = [_wide_table(s) for s in groups]
    pz = [_parquet(t) for t in tables]
    bss = [_parquet(t, **_bss_options(t)) for t in tables]
    long_bytes = 0
    for seg in groups:
        for sid in seg.columns:
            long_bytes += len(_parquet(pa.table({"t_ns": seg.t_ns, "value": seg.columns[sid]})))
    ours = sum(map(len, encoded))

    # Throughput, interleaved: ours then pyarrow, best of `repeat` each.
    enc_ours = enc_pq = dec_ours = dec_pq = float("inf")
    for _ in range(repeat):
        enc_ours = min(enc_ours, _best(lambda: [encode_segment(s) for s in segments], 1))
        enc_pq = min(enc_pq, _best(lambda: [_parquet(t) for t in tables], 1))
        dec_ours = min(dec_ours, _best(lambda: [decode_segment(d) for d in encoded], 1))
        dec_pq = min(dec_pq, _best(lambda: [pq.read_table(io.BytesIO(b)) for b in pz], 1))
    return {
        "name": name,
        "groups": len(result.groups),
        "signals": sum(len(g.columns) for g in result.groups),
        "segments": len(segments),
        "samples": samples,
        "frames_skipped": result.frames_skipped,
        "bytes": {
            "segments": ours,
            "segments_one_group": one_group,
            "parquet_zstd": sum(map(len, pz)),
            "parquet_bss": sum(map(len, bss)),
            "parquet_long_zstd": long_bytes,
        },
        "seconds": {"encode": enc_ours, "parquet_write": enc_pq, "decode": dec_ours, "parquet_read": dec_pq},
    }


def generated_strings(repeat: int) -> dict[str, Any]:
    """STRING columns (generated: the corpus has none) against Parquet+zstd, exact round trip first."""
    import numpy as np

    from fleetloop_shared.catalog import DataType
    from fleetloop_shared.segment import new_segment_id

    rng = np.random.default_rng(11)
    rows = 65_536
    states = ["OFF", "ACC", "ON", "READY", "CHARGING", "FAULT"]
    run_lengths = rng.integers(50, 2000, rows // 50)
    state = np.repeat(rng.integers(0, len(states), run_lengths.shape[0]), run_lengths)[:rows]
    codes = [f"P{c:04X}" for c in rng.integers(0, 0xFFFF, 40)]
    columns = {
        "state": [states[k] for k in state],
        "fault_code": [codes[k] if k < 40 else "" for k in rng.integers(0, 400, rows)],
        "trip_id": [f"trip-{i:08d}-{'é' * (i % 3)}" for i in range(rows)],
    }
    t_ns = 1_700_000_000_000_000_000 + np.arange(rows, dtype=np.int64) * 10_000_000
    out: dict[str, Any] = {"rows": rows}
    for name, values in columns.items():
        arr = np.empty(rows, dtype=object)
        arr[:] = values
        seg = Segment(new_segment_id(), name, t_ns, {1: arr}, {1: DataType.STRING})
        data = encode_segment(seg)
        if decode_segment(data) != seg:
            raise SystemExit(f"generated strings {name}: did not round-trip exactly")
        table = _wide_table(seg)
        pz = _parquet(table)
        enc = min(_best(lambda s=seg: encode_segment(s), 1) for _ in range(repeat))
        wr = min(_best(lambda t=table: _parquet(t), 1) for _ in range(repeat))
        out[name] = {
            "distinct": len(set(values)),
            "bytes_per_sample": round(len(data) / rows, 4),
            "parquet_zstd_bytes_per_sample": round(len(pz) / rows, 4),
            "size_vs_parquet_zstd": round(len(data) / len(pz), 4),
            "encode_speed_vs_parquet_write": round(wr / enc, 3),
        }
    return out


def generated_bus(repeat: int) -> dict[str, Any]:
    """Multi-group segments on generated CAN arrivals (not the corpus the clock screen was set on).

    Periodic messages (10–100 ms) whose frames reach the host in USB batches every ``batch_ms`` and carry
    the batch's ns-resolved arrival time, as a panda's do; values: a rolling counter and a random walk
    in 0.01 steps. Bytes of the format 4 segment against the same groups as single-group segments and
    against Parquet+zstd; round trip checked first.
    """
    import numpy as np

    from fleetloop_shared.catalog import DataType
    from fleetloop_shared.segment import bundle_segments, new_segment_id

    out: dict[str, Any] = {}
    for batch_ms in (1, 5):
        rng = np.random.default_rng(batch_ms)
        step = batch_ms * 1_000_000
        batch_times = np.cumsum(rng.integers(step * 9 // 10, step * 11 // 10, 60_000 // batch_ms))
        singles = []
        for m in range(30):
            period = int(rng.choice([10, 20, 50, 100])) * 1_000_000
            sent = np.arange(int(rng.integers(0, period)), int(batch_times[-1]) - period, period)
            t = batch_times[np.searchsorted(batch_times, sent + rng.integers(0, 300_000, sent.size))]
            singles.append(
                Segment(
                    new_segment_id(),
                    f"bus/M{m}",
                    t.astype(np.int64),
                    {
                        2 * m: (np.arange(t.size) % 16).astype(np.int64),
                        2 * m + 1: np.round(np.cumsum(rng.normal(0, 0.5, t.size)), 2),
                    },
                    {2 * m: DataType.INT64, 2 * m + 1: DataType.FLOAT64},
                )
            )
        bundles = list(bundle_segments(singles))
        encoded = [encode_segment(b) for b in bundles]
        if [decode_segment(d) for d in encoded] != bundles:
            raise SystemExit(f"generated bus ({batch_ms} ms batches): did not round-trip exactly")
        samples = sum(s.sample_count for s in singles)
        ours = sum(map(len, encoded))
        one_group = sum(len(encode_segment(s)) for s in singles)
        tables = [_wide_table(s) for s in singles]
        pz = sum(len(_parquet(t)) for t in tables)
        enc = min(_best(lambda b=bundles: [encode_segment(x) for x in b], 1) for _ in range(repeat))
        wr = min(_best(lambda ts=tables: [_parquet(t) for t in ts], 1) for _ in range(repeat))
        out[f"batches_{batch_ms}ms"] = {
            "messages": len(singles),
            "samples": samples,
            "bytes_per_sample": round(ours / samples, 4),
            "bytes_per_sample_one_group_segments": round(one_group / samples, 4),
            "parquet_zstd_bytes_per_sample": round(pz / samples, 4),
            "size_vs_one_group_segments": round(ours / one_group, 4),
            "size_vs_parquet_zstd": round(ours / pz, 4),
            "encode_speed_vs_parquet_write": round(wr / enc, 3),
        }
    return out


def _ratios(bytes_: dict[str, int], samples: int, seconds: dict[str, float]) -> dict[str, Any]:
    ours = bytes_["segments"]
    return {
        "bytes_per_sample": round(ours / samples, 4) if samples else None,
        "bytes_per_sample_one_group_segments": round(bytes_["segments_one_group"] / samples, 4)
        if samples
        else None,
        "parquet_zstd_bytes_per_sample": round(bytes_["parquet_zstd"] / samples, 4) if samples else None,
        "parquet_bss_bytes_per_sample": round(bytes_["parquet_bss"] / samples, 4) if samples else None,
        "parquet_long_zstd_bytes_per_sample": round(bytes_["parquet_long_zstd"] / samples, 4)
        if samples
        else None,
        "size_vs_parquet_zstd": round(ours / bytes_["parquet_zstd"], 4) if bytes_["parquet_zstd"] else None,
        "size_vs_parquet_bss": round(ours / bytes_["parquet_bss"], 4) if bytes_["parquet_bss"] else None,
        "size_vs_parquet_long_zstd": round(ours / bytes_["parquet_long_zstd"], 4)
        if bytes_["parquet_long_zstd"]
        else None,
        "encode_speed_vs_parquet_write": round(seconds["parquet_write"] / seconds["encode"], 3)
        if seconds["encode"]
        else None,
        "decode_speed_vs_parquet_read": round(seconds["parquet_read"] / seconds["decode"], 3)
        if seconds["decode"]
        else None,
        "encode_msamples_per_s": round(samples / seconds["encode"] / 1e6, 2) if seconds["encode"] else None,
        "decode_msamples_per_s": round(samples / seconds["decode"] / 1e6, 2) if seconds["decode"] else None,
    }


_KILL_CHILD = """
import sys, numpy as np
from pathlib import Path
from fleetloop_agent.local_store import LocalStore
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, new_segment_id
store = LocalStore(Path(sys.argv[1]), quota_bytes=1 << 30)
rng = np.random.default_rng(int(sys.argv[2]))
i = 0
while True:
    rows = int(rng.integers(1, 2000))
    seg = Segment(new_segment_id(), "g", np.cumsum(rng.integers(0, 10**7, rows)),
                  {1: rng.normal(size=rows).round(2), 2: rng.integers(0, 9, rows)},
                  {1: DataType.FLOAT64, 2: DataType.INT64})
    store.append(seg, capture_id="c", campaign="k", priority=5, now_ns=i)
    print("A", seg.segment_id.hex(), flush=True)
    if i == 0:
        print("ready", flush=True)
    i += 1
"""


def kill_loop(kills: int) -> dict[str, Any]:
    """The test's kill -9 loop, longer: every appended segment must survive every kill."""
    from fleetloop_agent.local_store import LocalStore

    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        acked: set[str] = set()
        for k in range(kills):
            child = subprocess.Popen(
                [sys.executable, "-c", _KILL_CHILD, str(root), str(k)],
                stdout=subprocess.PIPE,
                env={**os.environ, "FLEETLOOP_NO_NUMBA": "1"},
            )
            assert child.stdout is not None
            lines = []
            while (line := child.stdout.readline().split()) != [b"ready"]:
                if not line:
                    raise SystemExit("kill loop child died")
                lines.append(line)
            time.sleep(rnd.uniform(0, 0.1))
            child.send_signal(signal.SIGKILL)
            child.wait()
            lines += [ln.split() for ln in child.stdout.read().splitlines()]
            child.stdout.close()
            acked |= {ln[1].decode() for ln in lines if len(ln) == 2 and ln[0] == b"A"}
            store = LocalStore(root, quota_bytes=1 << 30)
            pending = {p.segment_id.hex() for p in store.pending(limit=100_000)}
            if acked - pending:
                raise SystemExit(f"kill {k}: acknowledged segments lost: {sorted(acked - pending)[:3]}")
            for sid in pending:
                decode_segment(store.read(bytes.fromhex(sid)))
            store.close()
        return {"kills": kills, "segments_acknowledged": len(acked), "lost": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="recordings directory (default: ../shared/data/real or $FLEETLOOP_DATA)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kills", type=int, default=0)
    args = ap.parse_args()
    root = find_recordings(args.data)
    if root is None:
        raise SystemExit("real recordings not found (--data DIR or $FLEETLOOP_DATA)")
    # Warm the kernels (numba compiles or loads its cache once per process; not a per-segment cost).
    warm = bitpack.have_numba()
    sets = []
    notes: list[str] = []
    for name, result in real_corpus(root):
        notes += [f"{name}: {n}" for n in result.notes]
        if result.groups:
            sets.append(measure_set(name, result, args.repeat))
    total_bytes = {k: sum(s["bytes"][k] for s in sets) for k in sets[0]["bytes"]}
    total_seconds = {k: sum(s["seconds"][k] for s in sets) for k in sets[0]["seconds"]}
    samples = sum(s["samples"] for s in sets)
    for s in sets:
        s.update(_ratios(s["bytes"], s["samples"], s["seconds"]))
    total = {"samples": samples, "bytes": total_bytes, "seconds": total_seconds}
    total.update(_ratios(total_bytes, samples, total_seconds))
    out: dict[str, Any] = {
        "benchmark": "store",
        "segment_format_version": FORMAT_VERSION,
        "numba": warm,
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "repeat": args.repeat,
        "data": str(root),
        "sets": sets,
        "total": total,
        "goals": {
            "bytes_per_sample_le_1_0": total["bytes_per_sample"] <= GOAL_BYTES_PER_SAMPLE,
            "size_vs_parquet_zstd_le_0_30": total["size_vs_parquet_zstd"] <= GOAL_VS_PARQUET_ZSTD,
            "encode_ge_parquet_write": total["encode_speed_vs_parquet_write"] >= 1.0,
            "decode_ge_parquet_read": total["decode_speed_vs_parquet_read"] >= 1.0,
        },
        "generated_strings": generated_strings(args.repeat),
        "generated_bus": generated_bus(args.repeat),
        "notes": notes,
    }
    if args.kills:
        out["kill_loop"] = kill_loop(args.kills)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
