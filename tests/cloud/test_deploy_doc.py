"""docs/deploy.md works as written: its example ``cloud.yaml`` (read out of the markdown, so the page
cannot go stale) runs ``fleetloop cloud serve --config`` against an S3 endpoint (moto's server) and a
private PostgreSQL, after the page's ``cloud init`` and ``cloud migrate``; an upload, a query and a
release go through it.

The test replaces only what is the deployment's own — addresses, file paths, the bucket's name — and
drops the TLS section (this coordinator listens on loopback, and its certificates are not here); every
other key is read as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Greeting, Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.pacing import BackoffPolicy
from fleetloop_fwsim import firmware
from fleetloop_fwsim.fleet import CoordinatorProcess
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import NotFoundError
from fleetloop_shared.segment import Segment, new_segment_id
from fleetloop_shared.update.artifact import sha256_hex
from fleetloop_shared.update.release_keys import (
    generate_key_file,
    load_key_file,
    public_pem_path,
    publish_release,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
T0 = 1_700_000_000 * 10**9
HW = "gen1"


def example_config() -> dict[str, Any]:
    """The yaml block that follows the page's example marker."""
    text = DOC.read_text()
    marker = text.index("docs/deploy.md example")
    block = re.search(r"```yaml\n(.*?)```", text[marker:], re.S)
    assert block is not None, "docs/deploy.md lost its example cloud.yaml"
    config = yaml.safe_load(block.group(1))
    assert isinstance(config, dict)
    return config


def cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=180, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, f"fleetloop {' '.join(args[:2])}: {done.stderr[-2000:]}"
    return done.stdout


def test_the_example_config_serves_an_upload_a_query_and_a_release(
    tmp_path: Path, pg_url: str, s3: Any
) -> None:
    config = example_config()
    # what the page promises about its example: a bucket, PostgreSQL, a mounted key secret, iceberg
    assert config["storage"]["bucket"] and config["database"].startswith("postgresql://")
    assert config["keys"]["dir"] and config["fleet_store"]["format"] == "iceberg"
    env = {**os.environ, **s3.environment()}

    # 1. once: keys and the admin token (the release manager's key stays on "their machine")
    rm_key = tmp_path / "rm" / "rm.pem"
    generate_key_file(rm_key, None)
    init_dir = tmp_path / "fleet-init"
    cli("cloud", "init", "--dir", str(init_dir), "--db", pg_url,
        "--targets-key", str(public_pem_path(rm_key)), "--release-keys", str(tmp_path / "release-keys"),
        "--token-file", str(tmp_path / "admin.token"), env=env)  # fmt: skip

    # 2. the page's cloud.yaml, with this test's addresses, paths and bucket
    config.pop("tls", None)
    config.update(data_dir=str(tmp_path / "scratch"), database=pg_url)
    config["keys"]["dir"] = str(init_dir / "keys")
    config["listen"].update(host="127.0.0.1", grpc_port=0, http_port=0)
    config["storage"].update(bucket=s3.bucket, endpoint=s3.url, region=s3.region)
    cloud_yaml = tmp_path / "cloud.yaml"
    cloud_yaml.write_text(yaml.safe_dump(config))

    moved = json.loads(cli("cloud", "migrate", "--config", str(cloud_yaml), "--dir", str(init_dir), env=env))
    assert moved["artifacts"] >= 2  # the image repository's and the director's roots

    coordinator = CoordinatorProcess(
        tmp_path / "scratch", log_path=tmp_path / "serve.log", extra_args=["--config", str(cloud_yaml)],
        env=s3.environment(),
    )
    coordinator.token = (tmp_path / "admin.token").read_text().strip()  # made by init, in the database
    coordinator.start(timeout_s=120)
    try:
        # an upload: a device's segments over gRPC, acknowledged once ingested into the Iceberg table
        store = LocalStore(tmp_path / "device")
        for k in range(3):
            rows = 200
            t = T0 + k * 10**10 + np.arange(rows, dtype=np.int64) * 1_000_000
            seg = Segment(new_segment_id(), "speed", t, {1: np.arange(rows, dtype=np.float64)},
                          {1: DataType.FLOAT64})  # fmt: skip
            store.append(seg, capture_id=f"cap-{k}", campaign="c", priority=5, now_ns=T0)
        catalog = Catalog()
        catalog.add("Vehicle.Speed", DataType.FLOAT64, unit="km/h")
        acks: list[StoredSegment] = []
        link = Link(
            GrpcTransport(coordinator.grpc_target), device_id="car-1", store=store, metrics=AgentMetrics(),
            greeting=Greeting("car-1", "test", catalog=catalog, labels={"kind": "car"}).messages,
            on_message=lambda m: None, on_ack=lambda seg, dup: acks.append(seg),
            backoff=BackoffPolicy(0.05, 0.5),
        )  # fmt: skip
        link.start()
        try:
            deadline = time.monotonic() + 60
            while store.stats().segments_pending and time.monotonic() < deadline:
                link.kick_upload()
                time.sleep(0.1)
            assert store.stats().segments_pending == 0 and len(acks) == 3
        finally:
            link.stop()
            store.close()
        # a query through the coordinator reads the rows back
        assert coordinator.query("SELECT count(*) FROM samples") == [[600]]

        # a release, signed by the release manager, its files in the bucket and served from there
        def request(method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
                    ) -> Any:  # fmt: skip
            req = urllib.request.Request(coordinator.http_url + path, data=body, method=method,
                                         headers={"Authorization": f"Bearer {coordinator.token}",
                                                  "Content-Type": ctype})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise NotFoundError(path) from None
                pytest.fail(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}")

        image = firmware.build_image("1.0.0", HW, size_hint=64 * 1024)
        publish_release(request, image, name="firmware", version="1.0.0", hardware=HW,
                        keys=[load_key_file(rm_key, None)])  # fmt: skip
        assert [r["version"] for r in request("GET", "/v1/releases")] == ["1.0.0"]
        with urllib.request.urlopen(f"{coordinator.http_url}/files/{sha256_hex(image)}", timeout=60) as resp:
            assert resp.read() == image
        assert not (tmp_path / "scratch" / "artifacts").exists()  # nothing of it in the local directory
    finally:
        coordinator.stop()
