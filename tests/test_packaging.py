"""`pip install .` and `pip install -e .` both work, and install only our own import packages."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["fleetloop_shared", "fleetloop_agent", "fleetloop_cloud", "fleetloop_fwsim", "fleetloop_cli"]

pytestmark = pytest.mark.packaging


def _make_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin" / "python"


def _install(python: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _where(python: Path, env_extra: dict[str, str]) -> dict[str, str]:
    code = (
        "import importlib, json\n"
        f"print(json.dumps({{p: importlib.import_module(p).__file__ for p in {PACKAGES!r}}}))"
    )
    env = {**os.environ, **env_extra}
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=env, check=False, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    import json

    result: dict[str, str] = json.loads(proc.stdout)
    return result


def _deps_path() -> str:
    # the dependencies (numpy, grpc, ...) come from the test's own environment, our packages must not
    return sysconfig.get_paths()["purelib"]


def test_regular_install(tmp_path: Path) -> None:
    python = _make_venv(tmp_path / "venv")
    _install(python, ".")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tops = {p.name for p in Path(site).iterdir()}
    for pkg in PACKAGES:
        assert pkg in tops
    for generic in ("agent", "cloud", "shared", "proto", "tests", "cli", "firmware_sim"):
        assert generic not in tops, f"generic top-level {generic!r} leaked into site-packages"
    assert (Path(site) / "fleetloop_fwsim" / "data" / "sim_vehicle.dbc").is_file()
    assert (Path(site) / "fleetloop_shared" / "wire" / "gen" / "fleetloop" / "device" / "v1").is_dir()
    assert (tmp_path / "venv" / "bin" / "fleetloop").is_file()
    files = _where(python, {"PYTHONPATH": _deps_path()})
    for pkg, f in files.items():
        assert f.startswith(site), f"{pkg} imported from {f}, not the installed copy"


def test_editable_install(tmp_path: Path) -> None:
    python = _make_venv(tmp_path / "venv")
    _install(python, "-e", ".")
    files = _where(python, {"PYTHONPATH": _deps_path()})
    for pkg, f in files.items():
        assert Path(f).resolve().is_relative_to(ROOT), f"{pkg} imported from {f}, not the checkout"
    assert sys.executable  # the suite's own interpreter is untouched
