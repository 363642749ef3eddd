"""The OTA transition table: closed, every job can finish, resume points are safe, versions order."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.ota.states import (
    EVENTS,
    RESUME,
    TERMINAL,
    TRANSITIONS,
    BootOutcome,
    OtaState,
    classify_boot,
    next_state,
    version_key,
)
from fleetloop_shared.errors import StateError

S = OtaState


def test_the_happy_path_walks_the_table() -> None:
    state = S.QUEUED
    for event in ("start", "downloaded", "verified", "install", "installed", "booted", "healthy"):
        state = next_state(state, event)
    assert state is S.COMMITTED


def test_health_failure_loops_through_reboot_until_the_bootloader_falls_back() -> None:
    state = next_state(S.REBOOTING, "booted")
    state = next_state(state, "unhealthy")
    assert state is S.REBOOTING
    assert next_state(state, "fell_back") is S.ROLLED_BACK
    assert next_state(S.HEALTH_CHECK, "fell_back") is S.ROLLED_BACK


def test_names_match_the_wire_enum() -> None:
    from fleetloop_shared.wire.gen.fleetloop.ota.v1 import ota_pb2

    for state in S:
        assert ota_pb2.OtaState.Value(f"OTA_STATE_{state.value}") > 0


def test_unknown_transitions_are_state_errors() -> None:
    with pytest.raises(StateError, match="QUEUED cannot take event 'healthy'"):
        next_state(S.QUEUED, "healthy")
    with pytest.raises(StateError):
        next_state(S.COMMITTED, "fail")
    with pytest.raises(StateError):
        next_state(S.REBOOTING, "cancel")  # the slot switch may already have happened


def test_terminal_states_have_no_way_out_and_every_other_state_can_fail() -> None:
    assert {S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.REJECTED, S.CANCELED} == TERMINAL
    for (state, _event), _target in TRANSITIONS.items():
        assert state not in TERMINAL
    for state in S:
        if state not in TERMINAL:
            assert TRANSITIONS[(state, "fail")] is S.FAILED


def test_every_non_terminal_state_reaches_a_terminal_one() -> None:
    graph: dict[OtaState, set[OtaState]] = {s: set() for s in S}
    for (state, _), target in TRANSITIONS.items():
        graph[state].add(target)
    for start in S:
        seen, todo = {start}, deque([start])
        while todo:
            for nxt in graph[todo.popleft()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert seen & TERMINAL, f"{start} cannot finish"
        if start not in TERMINAL:
            assert S.FAILED in seen


def test_every_state_is_reachable_from_queued() -> None:
    reachable, todo = {S.QUEUED}, [S.QUEUED]
    while todo:
        state = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in reachable:
                reachable.add(dst)
                todo.append(dst)
    assert reachable == set(S)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(EVENTS | {"bogus", "reboot"})), max_size=40))
def test_random_event_sequences_stay_inside_the_table(events: list[str]) -> None:
    state = S.QUEUED
    for event in events:
        if (state, event) in TRANSITIONS:
            nxt = next_state(state, event)
            assert nxt is TRANSITIONS[(state, event)]
            state = nxt
        else:
            with pytest.raises(StateError):
                next_state(state, event)
        assert isinstance(state, OtaState)
        if state in TERMINAL:
            assert not any((state, e) in TRANSITIONS for e in EVENTS)


def test_resume_is_total_and_never_skips_ahead() -> None:
    assert set(RESUME) == set(S)
    order = [S.QUEUED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFIED, S.INSTALLING, S.REBOOTING, S.HEALTH_CHECK]
    for state in order:
        resumed = RESUME[state]
        if state is S.REBOOTING:
            assert resumed is S.HEALTH_CHECK  # the reboot was the side effect asked for
        else:
            assert order.index(resumed) <= order.index(state), f"{state} resumes ahead at {resumed}"
    assert RESUME[S.INSTALLING] is S.VERIFIED  # a half-written slot is rewritten from scratch
    assert RESUME[S.DOWNLOADING] is S.DOWNLOADING  # Range resume
    for state in TERMINAL:
        assert RESUME[state] is state


@pytest.mark.parametrize(
    ("booted", "target", "bootcount", "outcome"),
    [
        ("b", "b", 1, BootOutcome.BOOTED_TARGET),
        ("b", "b", 0, BootOutcome.BOOTED_TARGET),
        ("a", "b", 3, BootOutcome.FELL_BACK),
        ("a", "b", 0, BootOutcome.NOT_SWITCHED),
    ],
)
def test_classify_boot(booted: str, target: str, bootcount: int, outcome: BootOutcome) -> None:
    assert classify_boot(booted, target, bootcount) is outcome


@pytest.mark.parametrize(
    ("older", "newer"),
    [("1.0.0", "2.0.0"), ("1.9.9", "1.10.0"), ("2.0.0-rc1", "2.0.0"), ("v1.2", "1.3"), ("1.0", "1.0.1")],
)
def test_version_order(older: str, newer: str) -> None:
    a, b = version_key(older), version_key(newer)
    assert a is not None and b is not None and a < b


def test_version_equality_and_garbage() -> None:
    assert version_key("2.0") == version_key("2.0.0") == version_key("v2.0.0+build7")
    for bad in ("", "abc", "1..2", "1.x", "²"):
        assert version_key(bad) is None
