"""``fleetloop store import|stats|export``: fill and inspect a device's local store.

Operators use these on a copy of a device's store directory (or on a laptop store filled from a recording)
to see what the device holds and what it costs; the store benchmark and the checks use them too. The
store itself has no signal names (segments carry ids), so ``import`` keeps the catalog it built in
``catalog.json`` beside the index, and ``export`` names signals from it.

Text values (catalog ``STRING``) make one rule necessary on both sides: ``import`` reads cells by the one
rule of ``fleetloop_agent.recordings.cells`` (a *quoted* cell is always text; an unquoted one is
``true``/``false``, an integer, a number or, failing those, text), and ``export`` quotes every text
value, so ``"1.5"``, ``"true"`` and ``""`` come back as the identical strings rather than as a number, a
bool or a missing value.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fleetloop_cli.output import FORMATS, emit, render_object, render_rows
from fleetloop_shared.errors import NotFoundError, UserError

CATALOG_FILE = "catalog.json"
DEFAULT_QUOTA = 4 * 1024**3


def _open_store(
    root: Path, *, create: bool, quota: int = DEFAULT_QUOTA, segment_version: int | None = None
) -> Any:
    from fleetloop_agent.local_store import INDEX_FILE, LocalStore
    from fleetloop_shared.segment import FORMAT_VERSION

    if not create and not (root / INDEX_FILE).is_file():
        raise NotFoundError(f"store {root}: no store index ({INDEX_FILE}) there")
    return LocalStore(root, quota_bytes=quota, segment_version=segment_version or FORMAT_VERSION)


def _load_catalog(root: Path) -> Any:
    from fleetloop_shared.catalog import Catalog

    path = root / CATALOG_FILE
    if not path.is_file():
        return Catalog()
    try:
        return Catalog.from_records(json.loads(path.read_text())["signals"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a store catalog ({exc})") from None


def import_segments(
    result: Any,
    catalog: Any,
    cut: Any,
    *,
    rows_per_segment: int = 65_536,
    bundle_rows: int | None = None,
) -> Iterator[Any]:
    """The segments ``store import`` writes: ``cut`` (≤ ``rows_per_segment`` rows of a group each), then
    consecutive groups packed into multi-group segments (format 4) of ≤ ``bundle_rows`` rows in all.

    Why bundle: groups of one recording that share arrival times (the messages of a CAN bus) store them
    once in a shared clock — on the real comma2k19 CAN log, −19 % of its bytes. ``bundle_rows`` 0 writes
    one group per segment (formats 2/3, for a cloud that does not read format 4 yet). The benchmark
    (``benchmarks/store.py``) measures exactly this function's output.
    """
    from fleetloop_shared.segment import BUNDLE_MAX_ROWS, bundle_segments

    limit = BUNDLE_MAX_ROWS if bundle_rows is None else bundle_rows
    return bundle_segments(cut(result, catalog, rows_per_segment=rows_per_segment), max_rows=limit)


def cmd_store_import(args: argparse.Namespace) -> int:
    from fleetloop_agent.recordings import read_recording
    from fleetloop_agent.store_import import to_segments
    from fleetloop_shared.durable import write_atomically

    src = Path(args.input)
    if not src.exists():
        raise NotFoundError(f"{src}: no such file")
    result = read_recording(src, dbc=Path(args.dbc) if args.dbc else None)
    root = Path(args.store)
    store = _open_store(root, create=True, quota=args.quota_bytes, segment_version=args.format_version)
    try:
        catalog = _load_catalog(root)
        capture = args.capture or src.stem
        segments = samples = 0
        now = time.time_ns()
        bundle_rows = 0 if args.format_version is not None and args.format_version < 4 else args.bundle_rows
        for seg in import_segments(
            result, catalog, to_segments, rows_per_segment=args.rows_per_segment, bundle_rows=bundle_rows
        ):
            # The catalog is saved before the segment that needs it, so a crash never leaves ids unnamed.
            write_atomically(
                root / CATALOG_FILE, json.dumps({"signals": catalog.to_records()}, indent=1).encode()
            )
            store.append(seg, capture_id=capture, campaign=args.campaign, priority=args.priority, now_ns=now)
            segments += 1
            samples += seg.sample_count
            now += 1
    finally:
        store.close()
    for note in result.notes:
        print(note, file=sys.stderr)
    summary = {
        "input": str(src),
        "groups": len(result.groups),
        "signals": sum(len(g.columns) for g in result.groups),
        "segments": segments,
        "samples": samples,
        "frames_skipped": result.frames_skipped,
    }
    emit(render_object(summary, "json") if args.output == "json" else _kv(summary))
    return 0


def _kv(d: dict[str, Any]) -> str:
    return render_rows(["field", "value"], list(d.items()), "table")


def cmd_store_stats(args: argparse.Namespace) -> int:
    root = Path(args.store)
    store = _open_store(root, create=False)
    try:
        inv = store.inventory()
        stats = store.stats()
    finally:
        store.close()
    out = {
        "samples": inv.samples,
        "signals": inv.signals,
        "groups": inv.groups,
        "segments": inv.segments,
        "segment_bytes": inv.segment_bytes,
        "encoded_bytes": inv.encoded_bytes,
        "disk_bytes": inv.disk_bytes,
        "bytes_per_sample": round(inv.bytes_per_sample, 4),
        "first_ns": inv.first_ns,
        "last_ns": inv.last_ns,
        "evicted_segments_total": stats.evicted_segments_total,
        "evicted_bytes_total": stats.evicted_bytes_total,
    }
    if args.output in ("json", "yaml"):
        emit(render_object(out, args.output))
    else:
        emit(render_rows(["field", "value"], list(out.items()), args.output))
    return 0


def _rows(store: Any, names: dict[int, str], args: argparse.Namespace) -> Iterator[tuple[int, str, Any]]:
    import numpy as np

    for _, seg in store.query(
        group=args.group, capture_id=args.capture, from_ns=args.from_ns, to_ns=args.to_ns
    ):
        ids = sorted(seg.columns)
        cols = [(names.get(i, f"id:{i}"), seg.columns[i]) for i in ids]
        t = seg.t_ns
        order = np.argsort(t, kind="stable")
        for r in order.tolist():
            for name, values in cols:
                yield int(t[r]), name, values[r]


def _csv_field(text: str) -> str:
    """``text`` as a CSV field, quoted only when it must be (names)."""
    if text and not any(c in text for c in ',"\r\n') and text == text.strip():
        return text
    return '"' + text.replace('"', '""') + '"'


def _csv_value(v: Any) -> str:
    import numpy as np

    if isinstance(v, str):
        return '"' + v.replace('"', '""') + '"'  # always quoted: text, never read back as a number
    if isinstance(v, np.floating):
        return repr(float(v))  # shortest text that parses back to the identical double (nan/inf too)
    if isinstance(v, np.bool_):
        return "true" if v else "false"
    return str(int(v))


def cmd_store_export(args: argparse.Namespace) -> int:
    root = Path(args.store)
    store = _open_store(root, create=False)
    names = {s.id: s.path for s in _load_catalog(root)}
    try:
        if args.format == "csv":
            out = (
                open(args.output_file, "w", newline="", encoding="utf-8")  # noqa: SIM115
                if args.output_file
                else sys.stdout
            )
            try:
                out.write("t_ns,signal,value\n")
                quoted = {name: _csv_field(name) for name in names.values()}
                for t, name, v in _rows(store, names, args):
                    out.write(f"{t},{quoted.get(name) or _csv_field(name)},{_csv_value(v)}\n")
            finally:
                if out is not sys.stdout:
                    out.close()
        else:
            _export_parquet(store, names, args)
    finally:
        store.close()
    return 0


def _export_parquet(store: Any, names: dict[int, str], args: argparse.Namespace) -> None:
    from fleetloop_cloud.fleet_store.parquet import export_segments

    if not args.output_file:
        raise UserError("--format parquet needs -o FILE")
    segments = store.query(group=args.group, capture_id=args.capture, from_ns=args.from_ns, to_ns=args.to_ns)
    export_segments(Path(args.output_file), (seg for _, seg in segments), names)


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``store import|stats|export`` (a new top-level group made from ``groups["top"]``)."""
    store = groups["top"].add_parser("store", help="a device's local store: import, stats, export")
    sub = store.add_subparsers(dest="sub", required=True)
    s = sub.add_parser("import", help="import a recording (a CSV, or a CAN log with --dbc) into a store")
    s.add_argument(
        "--input",
        required=True,
        help="a long t_ns,signal,value / t,signal,value CSV or a wide CSV (time column first; a quoted "
        "value, or one that is not true/false/a number, is text), or a CAN log",
    )
    s.add_argument("--store", required=True, help="store directory (created if missing)")
    s.add_argument(
        "--dbc", help="DBC for a CAN log (candump .log, Vector .asc, GVRET .csv, MF4, numpy frames directory)"
    )
    s.add_argument("--capture", default="", help="capture id (default: the input's file name)")
    s.add_argument("--campaign", default="import")
    s.add_argument("--priority", type=int, default=5)
    s.add_argument("--quota-bytes", type=int, default=DEFAULT_QUOTA)
    s.add_argument("--rows-per-segment", type=int, default=65_536, help="rows of one group per segment")
    s.add_argument(
        "--bundle-rows",
        type=int,
        default=None,
        help="rows of all groups of one multi-group segment (format 4 and newer; default 262144); 0 writes "
        "one group per segment (a cloud that reads only formats 2/3 also needs --format-version 3)",
    )
    s.add_argument(
        "--format-version",
        type=int,
        choices=(2, 3, 4, 5, 6),  # (segment.READ_VERSIONS; the codecs are imported only when a store opens)
        default=None,
        help="newest segment format to write (default: this build's newest, 6); 5 for a "
        "cloud that does not read grid floats and compressed bodies yet, 4 for one that does not read "
        "keyed or difference columns either, 3 or 2 also write one group per segment",
    )
    s.add_argument("-o", "--output", choices=FORMATS, default="table")
    s.set_defaults(func=cmd_store_import)
    s = sub.add_parser("stats", help="what a store holds and what it costs per sample")
    s.add_argument("--store", required=True)
    s.add_argument("-o", "--output", choices=FORMATS, default="table")
    s.set_defaults(func=cmd_store_stats)
    s = sub.add_parser(
        "export",
        help="every sample as t_ns,signal,value CSV (floats exact via repr, bools true/false, text always "
        "quoted) or Parquet (value, value_int, value_str)",
    )
    s.add_argument("--store", required=True)
    s.add_argument("--format", choices=("csv", "parquet"), default="csv")
    s.add_argument("-o", "--output", dest="output_file", help="file to write (CSV default: stdout)")
    s.add_argument("--group", help="only this group")
    s.add_argument("--capture", help="only this capture id")
    s.add_argument("--from-ns", type=int, help="only samples at or after this time")
    s.add_argument("--to-ns", type=int, help="only samples at or before this time")
    s.set_defaults(func=cmd_store_export)
