"""The OTA job's life as a transition table: pure data and functions, no I/O.

Keeping the whole life cycle in one table (rather than in the driver's control flow) makes it reviewable
at a glance, testable by property tests, and the same table tells the driver where to continue after a
power cut (:data:`RESUME`). The driver journals every state before the side effect that follows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from fleetloop_shared.errors import StateError


class OtaState(StrEnum):
    """States of one OTA job on the device; names match the wire's ``OTA_STATE_*``."""

    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    DOWNLOADED = "DOWNLOADED"
    VERIFIED = "VERIFIED"
    INSTALLING = "INSTALLING"
    REBOOTING = "REBOOTING"
    HEALTH_CHECK = "HEALTH_CHECK"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"


S = OtaState

TERMINAL: frozenset[OtaState] = frozenset({S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.REJECTED, S.CANCELED})

#: States in which the device has not committed to installing yet (nothing written to the inactive slot
#: or the bundle store): a job the cloud withdraws is dropped there. From INSTALLING on, the job finishes
#: or rolls back as the table says.
CANCELABLE: frozenset[OtaState] = frozenset({S.QUEUED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFIED})

_TABLE: dict[tuple[OtaState, str], OtaState] = {
    (S.QUEUED, "start"): S.DOWNLOADING,
    (S.QUEUED, "reject"): S.REJECTED,
    (S.DOWNLOADING, "downloaded"): S.DOWNLOADED,
    (S.DOWNLOADED, "verified"): S.VERIFIED,
    (S.VERIFIED, "install"): S.INSTALLING,
    (S.INSTALLING, "installed"): S.REBOOTING,
    # a bundle (software, model pack, catalog, config) is switched to atomically: no reboot, done
    (S.INSTALLING, "swapped"): S.COMMITTED,
    # after the reboot: the new slot came up, or the bootloader gave up on it and booted the old one
    (S.REBOOTING, "booted"): S.HEALTH_CHECK,
    (S.REBOOTING, "fell_back"): S.ROLLED_BACK,
    (S.HEALTH_CHECK, "healthy"): S.COMMITTED,
    # unhealthy: reboot again without committing; the bootloader's counter eventually falls back
    (S.HEALTH_CHECK, "unhealthy"): S.REBOOTING,
    (S.HEALTH_CHECK, "fell_back"): S.ROLLED_BACK,
}
for _state in S:
    if _state not in TERMINAL:
        _TABLE[(_state, "fail")] = S.FAILED
for _state in CANCELABLE:
    _TABLE[(_state, "cancel")] = S.CANCELED

#: (state, event) -> next state: the whole life cycle. Anything not here is a bug or a hostile request.
TRANSITIONS: Mapping[tuple[OtaState, str], OtaState] = MappingProxyType(_TABLE)

#: Every event the table knows.
EVENTS: frozenset[str] = frozenset(event for _, event in _TABLE)

#: After a power loss in state S, continue in RESUME[S]:
#: a download resumes with an HTTP Range request; an install restarts from the verified payload (the
#: inactive slot may be half-written, which is harmless because nothing boots it yet); a reboot that was
#: asked for continues with the health check (the driver first checks which slot actually booted).
RESUME: Mapping[OtaState, OtaState] = MappingProxyType(
    {
        S.QUEUED: S.QUEUED,
        S.DOWNLOADING: S.DOWNLOADING,
        S.DOWNLOADED: S.DOWNLOADED,
        S.VERIFIED: S.VERIFIED,
        S.INSTALLING: S.VERIFIED,
        S.REBOOTING: S.HEALTH_CHECK,
        S.HEALTH_CHECK: S.HEALTH_CHECK,
        **{t: t for t in TERMINAL},
    }
)


def next_state(state: OtaState, event: str) -> OtaState:
    """The state after ``event``; StateError when the table has no such transition."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise StateError(f"OTA job in state {state.value} cannot take event {event!r}") from None


class BootOutcome(StrEnum):
    """What a boot after an update's switch turned out to be (see :func:`classify_boot`)."""

    BOOTED_TARGET = "booted_target"
    FELL_BACK = "fell_back"
    NOT_SWITCHED = "not_switched"


def classify_boot(booted_slot: str, target_slot: str, bootcount: int) -> BootOutcome:
    """Which boot this is, for a job journaled as REBOOTING or HEALTH_CHECK.

    The new slot running means the switch worked. The old slot running with a boot counter above zero
    means the bootloader tried the new slot and gave up. The old slot with the counter at zero means the
    switch itself never happened (power lost between journaling REBOOTING and writing the boot env).
    """
    if booted_slot == target_slot:
        return BootOutcome.BOOTED_TARGET
    if bootcount > 0:
        return BootOutcome.FELL_BACK
    return BootOutcome.NOT_SWITCHED


def version_key(version: str) -> tuple[tuple[int, ...], int, str] | None:
    """A sort key for dotted numeric versions (``1.2.3``, ``v2.0``, ``2.0.0-rc1``), None if not one.

    A pre-release sorts before its release (``2.0.0-rc1`` < ``2.0.0``); build metadata after ``+`` is
    ignored. Trailing zeros do not matter (``2.0`` == ``2.0.0``).
    """
    text = version.strip()
    if text[:1] in ("v", "V"):
        text = text[1:]
    text = text.split("+", 1)[0]
    core, _, pre = text.partition("-")
    parts = core.split(".")
    if not parts or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    numbers = [int(p) for p in parts]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return (tuple(numbers), 0 if pre else 1, pre)
