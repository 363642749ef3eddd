"""OTA delta benchmark: FLDELTA2 against bsdiff4 and zstd-19 patch-from on real shared libraries.

Pairs: shared libraries from public wheels on PyPI (CPython 3.11, manylinux x86_64), fetched once with
``pip download`` into a cache outside the repository (``--cache``, default ``~/.cache/fleetloop-bench``):
patch releases, minor releases, and pairs whose library grows or shrinks by more than 25 %. Then the
simulated firmware (``fleetloop_fwsim.firmware.build_image``: built from this machine's binaries, so its
figures hold for this machine only) and a generated 1 GiB image (``--large-gib``; linked code from
``fleetloop_fwsim.code_image``, tiled, with sections moved, rebuilt and inserted).

For every pair, each measurement in a fresh interpreter, ours and bsdiff4 interleaved, best of
``--repeat``:

* bytes of ours (``make_delta_file``, FLDELTA2), of ``bsdiff4.diff``, and of zstd level 19 patch-from with a
  window over old + new — both as python-zstandard makes it (``ZstdCompressionDict`` raw content,
  ``from_level(19, window_log=…)``) and as the zstd CLI does (``zstd -19 --long=27 --patch-from``, when
  ``zstd`` is on PATH); the reference is the smallest of the three;
* creation CPU (``time.process_time``, one thread) of ours and of bsdiff4 for the operation itself:
  imports and loading the numba kernel from its cache happen before the clock starts (a cloud process
  pays them once, not per delta); ``process_cpu_seconds`` adds them, as a fresh process pays them;
* creation peak RSS (``VmHWM``, reset after the imports) and its excess over the imports, per old byte;
* apply (``apply_delta_file``: the device's streaming code, file to file) time and peak RSS against an
  interpreter that imported the same modules.

Goals (same run): bytes ≤ min(references) + 256; creation CPU ≤ 0.5× bsdiff4's; apply peak ≤
interpreter + 32 MiB. The 1 GiB image has no references (bsdiff4 needs ~17× the old image in memory,
zstd-19 patch-from takes ~15 minutes on it): it shows creation memory ≤ 10× and apply memory bounded.

Usage: ``.venv/bin/python benchmarks/delta.py [--repeat N] [--only NAME …] [--no-pairs] [--no-firmware]
[--large-gib G | --no-large] [--out FILE]``; prints JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: (package, old version, new version, member in the wheel (old, new), what kind of change)
PAIRS: list[tuple[str, str, str, tuple[str, str], str]] = [
    ("numpy", "2.1.0", "2.1.1", ("numpy/_core/_multiarray_umath",) * 2, "patch"),
    ("numpy", "2.0.2", "2.1.0", ("numpy/_core/_multiarray_umath",) * 2, "minor"),
    (
        "numpy",
        "1.26.4",
        "2.0.2",
        ("numpy/core/_multiarray_umath", "numpy/_core/_multiarray_umath"),
        "major, +40 %",
    ),
    ("lxml", "5.2.1", "5.2.2", ("lxml/etree",) * 2, "patch"),
    ("lxml", "5.2.2", "5.3.0", ("lxml/etree",) * 2, "minor"),
    ("lxml", "4.9.4", "5.2.1", ("lxml/etree",) * 2, "major, -40 %"),
    ("lxml", "4.9.4", "5.2.1", ("lxml/objectify",) * 2, "major, -30 %"),
    ("pydantic-core", "2.18.3", "2.18.4", ("pydantic_core/_pydantic_core",) * 2, "patch"),
    ("pydantic-core", "2.14.6", "2.27.2", ("pydantic_core/_pydantic_core",) * 2, "13 minors"),
    ("cryptography", "42.0.8", "43.0.3", ("cryptography/hazmat/bindings/_rust",) * 2, "minor"),
    ("cryptography", "41.0.7", "42.0.8", ("cryptography/hazmat/bindings/_rust",) * 2, "major, -24 %"),
    ("zstandard", "0.22.0", "0.23.0", ("zstandard/backend_c",) * 2, "minor"),
    ("orjson", "3.9.15", "3.10.7", ("orjson/orjson",) * 2, "minor"),
]
SLACK = 256
_IMPORTS = {
    "ours-make": "from fleetloop_shared.update import delta, suffix_diff; suffix_diff.available()",
    "ours-apply": "from fleetloop_shared.update import delta",
    "interpreter": "from fleetloop_shared.update import delta",
    "bsdiff4-make": "import bsdiff4",
    "zstd19-make": "import zstandard",
}

_CHILD = r"""
import json, sys, time
kind, old, new, out = sys.argv[1:5]
exec(IMPORTS[kind])
from pathlib import Path
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {key} in /proc/self/status")
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak below is the operation's
    f.write("5")
t0, c0 = time.perf_counter(), time.process_time()
extra = {}
if kind == "ours-make":
    stats = delta.make_delta_file(Path(old), Path(new), Path(out))
    extra = {"bytes": stats.bytes, "methods": stats.methods, "kernel": suffix_diff.available()}
elif kind == "bsdiff4-make":
    patch = bsdiff4.diff(Path(old).read_bytes(), Path(new).read_bytes())
    Path(out).write_bytes(patch)
    extra = {"bytes": len(patch)}
elif kind == "zstd19-make":
    o, n = Path(old).read_bytes(), Path(new).read_bytes()
    d = zstandard.ZstdCompressionDict(o, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    window = max(20, (len(o) + len(n)).bit_length())
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=window)
    patch = zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(n)
    Path(out).write_bytes(patch)
    extra = {"bytes": len(patch)}
elif kind == "ours-apply":
    extra = {"bytes": delta.apply_delta_file(Path(old), Path(new), Path(out))}
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "process_cpu_seconds": time.process_time(),
                  "peak_rss_kib": status("VmHWM"), "import_rss_kib": base, **extra}))
"""


def child(kind: str, old: Path | str = "", new: Path | str = "", out: Path | str = "") -> dict[str, Any]:
    code = f"IMPORTS = {_IMPORTS!r}\n{_CHILD}"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / d) for d in ("shared", "agent", "firmware-sim"))
    )
    done = subprocess.run(
        [sys.executable, "-c", code, kind, str(old), str(new), str(out)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def fold(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best of several runs: the fastest run's figures, with the least CPU time and peak RSS seen."""
    top = dict(min(runs, key=lambda r: r["cpu_seconds"]))
    for key in ("seconds", "process_cpu_seconds", "peak_rss_kib"):
        top[key] = min(r[key] for r in runs)
    return top


def zstd_cli(old: Path, new: Path, out: Path) -> dict[str, Any] | None:
    """``zstd -19 --long=27 --patch-from``: bytes and the child's CPU seconds; None without the CLI."""
    exe = shutil.which("zstd")
    if exe is None:
        return None
    before = os.times()
    subprocess.run(
        [exe, "-19", "--long=27", "-q", "-f", f"--patch-from={old}", str(new), "-o", str(out)], check=True
    )
    after = os.times()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"bytes": out.stat().st_size, "cpu_seconds": round(cpu, 3), "version": version}


def fetch(cache: Path, package: str, version: str, member: str) -> Path:
    """The shared library ``member`` (without its suffix) of one wheel, downloaded once into ``cache``."""
    dest = cache / "so" / f"{package}-{version}-{member.replace('/', '.')}.so"
    if dest.is_file():
        return dest
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = package.replace("-", "_")
    found = [w for w in wheels.glob(f"{name}-{version}-*.whl")]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
             "3.11", "--platform", "manylinux_2_17_x86_64", "--implementation", "cp", "-q", "-d", str(wheels),
             f"{package}=={version}"],
            check=True,
        )  # fmt: skip
        found = [w for w in wheels.glob(f"{name}-{version}-*.whl")]
    with zipfile.ZipFile(found[0]) as z:
        names = [n for n in z.namelist() if n.startswith(member + ".") and n.endswith(".so")]
        if len(names) != 1:
            raise SystemExit(f"{found[0].name}: {member}: found {names}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(z.read(names[0]))
    return dest


def measure(
    name: str, old: Path, new: Path, work: Path, repeat: int, interp: dict[str, Any]
) -> dict[str, Any]:
    """One pair: every figure of the module docstring, and whether each goal holds."""
    child("ours-make", old, new, work / "ours.delta")  # fills numba's cache (compiles it the first time)
    ours_runs, bs_runs = [], []
    for _ in range(repeat):  # interleaved: both see the same machine
        ours_runs.append(child("ours-make", old, new, work / "ours.delta"))
        bs_runs.append(child("bsdiff4-make", old, new, work / "bs.patch"))
    ours, bs = fold(ours_runs), fold(bs_runs)
    zpy = child("zstd19-make", old, new, work / "zs.patch")
    zcli = zstd_cli(old, new, work / "zs-cli.patch")
    apply = fold([child("ours-apply", old, work / "ours.delta", work / "out.bin") for _ in range(repeat)])
    if hashlib.sha256((work / "out.bin").read_bytes()).digest() != hashlib.sha256(new.read_bytes()).digest():
        raise SystemExit(f"{name}: our delta did not rebuild the new file")
    old_bytes, new_bytes = old.stat().st_size, new.stat().st_size
    references = {"bsdiff4": bs["bytes"], "zstd19_python": zpy["bytes"]}
    if zcli is not None:
        references["zstd19_cli"] = zcli["bytes"]
    best_name = min(references, key=lambda k: references[k])
    best = references[best_name]
    over_mib = (apply["peak_rss_kib"] - interp["import_rss_kib"]) / 1024
    return {
        "pair": name,
        "old_bytes": old_bytes,
        "new_bytes": new_bytes,
        "size_change_pct": round(100 * (new_bytes - old_bytes) / old_bytes, 1),
        "bytes": {"ours": ours["bytes"], **references},
        "pct_of_new": {
            k: round(100 * v / new_bytes, 3) for k, v in {"ours": ours["bytes"], **references}.items()
        },
        "best_reference": best_name,
        "ours_minus_best_reference": ours["bytes"] - best,
        "ours_over_best_reference": round(ours["bytes"] / best, 4),
        "methods": ours["methods"],
        "kernel": ours["kernel"],
        "create_cpu_seconds": {
            "ours": round(ours["cpu_seconds"], 3),
            "bsdiff4": round(bs["cpu_seconds"], 3),
            "zstd19_python": round(zpy["cpu_seconds"], 3),
            **({"zstd19_cli": zcli["cpu_seconds"]} if zcli else {}),
        },
        "create_cpu_ratio_to_bsdiff4": round(ours["cpu_seconds"] / bs["cpu_seconds"], 3),
        "process_cpu_seconds": {
            "ours": round(ours["process_cpu_seconds"], 3),
            "bsdiff4": round(bs["process_cpu_seconds"], 3),
        },
        "create_wall_seconds": {"ours": round(ours["seconds"], 3), "bsdiff4": round(bs["seconds"], 3)},
        "create_peak_rss_kib": {"ours": ours["peak_rss_kib"], "bsdiff4": bs["peak_rss_kib"]},
        "create_rss_over_imports_per_old_byte": {
            "ours": round((ours["peak_rss_kib"] - ours["import_rss_kib"]) * 1024 / old_bytes, 2),
            "bsdiff4": round((bs["peak_rss_kib"] - bs["import_rss_kib"]) * 1024 / old_bytes, 2),
        },
        "apply_seconds": round(apply["seconds"], 3),
        "apply_peak_rss_kib": apply["peak_rss_kib"],
        "apply_rss_over_interpreter_mib": round(over_mib, 1),
        "goals": {
            "bytes_le_best_reference_plus_256": ours["bytes"] <= best + SLACK,
            "create_cpu_le_half_bsdiff4": ours["cpu_seconds"] <= 0.5 * bs["cpu_seconds"],
            "apply_rss_le_interpreter_plus_32mib": over_mib <= 32,
        },
    }


def large_pair(work: Path, gib: float) -> tuple[Path, Path]:
    """A ``gib`` GiB image of linked code and its next release: 16 MiB programs tiled (each tile's head
    made unique), then tiles moved across the whole image, one in eight rebuilt (a patch or a relocated
    release of the program), and fresh blocks inserted. Written once per size into ``work``."""
    from fleetloop_fwsim.code_image import link, program, release

    old_path, new_path = work / f"large-{gib:g}-old.img", work / f"large-{gib:g}-new.img"
    if old_path.is_file() and new_path.is_file():
        return old_path, new_path
    p = program(11, 16 << 20)
    unit, patched, moved = link(p), link(release(p, "patch", 12)), link(release(p, "relocate", 13))
    size = int(gib * (1 << 30))
    tiles = size // len(unit) + 1
    rng = random.Random(14)
    heads = [rng.randbytes(64 << 10) for _ in range(tiles)]
    with old_path.open("wb") as f:
        left = size
        for k in range(tiles):
            tile = (heads[k] + unit[64 << 10 :])[:left]
            f.write(tile)
            left -= len(tile)
    order = list(range(tiles))
    for start in range(0, tiles, 8):  # sections reordered within each eighth of the image
        block = order[start : start + 8]
        rng.shuffle(block)
        order[start : start + 8] = block
    with new_path.open("wb") as f:
        left = size
        for i, k in enumerate(order):
            body = patched if i % 16 == 3 else moved if i % 16 == 11 else unit
            tile = heads[k] + body[64 << 10 :]
            if i % 32 == 7:
                tile = rng.randbytes(4 << 20) + tile  # new code
            tile = tile[:left]
            f.write(tile)
            left -= len(tile)
            if not left:
                break
    return old_path, new_path


def measure_large(work: Path, gib: float, interp: dict[str, Any]) -> dict[str, Any]:
    old, new = large_pair(work, gib)
    made = child("ours-make", old, new, work / "large.delta")
    apply = child("ours-apply", old, work / "large.delta", work / "large-out.img")
    digest = [hashlib.sha256() for _ in range(2)]
    for d, path in zip(digest, (new, work / "large-out.img"), strict=True):
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                d.update(chunk)
    if digest[0].digest() != digest[1].digest():
        raise SystemExit("the large image did not rebuild")
    (work / "large-out.img").unlink()
    old_bytes = old.stat().st_size
    over_mib = (apply["peak_rss_kib"] - interp["import_rss_kib"]) / 1024
    return {
        "pair": f"generated {gib:g} GiB image (linked code, sections moved, rebuilt, inserted)",
        "old_bytes": old_bytes,
        "new_bytes": new.stat().st_size,
        "bytes": {"ours": made["bytes"]},
        "pct_of_new": {"ours": round(100 * made["bytes"] / new.stat().st_size, 3)},
        "methods": made["methods"],
        "references": "not run: bsdiff4 needs ~17× the old image in memory, zstd-19 patch-from ~15 min",
        "create_cpu_seconds": {"ours": round(made["cpu_seconds"], 1)},
        "create_wall_seconds": {"ours": round(made["seconds"], 1)},
        "create_peak_rss_kib": {"ours": made["peak_rss_kib"]},
        "create_rss_over_imports_per_old_byte": {
            "ours": round((made["peak_rss_kib"] - made["import_rss_kib"]) * 1024 / old_bytes, 2)
        },
        "apply_seconds": round(apply["seconds"], 1),
        "apply_peak_rss_kib": apply["peak_rss_kib"],
        "apply_rss_over_interpreter_mib": round(over_mib, 1),
        "goals": {
            "create_rss_le_10x_old": (made["peak_rss_kib"] - made["import_rss_kib"]) * 1024 <= 10 * old_bytes,
            "apply_rss_le_interpreter_plus_32mib": over_mib <= 32,
        },
    }


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """The report as indented JSON on stdout and, when ``--out`` names a file, into it as well."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fleetloop-bench")
    ap.add_argument("--only", nargs="*", default=None, help="pairs whose name contains any of these")
    ap.add_argument("--large-gib", type=float, default=1.0)
    ap.add_argument("--no-large", action="store_true")
    ap.add_argument("--no-firmware", action="store_true")
    ap.add_argument("--no-pairs", action="store_true", help="skip the library pairs (the 1 GiB image alone)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    interp = fold([child("interpreter") for _ in range(args.repeat)])
    report: dict[str, Any] = {
        "benchmark": "delta",
        "command": "python benchmarks/delta.py " + " ".join(sys.argv[1:]),
        "repeat": args.repeat,
        "interpreter_rss_kib": interp["import_rss_kib"],
        "pairs": [],
    }
    for package, old_v, new_v, (old_m, new_m), kind in PAIRS:
        name = f"{package} {old_v} -> {new_v} {new_m.rsplit('/', 1)[1]} ({kind})"
        if args.no_pairs or (args.only is not None and not any(o in name for o in args.only)):
            continue
        old, new = fetch(args.cache, package, old_v, old_m), fetch(args.cache, package, new_v, new_m)
        report["pairs"].append(measure(name, old, new, work, args.repeat, interp))
        print(json.dumps(report["pairs"][-1]), file=sys.stderr, flush=True)
    if not args.no_firmware:
        from fleetloop_fwsim.firmware import build_image

        old, new = work / "fw-v1.img", work / "fw-v2.img"
        old.write_bytes(build_image("1.0.0", "bench-hw"))
        new.write_bytes(build_image("2.0.0", "bench-hw", variant=1))
        name = "simulated firmware 1.0.0 -> 2.0.0 (this machine's binaries)"
        report["pairs"].append(measure(name, old, new, work, args.repeat, interp))
        report["pairs"][-1]["sha256_prefixes"] = [
            hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (old, new)
        ]
        print(json.dumps(report["pairs"][-1]), file=sys.stderr, flush=True)
    if not args.no_large:
        report["large_image"] = measure_large(work, args.large_gib, interp)
    report["all_goals_met"] = all(all(p["goals"].values()) for p in report["pairs"]) and all(
        report.get("large_image", {}).get("goals", {}).values()
    )
    report["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_report(report, args.out)


if __name__ == "__main__":
    main()
