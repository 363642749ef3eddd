"""Properties of the rollout planner over random fleets, policies and device behaviour (hypothesis).

A rollout is simulated step by step: the planner decides, its decision is applied to the view the way
the controller persists it, devices answer at random (progress, commit, fail, roll back, refuse, wait in
a window), signal gates report random decisions, operators resume. At every step:

* no device outside the current (or an earlier) phase is ever offered the update;
* no more devices are offered in any minute than the rate allows;
* a device asked to install inside windows gets exactly its policy's windows in its zone, and a device
  that installs only inside them never installs outside one (with offer-scoped windows, offers happen
  only inside one);
* a tripped abort criterion or signal gate always stops the rollout: paused or aborted, nothing offered.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.rollout.planner import (
    FAILURE_TYPES,
    TERMINAL_DEVICE_STATES,
    DevicePhaseState,
    DeviceView,
    GateStatus,
    RolloutPlanner,
    RolloutState,
    RolloutView,
    assign_phases,
    counts_as,
)
from fleetloop_cloud.rollout.policy import BrakeAction
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_cloud.rollout.windows import WINDOW_HORIZON_S, inside, windows_between

P = DevicePhaseState
R = RolloutState
ZONES = ["", "UTC", "Europe/Berlin", "America/Los_Angeles", "Asia/Kolkata"]
T0 = 1_770_000_000.0


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    cuts = sorted(draw(st.lists(st.integers(1, 99), max_size=3, unique=True)))
    phases = [
        {"name": f"p{i}", "percent": c, "soak": draw(st.sampled_from([0, 30, 300]))}
        for i, c in enumerate(cuts)
    ] + [{"name": "all", "percent": 100}]
    spec: dict[str, Any] = {
        "release": {"name": "fw", "version": "2.0.0"},
        "phases": phases,
        "success": {
            "percent": draw(st.sampled_from([50, 80, 100])),
            "timeout": "2h",
            "action": draw(st.sampled_from(["next", "next", "pause"])),
        },
        "abort": [
            {
                "failure_type": draw(
                    st.sampled_from(["FAILED", "ROLLED_BACK", "REJECTED", "TIMED_OUT", "ALL"])
                ),
                "threshold_percent": draw(st.sampled_from([0, 20, 50, 100])),
                "min_executed": draw(st.integers(1, 5)),
                "action": draw(st.sampled_from(["pause", "abort", "abort-and-roll-back"])),
            }
            for _ in range(draw(st.integers(0, 2)))
        ],
        "gates": [
            {
                "name": f"g{i}",
                "capture_rate": {"campaign": "c"},
                "action": draw(st.sampled_from(["pause", "abort", "abort-and-roll-back"])),
            }
            for i in range(draw(st.sampled_from([0, 1, 1, 2])))
        ],
        "execution": {
            "in_progress_timeout": draw(st.sampled_from([None, "10m"])),
            "retries": [
                {
                    "failure_type": draw(st.sampled_from(["FAILED", "TIMED_OUT", "ALL"])),
                    "max": draw(st.integers(0, 2)),
                    "backoff": draw(st.sampled_from([0, 30, 600])),
                }
            ],
        },
    }
    if draw(st.booleans()):
        rate: dict[str, Any] = {"max_per_minute": draw(st.integers(1, 8))}
        if draw(st.booleans()):
            rate["exponential"] = {
                "base_per_minute": draw(st.integers(1, 3)),
                "increment_factor": 2,
                "increase_after": {draw(st.sampled_from(["notified", "succeeded"])): 3},
            }
        spec["rate"] = rate
    if draw(st.booleans()):
        spec["maintenance"] = {
            "windows": [
                {
                    "cron": f"{draw(st.integers(0, 59))} {draw(st.integers(0, 23))} * * *",
                    "duration": draw(st.sampled_from(["30m", "2h"])),
                    "time_zone": draw(st.sampled_from(["device", "UTC", "Asia/Tokyo"])),
                }
            ],
            "scope": draw(st.sampled_from(["install", "offer"])),
            "default_time_zone": "Europe/Berlin",
        }
        spec["install"] = {"type": draw(st.sampled_from(["soft", "soft", "forced", "downloadonly"]))}
    return spec


EVENT = st.one_of(
    st.tuples(st.just("tick"), st.sampled_from([1.0, 20.0, 61.0, 400.0, 3 * 3600.0])),
    st.tuples(
        st.just("report"),
        st.integers(0, 39),
        st.sampled_from(
            [P.IN_PROGRESS, P.WAITING, P.COMMITTED, P.COMMITTED, P.FAILED, P.ROLLED_BACK, P.REJECTED]
        ),
    ),
    st.tuples(st.just("install"), st.integers(0, 39)),
    st.tuples(st.just("gate"), st.integers(0, 1), st.sampled_from(["pass", "trip", "insufficient"])),
    st.tuples(st.just("operator")),
)


def brake_holds(planner: RolloutPlanner, view: RolloutView) -> bool:
    """The abort criteria, evaluated the plain way (an oracle for the planner's tally)."""
    executed = [
        d.state
        for k, d in view.devices.items()
        if k not in view.accepted_failures
        and d.state is not P.CANCELED
        and (d.state in TERMINAL_DEVICE_STATES or planner.succeeded(d.state))
    ]
    for rule in planner.policy.abort:
        failed = sum(1 for s in executed if s in FAILURE_TYPES and counts_as(s, rule.failure_type))
        if len(executed) >= rule.min_executed and failed * 100 > rule.threshold_percent * len(executed):
            return True
    return False


@settings(max_examples=250, deadline=None)
@given(
    spec=policies(),
    events=st.lists(EVENT, min_size=10, max_size=80),
    n=st.integers(1, 40),
    zones=st.lists(st.sampled_from(ZONES), min_size=40, max_size=40),
)
def test_the_planners_invariants_hold_whatever_happens(
    spec: dict[str, Any], events: list[tuple[Any, ...]], n: int, zones: list[str]
) -> None:
    policy = parse_policy(spec)
    planner = RolloutPlanner(policy)
    ids = [f"d{i:02d}" for i in range(n)]
    phase_of = assign_phases(ids, policy)
    devices = {d: DeviceView(phase_of[d], P.PENDING, time_zone=zones[i]) for i, d in enumerate(ids)}
    windows_of: dict[str, tuple[tuple[float, float], ...]] = {}
    state, phase, started, accepted = R.RUNNING, 0, T0, frozenset[str]()
    gates: dict[str, GateStatus] = {}
    now = T0
    offered_at: list[float] = []
    m = policy.maintenance
    for event in events:
        kind = event[0]
        if kind == "tick":
            now += event[1]
            view = RolloutView(state, phase, started, dict(devices), accepted, dict(gates))
            rate = planner.rate_per_minute(
                sum(d.attempt > 0 for d in devices.values()),
                sum(planner.succeeded(d.state) for d in devices.values()),
            )
            d = planner.decide(view, now)
            # 1. never beyond the current phase, only pending devices past their retry time
            assert d.phase in (phase, phase + 1)
            for offer in d.offers:
                dev = devices[offer.device_id]
                assert dev.state is P.PENDING and dev.phase <= d.phase
                assert dev.retry_at is None or dev.retry_at <= now
            # 4. a tripped brake or gate stops the rollout
            tripped = [
                g for g in policy.gates_of(phase) if gates.get(g.name, GateStatus("")).decision == "trip"
            ]
            if state in (R.RUNNING, R.CREATED) and (brake_holds(planner, view) or tripped):
                assert d.state in (R.PAUSED, R.ABORTED) and d.offers == ()
                actions = [g.action for g in tripped] + [a.action for a in policy.abort]
                if d.roll_back:
                    assert BrakeAction.ROLL_BACK in actions
            if d.state is not R.RUNNING:
                assert d.offers == ()
            # 2. the rate
            offered_at = [t for t in offered_at if t > now - 60.0]
            if rate is not None:
                assert len(offered_at) + len(d.offers) <= int(rate + 1e-9)
            # 3. windows
            for offer in d.offers:
                dev = devices[offer.device_id]
                if m.windows and m.scope.value == "offer":
                    zone_windows = _windows(policy, dev.time_zone, now)
                    assert inside(zone_windows, now) and offer.windows == ()
                elif m.windows and policy.install.type.value == "soft":
                    assert offer.windows == _windows(policy, dev.time_zone, now) != ()
                else:
                    assert offer.windows == ()
                assert offer.hold == (policy.install.type.value == "downloadonly")
            # apply, as the controller persists it
            if d.phase != phase:
                started = now
                gates = {}
            state, phase = d.state, d.phase
            for offer in d.offers:
                devices[offer.device_id] = devices[offer.device_id]._replace(
                    state=P.OFFERED,
                    attempt=offer.attempt,
                    offered_at=now,
                    retry_at=None,
                    changed_at=now,
                    windowed=bool(offer.windows),
                )
                windows_of[offer.device_id] = offer.windows
                offered_at.append(now)
            for dev_id in d.timeouts:
                settled = planner.settle(devices[dev_id], P.TIMED_OUT, "", now)
                devices[dev_id] = devices[dev_id]._replace(
                    state=settled.state, retry_at=settled.retry_at, changed_at=now
                )
        elif kind in ("report", "install"):
            dev_id = ids[event[1] % n]
            dev = devices[dev_id]
            if dev.state not in (P.OFFERED, P.IN_PROGRESS, P.WAITING):
                continue
            if kind == "install":
                # the device installs only inside its windows (or with none), never while held
                windows = windows_of.get(dev_id, ())
                if dev.state is not P.WAITING or (windows and not inside(windows, now)):
                    continue
                held = policy.install.type.value == "downloadonly"
                if held:
                    continue
                assert not windows or inside(windows, now)
                new = P.COMMITTED
            else:
                new = event[2]
            if new in FAILURE_TYPES:
                settled = planner.settle(dev, new, "", now)
                devices[dev_id] = dev._replace(state=settled.state, retry_at=settled.retry_at, changed_at=now)
            else:
                devices[dev_id] = dev._replace(state=new, changed_at=now)
        elif kind == "gate":
            names = [g.name for g in policy.gates]
            if names:
                gates[names[event[1] % len(names)]] = GateStatus(event[2])
        elif state in (R.PAUSED, R.WAITING_APPROVAL):  # operator: resume (accepting failures) or approve
            if state is R.PAUSED:
                accepted = accepted | {k for k, d in devices.items() if d.state in FAILURE_TYPES}
                gates = {k: v for k, v in gates.items() if v.decision != "trip"}
            else:
                phase = min(phase + 1, len(policy.phases) - 1)
            state, started = R.RUNNING, now
        # the invariant, whatever happened: a device beyond the current phase was never touched
        for dev in devices.values():
            if dev.phase > phase:
                assert dev.state is P.PENDING and dev.attempt == 0


def _windows(policy: Any, zone: str, now: float) -> tuple[tuple[float, float], ...]:
    from fleetloop_cloud.rollout.windows import check_zone

    m = policy.maintenance
    device_zone = zone if zone and check_zone(zone) else m.default_time_zone
    specs = [
        (w.cron, w.duration_s, device_zone if w.time_zone == "device" else w.time_zone) for w in m.windows
    ]
    return windows_between(specs, now, now + WINDOW_HORIZON_S)
