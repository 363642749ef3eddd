"""Campaigns: the desired state devices converge to, validated with the same compiler the agents run.

Applying or deleting a campaign bumps the global version and pushes each device connected here the
campaigns whose selector matches it; a device connecting later gets them in its welcome. Devices
connected to other coordinators get theirs from :meth:`CampaignService.catch_up` there, run when the
change feed says campaigns changed (and on a timer, for a notice that was lost). The desired campaigns
carry the device's fleet's privacy keys (the current period's and the next one's); when a key period
begins, :meth:`CampaignService.rotate` pushes them again so devices get the next key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fleetloop_cloud.repositories.interfaces import CampaignRepository, DeviceRepository
from fleetloop_cloud.repositories.records import CampaignSet
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_cloud.services.privacy import FleetKeys
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_shared.errors import UserError
from fleetloop_shared.rules import parse_campaign, selector_matches
from fleetloop_shared.wire import device_pb2


@dataclass(frozen=True)
class CampaignApplied:
    name: str
    campaigns_version: int
    #: Devices whose labels match the campaign's selector now.
    devices: list[str]


@dataclass(frozen=True)
class CampaignChecked:
    """A campaign document that compiles: what applying it would set, and where."""

    name: str
    version: int
    selector: str
    #: Devices whose labels match the selector now.
    devices: list[str]


@dataclass(frozen=True)
class CampaignDeleted:
    name: str
    campaigns_version: int


class CampaignService:
    """``changed`` is told after every write (the coordinator tells the others through its change feed)."""

    def __init__(
        self,
        campaigns: CampaignRepository,
        devices: DeviceRepository,
        sessions: DeviceSessions,
        access: Access,
        *,
        changed: Callable[[], None] = lambda: None,
        keys: FleetKeys | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._campaigns = campaigns
        self._devices = devices
        self._sessions = sessions
        self._access = access
        self._changed = changed
        self._push_lock = threading.Lock()
        #: The global version the devices here were last pushed (or welcomed with: those connecting from
        #: now on get the current set in their welcome).
        self._pushed = campaigns.desired().version
        self._keys = keys
        self._clock = clock
        self._key_period: int | None = None

    def apply(
        self, caller: Caller, document: str, *, source: str = "<campaign>", now: float
    ) -> CampaignApplied:
        """Validate (RuleError with FILE:LINE:COL), store, and push to the devices connected here."""
        self._access.operator(caller, "campaigns.apply")
        spec = parse_campaign(document, source=source)
        before = self._campaigns.desired().version
        version = self._campaigns.put(spec.name, document, now)
        self._access.record(
            caller, "campaigns.apply", spec.name, now, before=before, after=version,
            detail="unchanged" if version == before else "",
        )  # fmt: skip
        self._push()
        self._changed()
        return CampaignApplied(spec.name, version, self._matching(spec.selector))

    def validate(self, caller: Caller, document: str, *, source: str = "<campaign>") -> CampaignChecked:
        """Compile ``document`` as :meth:`apply` would (RuleError with FILE:LINE:COL), storing nothing."""
        self._access.operator(caller, "campaigns.validate")
        spec = parse_campaign(document, source=source)
        return CampaignChecked(spec.name, spec.version, spec.selector, self._matching(spec.selector))

    def _matching(self, selector: str) -> list[str]:
        return [d.device_id for d in self._devices.all() if selector_matches(selector, d.labels)]

    def desired_names(self, caller: Caller, device_id: str) -> tuple[int, list[tuple[str, int]]]:
        """The global version and the (name, revision) of each campaign a device should run."""
        self._access.operator(caller, "campaigns.list")
        desired = self.desired_for(device_id)
        return desired.version, [(c.name, c.version) for c in desired.campaigns]

    def delete(self, caller: Caller, name: str, now: float) -> CampaignDeleted:
        self._access.operator(caller, "campaigns.delete")
        before = self._campaigns.desired().version
        version = self._campaigns.delete(name, now)
        self._access.record(caller, "campaigns.delete", name, now, before=before, after=version)
        self._push()
        self._changed()
        return CampaignDeleted(name, version)

    def desired(self, caller: Caller) -> CampaignSet:
        self._access.operator(caller, "campaigns.list")
        return self._campaigns.desired()

    def desired_for(self, device_id: str) -> device_pb2.DesiredCampaigns:
        """The campaigns whose selector matches the device's labels, at the current global version."""
        desired = self._campaigns.desired()
        device = self._devices.get(device_id)
        labels: Mapping[str, str] = device.labels if device is not None else {}
        out = device_pb2.DesiredCampaigns(version=desired.version)
        if self._keys is not None and device is not None:
            out.privacy_keys.extend(self._keys.wire(device.fleet, self._clock()))
        for c in desired.campaigns:
            try:
                selector = parse_campaign(c.document, source=c.name).selector
            except UserError:
                continue
            if selector_matches(selector, labels):
                campaign = device_pb2.Campaign(name=c.name, version=c.revision, document=c.document)
                out.campaigns.append(campaign)
        return out

    def catch_up(self) -> bool:
        """Push the devices connected here their desired campaigns if the global version moved since
        the last push here (a change made through another coordinator); True if it pushed."""
        if self._campaigns.desired().version == self._pushed:
            return False
        self._push()
        return True

    def rotate(self, now: float) -> bool:
        """When a privacy key period has begun since the last call, push every device connected here its
        desired campaigns with the keys of the new period and the next; True if it pushed."""
        if self._keys is None:
            return False
        period = self._keys.period(now)
        previous, self._key_period = self._key_period, period
        if previous is None or previous == period:
            return False
        self._push()
        return True

    def _push(self) -> None:
        with self._push_lock:  # a push here and a catch-up must not interleave their versions
            version = self._campaigns.desired().version
            for device_id in self._sessions.online():
                self._sessions.publish(
                    device_id, device_pb2.CloudMessage(desired_campaigns=self.desired_for(device_id))
                )
            self._pushed = version
