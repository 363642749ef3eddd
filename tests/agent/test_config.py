"""The agent's config file: every mistake is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetloop_agent.config import load_agent_config
from fleetloop_shared.errors import ConfigError

GOOD = """
device_id: car-1
fleet: taxi
labels: {kind: car}
cloud: {grpc: "127.0.0.1:50051"}
sources:
  - {kind: csv_replay, path: x.csv}
platform:
  hardware_id: hw1
  slots: {a: slot_a.img, b: slot_b.img}
  env: bootenv.txt
  booted_slot: booted
  health_commands: [[/bin/true]]
replay: {speed: 2}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_good_config_resolves_paths_against_its_directory(tmp_path: Path) -> None:
    cfg = load_agent_config(write(tmp_path, GOOD))
    assert cfg.device_id == "car-1" and cfg.fleet == "taxi"
    assert cfg.platform.slots["a"] == tmp_path.resolve() / "slot_a.img"
    assert cfg.platform.health_commands == (("/bin/true",),)
    assert cfg.replay_speed == 2.0
    assert cfg.base_dir == tmp_path.resolve()
    assert cfg.store_segment_version is None  # this build's newest
    assert (
        load_agent_config(write(tmp_path, GOOD + "store: {segment_version: 4}\n")).store_segment_version == 4
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_agent_config(tmp_path / "nope.yaml")


def test_yaml_slip_names_line_and_column(tmp_path: Path) -> None:
    bad = GOOD.replace("fleet: taxi", "fleet: taxi\n  oops: [")
    with pytest.raises(ConfigError, match=r"agent.yaml:\d+:\d+: invalid YAML"):
        load_agent_config(write(tmp_path, bad))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("device_id: car-1\n", ""), "missing required key 'device_id'"),
        (lambda t: t.replace('cloud: {grpc: "127.0.0.1:50051"}', "cloud: 5"), "'cloud' must be a dict"),
        (lambda t: t.replace("{a: slot_a.img, b: slot_b.img}", "{a: x}"), "exactly the slots"),
        (lambda t: t.replace("speed: 2", "speed: -1"), "replay.speed must be > 0"),
        (lambda t: t.replace("  - {kind: csv_replay, path: x.csv}", "  - 7"), r"sources\[0\]"),
        (lambda t: t + "trusted_release_keys: [missing.pem]\n", "file not found"),
        (
            lambda t: t + "store: {segment_version: 7}\n",
            "store.segment_version must be one of 2, 3, 4, 5, 6, got 7",
        ),
        (
            lambda t: t + "store: {segment_version: '4'}\n",
            "store.segment_version must be one of 2, 3, 4, 5, 6",
        ),
        (
            lambda t: t + "store: {segment_version: 4.0}\n",
            "store.segment_version must be one of 2, 3, 4, 5, 6, got 4.0",
        ),
        (
            lambda t: t.replace(
                'cloud: {grpc: "127.0.0.1:50051"}',
                "cloud: {grpc: x, upload: {network: lte}}",
            ),
            "cloud.upload.network must be one of wifi, cellular, ethernet, other, got 'lte'",
        ),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, edit: object, message: str) -> None:
    assert callable(edit)
    with pytest.raises(ConfigError, match=message):
        load_agent_config(write(tmp_path, edit(GOOD)))


def test_ota_delta_formats_default_to_every_format_and_can_be_narrowed(tmp_path: Path) -> None:
    assert load_agent_config(write(tmp_path, GOOD)).delta_formats == ("fldelta2", "fldelta1")
    legacy = load_agent_config(write(tmp_path, GOOD + "ota: {delta_formats: [fldelta1]}\n"))
    assert legacy.delta_formats == ("fldelta1",)
    for bad, message in (
        ("ota: {delta_formats: [xdelta3]}", "xdelta3: delta formats are fldelta2, fldelta1"),
        ("ota: {delta_formats: []}", "expected a non-empty list"),
        ("ota: {delta_formats: fldelta1}", "expected a non-empty list"),
        ("ota: {delta_formats: [fldelta1, fldelta1]}", "repeated names"),
        ("ota: [fldelta1]", "'ota' must be a mapping"),
    ):
        with pytest.raises(ConfigError, match=rf"agent\.yaml.*{message}"):
            load_agent_config(write(tmp_path, GOOD + bad + "\n"))
