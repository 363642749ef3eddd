"""The simulated device's power and init: boot through the bootloader, run the agent, reboot on request.

On a real device systemd starts the agent after the bootloader picked a slot, and a reboot runs the
bootloader again. :class:`DeviceSupervisor` plays both parts for a device directory: each round it calls
:func:`~fleetloop_fwsim.bootloader.boot`, lets the booted firmware decide how the simulated car drives
(:func:`~fleetloop_fwsim.vehicle.select_vehicle_bus`), starts the agent as a child process and waits.
The agent asks for a reboot by exiting with :data:`~fleetloop_agent.ota.platform.EXIT_REBOOT`; any other
exit ends the run with that code. :meth:`DeviceSupervisor.power_cut` kills the agent without warning and
boots again, the way a pulled plug would.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fleetloop_agent.ota.platform import EXIT_REBOOT
from fleetloop_fwsim import bootloader, vehicle
from fleetloop_fwsim.bootloader import BootResult, paths

__all__ = ["DeviceSupervisor", "paths"]

log = logging.getLogger(__name__)

_POLL_S = 0.2


class DeviceSupervisor:
    """Boot, run the agent, repeat on reboot requests; SIGTERM/SIGINT stop it cleanly (returns 0).

    Bounded: after ``max_reboots`` reboots in one run it gives up and returns 1 (a reboot loop is a bug
    the bootloader's fallback should have ended). A child that ignores SIGTERM is killed after
    ``stop_timeout_s``.
    """

    def __init__(
        self,
        device_dir: Path,
        agent_argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        max_reboots: int = 1000,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.device_dir = device_dir
        self.agent_argv = list(agent_argv)
        self.env = dict(env) if env is not None else None
        self.log_path = log_path
        self.max_reboots = max_reboots
        self.stop_timeout_s = stop_timeout_s
        self.reboots = 0
        self.power_cuts = 0
        self.last_boot: BootResult | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._cut = threading.Event()
        self._lock = threading.RLock()  # re-entrant: the signal handler may run while it is held

    def stop(self) -> None:
        """Ask the agent to terminate and :meth:`run` to return 0 (also what SIGTERM/SIGINT do)."""
        self._stop.set()
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                self._child.terminate()

    def power_cut(self) -> None:
        """Kill the agent at once (SIGKILL) and boot again, as if power was lost and came back."""
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                self._cut.set()
                self._child.kill()

    def run(self) -> int:
        previous = self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            self._restore_signal_handlers(previous)
            self._end_child()

    def _loop(self) -> int:
        while not self._stop.is_set():
            self.last_boot = bootloader.boot(self.device_dir)
            log.info(
                "booted slot %s%s", self.last_boot.slot, " (fell back)" if self.last_boot.fell_back else ""
            )
            vehicle.select_vehicle_bus(self.device_dir)  # the car drives as the booted firmware says
            code = self._run_agent()
            if self._stop.is_set():
                return 0
            if self._cut.is_set():
                self._cut.clear()
                self.power_cuts += 1
                log.info("power cut: booting again")
                continue
            if code != EXIT_REBOOT:
                return code if code >= 0 else 128 - code
            self.reboots += 1
            if self.reboots > self.max_reboots:
                log.error("more than %d reboots: giving up on this device", self.max_reboots)
                return 1
            log.info("agent asked for reboot #%d", self.reboots)
        return 0

    def _run_agent(self) -> int:
        child_env = dict(os.environ)
        if self.env is not None:
            child_env.update(self.env)
        out: IO[bytes] | None = self.log_path.open("ab") if self.log_path is not None else None
        try:
            with self._lock:
                if self._stop.is_set():
                    return 0
                self._child = subprocess.Popen(
                    self.agent_argv, env=child_env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            child = self._child
            stop_seen: float | None = None
            while True:
                try:
                    return child.wait(timeout=_POLL_S)
                except subprocess.TimeoutExpired:
                    if self._stop.is_set():
                        stop_seen = stop_seen or time.monotonic()
                        if time.monotonic() - stop_seen > self.stop_timeout_s:
                            child.kill()
        finally:
            if out is not None:
                out.close()

    def _end_child(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping the device", signum)
            self.stop()

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
