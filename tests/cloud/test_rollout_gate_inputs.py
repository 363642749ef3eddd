"""Gate inputs over a real fleet store (Parquet written as ingest writes it, DuckDB, the captures table):
counts and exposures per cohort span, per-device aggregates, and the whole path from a rollout's cohorts
to a gate's decision."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.repositories.records import SegmentReceipt
from fleetloop_cloud.rollout import gating
from fleetloop_cloud.rollout.gate_inputs import (
    FleetStoreGateInputs,
    Span,
    capture_counts,
    cohort_over,
    device_values,
)
from fleetloop_cloud.rollout.policy import SignalGate
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.segment import Segment, new_segment_id

T0 = 1_800_000_000.0  # when the rollout's canary committed (coordinator clock)
PRESSURE = "Vehicle.Chassis.Brake.PedalPressure"
#: device → (captures of harsh-braking at T0 + k·10 min, mean brake pressure)
FLEET: dict[str, tuple[int, float]] = {
    "car-a": (6, 42.0),
    "car-b": (5, 40.0),
    "car-c": (1, 20.0),
    "car-d": (2, 21.0),
    "car-e": (1, 19.0),
    "car-f": (0, 22.0),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> QueryEngine:
    root = tmp_path_factory.mktemp("gate-inputs")
    fleet = FleetStore(root / "fleet")
    meta = open_repositories(root / "meta.sqlite").segments
    catalog = Catalog()
    catalog.add(PRESSURE, DataType.FLOAT64, "bar")
    rng = np.random.default_rng(7)
    for device, (captures, mean) in FLEET.items():
        # one capture before the span (not counted), then ``captures`` inside it
        for k in range(-1, captures):
            received = T0 + 600.0 * k + 60.0
            t_ns = int(received * 1e9) + np.arange(50, dtype=np.int64) * 100_000_000
            values = mean + rng.normal(0.0, 0.5, 50) - (1000.0 if k < 0 else 0.0)
            seg = Segment(new_segment_id(), "can0/BRAKE", t_ns, {1: values}, {1: DataType.FLOAT64})
            capture_id = f"cap-{device}-{k}"
            n = fleet.write_segment(fleet="taxi", device_id=device, capture_id=capture_id,
                                    campaign="harsh-braking", segment=seg, catalog=catalog,
                                    received_unix=received)  # fmt: skip
            receipt = SegmentReceipt(capture_id, "harsh-braking", 8, n, int(t_ns[0]), int(t_ns[-1]))
            meta.record(device, seg.segment_id, receipt, received)
    return QueryEngine(root / "fleet", captures=meta.captures)


def test_captures_are_counted_within_each_devices_span(engine: QueryEngine) -> None:
    cohort = cohort_over(["car-a", "car-b"], T0, T0 + 3600.0)
    counts = capture_counts(engine, cohort, campaign="harsh-braking")
    assert dict(counts.by_device) == {"car-a": 6, "car-b": 5}
    assert (counts.events, counts.exposure_h, counts.devices) == (11, 2.0, 2)
    # a shorter span for one device: only its captures inside it count, and only its hours
    short = {"car-a": Span(T0, T0 + 1800.0), "car-b": Span(T0, T0 + 3600.0)}
    counts = capture_counts(engine, short, campaign="harsh-braking")
    assert dict(counts.by_device) == {"car-a": 3, "car-b": 5} and counts.exposure_h == 1.5
    assert "FROM cohort LEFT JOIN captures" in counts.sql  # the SQL a release manager can rerun
    assert capture_counts(engine, cohort, campaign="other").events == 0


def test_per_device_aggregates_match_numpy(engine: QueryEngine) -> None:
    cohort = cohort_over(list(FLEET), T0, T0 + 7200.0)
    got = device_values(engine, cohort, aggregate="avg(value)", where=f"signal = '{PRESSURE}'")
    assert set(got.values) == set(FLEET) - {"car-f"} and got.missing == ("car-f",)  # car-f: no capture
    for device, value in got.values.items():
        assert value == pytest.approx(FLEET[device][1], abs=0.3)
    per_hour = device_values(
        engine, cohort, aggregate="count(*) / any_value(exposure_h)", where=f"signal = '{PRESSURE}'"
    )
    assert per_hour.values["car-b"] == pytest.approx(5 * 50 / 2.0)


def test_bad_cohorts_and_expressions_are_user_errors(engine: QueryEngine) -> None:
    with pytest.raises(UserError, match="end at or after its start"):
        capture_counts(engine, {"car-b": Span(T0, T0 - 1)}, campaign="harsh-braking")
    with pytest.raises(UserError, match="campaign"):
        capture_counts(engine, cohort_over(["car-b"], T0, T0 + 1), campaign="")
    with pytest.raises(UserError, match=r"^clock must be one of received, sample, got 'wall'$"):
        capture_counts(engine, cohort_over(["car-b"], T0, T0 + 1), campaign="x", clock="wall")  # type: ignore[arg-type]
    # an id with a quote is data in the cohort list, not SQL
    hostile_id = "x') OR true --"
    hostile = capture_counts(engine, cohort_over([hostile_id], T0, T0 + 3600.0), campaign="harsh-braking")
    assert hostile.events == 0 and dict(hostile.by_device) == {hostile_id: 0}
    with pytest.raises(UserError, match="aggregate"):
        device_values(engine, cohort_over(["car-b"], T0, T0 + 1), aggregate=" ")


def _gate(kind: dict[str, object]) -> SignalGate:
    policy = parse_policy(
        {
            "release": {"version": "2"},
            "phases": [{"name": "canary", "count": 2}, {"name": "rest"}],
            "gates": [{"name": "g", **kind, "min_devices": 2, "min_exposure": "1h", "confidence": 0.95}],
        }
    )
    return policy.gates[0]


def test_a_rollouts_cohorts_reach_a_decision_through_the_fleet_store(engine: QueryEngine) -> None:
    inputs = FleetStoreGateInputs(engine)
    control = dict.fromkeys(("car-c", "car-d", "car-e", "car-f"), T0)
    cohorts = gating.Cohorts(treated={"car-a": T0, "car-b": T0}, control=control)
    now = T0 + 3600.0
    rate = gating.evaluate(_gate({"capture_rate": {"campaign": "harsh-braking"}}), cohorts, inputs, now)
    assert rate.decision == "trip", rate.reason
    assert (rate.inputs["treated_events"], rate.inputs["control_events"]) == (11.0, 4.0)
    assert rate.inputs["treated_exposure_h"] == 2.0 and rate.inputs["control_exposure_h"] == 4.0
    signal = {"signal": {"aggregate": "avg(value)", "where": f"signal = '{PRESSURE}'"}, "min_effect": 5}
    mean = gating.evaluate(_gate(signal), cohorts, inputs, now)
    assert mean.decision == "trip" and mean.inputs["control_devices"] == 3.0  # car-f had no data
    assert mean.effect == pytest.approx(41.0 - 20.0, abs=0.5)
    # the same cohorts swapped: the "updated" cars look better, nothing trips
    swapped = gating.Cohorts(treated=cohorts.control, control=cohorts.treated)
    assert gating.evaluate(_gate(signal), swapped, inputs, now).decision == "pass"


def test_a_failing_query_is_insufficient_never_a_decision(engine: QueryEngine) -> None:
    cohorts = gating.Cohorts(treated={"car-b": T0, "car-c": T0}, control={"car-d": T0, "car-e": T0})
    gate = _gate({"signal": {"aggregate": "avg(no_such_column)"}})
    e = gating.evaluate(gate, cohorts, FleetStoreGateInputs(engine), T0 + 3600.0)
    assert e.decision == "insufficient" and "inputs unavailable" in e.reason and math.isnan(e.p_value)
    record = gating.as_record(0, gate, e)
    assert record.p_value is None and record.statistic is None and "no_such_column" in record.reason
