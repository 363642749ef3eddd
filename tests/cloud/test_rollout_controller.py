"""Rollout controller on a real SQLite metadata store with an in-memory publisher (the device side)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetloop_cloud.metadata import MetadataStore, RolloutDeviceRecord, RolloutUpdate
from fleetloop_cloud.rollout_controller import RolloutController, job_id_for
from fleetloop_cloud.rollout_planner import PhaseSpec, RolloutPolicy
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


def put_release(store: MetadataStore, version: str = "2.0.0", hardware: str = "sim-a", *, name: str = "fw",
                install: str = "slot", created: float = 0.0) -> None:
    sha = sha256_hex(IMAGE)
    manifest = ReleaseManifest(
        name=name, version=version, hardware_id=hardware, target_sha256=sha, target_size=len(IMAGE),
        payloads=(PayloadRef("full", "none", f"files/{sha}", sha, len(IMAGE), None),),
        created_unix=0, expires_unix=10**9, install=install,
    )
    data = manifest_to_bytes(manifest)
    store.put_release(name, version, hardware, data, SIGNER.sign(data), created)


def add_device(store: MetadataStore, device_id: str, *, fleet: str = "taxi", hardware: str = "sim-a",
               version: str = "1.0.0", **labels: str) -> None:
    store.upsert_device(device_id, fleet=fleet, labels=labels or {"kind": "car"}, catalog=[],
                        agent_version="0.1.0", data_origin="simulated", now=0.0)
    store.update_inventory(device_id, hardware_id=hardware, firmware_version=version,
                           firmware_sha256="00" * 32, active_slot="a", campaigns_version=0, now=0.0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "metadata.sqlite"


@pytest.fixture
def store(db_path: Path) -> MetadataStore:
    s = MetadataStore(db_path)
    put_release(s)
    for i in range(3):
        add_device(s, f"car-{i}")
    return s


def policy(**kw: object) -> RolloutPolicy:
    fields: dict[str, object] = {
        "release_version": "2.0.0",
        "selector": "fleet=taxi",
        "phases": (PhaseSpec("canary", percent=33), PhaseSpec("rest", percent=100)),
    }
    fields.update(kw)
    return RolloutPolicy(**fields)  # type: ignore[arg-type]


def phase_members(ctl: RolloutController, rid: str, phase: int) -> list[str]:
    return [d["device_id"] for d in ctl.status(rid)["devices"] if d["phase"] == phase]


def report(ctl: RolloutController, rid: str, device: str, *states: str, now: float = 1.0) -> None:
    for s in states:
        reason = "hash mismatch" if s == "FAILED" else ""
        ctl.on_device_status(device, job_id_for(rid, device), s, reason, now)


def test_two_phase_rollout_to_success(store: MetadataStore) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = RolloutController(store, pub)
    rid = ctl.create(policy(), now=0.0)
    canary = phase_members(ctl, rid, 0)
    rest = phase_members(ctl, rid, 1)
    assert len(canary) == 1 and len(rest) == 2
    ctl.tick(1.0)
    assert pub.sent == [(canary[0], f"{rid}:{canary[0]}", rid)]
    ctl.tick(2.0)  # delivered already: not sent again, phase 2 still closed
    assert len(pub.sent) == 1
    report(ctl, rid, canary[0], "QUEUED", "DOWNLOADING", "REBOOTING", "COMMITTED", now=3.0)
    ctl.tick(4.0)
    assert sorted(d for d, _, _ in pub.sent[1:]) == sorted(rest)
    status = ctl.status(rid)
    assert status["phase"] == 1 and status["state"] == "RUNNING"
    assert status["phases"][0] == {"name": "canary", "devices": 1, "committed": 1, "failed": 0}
    for d in rest:
        report(ctl, rid, d, "COMMITTED", now=5.0)
    ctl.tick(6.0)
    status = ctl.status(rid)
    assert status["state"] == "SUCCEEDED"
    assert status["counts"]["COMMITTED"] == 3
    assert status["reason"] == "all 3 devices committed"
    events = [h["event"] for h in ctl.history(rid)]
    assert events[0] == "created" and "phase" in events and events[-1] == "succeeded"
    assert sum(1 for h in ctl.history(rid) if h["event"] == "device") >= 3 * 2
    assert [r["id"] for r in ctl.list()] == [rid]


def test_decision_is_persisted_before_the_job_is_published(store: MetadataStore) -> None:
    seen: list[tuple[str, bool, bool]] = []

    def inspect(device_id: str, job_id: str, rollout_id: str) -> None:
        devs = {d.device_id: d for d in store.rollout_devices(rollout_id)}
        audited = any(device_id in a.detail and "OFFERED" in a.detail for a in store.audit(rollout_id))
        seen.append((devs[device_id].state, devs[device_id].delivered, audited))

    pub = FakePublisher(online={"car-0", "car-1", "car-2"}, inspect=inspect)
    ctl = RolloutController(store, pub)
    ctl.create(policy(), now=0.0)
    ctl.tick(1.0)
    assert seen == [("OFFERED", False, True)]


def test_offline_devices_get_the_job_again_until_delivered(store: MetadataStore) -> None:
    pub = FakePublisher(online=set())
    ctl = RolloutController(store, pub)
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


def test_brake_pauses_and_resume_accepts_the_failures(store: MetadataStore) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = RolloutController(store, pub)
    rid = ctl.create(policy(), now=0.0)
    canary = phase_members(ctl, rid, 0)[0]
    ctl.tick(1.0)
    report(ctl, rid, canary, "DOWNLOADING", "FAILED", now=2.0)
    ctl.tick(3.0)
    status = ctl.status(rid)
    assert status["state"] == "PAUSED"
    assert status["reason"] == "failure rate 100% (1 of 1) above 20%"
    assert {d["device_id"]: d["reason"] for d in status["devices"]}[canary] == "hash mismatch"
    ctl.tick(100.0)
    assert len(pub.sent) == 1  # paused: nobody else is offered anything
    with pytest.raises(StateError):
        ctl.pause(rid, 101.0)
    ctl.resume(rid, 102.0)
    ctl.tick(103.0)
    status = ctl.status(rid)
    assert status["state"] == "RUNNING" and status["phase"] == 1
    assert status["accepted_failures"] == [canary]
    assert len(pub.sent) == 3
    assert any(h["event"] == "resumed" and canary in h["detail"] for h in ctl.history(rid))


def test_operator_pause_abort_and_state_errors(store: MetadataStore) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = RolloutController(store, pub)
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
    assert pub.sent == [] and ctl.status(rid)["state"] == "ABORTED"
    with pytest.raises(NotFoundError):
        ctl.pause("ro-missing", 1.0)
    with pytest.raises(NotFoundError):
        ctl.status("ro-missing")


def test_a_restarted_controller_resumes_from_the_database(store: MetadataStore, db_path: Path) -> None:
    class Crash(Exception):
        pass

    def crash(device_id: str, job_id: str, rollout_id: str) -> None:
        raise Crash  # the coordinator dies right after persisting the offer

    first = RolloutController(store, FakePublisher(online={"car-0", "car-1", "car-2"}, inspect=crash))
    rid = first.create(policy(), now=0.0)
    with pytest.raises(Crash):
        first.tick(1.0)
    store.close()

    reopened = MetadataStore(db_path)
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    second = RolloutController(reopened, pub)
    second.tick(2.0)
    canary = phase_members(second, rid, 0)[0]
    assert [d for d, _, _ in pub.sent] == [canary]  # the offer that never went out is published now
    report(second, rid, canary, "COMMITTED", now=3.0)
    second.tick(4.0)
    assert second.status(rid)["phase"] == 1
    assert len(pub.sent) == 3


def test_targets_follow_selector_and_hardware(store: MetadataStore) -> None:
    add_device(store, "bus-1", fleet="bus")
    add_device(store, "car-other-hw", hardware="sim-b")
    add_device(store, "car-new", version="2.0.0")  # already runs the release
    store.upsert_device("car-no-inventory", fleet="taxi", labels={"kind": "car"}, catalog=[],
                        agent_version="0.1.0", data_origin="simulated", now=0.0)
    ctl = RolloutController(store, FakePublisher())
    rid = ctl.create(policy(phases=(PhaseSpec("all"),)), now=0.0)
    devices = {d["device_id"]: d for d in ctl.status(rid)["devices"]}
    assert sorted(devices) == ["car-0", "car-1", "car-2", "car-new", "car-no-inventory"]
    assert devices["car-new"]["state"] == "COMMITTED"
    assert devices["car-new"]["reason"] == "already running 2.0.0"
    rid2 = ctl.create(policy(selector="fleet=bus", phases=(PhaseSpec("all"),)), now=0.0)
    assert [d["device_id"] for d in ctl.status(rid2)["devices"]] == ["bus-1"]


def test_create_refuses_unknown_release_empty_target_and_bad_selector(store: MetadataStore) -> None:
    ctl = RolloutController(store, FakePublisher())
    with pytest.raises(NotFoundError, match=r"9\.9\.9"):
        ctl.create(policy(release_version="9.9.9"), now=0.0)
    with pytest.raises(UserError, match="matches no device"):
        ctl.create(policy(selector="fleet=ships"), now=0.0)
    with pytest.raises(RuleError):
        ctl.create(policy(selector="fleet=,,=="), now=0.0)
    assert store.rollouts() == []


def test_a_model_pack_sharing_the_firmware_version_needs_a_name(store: MetadataStore) -> None:
    """A model pack "2.0.0" uploaded after firmware "2.0.0": a bare version is refused as ambiguous,
    and a rollout created before the pack existed keeps delivering the firmware."""
    add_device(store, "car-new", version="2.0.0")
    pub = FakePublisher(online={"car-0", "car-1", "car-2", "car-new"})
    ctl = RolloutController(store, pub)
    fw_rollout = ctl.create(policy(phases=(PhaseSpec("all"),)), now=0.0)
    put_release(store, name="detector", install="swap", created=1.0)
    with pytest.raises(UserError, match=r"several releases have version '2\.0\.0' \(detector, fw\)"):
        ctl.create(policy(), now=2.0)
    pack = ctl.create(policy(release_name="detector", phases=(PhaseSpec("all"),)), now=2.0)
    # The inventory reports firmware only: no device counts as already running the pack.
    assert {d["state"] for d in ctl.status(pack)["devices"]} == {"PENDING"}
    fw_devices = {d["device_id"]: d["state"] for d in ctl.status(fw_rollout)["devices"]}
    assert fw_devices["car-new"] == "COMMITTED"
    ctl.tick(4.0)
    assert {d["state"] for d in ctl.status(pack)["devices"]} == {"OFFERED"}
    names = {
        rid: {manifest_name(m) for _job, offered, m, _sig in ctl.offered_jobs("car-0") if offered == rid}
        for rid in (fw_rollout, pack)
    }
    assert names == {fw_rollout: {"fw"}, pack: {"detector"}}
    with pytest.raises(NotFoundError, match=r"release nope 2\.0\.0 does not exist"):
        ctl.create(policy(release_name="nope"), now=3.0)


def manifest_name(manifest: bytes) -> str:
    return manifest_from_bytes(manifest).name


def test_device_reports_are_filtered(store: MetadataStore) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = RolloutController(store, pub)
    rid = ctl.create(policy(phases=(PhaseSpec("all"),)), now=0.0)
    ctl.tick(1.0)

    def state_of(device: str) -> str:
        return str({d["device_id"]: d["state"] for d in ctl.status(rid)["devices"]}[device])

    ctl.on_device_status("car-1", f"{rid}:car-0", "COMMITTED", "", 2.0)  # someone else's job
    ctl.on_device_status("car-0", "ro-unknown:car-0", "COMMITTED", "", 2.0)  # unknown rollout
    ctl.on_device_status("car-0", "garbage", "COMMITTED", "", 2.0)
    ctl.on_device_status("car-0", f"{rid}:car-0", "EXPLODED", "", 2.0)  # unknown state
    assert state_of("car-0") == "OFFERED"
    ctl.on_device_status("car-0", f"{rid}:car-0", "OTA_STATE_INSTALLING", "", 3.0)
    assert state_of("car-0") == "IN_PROGRESS"
    assert {d["device_id"]: d["reason"] for d in ctl.status(rid)["devices"]}["car-0"] == "INSTALLING"
    ctl.on_device_status("car-0", f"{rid}:car-0", "ROLLED_BACK", "booted slot a after 2 tries", 4.0)
    ctl.on_device_status("car-0", f"{rid}:car-0", "COMMITTED", "", 5.0)  # terminal is final
    assert state_of("car-0") == "ROLLED_BACK"
    ctl.on_device_status("car-1", f"{rid}:car-1", "CANCELED", "x" * 5000, 6.0)
    status = ctl.status(rid)
    entry = {d["device_id"]: d for d in status["devices"]}["car-1"]
    assert entry["state"] == "FAILED" and len(entry["reason"]) <= 500


class Interleaving(MetadataStore):
    """A coordinator's metadata store on the shared database that lets another coordinator act right
    after this one has read a rollout's devices — between its decision and its write."""

    between: Callable[[], None] | None = None

    def rollout_devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        devices = super().rollout_devices(rollout_id)
        act, self.between = self.between, None
        if act is not None:
            act()
        return devices


def test_a_stale_decision_never_overwrites_another_coordinators_change(db_path: Path) -> None:
    """Two coordinators share the database: A decides the canary phase is done while B's operator
    pauses the rollout. A's write must be dropped (the pause stands); the next tick decides afresh."""
    shared = MetadataStore(db_path)
    put_release(shared)
    for i in range(3):
        add_device(shared, f"car-{i}")
    online = {"car-0", "car-1", "car-2"}
    a_store = Interleaving(db_path)
    a = RolloutController(a_store, FakePublisher(online=online))
    b = RolloutController(shared, FakePublisher())
    rid = a.create(policy(), now=0.0)
    a.tick(1.0)
    report(a, rid, phase_members(a, rid, 0)[0], "COMMITTED", now=2.0)

    a_store.between = lambda: b.pause(rid, now=3.0)
    a.tick(4.0)  # would open phase 2 and write RUNNING over the pause without the check
    status = b.status(rid)
    assert (status["state"], status["phase"], status["reason"]) == ("PAUSED", 0, "paused by operator")
    assert {d["state"] for d in status["devices"] if d["phase"] == 1} == {"PENDING"}

    # Operators on both coordinators: A resumes while B aborts between A's check and A's write.
    a_store.between = lambda: b.abort(rid, now=5.0)
    with pytest.raises(StateError, match="is aborted; only a paused one can resume"):
        a.resume(rid, now=5.0)
    assert b.status(rid)["state"] == "ABORTED"
    a.tick(6.0)
    assert a.status(rid)["state"] == "ABORTED"


def test_stale_write_is_refused_by_the_store(store: MetadataStore) -> None:
    ctl = RolloutController(store, FakePublisher())
    rid = ctl.create(policy(), now=0.0)
    record = store.rollout(rid)
    assert record is not None
    stale = RolloutUpdate(state="SUCCEEDED", expect=("PAUSED", 0))
    assert store.update_rollout(rid, stale, 1.0) is False
    assert store.rollout(rid).state == record.state  # type: ignore[union-attr]
    assert store.update_rollout(rid, RolloutUpdate(reason="x", expect=(record.state, record.phase)), 1.0)
