"""Taking one device out of a running rollout (``rollout remove``): the pure decisions (what a removal
changes, who is told to drop a job, what the planner still counts), the repositories of every backend
(in-memory, SQLite, PostgreSQL), and the controller with the operator's action over them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from fleetloop_cloud.repositories import Repositories, open_repositories
from fleetloop_cloud.repositories.records import (
    DeviceChange,
    NewRollout,
    RolloutDeviceRecord,
    RolloutRecord,
    RolloutUpdate,
)
from fleetloop_cloud.rollout.controller import _views, job_id_for
from fleetloop_cloud.rollout.planner import DevicePhaseState, RolloutPlanner, RolloutState, RolloutView
from fleetloop_cloud.rollout.withdrawals import in_play, removal, withdrawn
from fleetloop_shared.errors import NotFoundError, StateError
from tests.cloud.test_rollout_controller import (
    ALL,
    FakePublisher,
    actions,
    controller,
    manifest_name,
    policy,
    put_release,
    report,
    status,
    store,
)

__all__ = ["store"]  # the fixture, imported

S = DevicePhaseState
STATES = list(DevicePhaseState)


def record(rid: str = "ro-1", state: str = "RUNNING") -> RolloutRecord:
    return RolloutRecord(rid, "2.0.0", {}, state, 0, 0.0, "", frozenset(), 0.0, 0.0, 1, "")


def device(
    device_id: str, state: DevicePhaseState, *, phase: int = 0, attempt: int = 1, removed_at: float = 0.0
) -> RolloutDeviceRecord:
    return RolloutDeviceRecord(
        "ro-1", device_id, phase, state.value, "", True, 0.0, attempt if state is not S.PENDING else 0,
        removed_at=removed_at, removed_by="rm" if removed_at else "",
        removed_reason="sold" if removed_at else "",
    )  # fmt: skip


# -- the pure decisions ----------------------------------------------------------------------------


def test_a_pending_device_is_canceled_at_once_and_one_holding_the_job_keeps_its_state() -> None:
    pending = removal(device("a", S.PENDING), "rm", "sold", 5.0)
    assert (pending.state, pending.only_from, pending.removal) == ("CANCELED", "PENDING", (5.0, "rm", "sold"))
    assert pending.reason == "removed from the rollout by rm: sold"
    for state in (S.OFFERED, S.IN_PROGRESS, S.WAITING, S.COMMITTED, S.FAILED):
        change = removal(device("a", state), "rm", "", 5.0)
        # recorded, never a state the device did not report (installing: it finishes as it must)
        assert change == DeviceChange(removal=(5.0, "rm", ""))


def test_only_removed_devices_holding_the_job_are_told_to_drop_it() -> None:
    members = [
        device("offered", S.OFFERED, removed_at=10.0),
        device("installing", S.IN_PROGRESS, removed_at=10.0),
        device("waiting", S.WAITING, removed_at=10.0),
        device("done", S.COMMITTED, removed_at=10.0),
        device("kept", S.IN_PROGRESS),
    ]
    told = withdrawn(record(), members, 20.0, job_id_for)
    assert sorted(w.device_id for w in told) == ["installing", "offered", "waiting"]
    assert {w.reason for w in told} == {"removed from the rollout by rm: sold"}
    assert told[0].job_id == job_id_for("ro-1", told[0].device_id)
    assert withdrawn(record(), members, 10.0 + 3601, job_id_for) == []  # pushed for an hour, then on report


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(STATES), st.booleans(), st.integers(0, 1)), min_size=1, max_size=12
    ),
    st.sampled_from([RolloutState.RUNNING, RolloutState.CREATED]),
)
def test_the_planner_never_offers_times_out_or_waits_for_a_removed_device(
    fleet: list[tuple[DevicePhaseState, bool, int]], state: RolloutState
) -> None:
    """Whatever the fleet: no removed device is offered, re-offered, timed out or canceled by the planner,
    and the rollout decides exactly as it would for the fleet without them."""
    members = [
        device(f"d{i}", s, phase=phase, removed_at=7.0 if removed else 0.0)
        for i, (s, removed, phase) in enumerate(fleet)
    ]
    removed = {d.device_id for d in members if d.removed_at}
    planner = RolloutPlanner(policy(phases=[{"name": "a", "percent": 50}, {"name": "b", "percent": 100}]))
    now = 10_000.0

    def decide(devices: list[RolloutDeviceRecord]) -> object:
        view = RolloutView(state=state, phase=0, phase_started_at=0.0, devices=_views(devices, {}))
        return planner.decide(view, now)

    decision = decide(in_play(members))
    touched = (
        {o.device_id for o in decision.offers}  # type: ignore[attr-defined]
        | {o.device_id for o in decision.reoffers}  # type: ignore[attr-defined]
        | set(decision.timeouts)  # type: ignore[attr-defined]
        | set(decision.cancel)  # type: ignore[attr-defined]
    )
    assert not touched & removed
    assert decision == decide([d for d in members if d.device_id not in removed])


# -- the repositories (every backend) ---------------------------------------------------------------


def test_a_removal_is_stored_once_with_who_when_and_why(repos: Repositories) -> None:
    rollouts = repos.rollouts
    rollouts.create(NewRollout("ro-1", "2.0.0", {}, "RUNNING", 0, "", {"a": 0, "b": 0}, "PENDING"), 1.0)
    rollouts.set_device("ro-1", "b", DeviceChange(state="IN_PROGRESS"), 2.0)
    rollouts.update("ro-1", RolloutUpdate(devices={"a": DeviceChange(removal=(3.0, "rm", "sold"))}), 3.0)
    rollouts.update("ro-1", RolloutUpdate(devices={"a": DeviceChange(removal=(4.0, "other", "again"))}), 4.0)
    got = {d.device_id: d for d in rollouts.devices("ro-1")}
    assert (got["a"].removed_at, got["a"].removed_by, got["a"].removed_reason) == (3.0, "rm", "sold")
    assert (got["b"].removed_at, got["b"].removed_by, got["b"].removed_reason) == (0.0, "", "")
    assert got["a"].state == "PENDING"  # a removal alone changes no state
    # a later report still moves the removed device's state; the removal stays
    rollouts.set_device("ro-1", "a", DeviceChange(state="COMMITTED"), 5.0)
    (a,) = [d for d in rollouts.of_device("a")]
    assert (a.state, a.removed_at) == ("COMMITTED", 3.0)


def test_a_database_made_before_removals_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    repos = open_repositories(path)
    repos.rollouts.create(NewRollout("ro-old", "2.0.0", {}, "RUNNING", 0, "", {"a": 0}, "PENDING"), 1.0)
    repos.close()
    with sqlite3.connect(path) as db:  # as a database written before removals existed
        for column in ("removed_at", "removed_by", "removed_reason"):
            db.execute(f"ALTER TABLE rollout_devices DROP COLUMN {column}")
    repos = open_repositories(path)
    (a,) = repos.rollouts.devices("ro-old")
    assert (a.state, a.removed_at, a.removed_by, a.removed_reason) == ("PENDING", 0.0, "", "")
    repos.rollouts.set_device("ro-old", "a", DeviceChange(removal=(2.0, "rm", "")), 2.0)
    assert repos.rollouts.devices("ro-old")[0].removed_at == 2.0
    repos.close()


# -- the controller and the operator's action ------------------------------------------------------


def test_removing_devices_mid_rollout(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    report(ctl, rid, "car-0", "DOWNLOADING", now=2.0)
    report(ctl, rid, "car-1", "INSTALLING", now=2.0)
    act = actions(store, ctl)
    assert act.remove(rid, "car-0", "rm", "sold", 3.0) is True
    assert act.remove(rid, "car-1", "rm", "at the workshop", 3.0) is True
    assert act.remove(rid, "car-0", "someone", "twice", 3.5) is False  # idempotent: the first stands
    with pytest.raises(NotFoundError, match="not part of rollout"):
        act.remove(rid, "car-9", "rm", "", 3.0)
    with pytest.raises(NotFoundError):
        act.remove("ro-none", "car-0", "rm", "", 3.0)
    ctl.tick(4.0)
    # both hold the job: told to drop it (car-1 is installing: its agent finishes, as it must)
    assert sorted(d for d, _, _ in pub.withdrawn) == ["car-0", "car-1"]
    assert ("car-0", job_id_for(rid, "car-0"), "removed from the rollout by rm: sold") in pub.withdrawn
    report(ctl, rid, "car-0", "CANCELED", now=5.0)
    report(ctl, rid, "car-1", "FAILED", now=5.0)  # not counted as a failure, never retried
    report(ctl, rid, "car-2", "COMMITTED", now=5.0)
    ctl.tick(6.0)
    st = status(store, rid)
    assert st.state == "SUCCEEDED", st.reason
    devices = {d.device_id: d for d in st.devices}
    assert devices["car-0"].state == "CANCELED" and devices["car-1"].state == "FAILED"
    assert (devices["car-0"].removed_by, devices["car-0"].removed_reason) == ("rm", "sold")
    assert devices["car-0"].removed_at == 3.0 and devices["car-2"].removed_at is None
    assert st.phases[0].devices == 1 and st.phases[0].removed == 2 and st.phases[0].failed == 0
    events = [(a.event, a.detail) for a in store.rollouts.audit(rid)]
    assert ("removed", "car-0: removed by rm: sold") in events
    with pytest.raises(StateError, match="succeeded"):
        act.remove(rid, "car-2", "rm", "", 7.0)
    assert act.remove(rid, "car-0", "rm", "", 7.0) is False  # still idempotent once it is over


def test_a_removed_device_is_never_offered_by_a_later_phase_nor_retried(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(), now=0.0)  # canary 1 device, then the other 2
    canary = next(d.device_id for d in status(store, rid).devices if d.phase == 0)
    later = sorted(d.device_id for d in status(store, rid).devices if d.phase == 1)
    act = actions(store, ctl)
    act.remove(rid, later[0], "rm", "sold", 0.5)
    ctl.tick(1.0)
    report(ctl, rid, canary, "COMMITTED", now=2.0)
    ctl.tick(3.0)
    offered = [d for d, _, _ in pub.sent]
    assert later[0] not in offered and later[1] in offered
    assert {d.device_id: d.state for d in status(store, rid).devices}[later[0]] == "CANCELED"
    assert ctl.offered_jobs(later[0]) == []  # nor on the polling path
    report(ctl, rid, later[1], "COMMITTED", now=4.0)
    ctl.tick(5.0)
    assert status(store, rid).state == "SUCCEEDED"


def test_a_removed_offline_device_is_not_waited_for_and_its_offer_is_not_polled(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1"})  # car-2 offline: offered, never delivered
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    assert ctl.offered_jobs("car-2")
    actions(store, ctl).remove(rid, "car-2", "rm", "scrapped", 2.0)
    assert ctl.offered_jobs("car-2") == []
    report(ctl, rid, "car-0", "COMMITTED", now=3.0)
    report(ctl, rid, "car-1", "COMMITTED", now=3.0)
    ctl.tick(4.0)
    assert status(store, rid).state == "SUCCEEDED"
    pub.online.add("car-2")
    sent = len(pub.sent)
    ctl.tick(5.0)
    assert len(pub.sent) == sent  # never delivered after its removal


def test_a_removed_device_is_told_even_after_the_rest_succeeded(store: Repositories) -> None:
    pub = FakePublisher(online={"car-0", "car-1", "car-2"})
    ctl = controller(store, pub)
    rid = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    report(ctl, rid, "car-2", "DOWNLOADING", now=2.0)
    pub.online.discard("car-2")  # out of reach when it is removed
    actions(store, ctl).remove(rid, "car-2", "rm", "at the workshop", 3.0)
    report(ctl, rid, "car-0", "COMMITTED", now=4.0)
    report(ctl, rid, "car-1", "COMMITTED", now=4.0)
    ctl.tick(5.0)
    assert status(store, rid).state == "SUCCEEDED" and pub.withdrawn == []
    pub.online.add("car-2")  # back: told on the next tick, though its rollout is over
    ctl.tick(6.0)
    why = "removed from the rollout by rm: at the workshop"
    assert pub.withdrawn == [("car-2", job_id_for(rid, "car-2"), why)]
    ctl.tick(7.0)
    assert len(pub.withdrawn) == 1  # once
    report(ctl, rid, "car-2", "CANCELED", now=8.0)
    assert {d.device_id: d.state for d in status(store, rid).devices}["car-2"] == "CANCELED"


def test_an_offer_removed_before_it_reached_the_device_does_not_hold_it_from_another_rollout(
    store: Repositories,
) -> None:
    pub = FakePublisher(online={"car-0", "car-1"})  # car-2 offline: offered, never delivered
    ctl = controller(store, pub)
    fw = ctl.create(policy(phases=ALL), now=0.0)
    ctl.tick(1.0)
    put_release(store, "3.0.0", name="detector", install="swap", created=1.0)
    pack = ctl.create(policy(release={"name": "detector", "version": "3.0.0"}, phases=ALL), now=2.0)
    ctl.tick(3.0)
    assert {d.device_id: d.state for d in status(store, pack).devices}["car-2"] == "PENDING"  # fw holds it
    actions(store, ctl).remove(fw, "car-2", "rm", "serviced: gets the detector only", 4.0)
    ctl.tick(5.0)
    assert {d.device_id: d.state for d in status(store, pack).devices}["car-2"] == "OFFERED"
    assert [manifest_name(j.manifest) for j in ctl.offered_jobs("car-2")] == ["detector"]
