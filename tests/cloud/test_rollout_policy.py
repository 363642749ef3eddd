"""The rollout policy document: every field group parses, round-trips, and bad input says FILE:LINE:COL
and the field; maintenance windows from cron expressions in a time zone."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.rollout.policy import (
    BrakeAction,
    Direction,
    EndBehavior,
    FailureType,
    GateKind,
    InstallType,
    RateCriterion,
    Selection,
    SuccessAction,
    WindowScope,
    policy_to_dict,
)
from fleetloop_cloud.rollout.policy_reader import parse_duration, parse_policy
from fleetloop_cloud.rollout.windows import inside, parse_cron, windows_between
from fleetloop_shared.errors import UserError
from fleetloop_shared.yaml_marks import load_marked

FULL = """\
apiVersion: fleetloop/v1
kind: Rollout
metadata: {name: fw-2.1.0}
spec:
  release: {name: firmware, version: 2.1.0}
  target:
    selector: "fleet=taxi,hw=gen2"
    selection: continuous
    max_devices: 500
  phases:
    - {name: canary, count: 5, soak: 30m}
    - {name: early, percent: 20, soak: 1h, start: 2026-03-02T08:00:00Z,
       success: {percent: 90, timeout: 4h, action: pause}}
    - {name: everyone, percent: 100}
  success: {percent: 95, timeout: 2h, action: next}
  abort:
    - {failure_type: FAILED, threshold_percent: 10, min_executed: 10, action: abort-and-roll-back}
    - {failure_type: ALL, threshold_percent: 25, min_executed: 5, action: pause}
  gates:
    - name: harsh-braking
      capture_rate: {campaign: harsh-braking}
      min_effect: 0.2
      confidence: 0.99
      min_exposure: 2h
      interval: 5m
      phases: [canary, early]
    - name: brake-pressure
      signal:
        aggregate: avg(value)
        where: "signal = 'Vehicle.Chassis.Brake.PedalPressure'"
        direction: decrease
      min_effect: 0.5
      min_devices: 4
      action: pause
  rate:
    max_per_minute: 100
    exponential: {base_per_minute: 5, increment_factor: 2, increase_after: {succeeded: 10}}
  schedule: {start: 2026-03-01T00:00:00Z, end: 2026-03-31T00:00:00Z, end_behavior: cancel}
  maintenance:
    windows:
      - {cron: "0 2 * * *", duration: 2h, time_zone: device}
      - {cron: "30 13 * * sat,sun", duration: 90m, time_zone: Europe/Berlin}
    scope: install
    default_time_zone: Europe/Berlin
  install: {type: timeforced, forced_at: 2026-03-15T00:00:00Z}
  execution:
    retries:
      - {failure_type: FAILED, max: 3, backoff: 5m, factor: 2}
      - {failure_type: TIMED_OUT, max: 1, backoff: 10m}
    in_progress_timeout: 1h
  weight: 500
"""


def marked(text: str, source: str = "rollout.yaml") -> Any:
    return load_marked(text, source=source)


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_the_full_document_reads_every_field_group() -> None:
    p = parse_policy(marked(FULL))
    assert (p.release_name, p.release_version) == ("firmware", "2.1.0")
    assert p.target.selector == "fleet=taxi,hw=gen2"
    assert p.target.selection is Selection.CONTINUOUS and p.target.max_devices == 500
    assert [ph.name for ph in p.phases] == ["canary", "early", "everyone"]
    assert p.phases[0].count == 5 and p.phases[0].min_soak_s == 1800
    assert p.phases[1].start_at == ts("2026-03-02T08:00:00Z")
    assert p.success_of(1).action is SuccessAction.PAUSE and p.success_of(1).timeout_s == 4 * 3600
    assert p.success_of(2).percent == 95 and p.success_of(2).action is SuccessAction.NEXT
    assert [(a.failure_type, a.action) for a in p.abort] == [
        (FailureType.FAILED, BrakeAction.ROLL_BACK),
        (FailureType.ALL, BrakeAction.PAUSE),
    ]
    rate_gate, signal_gate = p.gates
    assert rate_gate.kind is GateKind.CAPTURE_RATE and rate_gate.campaign == "harsh-braking"
    assert rate_gate.min_exposure_h == 2.0 and rate_gate.interval_s == 300
    assert rate_gate.action is BrakeAction.ROLL_BACK  # the default action of a gate
    assert signal_gate.kind is GateKind.SIGNAL and signal_gate.direction is Direction.DECREASE
    assert [g.name for g in p.gates_of(0)] == ["harsh-braking", "brake-pressure"]
    assert [g.name for g in p.gates_of(2)] == []  # the last phase, and brake-pressure names none
    assert p.rate.max_per_minute == 100
    assert p.rate.exponential is not None and p.rate.exponential.criterion is RateCriterion.SUCCEEDED
    assert p.schedule.end_behavior is EndBehavior.CANCEL
    assert p.schedule.start_at == ts("2026-03-01T00:00:00Z")
    assert p.maintenance.scope is WindowScope.INSTALL and len(p.maintenance.windows) == 2
    assert p.install.type is InstallType.TIMEFORCED
    assert [r.failure_type for r in p.execution.retries] == [FailureType.FAILED, FailureType.TIMED_OUT]
    assert p.execution.in_progress_timeout_s == 3600
    assert p.weight == 500


def test_policy_round_trips_through_plain_data() -> None:
    p = parse_policy(marked(FULL))
    assert parse_policy(policy_to_dict(p)) == p
    minimal = parse_policy({"release": {"version": "2.0.0"}, "phases": [{"name": "all"}]})
    assert parse_policy(policy_to_dict(minimal)) == minimal
    assert minimal.abort[0].action is BrakeAction.PAUSE and minimal.install.type is InstallType.SOFT


def test_the_flat_form_of_earlier_versions_still_reads() -> None:
    p = parse_policy(
        {
            "release_version": "2.0.0",
            "release_name": "fw",
            "selector": "kind=car",
            "phases": [{"name": "a", "percent": 33, "min_soak_s": 60}, {"name": "b", "percent": 100}],
            "success_percent": 90,
            "max_failure_percent": 10,
            "min_executed_for_brake": 3,
            "phase_timeout_s": 1200,
        }
    )
    assert p.release_name == "fw" and p.selector == "kind=car"
    assert p.phases[0].min_soak_s == 60 and p.success.percent == 90 and p.success.timeout_s == 1200
    assert (p.abort[0].threshold_percent, p.abort[0].min_executed) == (10, 3)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "spec:\n  release: {version: 2.0.0}\n  phases:\n    - {name: a, percent: 120}\n",
            "rollout.yaml:4:17: spec.phases[0].percent: must be between 0 and 100",
        ),
        (
            "spec:\n  release: {version: 2.0.0}\n  phases: [{name: a}]\n  colour: red\n",
            "rollout.yaml:4:3: spec.colour: unknown field",
        ),
        (
            "spec:\n  release: {version: 2.0.0}\n  phases:\n    - name: a\n      percent: 50\n",
            "rollout.yaml:5:7: spec.phases[0].percent: the last phase must reach 100",
        ),
        (
            "spec:\n  release: {version: 2.0.0}\n  phases: [{name: a}]\n  maintenance:\n    windows:\n"
            "      - {cron: '0 25 * * *', duration: 1h}\n",
            "rollout.yaml:6:10: spec.maintenance.windows[0].cron: "
            "cron '0 25 * * *': hour '25' is outside 0-23",
        ),
        (
            "spec:\n  release: {version: 2.0.0}\n  phases: [{name: a}]\n  gates:\n    - name: g\n"
            "      capture_rate: {campaign: c}\n      phases: [nope]\n",
            "rollout.yaml:7:7: spec.gates[0].phases[0]: no phase named 'nope'",
        ),
        (
            "spec:\n  release: {version: 2.0.0}\n  phases: [{name: a}]\n  install: {type: sometimes}\n",
            "rollout.yaml:4:13: spec.install.type: must be one of soft, forced, timeforced, downloadonly",
        ),
        (
            "spec:\n  release: {version: 2.0.0}\n  phases: [{name: a}]\n"
            "  execution: {in_progress_timeout: soon}\n",
            "rollout.yaml:4:15: spec.execution.in_progress_timeout: expected a duration",
        ),
        ("kind: Deployment\nspec: {}\n", "rollout.yaml:1:1: kind: expected Rollout"),
        ("spec:\n  phases: [{name: a}]\n", "rollout.yaml:2:3: spec.release: required"),
    ],
)
def test_bad_input_says_file_line_col_and_field(text: str, where: str) -> None:
    with pytest.raises(UserError) as err:
        parse_policy(marked(text))
    assert str(err.value).startswith(where), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"phases": [{"name": "a"}]}, "release"),
        ({"release": {"version": "2"}, "phases": []}, "phases"),
        ({"release": {"version": "2"}, "phases": "all"}, "phases"),
        ({"release": {"version": "2"}, "phases": [{"name": "a", "percent": "ten"}]}, "phases[0].percent"),
        ({"release": {"version": "2"}, "phases": [{"name": "a", "count": True}]}, "phases[0].count"),
        ({"release": {"version": "2"}, "phases": [{"percent": 100}]}, "phases[0].name"),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a", "percent": 60}, {"name": "b", "percent": 40}],
            },
            "phases[1].percent",
        ),
        (
            {"release": {"version": "2"}, "phases": [{"name": "a", "count": 1}, {"name": "a"}]},
            "phases[1].name",
        ),
        ({"release": {"version": "2"}, "phases": [{"name": "a", "count": 1, "percent": 100}]}, "phases[0]"),
        (
            {"release": {"version": "2"}, "phases": [{"name": "a"}], "success": {"percent": -1}},
            "success.percent",
        ),
        (
            {"release": {"version": "2"}, "phases": [{"name": "a"}], "abort": [{"min_executed": 0}]},
            "abort[0].min_executed",
        ),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a"}],
                "gates": [
                    {"name": "g", "capture_rate": {"campaign": "c"}, "signal": {"aggregate": "avg(value)"}}
                ],
            },
            "gates[0]",
        ),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a"}],
                "gates": [{"name": "g", "signal": {"aggregate": "avg(value); DROP TABLE samples"}}],
            },
            "gates[0].signal.aggregate",
        ),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a"}],
                "rate": {
                    "exponential": {"base_per_minute": 1, "increase_after": {"notified": 1, "succeeded": 1}}
                },
            },
            "rate.exponential.increase_after",
        ),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a"}],
                "schedule": {"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
            },
            "schedule.end",
        ),
        (
            {"release": {"version": "2"}, "phases": [{"name": "a"}], "install": {"type": "timeforced"}},
            "install.forced_at",
        ),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a"}],
                "maintenance": {
                    "windows": [{"cron": "0 2 * * *", "duration": "1h", "time_zone": "Mars/Olympus"}]
                },
            },
            "maintenance.windows[0].time_zone",
        ),
        (
            {
                "release": {"version": "2"},
                "phases": [{"name": "a"}],
                "maintenance": {"windows": [{"cron": "0 2 * * *"}]},
            },
            "maintenance.windows[0].duration",
        ),
        (
            {"release": {"version": "2"}, "phases": [{"name": "a"}], "target": {"devices": ["a", "a"]}},
            "target.devices",
        ),
        ({"release": {"version": "2"}, "phases": [{"name": "a"}], "weight": 1.5}, "weight"),
        ({"release": {"version": ""}, "phases": [{"name": "a"}]}, "release.version"),
    ],
)
def test_bad_json_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(UserError) as err:
        parse_policy(spec)
    assert field in str(err.value), str(err.value)


def test_durations() -> None:
    assert [parse_duration(v) for v in ("500ms", "90s", "10m", "1.5h", "2d", 42)] == [
        0.5,
        90,
        600,
        5400,
        172800,
        42,
    ]
    for bad in ("soon", -1, "1y", True, float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)


# ------------------------------------------------------------------ maintenance windows


def test_nightly_window_in_two_zones() -> None:
    now = ts("2026-03-10T12:00:00Z")
    berlin = windows_between([("0 2 * * *", 7200, "Europe/Berlin")], now, now + 3 * 86400)
    assert berlin[0] == (ts("2026-03-11T01:00:00Z"), ts("2026-03-11T03:00:00Z"))  # CET = UTC+1
    assert len(berlin) == 3
    tokyo = windows_between([("0 2 * * *", 7200, "Asia/Tokyo")], now, now + 86400)
    assert tokyo[0] == (ts("2026-03-10T17:00:00Z"), ts("2026-03-10T19:00:00Z"))


def test_an_open_window_counts_with_its_real_start_and_overlaps_merge() -> None:
    now = ts("2026-03-10T02:30:00Z")
    open_now = windows_between([("0 2 * * *", 3600, "UTC")], now, now + 3600)
    assert open_now == ((ts("2026-03-10T02:00:00Z"), ts("2026-03-10T03:00:00Z")),)
    assert inside(open_now, now) and not inside(open_now, ts("2026-03-10T03:00:00Z"))
    merged = windows_between([("*/10 * * * *", 1200, "UTC")], now, now + 1800)
    assert len(merged) == 1


def test_weekday_names_and_dst() -> None:
    now = ts("2026-03-27T00:00:00Z")  # a Friday; Berlin springs forward on Sunday 29 March
    w = windows_between([("30 1 * * sun", 3600, "Europe/Berlin")], now, now + 7 * 86400)
    assert w == ((ts("2026-03-29T00:30:00Z"), ts("2026-03-29T01:30:00Z")),)
    summer = windows_between([("0 3 * * sun", 3600, "Europe/Berlin")], now, now + 7 * 86400)
    assert summer[0][0] == ts("2026-03-29T01:00:00Z")  # 03:00 CEST = 01:00 UTC


def test_a_time_in_a_half_hour_gap_starts_when_the_gap_ends() -> None:
    # Lord Howe Island springs forward by 30 minutes: 02:00-02:30 does not exist on 2027-10-03
    since = ts("2027-10-02T00:00:00Z")
    for cron in ("0 2 * * *", "15 2 * * *", "29 2 * * *"):
        first = windows_between([(cron, 600, "Australia/Lord_Howe")], since, since + 86400)[0][0]
        assert first == ts("2027-10-02T15:30:00Z")  # 02:30 +11:00, the first instant after the gap
    after = windows_between([("30 2 * * *", 600, "Australia/Lord_Howe")], since, since + 86400)[0][0]
    assert after == ts("2027-10-02T15:30:00Z")


def test_day_of_month_or_weekday_like_cron() -> None:
    cron = parse_cron("0 0 1 * mon")
    assert cron.matches_date(dt.date(2026, 3, 1))  # the 1st (a Sunday)
    assert cron.matches_date(dt.date(2026, 3, 2))  # a Monday
    assert not cron.matches_date(dt.date(2026, 3, 3))
    assert parse_cron("0 0 * * 7").weekdays == parse_cron("0 0 * * 0").weekdays == frozenset({6})
    for bad in ("0 0 * *", "61 * * * *", "* * * * mon-", "*/0 * * * *", "5-1 * * * *"):
        with pytest.raises(UserError):
            parse_cron(bad)


@settings(max_examples=100, deadline=None)
@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    duration=st.integers(60, 6 * 3600),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
    start=st.floats(1.7e9, 1.9e9),
)
def test_every_window_starts_at_the_local_time_the_cron_says(
    minute: int, hour: int, duration: int, zone: str, start: float
) -> None:
    from zoneinfo import ZoneInfo

    windows = windows_between([(f"{minute} {hour} * * *", duration, zone)], start, start + 4 * 86400)
    assert windows
    for a, b in windows:
        assert b > start and a < start + 4 * 86400 and b - a >= duration
        local = dt.datetime.fromtimestamp(a, ZoneInfo(zone))
        if (local.hour, local.minute) == (hour, minute):
            continue
        # a local time that does not exist that day (inside a DST gap, one hour or Lord Howe's half hour)
        # starts where the gap ends: the wall time is missing, and the offset changes exactly at the start
        wall = dt.datetime(local.year, local.month, local.day, hour, minute, tzinfo=ZoneInfo(zone))
        back = wall.astimezone(dt.UTC).astimezone(ZoneInfo(zone))
        assert back.replace(tzinfo=None) != wall.replace(tzinfo=None), (local, hour, minute)
        before = dt.datetime.fromtimestamp(a - 1, ZoneInfo(zone))
        assert before.utcoffset() != local.utcoffset(), (local, hour, minute)


def _doc_examples() -> list[str]:
    text = (Path(__file__).parents[2] / "docs" / "rollouts.md").read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


def test_every_policy_in_the_docs_parses_and_round_trips() -> None:
    examples = _doc_examples()
    assert len(examples) >= 9  # one per field group
    for i, text in enumerate(examples):
        policy = parse_policy(marked(text, f"docs/rollouts.md#{i}"))
        assert parse_policy(policy_to_dict(policy)) == policy
