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
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, NoReturn, Protocol

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import ConfigError, IntegrityError, NotFoundError, StateError, StorageFullError

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

    def slot_path(self, slot: str) -> Path: ...

    def open_slot_writer(self, slot: str) -> AbstractContextManager[BinaryIO]: ...
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
        with self.open_slot_writer(slot) as f:
            f.write(data)

    def slot_path(self, slot: str) -> Path:
        return self._slot_path(slot)

    @contextmanager
    def open_slot_writer(self, slot: str) -> Iterator[BinaryIO]:
        """The inactive slot opened for a streaming overwrite; truncated, flushed and fsynced on success.

        Refuses the running slot. A power cut mid-write leaves a torn inactive slot, which nothing boots:
        the journal restarts the install from the verified payload.
        """
        if slot == self.booted_slot():
            raise StateError(f"refusing to write slot {slot}: it is the running slot")
        path = self._slot_path(slot)
        with path.open("r+b" if path.is_file() else "wb") as f:
            yield f
            f.truncate()
            f.flush()
            os.fsync(f.fileno())

    def boot_env(self) -> dict[str, str]:
        return self._read_env()

    def set_next_boot(self, slot: str) -> None:
        self._slot_path(slot)
        env = self.boot_env()
        env.update(boot_slot=slot, upgrade_available="1", bootcount="0")
        self._write_env(env)

    def commit(self) -> None:
        env = self.boot_env()
        env.update(boot_slot=self.booted_slot(), upgrade_available="0", bootcount="0")
        self._write_env(env)

    def _read_env(self) -> dict[str, str]:
        return read_boot_env(self.env_path)

    def _write_env(self, env: Mapping[str, str]) -> None:
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


# -- u-boot's own environment format (what fw_printenv / fw_setenv read and write) --------------------

#: Where a u-boot environment says no more variables follow.
_UBOOT_END = b"\x00\x00"


class UBootEnvStore:
    """u-boot's binary environment: CRC32 (little-endian) of the data area, then ``key=value`` entries,
    each NUL-terminated, a second NUL after the last, padded with NULs to ``size`` bytes.

    This is the layout ``fw_printenv``/``fw_setenv`` (libubootenv; u-boot-tools on older distributions)
    and u-boot itself use for a single-copy environment at ``offset`` of ``device`` (a file, an MTD or an
    eMMC partition). The agent reads and writes it natively so a multi-variable change (``boot_slot`` +
    ``upgrade_available`` + ``bootcount``) is one write: a regular file is replaced atomically (tmp,
    fsync, rename); a device is written in place and fsynced (real boards use u-boot's redundant
    environment for atomicity, which this adapter does not implement yet). A bad CRC is an
    :class:`IntegrityError`, never a guess.
    """

    def __init__(self, device: Path, *, offset: int = 0, size: int = 0x4000) -> None:
        if size < 16 or size > 1 << 20 or offset < 0:
            raise ConfigError(f"u-boot env size {size} / offset {offset} is not plausible")
        self.device = Path(device)
        self.offset = offset
        self.size = size

    @classmethod
    def from_fw_env_config(cls, config: Path) -> UBootEnvStore:
        """The first environment of an ``/etc/fw_env.config`` (``device offset size [sector]`` lines)."""
        try:
            text = config.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{config}: cannot read: {exc.strerror or exc}") from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) < 3:
                raise ConfigError(f"{config}:{lineno}: expected 'device offset size'")
            try:
                return cls(Path(fields[0]), offset=int(fields[1], 0), size=int(fields[2], 0))
            except ValueError:
                raise ConfigError(f"{config}:{lineno}: offset and size must be numbers") from None
        raise ConfigError(f"{config}: no environment device configured")

    def read(self) -> dict[str, str]:
        try:
            with self.device.open("rb") as f:
                f.seek(self.offset)
                raw = f.read(self.size)
        except FileNotFoundError:
            raise NotFoundError(f"{self.device}: no u-boot environment") from None
        if len(raw) != self.size:
            raise IntegrityError(f"{self.device}: u-boot environment shorter than {self.size} bytes")
        crc, data = int.from_bytes(raw[:4], "little"), raw[4:]
        if zlib.crc32(data) != crc:
            raise IntegrityError(f"{self.device}: u-boot environment CRC mismatch (torn or never written)")
        env: dict[str, str] = {}
        end = data.find(_UBOOT_END)
        body = data[: end if end >= 0 else len(data)]
        for i, entry in enumerate(body.split(b"\x00")):
            if not entry:
                continue
            key, sep, value = entry.partition(b"=")
            if not sep or not key:
                raise IntegrityError(f"{self.device}: u-boot environment entry {i + 1} is not key=value")
            try:
                env[key.decode("utf-8")] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise IntegrityError(
                    f"{self.device}: u-boot environment entry {i + 1} is not UTF-8"
                ) from None
        return env

    def write(self, env: Mapping[str, str]) -> None:
        for key, value in env.items():
            if not key or "=" in key or "\x00" in key + value or "\n" in key:
                raise ConfigError(f"u-boot variable {key!r}={value!r} cannot be written")
        body = b"".join(f"{k}={env[k]}".encode() + b"\x00" for k in sorted(env)) + b"\x00"
        if len(body) > self.size - 4:
            raise StorageFullError(
                f"u-boot environment needs {len(body)} bytes, the area has {self.size - 4}"
            )
        data = body + b"\x00" * (self.size - 4 - len(body))
        image = zlib.crc32(data).to_bytes(4, "little") + data
        if self.offset == 0 and (not self.device.exists() or self.device.is_file()):
            existing = self.device.stat().st_size if self.device.exists() else 0
            if existing <= self.size:
                write_atomically(self.device, image)
                return
        with self.device.open("r+b") as f:
            f.seek(self.offset)
            f.write(image)
            f.flush()
            os.fsync(f.fileno())


class UBootPlatform(EnvFilePlatform):
    """:class:`EnvFilePlatform` whose boot environment is u-boot's own (``fw_env.config``), not text.

    The variables and the protocol are the same (``boot_slot``, ``upgrade_available``, ``bootcount``,
    ``bootlimit``); u-boot's bootcount feature and an ``altbootcmd`` that switches ``boot_slot`` do the
    fallback on a real board. Unset variables read as :data:`DEFAULT_BOOT_ENV`.
    """

    def __init__(
        self,
        slot_paths: Mapping[str, Path],
        env: UBootEnvStore,
        booted_slot_path: Path,
        health_commands: Sequence[Sequence[str]] = (),
        health_timeout_s: float = 10,
    ) -> None:
        super().__init__(slot_paths, env.device, booted_slot_path, health_commands, health_timeout_s)
        self.env_store = env

    def _read_env(self) -> dict[str, str]:
        return {**DEFAULT_BOOT_ENV, **self.env_store.read()}

    def _write_env(self, env: Mapping[str, str]) -> None:
        self.env_store.write(env)
