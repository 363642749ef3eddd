"""CAN bus logs in ASAM MDF 4 (the CSS Electronics CANedge recordings in ../shared/data/real), decoded
through their DBCs — J1939 messages matched by PGN whatever the source address."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetloop_agent.recordings import read_recording
from fleetloop_agent.recordings.mf4 import read_mf4
from fleetloop_shared.dbc import j1939_pgn
from fleetloop_shared.errors import ConfigError

pytest.importorskip("asammdf")


def test_j1939_pgn_ignores_source_and_pdu1_destination() -> None:
    assert j1939_pgn(0x0CF00400) == j1939_pgn(0x0CF004FE) == 0xF004  # PDU2: EEC1 from any source
    assert j1939_pgn(0x18FEF1FE) == 0xFEF1
    assert j1939_pgn(0x18EA00F9) == j1939_pgn(0x18EAFF00) == 0xEA00  # PDU1: destination left out


def test_a_j1939_truck_log_decodes_by_pgn(recordings: Path) -> None:
    css = recordings / "css-electronics"
    log = css / "j1939_truck_400s" / "00000001.MF4"
    frames = read_mf4(log)
    assert len(frames.t_ns) > 100_000 and np.all(np.diff(frames.t_ns) >= 0)
    assert frames.t_ns[0] > 1_600_000_000 * 10**9  # wall-clock time from the file's start time
    result = read_recording(log, dbc=css / "dbc" / "CSS-Electronics-SAE-J1939-DEMO.dbc")
    groups = {g.name: g for g in result.groups}
    assert set(groups) == {"can1/EEC1", "can1/CCVS1"}
    rpm = groups["can1/EEC1"].columns["EngineSpeed"]
    speed = groups["can1/CCVS1"].columns["WheelBasedVehicleSpeed"]
    assert len(rpm) > 3000 and float(np.min(rpm)) >= 0 and float(np.max(rpm)) < 3000
    assert float(np.min(speed)) >= 0 and float(np.max(speed)) < 130


def test_a_gnss_module_log_decodes_its_can_fd_frames(recordings: Path) -> None:
    css = recordings / "css-electronics"
    log = css / "canmod_gps_obd2_545s" / "00000001-60FE3F04.MF4"
    result = read_recording(log, dbc=css / "dbc" / "canmod-gps.dbc")
    imu = next(g for g in result.groups if g.name.endswith("/gnss_imu"))
    assert len(imu.t_ns) > 50_000
    assert sum(len(g.t_ns) * len(g.columns) for g in result.groups) > 300_000


def test_a_file_that_is_not_mf4_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "log.MF4"
    bad.write_text("t,signal,value\n0,a,1\n")  # a CSV saved under the wrong name
    with pytest.raises(ConfigError, match=r"log\.MF4: not an MF4 file"):
        read_mf4(bad)


def test_the_agent_does_not_load_asammdf_or_pandas_until_an_mf4_file_is_read() -> None:
    """python-can (under cantools) would import asammdf and pandas (~85 MB) in every agent once the mf4
    extra is installed; the agent's memory budget (RSS ≤ 80 MB) depends on it not doing so."""
    import subprocess
    import sys

    probe = (
        "import sys, fleetloop_agent.runtime, fleetloop_agent.sources.can_replay;"
        "print(sorted(m for m in ('pandas', 'asammdf', 'canmatrix') if m in sys.modules))"
    )
    cmd = [sys.executable, "-c", probe]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
