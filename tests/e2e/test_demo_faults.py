"""``fleetloop demo --inject``: the demo with a fault injected tells the truth — a v2 that fails its
health check is rolled back on the canary and the rollout pauses; a delta corrupted after signing is
refused by the device and the rollout pauses. (Apart from tests/e2e/test_demo.py so that two test workers
can run the demos side by side.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_demo import run_demo

pytestmark = pytest.mark.e2e


def test_demo_tells_the_truth_when_v2_fails_its_health_check(tmp_path: Path, recordings: Path) -> None:
    code, summary, logs = run_demo(tmp_path, recordings, "--inject", "bad-health")
    assert code != 0
    ro = summary["rollout"]
    assert ro["state"] == "paused", logs
    assert ro["devices"]["car-001"]["state"] == "ROLLED_BACK", logs
    assert "health" in ro["devices"]["car-001"]["reason"]
    assert ro["devices_updated"] < 4
    assert "rollout paused" in summary["error"]


def test_demo_refuses_a_corrupted_artifact(tmp_path: Path, recordings: Path) -> None:
    code, summary, logs = run_demo(tmp_path, recordings, "--inject", "corrupt-artifact")
    assert code != 0
    ro = summary["rollout"]
    assert ro["state"] == "paused", logs
    failed = [d for d in ro["devices"].values() if d["state"] == "FAILED"]
    assert failed, logs
    assert any("hash" in d["reason"] or "delta" in d["reason"] for d in failed), ro
    assert ro["devices_updated"] == 0
