"""The agent config's link keys: ``cloud.transport: grpc|mqtt``, ``cloud.mqtt``, ``cloud.tls``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetloop_agent.config import load_agent_config
from fleetloop_shared.errors import ConfigError

BASE = """
device_id: car-1
sources:
  - {kind: csv_replay, path: x.csv}
platform:
  slots: {a: slot_a.img, b: slot_b.img}
  env: bootenv.txt
  booted_slot: booted
"""


def load(tmp_path: Path, cloud: str) -> object:
    p = tmp_path / "agent.yaml"
    p.write_text(BASE + cloud)
    return load_agent_config(p)


def test_mqtt_and_tls_keys_resolve_relative_paths(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "cloud: {transport: mqtt, mqtt: {host: b.example, port: 8883, ca: ca.pem, cert: c.pem, key: k.pem}}",
    )
    assert cfg.cloud_transport == "mqtt" and cfg.cloud_grpc == ""  # type: ignore[attr-defined]
    m = cfg.cloud_mqtt  # type: ignore[attr-defined]
    assert (m.host, m.port, m.cert) == ("b.example", 8883, tmp_path.resolve() / "c.pem")
    cfg = load(tmp_path, "cloud: {grpc: 'h:1', tls: {ca: ca.pem, cert: c.pem, key: k.pem}}")
    assert cfg.cloud_transport == "grpc"  # type: ignore[attr-defined]
    assert cfg.cloud_tls == tuple(tmp_path.resolve() / n for n in ("ca.pem", "c.pem", "k.pem"))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cloud", "message"),
    [
        ("cloud: {transport: carrier-pigeon}", "cloud.transport must be one of grpc, mqtt, "),
        ("cloud: {transport: mqtt}", "missing required key 'mqtt'"),
        (
            "cloud: {transport: mqtt, mqtt: {host: h, port: '1', ca: a, cert: b, key: c}}",
            "'port' must be a int",
        ),
        ("cloud: {grpc: 'h:1', tls: {ca: a, cert: b}}", "missing required key 'key'"),
    ],
)
def test_bad_link_keys_are_one_line_config_errors(tmp_path: Path, cloud: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, cloud)
    assert message in str(exc.value) and "\n" not in str(exc.value)
