"""The device as the OTA driver sees it: two slots (A/B), a boot environment, reboot, health checks.

The agent never knows whether it runs on the simulator or on a real Linux device; it talks to a
:class:`SlotPlatform`. :class:`EnvFilePlatform` is a real implementation over plain files: two slot files
(or block devices), a boot environment in ``fw_printenv`` format (``key=value`` lines, the variables
u-boot's bootcount feature uses), and a file in which the bootloader records which slot it booted. The
simulator's bootloader reads and writes exactly these files.

Boot protocol (u-boot ``bootcount``/``altbootcmd`` style): ``set_next_boot`` points ``boot_slot`` at the
new slot with ``upgrade_available=1`` and ``bootcount=0``; each boot with ``upgrade_available=1``
increments ``bootcount``, and past ``bootlimit`` the bootloader boots the other slot instead. ``commit``
clears ``upgrade_available``, so the new slot stays.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn, Protocol

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import ConfigError, IntegrityError, NotFoundError, StateError

log = logging.getLogger(__name__)

#: The agent process exits with this code to ask its supervisor (systemd, the simulator) for a reboot.
EXIT_REBOOT = 10

#: Variables of the boot environment and their values when the file does not set them.
DEFAULT_BOOT_ENV: Mapping[str, str] = {
    "boot_slot": "a",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "2",
}
#: A boot environment is a handful of lines; a bigger file is not one.
MAX_ENV_BYTES = 64 * 1024
#: How much of a failing health check's output makes it into the one-line reason.
HEALTH_OUTPUT_TAIL = 4096
MAX_REASON_CHARS = 300


class RebootRequested(Exception):
    """Raised by :meth:`SlotPlatform.reboot`: unwind to the top and exit with :data:`EXIT_REBOOT`."""


class SlotPlatform(Protocol):
    def booted_slot(self) -> str: ...
    def other_slot(self) -> str: ...
    def slot_image(self, slot: str) -> bytes: ...
    def write_slot(self, slot: str, data: bytes) -> None: ...
    def boot_env(self) -> dict[str, str]: ...
    def set_next_boot(self, slot: str) -> None: ...
    def commit(self) -> None: ...
    def reboot(self) -> NoReturn: ...
    def run_health_checks(self) -> list[str]: ...


def read_boot_env(path: Path) -> dict[str, str]:
    """The boot environment in ``path`` (fw_printenv format) over the defaults.

    A missing file is the default environment; a malformed one raises IntegrityError naming the line.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_ENV_BYTES + 1)
    except FileNotFoundError:
        return dict(DEFAULT_BOOT_ENV)
    if len(raw) > MAX_ENV_BYTES:
        raise IntegrityError(f"{path}: boot environment larger than {MAX_ENV_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"{path}: boot environment is not UTF-8 text") from None
    env = dict(DEFAULT_BOOT_ENV)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or key != key.strip():
            raise IntegrityError(f"{path}:{lineno}: not a key=value line")
        env[key] = value
    return env


def write_boot_env(path: Path, env: Mapping[str, str]) -> None:
    """Write the whole boot environment atomically (a torn env must never decide what boots)."""
    for key, value in env.items():
        if not key or "=" in key or "\n" in key or "\n" in value:
            raise ConfigError(f"boot environment variable {key!r}={value!r} cannot be written")
    text = "".join(f"{k}={env[k]}\n" for k in sorted(env))
    write_atomically(path, text.encode("utf-8"))


def env_int(env: Mapping[str, str], key: str) -> int:
    """An integer boot variable; IntegrityError if it is not one."""
    value = env.get(key, DEFAULT_BOOT_ENV.get(key, ""))
    if not value.isdigit():
        raise IntegrityError(f"boot environment variable {key}={value!r} is not a non-negative integer")
    return int(value)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` squeezed onto one line of at most ``limit`` characters (reasons travel in reports)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class EnvFilePlatform:
    """Slots and boot environment as files; health checks as executables (exit 0 = healthy)."""

    def __init__(
        self,
        slot_paths: Mapping[str, Path],
        env_path: Path,
        booted_slot_path: Path,
        health_commands: Sequence[Sequence[str]] = (),
        health_timeout_s: float = 10,
    ) -> None:
        if len(slot_paths) != 2:
            raise ConfigError(f"an A/B platform needs exactly two slots, got {sorted(slot_paths)}")
        self.slot_paths = {name: Path(p) for name, p in slot_paths.items()}
        self.env_path = Path(env_path)
        self.booted_slot_path = Path(booted_slot_path)
        self.health_commands = [list(c) for c in health_commands]
        self.health_timeout_s = health_timeout_s

    def _slot_path(self, slot: str) -> Path:
        try:
            return self.slot_paths[slot]
        except KeyError:
            raise StateError(
                f"no slot {slot!r}; the slots are {', '.join(sorted(self.slot_paths))}"
            ) from None

    def booted_slot(self) -> str:
        try:
            slot = self.booted_slot_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise NotFoundError(
                f"{self.booted_slot_path}: the bootloader has not recorded a booted slot"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"{self.booted_slot_path}: unreadable booted-slot file ({exc})") from None
        if slot not in self.slot_paths:
            raise IntegrityError(f"{self.booted_slot_path}: booted slot {slot!r} is not one of the slots")
        return slot

    def other_slot(self) -> str:
        booted = self.booted_slot()
        return next(s for s in sorted(self.slot_paths) if s != booted)

    def slot_image(self, slot: str) -> bytes:
        path = self._slot_path(slot)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""

    def write_slot(self, slot: str, data: bytes) -> None:
        """Overwrite the slot in place and fsync (a block device cannot be renamed into place)."""
        if slot == self.booted_slot():
            raise StateError(f"refusing to write slot {slot}: it is the running slot")
        path = self._slot_path(slot)
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def boot_env(self) -> dict[str, str]:
        return read_boot_env(self.env_path)

    def set_next_boot(self, slot: str) -> None:
        self._slot_path(slot)
        env = self.boot_env()
        env.update(boot_slot=slot, upgrade_available="1", bootcount="0")
        write_boot_env(self.env_path, env)

    def commit(self) -> None:
        env = self.boot_env()
        env.update(boot_slot=self.booted_slot(), upgrade_available="0", bootcount="0")
        write_boot_env(self.env_path, env)

    def reboot(self) -> NoReturn:
        raise RebootRequested("reboot requested by the OTA driver")

    def run_health_checks(self) -> list[str]:
        """One line per failing check: exit status, timeout or missing executable, with its last output."""
        failures = []
        for argv in self.health_commands:
            failure = self._run_check(argv)
            if failure:
                failures.append(failure)
        return failures

    def _run_check(self, argv: Sequence[str]) -> str | None:
        if not argv:
            return "empty health check command"
        name = _check_name(argv)
        with tempfile.TemporaryFile() as output:
            try:
                proc = subprocess.run(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=self.health_timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return f"health check {name} timed out after {self.health_timeout_s:g} s"
            except OSError as exc:
                return f"health check {name} could not run: {exc.strerror or exc}"
            if proc.returncode == 0:
                return None
            size = output.seek(0, os.SEEK_END)
            output.seek(max(0, size - HEALTH_OUTPUT_TAIL))
            tail = output.read().decode("utf-8", "replace").strip().splitlines()
        last = tail[-1] if tail else ""
        return one_line(f"health check {name} exited {proc.returncode}" + (f": {last}" if last else ""))


def _check_name(argv: Sequence[str]) -> str:
    """A short name for a check: the executable, or the module for ``python -m module``."""
    if len(argv) >= 3 and argv[1] == "-m":
        return argv[2]
    return Path(argv[0]).name
