"""A robot's own software publishing its IMU to the agent through the push API, as a robot vendor's
controller would: rows of the x-io IMU recording (or the generated stand-in) at their recorded pace times
``speed``, stamped by the robot's clock, in batches.

The agent owns the socket: while it is not there (the agent starting, or rebooting into new firmware) the
controller keeps its pace and counts the rows it could not hand over, then reconnects: a real robot does
not stop walking because its data logger restarts.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.push_client import PushClient
from fleetloop_fwsim.profiles import IMU_COLUMNS
from fleetloop_fwsim.signals import generate_imu_csv
from fleetloop_shared.errors import FleetloopError

IMU_GROUP: Final = "imu"


def load_imu(recordings: Path | None, generated: Path) -> tuple[npt.NDArray[np.float64], dict[str, Any], str]:
    """Seconds since the first row, one column per catalog path, and "recordings" or "simulated"."""
    if recordings is not None:
        path, origin = Path(recordings) / "xio-fusion-imu" / "sensor_data.csv", "recordings"
    else:
        path, origin = generated, "simulated"
        if not path.is_file():
            generate_imu_csv(path)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = np.array([[float(x) for x in r] for r in reader if r], dtype=np.float64)
    t = rows[:, header.index("Time (s)")]
    columns = {path_unit[0]: rows[:, header.index(col)] for col, path_unit in IMU_COLUMNS.items()}
    return t - t[0], columns, origin


def push_source(socket: Path, *, name: str = "robot") -> dict[str, Any]:
    """The agent's ``sources:`` entry that accepts this controller's IMU (one group, the units of the
    recording)."""
    signals = {path: {"unit": unit, "group": IMU_GROUP} for path, unit in IMU_COLUMNS.values()}
    return {"kind": "push_api", "name": name, "socket": str(socket), "signals": signals}


class ImuPublisher:
    """Publishes ``columns`` (timed by ``t_s``) to the push API on ``socket`` every ``period_s``, looping."""

    def __init__(
        self,
        socket: Path,
        t_s: npt.NDArray[np.float64],
        columns: dict[str, npt.NDArray[np.float64]],
        *,
        speed: float = 1.0,
        period_s: float = 0.1,
    ) -> None:
        self.socket = socket
        self._t = t_s
        self._columns = columns
        self._span = float(t_s[-1]) + float(np.median(np.diff(t_s))) if len(t_s) > 1 else 1.0
        self.speed = speed
        self.period_s = period_s
        #: Rows the agent accepted, and rows it could not take (not there, or busy).
        self.published = 0
        self.missed = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="robot-imu", daemon=True)

    def start(self) -> ImuPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _rows(self, start_s: float, end_s: float) -> npt.NDArray[np.int64]:
        """Indices of the rows in the recording time ``[start_s, end_s)`` (looping), in order."""
        out: list[npt.NDArray[np.int64]] = []
        loop, pos = divmod(start_s, self._span)
        while start_s < end_s:
            stop = min(end_s - loop * self._span, self._span)
            lo, hi = np.searchsorted(self._t, [pos, stop], side="left")
            out.append(np.arange(lo, hi, dtype=np.int64))
            start_s = (loop + 1) * self._span
            loop, pos = loop + 1, 0.0
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _run(self) -> None:
        client: PushClient | None = None
        wall0, mono0 = time.time_ns(), time.monotonic()
        sent_to = 0.0  # recording seconds (unlooped) handed over or given up so far
        try:
            while not self._stop.wait(self.period_s):
                now_s = (time.monotonic() - mono0) * self.speed
                rows = self._rows(sent_to, now_s)
                times = wall0 + ((self._loop_times(sent_to, rows)) / self.speed * 1e9).astype(np.int64)
                sent_to = now_s
                if rows.size == 0:
                    continue
                try:
                    if client is None:
                        client = PushClient(self.socket, timeout_s=2.0)
                    values = {path: column[rows].tolist() for path, column in self._columns.items()}
                    client.publish(values, time_ns=times.tolist())
                    self.published += int(rows.size)
                except FleetloopError as exc:  # the agent is away or busy: these rows are lost to it
                    self.missed += int(rows.size)
                    self.last_error = str(exc)
                    if client is not None:
                        client.close()
                    client = None
        finally:
            if client is not None:
                client.close()

    def _loop_times(self, start_s: float, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Unlooped recording seconds of ``rows`` (from :meth:`_rows`, starting at ``start_s``)."""
        t = self._t[rows]
        loop = np.floor(start_s / self._span) + np.cumsum(np.concatenate(([0], np.diff(t) < 0)))
        out: npt.NDArray[np.float64] = t + loop * self._span
        return out
