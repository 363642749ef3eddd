"""The rollout controller under a kill-and-restart loop: a real coordinator SIGKILLed 20 times at random
points while it rolls releases out in phases to simulated devices (``fleetloop sim rollout-kill``).

After every restart the rollout goes on where it was: no device is offered a release before its phase
opened, each phase opens exactly once and in order, each rollout finishes once, each device gets one job
id per rollout, and every device ends on the last release. About a minute and a half (each kill costs a
coordinator start); ``fleetloop sim rollout-kill --kills 500`` is the longer run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_twenty_coordinator_kills_during_rollouts_lose_and_double_nothing(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "fleetloop_cli.main", "sim", "rollout-kill", "--kills", "20"]
    argv += ["--devices", "16", "--seed", "7", "--workdir", str(tmp_path), "-o", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert "{" in proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    log = (tmp_path / "coordinator.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == 0 and report["ok"] is True, (report, log)
    assert report["kills"] == 20
    assert report["rollouts"] >= 2 and report["devices"] == 16
    assert report["beyond_phase"] == 0 and report["lost_or_doubled"] == 0 and report["extra_jobs"] == 0
    assert report["problems"] == []


class _History:
    """What the coordinator's API would answer about one rollout of two phases."""

    def __init__(self, events: list[tuple[str, float]], offered: dict[str, tuple[int, float, int]]) -> None:
        self.events = events
        self.offered = offered

    def call(self, method: str, path: str) -> object:
        if path.endswith("/history"):
            return {"events": [{"event": e, "at": at, "detail": ""} for e, at in self.events]}
        if path.endswith("/executions"):
            return [
                {"device_id": d, "phase": p, "offered_at": at, "attempt": n}
                for d, (p, at, n) in self.offered.items()
            ]
        return {"state": "SUCCEEDED", "phases": [{}, {}]}


class _Device:
    def __init__(self, device_id: str, jobs: dict[str, float]) -> None:
        self.device_id, self.version = device_id, "2.0.0"
        self.seen = type("Seen", (), {"jobs": jobs})()


def test_the_checks_see_an_early_offer_a_doubled_phase_and_a_second_attempt() -> None:
    from fleetloop_fwsim.rollout_kill import check_rollouts

    good = _History(
        [("created", 10.0), ("phase", 20.0), ("succeeded", 30.0)], {"a": (0, 11.0, 1), "b": (1, 21.0, 1)}
    )
    devices = [_Device("a", {"r:a": 11.0}), _Device("b", {"r:b": 21.0})]
    assert check_rollouts(good, devices, ["r"], 1, 1.0, 2).ok  # type: ignore[arg-type]

    early = _Device("b", {"r:b": 15.0})  # received before its phase opened at 20
    report = check_rollouts(good, [devices[0], early], ["r"], 1, 1.0, 2)  # type: ignore[arg-type]
    assert report.beyond_phase == 1 and not report.ok

    doubled = _History(
        [("created", 10.0), ("phase", 20.0), ("phase", 20.5), ("succeeded", 30.0)], good.offered
    )
    assert check_rollouts(doubled, devices, ["r"], 1, 1.0, 2).lost_or_doubled == 1  # type: ignore[arg-type]

    retried = _History(good.events, {"a": (0, 11.0, 1), "b": (1, 21.0, 2)})
    again = _Device("b", {"r:b": 21.0, "r:b#2": 25.0})
    report = check_rollouts(retried, [devices[0], again], ["r"], 1, 1.0, 2)  # type: ignore[arg-type]
    assert report.extra_jobs == 2 and not report.ok
