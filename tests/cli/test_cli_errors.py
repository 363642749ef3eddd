"""A new user's mistakes get one line on stderr and an exit code scripts can rely on."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetloop_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_wrong_config_path(tmp_path: Path) -> None:
    proc = run("agent", "run", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "config file not found" in one_line(proc.stderr)


def test_unreachable_cloud_for_a_query() -> None:
    proc = run("query", "SELECT 1", "--cloud", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 6
    assert "cannot reach the coordinator" in one_line(proc.stderr)


def test_unknown_subcommand_is_a_usage_error() -> None:
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice" in one_line(proc.stderr)


def test_bad_data_dir_for_demo(tmp_path: Path) -> None:
    proc = run("demo", "--data", str(tmp_path))
    assert proc.returncode == 2
    assert "not a recordings directory" in one_line(proc.stderr)


@pytest.mark.parametrize("kind", ["artifacts", "rules"])
def test_missing_file_arguments(kind: str, tmp_path: Path) -> None:
    args = (
        ["artifacts", "upload", str(tmp_path / "nope.img"), "--version", "2", "--hardware", "h"]
        if kind == "artifacts"
        else ["rules", "validate", str(tmp_path / "nope.yaml")]
    )
    proc = run(*args)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
