"""A u-boot-like bootloader for the simulated device: A/B slots, boot counter, fallback.

It reads and writes the very files the agent's :class:`~fleetloop_agent.ota.platform.EnvFilePlatform`
uses (slot images, a ``fw_printenv``-format environment, the booted-slot file), so the agent's OTA path
runs against the same protocol a real device's bootloader speaks:

* ``upgrade_available=1`` means the slot in ``boot_slot`` is on trial: every boot increments ``bootcount``;
  past ``bootlimit`` the bootloader boots the other slot and ends the trial (``altbootcmd``).
* A slot that holds no valid image cannot boot; the other slot is tried (a failed kernel load).
* An unreadable environment is replaced by the default one, as u-boot does on a bad CRC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fleetloop_agent.ota.image import image_info
from fleetloop_agent.ota.platform import DEFAULT_BOOT_ENV, read_boot_env, write_boot_env
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import IntegrityError, NotFoundError, StateError

log = logging.getLogger(__name__)

SLOTS = ("a", "b")


@dataclass(frozen=True)
class BootResult:
    """Which slot came up, and whether that was the bootloader giving up on the other one."""

    slot: str
    fell_back: bool


def paths(device_dir: Path) -> dict[str, Path]:
    """The device's files: ``slot_a``, ``slot_b``, ``env``, ``booted_slot``, ``faults``."""
    return {
        "slot_a": device_dir / "slot_a.img",
        "slot_b": device_dir / "slot_b.img",
        "env": device_dir / "env",
        "booted_slot": device_dir / "booted_slot",
        "faults": device_dir / "faults.json",
    }


def slot_paths(device_dir: Path) -> dict[str, Path]:
    """Slot name → image file, the shape :class:`EnvFilePlatform` takes."""
    p = paths(device_dir)
    return {"a": p["slot_a"], "b": p["slot_b"]}


def provision(device_dir: Path, image: bytes, *, bootlimit: int = 2) -> None:
    """A factory-fresh device: ``image`` in slot a, slot b empty, the default environment.

    The booted-slot file says ``a`` too, as after the factory's first boot, so an agent can start on a
    provisioned device even before the first :func:`boot`.
    """
    if bootlimit < 0:
        raise StateError(f"bootlimit must be ≥ 0, got {bootlimit}")
    image_info(image)  # a device is provisioned with a bootable image or not at all
    p = paths(device_dir)
    device_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(p["slot_a"], image)
    write_atomically(p["slot_b"], b"")
    env = dict(DEFAULT_BOOT_ENV)
    env.update(boot_slot="a", upgrade_available="0", bootcount="0", bootlimit=str(bootlimit))
    write_boot_env(p["env"], env)
    write_atomically(p["booted_slot"], b"a\n")


def _other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def _count(value: str | None, default: int) -> int:
    return int(value) if value is not None and value.isdigit() else default


def _bootable(path: Path) -> bool:
    try:
        image_info(path.read_bytes())
    except (OSError, IntegrityError):
        return False
    return True


def boot(device_dir: Path) -> BootResult:
    """Power on: pick the slot as u-boot's bootcount logic would, record it, persist the environment."""
    p = paths(device_dir)
    if not p["slot_a"].exists() and not p["slot_b"].exists():
        raise NotFoundError(f"{device_dir}: not a provisioned device (no slot images)")
    try:
        env = read_boot_env(p["env"])
    except IntegrityError as exc:
        log.warning("%s; using the default environment", exc)
        env = dict(DEFAULT_BOOT_ENV)
    slot = env.get("boot_slot", "a")
    if slot not in SLOTS:
        log.warning("boot_slot=%r is not a slot; booting a", slot)
        slot = "a"
    fell_back = False
    if env.get("upgrade_available") == "1":
        count = _count(env.get("bootcount"), 0) + 1
        env["bootcount"] = str(count)
        if count > _count(env.get("bootlimit"), 2):
            log.warning("slot %s failed %d boots; falling back to slot %s", slot, count - 1, _other(slot))
            slot, fell_back = _other(slot), True
            env["upgrade_available"] = "0"
    slot_files = {"a": p["slot_a"], "b": p["slot_b"]}
    if not _bootable(slot_files[slot]):
        if not _bootable(slot_files[_other(slot)]):
            raise StateError(f"{device_dir}: neither slot holds a bootable image")
        log.warning("slot %s holds no bootable image; booting slot %s", slot, _other(slot))
        slot, fell_back = _other(slot), True
        env["upgrade_available"] = "0"
    env["boot_slot"] = slot
    write_boot_env(p["env"], env)
    write_atomically(p["booted_slot"], f"{slot}\n".encode())
    return BootResult(slot=slot, fell_back=fell_back)
