"""One device removed mid-rollout, end to end: a coordinator serving gRPC and HTTP on loopback, three
real agent runtimes (their own OTA driver, TUF client and bundle installer) over gRPC. The removed one is
downloading when it is taken out: it is told on its control stream, drops the job (CANCELED, nothing
installed); the other two install, and the rollout succeeds without waiting for the removed one."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

from fleetloop_agent.config import load_agent_config
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.provisioning import provision_sim_device
from tests.fixtures.agent_runtime import AgentRuns, free_port, wait_for

HW = "removal-hw"
LOCAL = Caller.local()
DEVICES = ("car-0", "car-1", "car-2")
REMOVED = "car-1"


def model_bundle(version: str, size: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = (version.encode() + bytes(range(256))) * (size // 261)
        info = tarfile.TarInfo("weights.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_one_device_removed_mid_rollout_drops_its_job_and_the_rest_complete(
    tmp_path: Path, agent_runs: AgentRuns
) -> None:
    coordinator = Coordinator(tmp_path / "cloud")
    port = free_port()
    agent_runs.serve(coordinator, port)
    http, http_port = start_http_server(coordinator, "127.0.0.1", 0)
    coordinator.jobs.artifact_base_url = f"http://127.0.0.1:{http_port}"
    keys = coordinator.data_dir / "keys"
    runtimes: dict[str, AgentRuntime] = {}
    try:
        coordinator.start()
        for device_id in DEVICES:
            device = provision_sim_device(
                tmp_path / device_id, device_id=device_id, kind="car", hardware_id=HW,
                cloud={"grpc": f"127.0.0.1:{port}"}, recordings=None, fleet="taxi",
                trust_files=[keys / "image-root.json", keys / "director-root.json"],
                replay_speed=4.0, heartbeat_s=0.5, health_check=False,
            )  # fmt: skip
            runtime = AgentRuntime(load_agent_config(device.config_path))
            if device_id == REMOVED:
                runtime.ota.download_rate_limit = 64 * 1024  # ~30 s for the bundle: still downloading
            runtimes[device_id] = agent_runs.start(runtime)
        for device_id, runtime in runtimes.items():
            connected = wait_for(lambda r=runtime: r.link.connected.is_set(), 30)
            assert connected, (device_id, runtime.link.last_error)
        release = ReleaseInput(model_bundle("1.0.0", 2 << 20), name="model", version="1.0.0", hardware_id=HW,
                               now=time.time())  # fmt: skip
        coordinator.releases.upload(LOCAL, release)
        policy = {"release": {"name": "model", "version": "1.0.0"}, "target": {"selector": "fleet=taxi"},
                  "phases": [{"name": "all"}]}  # fmt: skip
        rid = coordinator.rollouts.create(LOCAL, policy, time.time()).id

        def state_of(device_id: str) -> str:
            d = next(d for d in coordinator.rollouts.status(LOCAL, rid).devices if d.device_id == device_id)
            return f"{d.state} {d.reason}"

        assert wait_for(lambda: "DOWNLOADING" in state_of(REMOVED), 60), state_of(REMOVED)
        status = coordinator.rollouts.remove(LOCAL, rid, REMOVED, time.time(), reason="at the workshop")
        assert next(d for d in status.devices if d.device_id == REMOVED).removed_reason == "at the workshop"

        def settled() -> bool:
            return coordinator.rollouts.status(LOCAL, rid).state in ("SUCCEEDED", "PAUSED", "ABORTED")

        assert wait_for(settled, 120), coordinator.rollouts.status(LOCAL, rid)
        final = coordinator.rollouts.status(LOCAL, rid)
        assert final.state == "SUCCEEDED", final.reason
        assert wait_for(lambda: state_of(REMOVED).startswith("CANCELED"), 30), state_of(REMOVED)
        assert "removed from the rollout" in state_of(REMOVED)
        removed = runtimes[REMOVED]
        report = removed.ota.last_report()
        assert report is not None and report.state.value == "CANCELED"
        assert removed.ota.bundles.current("model") is None  # nothing installed on the removed car
        for device_id in DEVICES:
            if device_id != REMOVED:
                assert state_of(device_id).startswith("COMMITTED")
                assert runtimes[device_id].ota.bundles.current("model") is not None
        assert final.phases[0].devices == 2 and final.phases[0].removed == 1 and final.phases[0].failed == 0
    finally:
        agent_runs.stop()
        coordinator.stop()
        http.shutdown()
        coordinator.close()
