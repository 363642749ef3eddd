"""CAN bus logs in text formats (Linux candump, Vector ASC, SavvyCAN GVRET CSV), and decoding frames of
any log through DBCs into groups of signals.

Frames are kept in columns (:class:`CanFrames`) until decoded. Every malformed frame line is a ConfigError
naming ``FILE:LINE``; lines that are not frames (an ASC header, a comment, an error or status event)
carry no signal value and are passed over.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings.cells import parse_time
from fleetloop_agent.recordings.recording import Note, Recording, SignalGroup
from fleetloop_agent.recordings.text import MAX_INPUT_BYTES, csv_records, read_text
from fleetloop_shared.dbc import DbcDatabase
from fleetloop_shared.errors import ConfigError

#: Widest payload accepted (CAN FD).
MAX_PAYLOAD_BYTES: Final = 64
GVRET_HEADER: Final = ("Time Stamp", "ID", "Extended", "Bus", "LEN")


@dataclass
class CanFrames:
    """Raw frames in columns: time (ns), bus, arbitration id, payload."""

    t_ns: npt.NDArray[np.int64]
    bus: npt.NDArray[np.int64]
    frame_id: npt.NDArray[np.int64]
    data: list[bytes]


class _Columns:
    """Frames as they are read, line by line."""

    def __init__(self) -> None:
        self.t: list[int] = []
        self.bus: list[int] = []
        self.ids: list[int] = []
        self.data: list[bytes] = []

    def add(self, t_ns: int, bus: int, frame_id: int, payload: bytes) -> None:
        self.t.append(t_ns)
        self.bus.append(bus)
        self.ids.append(frame_id)
        self.data.append(payload)

    def frames(self) -> CanFrames:
        ints = np.int64
        return CanFrames(
            np.array(self.t, ints), np.array(self.bus, ints), np.array(self.ids, ints), self.data
        )


def _seconds(cell: str, source: str) -> int:
    try:
        return parse_time(cell, "s")
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


_CANDUMP = re.compile(
    r"\s*\((?P<t>[+-]?\d+(?:\.\d+)?)\)\s+(?P<bus>\S+)\s+(?P<id>[0-9A-Fa-f]{1,8})"
    r"(?:#(?P<data>[0-9A-Fa-f]*|R\d?)|##[0-9A-Fa-f](?P<fd>[0-9A-Fa-f]*))\s*"
)


def read_candump(path: Path, *, limit: int = MAX_INPUT_BYTES) -> CanFrames:
    """A Linux ``candump -l`` log: ``(1436509052.249713) can0 123#DEADBEEF`` per line (CAN FD
    ``123##1...`` too; remote frames carry no data). Buses are numbered in order of appearance."""
    path = Path(path)
    out = _Columns()
    buses: dict[str, int] = {}
    for lineno, line in enumerate(read_text(path, limit).splitlines(), start=1):
        if not line.strip():
            continue
        m = _CANDUMP.fullmatch(line)
        hexdata = None if m is None else (m.group("fd") if m.group("fd") is not None else m.group("data"))
        if m is None or hexdata is None or (not hexdata.startswith("R") and len(hexdata) % 2):
            raise ConfigError(f"{path}:{lineno}: not a candump frame line: {line.strip()[:60]!r}")
        payload = b"" if hexdata.startswith("R") else bytes.fromhex(hexdata)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ConfigError(
                f"{path}:{lineno}: payload of {len(payload)} bytes (at most {MAX_PAYLOAD_BYTES})"
            )
        t = _seconds(m.group("t"), f"{path}:{lineno}")
        out.add(t, buses.setdefault(m.group("bus"), len(buses)), int(m.group("id"), 16), payload)
    return out.frames()


# A classic CAN data frame: time, channel, id (x = extended), direction, "d", length, data bytes.
_ASC_FRAME = re.compile(r"\s*(\d+\.\d+)\s+(\d+)\s+([0-9A-Fa-f]+)x?\s+(?:Rx|Tx)\s+[dD]\s+(.*)")


def read_asc(path: Path, *, limit: int = MAX_INPUT_BYTES) -> CanFrames:
    """Vector ASC (``0.153600 0  594 Rx d 8 34 21 ...``): times in seconds since the measurement start;
    channels as buses."""
    path = Path(path)
    out = _Columns()
    for lineno, line in enumerate(read_text(path, limit).splitlines(), start=1):
        m = _ASC_FRAME.fullmatch(line.rstrip())
        if m is None:
            continue  # header, comment, error frame or status line: no signal value
        where = f"{path}:{lineno}"
        fields = m.group(4).split()
        length = int(fields[0], 16) if fields and re.fullmatch(r"[0-9A-Fa-f]", fields[0]) else -1
        data = fields[1 : 1 + length] if length >= 0 else []
        if length < 0 or len(data) < length or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", x) for x in data):
            raise ConfigError(f"{where}: malformed ASC frame (length and data bytes): {line.strip()[:60]!r}")
        payload = bytes(int(x, 16) for x in data)
        out.add(_seconds(m.group(1), where), int(m.group(2)), int(m.group(3), 16), payload)
    return out.frames()


def is_gvret_header(fields: list[str]) -> bool:
    return tuple(f.strip() for f in fields[: len(GVRET_HEADER)]) == GVRET_HEADER


def read_gvret(path: Path, *, limit: int = MAX_INPUT_BYTES) -> CanFrames:
    """SavvyCAN GVRET CSV: ``Time Stamp`` (µs), ``ID`` (hex), ``Extended``, ``Bus``, ``LEN``, ``D1..D8``
    (hex)."""
    path = Path(path)
    out = _Columns()
    records = csv_records(read_text(path, limit), path)
    first = next(records, None)
    if first is None or not is_gvret_header([f for f, _ in first[1]]):
        raise ConfigError(f"{path}:1: not a GVRET CSV header ({', '.join(GVRET_HEADER)}, D1..D8)")
    for lineno, record in records:
        row = [f.strip() for f, _ in record]
        try:
            n = int(row[4])
            if not 0 <= n <= MAX_PAYLOAD_BYTES or len(row) < 5 + n:
                raise ValueError(f"length {row[4]} with {len(row) - 5} data bytes")
            t = parse_time(row[0], "us")
            payload = bytes(int(x, 16) for x in row[5 : 5 + n])
            out.add(t, int(row[3]), int(row[1], 16), payload)
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"{path}:{lineno}: malformed GVRET row ({exc})") from None
    return out.frames()


def decode_frames(frames: CanFrames, dbcs: dict[int | None, DbcDatabase], prefix: str = "") -> Recording:
    """Decode frames through the DBC of their bus (key ``None`` = any bus); one group per bus+message
    (``can0/MESSAGE``).

    Values keep the catalog's kind: signals the DBC marks as scaled or float are float64, the others int64
    (enumerations and counters keep their exact codes).
    """
    result = Recording([])
    per_group: dict[tuple[int, str], tuple[list[int], dict[str, list[float | int]]]] = {}
    decoders = {b: db.decoder(db.message_names()) for b, db in dbcs.items()}
    kinds: dict[tuple[int, str], dict[str, bool]] = {}
    for b, db in dbcs.items():
        for msg in db.message_names():
            kinds[(-1 if b is None else b, msg)] = {name: scaled for name, _, scaled in db.signals_of(msg)}
    for i in range(int(frames.t_ns.shape[0])):
        b = int(frames.bus[i])
        dec = decoders.get(b if b in decoders else None)
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
        group = f"{prefix}can{b}/{msg}"
        for name, vs in cols.items():
            if len(vs) != len(ts):
                # A multiplexed signal is present in some frames only; it cannot share the message's time
                # column, so it is left out — and said so, never dropped silently.
                text = f"note: {group}/{name}: multiplexed ({len(vs)} of {len(ts)} frames), not imported"
                result.notes.append(Note(text))
                continue
            if kind.get(name, True) or not all(isinstance(v, int) for v in vs):
                out[name] = np.array([float(v) for v in vs], dtype=np.float64)
            else:
                out[name] = np.array(vs, dtype=np.int64)
        if out:
            t = np.array(ts, dtype=np.int64)
            order = np.argsort(t, kind="stable")
            result.groups.append(SignalGroup(group, t[order], {k: v[order] for k, v in out.items()}))
    return result
