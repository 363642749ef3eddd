"""Baseline: the foundation's segment codec and OTA delta against the references later issues must beat.

Why this exists: later issues promise a smaller, faster store and smaller OTA deltas. "Smaller" and
"faster" only mean something against a starting point measured the same way, so this script fixes that
starting point on the real recordings and prints it as one JSON object:

* segment codec (``fleetloop_shared.segment``) vs pyarrow Parquet+zstd of the same samples, grouped the
  same way: one group = one signal family with one shared timestamp column (a segment with one value
  column per signal; a Parquet file with ``t_ns`` int64 plus one float64 column per signal);
* the OTA delta (``fleetloop_shared.update.delta``; bsdiff4 in the foundation) vs plain bsdiff4,
  zstd -19 of the full image and zstd -19 "patch-from" (the old image as a raw-content dictionary)
  between two simulated firmware images.

The JSON names the commit and says, per measured module, whether its file is the committed one, so a
figure is never attributed to code that was not measured.

The machine it runs on is shared and noisy, so every timing is the best of ``--repeat`` runs, the codec
and its reference are timed interleaved in the same run, and what is reported is their ratio.

Usage: ``.venv/bin/python benchmarks/baseline.py [--data DIR] [--repeat N]``
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bsdiff4
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.catalog import DataType
from fleetloop_shared.datapaths import comma2k19_segment, find_recordings
from fleetloop_shared.errors import FleetloopError
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, new_segment_id
from fleetloop_shared.update import delta as fleetloop_delta

#: comma2k19 families measured besides every ``processed_log/IMU/*`` family.
CAN_FAMILIES = ("speed", "steering_angle", "wheel_speed")
#: The Parquet reference. Level 3 is the segment codec's own zstd level, so both spend the same effort;
#: every other option is pyarrow's default (dictionary encoding, statistics, one row group).
PARQUET_WRITE: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
#: Single-threaded read: the segment decoder uses one core, and so does a device.
PARQUET_READ: dict[str, Any] = {"use_threads": False}
#: Other Parquet settings, sizes only: how much the "0.30× Parquet" goal depends on the reference's setup.
PARQUET_VARIANTS: dict[str, dict[str, Any]] = {
    "pyarrow defaults with zstd (level 1): the settings the cloud's fleet store uses": {
        "compression": "zstd"
    },
    "zstd level 19": {"compression": "zstd", "compression_level": 19},
    "zstd level 3, no dictionary, t_ns DELTA_BINARY_PACKED": {
        "compression": "zstd",
        "compression_level": 3,
        "use_dictionary": False,
        "column_encoding": {"t_ns": "DELTA_BINARY_PACKED"},
    },
}
ZSTD_LEVEL = 19
DEFAULT_REPEAT = 5

# Targets set by later issues (docs/benchmarks.md).
GOAL_BYTES_PER_SAMPLE = 1.0
GOAL_SIZE_VS_PARQUET = 0.30
GOAL_SPEED_VS_PYARROW = 1.0

F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Group:
    """Signals sharing one timestamp column: ``values`` is rows × signals."""

    dataset: str
    name: str
    t_ns: I64Array
    values: F64Array

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def signals(self) -> int:
        return int(self.values.shape[1])

    @property
    def samples(self) -> int:
        return self.rows * self.signals

    def column(self, index: int) -> F64Array:
        return np.ascontiguousarray(self.values[:, index])


# ------------------------------------------------------------------------------------------ loading


def _seconds_to_ns(seconds: npt.ArrayLike) -> I64Array:
    return np.rint(np.asarray(seconds, dtype=np.float64) * 1e9).astype(np.int64)


def _group(dataset: str, name: str, t_ns: I64Array, values: npt.ArrayLike) -> Group:
    table = np.asarray(values, dtype=np.float64)
    table = table.reshape(t_ns.shape[0], -1)  # a 1-D value array is one signal
    return Group(dataset, name, t_ns, table)


def load_comma2k19(root: Path) -> list[Group]:
    log = comma2k19_segment(root) / "processed_log"
    families = sorted(p for p in (log / "IMU").iterdir() if p.is_dir())
    families += [log / "CAN" / name for name in CAN_FAMILIES]
    return [
        _group(
            "comma2k19",
            f"{path.parent.name}/{path.name}",
            _seconds_to_ns(np.load(path / "t")),
            np.load(path / "value"),
        )
        for path in families
    ]


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader)
        return header, [row for row in reader if row]


def load_skab(root: Path) -> list[Group]:
    header, rows = _read_csv(root / "skab" / "anomaly-free.csv", ";")
    t_ns = np.array([row[0] for row in rows], dtype="datetime64[ns]").astype(np.int64)
    values = np.array([row[1:] for row in rows], dtype=np.float64)
    if values.shape[1] != len(header) - 1:
        raise ValueError(f"skab: {values.shape[1]} value columns under {len(header)} header names")
    return [_group("skab", "pump", t_ns, values)]


def load_xio(root: Path) -> list[Group]:
    _, rows = _read_csv(root / "xio-fusion-imu" / "sensor_data.csv", ",")
    table = np.array(rows, dtype=np.float64)
    return [_group("xio-imu", "imu", _seconds_to_ns(table[:, 0]), table[:, 1:])]


# ---------------------------------------------------------------------------------------- codecs


def to_segment(group: Group) -> Segment:
    ids = range(1, group.signals + 1)
    return Segment(
        segment_id=new_segment_id(),
        group=group.name,
        t_ns=group.t_ns,
        columns={i: group.column(i - 1) for i in ids},
        data_types=dict.fromkeys(ids, DataType.FLOAT64),
    )


def to_table(group: Group) -> pa.Table:
    columns = {"t_ns": group.t_ns} | {f"s{i + 1}": group.column(i) for i in range(group.signals)}
    return pa.table(columns)


def parquet_write(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_WRITE)
    return bytes(sink.getvalue().to_pybytes())


def parquet_size(table: pa.Table, options: dict[str, Any]) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return int(sink.getvalue().size)


def parquet_read(data: bytes) -> list[npt.NDArray[Any]]:
    """Back to numpy arrays, as :func:`decode_segment` returns them."""
    table = pq.read_table(pa.BufferReader(data), **PARQUET_READ)
    return [column.to_numpy() for column in table.columns]


def _same_bits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------- timing


@contextmanager
def _quiet_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(repeat: int, ops: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best wall time of each op over ``repeat`` rounds; ops alternate within a round so noise hits all."""
    best = dict.fromkeys(ops, float("inf"))
    with _quiet_gc():
        for _ in range(repeat):
            for name, fn in ops.items():
                best[name] = min(best[name], _once(fn))
    return best


def _r(x: float, digits: int = 4) -> float:
    """Rounded to ``digits`` significant digits (JSON stays readable; the noise is larger anyway)."""
    return float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------------------- segments


@dataclass
class GroupResult:
    group: Group
    segment_bytes: int
    parquet_bytes: int
    times: dict[str, float]


def bench_group(group: Group, repeat: int) -> GroupResult:
    segment = to_segment(group)
    table = to_table(group)
    encoded = encode_segment(segment)
    stored = parquet_write(table)
    if decode_segment(encoded) != segment:
        raise SystemExit(f"baseline: segment round trip of {group.dataset}/{group.name} is not exact")
    back = parquet_read(stored)
    expected = [group.t_ns] + [group.column(i) for i in range(group.signals)]
    if not all(_same_bits(a, b) for a, b in zip(back, expected, strict=True)):
        raise SystemExit(f"baseline: Parquet round trip of {group.dataset}/{group.name} is not exact")
    times = best_of(
        repeat,
        {
            "encode": lambda: encode_segment(segment),
            "parquet_write": lambda: parquet_write(table),
            "decode": lambda: decode_segment(encoded),
            "parquet_read": lambda: parquet_read(stored),
        },
    )
    return GroupResult(group, len(encoded), len(stored), times)


def summarize(results: list[GroupResult]) -> dict[str, Any]:
    """Totals over groups; a data set's time is the sum of its groups' best times."""
    samples = sum(r.group.samples for r in results)
    rows = sum(r.group.rows for r in results)
    raw = sum(8 * r.group.rows * (r.group.signals + 1) for r in results)
    seg = sum(r.segment_bytes for r in results)
    par = sum(r.parquet_bytes for r in results)
    t = {op: sum(r.times[op] for r in results) for op in results[0].times}
    return {
        "groups": len(results),
        "rows": rows,
        "samples": samples,
        "raw_bytes_per_sample": _r(raw / samples),
        "segment_bytes": seg,
        "parquet_bytes": par,
        "segment_bytes_per_sample": _r(seg / samples),
        "parquet_bytes_per_sample": _r(par / samples),
        "segment_size_vs_parquet": _r(seg / par),
        "encode_samples_per_s": _r(samples / t["encode"]),
        "parquet_write_samples_per_s": _r(samples / t["parquet_write"]),
        "encode_speed_vs_parquet_write": _r(t["parquet_write"] / t["encode"], 3),
        "decode_samples_per_s": _r(samples / t["decode"]),
        "parquet_read_samples_per_s": _r(samples / t["parquet_read"]),
        "decode_speed_vs_parquet_read": _r(t["parquet_read"] / t["decode"], 3),
    }


def bench_segments(groups: list[Group], repeat: int) -> dict[str, Any]:
    results = [bench_group(g, repeat) for g in groups]
    datasets: dict[str, Any] = {}
    for name in dict.fromkeys(r.group.dataset for r in results):
        mine = [r for r in results if r.group.dataset == name]
        datasets[name] = summarize(mine) | {
            "per_group": [
                {
                    "group": r.group.name,
                    "rows": r.group.rows,
                    "signals": r.group.signals,
                    "segment_bytes_per_sample": _r(r.segment_bytes / r.group.samples),
                    "parquet_bytes_per_sample": _r(r.parquet_bytes / r.group.samples),
                }
                for r in mine
            ]
        }
    segment_bytes = sum(r.segment_bytes for r in results)
    samples = sum(g.samples for g in groups)
    variants = []
    for label, options in PARQUET_VARIANTS.items():
        size = sum(parquet_size(to_table(g), options) for g in groups)
        variants.append(
            {
                "reference": label,
                "options": _kwargs(options),
                "parquet_bytes_per_sample": _r(size / samples),
                "segment_size_vs_parquet": _r(segment_bytes / size),
            }
        )
    return {
        "grouping": (
            "one group = one signal family sharing one timestamp column (comma2k19: one processed_log "
            "array family, 2-D value = one signal per column; SKAB: the 8 pump columns; x-io: the 9 IMU "
            "columns); segment = t + one FLOAT64 column per signal; Parquet = the same group as one "
            "file: t_ns int64 + one float64 column per signal"
        ),
        "sample": "one (timestamp, value) pair: rows × signals; bytes include every header and footer",
        "reference": (
            f"pyarrow {pa.__version__} pq.write_table({_kwargs(PARQUET_WRITE)}) to an in-memory buffer, "
            f"pq.read_table({_kwargs(PARQUET_READ)}) from one, columns to numpy"
        ),
        "timing": "per group best of --repeat, interleaved with the reference; data set = sum of groups",
        "datasets": datasets,
        "overall": summarize(results),
        "other_parquet_settings_overall": variants,
    }


def _kwargs(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


# -------------------------------------------------------------------------------------------- OTA


def _pct(part: int, whole: int) -> float:
    return _r(100.0 * part / whole)


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def _zstd_cli_patch_from(old: bytes, new: bytes) -> dict[str, Any]:
    """Cross-check with the zstd command line's own ``--patch-from`` when it is installed (size only)."""
    exe = shutil.which("zstd")
    if exe is None:
        return {"available": False, "reason": "no zstd executable on PATH"}
    with tempfile.TemporaryDirectory() as tmp:
        old_p, new_p, out_p, back_p = (Path(tmp) / n for n in ("v1", "v2", "v2.zst", "v2.back"))
        old_p.write_bytes(old)
        new_p.write_bytes(new)
        _run(exe, "-q", f"-{ZSTD_LEVEL}", f"--patch-from={old_p}", str(new_p), "-o", str(out_p))
        _run(exe, "-q", "-d", f"--patch-from={old_p}", str(out_p), "-o", str(back_p))
        if back_p.read_bytes() != new:
            raise SystemExit("baseline: zstd CLI patch-from round trip is not exact")
        version = _run(exe, "--version").strip("* ")
        size = out_p.stat().st_size
    return {
        "available": True,
        "command": f"zstd -{ZSTD_LEVEL} --patch-from=v1 v2",
        "version": version,
        "bytes": size,
        "pct_of_v2": _pct(size, len(new)),
    }


def bench_ota(repeat: int) -> dict[str, Any]:
    v1 = build_image("1.0.0", "hw")
    v2 = build_image("2.0.0", "hw", variant=1)
    prefix = zstandard.ZstdCompressionDict(v1, dict_type=zstandard.DICT_TYPE_RAWCONTENT)

    def full() -> bytes:
        return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(v2))

    def patch_from() -> bytes:
        return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=prefix).compress(v2))

    ours = fleetloop_delta.make_delta(v1, v2)
    plain = bytes(bsdiff4.diff(v1, v2))
    whole, patch = full(), patch_from()
    if (
        fleetloop_delta.apply_delta(v1, ours) != v2
        or bsdiff4.patch(v1, plain) != v2
        or zstandard.ZstdDecompressor().decompress(whole) != v2
        or zstandard.ZstdDecompressor(dict_data=prefix).decompress(patch) != v2
    ):
        raise SystemExit("baseline: an OTA round trip is not exact")
    t = best_of(
        repeat,
        {
            "ours_create": lambda: fleetloop_delta.make_delta(v1, v2),
            "ours_apply": lambda: fleetloop_delta.apply_delta(v1, ours),
            "bsdiff4_create": lambda: bsdiff4.diff(v1, v2),
            "bsdiff4_apply": lambda: bsdiff4.patch(v1, plain),
            "zstd_full": full,
            "patch_from_create": patch_from,
            "patch_from_apply": lambda: zstandard.ZstdDecompressor(dict_data=prefix).decompress(patch),
        },
    )
    cli = _zstd_cli_patch_from(v1, v2)
    references = {"bsdiff4": len(plain), "zstd19_patch_from": len(patch)}
    if cli["available"]:
        references["zstd_cli_patch_from"] = int(cli["bytes"])
    smallest = min(references, key=lambda k: references[k])

    def entry(size: int, create: str, apply: str | None = None) -> dict[str, Any]:
        out = {"bytes": size, "pct_of_v2": _pct(size, len(v2)), "create_s": _r(t[create])}
        return out | ({"apply_s": _r(t[apply])} if apply else {})

    return {
        "images": 'build_image("1.0.0", "hw") -> build_image("2.0.0", "hw", variant=1)',
        "images_note": (
            "built from binaries installed on this machine: sizes change when its packages change, "
            "so compare only figures measured in the same run (or with the same image digests)"
        ),
        "v1_bytes": len(v1),
        "v2_bytes": len(v2),
        "v1_sha256": hashlib.sha256(v1).hexdigest()[:16],
        "v2_sha256": hashlib.sha256(v2).hexdigest()[:16],
        "fleetloop_delta": entry(len(ours), "ours_create", "ours_apply")
        | {
            "algorithm": str(getattr(fleetloop_delta, "DELTA_ALGORITHM", "unknown")),
            "via": "fleetloop_shared.update.delta.make_delta / apply_delta",
        },
        "bsdiff4": entry(len(plain), "bsdiff4_create", "bsdiff4_apply")
        | {"via": f"bsdiff4 {bsdiff4.__version__} diff / patch, called directly"},
        "zstd19_full": entry(len(whole), "zstd_full"),
        "zstd19_patch_from": entry(len(patch), "patch_from_create", "patch_from_apply")
        | {
            "via": (
                f"python zstandard {zstandard.__version__} (libzstd "
                f"{'.'.join(map(str, zstandard.ZSTD_VERSION))}): ZstdCompressor(level={ZSTD_LEVEL}, "
                "dict_data=ZstdCompressionDict(v1, dict_type=DICT_TYPE_RAWCONTENT)). The binding has no "
                "ZSTD_CCtx_refPrefix: v1 is loaded as a raw-content dictionary, which gives the same "
                "matches into v1 and needs v1 to decode, but not the CLI's --patch-from parameter tuning"
            ),
        },
        "zstd_cli_patch_from": cli,
        "smallest_reference": {"method": smallest, "bytes": references[smallest]},
    }


# ------------------------------------------------------------------------------------------- main

#: The modules whose code the figures describe.
MEASURED_MODULES = (
    "fleetloop_shared.segment",
    "fleetloop_shared.update.delta",
    "fleetloop_fwsim.firmware",
    "fleetloop_agent.ota.image",
)


def _source_state() -> dict[str, Any]:
    """The checkout's commit and, per measured module, whether the imported file is the committed one."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = _run("git", "-C", str(repo), "rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "reason": f"{repo} is not a git checkout"}
    modules: dict[str, Any] = {}
    for name in MEASURED_MODULES:
        file = Path(str(sys.modules[name].__file__)).resolve()
        package_dir = Path(str(sys.modules[name.split(".")[0]].__file__)).resolve().parent
        in_repo = file.relative_to(package_dir.parent.parent).as_posix()  # e.g. shared/fleetloop_shared/x.py
        committed = subprocess.run(
            ["git", "-C", str(repo), "show", f"HEAD:{in_repo}"], capture_output=True, check=False
        )
        modules[name] = {
            "file": str(file),
            "same_as_commit": committed.returncode == 0 and committed.stdout == file.read_bytes(),
        }
    return {"commit": commit, "modules": modules}


def _goals(segments: dict[str, Any], ota: dict[str, Any]) -> list[dict[str, Any]]:
    overall = segments["overall"]
    rows: list[tuple[str, str, float, float, bool]] = [
        ("store bytes/sample", "<=", GOAL_BYTES_PER_SAMPLE, overall["segment_bytes_per_sample"], True),
        ("store size vs Parquet+zstd", "<=", GOAL_SIZE_VS_PARQUET, overall["segment_size_vs_parquet"], True),
        (
            "encode speed vs pyarrow write",
            ">=",
            GOAL_SPEED_VS_PYARROW,
            overall["encode_speed_vs_parquet_write"],
            False,
        ),
        (
            "decode speed vs pyarrow read",
            ">=",
            GOAL_SPEED_VS_PYARROW,
            overall["decode_speed_vs_parquet_read"],
            False,
        ),
        ("OTA delta bytes", "<=", ota["smallest_reference"]["bytes"], ota["fleetloop_delta"]["bytes"], True),
    ]
    return [
        {
            "metric": metric,
            "target": f"{op} {target}",
            "baseline": value,
            "met": value <= target if at_most else value >= target,
        }
        for metric, op, target, value, at_most in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", help="recordings directory (default: $FLEETLOOP_DATA, ../shared/data/real)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help=f"timing repetitions, the best one counts (default {DEFAULT_REPEAT})",
    )
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        root = find_recordings(args.data)
        if root is None:
            raise SystemExit("baseline: no recordings found (pass --data DIR or set $FLEETLOOP_DATA)")
        groups = load_comma2k19(root) + load_skab(root) + load_xio(root)
    except (FleetloopError, OSError, ValueError) as exc:
        raise SystemExit(f"baseline: cannot load the recordings: {exc}") from None

    started = time.perf_counter()
    segments = bench_segments(groups, args.repeat)
    ota = bench_ota(args.repeat)
    result = {
        "benchmark": "fleetloop baseline",
        "date": datetime.now(UTC).date().isoformat(),
        "command": shlex.join([".venv/bin/python", "benchmarks/baseline.py", *given]),
        "data": str(root),
        "repeat": args.repeat,
        "source": _source_state(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "zstandard": zstandard.__version__,
            "note": "shared, noisy machine: compare the ratios, not the absolute rates",
        },
        "segment_codec": segments,
        "ota": ota,
        "goals": _goals(segments, ota),
        "runtime_s": _r(time.perf_counter() - started, 3),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
