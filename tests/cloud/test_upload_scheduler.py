"""The upload scheduler's policy core, by properties over random fleets and reports (hypothesis)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.uploads.scheduler import MAX_PRIORITY, NETWORKS, Backlog, Budget, UploadScheduler
from fleetloop_shared.errors import UserError

backlogs = st.dictionaries(st.integers(0, MAX_PRIORITY), st.integers(0, 50_000_000), max_size=4)
device = st.tuples(st.sampled_from(NETWORKS), backlogs)
fleets = st.lists(device, min_size=1, max_size=30)
budgets = st.builds(
    Budget,
    global_bytes_per_s=st.integers(0, 20_000_000),
    per_network_bytes_per_s=st.dictionaries(
        st.sampled_from(NETWORKS), st.integers(0, 10_000_000), max_size=4
    ),
    quantum_bytes=st.integers(1, 8_000_000),
    aging_s=st.floats(0.5, 60),
)


def _load(s: UploadScheduler, fleet: list[tuple[str, dict[int, int]]], now: float) -> None:
    for i, (net, b) in enumerate(fleet):
        assert s.report(Backlog(f"d{i}", net, b), now)


@settings(max_examples=200, deadline=None)
@given(budgets, fleets, st.floats(0.1, 5.0))
def test_grants_respect_the_budgets_and_the_backlogs(budget: Budget, fleet: list, dt: float) -> None:
    s = UploadScheduler(budget)
    _load(s, fleet, 0.0)
    before = {f"d{i}": dict(b) for i, (_, b) in enumerate(fleet)}
    grants = s.tick(1.0, dt)
    assert sum(g.max_bytes for g in grants) <= int(budget.global_bytes_per_s * dt)
    per_net: dict[str, int] = defaultdict(int)
    for g in grants:
        per_net[g.network] += g.max_bytes
        assert 0 < g.max_bytes <= budget.quantum_bytes
        assert g.max_bytes <= before[g.device_id].get(g.min_priority, 0)
    for net, used in per_net.items():
        if net in budget.per_network_bytes_per_s:
            assert used <= int(budget.per_network_bytes_per_s[net] * dt)
    assert len({g.device_id for g in grants}) == len(grants)  # one grant per device per tick


@settings(max_examples=200, deadline=None)
@given(fleets, st.integers(1, 5_000_000))
def test_highest_priority_first(fleet: list, capacity: int) -> None:
    """Fresh reports (no aging yet): nobody is granted while a device of higher top priority, on a network
    with budget left, went without."""
    s = UploadScheduler(Budget(global_bytes_per_s=capacity, quantum_bytes=capacity, aging_s=1e9))
    _load(s, fleet, 0.0)
    tops = {f"d{i}": max((p for p, n in b.items() if n > 0), default=-1) for i, (_, b) in enumerate(fleet)}
    grants = s.tick(0.0, 1.0)
    granted = {g.device_id for g in grants}
    if grants:
        lowest_granted = min(tops[d] for d in granted)
        skipped = [d for d, top in tops.items() if top > lowest_granted and d not in granted]
        assert not skipped, (tops, grants)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 20), st.integers(1, 5))
def test_equal_devices_are_served_round_robin(n: int, per_tick: int) -> None:
    quantum = 1000
    s = UploadScheduler(Budget(global_bytes_per_s=quantum * per_tick, quantum_bytes=quantum, aging_s=1e9))
    served: dict[str, int] = defaultdict(int)
    for t in range(n * 4):
        for i in range(n):  # everyone reports the same large backlog every tick
            s.report(Backlog(f"d{i}", "wifi", {5: 10**9}), float(t))
        for g in s.tick(float(t), 1.0):
            served[g.device_id] += g.max_bytes
    counts = [served.get(f"d{i}", 0) for i in range(n)]
    assert max(counts) - min(counts) <= quantum


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 15), st.integers(0, MAX_PRIORITY))
def test_no_starvation_under_a_flood_of_urgent_data(urgent: int, low: int) -> None:
    """A low-priority device is served within a bounded number of ticks even though urgent devices
    always have more than the whole budget to send."""
    aging = 2.0
    s = UploadScheduler(Budget(global_bytes_per_s=1000, quantum_bytes=1000, aging_s=aging))
    s.report(Backlog("slow", "cellular", {low: 10**6}), 0.0)
    bound = int((MAX_PRIORITY + 1) * aging) + urgent + 2
    for t in range(bound + 1):
        for i in range(urgent):
            s.report(Backlog(f"u{i}", "wifi", {MAX_PRIORITY: 10**9}), float(t))
        if any(g.device_id == "slow" for g in s.tick(float(t), 1.0)):
            return
    pytest.fail(f"the low-priority device waited more than {bound} ticks")


def test_zero_network_budget_serves_the_other_networks() -> None:
    s = UploadScheduler(Budget(global_bytes_per_s=10_000, per_network_bytes_per_s={"cellular": 0}))
    s.report(Backlog("car", "cellular", {9: 5000}), 0.0)
    s.report(Backlog("robot", "wifi", {1: 5000}), 0.0)
    grants = s.tick(0.0, 1.0)
    assert [(g.device_id, g.max_bytes, g.min_priority) for g in grants] == [("robot", 5000, 1)]


def test_a_granted_backlog_is_not_granted_again_until_reported() -> None:
    s = UploadScheduler(Budget(global_bytes_per_s=10_000, quantum_bytes=10_000))
    s.report(Backlog("car", "wifi", {3: 4000}), 0.0)
    assert [g.max_bytes for g in s.tick(0.0, 1.0)] == [4000]
    assert s.tick(1.0, 1.0) == []
    s.report(Backlog("car", "wifi", {3: 1000}), 2.0)
    assert [g.max_bytes for g in s.tick(2.0, 1.0)] == [1000]


def test_bounded_devices_and_forgetting() -> None:
    s = UploadScheduler(Budget(global_bytes_per_s=1, max_devices=2, forget_after_s=10))
    assert s.report(Backlog("a", "wifi", {1: 1}), 0.0)
    assert s.report(Backlog("b", "wifi", {1: 1}), 0.0)
    assert not s.report(Backlog("c", "wifi", {1: 1}), 0.0)
    assert s.refused_devices == 1
    s.tick(20.0, 1.0)  # a and b silent for 20 s: forgotten
    assert s.tracked() == 0 and s.report(Backlog("c", "wifi", {1: 1}), 20.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Backlog("", "wifi", {}),
        lambda: Backlog("d", "satellite", {}),
        lambda: Backlog("d", "wifi", {10: 1}),
        lambda: Backlog("d", "wifi", {1: -1}),
        lambda: Budget(global_bytes_per_s=-1),
        lambda: Budget(global_bytes_per_s=1, per_network_bytes_per_s={"5g": 1}),
        lambda: Budget(global_bytes_per_s=1, quantum_bytes=0),
    ],
)
def test_bad_input_is_a_user_error(make: object) -> None:
    with pytest.raises(UserError):
        make()  # type: ignore[operator]


def test_an_unknown_network_is_refused_naming_the_device_the_networks_and_the_value() -> None:
    with pytest.raises(UserError, match=r"^backlog of d: network must be one of wifi, .*, got 'satellite'$"):
        Backlog("d", "satellite", {})
