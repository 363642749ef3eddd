"""Rollout controller on the repositories of every backend (in-memory fakes, SQLite, PostgreSQL) with an
in-memory publisher (the device side): phases, brakes, retries, roll-backs, gates, the lease."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleetloop_cloud.repositories import Repositories, open_repositories
from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.repositories.records import (
    Inventory,
    NewGateEvaluation,
    Registration,
    ReleaseRecord,
    RolloutDeviceRecord,
    RolloutUpdate,
)
from fleetloop_cloud.rollout.actions import RolloutActions
from fleetloop_cloud.rollout.controller import Job, RolloutController, job_id_for
from fleetloop_cloud.rollout.gating import Cohorts, DeviceValues, RateCounts
from fleetloop_cloud.rollout.policy import RolloutPolicy
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_cloud.rollout.views import (
    DeviceProgress,
    PhaseProgress,
    RolloutStatus,
    executions,
    history,
    revisions,
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
    jobs: list[Job] = field(default_factory=list)
    withdrawn: list[tuple[str, str, str]] = field(default_factory=list)
    inspect: Callable[[str, str, str], None] | None = None  # called before "delivering"

    def reachable(self) -> Collection[str]:
        return set(self.online)

    def publish(self, device_id: str, job: Job) -> bool:
        if self.inspect is not None:
            self.inspect(device_id, job.job_id, job.rollout_id)
        verify_manifest(
            job.manifest, job.signature, [SIGNER.public_key_pem()], now_unix=1_000, hardware_id="sim-a"
        )
        self.sent.append((device_id, job.job_id, job.rollout_id))
        self.jobs.append(job)
        return device_id in self.online

    def withdraw(self, device_id: str, job_id: str, rollout_id: str, reason: str) -> bool:
        self.withdrawn.append((device_id, job_id, reason))
        return device_id in self.online


def put_release(
    repos: Repositories,
    version: str = "2.0.0",
    hardware: str = "sim-a",
    *,
    name: str = "fw",
    install: str = "slot",
    created: float = 0.0,
) -> None:
    sha = sha256_hex(IMAGE + version.encode())
    manifest = ReleaseManifest(
        name=name,
        version=version,
        hardware_id=hardware,
        target_sha256=sha,
        target_size=len(IMAGE),
        payloads=(PayloadRef("full", "none", f"files/{sha}", sha, len(IMAGE), None),),
        created_unix=0,
        expires_unix=10**9,
        install=install,
    )
    data = manifest_to_bytes(manifest)
    repos.releases.put(ReleaseRecord(name, version, hardware, data, SIGNER.sign(data), created))


def register(repos: Repositories, device_id: str, *, fleet: str = "taxi", **labels: str) -> None:
    registration = Registration(fleet, labels or {"kind": "car"}, [], "0.1.0", "simulated")
    repos.devices.register(device_id, registration, owner="", now=0.0)


def add_device(
    repos: Repositories,
    device_id: str,
    *,
    fleet: str = "taxi",
    hardware: str = "sim-a",
    version: str = "1.0.0",
    time_zone: str = "",
    **labels: str,
) -> None:
    register(repos, device_id, fleet=fleet, **labels)
    repos.devices.update_inventory(device_id, Inventory(hardware, version, "00" * 32, "a", 0, time_zone), 0.0)


def fleet_of_three(repos: Repositories) -> Repositories:
    put_release(repos, "1.0.0")
    put_release(repos)
    for i in range(3):
        add_device(repos, f"car-{i}")
    return repos


@pytest.fixture
def store(repos: Repositories) -> Repositories:
    """Releases 1.0.0 and 2.0.0 and three devices on 1.0.0, on each backend (conftest.py ``repos``)."""
    return fleet_of_three(repos)


def controller(repos: Repositories, publisher: FakePublisher, **kw: Any) -> RolloutController:
    return RolloutController(repos.rollouts, repos.releases, repos.devices, publisher, **kw)


def actions(repos: Repositories, ctl: RolloutController) -> RolloutActions:
    return RolloutActions(ctl, repos.rollouts)


def status(store: Repositories, rid: str) -> RolloutStatus:
    """The rollout as the REST API shows it."""
    return rollout_status(store.rollouts, rid)


def policy(**spec: Any) -> RolloutPolicy:
    base: dict[str, Any] = {
        "release": {"version": "2.0.0"},
        "target": {"selector": "fleet=taxi"},
        "phases": [{"name": "canary", "percent": 33}, {"name": "rest", "percent": 100}],
    }
    base.update(spec)
    return parse_policy(base)


ALL = [{"name": "all"}]


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
    assert st.phases[0] == PhaseProgress(
        name="canary", devices=1, committed=1, failed=0, in_progress=0, pending=0
    )
    assert st.phases[1] == PhaseProgress(
        name="rest", devices=2, committed=0, failed=0, in_progress=2, pending=0
    )
    for d in rest:
        report(ctl, rid, d, "COMMITTED", now=5.0)
    ctl.tick(6.0)
    st = status(store, rid)
    assert st.state == "SUCCEEDED"
    assert st.counts["COMMITTED"] == 3
    assert st.reason == "all 3 devices succeeded"
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
    rid = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    ctl.tick(2.0)
    assert pub.sent == []  # offered (persisted), but no session here to carry the job
    assert {d.state for d in status(store, rid).devices} == {"OFFERED"}
    pub.online = {"car-1"}
    ctl.tick(3.0)
    ctl.tick(4.0)
    assert [d for d, _, _ in pub.sent] == ["car-1"]  # delivered once it was reachable, then never again
    job = ctl.offered_jobs("car-0")[0]  # the polling path sees the others' jobs too
    assert (job.job_id, job.rollout_id) == (f"{rid}:car-0", rid)
    report(ctl, rid, "car-0", "DOWNLOADING")
    assert ctl.offered_jobs("car-0") == []


def test_a_job_lost_with_its_session_goes_out_again_at_the_devices_next_hello(store: Repositories) -> None:
    """A job queued on a session that ended before the device read it (the coordinator killed, the link
    cut) was counted delivered: the device's next hello sends it again, once; a device that reported on
    its job gets nothing again."""
    pub = FakePublisher(online={"car-0", "car-1"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    assert sorted(d for d, _, _ in pub.sent) == ["car-0", "car-1"]
    report(ctl, rid, "car-1", "DOWNLOADING", now=2.0)
    ctl.tick(3.0)
    assert len(pub.sent) == 2  # delivered: never sent twice on one session
    for device in ("car-0", "car-1", "car-2"):  # each says hello again (car-2 stays offline here)
        ctl.on_device_connected(device, 4.0)
    ctl.tick(5.0)
    ctl.tick(6.0)
    assert sorted(d for d, _, _ in pub.sent) == ["car-0", "car-0", "car-1"]
    jobs = [job_id for d, job_id, _ in pub.sent if d == "car-0"]
    assert jobs[0] == jobs[1]  # the same job: the device ignores one it has
    assert {d.device_id: d.state for d in status(store, rid).devices}["car-0"] == "OFFERED"
    # a paused rollout delivers nothing: its offers stay counted delivered (the device may hold one)
    actions(store, ctl).pause(rid, 7.0)
    ctl.on_device_connected("car-0", 8.0)
    assert {d.device_id: d.delivered for d in store.rollouts.devices(rid)}["car-0"] is True


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
    assert st.reason == "FAILED rate 100% (1 of 1 executed) above 20%"
    assert {d.device_id: d.reason for d in st.devices}[canary] == "hash mismatch"
    ctl.tick(100.0)
    assert len(pub.sent) == 1  # paused: nobody else is offered anything
    with pytest.raises(StateError):
        actions(store, ctl).pause(rid, 101.0)
    actions(store, ctl).resume(rid, 102.0)
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
    act = actions(store, ctl)
    act.pause(rid, 1.0)
    ctl.tick(2.0)
    assert pub.sent == []
    with pytest.raises(StateError):
        act.pause(rid, 3.0)
    with pytest.raises(StateError, match="nothing waits for approval"):
        act.approve(rid, 3.5)
    act.abort(rid, 4.0)
    with pytest.raises(StateError):
        act.resume(rid, 5.0)
    with pytest.raises(StateError):
        act.abort(rid, 6.0)
    ctl.tick(7.0)
    assert pub.sent == [] and status(store, rid).state == "ABORTED"
    with pytest.raises(NotFoundError):
        act.pause("ro-missing", 1.0)
    with pytest.raises(NotFoundError):
        status(store, "ro-missing")


def test_a_restarted_controller_resumes_from_the_database(sql_location: str | Path) -> None:
    class Crash(Exception):
        pass

    def crash(device_id: str, job_id: str, rollout_id: str) -> None:
        raise Crash  # the coordinator dies right after persisting the offer

    store = fleet_of_three(open_repositories(sql_location))
    first = controller(
        store, FakePublisher(online={"car-0", "car-1", "car-2"}, inspect=crash), lease_ttl_s=1.0
    )
    rid = first.create(policy(), now=0.0)
    with pytest.raises(Crash):
        first.tick(1.0)
    store.close()

    reopened = open_repositories(sql_location)
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    second = controller(reopened, pub, lease_ttl_s=1.0)
    second.tick(1.5)  # the first one's lease runs until 2.0: the second only delivers
    canary = phase_members(reopened, rid, 0)[0]
    assert [d for d, _, _ in pub.sent] == [canary]  # the offer that never went out is published now
    report(second, rid, canary, "COMMITTED", now=1.6)
    second.tick(1.7)
    assert status(reopened, rid).phase == 0  # not its lease yet: nothing decided
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
    rid = ctl.create(policy(phases=ALL), now=0.0)
    devices = {d.device_id: d for d in status(store, rid).devices}
    assert sorted(devices) == ["car-0", "car-1", "car-2", "car-new", "car-no-inventory"]
    assert devices["car-new"].state == "COMMITTED"
    assert devices["car-new"].reason == "already running 2.0.0"
    rid2 = ctl.create(policy(target={"selector": "fleet=bus"}, phases=ALL), now=0.0)
    assert [d.device_id for d in status(store, rid2).devices] == ["bus-1"]


def test_create_refuses_unknown_release_empty_target_and_bad_selector(store: Repositories) -> None:
    ctl = controller(store, FakePublisher())
    with pytest.raises(NotFoundError, match=r"9\.9\.9"):
        ctl.create(policy(release={"version": "9.9.9"}), now=0.0)
    with pytest.raises(UserError, match="matches no device"):
        ctl.create(policy(target={"selector": "fleet=ships"}), now=0.0)
    with pytest.raises(RuleError):
        ctl.create(policy(target={"selector": "fleet=,,=="}), now=0.0)
    with pytest.raises(UserError, match=r"target\.devices: 'car-9'"):
        ctl.create(policy(target={"devices": ["car-0", "car-9"]}), now=0.0)
    assert store.rollouts.all() == []


def test_a_model_pack_sharing_the_firmware_version_needs_a_name(store: Repositories) -> None:
    """A model pack "2.0.0" uploaded after firmware "2.0.0": a bare version is refused as ambiguous,
    and a rollout created before the pack existed keeps delivering the firmware."""
    add_device(store, "car-new", version="2.0.0")
    pub = FakePublisher(online={"car-0", "car-1", "car-2", "car-new"})
    ctl = controller(store, pub)
    fw_rollout = ctl.create(policy(phases=ALL), now=0.0)
    put_release(store, name="detector", install="swap", created=1.0)
    with pytest.raises(UserError, match=r"several releases have version '2\.0\.0' \(detector, fw\)"):
        ctl.create(policy(), now=2.0)
    pack = ctl.create(policy(release={"name": "detector", "version": "2.0.0"}, phases=ALL), now=2.0)
    # The inventory reports firmware only: no device counts as already running the pack.
    assert {d.state for d in status(store, pack).devices} == {"PENDING"}
    fw_devices = {d.device_id: d.state for d in status(store, fw_rollout).devices}
    assert fw_devices["car-new"] == "COMMITTED"
    ctl.tick(4.0)
    # One update at a time per device: the older rollout (equal weight) has car-0..2 first.
    pack_states = {d.device_id: d.state for d in status(store, pack).devices}
    assert pack_states == {"car-0": "PENDING", "car-1": "PENDING", "car-2": "PENDING", "car-new": "OFFERED"}
    assert [manifest_name(j.manifest) for j in ctl.offered_jobs("car-0")] == ["fw"]
    assert [manifest_name(j.manifest) for j in ctl.offered_jobs("car-new")] == ["detector"]
    report(ctl, fw_rollout, "car-0", "COMMITTED", now=5.0)
    ctl.tick(6.0)
    assert [manifest_name(j.manifest) for j in ctl.offered_jobs("car-0")] == ["detector"]
    with pytest.raises(NotFoundError, match=r"release nope 2\.0\.0 does not exist"):
        ctl.create(policy(release={"name": "nope", "version": "2.0.0"}), now=3.0)


def manifest_name(manifest: bytes) -> str:
    return manifest_from_bytes(manifest).name


def test_device_reports_are_filtered(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL), now=0.0)
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

    a_rollouts.between = lambda: actions(shared, b).pause(rid, now=3.0)
    a.tick(4.0)  # would open phase 2 and write RUNNING over the pause without the check
    st = status(shared, rid)
    assert (st.state, st.phase, st.reason) == ("PAUSED", 0, "paused by operator")
    assert {d.state for d in st.devices if d.phase == 1} == {"PENDING"}

    # Operators on both coordinators: A resumes while B aborts between A's check and A's write.
    a_rollouts.between = lambda: actions(shared, b).abort(rid, now=5.0)
    with pytest.raises(StateError, match="is aborted; only a paused one can resume"):
        RolloutActions(a, a_rollouts).resume(rid, now=5.0)  # type: ignore[arg-type]
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


# ------------------------------------------------------------------ the lease


def test_a_paused_leader_cannot_write_after_another_took_over(store: Repositories) -> None:
    """A reads, then "pauses" past its lease; B takes the lease and decides; A wakes up and writes its
    stale decision under its old fencing token: the store refuses it, and A stops deciding."""
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    a_rollouts = Interleaving(store.rollouts)
    a = RolloutController(a_rollouts, store.releases, store.devices, pub, holder="a", lease_ttl_s=5.0)  # type: ignore[arg-type]
    b = controller(store, pub, holder="b", lease_ttl_s=5.0)
    rid = a.create(policy(phases=ALL, rate={"max_per_minute": 1}), now=0.0)
    a.tick(0.0)
    assert b.lead(1.0) is None  # A's lease runs
    first = [d for d, _, _ in pub.sent]
    assert len(first) == 1
    # A renews its lease at 70 (until 75), reads, and pauses; B takes over at 76 and offers one more.
    a_rollouts.between = lambda: b.tick(76.0)
    a.tick(70.0)  # A wakes up with what it had read: it would offer the same next device again
    offered = [d.device_id for d in store.rollouts.devices(rid) if d.state == "OFFERED"]
    assert len(offered) == 2 and len(pub.sent) == 2  # B's one offer only, not A's as well
    lease = store.rollouts.lease()
    assert lease is not None and lease[:2] == ("b", 2)
    assert a.lead(77.0) is None  # B's lease runs now
    b.release_lease()
    assert a.lead(78.0) is not None  # a clean stop hands over at once, with a higher token
    assert store.rollouts.lease()[:2] == ("a", 3)  # type: ignore[index]


# ------------------------------------------------------------------ executions


def test_a_failure_is_retried_after_its_backoff_on_a_new_job(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(
        policy(execution={"retries": [{"failure_type": "FAILED", "max": 1, "backoff": "2m"}]}), now=0.0
    )
    canary = phase_members(store, rid, 0)[0]
    ctl.tick(1.0)
    report(ctl, rid, canary, "DOWNLOADING", "FAILED", now=2.0)
    ex = {e.device_id: e for e in executions(store.rollouts, rid)}[canary]
    assert (ex.state, ex.attempt, ex.retry_at) == ("PENDING", 1, 122.0)
    assert ex.reason.startswith("retry 1 of 1 after FAILED")
    ctl.tick(100.0)
    assert len(pub.sent) == 1 and status(store, rid).state == "RUNNING"  # no brake: not final yet
    ctl.tick(123.0)
    assert pub.sent[-1] == (canary, job_id_for(rid, canary, 2), rid) == (canary, f"{rid}:{canary}#2", rid)
    report(ctl, rid, canary, "COMMITTED", now=124.0)  # a late report of attempt 1: ignored
    assert {e.device_id: e for e in executions(store.rollouts, rid)}[canary].state == "OFFERED"
    ctl.on_device_status(canary, f"{rid}:{canary}#2", "COMMITTED", "", 125.0, running_version="2.0.0")
    ex = {e.device_id: e for e in executions(store.rollouts, rid)}[canary]
    assert (ex.state, ex.attempt, ex.running_version, ex.from_version) == ("COMMITTED", 2, "2.0.0", "1.0.0")


def test_in_progress_timeout_ends_an_execution(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(
        policy(
            execution={"in_progress_timeout": "5m"},
            abort=[{"failure_type": "TIMED_OUT", "threshold_percent": 0}],
        ),
        now=0.0,
    )
    canary = phase_members(store, rid, 0)[0]
    ctl.tick(1.0)
    report(ctl, rid, canary, "DOWNLOADING", now=2.0)
    ctl.tick(300.0)
    assert status(store, rid).state == "RUNNING"
    ctl.tick(303.0)
    ctl.tick(304.0)
    st = status(store, rid)
    assert {d.device_id: d.state for d in st.devices}[canary] == "TIMED_OUT"
    assert (st.state, st.reason) == ("PAUSED", "TIMED_OUT rate 100% (1 of 1 executed) above 0%")


def test_a_device_rolled_back_by_its_bootloader_reports_what_it_runs(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL, abort=[{"threshold_percent": 100}]), now=0.0)
    ctl.tick(1.0)
    ctl.on_device_status(
        "car-1",
        f"{rid}:car-1",
        "ROLLED_BACK",
        "booted slot a after 2 tries: health",
        2.0,
        running_version="1.0.0",
    )
    ex = {e.device_id: e for e in executions(store.rollouts, rid)}["car-1"]
    assert (ex.state, ex.running_version) == ("ROLLED_BACK", "1.0.0")


def test_install_windows_and_waiting_devices(store: Repositories) -> None:
    add_device(store, "car-tokyo", time_zone="Asia/Tokyo")
    pub = FakePublisher(online={"car-0", "car-1", "car-2", "car-tokyo"})
    ctl = controller(store, pub)
    rid = ctl.create(
        policy(
            phases=ALL,
            success={"timeout": "2d"},
            maintenance={"windows": [{"cron": "0 3 * * *", "duration": "1h"}], "default_time_zone": "UTC"},
        ),
        now=0.0,
    )
    ctl.tick(1.0)
    jobs = {j.job_id.split(":")[1]: j for j in pub.jobs}
    assert jobs["car-0"].windows[0] == (3 * 3600.0, 4 * 3600.0)  # 03:00 UTC on 1 January 1970
    assert jobs["car-tokyo"].windows[0] == (18 * 3600.0, 19 * 3600.0)  # 03:00 in Tokyo = 18:00 UTC
    ctl.on_device_status("car-0", f"{rid}:car-0", "VERIFIED", "waiting for the window", 2.0, waiting=True)
    ex = {e.device_id: e for e in executions(store.rollouts, rid)}["car-0"]
    assert ex.state == "WAITING" and ex.install_windows[0] == [3 * 3600.0, 4 * 3600.0]


def test_approval_opens_the_next_phase(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(success={"action": "pause"}), now=0.0)
    canary = phase_members(store, rid, 0)[0]
    ctl.tick(1.0)
    report(ctl, rid, canary, "COMMITTED", now=2.0)
    ctl.tick(3.0)
    assert status(store, rid).state == "WAITING_APPROVAL"
    ctl.tick(50.0)
    assert len(pub.sent) == 1
    actions(store, ctl).approve(rid, 51.0)
    ctl.tick(52.0)
    st = status(store, rid)
    assert (st.state, st.phase) == ("RUNNING", 1) and len(pub.sent) == 3


def test_continuous_targets_take_devices_registered_later(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2", "car-late"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(target={"selector": "fleet=taxi", "selection": "continuous"}), now=0.0)
    add_device(store, "car-late")
    add_device(store, "bus-late", fleet="bus")
    ctl.tick(1.0)
    members = {d.device_id: d.phase for d in status(store, rid).devices}
    assert members["car-late"] == 1 and "bus-late" not in members
    assert "car-late" not in [d for d, _, _ in pub.sent]  # joined the last phase: not offered yet


# ------------------------------------------------------------------ gates and roll-backs


@dataclass
class FakeInputs:
    """Gate inputs as the fleet store would give them: captures per cohort."""

    counts: RateCounts = field(default_factory=lambda: RateCounts(0, 0.0, 0, 0.0))
    seen: list[Cohorts] = field(default_factory=list)

    def capture_counts(self, campaign: str, cohorts: Cohorts, now: float) -> RateCounts:
        self.seen.append(cohorts)
        return self.counts

    def device_values(self, aggregate: str, where: str, cohorts: Cohorts, now: float) -> DeviceValues:
        return DeviceValues([], [])


@dataclass
class FakeLog:
    lines: list[tuple[str, ...]] = field(default_factory=list)

    def transition(self, rollout_id: str, before: str, after: str, reason: str, now: float) -> None:
        self.lines.append(("transition", rollout_id, before, after))

    def gate(self, rollout_id: str, evaluation: NewGateEvaluation, now: float) -> None:
        self.lines.append(("gate", rollout_id, evaluation.gate, evaluation.decision))

    def created(self, rollout_id: str, parent_id: str, detail: str, now: float) -> None:
        self.lines.append(("created", rollout_id, parent_id))


GATE = {
    "name": "harsh",
    "capture_rate": {"campaign": "harsh-braking"},
    "min_devices": 1,
    "min_exposure": "1h",
    "interval": "10s",
    "min_effect": 0.2,
}


def test_a_tripped_gate_aborts_and_rolls_the_canary_back(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    inputs, log = FakeInputs(), FakeLog()
    ctl = controller(store, pub, gate_inputs=inputs, log_to=log)
    rid = ctl.create(policy(gates=[GATE]), now=0.0)
    canary = phase_members(store, rid, 0)[0]
    ctl.tick(1.0)
    ctl.on_device_status(canary, f"{rid}:{canary}", "COMMITTED", "", 2.0, running_version="2.0.0")
    store.devices.update_inventory(
        canary, Inventory("sim-a", "2.0.0", "22" * 32, "b", 0), 2.0
    )  # as agents do
    inputs.counts = RateCounts(40, 10.0, 30, 20.0)  # 4 captures per device-hour against 1.5: trip
    ctl.tick(12.0)
    assert inputs.seen[-1] == Cohorts({canary: 2.0}, dict.fromkeys(phase_members(store, rid, 1), 2.0))
    st = status(store, rid)
    assert st.state == "ABORTED" and st.reason.startswith("signal gate 'harsh' tripped")
    assert [g.decision for g in st.gates] == ["trip"]  # the latest per gate
    assert st.gates[0].inputs["treated_events"] == 40.0
    (rb,) = st.rollbacks
    back = status(store, rb)
    assert (back.parent_id, back.release_version, back.state) == (rid, "1.0.0", "RUNNING")
    assert [d.device_id for d in back.devices] == [canary]
    assert ("created", rb, rid) in log.lines and ("gate", rid, "harsh", "trip") in log.lines
    events = [(h.event, h.detail) for h in history(store.rollouts, rid).events]
    assert any(e == "gate" and "harsh: trip" in d for e, d in events)
    assert any(e == "rollback" and rb in d for e, d in events)
    ctl.tick(13.0)  # the roll-back offers the canary its previous release
    assert pub.jobs[-1].rollout_id == rb and manifest_from_bytes(pub.jobs[-1].manifest).version == "1.0.0"
    assert all(d not in [x for x, _, _ in pub.sent] for d in phase_members(store, rid, 1))  # never offered
    ctl.on_device_status(canary, f"{rb}:{canary}", "COMMITTED", "", 14.0, running_version="1.0.0")
    ctl.tick(15.0)
    assert status(store, rb).state == "SUCCEEDED"


def test_a_gate_without_evidence_holds_the_phase_and_passes_it_later(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    inputs = FakeInputs()
    ctl = controller(store, pub, gate_inputs=inputs)
    rid = ctl.create(policy(gates=[GATE]), now=0.0)
    canary = phase_members(store, rid, 0)[0]
    ctl.tick(1.0)
    report(ctl, rid, canary, "COMMITTED", now=2.0)
    inputs.counts = RateCounts(1, 0.5, 3, 1.0)  # below the minimum exposure
    ctl.tick(12.0)
    st = status(store, rid)
    assert (st.state, st.phase, st.gates[0].decision) == ("RUNNING", 0, "insufficient")
    inputs.counts = RateCounts(10, 5.0, 21, 10.0)
    ctl.tick(15.0)  # within the interval: not evaluated again
    assert len(history(store.rollouts, rid).gate_evaluations) == 2
    ctl.tick(23.0)
    st = status(store, rid)
    assert (st.state, st.phase) == ("RUNNING", 1)
    decisions = [g.decision for g in history(store.rollouts, rid).gate_evaluations]
    assert decisions == ["insufficient", "insufficient", "pass"]  # no updated device yet; too little exposure


def test_operator_roll_back_undo_and_retry(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    act = actions(store, ctl)
    ctl.create(policy(release={"version": "1.0.0"}, phases=ALL), now=0.0)  # everyone runs it already
    ctl.tick(1.0)
    r2 = ctl.create(policy(phases=ALL, abort=[{"threshold_percent": 100}]), now=2.0)
    ctl.tick(3.0)
    for d in ("car-0", "car-1"):
        report(ctl, r2, d, "COMMITTED", now=4.0)
    report(ctl, r2, "car-2", "FAILED", now=4.0)
    assert [(r.revision, r.release_version) for r in revisions(store.rollouts)] == [
        (1, "1.0.0"),
        (2, "2.0.0"),
    ]
    assert act.retry(r2, 5.0) == ["car-2"]
    with pytest.raises(StateError, match="no failed device"):
        act.retry(r2, 5.0)
    ctl.tick(66.0)
    assert pub.sent[-1] == ("car-2", f"{r2}:car-2#2", r2)
    with pytest.raises(StateError, match=r"the release .* rolls out already"):
        act.roll_back(r2, 67.0, to_revision=2)
    (undo,) = act.roll_back(r2, 67.0, to_revision=1)
    st = status(store, r2)
    assert st.state == "ABORTED" and st.rollbacks == [undo]
    assert sorted(d.device_id for d in status(store, undo).devices) == ["car-0", "car-1", "car-2"]
    with pytest.raises(NotFoundError, match="no revision 9"):
        act.roll_back(r2, 68.0, to_revision=9)
    with pytest.raises(StateError, match="rolled back already"):
        act.roll_back(r2, 68.0)


def test_an_aborted_rollout_withdraws_the_jobs_devices_hold_once_each(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1"})  # car-2 is offline
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    report(ctl, rid, "car-0", "DOWNLOADING", now=2.0)
    report(ctl, rid, "car-1", "COMMITTED", now=2.0)
    actions(store, ctl).abort(rid, now=3.0)
    ctl.tick(4.0)
    # car-0 holds the job; car-1 finished it; car-2 was offered it but is not here
    why = f"rollout {rid} aborted: aborted by operator"
    assert pub.withdrawn == [("car-0", job_id_for(rid, "car-0"), why)]
    ctl.tick(5.0)
    assert len(pub.withdrawn) == 1  # told once
    report(ctl, rid, "car-0", "DOWNLOADING", now=6.0)  # it did not drop it (it was offline): told again now
    assert len(pub.withdrawn) == 2
    report(ctl, rid, "car-0", "CANCELED", now=7.0)
    devices = {d.device_id: d for d in status(store, rid).devices}
    assert devices["car-0"].state == "CANCELED" and devices["car-1"].state == "COMMITTED"
    pub.online.add("car-2")  # comes online: told on the next tick
    ctl.tick(8.0)
    assert pub.withdrawn[-1][0] == "car-2" and len(pub.withdrawn) == 3
    ctl.tick(8.0 + 3600 * 2)  # long after the abort, nothing is pushed any more
    assert len(pub.withdrawn) == 3
    # an agent that predates withdrawals ignored it and finished the job: recorded as it ended
    report(ctl, rid, "car-2", "COMMITTED", now=9.0 + 3600 * 2)
    assert {d.device_id: d.state for d in status(store, rid).devices}["car-2"] == "COMMITTED"
    assert len(pub.withdrawn) == 3
