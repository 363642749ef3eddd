"""Turn recordings on disk into groups of columns the local store can hold.

Operators import a long CSV (``t_ns,signal,value`` or ``t,signal,value`` in seconds) or a CAN log with
its DBC into a store to inspect it; the store benchmark and the exactness tests read every real data set
through the same functions, so what is measured is what operators get.

Groups: signals that share a timestamp column are stored with one time column. A CAN frame says it (the
message is the group); a long CSV does not, so :func:`detect_groups` groups signals whose sample times are
identical, which is what a frame, an IMU sample or a PLC poll produces.

Every reader refuses malformed input with a one-line :class:`ConfigError` naming the file and line, and
nothing is silently dropped: CAN frames the DBC does not describe are counted in ``frames_skipped``.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.dbc import DbcDatabase, load_dbc
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.segment import Segment, new_segment_id

NS_PER_S = 1_000_000_000
#: Largest input file read (held in memory while grouping).
MAX_INPUT_BYTES = 512 * 1024 * 1024
#: Rows per segment when a group is cut into segments (bounded decode memory on the device and cloud).
DEFAULT_SEGMENT_ROWS = 65_536
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ImportedGroup:
    """One group: a shared time column and one value column per signal name."""

    name: str
    t_ns: npt.NDArray[np.int64]
    columns: dict[str, npt.NDArray[Any]]

    @property
    def sample_count(self) -> int:
        return int(self.t_ns.shape[0]) * len(self.columns)


@dataclass
class ImportResult:
    """Groups read from one input. ``qualified``: catalog paths are ``group/signal`` (CAN messages reuse
    signal names); a long CSV's names are already unique and stay as they are."""

    groups: list[ImportedGroup]
    frames_skipped: int = 0
    notes: list[str] = field(default_factory=list)
    qualified: bool = True

    @property
    def sample_count(self) -> int:
        return sum(g.sample_count for g in self.groups)


# ------------------------------------------------------------------------------------------ long CSV


def _seconds_to_ns(cell: str) -> int:
    """Exact decimal seconds → ns (no binary float rounding on the way)."""
    try:
        d = Decimal(cell.strip())
    except InvalidOperation:
        raise ValueError(f"time {cell!r} is not a number") from None
    if not d.is_finite():
        raise ValueError(f"time {cell!r} is not finite")
    return int((d * NS_PER_S).to_integral_value())


# One CSV field (RFC 4180: quoted with "" escapes, or bare) and what ends it. Matched from the start of a
# field, so a quote inside a bare field or text after a closing quote is a parse error, not a guess.
_FIELD = re.compile(r'(?:"([^"]*(?:""[^"]*)*)"|([^,"\r\n]*))(,|\r\n|\n|\r|\Z)')
_INT = re.compile(r"[+-]?\d+")
_BOOLS = {"true": True, "false": False}


def _csv_records(text: str, path: Path) -> Iterator[tuple[int, list[tuple[str, bool]]]]:
    """(line number, [(field, quoted), ...]) per record; blank lines are skipped.

    ``csv.reader`` cannot say whether a field was quoted, and here that is the difference between the
    text ``"1.5"`` and the number ``1.5``.
    """
    pos, line, end = 0, 1, len(text)
    while pos < end:
        start_line = line
        fields: list[tuple[str, bool]] = []
        while True:
            m = _FIELD.match(text, pos)
            if m is None:
                raise ConfigError(f"{path}:{line}: malformed CSV (a stray or unclosed quote)")
            quoted, bare, sep = m.group(1), m.group(2), m.group(3)
            if quoted is not None:
                fields.append((quoted.replace('""', '"'), True))
                line += quoted.count("\n") + (quoted.count("\r") - quoted.count("\r\n"))
            else:
                fields.append((bare, False))
            pos = m.end()
            if sep != ",":
                if sep:
                    line += 1
                break
        if fields != [("", False)]:
            yield start_line, fields


def _cell(field: str, quoted: bool) -> bool | int | float | str:
    """A value cell: quoted is text; bare is true/false, an integer, a number, or else text."""
    if quoted:
        return field
    bare = field.strip()
    if not bare:
        raise ValueError('empty value (write "" for an empty string)')
    flag = _BOOLS.get(bare.lower())
    if flag is not None:
        return flag
    if _INT.fullmatch(bare):
        return int(bare)
    try:
        return float(bare)  # nan, inf, -0.0 and every repr() a float prints
    except ValueError:
        return field


def read_long_csv(path: Path) -> ImportResult:
    """A long ``t_ns,signal,value`` / ``t,signal,value`` CSV with numbers, bools and text.

    A signal's type follows from all its cells: all bools → BOOL, all integers (in int64) → INT64,
    numbers → FLOAT64; any text, or bools mixed with numbers → STRING holding every cell's text exactly
    as written (and a note says so, since that is often a typo in a numeric signal).
    """
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise ConfigError(
                f"{path}: {path.stat().st_size} bytes exceeds the import limit of {MAX_INPUT_BYTES}"
            )
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    text = text.removeprefix("\ufeff")
    times: dict[str, list[int]] = defaultdict(list)
    cells: dict[str, list[tuple[bool | int | float | str, str]]] = defaultdict(list)
    records = _csv_records(text, path)
    first = next(records, None)
    header = [f.strip() for f, _ in first[1]] if first else []
    if header not in (["t_ns", "signal", "value"], ["t", "signal", "value"]):
        raise ConfigError(
            f"{path}:1: expected header 't_ns,signal,value' or 't,signal,value', got {','.join(header)!r}"
        )
    in_seconds = header[0] == "t"
    for lineno, row in records:
        if len(row) != 3:
            raise ConfigError(f"{path}:{lineno}: expected 3 fields, got {len(row)}")
        try:
            t = _seconds_to_ns(row[0][0]) if in_seconds else int(row[0][0])
            if not -(2**63) <= t < 2**63:
                raise ValueError(f"time {row[0][0]!r} outside the int64 ns range")
            value = _cell(*row[2])
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: {exc}") from None
        name = row[1][0].strip()
        if not name:
            raise ConfigError(f"{path}:{lineno}: empty signal name")
        times[name].append(t)
        cells[name].append((value, row[2][0]))
    notes: list[str] = []
    series: dict[str, tuple[Any, Any]] = {}
    for name, ts in times.items():
        values = [v for v, _ in cells[name]]
        kinds = {type(v) for v in values}
        arr: Any
        if kinds == {bool}:
            arr = np.array(values, dtype=np.bool_)
        elif kinds == {int} and all(-(2**63) <= v < 2**63 for v in values):  # type: ignore[operator]
            arr = np.array(values, dtype=np.int64)
        elif kinds <= {int, float}:
            arr = np.array([float(v) for v in values], dtype=np.float64)
        else:
            if kinds - {str}:
                notes.append(
                    f"{name}: mixes text with numbers or true/false; stored as STRING (the cells' text)"
                )
            arr = np.empty(len(values), dtype=object)
            arr[:] = [v if isinstance(v, str) else raw for v, raw in cells[name]]
        series[name] = (np.array(ts, dtype=np.int64), arr)
    return ImportResult(detect_groups(series), notes=notes, qualified=False)


def detect_groups(series: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[Any]]]) -> list[ImportedGroup]:
    """Group signals whose time columns are identical (same length, same values, same order).

    Signals sampled together share their timestamps exactly; anything else (different rates, different
    phases) would need a lossy alignment, so it stays a group of its own. Each group's rows are sorted by
    time (stable, so equal times keep file order) — a store reads time ranges.
    """
    by_key: dict[bytes, list[str]] = defaultdict(list)
    for name in sorted(series):
        t, _ = series[name]
        order = np.argsort(t, kind="stable")
        series[name] = (t[order], series[name][1][order])
        by_key[hashlib.blake2b(series[name][0].tobytes(), digest_size=16).digest()].append(name)
    groups = []
    for names in sorted(by_key.values()):
        t = series[names[0]][0]
        label = names[0] if len(names) == 1 else f"{_common_prefix(names) or names[0]}+{len(names) - 1}"
        groups.append(ImportedGroup(label, t, {n: series[n][1] for n in names}))
    return groups


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i].rstrip("._/ ")


# ------------------------------------------------------------------------------------------ CAN logs


@dataclass
class CanFrames:
    """Raw frames in columns: time (ns), bus, arbitration id, payload."""

    t_ns: npt.NDArray[np.int64]
    bus: npt.NDArray[np.int64]
    frame_id: npt.NDArray[np.int64]
    data: list[bytes]


_CANDUMP = re.compile(r"^\s*\((-?\d+(?:\.\d+)?)\)\s+(\S+)\s+([0-9A-Fa-f]{1,8})#([0-9A-Fa-f]*)\s*$")


def read_candump(path: Path) -> CanFrames:
    """A Linux ``candump -l`` log: ``(1436509052.249713) can0 123#DEADBEEF`` per line."""
    path = Path(path)
    _check_size(path)
    t: list[int] = []
    bus: list[int] = []
    ids: list[int] = []
    data: list[bytes] = []
    buses: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8", errors="strict") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                m = _CANDUMP.match(line)
                if m is None or len(m.group(4)) % 2:
                    raise ConfigError(f"{path}:{lineno}: not a candump line: {line.strip()[:60]!r}")
                t.append(_seconds_to_ns(m.group(1)))
                bus.append(buses.setdefault(m.group(2), len(buses)))
                ids.append(int(m.group(3), 16))
                data.append(bytes.fromhex(m.group(4)))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text candump log") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return CanFrames(np.array(t, np.int64), np.array(bus, np.int64), np.array(ids, np.int64), data)


def read_gvret_csv(path: Path) -> CanFrames:
    """SavvyCAN GVRET CSV (``Time Stamp`` in µs, ``ID`` hex, ``Bus``, ``LEN``, ``D1..D8`` hex)."""
    path = Path(path)
    _check_size(path)
    t: list[int] = []
    bus: list[int] = []
    ids: list[int] = []
    data: list[bytes] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if header[:5] != ["Time Stamp", "ID", "Extended", "Bus", "LEN"]:
            raise ConfigError(f"{path}:1: not a GVRET CSV header")
        for lineno, row in enumerate(reader, start=2):
            try:
                n = int(row[4])
                t.append(int(row[0]) * 1000)
                ids.append(int(row[1], 16))
                bus.append(int(row[3]))
                data.append(bytes(int(x, 16) for x in row[5 : 5 + n]))
            except (ValueError, IndexError):
                raise ConfigError(f"{path}:{lineno}: malformed GVRET row") from None
    return CanFrames(np.array(t, np.int64), np.array(bus, np.int64), np.array(ids, np.int64), data)


def read_asc(path: Path) -> CanFrames:
    """Vector ASC with absolute timestamps in seconds (``0.153600 0  594 Rx d 8 34 21 ...``)."""
    path = Path(path)
    _check_size(path)
    pat = re.compile(r"^\s*(\d+\.\d+)\s+(\d+)\s+([0-9A-Fa-f]+)x?\s+(?:Rx|Tx)\s+d\s+(\d+)\s+(.*)$")
    t: list[int] = []
    bus: list[int] = []
    ids: list[int] = []
    data: list[bytes] = []
    with path.open(encoding="latin-1") as fh:
        for line in fh:
            m = pat.match(line)
            if m is None:
                continue  # headers, comments, error frames and status lines carry no signal values
            n = int(m.group(4))
            fields = m.group(5).split()[:n]
            t.append(_seconds_to_ns(m.group(1)))
            bus.append(int(m.group(2)))
            ids.append(int(m.group(3), 16))
            data.append(bytes(int(x, 16) for x in fields))
    return CanFrames(np.array(t, np.int64), np.array(bus, np.int64), np.array(ids, np.int64), data)


def decode_frames(frames: CanFrames, dbcs: dict[int | None, DbcDatabase], prefix: str = "") -> ImportResult:
    """Decode frames through the DBC of their bus (key ``None`` = any bus); one group per bus+message.

    Values keep the catalog's kind: signals the DBC marks as scaled or float are float64, the others int64
    (enumerations and counters keep their exact codes).
    """
    result = ImportResult([])
    per_group: dict[tuple[int, str], tuple[list[int], dict[str, list[float | int]]]] = {}
    decoders = {b: db.decoder(db.message_names()) for b, db in dbcs.items()}
    kinds: dict[tuple[int, str], dict[str, bool]] = {}
    for b, db in dbcs.items():
        for msg in db.message_names():
            kinds[(-1 if b is None else b, msg)] = {name: scaled for name, _, scaled in db.signals_of(msg)}
    for i in range(int(frames.t_ns.shape[0])):
        b = int(frames.bus[i])
        key: int | None = b if b in decoders else None
        dec = decoders.get(key)
        decoded = dec.decode(int(frames.frame_id[i]), frames.data[i]) if dec is not None else None
        if decoded is None:
            result.frames_skipped += 1
            continue
        msg, vals = decoded
        slot = per_group.get((b, msg))
        if slot is None:
            slot = per_group[(b, msg)] = ([], defaultdict(list))
        slot[0].append(int(frames.t_ns[i]))
        for name, v in vals.items():
            slot[1][name].append(v)
    for (b, msg), (ts, cols) in sorted(per_group.items()):
        kind = kinds.get((b if b in decoders else -1, msg), {})
        out: dict[str, npt.NDArray[Any]] = {}
        for name, vs in cols.items():
            if len(vs) != len(ts):
                # A multiplexed signal is present in some frames only; it cannot share the message's time
                # column, so it is left out — and said so, never dropped silently.
                result.notes.append(
                    f"{prefix}can{b}/{msg}/{name}: multiplexed ({len(vs)} of {len(ts)} frames), not imported"
                )
                continue
            if kind.get(name, True) or not all(isinstance(v, int) for v in vs):
                out[name] = np.array([float(v) for v in vs], dtype=np.float64)
            else:
                out[name] = np.array(vs, dtype=np.int64)
        if out:
            t = np.array(ts, dtype=np.int64)
            order = np.argsort(t, kind="stable")
            name = f"{prefix}can{b}/{msg}"
            result.groups.append(ImportedGroup(name, t[order], {k: v[order] for k, v in out.items()}))
    return result


def read_mf4(path: Path) -> CanFrames:
    """An ASAM MDF 4 bus log (CANedge and other loggers: ``CAN_DataFrame`` channel groups), through
    ``asammdf`` (the ``mf4`` extra, imported only here). Times are the file's start time plus each
    frame's offset; CAN FD payloads are cut to their data length."""
    path = Path(path)
    _check_size(path)
    try:
        from asammdf import MDF  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError(
            f"{path}: reading MF4 needs asammdf; install it with pip install 'fleetloop[mf4]'"
        ) from None
    with open(path, "rb") as fh:
        head = fh.read(16)
    # "UnFinMF " marks a file the logger has not finalized (CANedge writes them so); asammdf reads both.
    if head[:8] not in (b"MDF     ", b"UnFinMF ") or head[8:10] != b"4.":
        raise ConfigError(f"{path}: not an MF4 file (no 'MDF 4.x' identification block)")
    try:
        mdf = MDF(str(path))
    except Exception as exc:  # asammdf's errors on outside bytes: one line, never a traceback
        raise ConfigError(f"{path}: not a readable MF4 file ({str(exc).splitlines()[0][:200]})") from None
    try:
        start_ns = int(mdf.start_time.timestamp()) * NS_PER_S + mdf.start_time.microsecond * 1000
        parts: list[tuple[Any, ...]] = []
        for gi, group in enumerate(mdf.groups):
            names = [str(c.name) for c in getattr(group, "channels", ())]
            if "CAN_DataFrame.ID" not in names or "CAN_DataFrame.DataBytes" not in names:
                continue

            def channel(name: str, gi: int = gi, names: list[str] = names) -> Any:
                # converted values: a logger may store the bus number through a conversion table
                return mdf.get(name, group=gi, index=names.index(name))

            ids = channel("CAN_DataFrame.ID")
            data = np.asarray(channel("CAN_DataFrame.DataBytes").samples, dtype=np.uint8)
            bus = (
                np.asarray(channel("CAN_DataFrame.BusChannel").samples, dtype=np.int64)
                if "CAN_DataFrame.BusChannel" in names
                else np.zeros(len(ids.samples), dtype=np.int64)
            )
            length = (
                np.asarray(channel("CAN_DataFrame.DataLength").samples, dtype=np.int64)
                if "CAN_DataFrame.DataLength" in names
                else np.full(len(ids.samples), data.shape[1] if data.ndim == 2 else 0, dtype=np.int64)
            )
            t = start_ns + np.round(np.asarray(ids.timestamps, dtype=np.float64) * NS_PER_S).astype(np.int64)
            parts.append((t, bus, np.asarray(ids.samples, dtype=np.int64) & 0x1FFFFFFF, data, length))
    finally:
        mdf.close()
    if not parts:
        raise ConfigError(f"{path}: no CAN data frames in this MF4 file")
    t_ns = np.concatenate([p[0] for p in parts])
    order = np.argsort(t_ns, kind="stable")
    payloads = [bytes(row[: int(n)]) for p in parts for row, n in zip(p[3], p[4], strict=True)]
    return CanFrames(
        t_ns[order],
        np.concatenate([p[1] for p in parts])[order],
        np.concatenate([p[2] for p in parts])[order],
        [payloads[i] for i in order],
    )


def read_can_log(path: Path, dbc_path: Path) -> ImportResult:
    """A CAN log (candump ``.log``, GVRET ``.csv``, Vector ``.asc`` or ASAM ``.mf4``) decoded through one
    DBC."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mf4":
        frames = read_mf4(path)
    elif suffix == ".asc":
        frames = read_asc(path)
    elif suffix == ".csv":
        frames = read_gvret_csv(path)
    else:
        frames = read_candump(path)
    return decode_frames(frames, {None: load_dbc(Path(dbc_path))})


# ------------------------------------------------------------------------------------------ segments


_DATA_TYPES = {
    "f": DataType.FLOAT64,
    "i": DataType.INT64,
    "u": DataType.INT64,
    "b": DataType.BOOL,
    "O": DataType.STRING,  # text (an object array of str, as read_long_csv makes)
}


def to_segments(
    result: ImportResult, catalog: Catalog, *, rows_per_segment: int = DEFAULT_SEGMENT_ROWS
) -> Iterator[Segment]:
    """Register every signal (``group/signal`` paths) in ``catalog`` and cut groups into segments."""
    for g in result.groups:
        ids: dict[int, npt.NDArray[Any]] = {}
        types: dict[int, DataType] = {}
        for name, values in g.columns.items():
            dt = _DATA_TYPES.get(values.dtype.kind)
            if dt is None:
                raise ConfigError(f"group {g.name!r}: signal {name!r} has unsupported values {values.dtype}")
            spec = catalog.add(f"{g.name}/{name}" if result.qualified else name, dt)
            ids[spec.id] = values
            types[spec.id] = spec.data_type
        rows = int(g.t_ns.shape[0])
        for lo in range(0, max(rows, 1), rows_per_segment):
            hi = min(rows, lo + rows_per_segment)
            yield Segment(
                new_segment_id(), g.name, g.t_ns[lo:hi], {k: v[lo:hi] for k, v in ids.items()}, types
            )


# ------------------------------------------------------------------------------------------ real corpus


def _wide_csv(path: Path, delimiter: str, time_ns: Any, group: str) -> ImportResult:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    header, body = rows[0], [r for r in rows[1:] if r]
    t = np.array([time_ns(r[0]) for r in body], dtype=np.int64)
    cols = {h: np.array([float(r[i]) for r in body], dtype=np.float64) for i, h in enumerate(header) if i}
    return ImportResult([ImportedGroup(group, t, cols)])


def _datetime_ns(cell: str) -> int:
    moment = datetime.fromisoformat(cell.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return ((moment - _EPOCH) // timedelta(microseconds=1)) * 1000


def _float_seconds_ns(t: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    return np.round(np.asarray(t, dtype=np.float64) * NS_PER_S).astype(np.int64)


def real_corpus(root: Path) -> Iterator[tuple[str, ImportResult]]:
    """Every real data set under ``root`` (``../shared/data/real``) that this build can decode, as groups.

    The MF4 recordings need ``asammdf`` (not a dependency); they are reported in the notes of an empty
    result rather than skipped silently.
    """
    root = Path(root)
    comma = next(iter(sorted((root / "comma2k19").glob("*/*"))), None)
    if comma is not None:
        raw = comma / "processed_log" / "CAN" / "raw_can"
        frames = CanFrames(
            _float_seconds_ns(np.load(raw / "t")),
            np.load(raw / "src").astype(np.int64),
            np.load(raw / "address").astype(np.int64),
            [bytes(x) for x in np.load(raw / "data")],
        )
        dbcs: dict[int | None, DbcDatabase] = {
            0: load_dbc(root / "opendbc" / "toyota_rav4_2017_pt_generated.dbc"),
            1: load_dbc(root / "opendbc" / "toyota_adas.dbc"),
        }
        yield "comma2k19-can", decode_frames(frames, dbcs)
        groups = []
        for t_path in sorted((comma / "processed_log").glob("*/*/t")):
            if t_path.parent.name == "raw_can":
                continue
            t = _float_seconds_ns(np.load(t_path))
            v = np.load(t_path.parent / "value")
            v2 = v.reshape(v.shape[0], -1)
            name = f"{t_path.parent.parent.name}/{t_path.parent.name}"
            groups.append(
                ImportedGroup(name, t, {f"c{i}": np.ascontiguousarray(v2[:, i]) for i in range(v2.shape[1])})
            )
        pose = comma / "global_pose"
        if (pose / "frame_times").exists():
            t = _float_seconds_ns(np.load(pose / "frame_times"))
            cols: dict[str, npt.NDArray[Any]] = {}
            for part in ("frame_gps_times", "frame_positions", "frame_velocities", "frame_orientations"):
                v = np.load(pose / part)
                v2 = v.reshape(v.shape[0], -1)
                for i in range(v2.shape[1]):
                    cols[f"{part}{i}"] = np.ascontiguousarray(v2[:, i])
            groups.append(ImportedGroup("global_pose", t, cols))
        yield "comma2k19-sensors", ImportResult(groups)
    kona = root / "kona-ev"
    if kona.is_dir():
        dbc = kona / "dbc"
        for log in sorted(kona.glob("*.csv")):
            frames = read_gvret_csv(log)
            yield (
                "kona-ev-" + log.stem[:10],
                decode_frames(frames, {0: load_dbc(dbc / "pcan.dbc"), 1: load_dbc(dbc / "ccan.dbc")}),
            )
        for log in sorted(kona.glob("*.asc")):
            yield "kona-ev-" + log.stem, decode_frames(read_asc(log), {None: load_dbc(dbc / "pcan.dbc")})
    imu = root / "xio-fusion-imu" / "sensor_data.csv"
    if imu.exists():
        yield "xio-fusion-imu", _wide_csv(imu, ",", _seconds_to_ns, "imu")
    skab = root / "skab" / "anomaly-free.csv"
    if skab.exists():
        yield "skab", _wide_csv(skab, ";", _datetime_ns, "pump")
    css = root / "css-electronics"
    mf4 = sorted(css.glob("*/*.MF4")) if css.is_dir() else []
    if mf4:
        try:
            import asammdf  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            yield (
                "css-electronics-mf4",
                ImportResult([], notes=[f"{len(mf4)} MF4 files need asammdf (not installed); not measured"]),
            )
            return
        for log in mf4:
            # SOURCES.md pairs each log with its DBC: the J1939 truck and the GNSS/IMU module.
            name = "canmod-gps.dbc" if "canmod" in log.parent.name else "CSS-Electronics-SAE-J1939-DEMO.dbc"
            dbc = css / "dbc" / name
            yield "css-" + log.parent.name, decode_frames(read_mf4(log), {None: load_dbc(dbc)})


def _check_size(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if size > MAX_INPUT_BYTES:
        raise ConfigError(f"{path}: {size} bytes exceeds the import limit of {MAX_INPUT_BYTES}")
