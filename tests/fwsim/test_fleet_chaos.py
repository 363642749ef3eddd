"""Many simulated agents, a coordinator killed with SIGKILL and a hostile link: exactly once.

The chaos run is the proof behind ``fleetloop sim chaos``: a seeded fault schedule (coordinator kills,
link stalls longer than the upload deadline, connection resets, per-chunk delays), then a drain, then
acknowledged samples compared with rows in the fleet store.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from fleetloop_fwsim.chaos import ChaosProxy, run_chaos
from fleetloop_fwsim.fleet import run_fleet


def _echo_server() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                try:
                    while data := c.recv(1024):
                        c.sendall(data)
                except OSError:
                    pass

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_proxy_forwards_and_cuts_connections() -> None:
    srv = _echo_server()
    proxy = ChaosProxy(srv.getsockname())
    proxy.start()
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(b"ping")
                assert s.recv(16) == b"ping"
                proxy.cut_all()
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(16) == b""
        assert proxy.connections_total == 2
        assert proxy.resets >= 2
    finally:
        proxy.close()
        srv.close()


def test_fleet_uploads_everything_it_stores(tmp_path: Path, recordings: Path) -> None:
    out = run_fleet(devices=3, duration_s=4, workdir=tmp_path, recordings=recordings)
    assert out["data_origin"] == "recordings"
    assert out["drained"] and out["peak_connected"] == 3
    assert out["samples_stored"] > 0
    assert out["acknowledged_samples"] == out["samples_stored"] == out["ingested_samples"]
    assert out["duplicates"] == 0


def test_chaos_acknowledged_equals_ingested_without_duplicates(tmp_path: Path, recordings: Path) -> None:
    out = run_chaos(
        devices=4, duration_s=8, workdir=tmp_path, recordings=recordings, seed=3, coordinator_kills=2
    )
    assert out["drained"], out
    assert out["coordinator_restarts"] == 2
    assert out["link_stalls"] + out["connections_reset"] > 0
    assert out["acknowledged_samples"] > 0
    assert out["acknowledged_samples"] == out["ingested_samples"], out
    assert out["duplicates"] == 0 and out["lost"] == 0, out


def test_sim_chaos_command_prints_the_four_numbers(tmp_path: Path, recordings: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetloop_cli.main", "sim", "chaos", "--devices", "2", "--duration", "3",
         "--data", str(recordings), "-o", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for key in ("acknowledged_samples", "ingested_samples", "duplicates", "lost"):
        assert key in out
    assert out["acknowledged_samples"] == out["ingested_samples"] and out["duplicates"] == 0


def test_sim_rejects_bad_arguments_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetloop_cli.main", "sim", "fleet", "--devices", "0", "--duration", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_chaos_over_mqtt_with_broker_and_coordinator_restarts(tmp_path: Path, recordings: Path) -> None:
    out = run_chaos(
        devices=3,
        duration_s=10,
        workdir=tmp_path,
        recordings=recordings,
        seed=5,
        coordinator_kills=2,
        transport="mqtt",
    )
    assert out["drained"], out
    assert out["coordinator_restarts"] == 1 and out["broker_restarts"] == 1
    assert out["acknowledged_samples"] > 0
    assert out["acknowledged_samples"] == out["ingested_samples"], out
    assert out["duplicates"] == 0 and out["lost"] == 0, out
