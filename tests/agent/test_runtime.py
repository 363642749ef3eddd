"""The agent runtime end to end in one process: real replay sources, real store, real gRPC.

A device that cannot reach the cloud keeps capturing into its store and says why it cannot upload; when
the coordinator appears on the configured address, everything pending is uploaded and queryable.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from fleetloop_agent.config import load_agent_config
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim import profiles
from fleetloop_shared.errors import ConfigError
from tests.fixtures.agent_runtime import AgentRuns, free_port, provision_test_car, wait_for


def make_config(ddir: Path, recordings: Path, grpc_target: str, keys: Path) -> Path:
    path = provision_test_car(ddir, recordings, grpc_target, keys)
    # the desired campaigns a previous run persisted (the device shadow): run them before any cloud
    state = ddir / "data" / "state"
    state.mkdir(parents=True, exist_ok=True)
    doc = profiles.default_campaign("car")
    (state / "campaigns.json").write_text(json.dumps({"version": 1, "campaigns": [["car", 1, doc]]}))
    return path


def test_offline_capture_then_upload_when_the_cloud_appears(
    tmp_path: Path, recordings: Path, agent_runs: AgentRuns
) -> None:
    port = free_port()
    coordinator = Coordinator(tmp_path / "cloud")
    keys = tmp_path / "cloud" / "keys"
    config = load_agent_config(make_config(tmp_path / "dev", recordings, f"127.0.0.1:{port}", keys))
    runtime = AgentRuntime(config)
    assert len(runtime.engine.active) == 1 and not runtime.refused, runtime.refused
    agent_runs.start(runtime)
    assert wait_for(lambda: runtime.store.stats().segments_pending > 0, 60), "no capture while offline"
    assert not runtime.link.connected.is_set()
    assert "UNAVAILABLE" in runtime.link.last_error
    agent_runs.serve(coordinator, port)
    assert wait_for(lambda: runtime.link.connected.is_set(), 30), runtime.link.last_error
    assert wait_for(lambda: runtime.store.stats().segments_pending == 0, 30)
    totals = coordinator.repositories.segments.totals()
    assert totals.segments > 0 and totals.samples > 0 and totals.captures >= 1
    rows = coordinator.queries.sql(
        Caller.local(), "SELECT count(*) FROM samples WHERE device_id = 'car-t1' AND signal = 'Vehicle.Speed'"
    ).rows
    assert rows[0][0] > 0
    device = coordinator.repositories.devices.get("car-t1")
    assert device is not None and device.firmware_version == "1.0.0"
    assert device.delta_formats == ("fldelta2", "fldelta1")  # its inventory says what it applies
    evaluations = runtime.metrics.registry.get_sample_value("fleetloop_agent_trigger_evaluations_total")
    assert evaluations is not None and evaluations > 0  # the engine's totals reach Prometheus
    agent_runs.stop()
    assert agent_runs.exit_codes == [0]


def test_scheduled_uploads_wait_for_the_clouds_grants(
    tmp_path: Path, recordings: Path, agent_runs: AgentRuns
) -> None:
    """cloud.upload.scheduled: the device reports its backlog and network, and uploads only what the
    coordinator's upload scheduler grants — nothing while the scheduler is not running."""
    port = free_port()
    coordinator = Coordinator(tmp_path / "cloud")
    keys = tmp_path / "cloud" / "keys"
    path = make_config(tmp_path / "dev", recordings, f"127.0.0.1:{port}", keys)
    doc = yaml.safe_load(path.read_text())
    doc["cloud"]["upload"] = {"scheduled": True, "network": "cellular"}
    path.write_text(yaml.safe_dump(doc))
    config = load_agent_config(path)
    assert config.upload_scheduled and config.network == "cellular"
    coordinator.campaigns.apply(Caller.local(), profiles.default_campaign("car"), now=time.time())
    agent_runs.serve(coordinator, port)  # serving, but not granting yet
    runtime = agent_runs.start(AgentRuntime(config))
    try:
        assert wait_for(lambda: runtime.link.connected.is_set(), 30), runtime.link.last_error
        assert wait_for(lambda: coordinator.grants.pending_bytes("car-t1") > 0, 60)
        time.sleep(1.5)  # heartbeats keep coming; no grant, so nothing goes up
        assert runtime.store.stats().segments_pending > 0
        segments = coordinator.repositories.segments
        assert segments.totals().segments == 0
        coordinator.start()  # the scheduler ticks: grants within the cellular budget
        assert wait_for(lambda: segments.totals().segments > 0, 30)
    finally:
        agent_runs.stop()
        coordinator.stop()


def test_a_wrong_upload_setting_is_one_clear_line(tmp_path: Path, recordings: Path) -> None:
    Coordinator(tmp_path / "cloud")  # writes the trust anchors the device is provisioned with
    path = make_config(tmp_path / "dev", recordings, "127.0.0.1:1", tmp_path / "cloud" / "keys")
    doc = yaml.safe_load(path.read_text())
    doc["cloud"]["upload"] = {"scheduled": "yes", "network": "cellular"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"cloud.upload.scheduled must be true or false, got 'yes'"):
        load_agent_config(path)
    doc["cloud"]["upload"] = {"network": "5g"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"cloud.upload.network must be one of wifi, cellular"):
        load_agent_config(path)


def test_store_segment_version_caps_what_the_agent_writes(
    tmp_path: Path, recordings: Path, agent_runs: AgentRuns
) -> None:
    """store.segment_version 3 (a fleet whose cloud reads formats 2/3 only): captures are stored one
    group per segment, none newer than 3."""
    Coordinator(tmp_path / "cloud")  # (makes the trust roots the device is provisioned with; not served)
    path = make_config(tmp_path / "dev", recordings, f"127.0.0.1:{free_port()}", tmp_path / "cloud" / "keys")
    doc = yaml.safe_load(path.read_text())
    doc.setdefault("store", {})["segment_version"] = 3
    path.write_text(yaml.safe_dump(doc))
    config = load_agent_config(path)
    runtime = agent_runs.start(AgentRuntime(config))
    assert wait_for(lambda: runtime.store.stats().segments_pending > 1, 60), "no capture stored"
    agent_runs.stop()
    versions = set()
    for f in (config.store_dir / "segments").glob("*.seg"):
        blob = f.read_bytes()
        versions.add(struct.unpack_from("<H", blob, blob.index(b"FLSG") + 4)[0])
    assert versions and max(versions) <= 3, versions
