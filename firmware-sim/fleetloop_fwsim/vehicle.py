"""The simulated car drives as the firmware it booted tells it to.

A release can install fine and still change what the machine does: a new brake controller that brakes
harshly more often. To show a rollout catching that from the fleet's own data, the simulated car's bus
depends on the image in the booted slot — nothing else: the image's release file names its behaviour
(:func:`fleetloop_fwsim.firmware.build_image` ``behaviour=``), and at every boot
:func:`select_vehicle_bus` points the car's bus at the drive of that behaviour. An OTA update, a
bootloader fallback or a rollback therefore changes the car exactly when it changes the firmware.

The drive is a loop of :data:`LOOP_CYCLES` one-minute cycles (:mod:`fleetloop_fwsim.signals`): pull away,
cruise, brake at 29 s, stop. In some cycles the brake at 29 s is a harsh one (−8 m/s², 17 km/h lost
within a second — what ``delta(Vehicle.Speed, 1s) < -15`` catches; the ordinary brake loses 12.6):

========================  ============================  ====================================
behaviour                 harsh brakes per 4-min loop   harsh-brake rate per hour of driving
========================  ============================  ====================================
``default``               1                             15
``harsh-braking``         4 (every cycle)               60  (:data:`HARSH_BRAKING_FACTOR` = 4×)
========================  ============================  ====================================

Every loop holds exactly that many, so over any whole number of loops the rates are exact; a device's
harsh cycle within the loop is fixed by its id (:func:`attach_vehicle_bus`), so a fleet started at once
does not brake harshly in unison. Every other cycle, and every other signal outside the brake, is the
ordinary drive — the default campaign (``delta(Vehicle.Speed, 2s) < -3``) fires once per cycle on both.
Only simulated cars have this: a car replaying the real recordings drives as recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleetloop_fwsim.bootloader import paths, slot_paths
from fleetloop_fwsim.firmware import BEHAVIOURS, DEFAULT_BEHAVIOUR, release_fields
from fleetloop_fwsim.signals import VEHICLE_CYCLE_S, generate_vehicle_can
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import IntegrityError

log = logging.getLogger(__name__)

#: One-minute drive cycles in the car's loop.
LOOP_CYCLES: Final = 4
#: The car's bus, as the agent's config names it (a link to the drive of the booted behaviour).
BUS_LINK: Final = "vehicle_can"
#: Marks a car whose bus the firmware drives, and fixes its harsh cycle.
_MARKER: Final = "vehicle.json"
#: The noise and timing jitter of every car's drive (cars differ by their harsh cycle, not their noise,
#: so one process generates each distinct drive once however many cars it provisions).
_DRIVE_SEED: Final = 1
_FRAME_FILES: Final = ("t", "address", "src", "data")


@dataclass(frozen=True)
class Behaviour:
    """What one firmware behaviour does to the drive."""

    name: str
    #: Cycles of the :data:`LOOP_CYCLES` whose brake at 29 s is the harsh one.
    harsh_brakes_per_loop: int
    summary: str

    @property
    def harsh_brakes_per_hour(self) -> float:
        return self.harsh_brakes_per_loop * 3600.0 / (LOOP_CYCLES * VEHICLE_CYCLE_S)


VEHICLE_BEHAVIOURS: Final = {
    b.name: b
    for b in (
        Behaviour(DEFAULT_BEHAVIOUR, 1, "a harsh brake in one drive cycle of four"),
        Behaviour("harsh-braking", LOOP_CYCLES, "a brake controller that brakes harshly in every cycle"),
    )
}
assert set(VEHICLE_BEHAVIOURS) == set(BEHAVIOURS), "every firmware behaviour needs a drive"
#: How much more often the ``harsh-braking`` firmware brakes harshly than the default firmware.
HARSH_BRAKING_FACTOR: Final = (
    VEHICLE_BEHAVIOURS["harsh-braking"].harsh_brakes_per_hour
    / VEHICLE_BEHAVIOURS[DEFAULT_BEHAVIOUR].harsh_brakes_per_hour
)


def image_behaviour(image: bytes) -> str:
    """The behaviour an image declares: ``default`` when it declares none, or one this simulator does
    not know (logged), or when its body is not readable (logged; the bootloader checked the header)."""
    try:
        name = release_fields(image).get("BEHAVIOUR", DEFAULT_BEHAVIOUR)
    except IntegrityError as exc:
        log.warning("firmware behaviour unreadable (%s); driving the default way", exc)
        return DEFAULT_BEHAVIOUR
    if name not in VEHICLE_BEHAVIOURS:
        log.warning("firmware declares unknown behaviour %r; driving the default way", name)
        return DEFAULT_BEHAVIOUR
    return name


def booted_behaviour(device_dir: Path) -> str:
    """The behaviour of the image in the slot the bootloader last booted (``booted_slot``)."""
    slot = paths(device_dir)["booted_slot"].read_text(encoding="utf-8").strip()
    slots = slot_paths(device_dir)
    if slot not in slots:
        raise IntegrityError(f"{device_dir}: booted slot {slot!r} is not a slot")
    return image_behaviour(slots[slot].read_bytes())


def harsh_cycles(behaviour: str, phase: int) -> tuple[int, ...]:
    """The loop's cycles with a harsh brake: spread evenly, starting at the device's ``phase``."""
    count = VEHICLE_BEHAVIOURS[behaviour].harsh_brakes_per_loop
    return tuple(sorted({(phase + i * LOOP_CYCLES // count) % LOOP_CYCLES for i in range(count)}))


def _signals_dir(device_dir: Path) -> Path:
    return device_dir / "signals"


def attach_vehicle_bus(device_dir: Path, device_id: str) -> Path:
    """Make ``device_dir``'s car bus follow its firmware, and select the drive of the slot booted now.

    Returns the bus path for the agent's ``can_replay`` source (a link the next boots re-point). The
    device's harsh cycle within the loop comes from ``device_id``, so it is the same on every boot.
    """
    signals = _signals_dir(device_dir)
    signals.mkdir(parents=True, exist_ok=True)
    phase = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "little") % LOOP_CYCLES
    write_atomically(signals / _MARKER, json.dumps({"device_id": device_id, "phase": phase}).encode())
    select_vehicle_bus(device_dir)
    return signals / BUS_LINK


def _phase(marker: Path) -> int:
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        phase = doc["phase"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{marker}: unreadable ({exc})") from None
    if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < LOOP_CYCLES:
        raise IntegrityError(f"{marker}: phase must be a whole number below {LOOP_CYCLES}, got {phase!r}")
    return phase


def select_vehicle_bus(device_dir: Path) -> str | None:
    """At boot: point the car's bus at the drive of the booted image's behaviour (generated the first
    time it is needed, ~2 s). Returns the behaviour, or None for a device whose bus no firmware drives
    (a robot, a PLC, a car replaying the real recordings)."""
    signals = _signals_dir(device_dir)
    marker = signals / _MARKER
    if not marker.is_file():
        return None
    phase = _phase(marker)
    behaviour = booted_behaviour(device_dir)
    drive = signals / f"{BUS_LINK}.{behaviour}"
    if not all((drive / name).is_file() for name in _FRAME_FILES):
        generate_vehicle_can(
            drive,
            seconds=LOOP_CYCLES * VEHICLE_CYCLE_S,
            seed=_DRIVE_SEED,
            harsh_brake_cycles=harsh_cycles(behaviour, phase),
        )
    link = signals / BUS_LINK
    if link.is_dir() and not link.is_symlink():  # a bus generated before the firmware drove it
        shutil.rmtree(link)
    if not (link.is_symlink() and os.readlink(link) == drive.name):
        staged = signals / f".{BUS_LINK}.link"
        staged.unlink(missing_ok=True)
        staged.symlink_to(drive.name, target_is_directory=True)
        os.replace(staged, link)  # atomic: the agent never sees the bus missing
    log.info("vehicle drives as firmware behaviour %r", behaviour)
    return behaviour
