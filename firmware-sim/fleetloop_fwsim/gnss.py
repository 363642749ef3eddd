"""The simulated car's GNSS receiver on its CAN bus: one ``SIM_GNSS_POSITION`` frame per fix (10 Hz),
latitude and longitude in 1e-7 degrees (``data/gnss.dbc``), as a telematics unit puts a u-blox fix on
the bus. With the recordings the fixes are the comma2k19 drive's own (its u-blox receiver, on the same
boot clock as its CAN frames); without them a generated track at the drive's pace. Positions are what a
privacy policy coarsens: they say where a car is.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

import numpy as np

from fleetloop_shared.datapaths import comma2k19_segment

GNSS_DBC: Final = Path(__file__).resolve().parent / "data" / "gnss.dbc"
GNSS_FRAME_ID: Final = 0x500
#: The catalog paths the fixes decode to (VSS), keyed as the CAN source's mapping wants them.
GNSS_MAPPING: Final = {
    "SIM_GNSS_POSITION.LATITUDE": "Vehicle.CurrentLocation.Latitude",
    "SIM_GNSS_POSITION.LONGITUDE": "Vehicle.CurrentLocation.Longitude",
}
#: Where the generated track starts (Mountain View, where comma2k19's drives are) and how it moves.
_START: Final = (37.3861, -122.0839)
_STEP_DEG: Final = 1.2e-5  # per fix at 10 Hz: ~13 m/s heading north-east
_FIX_NS: Final = 100_000_000


def _frame(t_ns: int, latitude: float, longitude: float) -> tuple[int, int, bytes]:
    return t_ns, GNSS_FRAME_ID, struct.pack("<ii", round(latitude * 1e7), round(longitude * 1e7))


def gnss_frames(recordings: Path | None, first_ns: int, last_ns: int) -> list[tuple[int, int, bytes]]:
    """(t_ns, id, payload) of the fixes between the drive's first and last frame."""
    if recordings is not None:
        ublox = comma2k19_segment(recordings) / "processed_log" / "GNSS" / "live_gnss_ublox"
        t = np.load(ublox / "t")
        fixes = np.load(ublox / "value")
        return [_frame(int(s * 1e9), float(v[0]), float(v[1])) for s, v in zip(t, fixes, strict=True)
                if first_ns <= int(s * 1e9) <= last_ns]  # fmt: skip
    n = max(0, (last_ns - first_ns) // _FIX_NS)
    return [_frame(first_ns + i * _FIX_NS, _START[0] + i * _STEP_DEG, _START[1] + i * _STEP_DEG)
            for i in range(n)]  # fmt: skip
