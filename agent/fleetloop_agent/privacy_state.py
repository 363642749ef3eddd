"""The device's privacy state: the fleet's hashing keys as they arrive over the control channel and as
they are kept across restarts, and the running totals of what privacy policies took out of captures.

Keys are kept in the device's state directory beside the desired campaigns, so a device that restarts
without a link still hashes with the key of the period; a device that never had a key for a capture's
time drops the identifiers instead (:mod:`fleetloop_shared.privacy.apply`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fleetloop_shared.privacy import Outcome, PrivacyKey, Redactions
from fleetloop_shared.wire import device_pb2

#: A key shorter than this is refused: HMAC-SHA256 keys are 32 bytes.
MIN_KEY_BYTES = 16


def keys_from_wire(keys: Iterable[device_pb2.PrivacyKey]) -> list[PrivacyKey]:
    """The keys of a DesiredCampaigns message; malformed ones (no id, short key, empty period) skipped."""
    out = []
    for k in keys:
        if k.key_id and len(k.key) >= MIN_KEY_BYTES and k.not_before_unix_ns < k.not_after_unix_ns:
            out.append(PrivacyKey(k.key_id, bytes(k.key), k.not_before_unix_ns, k.not_after_unix_ns))
    return out


def keys_to_json(keys: Iterable[PrivacyKey]) -> list[dict[str, Any]]:
    return [
        {"id": k.key_id, "key": k.key.hex(), "not_before_ns": k.not_before_ns, "not_after_ns": k.not_after_ns}
        for k in keys
    ]


def keys_from_json(items: Any) -> list[PrivacyKey]:
    """Keys as :func:`keys_to_json` wrote them; ValueError/KeyError/TypeError on anything else."""
    out = []
    for item in items:
        key = PrivacyKey(
            str(item["id"]),
            bytes.fromhex(str(item["key"])),
            int(item["not_before_ns"]),
            int(item["not_after_ns"]),
        )
        if len(key.key) < MIN_KEY_BYTES:
            raise ValueError(f"privacy key {key.key_id}: shorter than {MIN_KEY_BYTES} bytes")
        out.append(key)
    return out


@dataclass
class PrivacyTotals(Redactions):
    """What policies took out, as running totals (mirrored into the agent's metrics), and how many
    captures they suppressed whole."""

    suppressed_captures: int = 0

    def count(self, outcome: Outcome) -> None:
        self.suppressed_captures += int(outcome.suppressed)
        self.add(outcome.redacted)

    def totals(self) -> dict[str, int]:
        """By the names of the agent's mirrored counters (a position without its partner is a removed
        position there)."""
        return {
            "privacy_suppressed_captures": self.suppressed_captures,
            "privacy_dropped_signals": self.dropped_signals,
            "privacy_hashed_values": self.hashed_values,
            "privacy_removed_positions": self.removed_positions + self.unpaired_positions,
            "privacy_unkeyed_signals": self.unkeyed_signals,
        }
