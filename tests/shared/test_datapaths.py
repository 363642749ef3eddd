"""Where recordings come from: --data, then $FLEETLOOP_DATA, then ../shared/data/real."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetloop_shared.datapaths import ENV_VAR, comma2k19_segment, find_recordings
from fleetloop_shared.errors import ConfigError


def test_explicit_directory_wins(recordings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "/nonexistent")
    assert find_recordings(recordings) == recordings.resolve()


def test_bad_explicit_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a recordings directory"):
        find_recordings(tmp_path)


def test_env_var_is_used_and_checked(
    recordings: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VAR, str(recordings))
    assert find_recordings() == recordings.resolve()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(ConfigError, match=ENV_VAR):
        find_recordings()


def test_comma_segment_is_found(recordings: Path) -> None:
    seg = comma2k19_segment(recordings)
    assert (seg / "processed_log" / "CAN" / "raw_can" / "t").is_file()
