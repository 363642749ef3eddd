"""``fleetloop demo --scenario bad-release | good-release``: a rollout decided by the fleet's own data.

Each run starts a real coordinator and nine simulated cars (real agents under their A/B bootloader; each
car's bus is driven by the firmware it booted), applies the harsh-braking campaign and rolls out v2 with
a canary phase and a capture-rate gate. No recordings are needed: the simulated car path, as from a
fresh clone. Each takes 2-3 minutes, most of it the gate's minimum exposure (two drive loops of the
three canary cars) and the cars' installs. The bad release's test is in
tests/e2e/test_demo_scenario_bad_release.py (a file of its own, so that two test workers run the two
side by side).
"""

from __future__ import annotations

import json
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
