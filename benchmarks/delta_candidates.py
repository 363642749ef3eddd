"""Where FLDELTA2's creation CPU goes, and what cheaper zstd settings would cost in bytes.

(The zstd study led to the lzma-patch method — decision 0023, addendum 2 —; ``stages`` now also times
LZMA2 patch-from, the method's coder, and the sample the encoder chooses each chunk's method on.)

Why: the delta goal asks for creation CPU ≤ 0.5× bsdiff4's *and* bytes ≤ the smallest reference
(bsdiff4, zstd-19 patch-from) + 256 B. On pairs where zstd-19 patch-from is the reference, only zstd-19's
optimal parse (or something as good) reaches its size. This script measures, per pair, in one process
(the numba kernel compiled before any clock):

* ``stages``: the encoder's CPU by stage (suffix sort, the bsdiff search kernel, packing the streams,
  the cheap zstd estimates, zstd-19) and its bytes, next to ``bsdiff4.diff``'s CPU on the same pair;
* ``zstd_patch``: for every chunk, zstd patch-from against the dictionary the encoder chooses, at level
  19 and at cheaper settings (level 19 with searchLog 4, levels 17 and 13), bytes and CPU, and the CPU of
  loading the dictionary alone (level 19, one byte of input);
* ``container_bytes``: the delta's bytes outside its zstd frames and streams (header, chunk headers,
  region tables, stream tables);
* with ``--choices`` instead: per chunk, the method its sample shows smaller — the sample searched
  through the anchor table, as the encoder does, and through the suffix array — against both methods
  made whole, and the whole patch with the dictionary each search chose;
* with ``--coder MODE,NICE,DEPTH`` (repeatable; MODE ``normal`` or ``fast``) instead: the whole encoder
  with LZMA2's match finder set so for both methods (patches and extra bytes), bytes and CPU per pair
  next to ``bsdiff4.diff``'s in the same process — the study behind decision 0023's fifth addendum.

Usage: ``.venv/bin/python benchmarks/delta_candidates.py [--only NAME …] [--no-firmware] [--choices |
--coder normal,16,4 --coder fast,32,16 …] [--out FILE]``
(wheels fetched as ``benchmarks/delta.py`` does, into the same cache); prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bsdiff4

from fleetloop_shared.update import fldelta2, lzma_preset, suffix_diff
from fleetloop_shared.update.delta_format import HEADER
from fleetloop_shared.update.fldelta2_apply import CHUNK

_spec = importlib.util.spec_from_file_location("delta_bench", Path(__file__).with_name("delta.py"))
assert _spec is not None and _spec.loader is not None
delta_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(delta_bench)

#: The cheaper zstd settings tried against level 19 (keyword overrides of ``fldelta2._zstd``).
SETTINGS: dict[str, dict[str, int]] = {
    "level19": {"level": 19},
    "level19_searchlog4": {"level": 19, "search_log": 4},
    "level17": {"level": 17},
    "level13": {"level": 13},
}


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    c0 = time.process_time()
    result = fn(*args, **kwargs)
    return result, time.process_time() - c0


def stages(old: bytes, new: bytes) -> dict[str, Any]:
    """The encoder's CPU by stage, by wrapping its parts (restored afterwards)."""
    spent: collections.Counter[str] = collections.Counter()
    saved = {
        (suffix_diff, "diff_tuples"): "kernel",
        (suffix_diff, "OldIndex"): "suffix sort",
        (suffix_diff, "AnchorIndex"): "anchor table",
        (fldelta2, "_pack_stream"): "pack streams",
        (fldelta2, "_zstd"): "zstd",
        (lzma_preset, "compress"): "lzma-patch",
    }
    originals = {key: getattr(*key) for key in saved}

    def wrap(key: tuple[Any, str], label: str) -> Callable[..., Any]:
        fn = originals[key]

        def timed(*args: Any, **kwargs: Any) -> Any:
            result, cpu = _timed(fn, *args, **kwargs)
            name = label
            if label == "zstd":
                level = args[2] if len(args) > 2 else kwargs.get("level", fldelta2.ZSTD_LEVEL)
                name = "zstd-19" if level == fldelta2.ZSTD_LEVEL else "zstd estimates"
            spent[name] += cpu
            return result

        return timed

    try:
        for key, label in saved.items():
            setattr(*key, wrap(key, label))
        out = io.BytesIO()
        stats, total = _timed(fldelta2.encode, old, io.BytesIO(new), len(new), out)
    finally:
        for key, fn in originals.items():
            setattr(*key, fn)
    _, bs_cpu = _timed(bsdiff4.diff, old, new)
    return {
        "bytes": stats.bytes,
        "methods": stats.methods,
        "cpu_seconds": round(total, 3),
        "bsdiff4_cpu_seconds": round(bs_cpu, 3),
        "ratio_to_bsdiff4": round(total / bs_cpu, 3),
        "by_stage_seconds": {k: round(v, 3) for k, v in spent.most_common()},
        "container_bytes": container_bytes(out.getvalue()),
    }


def container_bytes(patch: bytes) -> int:
    """Bytes of the container itself: header, chunk headers, region and stream tables."""
    _, _, _, _, count = HEADER.unpack_from(patch)
    pos, overhead = HEADER.size, HEADER.size
    for _ in range(count):
        method, _, body_len = CHUNK.unpack_from(patch, pos)
        pos += CHUNK.size
        overhead += CHUNK.size
        if method == fldelta2.METHOD_ZSTD_PATCH:
            (regions,) = fldelta2.REGION_COUNT.unpack_from(patch, pos)
            overhead += fldelta2.REGION_COUNT.size + regions * fldelta2.REGION.size
        elif method == fldelta2.METHOD_STREAMS:
            overhead += fldelta2.STREAMS.size + 6 * fldelta2.STREAM.size
        pos += body_len
    return overhead


def zstd_patch(old: bytes, new: bytes) -> list[dict[str, Any]]:
    """Per chunk: zstd patch-from at each of :data:`SETTINGS` on the encoder's own dictionary."""
    index = fldelta2._IndexMatcher(old)
    rows = []
    for start in range(0, len(new), fldelta2.DEFAULT_CHUNK):
        data = new[start : start + fldelta2.DEFAULT_CHUNK]
        tuples, _, _ = index.tuples(start, data)
        regions = fldelta2.dictionary_regions(tuples, len(old))
        dictionary = b"".join(old[a : a + n] for a, n in regions)
        _, load = _timed(fldelta2._zstd, b"\0", dictionary)
        row: dict[str, Any] = {"chunk": start // fldelta2.DEFAULT_CHUNK, "dictionary_bytes": len(dictionary)}
        row["dictionary_load_seconds"] = round(load, 3)
        for name, kwargs in SETTINGS.items():
            frame, cpu = _timed(fldelta2._zstd, data, dictionary, **kwargs)
            row[name] = {"bytes": len(frame), "cpu_seconds": round(cpu, 3)}
        rows.append(row)
    return rows


def choices(old: bytes, new: bytes) -> list[dict[str, Any]]:
    """Per chunk: the method its sample shows smaller, with the sample searched through the anchor table
    (as the encoder does) and through the suffix array, against both methods made whole — and the patch
    made with the dictionary each search chose."""
    import numpy as np

    from fleetloop_shared.update.fldelta2_apply import REGION, REGION_COUNT

    indexes = {"anchors": suffix_diff.AnchorIndex(old), "suffix array": suffix_diff.OldIndex(old)}
    rows = []
    for start in range(0, len(new), fldelta2.DEFAULT_CHUNK):
        data = new[start : start + fldelta2.DEFAULT_CHUNK]
        pieces = fldelta2._sample(len(data))
        row: dict[str, Any] = {"chunk": start // fldelta2.DEFAULT_CHUNK}
        for name, index in indexes.items():
            found = [suffix_diff.diff_tuples(index, data[a : a + n]) for a, n in pieces]
            tuples = [fldelta2._seek_first(t) for t, _, _ in found]
            regions = fldelta2.dictionary_regions(tuples, len(old))
            streams = fldelta2._Streams(
                np.concatenate(tuples), b"".join(d for _, d, _ in found), b"".join(e for _, _, e in found)
            )
            sample = b"".join(data[a : a + n] for a, n in pieces)
            patch = (
                len(fldelta2._patch(old, regions, sample)[1]) - REGION_COUNT.size - len(regions) * REGION.size
            )
            row[name] = {
                "sample_streams": len(streams.body()),
                "sample_patch": patch,
                "chooses": "streams" if len(streams.body()) <= patch else "patch",
                "whole_patch": len(fldelta2._patch(old, regions, data)[1]),
            }
        tuples, diff, extra = suffix_diff.diff_tuples(indexes["suffix array"], data)
        row["whole_streams"] = len(fldelta2._Streams(fldelta2._seek_first(tuples), diff, extra).body())
        smaller = row["whole_streams"] <= row["suffix array"]["whole_patch"]
        row["smaller_whole"] = "streams" if smaller else "patch"
        rows.append(row)
    return rows


def coders(old: bytes, new: bytes, settings: list[str]) -> list[dict[str, Any]]:
    """The whole encoder with each LZMA2 setting (``mode,nice,depth``), best of 3, against bsdiff4."""
    _, reference = min((_timed(bsdiff4.diff, old, new) for _ in range(3)), key=lambda r: r[1])
    saved = (lzma_preset._MODE_NORMAL, lzma_preset._NICE, lzma_preset._DEPTH)
    rows = []
    try:
        for setting in settings:
            mode, nice, depth = setting.split(",")
            lzma_preset._MODE_NORMAL = {"normal": 2, "fast": 1}[mode]
            lzma_preset._NICE, lzma_preset._DEPTH = int(nice), int(depth)
            runs = [_timed(_encode, old, new) for _ in range(3)]
            (size, methods), cpu = min(runs, key=lambda r: r[1])
            rows.append(
                {"coder": setting, "bytes": size, "methods": methods, "cpu_s": round(cpu, 4),
                 "bsdiff4_cpu_s": round(reference, 4), "cpu_ratio": round(cpu / reference, 3)}
            )  # fmt: skip
    finally:
        lzma_preset._MODE_NORMAL, lzma_preset._NICE, lzma_preset._DEPTH = saved
    return rows


def _encode(old: bytes, new: bytes) -> tuple[int, dict[str, int]]:
    stats = fldelta2.encode(old, io.BytesIO(new), len(new), io.BytesIO())
    return stats.bytes, dict(stats.methods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fleetloop-bench")
    ap.add_argument("--only", nargs="*", default=None, help="pairs whose name contains any of these")
    ap.add_argument("--no-firmware", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--choices",
        action="store_true",
        help="per chunk: the sample's choice vs both made whole",
    )
    ap.add_argument(
        "--coder",
        action="append",
        default=None,
        help="MODE,NICE,DEPTH of LZMA2's match finder (normal|fast): the whole encoder so, per pair",
    )
    args = ap.parse_args()
    if not suffix_diff.available():
        raise SystemExit("the suffix_diff kernel is not available (numba, pydivsufsort)")
    suffix_diff.diff_tuples(suffix_diff.OldIndex(b"warm up the kernel" * 64), b"warm the kernel up" * 64)
    pairs: list[tuple[str, bytes, bytes]] = []
    for package, old_v, new_v, (old_m, new_m), kind in delta_bench.PAIRS:
        name = f"{package} {old_v} -> {new_v} {new_m.rsplit('/', 1)[1]} ({kind})"
        if args.only is not None and not any(o in name for o in args.only):
            continue
        old = delta_bench.fetch(args.cache, package, old_v, old_m).read_bytes()
        pairs.append((name, old, delta_bench.fetch(args.cache, package, new_v, new_m).read_bytes()))
    if not args.no_firmware:
        from fleetloop_fwsim.firmware import build_image

        name = "simulated firmware 1.0.0 -> 2.0.0 (this machine's binaries)"
        pairs.append((name, build_image("1.0.0", "bench-hw"), build_image("2.0.0", "bench-hw", variant=1)))
    report: dict[str, Any] = {"benchmark": "delta_candidates", "command": " ".join(sys.argv), "pairs": []}
    for name, old, new in pairs:
        if args.coder:
            row = {"pair": name, "coders": coders(old, new, args.coder)}
        elif args.choices:
            row = {"pair": name, "chunks": choices(old, new)}
        else:
            row = {"pair": name, **stages(old, new), "zstd_patch": zstd_patch(old, new)}
        report["pairs"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    delta_bench.write_report(report, args.out)


if __name__ == "__main__":
    main()
