"""Privacy at the edge: what a campaign's policy lets leave the device, applied before anything is
stored for upload and checked again by the cloud (docs/privacy.md)."""

from fleetloop_shared.privacy.apply import Outcome, Redactions, apply_policy
from fleetloop_shared.privacy.check import violations
from fleetloop_shared.privacy.geo import Polygon
from fleetloop_shared.privacy.keys import KeyRing, PrivacyKey, derive_key, hash_identifier, is_hashed
from fleetloop_shared.privacy.policy import MinSpeed, PolicyStamp, PositionCoarsening, PrivacyPolicy

__all__ = [
    "KeyRing",
    "MinSpeed",
    "Outcome",
    "PolicyStamp",
    "Polygon",
    "PositionCoarsening",
    "PrivacyKey",
    "PrivacyPolicy",
    "Redactions",
    "apply_policy",
    "derive_key",
    "hash_identifier",
    "is_hashed",
    "violations",
]
