"""The agent's one configuration file (YAML), loaded and checked up front.

An integrator writes this file once per machine; every mistake in it is reported as
``FILE: key: what is wrong`` before the agent starts anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.networks import NETWORKS
from fleetloop_shared.segment import READ_VERSIONS
from fleetloop_shared.update.delta_format import FORMATS, check_formats
from fleetloop_shared.yaml_marks import read_config_file


@dataclass(frozen=True)
class PlatformConfig:
    """Where the A/B slots and the boot environment are (u-boot style env file)."""

    slots: Mapping[str, Path]
    env: Path
    booted_slot: Path
    health_commands: tuple[tuple[str, ...], ...] = ()
    hardware_id: str = "generic"


@dataclass(frozen=True)
class CloudMqttConfig:
    """MQTT 5 link (``cloud.transport: mqtt``): broker address and the device's TLS identity (CN =
    device id)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    base_dir: Path
    device_id: str
    fleet: str
    labels: Mapping[str, str]
    cloud_grpc: str
    state_dir: Path
    store_dir: Path
    store_quota_bytes: int
    sources: Sequence[Mapping[str, Any]]
    platform: PlatformConfig
    trusted_release_keys: tuple[Path, ...]
    replay_speed: float = 1.0
    heartbeat_s: float = 2.0
    upload_deadline_s: float = 10.0
    metrics_port: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    cloud_transport: str = "grpc"
    cloud_mqtt: CloudMqttConfig | None = None
    #: cloud.tls: {ca, cert, key} — mTLS for the gRPC link (certificate CN = device id)
    cloud_tls: tuple[Path, Path, Path] | None = None
    #: models_dir: model packs installed by hand (``<dir>/<pack>/model.yaml``), besides OTA bundles
    models_dir: Path | None = None
    #: cloud.upload.scheduled: upload only what the cloud's upload scheduler grants
    upload_scheduled: bool = False
    #: cloud.upload.network: the network reported to the scheduler (wifi, cellular, ethernet, other)
    network: str = "wifi"
    #: store.segment_version: the newest segment format written (None: this build's newest), for a
    #: fleet whose cloud reads only older ones; below 4 every group travels in its own segment
    store_segment_version: int | None = None
    #: ota.delta_formats: the OTA delta formats this agent applies, preferred first (reported to the
    #: cloud); ``[fldelta1]`` makes it behave as agents from before FLDELTA2
    delta_formats: tuple[str, ...] = FORMATS

    @property
    def cloud_ca(self) -> Path | None:
        """The CA the cloud's certificates chain to (``cloud.tls.ca``, else ``cloud.mqtt.ca``): trusted
        for the coordinator's HTTPS too, where OTA payloads and TUF metadata come from."""
        if self.cloud_tls is not None:
            return self.cloud_tls[0]
        return self.cloud_mqtt.ca if self.cloud_mqtt is not None else None


def _req(doc: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise ConfigError(f"{where}: missing required key '{key}'")
    value = doc[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: '{key}' must be a {names}, got {type(value).__name__}")
    return value


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and check the agent configuration; ConfigError names the file and the key at fault."""
    p = Path(path)
    doc = read_config_file(p)
    base = p.parent.resolve()
    where = str(p)

    def rel(value: str) -> Path:
        q = Path(value).expanduser()
        return q if q.is_absolute() else base / q

    cloud = _req(doc, "cloud", where, dict)
    transport = cloud.get("transport", "grpc")
    check_choice(transport, ("grpc", "mqtt"), f"{where}: cloud.transport")
    cloud_tls = None
    if cloud.get("tls") is not None:
        t = _req(cloud, "tls", f"{where}: cloud", dict)
        cloud_tls = tuple(rel(str(_req(t, k, f"{where}: cloud.tls", str))) for k in ("ca", "cert", "key"))
    cloud_mqtt = None
    if transport == "mqtt":
        m = _req(cloud, "mqtt", f"{where}: cloud", dict)
        port = _req(m, "port", f"{where}: cloud.mqtt", int)
        cloud_mqtt = CloudMqttConfig(
            host=str(_req(m, "host", f"{where}: cloud.mqtt", str)),
            port=int(port),
            ca=rel(str(_req(m, "ca", f"{where}: cloud.mqtt", str))),
            cert=rel(str(_req(m, "cert", f"{where}: cloud.mqtt", str))),
            key=rel(str(_req(m, "key", f"{where}: cloud.mqtt", str))),
        )
    store = doc.get("store", {}) or {}
    if not isinstance(store, dict):
        raise ConfigError(f"{where}: 'store' must be a mapping")
    plat = _req(doc, "platform", where, dict)
    slots = _req(plat, "slots", f"{where}: platform", dict)
    if set(slots) != {"a", "b"}:
        raise ConfigError(f"{where}: platform.slots must name exactly the slots 'a' and 'b'")
    health = plat.get("health_commands", []) or []
    if not isinstance(health, list) or not all(
        isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in health
    ):
        raise ConfigError(f"{where}: platform.health_commands must be a list of argument lists")
    sources = _req(doc, "sources", where, list)
    if not sources:
        raise ConfigError(f"{where}: 'sources' is empty; the agent needs at least one signal source")
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or "kind" not in s:
            raise ConfigError(f"{where}: sources[{i}] must be a mapping with a 'kind'")
    labels = doc.get("labels", {}) or {}
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}: 'labels' must be a mapping")
    keys = doc.get("trusted_release_keys", []) or []
    if not isinstance(keys, list):
        raise ConfigError(f"{where}: 'trusted_release_keys' must be a list of PEM file paths")
    key_paths = tuple(rel(str(k)) for k in keys)
    for k in key_paths:
        if not k.is_file():
            raise ConfigError(f"{where}: trusted_release_keys: file not found: {k}")
    try:
        quota = int(float(store.get("quota_mb", 256)) * 1024 * 1024)
        speed = float((doc.get("replay") or {}).get("speed", 1.0))
        heartbeat = float(doc.get("heartbeat_s", 2.0))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if speed <= 0:
        raise ConfigError(f"{where}: replay.speed must be > 0")
    upload = cloud.get("upload", {}) or {}
    if not isinstance(upload, dict):
        raise ConfigError(f"{where}: cloud.upload must be a mapping with scheduled and network")
    scheduled = upload.get("scheduled", False)
    if not isinstance(scheduled, bool):
        raise ConfigError(f"{where}: cloud.upload.scheduled must be true or false, got {scheduled!r}")
    network = check_choice(upload.get("network", "wifi"), NETWORKS, f"{where}: cloud.upload.network")
    segment_version = store.get("segment_version")
    if segment_version is not None:
        check_choice(segment_version, sorted(READ_VERSIONS), f"{where}: store.segment_version")
    models_dir = doc.get("models_dir")
    if models_dir is not None and not isinstance(models_dir, str):
        raise ConfigError(f"{where}: 'models_dir' must be a directory path")
    ota = doc.get("ota", {}) or {}
    if not isinstance(ota, dict):
        raise ConfigError(f"{where}: 'ota' must be a mapping")
    try:
        delta_formats = check_formats(ota.get("delta_formats", list(FORMATS)), f"{where}: ota.delta_formats")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    metrics_port = doc.get("metrics_port")
    if metrics_port is not None and not isinstance(metrics_port, int):
        raise ConfigError(f"{where}: 'metrics_port' must be an integer")
    return AgentConfig(
        path=p,
        device_id=str(_req(doc, "device_id", where, str)),
        fleet=str(doc.get("fleet", "default")),
        labels={str(k): str(v) for k, v in labels.items()},
        cloud_grpc=str(
            _req(cloud, "grpc", f"{where}: cloud", str) if transport == "grpc" else cloud.get("grpc", "")
        ),
        state_dir=rel(str(doc.get("state_dir", "state"))),
        store_dir=rel(str(store.get("dir", "store"))),
        store_quota_bytes=quota,
        sources=list(sources),
        base_dir=base,
        platform=PlatformConfig(
            slots={k: rel(str(v)) for k, v in slots.items()},
            env=rel(str(_req(plat, "env", f"{where}: platform", str))),
            booted_slot=rel(str(_req(plat, "booted_slot", f"{where}: platform", str))),
            health_commands=tuple(tuple(c) for c in health),
            hardware_id=str(plat.get("hardware_id", "generic")),
        ),
        trusted_release_keys=key_paths,
        replay_speed=speed,
        heartbeat_s=heartbeat,
        metrics_port=metrics_port,
        cloud_transport=transport,
        cloud_mqtt=cloud_mqtt,
        cloud_tls=(cloud_tls[0], cloud_tls[1], cloud_tls[2]) if cloud_tls else None,
        models_dir=rel(models_dir) if models_dir else None,
        upload_scheduled=scheduled,
        network=str(network),
        store_segment_version=segment_version,
        delta_formats=delta_formats,
    )
