"""Rollout planner: policy parsing, phase assignment and the decision table (gates, brake, soak, timeout)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.rollout.planner import (
    Decision,
    DevicePhaseState,
    PhaseSpec,
    RolloutPlanner,
    RolloutPolicy,
    RolloutState,
    RolloutView,
    assign_phases,
    policy_from_dict,
    policy_to_dict,
)
from fleetloop_shared.errors import UserError

P = DevicePhaseState


def two_phase_policy(**overrides: Any) -> RolloutPolicy:
    fields: dict[str, Any] = {
        "release_version": "2.0.0",
        "selector": "fleet=taxi",
        "phases": (PhaseSpec("canary", percent=33), PhaseSpec("rest", percent=100)),
    }
    fields.update(overrides)
    return RolloutPolicy(**fields)


def view(
    devices: dict[str, tuple[int, DevicePhaseState]],
    *,
    state: RolloutState = RolloutState.RUNNING,
    phase: int = 0,
    started: float = 0.0,
    accepted: frozenset[str] = frozenset(),
) -> RolloutView:
    return RolloutView(state, phase, started, devices, accepted)


# ------------------------------------------------------------------ policy documents


def test_policy_round_trips_through_plain_data() -> None:
    policy = RolloutPolicy(
        release_version="2.1.0",
        selector="fleet=taxi,hw=gen2",
        phases=(PhaseSpec("canary", count=2, min_soak_s=60), PhaseSpec("half", percent=50),
                PhaseSpec("all", percent=100, min_soak_s=1.5)),
        success_percent=90,
        max_failure_percent=10,
        min_executed_for_brake=3,
        phase_timeout_s=1200,
    )
    assert policy_from_dict(policy_to_dict(policy)) == policy


def test_policy_accepts_duration_strings_and_defaults() -> None:
    policy = policy_from_dict(
        {"release_version": "2.0.0", "phases": [{"name": "a", "percent": 10, "min_soak_s": "5m"},
                                                {"name": "b"}], "phase_timeout_s": "1h"}
    )
    assert policy.selector == ""
    assert policy.phases[0].min_soak_s == 300.0
    assert policy.phase_timeout_s == 3600.0
    assert policy.success_percent == 100.0


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"phases": [{"name": "a"}]}, "release_version"),
        ({"release_version": "2", "phases": []}, "phases"),
        ({"release_version": "2", "phases": "all"}, "phases"),
        ({"release_version": "2", "phases": [{"name": "a", "percent": 120}]}, "phases[0].percent"),
        ({"release_version": "2", "phases": [{"name": "a", "percent": "ten"}]}, "phases[0].percent"),
        ({"release_version": "2", "phases": [{"name": "a", "count": -1}]}, "phases[0].count"),
        ({"release_version": "2", "phases": [{"name": "a", "count": True}]}, "phases[0].count"),
        ({"release_version": "2", "phases": [{"percent": 100}]}, "phases[0].name"),
        ({"release_version": "2", "phases": [{"name": "a", "percent": 50}]}, "phases[0].percent"),
        ({"release_version": "2", "phases": [{"name": "a", "percent": 60}, {"name": "b", "percent": 40}]},
         "phases[1].percent"),
        ({"release_version": "2", "phases": [{"name": "a", "count": 1}, {"name": "a"}]}, "phases[1].name"),
        ({"release_version": "2", "phases": [{"name": "a", "min_soak_s": "soon"}]}, "phases[0].min_soak_s"),
        ({"release_version": "2", "phases": [{"name": "a", "colour": 1}]}, "colour"),
        ({"release_version": "2", "phases": [{"name": "a"}], "brake": 3}, "brake"),
        ({"release_version": "2", "phases": [{"name": "a"}], "success_percent": -1}, "success_percent"),
        ({"release_version": "2", "phases": [{"name": "a"}], "min_executed_for_brake": 0},
         "min_executed_for_brake"),
        ({"release_version": "", "phases": [{"name": "a"}]}, "release_version"),
    ],
)
def test_bad_policy_names_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(UserError) as err:
        policy_from_dict(doc)
    assert field in str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ phase assignment


def test_two_phases_33_then_100() -> None:
    ids = [f"dev-{i}" for i in range(3)]
    phases = assign_phases(ids, two_phase_policy())
    assert sorted(phases) == ids
    assert sorted(phases.values()) == [0, 1, 1]
    ten = assign_phases([f"d{i}" for i in range(10)], two_phase_policy())
    assert sorted(ten.values()).count(0) == 4  # ceil(3.3)


def test_assignment_is_deterministic_and_order_independent() -> None:
    ids = [f"dev-{i}" for i in range(20)]
    a = assign_phases(ids, two_phase_policy())
    b = assign_phases(list(reversed(ids)), two_phase_policy())
    assert a == b
    # Salted by release: another release picks other canaries (for this fixed set of ids it does).
    c = assign_phases(ids, two_phase_policy(release_version="3.0.0"))
    assert {d for d, p in a.items() if p == 0} != {d for d, p in c.items() if p == 0}


def test_counts_and_the_last_phase_takes_the_rest() -> None:
    policy = two_phase_policy(phases=(PhaseSpec("one", count=1), PhaseSpec("two", count=2),
                                      PhaseSpec("rest", count=1)))
    phases = assign_phases([f"d{i}" for i in range(7)], policy)
    sizes = [list(phases.values()).count(i) for i in range(3)]
    assert sizes == [1, 2, 4]


def test_small_percent_still_gets_a_canary_and_duplicates_are_refused() -> None:
    policy = two_phase_policy(phases=(PhaseSpec("c", percent=1), PhaseSpec("all", percent=100)))
    phases = assign_phases(["a", "b", "c"], policy)
    assert list(phases.values()).count(0) == 1
    with pytest.raises(UserError):
        assign_phases(["a", "a"], policy)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=60),
    percents=st.lists(st.floats(min_value=0, max_value=100), min_size=0, max_size=4),
)
def test_every_device_lands_in_exactly_one_phase(n: int, percents: list[float]) -> None:
    cumulative = [*sorted(percents), 100.0]
    policy = two_phase_policy(phases=tuple(PhaseSpec(f"p{i}", percent=p) for i, p in enumerate(cumulative)))
    ids = [f"d{i}" for i in range(n)]
    phases = assign_phases(ids, policy)
    assert sorted(phases) == sorted(ids)
    sizes = [list(phases.values()).count(i) for i in range(len(cumulative))]
    placed = 0
    for i, p in enumerate(cumulative[:-1]):
        before, placed = placed, placed + sizes[i]
        asked = math.ceil(n * p / 100 - 1e-9)
        assert placed >= min(asked, n)  # never fewer than the cumulative share
        assert placed <= max(asked, before + 1)  # never more, except the one forced canary
        if p > 0 and before < n:
            assert sizes[i] >= 1


# ------------------------------------------------------------------ decision table


DEVS = {"a": 0, "b": 1, "c": 1}


def states(**s: DevicePhaseState) -> dict[str, tuple[int, DevicePhaseState]]:
    return {d: (DEVS[d], s.get(d, P.PENDING)) for d in DEVS}


SOAKING = two_phase_policy(
    phases=(PhaseSpec("canary", percent=33, min_soak_s=60), PhaseSpec("rest", percent=100))
)

SCENARIOS: list[tuple[str, RolloutView, float, RolloutPolicy, Decision]] = [
    ("start offers the canary only",
     view(states()), 0.0, two_phase_policy(),
     Decision(RolloutState.RUNNING, 0, ("a",), "phase 1 'canary': 0 of 1 committed, need 100%")),
    ("created rollouts start running",
     view(states(), state=RolloutState.CREATED), 0.0, two_phase_policy(),
     Decision(RolloutState.RUNNING, 0, ("a",), "phase 1 'canary': 0 of 1 committed, need 100%")),
    ("in progress: nothing new to offer",
     view(states(a=P.IN_PROGRESS)), 5.0, two_phase_policy(),
     Decision(RolloutState.RUNNING, 0, (), "phase 1 'canary': 0 of 1 committed, need 100%")),
    ("gate met but soaking",
     view(states(a=P.COMMITTED)), 30.0,
     SOAKING,
     Decision(RolloutState.RUNNING, 0, (), "phase 1 'canary': gate met, soaking until 60")),
    ("gate met and soaked opens phase 2",
     view(states(a=P.COMMITTED)), 61.0,
     SOAKING,
     Decision(RolloutState.RUNNING, 1, ("b", "c"),
              "phase 1 'canary' passed (1 of 1 committed); opening phase 2 'rest'")),
    ("brake pauses",
     view(states(a=P.COMMITTED, b=P.FAILED), phase=1), 70.0, two_phase_policy(),
     Decision(RolloutState.PAUSED, 1, (), "failure rate 50% (1 of 2) above 20%")),
    ("rolled back counts as a failure",
     view(states(a=P.ROLLED_BACK)), 1.0, two_phase_policy(),
     Decision(RolloutState.PAUSED, 0, (), "failure rate 100% (1 of 1) above 20%")),
    ("brake waits for enough executions",
     view(states(a=P.FAILED)), 1.0, two_phase_policy(min_executed_for_brake=2),
     Decision(RolloutState.RUNNING, 0, (), "phase 1 'canary': 0 of 1 committed, need 100%")),
    ("rejected is executed but not a failure",
     view(states(a=P.COMMITTED, b=P.REJECTED, c=P.IN_PROGRESS), phase=1), 1.0,
     two_phase_policy(max_failure_percent=0),
     Decision(RolloutState.RUNNING, 1, (), "phase 2 'rest': 0 of 2 committed, need 100%")),
    ("last phase gate met but devices still working",
     view(states(a=P.COMMITTED, b=P.COMMITTED, c=P.IN_PROGRESS), phase=1), 99.0,
     two_phase_policy(success_percent=50),
     Decision(RolloutState.RUNNING, 1, (), "phase 2 'rest': gate met, waiting for 1 devices to finish")),
    ("last phase gate met and timed out succeeds without the stragglers",
     view(states(a=P.COMMITTED, b=P.COMMITTED, c=P.IN_PROGRESS), phase=1), 601.0,
     two_phase_policy(success_percent=50),
     Decision(RolloutState.SUCCEEDED, 1, (),
              "last phase gate met: 2 of 3 devices committed; 1 did not finish within 600s")),
    ("all committed succeeds",
     view(states(a=P.COMMITTED, b=P.COMMITTED, c=P.COMMITTED), phase=1), 99.0, two_phase_policy(),
     Decision(RolloutState.SUCCEEDED, 1, (), "all 3 devices committed")),
    ("last phase gate below 100% succeeds once all finished",
     view(states(a=P.COMMITTED, b=P.COMMITTED, c=P.FAILED), phase=1), 99.0,
     two_phase_policy(success_percent=50, max_failure_percent=50),
     Decision(RolloutState.SUCCEEDED, 1, (), "last phase gate met: 2 of 3 devices committed")),
    ("timeout without the gate pauses for approval",
     view(states(a=P.IN_PROGRESS)), 601.0, two_phase_policy(),
     Decision(RolloutState.PAUSED, 0, (),
              "phase 1 'canary' timed out after 600s: 0 of 1 committed, need 100%")),
    ("accepted failures leave the brake and the gate",
     view(states(a=P.FAILED), accepted=frozenset({"a"})), 1.0, two_phase_policy(),
     Decision(RolloutState.RUNNING, 1, ("b", "c"),
              "phase 1 'canary' passed (0 of 0 committed); opening phase 2 'rest'")),
    ("paused is left alone",
     view(states(a=P.COMMITTED), state=RolloutState.PAUSED), 1e6, two_phase_policy(),
     Decision(RolloutState.PAUSED, 0, (), "rollout is paused")),
    ("aborted is left alone",
     view(states(), state=RolloutState.ABORTED), 1e6, two_phase_policy(),
     Decision(RolloutState.ABORTED, 0, (), "rollout is aborted")),
    ("succeeded is left alone",
     view(states(), state=RolloutState.SUCCEEDED, phase=1), 1e6, two_phase_policy(),
     Decision(RolloutState.SUCCEEDED, 1, (), "rollout is succeeded")),
]


@pytest.mark.parametrize(("name", "v", "now", "policy", "expected"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_decision_table(
    name: str, v: RolloutView, now: float, policy: RolloutPolicy, expected: Decision
) -> None:
    assert RolloutPlanner(policy).decide(v, now) == expected


def test_never_offers_a_device_beyond_the_current_phase() -> None:
    # Phase 2's devices are pending but the canary has not committed: they must not be offered.
    decision = RolloutPlanner(two_phase_policy()).decide(view(states(a=P.OFFERED)), 10.0)
    assert decision.offer == ()
    assert decision.phase == 0


# ------------------------------------------------------------------ property: random device reports


EVENT = st.one_of(
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=400)),
    st.tuples(st.just("report"), st.integers(min_value=0, max_value=11),
              st.sampled_from([P.IN_PROGRESS, P.COMMITTED, P.COMMITTED, P.FAILED, P.ROLLED_BACK,
                               P.REJECTED])),
    st.tuples(st.just("resume")),
)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(EVENT, max_size=60),
    soak=st.floats(min_value=0, max_value=300),
    success=st.sampled_from([50.0, 80.0, 100.0]),
    brake=st.sampled_from([0.0, 20.0, 100.0]),
)
def test_random_reports_never_reach_beyond_the_current_phase(
    events: list[tuple[Any, ...]], soak: float, success: float, brake: float
) -> None:
    policy = two_phase_policy(
        phases=(PhaseSpec("canary", count=2, min_soak_s=soak), PhaseSpec("half", percent=50, min_soak_s=soak),
                PhaseSpec("all", percent=100)),
        success_percent=success,
        max_failure_percent=brake,
    )
    ids = [f"d{i:02d}" for i in range(12)]
    phase_of = assign_phases(ids, policy)
    devices = {d: (phase_of[d], P.PENDING) for d in ids}
    state, phase, started, accepted = RolloutState.RUNNING, 0, 0.0, frozenset[str]()
    now = 0.0
    planner = RolloutPlanner(policy)
    for event in events:
        if event[0] == "tick":
            now += event[1]
            d = planner.decide(RolloutView(state, phase, started, dict(devices), accepted), now)
            assert d.phase in (phase, phase + 1)
            for dev in d.offer:
                assert devices[dev][1] is P.PENDING
                assert devices[dev][0] <= d.phase
            if d.state in (RolloutState.PAUSED, RolloutState.SUCCEEDED):
                assert d.offer == ()
            if d.phase != phase:
                started = now
            state, phase = d.state, d.phase
            for dev in d.offer:
                devices[dev] = (devices[dev][0], P.OFFERED)
        elif event[0] == "report":
            dev = ids[event[1]]
            ph, current = devices[dev]
            if current in (P.OFFERED, P.IN_PROGRESS):
                devices[dev] = (ph, event[2])
        elif state is RolloutState.PAUSED:  # operator resumes, accepting failures so far
            state, started = RolloutState.RUNNING, now
            accepted = accepted | {
                d for d, (_, s) in devices.items() if s in (P.FAILED, P.ROLLED_BACK, P.REJECTED)
            }
        # The invariant: a device outside the current or earlier phases was never touched.
        for ph, s in devices.values():
            if ph > phase:
                assert s is P.PENDING
