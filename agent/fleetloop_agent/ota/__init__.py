"""Over-the-air updates on the device: signed manifest, resumable download, A/B install, health, rollback.

``states`` is the pure transition table, ``journal`` makes each state durable before its side effect,
``download`` is the only HTTP client, ``platform`` is the device seen through slots and a boot
environment, ``image`` is the firmware header format, and ``driver`` ties them together.
"""

from fleetloop_agent.ota.driver import OtaDriver, OtaReport
from fleetloop_agent.ota.platform import EXIT_REBOOT, EnvFilePlatform, RebootRequested, SlotPlatform
from fleetloop_agent.ota.states import TERMINAL, OtaState

__all__ = [
    "EXIT_REBOOT",
    "TERMINAL",
    "EnvFilePlatform",
    "OtaDriver",
    "OtaReport",
    "OtaState",
    "RebootRequested",
    "SlotPlatform",
]
