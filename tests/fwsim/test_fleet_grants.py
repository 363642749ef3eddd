"""Upload scheduling wired end to end: simulated devices (the agent's link with grants on) report their
backlog per priority and network in heartbeats; the coordinator's scheduler grants; devices upload only
what was granted — and everything still arrives, exactly once."""

from __future__ import annotations

from pathlib import Path

from fleetloop_fwsim.fleet import run_fleet


def test_devices_upload_under_grants(tmp_path: Path, recordings: Path) -> None:
    out = run_fleet(devices=3, duration_s=2, workdir=tmp_path, recordings=recordings, grants=True)
    assert out["drained"], out
    assert out["grants_received"] > 0
    # every uploaded byte was granted first (overdraft of at most one segment per grant)
    assert out["granted_bytes"] > 0
    assert out["acknowledged_samples"] == out["samples_stored"] == out["ingested_samples"]
    assert out["duplicates"] == 0
