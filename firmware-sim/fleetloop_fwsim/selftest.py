"""The simulated device's custom health check: ``python -m fleetloop_fwsim.selftest --device-dir D``.

Real devices ship a health check executable that knows whether the new firmware works on this hardware
(a driver probes, a sensor answers). Here the device's ``faults.json`` says which versions "do not work"
on it (``{"health_fail_versions": ["2.0.0"]}``), so tests and demos can make an update fail its health
check on chosen devices and watch the rollback.

Exit 0: healthy. Exit 1: unhealthy, one line on stderr says why. Exit 2: the device directory itself is
broken (bad ``faults.json``), also one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fleetloop_agent.ota.image import image_info
from fleetloop_fwsim.bootloader import paths, slot_paths
from fleetloop_shared.errors import ConfigError, IntegrityError

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_BROKEN_SETUP = 2
MAX_FAULTS_BYTES = 64 * 1024


def faulty_versions(device_dir: Path) -> set[str]:
    """Versions listed in ``faults.json`` (none when the file is absent); ConfigError if it is malformed."""
    path = paths(device_dir)["faults"]
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FAULTS_BYTES + 1)
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if len(raw) > MAX_FAULTS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FAULTS_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    versions = doc.get("health_fail_versions", []) if isinstance(doc, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise ConfigError(f'{path}: expected {{"health_fail_versions": ["<version>", ...]}}')
    return set(versions)


def check(device_dir: Path) -> str | None:
    """Why the running firmware is unhealthy on this device, or None when it is healthy."""
    booted_file = paths(device_dir)["booted_slot"]
    try:
        slot = booted_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return f"{booted_file}: the bootloader recorded no booted slot"
    slots = slot_paths(device_dir)
    if slot not in slots:
        return f"{booted_file}: booted slot {slot!r} is not a slot"
    try:
        info = image_info(slots[slot].read_bytes())
    except (OSError, IntegrityError) as exc:
        return f"slot {slot} holds no valid firmware image: {exc}"
    if info.version in faulty_versions(device_dir):
        return f"firmware {info.version} in slot {slot} does not work on this device (listed in faults.json)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleetloop_fwsim.selftest", description="Health check of a simulated device."
    )
    parser.add_argument("--device-dir", type=Path, required=True, help="the simulated device's directory")
    args = parser.parse_args(argv)
    try:
        reason = check(args.device_dir)
    except ConfigError as exc:
        print(f"selftest: {exc}", file=sys.stderr)
        return EXIT_BROKEN_SETUP
    if reason:
        print(f"selftest: {reason}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_HEALTHY


if __name__ == "__main__":
    sys.exit(main())
