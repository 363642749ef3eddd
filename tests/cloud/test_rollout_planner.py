"""Rollout planner: phase assignment and the decision table (success conditions, abort criteria, gates,
soak, timeouts, approval, schedule, rate, windows, retries, weight)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.rollout.planner import (
    Decision,
    DevicePhaseState,
    DeviceView,
    GateStatus,
    Offer,
    RolloutPlanner,
    RolloutState,
    RolloutView,
    assign_phases,
)
from fleetloop_cloud.rollout.policy import RolloutPolicy
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_shared.errors import UserError

P = DevicePhaseState
R = RolloutState


def policy(**spec: Any) -> RolloutPolicy:
    base: dict[str, Any] = {
        "release": {"name": "fw", "version": "2.0.0"},
        "target": {"selector": "fleet=taxi"},
        "phases": [{"name": "canary", "percent": 33}, {"name": "rest", "percent": 100}],
    }
    base.update(spec)
    return parse_policy(base)


DEVS = {"a": 0, "b": 1, "c": 1}


def view(
    state: R = R.RUNNING,
    phase: int = 0,
    started: float = 0.0,
    accepted: frozenset[str] = frozenset(),
    gates: dict[str, GateStatus] | None = None,
    busy: frozenset[str] = frozenset(),
    **states: DevicePhaseState,
) -> RolloutView:
    devices = {
        d: DeviceView(p, states.get(d, P.PENDING), attempt=0 if states.get(d, P.PENDING) is P.PENDING else 1)
        for d, p in DEVS.items()
    }
    return RolloutView(state, phase, started, devices, accepted, gates or {}, busy)


def offers(*ids: str) -> tuple[Offer, ...]:
    return tuple(Offer(d, 1) for d in ids)


# ------------------------------------------------------------------ phase assignment


def test_two_phases_33_then_100() -> None:
    ids = [f"dev-{i}" for i in range(3)]
    phases = assign_phases(ids, policy())
    assert sorted(phases) == ids
    assert sorted(phases.values()) == [0, 1, 1]
    ten = assign_phases([f"d{i}" for i in range(10)], policy())
    assert sorted(ten.values()).count(0) == 4  # ceil(3.3)


def test_assignment_is_deterministic_and_order_independent() -> None:
    ids = [f"dev-{i}" for i in range(20)]
    a = assign_phases(ids, policy())
    assert a == assign_phases(list(reversed(ids)), policy())
    # Salted by release: another release picks other canaries (for this fixed set of ids it does).
    c = assign_phases(ids, policy(release={"version": "3.0.0"}))
    assert {d for d, p in a.items() if p == 0} != {d for d, p in c.items() if p == 0}


def test_counts_and_the_last_phase_takes_the_rest() -> None:
    p = policy(
        phases=[{"name": "one", "count": 1}, {"name": "two", "count": 2}, {"name": "rest", "count": 1}]
    )
    phases = assign_phases([f"d{i}" for i in range(7)], p)
    assert [list(phases.values()).count(i) for i in range(3)] == [1, 2, 4]


def test_small_percent_still_gets_a_canary_and_duplicates_are_refused() -> None:
    p = policy(phases=[{"name": "c", "percent": 1}, {"name": "all", "percent": 100}])
    assert list(assign_phases(["a", "b", "c"], p).values()).count(0) == 1
    with pytest.raises(UserError):
        assign_phases(["a", "a"], p)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=60),
    percents=st.lists(st.floats(min_value=0, max_value=100), min_size=0, max_size=4),
)
def test_every_device_lands_in_exactly_one_phase(n: int, percents: list[float]) -> None:
    cumulative = [*sorted(percents), 100.0]
    p = policy(phases=[{"name": f"p{i}", "percent": x} for i, x in enumerate(cumulative)])
    ids = [f"d{i}" for i in range(n)]
    phases = assign_phases(ids, p)
    assert sorted(phases) == sorted(ids)
    sizes = [list(phases.values()).count(i) for i in range(len(cumulative))]
    placed = 0
    for i, x in enumerate(cumulative[:-1]):
        before, placed = placed, placed + sizes[i]
        asked = math.ceil(n * x / 100 - 1e-9)
        assert placed >= min(asked, n)  # never fewer than the cumulative share
        assert placed <= max(asked, before + 1)  # never more, except the one forced canary
        if x > 0 and before < n:
            assert sizes[i] >= 1


# ------------------------------------------------------------------ decision table

SOAKING = policy(phases=[{"name": "canary", "percent": 33, "soak": 60}, {"name": "rest", "percent": 100}])
GATED = policy(gates=[{"name": "hb", "capture_rate": {"campaign": "harsh"}}])
APPROVE = policy(success={"action": "pause"})

SCENARIOS: list[tuple[str, RolloutView, float, RolloutPolicy, Decision]] = [
    (
        "start offers the canary only",
        view(),
        0.0,
        policy(),
        Decision(R.RUNNING, 0, offers("a"), "phase 1 'canary': 0 of 1 succeeded, need 100%"),
    ),
    (
        "created rollouts start running",
        view(R.CREATED),
        0.0,
        policy(),
        Decision(R.RUNNING, 0, offers("a"), "phase 1 'canary': 0 of 1 succeeded, need 100%"),
    ),
    (
        "before its scheduled start a rollout waits",
        view(R.CREATED),
        10.0,
        policy(schedule={"start": 100}),
        Decision(R.CREATED, 0, (), "scheduled to start at 100"),
    ),
    (
        "in progress: nothing new to offer",
        view(a=P.IN_PROGRESS),
        5.0,
        policy(),
        Decision(R.RUNNING, 0, (), "phase 1 'canary': 0 of 1 succeeded, need 100%"),
    ),
    (
        "condition met but soaking",
        view(a=P.COMMITTED),
        30.0,
        SOAKING,
        Decision(R.RUNNING, 0, (), "phase 1 'canary': condition met, soaking until 60"),
    ),
    (
        "condition met and soaked opens phase 2",
        view(a=P.COMMITTED),
        61.0,
        SOAKING,
        Decision(
            R.RUNNING,
            1,
            offers("b", "c"),
            "phase 1 'canary' passed (1 of 1 succeeded); opening phase 2 'rest'",
        ),
    ),
    (
        "success action pause waits for approval",
        view(a=P.COMMITTED),
        1.0,
        APPROVE,
        Decision(
            R.WAITING_APPROVAL,
            0,
            (),
            "phase 1 'canary' passed (1 of 1 succeeded); approve to open phase 2 'rest'",
        ),
    ),
    (
        "next phase with a later start waits for it",
        view(a=P.COMMITTED),
        1.0,
        policy(phases=[{"name": "canary", "percent": 33}, {"name": "rest", "percent": 100, "start": 50}]),
        Decision(R.RUNNING, 0, (), "phase 1 'canary' passed (1 of 1 succeeded); phase 2 'rest' starts at 50"),
    ),
    (
        "brake pauses",
        view(phase=1, a=P.COMMITTED, b=P.FAILED),
        70.0,
        policy(),
        Decision(R.PAUSED, 1, (), "FAILED rate 50% (1 of 2 executed) above 20%"),
    ),
    (
        "rolled back counts as FAILED",
        view(a=P.ROLLED_BACK),
        1.0,
        policy(),
        Decision(R.PAUSED, 0, (), "FAILED rate 100% (1 of 1 executed) above 20%"),
    ),
    (
        "a criterion may abort and roll back",
        view(a=P.ROLLED_BACK),
        1.0,
        policy(
            abort=[{"failure_type": "ROLLED_BACK", "threshold_percent": 0, "action": "abort-and-roll-back"}]
        ),
        Decision(R.ABORTED, 0, (), "ROLLED_BACK rate 100% (1 of 1 executed) above 0%", roll_back=True),
    ),
    (
        "brake waits for enough executions",
        view(a=P.FAILED),
        1.0,
        policy(abort=[{"min_executed": 2}]),
        Decision(R.RUNNING, 0, (), "phase 1 'canary': 0 of 1 succeeded, need 100%"),
    ),
    (
        "rejected is executed but not FAILED",
        view(phase=1, a=P.COMMITTED, b=P.REJECTED, c=P.IN_PROGRESS),
        1.0,
        policy(abort=[{"threshold_percent": 0}]),
        Decision(R.RUNNING, 1, (), "phase 2 'rest': 0 of 2 succeeded, need 100%"),
    ),
    (
        "ALL counts rejected and timed out",
        view(phase=1, a=P.COMMITTED, b=P.REJECTED, c=P.TIMED_OUT),
        1.0,
        policy(abort=[{"failure_type": "ALL", "threshold_percent": 50, "action": "abort"}]),
        Decision(R.ABORTED, 1, (), "ALL rate 67% (2 of 3 executed) above 50%"),
    ),
    (
        "a tripped gate stops the rollout with its action",
        view(a=P.COMMITTED, gates={"hb": GateStatus("trip", "rate ratio 2.1")}),
        1.0,
        GATED,
        Decision(R.ABORTED, 0, (), "signal gate 'hb' tripped: rate ratio 2.1", roll_back=True),
    ),
    (
        "a gate not yet passed holds the phase",
        view(a=P.COMMITTED, gates={"hb": GateStatus("insufficient")}),
        1.0,
        GATED,
        Decision(R.RUNNING, 0, (), "phase 1 'canary': condition met; gates not yet passed: hb"),
    ),
    (
        "a passed gate lets the phase open",
        view(a=P.COMMITTED, gates={"hb": GateStatus("pass")}),
        1.0,
        GATED,
        Decision(
            R.RUNNING,
            1,
            offers("b", "c"),
            "phase 1 'canary' passed (1 of 1 succeeded); opening phase 2 'rest'",
        ),
    ),
    (
        "a gate not passed in time pauses",
        view(a=P.COMMITTED),
        601.0,
        GATED,
        Decision(
            R.PAUSED,
            0,
            (),
            "phase 1 'canary' timed out after 600s: 1 of 1 succeeded, gates not yet passed: hb",
        ),
    ),
    (
        "last phase condition met but devices still working",
        view(phase=1, a=P.COMMITTED, b=P.COMMITTED, c=P.IN_PROGRESS),
        99.0,
        policy(success={"percent": 50}),
        Decision(R.RUNNING, 1, (), "phase 2 'rest': condition met, waiting for 1 devices to finish"),
    ),
    (
        "last phase condition met and timed out succeeds without the stragglers",
        view(phase=1, a=P.COMMITTED, b=P.COMMITTED, c=P.IN_PROGRESS),
        601.0,
        policy(success={"percent": 50}),
        Decision(
            R.SUCCEEDED,
            1,
            (),
            "last phase condition met: 2 of 3 devices succeeded; 1 did not finish within 600s",
        ),
    ),
    (
        "all committed succeeds",
        view(phase=1, a=P.COMMITTED, b=P.COMMITTED, c=P.COMMITTED),
        99.0,
        policy(),
        Decision(R.SUCCEEDED, 1, (), "all 3 devices succeeded"),
    ),
    (
        "continuous rollouts wait for new devices",
        view(phase=1, a=P.COMMITTED, b=P.COMMITTED, c=P.COMMITTED),
        99.0,
        policy(target={"selection": "continuous"}),
        Decision(R.RUNNING, 1, (), "phase 2 'rest': continuous: waiting for new devices"),
    ),
    (
        "timeout without the condition pauses",
        view(a=P.IN_PROGRESS),
        601.0,
        policy(),
        Decision(R.PAUSED, 0, (), "phase 1 'canary' timed out after 600s: 0 of 1 succeeded, need 100%"),
    ),
    (
        "accepted failures leave the brake and the condition",
        view(a=P.FAILED, accepted=frozenset({"a"})),
        1.0,
        policy(),
        Decision(
            R.RUNNING,
            1,
            offers("b", "c"),
            "phase 1 'canary' passed (0 of 0 succeeded); opening phase 2 'rest'",
        ),
    ),
    (
        "devices another rollout holds wait",
        view(phase=1, a=P.COMMITTED, busy=frozenset({"b"})),
        1.0,
        policy(),
        Decision(R.RUNNING, 1, offers("c"), "phase 2 'rest': 0 of 2 succeeded, need 100%"),
    ),
    (
        "the schedule's end stops offers and may cancel",
        view(phase=1, a=P.COMMITTED, b=P.OFFERED),
        100.0,
        policy(schedule={"end": 50, "end_behavior": "cancel"}),
        Decision(R.ABORTED, 1, (), "schedule ended: no new offers; unstarted offers canceled", cancel=("b",)),
    ),
    (
        "download-only succeeds once devices hold the payload",
        view(phase=1, a=P.WAITING, b=P.WAITING, c=P.WAITING),
        1.0,
        policy(install={"type": "downloadonly"}),
        Decision(R.SUCCEEDED, 1, (), "all 3 devices succeeded"),
    ),
    (
        "paused is left alone",
        view(R.PAUSED, a=P.COMMITTED),
        1e6,
        policy(),
        Decision(R.PAUSED, 0, (), "rollout is paused"),
    ),
    (
        "waiting for approval is left alone",
        view(R.WAITING_APPROVAL, a=P.COMMITTED),
        1e6,
        APPROVE,
        Decision(R.WAITING_APPROVAL, 0, (), "rollout is waiting_approval"),
    ),
    (
        "aborted is left alone",
        view(R.ABORTED),
        1e6,
        policy(),
        Decision(R.ABORTED, 0, (), "rollout is aborted"),
    ),
]


@pytest.mark.parametrize(("name", "v", "now", "p", "expected"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_decision_table(name: str, v: RolloutView, now: float, p: RolloutPolicy, expected: Decision) -> None:
    assert RolloutPlanner(p).decide(v, now) == expected


def test_never_offers_a_device_beyond_the_current_phase() -> None:
    # Phase 2's devices are pending but the canary has not committed: they must not be offered.
    decision = RolloutPlanner(policy()).decide(view(a=P.OFFERED), 10.0)
    assert decision.offer == ()
    assert decision.phase == 0


def test_in_progress_timeout_and_retries() -> None:
    p = policy(
        execution={
            "in_progress_timeout": "10m",
            "retries": [{"failure_type": "TIMED_OUT", "max": 1, "backoff": "2m", "factor": 3}],
        }
    )
    planner = RolloutPlanner(p)
    v = RolloutView(
        R.RUNNING,
        0,
        0.0,
        {
            "a": DeviceView(0, P.IN_PROGRESS, attempt=1, changed_at=0.0, offered_at=0.0),
            "b": DeviceView(1, P.PENDING),
        },
    )
    assert planner.decide(v, 599.0).timeouts == ()
    assert planner.decide(v, 601.0).timeouts == ("a",)
    first = planner.settle(v.devices["a"], P.TIMED_OUT, "in progress too long", 601.0)
    assert first.state is P.PENDING and first.retry_at == 721.0 and "retry 1 of 1" in first.reason
    second = planner.settle(
        DeviceView(0, P.IN_PROGRESS, attempt=2, offered_at=721.0), P.TIMED_OUT, "", 1500.0
    )
    assert second.state is P.TIMED_OUT  # retries used up
    assert planner.settle(v.devices["a"], P.FAILED, "boom", 601.0).state is P.FAILED  # no rule for FAILED
    # A retrying device is not offered before its time, then on its next attempt.
    waiting = RolloutView(
        R.RUNNING,
        0,
        600.0,
        {"a": DeviceView(0, P.PENDING, attempt=1, retry_at=721.0), "b": DeviceView(1, P.PENDING)},
    )
    assert planner.decide(waiting, 700.0).offers == ()
    assert planner.decide(waiting, 721.0).offers == (Offer("a", 2),)


def test_rate_constant_and_exponential() -> None:
    devices = {f"d{i:02d}": DeviceView(0, P.PENDING) for i in range(30)}
    flat = RolloutPlanner(policy(phases=[{"name": "all"}], rate={"max_per_minute": 4}))
    assert len(flat.decide(RolloutView(R.RUNNING, 0, 0.0, devices), 0.0).offers) == 4
    recent = dict(devices) | {
        f"d{i:02d}": DeviceView(0, P.OFFERED, attempt=1, offered_at=30.0) for i in range(3)
    }
    assert len(flat.decide(RolloutView(R.RUNNING, 0, 0.0, recent), 60.0).offers) == 1
    assert len(flat.decide(RolloutView(R.RUNNING, 0, 0.0, recent), 90.5).offers) == 4
    exp = RolloutPlanner(
        policy(
            phases=[{"name": "all"}],
            rate={
                "max_per_minute": 20,
                "exponential": {
                    "base_per_minute": 2,
                    "increment_factor": 3,
                    "increase_after": {"succeeded": 2},
                },
            },
        )
    )
    assert exp.rate_per_minute(notified=0, succeeded=0) == 2
    assert exp.rate_per_minute(notified=9, succeeded=2) == 6
    assert exp.rate_per_minute(notified=9, succeeded=4) == 18
    assert exp.rate_per_minute(notified=9, succeeded=6) == 20  # capped


def test_install_windows_in_each_devices_zone() -> None:
    p = policy(
        phases=[{"name": "all"}],
        maintenance={
            "windows": [{"cron": "0 2 * * *", "duration": "2h", "time_zone": "device"}],
            "default_time_zone": "UTC",
        },
    )
    planner = RolloutPlanner(p)
    now = 1_772_000_000.0
    v = RolloutView(
        R.RUNNING,
        0,
        now,
        {
            "berlin": DeviceView(0, P.PENDING, time_zone="Europe/Berlin"),
            "nowhere": DeviceView(0, P.PENDING),
            "bogus": DeviceView(0, P.PENDING, time_zone="Mars/Base"),
        },
    )
    got = {o.device_id: o for o in planner.decide(v, now).offers}
    assert got["berlin"].windows and not got["berlin"].hold
    assert got["berlin"].windows[0][0] - got["nowhere"].windows[0][0] in (-3600.0, 82800.0)  # CET is UTC+1
    assert got["bogus"].windows == got["nowhere"].windows  # an unknown zone falls back to the default
    forced = RolloutPlanner(
        policy(
            phases=[{"name": "all"}],
            install={"type": "forced"},
            maintenance={"windows": [{"cron": "0 2 * * *", "duration": "2h"}]},
        )
    )
    assert all(not o.windows for o in forced.decide(v, now).offers)
    held = RolloutPlanner(policy(phases=[{"name": "all"}], install={"type": "downloadonly"}))
    assert all(o.hold and not o.windows for o in held.decide(v, now).offers)


def test_offer_scope_offers_only_inside_a_window_and_timeforced_lifts_the_windows() -> None:
    day = 86400.0 * 20000  # a midnight UTC
    p = policy(
        phases=[{"name": "all"}],
        success={"timeout": "1d"},
        maintenance={
            "windows": [{"cron": "0 2 * * *", "duration": "1h", "time_zone": "UTC"}],
            "scope": "offer",
        },
    )
    v = RolloutView(R.RUNNING, 0, day, {"a": DeviceView(0, P.PENDING)})
    assert RolloutPlanner(p).decide(v, day + 3600).offers == ()
    assert RolloutPlanner(p).decide(v, day + 2.5 * 3600).offers == (Offer("a", 1),)
    tf = RolloutPlanner(
        policy(
            phases=[{"name": "all"}],
            install={"type": "timeforced", "forced_at": day},
            maintenance={"windows": [{"cron": "0 2 * * *", "duration": "1h"}]},
        )
    )
    waiting = RolloutView(
        R.RUNNING,
        0,
        day - 100,
        {"a": DeviceView(0, P.WAITING, attempt=1, windowed=True), "b": DeviceView(0, P.PENDING)},
    )
    before = tf.decide(waiting, day - 10)
    assert before.reoffers == () and before.offers[0].windows
    after = tf.decide(waiting, day + 10)
    assert after.reoffers == (Offer("a", 1),) and after.offers == (Offer("b", 1),)
