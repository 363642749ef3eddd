"""Over-the-air updates on the device: TUF-verified jobs, resumable download, A/B install, health, rollback.

``states`` is the pure transition table, ``journal`` makes each state durable before its side effect,
``download`` is the only HTTP client, ``tuf_client`` verifies the image repository and the director with
python-tuf's ngclient, ``platform`` is the device seen through slots and a boot environment (a text env
file, or u-boot's own environment via ``UBootPlatform``), ``image`` is the firmware header format, and
``driver`` ties them together.
"""

from fleetloop_agent.ota.driver import OtaDriver, OtaReport
from fleetloop_agent.ota.platform import (
    EXIT_REBOOT,
    EnvFilePlatform,
    RebootRequested,
    SlotPlatform,
    UBootEnvStore,
    UBootPlatform,
)
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
    "UBootEnvStore",
    "UBootPlatform",
]
