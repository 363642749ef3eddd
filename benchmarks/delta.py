"""OTA delta benchmark (issue 5): FLDELTA1 against bsdiff4 and zstd-19 patch-from on real binaries.

The pairs are numpy's ``_multiarray_umath`` shared library from PyPI wheels (CPython 3.11, manylinux
x86_64): 2.1.0 → 2.1.1 (a patch release) and 2.0.2 → 2.1.0 (a minor release). The wheels are fetched with
``pip download`` into a temporary directory each run; nothing is kept.

For every pair, in the same run and interleaved:

* size of our delta, of ``bsdiff4.diff`` and of zstd level 19 with the old file as a raw-content
  dictionary (patch-from; long window so the whole old file is reachable);
* creation time and peak RSS of ours and of bsdiff4, each in a fresh interpreter (peak RSS is the child's
  ``VmHWM``, reset through ``/proc/self/clear_refs`` after the imports so import-time peaks do not hide
  the operation's), best of ``--repeat``; reported as ratios to bsdiff4. Time is the process's CPU time
  (``time.process_time``, single-threaded: no pool) and, separately, wall time. Ours includes loading
  numba and the suffix_diff kernel from numba's on-disk cache (a fresh process pays it every time); a
  first, untimed run fills that cache and is reported as ``first_run_seconds`` (compile included). Our
  fallback without numba/pydivsufsort (``bsdiff4.core.diff`` per chunk, same candidates) is timed too;
* apply time and peak RSS of ours (the device's streaming code, file to file) against a bare interpreter
  that imported the same modules (``interpreter`` below), best of ``--repeat``.

Goals (issue 5): size ≤ min(bsdiff4, zstd-19) on every pair; creation time ≤ 0.5× bsdiff4; apply peak RSS ≤
interpreter + 32 MB for a 36 MB image (``large_image``: the minor-release pair repeated to 36 MB).

Usage: ``.venv/bin/python benchmarks/delta.py [--repeat N] [--chunk-mib C] [--margin-mib M]``; prints JSON.
``--repeat`` defaults to 3 (best of 3): two shared, noisy cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

PAIRS = [("2.1.0", "2.1.1", "patch release"), ("2.0.2", "2.1.0", "minor release")]
MEMBER = "numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
kind, old, new, out, chunk, margin = sys.argv[1:7]
chunk, margin = int(chunk), int(margin)
import bsdiff4, zstandard
from fleetloop_shared.update import delta
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {key} in /proc/self/status")
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak below is this operation's only
    f.write("5")
t0 = time.perf_counter()
c0 = time.process_time()
if kind in ("ours-make", "ours-make-fallback"):
    stats = delta.make_delta_file(
        Path(old), Path(new), Path(out), chunk=chunk, margin=margin, accelerate=kind == "ours-make"
    )
    extra = {"bytes": stats.bytes, "methods": stats.methods}
elif kind == "bsdiff4-make":
    patch = bsdiff4.diff(Path(old).read_bytes(), Path(new).read_bytes())
    Path(out).write_bytes(patch)
    extra = {"bytes": len(patch)}
elif kind == "zstd19-make":
    o = Path(old).read_bytes()
    d = zstandard.ZstdCompressionDict(o, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    n = Path(new).read_bytes()
    wlog = max(20, (len(o) + len(n)).bit_length())
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=wlog)
    patch = zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(n)
    Path(out).write_bytes(patch)
    extra = {"bytes": len(patch)}
elif kind == "ours-apply":
    size = delta.apply_delta_file(Path(old), Path(new), Path(out))
    extra = {"bytes": size}
elif kind == "bsdiff4-apply":
    res = bsdiff4.patch(Path(old).read_bytes(), Path(new).read_bytes())
    Path(out).write_bytes(res)
    extra = {"bytes": len(res)}
elif kind == "interpreter":
    extra = {}
else:
    raise SystemExit(f"unknown {kind}")
seconds = time.perf_counter() - t0
cpu = time.process_time() - c0
peak = status("VmHWM")
if kind == "ours-make":  # after the clocks and the peak: did the kernel make it (or the fallback)?
    from fleetloop_shared.update import suffix_diff
    extra["kernel"] = suffix_diff.available()
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_kib": peak, "import_rss_kib": base,
                  **extra}))
"""


def child(kind: str, *paths: Path | str, chunk: int = 0, margin: int = 0) -> dict[str, Any]:
    args = [str(p) for p in paths] + [""] * (3 - len(paths))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, *args, str(chunk), str(margin)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def fold(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best of several runs: the fastest run's figures, with the least CPU time and peak RSS seen."""
    top = dict(min(runs, key=lambda r: r["seconds"]))
    top["cpu_seconds"] = min(r["cpu_seconds"] for r in runs)
    top["peak_rss_kib"] = min(r["peak_rss_kib"] for r in runs)
    return top


def best(kind: str, repeat: int, *paths: Path | str, **kw: int) -> dict[str, Any]:
    return fold([child(kind, *paths, **kw) for _ in range(repeat)])


def fetch(version: str, into: Path) -> Path:
    dest = into / version
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--platform",
            "manylinux_2_17_x86_64",
            "--implementation",
            "cp",
            "-q",
            "-d",
            str(dest),
            f"numpy=={version}",
        ],
        check=True,
    )
    wheel = next(dest.glob("numpy-*.whl"))
    out = into / f"multiarray-{version}.so"
    with zipfile.ZipFile(wheel) as z:
        out.write_bytes(z.read(MEMBER))
    return out


def large_image(
    old: Path, new: Path, work: Path, repeat: int, interp: dict[str, Any], chunk: int, margin: int
) -> dict[str, Any]:
    """Apply memory on a 36 MB image: the pair's files repeated to 36 MB (old and new alike), so the
    delta has the same structure at 3.5× the size. Memory must not grow with the image."""
    target = 36 * 1000 * 1000
    big_old, big_new = work / "big-old.bin", work / "big-new.bin"
    for src, dst in ((old, big_old), (new, big_new)):
        data = src.read_bytes()
        dst.write_bytes((data * (target // len(data) + 1))[:target])
    made = child("ours-make", big_old, big_new, work / "big.delta", chunk=chunk, margin=margin)
    apply = best("ours-apply", repeat, big_old, work / "big.delta", work / "big-out.bin")
    assert (work / "big-out.bin").read_bytes() == big_new.read_bytes(), "large image did not rebuild"
    over = (apply["peak_rss_kib"] - interp["import_rss_kib"]) / 1024
    return {
        "image_bytes": target,
        "delta_bytes": made["bytes"],
        "create_seconds": round(made["seconds"], 3),
        "create_cpu_seconds": round(made["cpu_seconds"], 3),
        "create_peak_rss_kib": made["peak_rss_kib"],
        "apply_seconds": round(apply["seconds"], 3),
        "apply_peak_rss_kib": apply["peak_rss_kib"],
        "apply_rss_over_interpreter_mib": round(over, 1),
        "goal_apply_rss_le_interpreter_plus_32mib": over <= 32,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=4)
    ap.add_argument("--margin-mib", type=float, default=0.5)
    args = ap.parse_args()
    chunk, margin = int(args.chunk_mib * (1 << 20)), int(args.margin_mib * (1 << 20))
    report: dict[str, Any] = {
        "benchmark": "delta",
        "repeat": args.repeat,
        "chunk_bytes": chunk,
        "margin_bytes": margin,
        "pairs": [],
    }
    with tempfile.TemporaryDirectory(prefix="fleetloop-delta-bench-") as tmp:
        work = Path(tmp)
        files = {v: fetch(v, work) for v in {v for pair in PAIRS for v in pair[:2]}}
        interp = best("interpreter", args.repeat)
        report["interpreter_rss_kib"] = interp["import_rss_kib"]
        for old_v, new_v, what in PAIRS:
            old, new = files[old_v], files[new_v]
            new_bytes = new.stat().st_size
            # fills numba's cache for the kernel (compiles it the first time on this machine): untimed
            first = child("ours-make", old, new, work / "ours.delta", chunk=chunk, margin=margin)
            ours_runs, bs_runs, fb_runs = [], [], []
            for _ in range(args.repeat):  # interleaved: all see the same machine state
                ours_runs.append(
                    child("ours-make", old, new, work / "ours.delta", chunk=chunk, margin=margin)
                )
                bs_runs.append(child("bsdiff4-make", old, new, work / "bs.patch"))
                fb_runs.append(
                    child("ours-make-fallback", old, new, work / "fb.delta", chunk=chunk, margin=margin)
                )
            ours, bs, fb = fold(ours_runs), fold(bs_runs), fold(fb_runs)
            ours_rss, bs_rss = ours["peak_rss_kib"], bs["peak_rss_kib"]
            zs = child("zstd19-make", old, new, work / "zs.patch")
            apply = best("ours-apply", args.repeat, old, work / "ours.delta", work / "out.bin")
            bs_apply = best("bsdiff4-apply", 1, old, work / "bs.patch", work / "out2.bin")
            assert (work / "out.bin").read_bytes() == new.read_bytes(), (
                "our delta did not rebuild the new file"
            )
            child("ours-apply", old, work / "fb.delta", work / "fb-out.bin")
            assert (work / "fb-out.bin").read_bytes() == new.read_bytes(), (
                "our fallback's delta did not rebuild the new file"
            )
            reference = min(bs["bytes"], zs["bytes"])
            report["pairs"].append(
                {
                    "pair": f"numpy {old_v} -> {new_v} _multiarray_umath ({what})",
                    "old_bytes": old.stat().st_size,
                    "new_bytes": new_bytes,
                    "size_bytes": {
                        "ours": ours["bytes"],
                        "bsdiff4": bs["bytes"],
                        "zstd19_patch_from": zs["bytes"],
                    },
                    "size_pct_of_new": {
                        "ours": round(100 * ours["bytes"] / new_bytes, 3),
                        "bsdiff4": round(100 * bs["bytes"] / new_bytes, 3),
                        "zstd19_patch_from": round(100 * zs["bytes"] / new_bytes, 3),
                    },
                    "size_ratio_to_best_reference": round(ours["bytes"] / reference, 4),
                    "methods": ours["methods"],
                    "kernel": ours["kernel"],
                    "fallback_bytes": fb["bytes"],
                    "create_cpu_seconds": {
                        "ours": round(ours["cpu_seconds"], 3),
                        "bsdiff4": round(bs["cpu_seconds"], 3),
                        "ours_fallback": round(fb["cpu_seconds"], 3),
                        "zstd19_patch_from": round(zs["cpu_seconds"], 3),
                    },
                    "create_cpu_ratio_to_bsdiff4": round(ours["cpu_seconds"] / bs["cpu_seconds"], 3),
                    "fallback_create_cpu_ratio_to_bsdiff4": round(fb["cpu_seconds"] / bs["cpu_seconds"], 3),
                    "create_seconds": {
                        "ours": round(ours["seconds"], 3),
                        "bsdiff4": round(bs["seconds"], 3),
                        "ours_fallback": round(fb["seconds"], 3),
                        "zstd19_patch_from": round(zs["seconds"], 3),
                    },
                    "create_time_ratio_to_bsdiff4": round(ours["seconds"] / bs["seconds"], 3),
                    "first_run_seconds": round(first["seconds"], 3),
                    "create_peak_rss_kib": {"ours": ours_rss, "bsdiff4": bs_rss},
                    "create_peak_rss_ratio_to_bsdiff4": round(ours_rss / bs_rss, 3),
                    "apply_seconds": round(apply["seconds"], 3),
                    "apply_peak_rss_kib": apply["peak_rss_kib"],
                    "apply_rss_over_interpreter_mib": round(
                        (apply["peak_rss_kib"] - interp["import_rss_kib"]) / 1024, 1
                    ),
                    "bsdiff4_apply_seconds": round(bs_apply["seconds"], 3),
                    "bsdiff4_apply_rss_over_interpreter_mib": round(
                        (bs_apply["peak_rss_kib"] - interp["import_rss_kib"]) / 1024, 1
                    ),
                    "goals": {
                        "size_le_min_reference": ours["bytes"] <= reference,
                        "create_cpu_le_half_bsdiff4": ours["cpu_seconds"] <= 0.5 * bs["cpu_seconds"],
                        "create_time_le_half_bsdiff4": ours["seconds"] <= 0.5 * bs["seconds"],
                        "apply_rss_le_interpreter_plus_32mib": apply["peak_rss_kib"]
                        - interp["import_rss_kib"]
                        <= 32 * 1024,
                    },
                }
            )
            if (old_v, new_v) == PAIRS[-1][:2]:
                report["large_image"] = large_image(old, new, work, args.repeat, interp, chunk, margin)
    report["command"] = "python benchmarks/delta.py " + " ".join(sys.argv[1:])
    report["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
