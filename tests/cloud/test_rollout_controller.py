"""Rollout controller on the repositories of every backend (in-memory fakes, SQLite, PostgreSQL) with an
in-memory publisher (the device side)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetloop_cloud.repositories import Repositories, open_repositories
from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import (
    Inventory,
    Registration,
    ReleaseRecord,
    RolloutDeviceRecord,
    RolloutUpdate,
)
from fleetloop_cloud.rollout.controller import RolloutController, job_id_for
from fleetloop_cloud.rollout.planner import PhaseSpec, RolloutPolicy
from fleetloop_cloud.rollout.views import (
    DeviceProgress,
    PhaseProgress,
    RolloutStatus,
    rollout_status,
    rollout_summaries,
)
from fleetloop_shared.errors import NotFoundError, RuleError, StateError, UserError
from fleetloop_shared.update.artifact import (
    PayloadRef,
    ReleaseManifest,
    ReleaseSigner,
    manifest_from_bytes,
    manifest_to_bytes,
    sha256_hex,
    verify_manifest,
)

SIGNER = ReleaseSigner.generate()
IMAGE = b"firmware 2.0.0 " * 1000


@dataclass
class FakePublisher:
    """The device side as the controller sees it: who is online, what was sent."""

    online: set[str] = field(default_factory=set)
    sent: list[tuple[str, str, str]] = field(default_factory=list)
    inspect: object = None  # called before "delivering", to look at what was persisted

    def publish_job(
        self, device_id: str, job_id: str, rollout_id: str, manifest: bytes, signature: bytes
    ) -> bool:
        if callable(self.inspect):
            self.inspect(device_id, job_id, rollout_id)
        verify_manifest(manifest, signature, [SIGNER.public_key_pem()], now_unix=1_000, hardware_id="sim-a")
        self.sent.append((device_id, job_id, rollout_id))
        return device_id in self.online


def put_release(repos: Repositories, version: str = "2.0.0", hardware: str = "sim-a", *, name: str = "fw",
                install: str = "slot", created: float = 0.0) -> None:
    sha = sha256_hex(IMAGE)
    manifest = ReleaseManifest(
        name=name, version=version, hardware_id=hardware, target_sha256=sha, target_size=len(IMAGE),
        payloads=(PayloadRef("full", "none", f"files/{sha}", sha, len(IMAGE), None),),
        created_unix=0, expires_unix=10**9, install=install,
    )
    data = manifest_to_bytes(manifest)
    repos.releases.put(ReleaseRecord(name, version, hardware, data, SIGNER.sign(data), created))


def register(repos: Repositories, device_id: str, *, fleet: str = "taxi", **labels: str) -> None:
    registration = Registration(fleet, labels or {"kind": "car"}, [], "0.1.0", "simulated")
    repos.devices.register(device_id, registration, owner="", now=0.0)


def add_device(repos: Repositories, device_id: str, *, fleet: str = "taxi", hardware: str = "sim-a",
               version: str = "1.0.0", **labels: str) -> None:
    register(repos, device_id, fleet=fleet, **labels)
    repos.devices.update_inventory(device_id, Inventory(hardware, version, "00" * 32, "a", 0), 0.0)


def fleet_of_three(repos: Repositories) -> Repositories:
    put_release(repos)
    for i in range(3):
        add_device(repos, f"car-{i}")
    return repos


@pytest.fixture
def store(repos: Repositories) -> Repositories:
    """A release and three devices, on each backend (conftest.py ``repos``)."""
    return fleet_of_three(repos)


def controller(repos: Repositories, publisher: FakePublisher) -> RolloutController:
    return RolloutController(repos.rollouts, repos.releases, repos.devices, publisher)


def status(store: Repositories, rid: str) -> RolloutStatus:
    """The rollout as the REST API shows it."""
    return rollout_status(store.rollouts, rid)


def policy(**kw: object) -> RolloutPolicy:
    fields: dict[str, object] = {
        "release_version": "2.0.0",
        "selector": "fleet=taxi",
        "phases": (PhaseSpec("canary", percent=33), PhaseSpec("rest", percent=100)),
    }
    fields.update(kw)
    return RolloutPolicy(**fields)  # type: ignore[arg-type]


def phase_members(store: Repositories, rid: str, phase: int) -> list[str]:
    return [d.device_id for d in rollout_status(store.rollouts, rid).devices if d.phase == phase]


def report(ctl: RolloutController, rid: str, device: str, *states: str, now: float = 1.0) -> None:
    for s in states:
        reason = "hash mismatch" if s == "FAILED" else ""
        ctl.on_device_status(device, job_id_for(rid, device), s, reason, now)


def test_two_phase_rollout_to_success(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(), now=0.0)
    canary = phase_members(store, rid, 0)
    rest = phase_members(store, rid, 1)
    assert len(canary) == 1 and len(rest) == 2
    ctl.tick(1.0)
    assert pub.sent == [(canary[0], f"{rid}:{canary[0]}", rid)]
    ctl.tick(2.0)  # delivered already: not sent again, phase 2 still closed
    assert len(pub.sent) == 1
    report(ctl, rid, canary[0], "QUEUED", "DOWNLOADING", "REBOOTING", "COMMITTED", now=3.0)
    ctl.tick(4.0)
    assert sorted(d for d, _, _ in pub.sent[1:]) == sorted(rest)
    st = status(store, rid)
    assert st.phase == 1 and st.state == "RUNNING"
    assert st.phases[0] == PhaseProgress(name="canary", devices=1, committed=1, failed=0)
    for d in rest:
        report(ctl, rid, d, "COMMITTED", now=5.0)
    ctl.tick(6.0)
    st = status(store, rid)
    assert st.state == "SUCCEEDED"
    assert st.counts["COMMITTED"] == 3
    assert st.reason == "all 3 devices committed"
    events = [a.event for a in store.rollouts.audit(rid)]
    assert events[0] == "created" and "phase" in events and events[-1] == "succeeded"
    assert events.count("device") >= 3 * 2
    assert [r.id for r in rollout_summaries(store.rollouts)] == [rid]


def test_decision_is_persisted_before_the_job_is_published(store: Repositories) -> None:
    seen: list[tuple[str, bool, bool]] = []

    def inspect(device_id: str, job_id: str, rollout_id: str) -> None:
        devs = {d.device_id: d for d in store.rollouts.devices(rollout_id)}
        audit = store.rollouts.audit(rollout_id)
        audited = any(device_id in a.detail and "OFFERED" in a.detail for a in audit)
        seen.append((devs[device_id].state, devs[device_id].delivered, audited))

    pub = FakePublisher(online={"car-0", "car-1", "car-2"}, inspect=inspect)
    ctl = controller(store, pub)
    ctl.create(policy(), now=0.0)
    ctl.tick(1.0)
    assert seen == [("OFFERED", False, True)]


def test_offline_devices_get_the_job_again_until_delivered(store: Repositories) -> None:
    pub = FakePublisher(online=set())
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=(PhaseSpec("all", percent=100),)), now=0.0)
    ctl.tick(1.0)
    ctl.tick(2.0)
    assert len(pub.sent) == 6  # three devices, twice: none was reachable
    pub.online = {"car-1"}
    ctl.tick(3.0)
    ctl.tick(4.0)
    sent_to_1 = [d for d, _, _ in pub.sent if d == "car-1"]
    assert len(sent_to_1) == 3  # delivered on the third try, then never again
    assert ctl.offered_jobs("car-0")[0][:2] == (f"{rid}:car-0", rid)  # the polling path sees it too
    report(ctl, rid, "car-0", "DOWNLOADING")
    assert ctl.offered_jobs("car-0") == []


def test_brake_pauses_and_resume_accepts_the_failures(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(), now=0.0)
    canary = phase_members(store, rid, 0)[0]
    ctl.tick(1.0)
    report(ctl, rid, canary, "DOWNLOADING", "FAILED", now=2.0)
    ctl.tick(3.0)
    st = status(store, rid)
    assert st.state == "PAUSED"
    assert st.reason == "failure rate 100% (1 of 1) above 20%"
    assert {d.device_id: d.reason for d in st.devices}[canary] == "hash mismatch"
    ctl.tick(100.0)
    assert len(pub.sent) == 1  # paused: nobody else is offered anything
    with pytest.raises(StateError):
        ctl.pause(rid, 101.0)
    ctl.resume(rid, 102.0)
    ctl.tick(103.0)
    st = status(store, rid)
    assert st.state == "RUNNING" and st.phase == 1
    assert st.accepted_failures == [canary]
    assert len(pub.sent) == 3
    assert any(a.event == "resumed" and canary in a.detail for a in store.rollouts.audit(rid))


def test_operator_pause_abort_and_state_errors(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(), now=0.0)
    ctl.pause(rid, 1.0)
    ctl.tick(2.0)
    assert pub.sent == []
    with pytest.raises(StateError):
        ctl.pause(rid, 3.0)
    ctl.abort(rid, 4.0)
    with pytest.raises(StateError):
        ctl.resume(rid, 5.0)
    with pytest.raises(StateError):
        ctl.abort(rid, 6.0)
    ctl.tick(7.0)
    assert pub.sent == [] and status(store, rid).state == "ABORTED"
    with pytest.raises(NotFoundError):
        ctl.pause("ro-missing", 1.0)
    with pytest.raises(NotFoundError):
        status(store, "ro-missing")


def test_a_restarted_controller_resumes_from_the_database(sql_location: str | Path) -> None:
    class Crash(Exception):
        pass

    def crash(device_id: str, job_id: str, rollout_id: str) -> None:
        raise Crash  # the coordinator dies right after persisting the offer

    store = fleet_of_three(open_repositories(sql_location))
    first = controller(store, FakePublisher(online={"car-0", "car-1", "car-2"}, inspect=crash))
    rid = first.create(policy(), now=0.0)
    with pytest.raises(Crash):
        first.tick(1.0)
    store.close()

    reopened = open_repositories(sql_location)
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    second = controller(reopened, pub)
    second.tick(2.0)
    canary = phase_members(reopened, rid, 0)[0]
    assert [d for d, _, _ in pub.sent] == [canary]  # the offer that never went out is published now
    report(second, rid, canary, "COMMITTED", now=3.0)
    second.tick(4.0)
    assert status(reopened, rid).phase == 1
    assert len(pub.sent) == 3
    reopened.close()


def test_targets_follow_selector_and_hardware(store: Repositories) -> None:
    add_device(store, "bus-1", fleet="bus")
    add_device(store, "car-other-hw", hardware="sim-b")
    add_device(store, "car-new", version="2.0.0")  # already runs the release
    register(store, "car-no-inventory")
    ctl = controller(store, FakePublisher())
    rid = ctl.create(policy(phases=(PhaseSpec("all"),)), now=0.0)
    devices = {d.device_id: d for d in status(store, rid).devices}
    assert sorted(devices) == ["car-0", "car-1", "car-2", "car-new", "car-no-inventory"]
    assert devices["car-new"].state == "COMMITTED"
    assert devices["car-new"].reason == "already running 2.0.0"
    rid2 = ctl.create(policy(selector="fleet=bus", phases=(PhaseSpec("all"),)), now=0.0)
    assert [d.device_id for d in status(store, rid2).devices] == ["bus-1"]


def test_create_refuses_unknown_release_empty_target_and_bad_selector(store: Repositories) -> None:
    ctl = controller(store, FakePublisher())
    with pytest.raises(NotFoundError, match=r"9\.9\.9"):
        ctl.create(policy(release_version="9.9.9"), now=0.0)
    with pytest.raises(UserError, match="matches no device"):
        ctl.create(policy(selector="fleet=ships"), now=0.0)
    with pytest.raises(RuleError):
        ctl.create(policy(selector="fleet=,,=="), now=0.0)
    assert store.rollouts.all() == []


def test_a_model_pack_sharing_the_firmware_version_needs_a_name(store: Repositories) -> None:
    """A model pack "2.0.0" uploaded after firmware "2.0.0": a bare version is refused as ambiguous,
    and a rollout created before the pack existed keeps delivering the firmware."""
    add_device(store, "car-new", version="2.0.0")
    pub = FakePublisher(online={"car-0", "car-1", "car-2", "car-new"})
    ctl = controller(store, pub)
    fw_rollout = ctl.create(policy(phases=(PhaseSpec("all"),)), now=0.0)
    put_release(store, name="detector", install="swap", created=1.0)
    with pytest.raises(UserError, match=r"several releases have version '2\.0\.0' \(detector, fw\)"):
        ctl.create(policy(), now=2.0)
    pack = ctl.create(policy(release_name="detector", phases=(PhaseSpec("all"),)), now=2.0)
    # The inventory reports firmware only: no device counts as already running the pack.
    assert {d.state for d in status(store, pack).devices} == {"PENDING"}
    fw_devices = {d.device_id: d.state for d in status(store, fw_rollout).devices}
    assert fw_devices["car-new"] == "COMMITTED"
    ctl.tick(4.0)
    assert {d.state for d in status(store, pack).devices} == {"OFFERED"}
    names = {
        rid: {manifest_name(m) for _job, offered, m, _sig in ctl.offered_jobs("car-0") if offered == rid}
        for rid in (fw_rollout, pack)
    }
    assert names == {fw_rollout: {"fw"}, pack: {"detector"}}
    with pytest.raises(NotFoundError, match=r"release nope 2\.0\.0 does not exist"):
        ctl.create(policy(release_name="nope"), now=3.0)


def manifest_name(manifest: bytes) -> str:
    return manifest_from_bytes(manifest).name


def test_device_reports_are_filtered(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=(PhaseSpec("all"),)), now=0.0)
    ctl.tick(1.0)

    def entry(device: str) -> DeviceProgress:
        return {d.device_id: d for d in status(store, rid).devices}[device]

    ctl.on_device_status("car-1", f"{rid}:car-0", "COMMITTED", "", 2.0)  # someone else's job
    ctl.on_device_status("car-0", "ro-unknown:car-0", "COMMITTED", "", 2.0)  # unknown rollout
    ctl.on_device_status("car-0", "garbage", "COMMITTED", "", 2.0)
    ctl.on_device_status("car-0", f"{rid}:car-0", "EXPLODED", "", 2.0)  # unknown state
    assert entry("car-0").state == "OFFERED"
    ctl.on_device_status("car-0", f"{rid}:car-0", "OTA_STATE_INSTALLING", "", 3.0)
    assert entry("car-0").state == "IN_PROGRESS"
    assert entry("car-0").reason == "INSTALLING"
    ctl.on_device_status("car-0", f"{rid}:car-0", "ROLLED_BACK", "booted slot a after 2 tries", 4.0)
    ctl.on_device_status("car-0", f"{rid}:car-0", "COMMITTED", "", 5.0)  # terminal is final
    assert entry("car-0").state == "ROLLED_BACK"
    ctl.on_device_status("car-1", f"{rid}:car-1", "CANCELED", "x" * 5000, 6.0)
    assert entry("car-1").state == "FAILED" and len(entry("car-1").reason) <= 500


class Interleaving:
    """A coordinator's rollouts repository on the shared database that lets another coordinator act
    right after this one has read a rollout's devices — between its decision and its write."""

    def __init__(self, inner: RolloutRepository) -> None:
        self._inner = inner
        self.between: Callable[[], None] | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        devices = self._inner.devices(rollout_id)
        act, self.between = self.between, None
        if act is not None:
            act()
        return devices


def test_a_stale_decision_never_overwrites_another_coordinators_change(sql_location: str | Path) -> None:
    """Two coordinators share the database: A decides the canary phase is done while B's operator
    pauses the rollout. A's write must be dropped (the pause stands); the next tick decides afresh."""
    shared = fleet_of_three(open_repositories(sql_location))
    online = {"car-0", "car-1", "car-2"}
    a_repos = open_repositories(sql_location)
    a_rollouts = Interleaving(a_repos.rollouts)
    a = RolloutController(a_rollouts, a_repos.releases, a_repos.devices, FakePublisher(online=online))  # type: ignore[arg-type]
    b = controller(shared, FakePublisher())
    rid = a.create(policy(), now=0.0)
    a.tick(1.0)
    report(a, rid, phase_members(shared, rid, 0)[0], "COMMITTED", now=2.0)

    a_rollouts.between = lambda: b.pause(rid, now=3.0)
    a.tick(4.0)  # would open phase 2 and write RUNNING over the pause without the check
    st = status(shared, rid)
    assert (st.state, st.phase, st.reason) == ("PAUSED", 0, "paused by operator")
    assert {d.state for d in st.devices if d.phase == 1} == {"PENDING"}

    # Operators on both coordinators: A resumes while B aborts between A's check and A's write.
    a_rollouts.between = lambda: b.abort(rid, now=5.0)
    with pytest.raises(StateError, match="is aborted; only a paused one can resume"):
        a.resume(rid, now=5.0)
    assert status(shared, rid).state == "ABORTED"
    a.tick(6.0)
    assert status(a_repos, rid).state == "ABORTED"
    a_repos.close()
    shared.close()


def test_stale_write_is_refused_by_the_store(store: Repositories) -> None:
    ctl = controller(store, FakePublisher())
    rid = ctl.create(policy(), now=0.0)
    record = store.rollouts.get(rid)
    assert record is not None
    stale = RolloutUpdate(state="SUCCEEDED", expect=("PAUSED", 0))
    assert store.rollouts.update(rid, stale, 1.0) is False
    assert store.rollouts.get(rid).state == record.state  # type: ignore[union-attr]
    assert store.rollouts.update(rid, RolloutUpdate(reason="x", expect=(record.state, record.phase)), 1.0)
