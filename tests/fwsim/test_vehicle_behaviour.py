"""The simulated car drives as its booted firmware says: harsh-braking firmware brakes harshly 4× as often.

Real parts throughout: images built by firmware-sim, devices provisioned the way the demo provisions
them, the bootloader and the device supervisor booting them, the agent's CAN replay source decoding the
bus through the DBC, and the agent's trigger engine running the campaigns.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from fleetloop_agent.ota.platform import EXIT_REBOOT, read_boot_env, write_boot_env
from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.sources import build_source
from fleetloop_agent.trigger_engine import TriggerEngine
from fleetloop_fwsim import firmware, profiles, vehicle
from fleetloop_fwsim.bootloader import boot, paths, slot_paths
from fleetloop_fwsim.device import DeviceSupervisor
from fleetloop_fwsim.provisioning import SimDevice, provision_sim_device
from fleetloop_fwsim.signals import VEHICLE_CYCLE_S
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import IntegrityError, UserError
from fleetloop_shared.rules import parse_campaign
from fleetloop_shared.update.firmware_image import pack_image

S = 1_000_000_000
START = 1_700_000_000 * S
HW = "sim-car"
SIZE = 256 * 1024
LOOP_S = vehicle.LOOP_CYCLES * VEHICLE_CYCLE_S


def provision(tmp_path: Path, device_id: str, behaviour: str = "default") -> SimDevice:
    return provision_sim_device(
        tmp_path / device_id,
        device_id=device_id,
        kind="car",
        hardware_id=HW,
        cloud={"grpc": "127.0.0.1:1"},
        trust_files=[],
        recordings=None,
        firmware_behaviour=behaviour,
        health_check=False,
    )


def fires(device: SimDevice, seconds: float) -> dict[str, list[float]]:
    """Replay ``seconds`` of the device's bus from its agent.yaml through the agent's source and trigger
    engine; the seconds (since start) at which each campaign fired."""
    config = yaml.safe_load(device.config_path.read_text())
    source = build_source(config["sources"][0], base_dir=device.directory, start_ns=START)
    catalog = Catalog()
    source.declare(catalog)
    specs = [
        parse_campaign(profiles.hard_braking_campaign(), "hard-braking.yaml"),
        parse_campaign(profiles.default_campaign("car"), "car.yaml"),
    ]
    engine = TriggerEngine(catalog)
    assert engine.set_campaigns(specs, START) == {}
    buffers = RingBuffers(catalog, horizon_ns=engine.required_horizon_ns())
    out: dict[str, list[float]] = {s.name: [] for s in specs}
    step = 5 * S
    for until in range(START + step, START + int(seconds * S) + 1, step):
        batches = source.read(until)
        for batch in batches:
            buffers.append(batch)
        for fire in engine.process(batches, buffers):
            out[fire.campaign].append((fire.t_ns - START) / S)
    return out


def test_images_carry_their_behaviour_and_the_default_image_is_unchanged() -> None:
    plain = firmware.build_image("2.0.0", HW, size_hint=SIZE, variant=1)
    assert firmware.build_image("2.0.0", HW, size_hint=SIZE, variant=1, behaviour="default") == plain
    harsh = firmware.build_image("2.0.0", HW, size_hint=SIZE, variant=1, behaviour="harsh-braking")
    assert firmware.image_info(harsh) == firmware.image_info(plain)  # same version and hardware
    assert "BEHAVIOUR" not in firmware.release_fields(plain)
    assert firmware.release_fields(harsh)["BEHAVIOUR"] == "harsh-braking"
    assert (vehicle.image_behaviour(plain), vehicle.image_behaviour(harsh)) == ("default", "harsh-braking")
    with pytest.raises(UserError, match=r"firmware behaviour must be one of .*, got 'harsh_braking'"):
        firmware.build_image("2.0.0", HW, size_hint=SIZE, behaviour="harsh_braking")


def test_an_unreadable_behaviour_drives_the_default_way() -> None:
    harsh = firmware.build_image("2.0.0", HW, size_hint=SIZE, behaviour="harsh-braking")
    mangled = bytearray(harsh)  # the header stays valid: the bootloader boots it
    start = harsh.index(b"etc/fleetloop-release")
    mangled[start : start + 3] = b"xyz"  # the tar header's checksum no longer matches
    with pytest.raises(IntegrityError, match="not a tar"):
        firmware.release_fields(bytes(mangled))
    assert vehicle.image_behaviour(bytes(mangled)) == "default"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("usr/bin/tool")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    foreign = pack_image("2.0.0", HW, buf.getvalue())  # an image this simulator did not build
    with pytest.raises(IntegrityError, match="no etc/fleetloop-release first"):
        firmware.release_fields(foreign)
    assert vehicle.image_behaviour(foreign) == "default"
    with pytest.raises(IntegrityError, match="truncated"):
        firmware.release_fields(harsh[: len(harsh) // 2])
    unknown = harsh.replace(b"BEHAVIOUR=harsh-braking", b"BEHAVIOUR=drift-mode-xx")
    assert firmware.release_fields(unknown)["BEHAVIOUR"] == "drift-mode-xx"
    assert vehicle.image_behaviour(unknown) == "default"


def test_harsh_cycles_spread_over_the_loop_from_the_device_phase() -> None:
    assert vehicle.harsh_cycles("default", 2) == (2,)
    assert vehicle.harsh_cycles("harsh-braking", 3) == tuple(range(vehicle.LOOP_CYCLES))
    assert vehicle.HARSH_BRAKING_FACTOR == 4.0
    assert vehicle.VEHICLE_BEHAVIOURS["default"].harsh_brakes_per_hour == 15.0


def test_two_cars_on_each_image_over_the_same_time_differ_by_the_stated_factor(tmp_path: Path) -> None:
    cars = {b: provision(tmp_path, f"car-{b}", b) for b in ("default", "harsh-braking")}
    loops = 2
    seen = {b: fires(car, loops * LOOP_S) for b, car in cars.items()}
    hard = {b: len(f["hard-braking"]) for b, f in seen.items()}
    # exactly the behaviour's harsh brakes per loop, every loop
    assert hard == {b: loops * vehicle.VEHICLE_BEHAVIOURS[b].harsh_brakes_per_loop for b in cars}
    assert hard["harsh-braking"] / hard["default"] == vehicle.HARSH_BRAKING_FACTOR
    # each hard brake is the brake at ~29 s of its cycle
    for times in (f["hard-braking"] for f in seen.values()):
        assert all(28.9 < t % VEHICLE_CYCLE_S < 30.0 for t in times), times
    # the ordinary campaign sees every brake, harsh or not, once per cycle on both cars: nothing else moved
    cycles = loops * vehicle.LOOP_CYCLES
    assert {b: len(f["harsh-braking"]) for b, f in seen.items()} == {b: cycles for b in cars}


def test_a_fleet_does_not_brake_harshly_in_unison(tmp_path: Path) -> None:
    """Default drives differ only in which cycle of the loop brakes harshly (the test above counts one
    per loop), fixed by the device id: a fleet started at once spreads its harsh brakes over the loop."""
    drives = set()
    for i in range(8):
        bus = provision(tmp_path, f"car-{i:02d}").directory / "signals" / "vehicle_can"
        drives.add(hashlib.sha256((bus / "data").read_bytes()).hexdigest())
    assert len(drives) >= 3


def test_provisioning_links_the_bus_to_the_booted_behaviour(tmp_path: Path) -> None:
    car = provision(tmp_path, "car-1", "harsh-braking")
    bus = car.directory / "signals" / "vehicle_can"
    assert bus.is_symlink() and os.readlink(bus) == "vehicle_can.harsh-braking"
    config = yaml.safe_load(car.config_path.read_text())
    assert Path(config["sources"][0]["frames"]) == bus and config["sources"][0]["origin"] == "simulated"
    # a robot's and a recorded car's signals are not the firmware's to change
    robot = provision_sim_device(
        tmp_path / "robot", device_id="robot-1", kind="robot", hardware_id=HW, cloud={},
        trust_files=[], recordings=None, health_check=False,
    )  # fmt: skip
    assert vehicle.select_vehicle_bus(robot.directory) is None


def _agent_script(log: Path, update: Path) -> list[str]:
    """A stand-in agent: records the bus it was booted with; on the first boot installs ``update`` into
    slot b and reboots into it (as the OTA driver does), on the second rolls back (as a failed health
    check does), on the third stops."""
    script = f"""
import os, pathlib, sys
from fleetloop_agent.ota.platform import read_boot_env, write_boot_env
d = pathlib.Path(sys.argv[1])
log = pathlib.Path({str(log)!r})
runs = log.read_text().splitlines() if log.exists() else []
slot = (d / "booted_slot").read_text().strip()
with log.open("a") as f:
    f.write(slot + " " + os.readlink(d / "signals" / "vehicle_can") + "\\n")
env = read_boot_env(d / "env")
if len(runs) == 0:
    (d / "slot_b.img").write_bytes(pathlib.Path({str(update)!r}).read_bytes())
    env.update(boot_slot="b", upgrade_available="1", bootcount="0")
elif len(runs) == 1:
    env.update(boot_slot="a", upgrade_available="0", bootcount="0")
else:
    sys.exit(0)
write_boot_env(d / "env", env)
sys.exit({EXIT_REBOOT})
"""
    return [sys.executable, "-c", script]


def test_the_behaviour_follows_the_slot_through_an_ota_install_and_a_rollback(tmp_path: Path) -> None:
    car = provision(tmp_path, "car-ota")
    update = tmp_path / "v2-harsh.img"
    update.write_bytes(firmware.build_image("2.0.0", HW, variant=1, behaviour="harsh-braking"))
    log = tmp_path / "boots.log"
    supervisor = DeviceSupervisor(car.directory, [*_agent_script(log, update), str(car.directory)])
    assert supervisor.run() == 0 and supervisor.reboots == 2
    assert log.read_text().splitlines() == [
        "a vehicle_can.default",
        "b vehicle_can.harsh-braking",
        "a vehicle_can.default",
    ]
    # and the bus it points at now is the default drive again: one harsh brake per loop
    assert len(fires(car, LOOP_S)["hard-braking"]) == 1


def test_a_bootloader_fallback_brings_the_default_drive_back(tmp_path: Path) -> None:
    car = provision(tmp_path, "car-fallback")
    d = car.directory
    slot_paths(d)["b"].write_bytes(firmware.build_image("2.0.0", HW, variant=1, behaviour="harsh-braking"))
    env = read_boot_env(paths(d)["env"])
    env.update(boot_slot="b", upgrade_available="1", bootcount="0", bootlimit="1")
    write_boot_env(paths(d)["env"], env)
    boots = []
    for _ in range(3):  # trial boot, the boot that exceeds the limit and falls back, a normal boot
        result = boot(d)
        boots.append((result.slot, vehicle.select_vehicle_bus(d)))
    assert boots == [("b", "harsh-braking"), ("a", "default"), ("a", "default")]
    assert len(fires(car, LOOP_S)["hard-braking"]) == 1
