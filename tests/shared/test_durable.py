"""Crash-safe replacement: whole old or whole new content, the right mode, no leftovers."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleetloop_shared.durable import write_atomically


def test_replaces_content_and_keeps_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_atomically(target, b"old")
    write_atomically(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_mode_applies_from_the_start(tmp_path: Path) -> None:
    key = tmp_path / "release.pem"
    write_atomically(key, b"secret", mode=0o600)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_failed_rename_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("x")
    with pytest.raises(OSError):
        write_atomically(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_full_disk_is_storage_full_and_old_content_survives(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from fleetloop_shared.durable import write_atomically\n"
        "from fleetloop_shared.errors import StorageFullError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
        "try:\n"
        f"    write_atomically(Path({str(target)!r}), b'x' * 100000)\n"
        "except StorageFullError as exc:\n"
        "    print('full:', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "disk full writing" in proc.stdout
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
