"""Privacy on the cloud's side: each fleet's hashing keys, and the policies ingest checks segments with.

**Keys.** One secret per deployment (``privacy.key`` beside the coordinator's online keys: the data
directory's keys/, made on first use, or the mounted secret all coordinators share, so they agree)
derives every fleet's key of every period (:func:`fleetloop_shared.privacy.derive_key`). A device gets
its fleet's key of the current period and of the next one with its desired campaigns, so it hashes on
across a rotation even while it is offline at the boundary; when a period begins, the coordinator pushes
the desired campaigns (and so the next key) to the devices connected to it.

**Policies.** Ingest refuses a segment that carries what its campaign's policy keeps on the device. The
policies are read from the desired campaigns at most every :data:`POLICY_REFRESH_S` seconds (a campaign
changed since is checked by its new policy after that), and a segment of a campaign no longer desired is
not checked: there is no policy left to check it with.
"""

from __future__ import annotations

import secrets
import threading
from typing import Protocol

from fleetloop_cloud.repositories.interfaces import CampaignRepository
from fleetloop_shared.errors import ConfigError, UserError
from fleetloop_shared.privacy import PrivacyKey, PrivacyPolicy, derive_key
from fleetloop_shared.privacy.keys import DEFAULT_PERIOD_S, period_of
from fleetloop_shared.rules import parse_campaign
from fleetloop_shared.wire import device_pb2

SECRET_FILE = "privacy.key"
SECRET_BYTES = 32
#: Seconds ingest may check with a policy older than the desired campaigns.
POLICY_REFRESH_S = 5.0


class KeySource(Protocol):
    """Where the secret loads from (the coordinator's online keys: files or a mounted secret)."""

    def load(self, name: str) -> bytes | None: ...

    def store(self, name: str, pem: bytes) -> None: ...


class FleetKeys:
    """Every fleet's hashing keys, from one secret."""

    def __init__(self, secret: bytes, *, period_s: int = DEFAULT_PERIOD_S) -> None:
        if len(secret) < SECRET_BYTES:
            raise ConfigError(f"privacy secret must be at least {SECRET_BYTES} bytes")
        self._secret = secret
        self.period_s = period_s

    @classmethod
    def from_source(cls, source: KeySource, *, period_s: int = DEFAULT_PERIOD_S) -> FleetKeys:
        """The secret ``privacy.key`` from where this coordinator's online keys load (its data directory's
        keys/, made there when missing; or a mounted secret every coordinator shares, so their hashes
        agree — raw bytes, or hex text as an environment variable holds it)."""
        secret = source.load(SECRET_FILE)
        if secret is None:
            secret = secrets.token_bytes(SECRET_BYTES)
            source.store(SECRET_FILE, secret)
        text = secret.strip()
        if len(text) >= 2 * SECRET_BYTES and all(c in b"0123456789abcdefABCDEF" for c in text):
            secret = bytes.fromhex(text.decode())
        if len(secret) < SECRET_BYTES:
            raise ConfigError(f"{SECRET_FILE}: privacy secret shorter than {SECRET_BYTES} bytes")
        return cls(secret, period_s=period_s)

    def period(self, now: float) -> int:
        return period_of(now, self.period_s)

    def keys(self, fleet: str, now: float) -> list[PrivacyKey]:
        """``fleet``'s keys of the period of ``now`` and of the next one."""
        p = self.period(now)
        return [derive_key(self._secret, fleet, q, self.period_s) for q in (p, p + 1)]

    def wire(self, fleet: str, now: float) -> list[device_pb2.PrivacyKey]:
        return [
            device_pb2.PrivacyKey(
                key_id=k.key_id,
                key=k.key,
                not_before_unix_ns=k.not_before_ns,
                not_after_unix_ns=k.not_after_ns,
            )
            for k in self.keys(fleet, now)
        ]


class CampaignPolicies:
    """The privacy policy of each desired campaign, by name, re-read every :data:`POLICY_REFRESH_S`."""

    def __init__(self, campaigns: CampaignRepository, *, refresh_s: float = POLICY_REFRESH_S) -> None:
        self._campaigns = campaigns
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._version = -1
        self._policies: dict[str, PrivacyPolicy] = {}

    def policy_for(self, campaign: str, now: float) -> PrivacyPolicy | None:
        with self._lock:
            if now - self._loaded_at >= self._refresh_s or now < self._loaded_at:
                self._reload(now)
            return self._policies.get(campaign)

    def _reload(self, now: float) -> None:
        desired = self._campaigns.desired()
        self._loaded_at = now
        if desired.version == self._version:
            return
        policies: dict[str, PrivacyPolicy] = {}
        for c in desired.campaigns:
            try:
                policy = parse_campaign(c.document, source=c.name).privacy
            except UserError:
                continue  # stored documents were validated; one that no longer parses has no policy to check
            if policy is not None:
                policies[c.name] = policy
        self._policies, self._version = policies, desired.version
