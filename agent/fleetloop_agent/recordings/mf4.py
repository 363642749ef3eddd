"""ASAM MDF 4 bus logs (CANedge and other loggers: ``CAN_DataFrame`` channel groups), through asammdf.

This is the only module that imports asammdf (the ``mf4`` extra), and only when a file is read; its errors
on outside bytes become one ConfigError line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fleetloop_agent.recordings.can_logs import CanFrames
from fleetloop_agent.recordings.cells import NS_PER_S, float_seconds_to_ns
from fleetloop_agent.recordings.text import MAX_INPUT_BYTES, check_size
from fleetloop_shared.errors import ConfigError


def read_mf4(path: Path, *, limit: int = MAX_INPUT_BYTES) -> CanFrames:
    """Frames of every ``CAN_DataFrame`` group. Times are the file's start time plus each frame's offset;
    CAN FD payloads are cut to their data length."""
    path = Path(path)
    check_size(path, limit)
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
        parts = [p for gi, group in enumerate(mdf.groups) if (p := _group_frames(mdf, gi, group, start_ns))]
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


def _group_frames(mdf: Any, gi: int, group: Any, start_ns: int) -> tuple[Any, ...] | None:
    """(t_ns, bus, id, data rows, lengths) of one channel group, or None when it holds no CAN frames."""
    names = [str(c.name) for c in getattr(group, "channels", ())]
    if "CAN_DataFrame.ID" not in names or "CAN_DataFrame.DataBytes" not in names:
        return None

    def channel(name: str) -> Any:
        # converted values: a logger may store the bus number through a conversion table
        return mdf.get(name, group=gi, index=names.index(name))

    ids = channel("CAN_DataFrame.ID")
    n = len(ids.samples)
    data = np.asarray(channel("CAN_DataFrame.DataBytes").samples, dtype=np.uint8)
    bus = (
        np.asarray(channel("CAN_DataFrame.BusChannel").samples, dtype=np.int64)
        if "CAN_DataFrame.BusChannel" in names
        else np.zeros(n, dtype=np.int64)
    )
    length = (
        np.asarray(channel("CAN_DataFrame.DataLength").samples, dtype=np.int64)
        if "CAN_DataFrame.DataLength" in names
        else np.full(n, data.shape[1] if data.ndim == 2 else 0, dtype=np.int64)
    )
    t = start_ns + float_seconds_to_ns(ids.timestamps)
    return t, bus, np.asarray(ids.samples, dtype=np.int64) & 0x1FFFFFFF, data, length
