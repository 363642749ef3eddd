"""A release manager whose TUF root has expired is told which command fixes it, runs it, and releases.

Real coordinator (HTTP on loopback) with a clock the test moves; the CLI runs as a subprocess like a user
runs it; the rotated root is checked the way a device checks it (the old root vouches for the new one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.server import Coordinator
from fleetloop_fwsim.firmware import build_image

HW = "gen1"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Coordinator, str, list[float]]]:
    now = [time.time()]
    c = Coordinator(tmp_path / "cloud", clock=lambda: now[0])
    # the CLI below (a subprocess) and upload() act as the admin `cloud init` made
    monkeypatch.setenv("FLEETLOOP_TOKEN", c.tokens.bootstrap(now[0]).secret)
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        yield c, f"http://127.0.0.1:{port}", now
    finally:
        server.shutdown()
        c.close()


def upload(base: str, version: str) -> tuple[int, dict[str, object]]:
    image = build_image(version, HW, size_hint=8192)
    req = urllib.request.Request(
        f"{base}/v1/releases?name=fw&version={version}&hardware={HW}", data=image, method="POST",
        headers={"Authorization": f"Bearer {os.environ['FLEETLOOP_TOKEN']}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_expired_root_names_the_fix_and_rotation_makes_releases_possible_again(
    cloud: tuple[Coordinator, str, list[float]],
) -> None:
    coordinator, base, now = cloud
    old_root = Metadata[Root].from_bytes(coordinator.tuf.image_authority.root_bytes())
    now[0] += 400 * 86400  # past the image root's one-year lifetime
    status, body = upload(base, "2.0.0")
    assert status == 409, body
    assert "fleetloop keys rotate --repository image" in str(body["error"])
    assert coordinator.tuf.image.targets() == {}

    done = cli("keys", "rotate", "--repository", "image", "--root-keys", "3", "--threshold", "2",
               "--online-keys", "--cloud", base, "-o", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["root_version"] == old_root.signed.version + 1
    assert (report["root_keys"], report["threshold"], report["online_keys_rotated"]) == (3, 2, True)

    new_root = Metadata[Root].from_bytes(coordinator.tuf.image_authority.root_bytes())
    old_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)  # the chain holds
    new_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
    old_ts_keys = old_root.signed.roles["timestamp"].keyids
    assert set(new_root.signed.roles["timestamp"].keyids).isdisjoint(old_ts_keys)
    status, body = upload(base, "2.0.0")
    assert status == 201, body
    timestamp = Metadata.from_bytes(coordinator.tuf.metadata_bytes("image", "timestamp.json"))
    new_root.signed.verify_delegate("timestamp", timestamp.signed_bytes, timestamp.signatures)


def test_rotation_mistakes_get_one_clear_line(cloud: tuple[Coordinator, str, list[float]]) -> None:
    _, base, _ = cloud
    done = cli("keys", "rotate", "--repository", "image", "--root-keys", "2", "--threshold", "5",
               "--cloud", base)
    assert done.returncode != 0
    assert "root threshold 5 exceeds the number of root keys" in done.stderr
    assert "Traceback" not in done.stderr
    done = cli("keys", "rotate", "--repository", "image", "--root-keys", "0", "--cloud", base)
    assert done.returncode != 0 and "root keys: expected 1..16, got 0" in done.stderr
