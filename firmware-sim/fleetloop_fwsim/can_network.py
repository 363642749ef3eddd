"""A CAN network that crosses processes without a kernel CAN driver, and a player that drives frames onto
a bus: what stands in for a vehicle's wiring where there is no SocketCAN (this kind of machine has no
``vcan``).

:class:`RemoteCanServer` runs python-can-remote's server (``python -m can_remote``) on a free loopback
port over a python-can virtual channel: every client that connects (``interface: remote``,
``channel: ws://127.0.0.1:PORT/``) is on the same bus, whatever process it is in. The agent's CAN
source connects to it exactly as it would to any python-can interface. :class:`CanPlayer` sends frames
(a recording's, or generated) onto a bus at their recorded pace, times ``speed``, from its own thread.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetloop_fwsim.child_process import await_listening, free_port, terminate


class RemoteCanServer:
    """python-can-remote's server process on ``127.0.0.1:port``, one virtual channel."""

    def __init__(
        self, *, channel: str = "fleetloop", port: int | None = None, log: Path | None = None
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.channel = channel
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> RemoteCanServer:
        out = self._log.open("ab") if self._log is not None else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "can_remote",
                "-i",
                "virtual",
                "-c",
                self.channel,
                "-H",
                self.host,
                "-p",
                str(self.port),
            ],
            stdout=out,
            stderr=out,
        )
        await_listening(
            self._proc, self.host, self.port, name="the CAN server", timeout_s=timeout, log_path=self._log
        )
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)

    def __enter__(self) -> RemoteCanServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CanPlayer:
    """Sends ``frames`` — ``(t_ns, frame_id, payload)`` in time order — onto ``bus`` at their own pace
    divided by ``speed``, looping ``loops`` times (0: until stopped)."""

    def __init__(
        self, bus: Any, frames: Sequence[tuple[int, int, bytes]], *, speed: float = 1.0, loops: int = 1
    ) -> None:
        import can

        self._bus = bus
        self._messages = [
            (t, can.Message(arbitration_id=i, data=d, is_extended_id=i > 0x7FF, is_fd=len(d) > 8))
            for t, i, d in frames
        ]
        self._speed = speed
        self._loops = loops
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can-player", daemon=True)
        #: Frames sent so far.
        self.sent = 0

    def start(self) -> CanPlayer:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        if not self._messages:
            return
        t0 = self._messages[0][0]
        span = self._messages[-1][0] - t0
        loop = 0
        start = time.monotonic()
        while not self._stop.is_set() and (self._loops == 0 or loop < self._loops):
            base = loop * (span + 1_000_000)
            for t, msg in self._messages:
                due = start + (base + t - t0) / 1e9 / self._speed
                wait = due - time.monotonic()
                if wait > 0.002 and self._stop.wait(wait):
                    return
                self._bus.send(msg)
                self.sent += 1
            loop += 1
