"""Names that become part of a file name, an object key or an MQTT topic level: one rule for all of them.

A device id, a fleet, a release name or a hardware id ends up in a path (``fleet=taxi/...``), a bucket
key (``releases/NAME/HW``) or a topic (``fl/v1/FLEET/DEVICE/...``). One alphabet keeps them plain in
every one of those places: no separator, no ``..``, no ``=`` (Hive partitions), no MQTT wildcard, and no
leading ``.`` or ``-`` (hidden files, options). Checked where a name comes in, with the same words.
"""

from __future__ import annotations

import re
from typing import Final

from fleetloop_shared.errors import UserError

#: One plain name: 1-128 characters.
SAFE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
#: :data:`SAFE_NAME` in words, for the error a user reads.
SAFE_NAME_RULE: Final = "use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"


def safe_name(value: object, what: str, *, becomes: str, error: type[UserError] = UserError) -> str:
    """``value`` when it is a plain name; otherwise ``error`` naming ``what`` it is (a device id, a
    fleet), what it ``becomes`` (a file, a broker identity) and the rule."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise error(f"{what} {value!r} cannot name {becomes}: {SAFE_NAME_RULE}")
    return value
