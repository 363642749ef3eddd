"""OTA over HTTPS from a coordinator whose certificate comes from the fleet's private CA.

The agent already trusts that CA for its gRPC link (``cloud.tls.ca``); its OTA downloads (TUF metadata
and payloads) must trust it too, or a coordinator serving HTTPS with the same PKI is refused. Real
HTTPS (aiohttp with TLS), real mTLS gRPC, real TUF repositories and a real rollout of a bundle to an
agent runtime in this process.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetloop_agent.config import AgentConfig, load_agent_config
from fleetloop_agent.ota.download import HttpFetcher
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_cloud.grpc_api import GrpcTls, start_grpc_server
from fleetloop_cloud.http_api import HttpSettings, HttpTls, start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.broker import CertificateAuthority
from fleetloop_fwsim.provisioning import provision_sim_device
from fleetloop_shared.errors import ConfigError, UnavailableError
from tests.fixtures.agent_runtime import wait_for

DEVICE = "car-tls"
HW = "tls-hw"
LOCAL = Caller.local()


class TlsCloud:
    """A coordinator with mTLS gRPC and HTTPS, both with certificates from one private CA."""

    def __init__(self, tmp: Path) -> None:
        self.ca = CertificateAuthority(tmp / "pki")
        cert, key = self.ca.issue("coordinator", server=True)
        self.coordinator = Coordinator(tmp / "cloud")
        tls = GrpcTls(self.ca.ca_path, cert, key)
        self.grpc, gport = start_grpc_server(self.coordinator, "127.0.0.1", 0, tls=tls)
        self.http, hport = start_http_server(self.coordinator, "127.0.0.1", 0,
                                             HttpSettings(tls=HttpTls(cert, key)))  # fmt: skip
        self.grpc_target = f"127.0.0.1:{gport}"
        self.url = f"https://127.0.0.1:{hport}"
        self.coordinator.jobs.artifact_base_url = self.url

    def close(self) -> None:
        self.coordinator.stop()
        self.grpc.stop(grace=0).wait(2)
        self.http.shutdown()
        self.coordinator.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[TlsCloud]:
    c = TlsCloud(tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_the_fetcher_trusts_the_cloud_ca_it_is_given(cloud: TlsCloud) -> None:
    url = f"{cloud.url}/tuf/image/1.root.json"
    expected = (cloud.coordinator.data_dir / "keys" / "image-root.json").read_bytes()
    with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        b"".join(HttpFetcher().fetch_range(url, 0, 1 << 20))  # the system's CAs only
    fetched = b"".join(HttpFetcher(ca=cloud.ca.ca_path).fetch_range(url, 0, 1 << 20))
    assert fetched == expected
    # a resumed range over HTTPS, as a cut payload download asks
    assert b"".join(HttpFetcher(ca=cloud.ca.ca_path).fetch_range(url, 10, 1 << 20)) == expected[10:]
    with pytest.raises(ConfigError, match="cannot load the cloud CA"):
        HttpFetcher(ca=cloud.coordinator.data_dir / "no-such-ca.pem")


def bundle(version: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = f"threshold: {version}\n".encode()
        info = tarfile.TarInfo("settings.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tls_agent_config(cloud: TlsCloud, tmp_path: Path) -> AgentConfig:
    """A device of ``cloud`` provisioned with its CA and a client certificate, trusting its TUF roots."""
    cert, key = cloud.ca.client(DEVICE)
    keys = cloud.coordinator.data_dir / "keys"
    device = provision_sim_device(
        tmp_path / "dev", device_id=DEVICE, kind="car", hardware_id=HW,
        cloud={"grpc": cloud.grpc_target,
               "tls": {"ca": str(cloud.ca.ca_path), "cert": str(cert), "key": str(key)}},
        trust_files=[keys / "image-root.json", keys / "director-root.json"], recordings=None,
        fleet="test", replay_speed=4.0, heartbeat_s=0.5, health_check=False,
    )  # fmt: skip
    return load_agent_config(device.config_path)


def test_a_rollout_reaches_an_agent_over_https_with_the_cloud_ca(cloud: TlsCloud, tmp_path: Path) -> None:
    config = tls_agent_config(cloud, tmp_path)
    assert config.cloud_ca == cloud.ca.ca_path
    cloud.coordinator.start()
    runtime = AgentRuntime(config)
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: runtime.link.connected.is_set(), 30), runtime.link.last_error
        cloud.coordinator.releases.upload(LOCAL, ReleaseInput(
            bundle("1.1.0"), name="settings", version="1.1.0",
                                          hardware_id=HW, now=time.time()))  # fmt: skip
        policy = {"release_version": "1.1.0", "phases": [{"name": "all", "percent": 100}]}
        rid = cloud.coordinator.rollouts.create(LOCAL, policy, time.time()).id
        status: list[Any] = []

        def settled() -> bool:
            status[:] = [cloud.coordinator.rollouts.status(LOCAL, rid)]
            return bool(status[0].state in ("SUCCEEDED", "PAUSED", "ABORTED"))

        assert wait_for(settled, 90), status
        assert status[0].state == "SUCCEEDED", status
        installed = runtime.ota.bundles.current("settings")
        assert installed is not None and (installed / "settings.yaml").read_text() == "threshold: 1.1.0\n"
    finally:
        runtime.stop()
        thread.join(timeout=20)


def test_the_cloud_ca_is_the_grpc_or_the_mqtt_one(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert, key = ca.client(DEVICE)
    base: dict[str, Any] = dict(device_id=DEVICE, kind="car", hardware_id=HW, trust_files=[],
                                recordings=None, health_check=False)  # fmt: skip
    mqtt = {"transport": "mqtt", "mqtt": {"host": "127.0.0.1", "port": 8883, "ca": str(ca.ca_path),
                                          "cert": str(cert), "key": str(key)}}  # fmt: skip
    over_mqtt = provision_sim_device(tmp_path / "mqtt", cloud=mqtt, **base)
    assert load_agent_config(over_mqtt.config_path).cloud_ca == ca.ca_path
    plain = provision_sim_device(tmp_path / "plain", cloud={"grpc": "127.0.0.1:1"}, **base)
    assert load_agent_config(plain.config_path).cloud_ca is None


def test_an_aborted_rollout_withdraws_the_job_an_agent_is_downloading(
    cloud: TlsCloud, tmp_path: Path
) -> None:
    """The agent runtime's own path: the withdrawal arrives on its control stream while the OTA worker
    downloads; the job ends CANCELED on the device and in the rollout, and nothing is installed."""
    cloud.coordinator.start()
    runtime = AgentRuntime(tls_agent_config(cloud, tmp_path))
    runtime.ota.download_rate_limit = 64 * 1024  # a 2 MiB bundle takes half a minute
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: runtime.link.connected.is_set(), 30), runtime.link.last_error
        big = io.BytesIO()
        with tarfile.open(fileobj=big, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            data = bytes(range(256)) * (8 * 1024)
            info = tarfile.TarInfo("weights.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        release = ReleaseInput(big.getvalue(), name="model", version="1.0.0", hardware_id=HW, now=time.time())
        cloud.coordinator.releases.upload(LOCAL, release)
        policy = {"release": {"name": "model", "version": "1.0.0"}, "phases": [{"name": "all"}]}
        rid = cloud.coordinator.rollouts.create(LOCAL, policy, time.time()).id

        def device_state() -> str:
            (d,) = cloud.coordinator.rollouts.status(LOCAL, rid).devices
            return f"{d.state} {d.reason}"

        assert wait_for(lambda: "DOWNLOADING" in device_state(), 60), device_state()
        cloud.coordinator.rollouts.abort(LOCAL, rid, time.time())
        assert wait_for(lambda: device_state().startswith("CANCELED"), 30), device_state()
        assert f"rollout {rid} aborted" in device_state()
        report = runtime.ota.last_report()
        assert report is not None and report.state.value == "CANCELED"
        assert runtime.ota.bundles.current("model") is None
    finally:
        runtime.stop()
        thread.join(timeout=20)
