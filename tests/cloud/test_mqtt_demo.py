"""`fleetloop demo --transport mqtt --json`: the whole loop with every device on MQTT 5 (private
mosquitto, TLS client certificates, per-device ACLs) works like the gRPC demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_over_mqtt(tmp_path: Path, recordings: Path) -> None:
    args = [sys.executable, "-m", "fleetloop_cli.main", "demo", "--json", "--transport", "mqtt"]
    args += ["--workdir", str(tmp_path / "w"), "--data", str(recordings)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=400, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], summary
    assert summary["transport"] == "mqtt"
    assert summary["samples_ingested"] > 0 and summary["rollout"]["devices_updated"] == 4
    assert {m["kind"]: m["origin"] for m in summary["machines"].values()} == {
        "car": "live",
        "robot": "live",
        "plc": "live",
        "hub": "live",
    }
    broker_log = (tmp_path / "w" / "broker" / "mosquitto.log").read_text()
    assert "as car-001" in broker_log and "u'car-001'" in broker_log
