"""The rollout controller under a kill-and-restart loop: a real coordinator SIGKILLed 50 times at random
points while it rolls releases out in phases to simulated devices (``fleetloop sim rollout-kill``).

After every restart the rollout goes on where it was: no device is offered a release before its phase
opened, each phase opens exactly once and in order, each rollout finishes once, each device gets one job
id per rollout, and every device ends on the last release. About 3 minutes (each kill costs a
coordinator start); ``fleetloop sim rollout-kill --kills 500`` is the longer run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_fifty_coordinator_kills_during_rollouts_lose_and_double_nothing(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "fleetloop_cli.main", "sim", "rollout-kill", "--kills", "50"]
    argv += ["--devices", "16", "--seed", "7", "--workdir", str(tmp_path), "-o", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert "{" in proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    log = (tmp_path / "coordinator.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == 0 and report["ok"] is True, (report, log)
    assert report["kills"] == 50
    assert report["rollouts"] >= 2 and report["devices"] == 16
    assert report["beyond_phase"] == 0 and report["lost_or_doubled"] == 0 and report["extra_jobs"] == 0
    assert report["problems"] == []
