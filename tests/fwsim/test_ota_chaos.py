"""The power-cut campaign in process: every cut point is reached and no run bricks the device."""

from __future__ import annotations

from pathlib import Path

from fleetloop_cli.ota_commands import _LocalCloud
from fleetloop_fwsim.ota_chaos import run_ota_chaos


def test_power_cuts_everywhere_brick_nothing(tmp_path: Path) -> None:
    cloud = _LocalCloud(tmp_path, 64 * 1024)
    try:
        result = run_ota_chaos(cloud, tmp_path / "devices", runs=16, seed=11)
    finally:
        cloud.close()
    assert [p.algorithm for p in cloud.release.payloads if p.kind == "delta"] == ["fldelta2"]
    assert result.runs == 16 and result.bricked == 0, result.bricks
    assert result.ended_old + result.ended_new == 16
    assert result.ended_old > 0 and result.ended_new > 0  # rollbacks and commits both happened
    assert result.power_cuts >= 16 and result.resumed > 0
    assert set(result.final_states) <= {"COMMITTED", "ROLLED_BACK"}
    assert len(result.cut_points) >= 6, result.cut_points  # journal, download, slot write, env ...
