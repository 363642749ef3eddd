"""``fleetloop artifacts delta|patch`` and ``sim ota-chaos`` as a release manager runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetloop_fwsim.code_image import image_pair


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetloop_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("fmt", ["fldelta2", "fldelta1"])
def test_delta_then_patch_rebuilds_the_new_image(tmp_path: Path, fmt: str) -> None:
    old, new = image_pair("insert", size=300_000)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    args = ["--from", str(tmp_path / "old.img"), "--to", str(tmp_path / "new.img"), "-o", str(tmp_path / "p")]
    made = run("artifacts", "delta", *args, *(["--format", fmt] if fmt == "fldelta1" else []))
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["algorithm"].startswith(f"{fmt}:") and info["new_bytes"] == len(new)
    assert info["bytes"] == (tmp_path / "p").stat().st_size < len(new) // 3
    applied = run(
        "artifacts", "patch", "--from", str(tmp_path / "old.img"), "--patch", str(tmp_path / "p"),
        "-o", str(tmp_path / "out.img"),
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert (tmp_path / "out.img").read_bytes() == new


def test_bad_inputs_get_one_line_and_an_exit_code(tmp_path: Path) -> None:
    (tmp_path / "old.img").write_bytes(b"old")
    (tmp_path / "junk").write_bytes(b"not a delta at all")
    missing = run(
        "artifacts",
        "delta",
        "--from",
        str(tmp_path / "nope"),
        "--to",
        str(tmp_path / "old.img"),
        "-o",
        str(tmp_path / "p"),
    )
    assert missing.returncode == 3 and len(missing.stderr.strip().splitlines()) == 1
    junk = run(
        "artifacts",
        "patch",
        "--from",
        str(tmp_path / "old.img"),
        "--patch",
        str(tmp_path / "junk"),
        "-o",
        str(tmp_path / "out"),
    )
    assert junk.returncode == 5 and "delta is malformed" in junk.stderr
    assert len(junk.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_ota_chaos_small_campaign_bricks_nothing() -> None:
    done = run(
        "sim", "ota-chaos", "--runs", "8", "--seed", "3", "--image-kb", "128", "-o", "json", timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["runs"] == 8 and result["bricked"] == 0
    assert result["ended_old"] + result["ended_new"] == 8
    assert result["power_cuts"] >= 8 and result["resumed"] >= 1
