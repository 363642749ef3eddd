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
        self,
        *,
        channel: str = "fleetloop",
        port: int | None = None,
        log: Path | None = None,
        own_session: bool = False,
    ) -> None:
        """``own_session``: out of the caller's process group, so a signal to the group does not take the
        bus away from under the caller's clients before the caller has closed them (it stops it)."""
        self.host = "127.0.0.1"
        self._own_session = own_session
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
            start_new_session=self._own_session,
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
        self._span_ns = frames[-1][0] - frames[0][0] + 1_000_000 if frames else 1
        self._started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can-player", daemon=True)
        #: Frames sent so far.
        self.sent = 0
        #: Why the player ended early (its bus failed), if it did.
        self.error: str | None = None

    def start(self) -> CanPlayer:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def position_s(self) -> float:
        """Where in the frames the player is now: seconds since the first frame (within one loop), what
        an ECU answering beside it reports as "now" of the drive."""
        if self._started is None:
            return 0.0
        elapsed_ns = int((time.monotonic() - self._started) * self._speed * 1e9)
        return (elapsed_ns % self._span_ns) / 1e9

    def _run(self) -> None:
        if not self._messages:
            return
        t0 = self._messages[0][0]
        span = self._span_ns - 1_000_000
        loop = 0
        start = self._started = time.monotonic()
        while not self._stop.is_set() and (self._loops == 0 or loop < self._loops):
            base = loop * (span + 1_000_000)
            for t, msg in self._messages:
                due = start + (base + t - t0) / 1e9 / self._speed
                wait = due - time.monotonic()
                if wait > 0.002 and self._stop.wait(wait):
                    return
                try:
                    self._bus.send(msg)
                except Exception as exc:  # the bus went away: the player ends, saying why
                    self.error = f"{type(exc).__name__}: {exc}"
                    return
                self.sent += 1
            loop += 1
