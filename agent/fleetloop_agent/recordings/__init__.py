"""One reader of recordings: long and wide CSV, candump, Vector ASC and BLF, GVRET CSV, ASAM MF4 and
comma-style numpy CAN arrays, decoded through a DBC where they hold CAN frames; and robot recordings (MCAP
of ROS 2 messages, ROS 1 and ROS 2 bags), one group per topic.

The replay sources, ``fleetloop store import`` and ``fleetloop rules test`` all read through this package
and its one rule for typing cells and times (:mod:`.cells`), so what an operator tests is what a device
sees. Formats are told apart by what a file is: a directory of numpy columns, the suffix of a bus log
(``.mf4``, ``.asc``, ``.blf``, ``.log``), or else the header of a CSV (``t_ns,signal,value`` is long,
GVRET's own header is a bus log, anything else is wide).
"""

from __future__ import annotations

from pathlib import Path

from fleetloop_agent.recordings.blf import read_blf
from fleetloop_agent.recordings.can_logs import (
    CanFrames,
    decode_frames,
    is_gvret_header,
    read_asc,
    read_candump,
    read_gvret,
)
from fleetloop_agent.recordings.cells import TIME_UNITS, float_seconds_to_ns, parse_time
from fleetloop_agent.recordings.mf4 import read_mf4
from fleetloop_agent.recordings.numpy_can import NumpyCanLog, is_numpy_can, read_numpy_can
from fleetloop_agent.recordings.recording import Note, Recording, SignalGroup, data_type_of, detect_groups
from fleetloop_agent.recordings.ros import is_robot_log, read_robot_log
from fleetloop_agent.recordings.tables import TypeOf, is_long_header, read_long_csv, read_wide_csv
from fleetloop_agent.recordings.text import MAX_INPUT_BYTES, check_size, sniff_delimiter
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError

__all__ = [
    "MAX_INPUT_BYTES",
    "TIME_UNITS",
    "CanFrames",
    "Note",
    "NumpyCanLog",
    "Recording",
    "SignalGroup",
    "TypeOf",
    "data_type_of",
    "decode_frames",
    "detect_groups",
    "float_seconds_to_ns",
    "parse_time",
    "read_can_frames",
    "read_recording",
    "read_robot_log",
    "read_wide_csv",
]

_HEAD_BYTES = 65_536


def _csv_header(path: Path) -> list[str]:
    """The fields of a CSV's first line (enough to tell long, wide and GVRET apart)."""
    check_size(path)
    with path.open("rb") as fh:
        head = fh.read(_HEAD_BYTES).decode("utf-8-sig", errors="replace")
    first = head.splitlines()[0] if head.strip() else ""
    return [f.strip().strip('"') for f in first.split(sniff_delimiter(first))]


def read_can_frames(path: Path) -> CanFrames | None:
    """The frames of a bus log (numpy directory, ``.mf4``, ``.asc``, ``.blf``, ``.log`` or GVRET CSV), or
    None when ``path`` is a CSV of signals."""
    path = Path(path)
    if path.is_dir():
        if not is_numpy_can(path):
            raise ConfigError(f"{path}: a directory, but not a CAN frames directory (t, address, src, data)")
        return read_numpy_can(path)
    suffix = path.suffix.lower()
    if suffix == ".mf4":
        return read_mf4(path)
    if suffix == ".asc":
        return read_asc(path)
    if suffix == ".log":
        return read_candump(path)
    if suffix == ".blf":
        return read_blf(path)
    if is_gvret_header(_csv_header(path)):
        return read_gvret(path)
    return None


def read_recording(
    path: Path,
    *,
    dbc: Path | None = None,
    bus: int | None = None,
    types: TypeOf | None = None,
    time_column: str | None = None,
) -> Recording:
    """Any recording as groups of typed signals. A bus log needs ``dbc`` (``bus``: decode that bus only);
    ``types`` (a catalog's) and ``time_column`` apply to CSVs of signals."""
    path = Path(path)
    if is_robot_log(path):
        if dbc is not None:
            raise ConfigError(f"{path}: a robot recording (MCAP or ROS bag); it takes no DBC")
        return read_robot_log(path)
    frames = read_can_frames(path)
    if frames is not None:
        if dbc is None:
            raise ConfigError(f"{path}: a CAN bus log; decoding it needs a DBC (--dbc)")
        if bus is not None:
            keep = frames.bus == bus
            frames = CanFrames(
                frames.t_ns[keep],
                frames.bus[keep],
                frames.frame_id[keep],
                [d for d, k in zip(frames.data, keep, strict=True) if k],
            )
        return decode_frames(frames, {None: load_dbc(Path(dbc))})
    if dbc is not None:
        raise ConfigError(f"{path}: a CSV of signals, not a CAN bus log; it takes no DBC")
    header = _csv_header(path)
    if time_column is None and (is_long_header(header) or header[1:] == ["signal", "value"]):
        return read_long_csv(path, types=types)  # a long CSV, or one whose time header is mistyped
    return read_wide_csv(path, time_column=time_column, types=types)
