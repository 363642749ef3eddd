"""``fleetloop demo --scenario bad-release | good-release``: a rollout decided by the fleet's own data.

Each run starts a real coordinator and nine simulated cars (real agents under their A/B bootloader; each
car's bus is driven by the firmware it booted), applies the harsh-braking campaign and rolls out v2 with
a canary phase and a capture-rate gate. No recordings are needed: the simulated car path, as from a
fresh clone. Each takes 2-3 minutes, most of it the gate's minimum exposure (two drive loops of the
three canary cars) and the cars' installs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

CARS = [f"car-{i:03d}" for i in range(1, 10)]


def run_scenario(tmp_path: Path, scenario: str) -> tuple[int, dict[str, Any], str]:
    work = tmp_path / "w"
    args = [sys.executable, "-m", "fleetloop_cli.main", "demo", "--scenario", scenario, "--json"]
    args += ["--workdir", str(work), "--timeout", "300"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=420, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    logs = []
    for f in sorted((work / "logs").glob("*.log")):
        logs.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    text = proc.stderr + "\n".join(logs)
    assert lines, f"no JSON summary; stderr:\n{text}"
    return proc.returncode, json.loads(lines[-1]), text


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


def test_a_good_release_passes_its_gate_and_completes(tmp_path: Path) -> None:
    code, summary, logs = run_scenario(tmp_path, "good-release")
    ro = summary["rollout"]
    assert code == 0 and summary["ok"] is True, (summary.get("error"), ro, logs)
    assert ro["state"] == "succeeded"
    assert ro["devices_exposed_beyond_phase"] == 0
    decisions = [d["decision"] for d in ro["gate_decisions"]]
    assert decisions and "trip" not in decisions and decisions[-1] == "pass"
    passed = ro["gate_decisions"][-1]
    assert passed["p_value"] > 0.01 and passed["inputs"]["treated_exposure_h"] >= 0.05
    assert ro["rollback"] is None
    assert ro["devices_on_v2"] == CARS
