"""The real corpus: every recorded data set under ``../shared/data/real`` this build can decode, as groups.

The store benchmark (``benchmarks/store.py``) measures it, and the segment and codec tests round-trip it;
both read it through the one reader of recordings (``fleetloop_agent.recordings``), the same readers
``fleetloop store import`` and the replay sources use, so what is measured is what operators get.
Importable from tests too (pytest's ``pythonpath`` holds ``benchmarks``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings import (
    Note,
    Recording,
    SignalGroup,
    decode_frames,
    float_seconds_to_ns,
    read_wide_csv,
)
from fleetloop_agent.recordings.can_logs import read_asc, read_gvret
from fleetloop_agent.recordings.mf4 import read_mf4
from fleetloop_agent.recordings.numpy_can import read_numpy_can
from fleetloop_shared.dbc import DbcDatabase, load_dbc


def _columns(prefix: str, values: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
    """One column per component of a (rows, ...) array."""
    flat = values.reshape(values.shape[0], -1)
    return {f"{prefix}{i}": np.ascontiguousarray(flat[:, i]) for i in range(flat.shape[1])}


def _comma2k19(segment: Path, root: Path) -> Iterator[tuple[str, Recording]]:
    dbcs: dict[int | None, DbcDatabase] = {
        0: load_dbc(root / "opendbc" / "toyota_rav4_2017_pt_generated.dbc"),
        1: load_dbc(root / "opendbc" / "toyota_adas.dbc"),
    }
    raw = segment / "processed_log" / "CAN" / "raw_can"
    yield "comma2k19-can", decode_frames(read_numpy_can(raw), dbcs)
    groups = []
    for t_path in sorted((segment / "processed_log").glob("*/*/t")):
        if t_path.parent.name == "raw_can":
            continue
        t = float_seconds_to_ns(np.load(t_path))
        name = f"{t_path.parent.parent.name}/{t_path.parent.name}"
        groups.append(SignalGroup(name, t, _columns("c", np.load(t_path.parent / "value"))))
    pose = segment / "global_pose"
    if (pose / "frame_times").exists():
        cols: dict[str, npt.NDArray[Any]] = {}
        for part in ("frame_gps_times", "frame_positions", "frame_velocities", "frame_orientations"):
            cols.update(_columns(part, np.load(pose / part)))
        groups.append(SignalGroup("global_pose", float_seconds_to_ns(np.load(pose / "frame_times")), cols))
    yield "comma2k19-sensors", Recording(groups)


def real_corpus(root: Path) -> Iterator[tuple[str, Recording]]:
    """(name, recording) of every real data set under ``root``.

    The MF4 recordings need ``asammdf`` (an extra); without it they are reported in the notes of an empty
    recording rather than skipped silently.
    """
    root = Path(root)
    comma = next(iter(sorted((root / "comma2k19").glob("*/*"))), None)
    if comma is not None:
        yield from _comma2k19(comma, root)
    kona = root / "kona-ev"
    if kona.is_dir():
        dbc = kona / "dbc"
        for log in sorted(kona.glob("*.csv")):
            buses: dict[int | None, DbcDatabase] = {
                0: load_dbc(dbc / "pcan.dbc"),
                1: load_dbc(dbc / "ccan.dbc"),
            }
            yield "kona-ev-" + log.stem[:10], decode_frames(read_gvret(log), buses)
        for log in sorted(kona.glob("*.asc")):
            yield "kona-ev-" + log.stem, decode_frames(read_asc(log), {None: load_dbc(dbc / "pcan.dbc")})
    imu = root / "xio-fusion-imu" / "sensor_data.csv"
    if imu.exists():
        yield "xio-fusion-imu", read_wide_csv(imu, time_unit="s", group="imu")
    skab = root / "skab" / "anomaly-free.csv"
    if skab.exists():
        yield "skab", read_wide_csv(skab, delimiter=";", time_unit="datetime", group="pump")
    css = root / "css-electronics"
    mf4 = sorted(css.glob("*/*.MF4")) if css.is_dir() else []
    if mf4:
        try:
            import asammdf  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            note = Note(f"{len(mf4)} MF4 files need asammdf (not installed); not measured")
            yield "css-electronics-mf4", Recording([], notes=[note])
            return
        for log in mf4:
            # SOURCES.md pairs each log with its DBC: the J1939 truck and the GNSS/IMU module.
            name = "canmod-gps.dbc" if "canmod" in log.parent.name else "CSS-Electronics-SAE-J1939-DEMO.dbc"
            yield "css-" + log.parent.name, decode_frames(read_mf4(log), {None: load_dbc(css / "dbc" / name)})
