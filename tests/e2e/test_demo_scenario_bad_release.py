"""``fleetloop demo --scenario bad-release``: the canary's capture rate trips the gate, the controller
aborts the rollout and rolls the canary back by itself (tests/e2e/test_demo_scenarios.py says how the
scenarios run; apart from it so that two test workers can run both scenarios side by side)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.test_demo_scenarios import CARS, run_scenario

pytestmark = pytest.mark.e2e


def test_a_bad_release_is_stopped_by_its_gate_and_rolled_back_by_itself(tmp_path: Path) -> None:
    code, summary, logs = run_scenario(tmp_path, "bad-release")
    ro = summary["rollout"]
    assert code == 0 and summary["ok"] is True, (summary.get("error"), ro, logs)
    assert ro["state"] == "aborted" and ro["phase"] == "canary"
    assert ro["devices_exposed_beyond_phase"] == 0
    # the decision, with its numbers: the canary's capture rate shown above 1.2x control at 99 %
    trip = ro["gate_decisions"][-1]
    assert trip["gate"] == "harsh-braking" and trip["decision"] == "trip"
    assert trip["p_value"] is not None and trip["p_value"] <= 0.01
    inputs = trip["inputs"]
    assert inputs["treated_exposure_h"] >= 0.05 and inputs["control_exposure_h"] >= 0.05
    rate_ratio = (inputs["treated_events"] / inputs["treated_exposure_h"]) / (
        inputs["control_events"] / inputs["control_exposure_h"]
    )
    assert trip["effect"] == pytest.approx(rate_ratio) and rate_ratio > 2.0
    assert inputs["ratio_lower_bound"] > 1.2
    assert all(d["decision"] != "pass" for d in ro["gate_decisions"])
    # ... in the rollout's audit trail: the trip, the roll-back it created, the abort
    events = [e["event"] for e in ro["audit"]]
    assert events[-3:] == ["gate", "rollback", "aborted"], ro["audit"]
    detail = ro["audit"][-3]["detail"]
    shown_p = re.search(r"\bp ([0-9.]+(?:e[-+]?[0-9]+)?)", detail)
    assert "trip" in detail and shown_p is not None and float(shown_p.group(1)) < 0.01, detail
    # the controller's roll-back brought the canary back to v1; the rest never left it
    assert ro["rollback"]["state"] == "succeeded"
    assert sorted(ro["rollback"]["devices"]) == sorted(ro["canary"]) and len(ro["canary"]) == 3
    assert ro["devices_on_v2"] == [] and ro["devices_on_v1"] == CARS
    # the SQL that shows why: every updated car captured more than every car not updated
    rows = summary["sql_rows"]
    updated = [int(r[2]) for r in rows if r[1] == "updated"]
    control = [int(r[2]) for r in rows if r[1] == "not updated"]
    assert len(updated) == 3 and control and min(updated) > max(control), rows
