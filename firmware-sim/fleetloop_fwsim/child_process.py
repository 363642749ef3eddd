"""Server processes the simulator starts for tests and demos (brokers, a CAN network): one way to wait
until one listens, one way to stop it and one way to restart it.

A child that exits at start is reported with the tail of its log (the reason is nearly always there);
one that never listens is stopped before the error is raised, so a failed start leaves no process behind.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from fleetloop_shared.errors import UnavailableError


class RestartableChild:
    """A server child that can crash and come back on the same ports: :meth:`restart` is a SIGKILL, an
    optional outage and a fresh start, counted in :attr:`restarts` (what chaos tests assert on)."""

    restarts: int = 0

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        if down_s > 0:
            time.sleep(down_s)
        self.start()
        self.restarts += 1


def free_port() -> int:
    """A TCP port free on loopback now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def await_listening(
    proc: subprocess.Popen[bytes],
    host: str,
    port: int,
    *,
    name: str,
    timeout_s: float,
    log_path: Path | None = None,
) -> None:
    """Return once ``host:port`` accepts a connection; raise ``UnavailableError`` if ``proc`` exits
    first (with its log's tail) or the deadline passes (after stopping it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-600:] if log_path is not None else ""
            raise UnavailableError(
                f"{name} exited with code {proc.returncode}" + (f": {tail}" if tail else "")
            )
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                terminate(proc)
                raise UnavailableError(
                    f"{name} did not listen on {host}:{port} within {timeout_s:g} s"
                ) from None
            time.sleep(0.05)


def terminate(proc: subprocess.Popen[bytes] | None, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; nothing if it is gone already."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)
