"""Which devices a rollout is for: at creation, later (continuous targets), and when it is rolled back.

A rollout's targets are the devices whose labels match its selector (and, if listed, its device ids)
and whose reported hardware is the release's, at most ``max_devices`` of them in the rollout's hash order.
A roll-back is a rollout too: of the release each device ran before (the version the rollout recorded
when the device joined), to the devices that took the bad one — created by the controller in the same
transaction as the abort (:class:`~.records.RolloutUpdate` ``spawn``), so it is never lost nor made twice.
"""

from __future__ import annotations

import secrets
from collections import Counter, defaultdict
from collections.abc import Sequence

from fleetloop_cloud.repositories.interfaces import DeviceRepository, ReleaseRepository, RolloutRepository
from fleetloop_cloud.repositories.records import (
    DeviceRecord,
    NewRollout,
    ReleaseRecord,
    RolloutDeviceRecord,
    RolloutRecord,
)
from fleetloop_cloud.rollout.planner import (
    DevicePhaseState,
    RolloutPlanner,
    RolloutState,
    assign_phases,
    hash_order,
)
from fleetloop_cloud.rollout.policy import (
    AbortCriterion,
    BrakeAction,
    Execution,
    FailureType,
    PhaseSpec,
    RetryRule,
    RolloutPolicy,
    SuccessCondition,
    Target,
    policy_to_dict,
)
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_shared.errors import NotFoundError, UserError
from fleetloop_shared.rules import selector_matches
from fleetloop_shared.update.artifact import manifest_from_bytes

S = DevicePhaseState
#: A roll-back outweighs the rollout it undoes by this much (its devices take it first).
ROLLBACK_WEIGHT_BONUS = 1000
#: Executions that took the release (or are taking it): what a roll-back returns to the old one.
_TOOK = frozenset({S.COMMITTED.value, S.IN_PROGRESS.value, S.WAITING.value})


class TargetSelection:
    """Reads releases and devices for the controller: target devices, newcomers, who already runs what."""

    def __init__(
        self, rollouts: RolloutRepository, releases: ReleaseRepository, devices: DeviceRepository
    ) -> None:
        self._rollouts = rollouts
        self._releases = releases
        self._devices = devices

    def release(self, version: str, name: str = "") -> ReleaseRecord:
        """The release a policy names. A version alone must be unambiguous: a firmware and a model pack
        may both be "1.2.0", and rolling out the wrong one would reach every targeted device."""
        if not name:
            names = self._releases.names(version)
            if len(names) > 1:
                raise UserError(
                    f"several releases have version {version!r} ({', '.join(names)}); "
                    "say which with release.name (fleetloop rollout create --name NAME)"
                )
        release = self._releases.get(version, name)
        if release is None:
            what = f"{name} {version}" if name else repr(version)
            raise NotFoundError(f"release {what} does not exist; upload it first")
        return release

    def matching(self, policy: RolloutPolicy, release: ReleaseRecord) -> list[DeviceRecord]:
        """Devices the policy targets now (labels, listed ids, hardware). A device that has not reported
        its hardware yet is included; it refuses what does not fit."""
        listed = set(policy.target.devices)
        out = []
        for device in self._devices.all():
            if listed and device.device_id not in listed:
                continue
            if not selector_matches(policy.selector, device.selector_labels()):
                continue
            if device.hardware_id and device.hardware_id != release.hardware_id:
                continue
            out.append(device)
        return out

    def newcomers(
        self, record: RolloutRecord, policy: RolloutPolicy, devices: Sequence[RolloutDeviceRecord]
    ) -> dict[str, tuple[int, str]]:
        """Continuous targets: matching devices not in the rollout yet join its last phase (as hawkBit's
        dynamic groups do), within ``max_devices``."""
        present = {d.device_id for d in devices}
        room = (policy.target.max_devices or 1 << 62) - len(present)
        if room <= 0:
            return {}
        release = self.release(record.release_version, policy.release_name)
        fresh = [d for d in self.matching(policy, release) if d.device_id not in present]
        ordered = hash_order(record.release_version, [d.device_id for d in fresh])[:room]
        versions = {d.device_id: d.firmware_version for d in fresh}
        return {d: (len(policy.phases) - 1, versions[d]) for d in ordered}

    def already_running(self, record: RolloutRecord, device_ids: Sequence[str]) -> set[str]:
        """Of ``device_ids``, those whose inventory says they run the rollout's (slot image) version."""
        if not device_ids:
            return set()
        release = self.release(record.release_version, str(record.policy["release"].get("name", "")))
        if manifest_from_bytes(release.manifest).install != "slot":
            return set()
        out = set()
        for device_id in device_ids:
            device = self._devices.get(device_id)
            if device is not None and device.firmware_version == record.release_version:
                out.add(device_id)
        return out

    def rollbacks(
        self,
        record: RolloutRecord,
        devices: Sequence[RolloutDeviceRecord],
        now: float,
        *,
        why: str,
        to_version: str | None = None,
    ) -> tuple[list[NewRollout], list[str]]:
        """Rollouts that return the devices that took ``record``'s release to the version each ran
        before (or to ``to_version``), one per version; and notes on devices that cannot go back."""
        name = str(record.policy["release"].get("name", ""))
        groups: dict[str, list[str]] = defaultdict(list)
        notes: list[str] = []
        for d in devices:
            if d.state not in _TOOK and not (d.state == S.OFFERED.value and d.delivered):
                continue
            version = to_version or d.from_version
            if not version or version == record.release_version:
                notes.append(f"{d.device_id}: no earlier version recorded; left on {record.release_version}")
                continue
            groups[version].append(d.device_id)
        children: list[NewRollout] = []
        taken = {r.rollout_id for r in self._rollouts.all()}
        weight = int(record.policy.get("weight", 0) or 0) + ROLLBACK_WEIGHT_BONUS
        for version in sorted(groups):
            try:
                release = self.release(version, name)
            except (NotFoundError, UserError) as exc:
                notes.append(f"cannot roll {len(groups[version])} devices back to {version}: {exc}")
                continue
            policy = RolloutPolicy(
                release_version=version,
                release_name=release.name,
                target=Target(devices=tuple(sorted(groups[version]))),
                phases=(PhaseSpec("rollback", percent=100.0),),
                success=SuccessCondition(percent=100.0, timeout_s=3600.0),
                abort=(AbortCriterion(FailureType.ALL, 50.0, 3, BrakeAction.PAUSE),),
                # a device still finishing the bad install refuses a second job: try again shortly
                execution=Execution(
                    retries=(RetryRule(FailureType.REJECTED, max=10, backoff_s=30.0, factor=1.5),)
                ),
                weight=weight,
            )
            index = 1
            while f"{record.rollout_id}-rb{index}" in taken:
                index += 1
            rollout_id = f"{record.rollout_id}-rb{index}"
            taken.add(rollout_id)
            ids = groups[version]
            children.append(
                NewRollout(
                    rollout_id=rollout_id,
                    release_version=version,
                    policy=policy_to_dict(policy),
                    state=RolloutState.RUNNING.value,
                    phase=0,
                    reason=f"rolls back {record.rollout_id} ({why})",
                    devices=dict.fromkeys(ids, 0),
                    device_state=S.PENDING.value,
                    audit=[
                        (
                            "created",
                            f"roll-back of {record.rollout_id} to {release.name} {version} for "
                            f"{len(ids)} devices: {why}",
                        )
                    ],
                    from_versions=dict.fromkeys(ids, record.release_version),
                    release_name=release.name,
                    parent_id=record.rollout_id,
                )
            )
            notes.append(f"{rollout_id} returns {len(ids)} devices to {version}")
        return children, notes


def new_rollout(
    targets: TargetSelection, policy: RolloutPolicy, now: float, *, parent_id: str = ""
) -> NewRollout:
    """A rollout of ``policy``: target devices snapshotted and placed in phases."""
    release = targets.release(policy.release_version, policy.release_name)
    if not policy.release_name:
        # Persist the resolved name: a release of another name with this version uploaded later must not
        # change what this rollout delivers.
        policy = parse_policy(
            policy_to_dict(policy) | {"release": {"name": release.name, "version": policy.release_version}}
        )
    planner = RolloutPlanner(policy)
    matched = targets.matching(policy, release)
    if policy.target.devices:
        missing = sorted(set(policy.target.devices) - {d.device_id for d in matched})
        if missing:
            raise UserError(
                f"target.devices: {missing[0]!r} is not a registered device matching the target"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    if not matched:
        raise UserError(
            f"selector {policy.selector!r} matches no device with hardware {release.hardware_id!r}"
        )
    if policy.target.max_devices is not None:
        keep = set(
            hash_order(policy.release_version, [d.device_id for d in matched])[: policy.target.max_devices]
        )
        matched = [d for d in matched if d.device_id in keep]
    phases = assign_phases([d.device_id for d in matched], planner.policy)
    rollout_id = f"ro-{int(now):x}-{secrets.token_hex(4)}"
    # Only a slot image's version is reported back by devices; a bundle (model pack, software) is never
    # "already running" from the inventory's point of view and the device settles it itself.
    is_slot_image = manifest_from_bytes(release.manifest).install == "slot"
    up_to_date = {d.device_id for d in matched if is_slot_image and d.firmware_version == release.version}
    counts = Counter(phases.values())
    layout = ", ".join(f"{spec.name}={counts.get(i, 0)}" for i, spec in enumerate(planner.policy.phases))
    scheduled = policy.schedule.start_at is not None and policy.schedule.start_at > now
    return NewRollout(
        rollout_id=rollout_id,
        release_version=policy.release_version,
        policy=policy_to_dict(planner.policy),
        state=(RolloutState.CREATED if scheduled else RolloutState.RUNNING).value,
        phase=0,
        reason="created",
        devices=phases,
        device_state=S.PENDING.value,
        audit=[
            (
                "created",
                f"release {release.name} {release.version} for {release.hardware_id}; "
                f"selector {policy.selector!r}; {len(phases)} devices ({layout})",
            )
        ],
        initial={d: (S.COMMITTED.value, f"already running {release.version}") for d in up_to_date},
        from_versions={d.device_id: d.firmware_version for d in matched},
        release_name=release.name,
        parent_id=parent_id,
    )
