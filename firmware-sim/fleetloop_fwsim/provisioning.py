"""Provision a simulated device: A/B slots with firmware, its signals, and the agent's config file.

The demo, the fleet harness and the tests all need "a device like one off the line": one place builds
it, so the config they run is the same shape an integrator writes (packaging/config/agent.yaml).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetloop_fwsim import bootloader, firmware, profiles, vehicle


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    directory: Path
    config_path: Path
    #: "recordings" or "simulated": where its signals come from.
    origin: str


def provision_sim_device(
    directory: Path,
    *,
    device_id: str,
    kind: str,
    hardware_id: str,
    cloud: Mapping[str, Any],
    trust_files: Sequence[Path],
    recordings: Path | None,
    firmware_version: str = "1.0.0",
    firmware_behaviour: str = firmware.DEFAULT_BEHAVIOUR,
    fleet: str = "default",
    labels: Mapping[str, str] | None = None,
    replay_speed: float = 1.0,
    heartbeat_s: float = 1.0,
    quota_mb: int = 64,
    health_check: bool = True,
    health_fail_versions: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    live: tuple[Sequence[Mapping[str, Any]], str] | None = None,
) -> SimDevice:
    """Write slot a (``firmware_version``), the boot env, the signals and ``agent.yaml`` into ``directory``.

    ``health_fail_versions`` simulates hardware on which those versions fail their self-test (the
    platform's health-check executable reads it from ``faults.json``). ``live``: the ``sources:`` entries
    reaching a running far side (:mod:`fleetloop_fwsim.far_side`) and what it plays, instead of replays.
    A simulated car (``kind`` car without ``recordings``) drives as its booted firmware says
    (:mod:`fleetloop_fwsim.vehicle`); ``firmware_behaviour`` is slot a's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    image = firmware.build_image(firmware_version, hardware_id, behaviour=firmware_behaviour)
    bootloader.provision(directory, image)
    if kind == "car" and recordings is None:
        vehicle.attach_vehicle_bus(directory, device_id)
    if health_fail_versions:
        (directory / "faults.json").write_text(
            json.dumps({"health_fail_versions": list(health_fail_versions)})
        )
    if live is not None:
        sources, origin = [dict(spec) for spec in live[0]], live[1]
    else:
        sources, origin = profiles.source_specs(kind, recordings, directory / "signals")
    p = bootloader.paths(directory)
    platform: dict[str, Any] = {
        "hardware_id": hardware_id,
        "slots": {"a": str(p["slot_a"]), "b": str(p["slot_b"])},
        "env": str(p["env"]),
        "booted_slot": str(p["booted_slot"]),
    }
    if health_check:
        platform["health_commands"] = [
            [sys.executable, "-m", "fleetloop_fwsim.selftest", "--device-dir", str(directory)]
        ]
    config: dict[str, Any] = {
        "device_id": device_id,
        "fleet": fleet,
        "labels": dict(labels or {"kind": kind}),
        "cloud": dict(cloud),
        "state_dir": str(directory / "data" / "state"),
        "store": {"dir": str(directory / "data" / "store"), "quota_mb": quota_mb},
        "replay": {"speed": replay_speed},
        "heartbeat_s": heartbeat_s,
        "sources": sources,
        "platform": platform,
        "trusted_release_keys": [str(f) for f in trust_files],
        **dict(extra or {}),
    }
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return SimDevice(device_id, directory, path, origin)
