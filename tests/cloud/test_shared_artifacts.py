"""Artifacts and TUF metadata in object storage: two coordinators with their own data directories, one
S3 bucket (moto's server on loopback) and one PostgreSQL serve the same releases — uploaded through one,
verified by the device's own TUF client and downloaded through the other — and take turns writing the
image repository's metadata, so versions only grow however many publish at once. A data directory made
by today's code moves into the bucket with ``cloud migrate``."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata

from fleetloop_agent.ota.download import HttpFetcher
from fleetloop_agent.ota.tuf_client import TufClient
from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.ota.online_keys import SecretKeys
from fleetloop_cloud.ota.writers import DatabaseWriters
from fleetloop_cloud.repositories.records import Inventory, Registration
from fleetloop_cloud.server import Coordinator, migrate
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.storage import S3Settings
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.update.artifact import sha256_hex

HW = "gen1"
DEVICE = "car-1"
LOCAL = Caller.local()
ICEBERG = TableSettings(format="iceberg", batch_wait_s=0)


def settings(s3: Any, **kw: Any) -> S3Settings:
    return S3Settings(bucket=s3.bucket, prefix="deploy", endpoint=s3.url, request_timeout_s=2.0,
                      connect_timeout_s=1.0, **kw)  # fmt: skip


def release(image: bytes, version: str, name: str = "fw") -> ReleaseInput:
    return ReleaseInput(image, name=name, version=version, hardware_id=HW, now=time.time())


@pytest.fixture
def pair(tmp_path: Path, pg_url: str, s3: Any) -> Iterator[tuple[Coordinator, Coordinator]]:
    """A makes the keys (its data directory's, as ``cloud init`` would) and the repositories in the
    bucket; B loads the same keys as a mounted secret and has nothing else of A's."""
    a = Coordinator(tmp_path / "a", db=pg_url, storage=settings(s3), tables=ICEBERG)
    b = Coordinator(tmp_path / "b", db=pg_url, storage=settings(s3), tables=ICEBERG,
                    keys=SecretKeys(tmp_path / "a" / "keys"))  # fmt: skip
    try:
        yield a, b
    finally:
        b.close()
        a.close()


def device_client(coordinator: Coordinator, tmp: Path) -> TufClient:
    keys = coordinator.data_dir / "keys"
    anchors = [(keys / "image-root.json").read_bytes(), (keys / "director-root.json").read_bytes()]
    return TufClient(tmp / "device-tuf", anchors, device_id=DEVICE, fetcher=HttpFetcher(),
                     max_target_bytes=1 << 24)  # fmt: skip


def fetch(url: str, start: int | None = None) -> bytes:
    headers = {"Range": f"bytes={start}-"} if start is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
        return bytes(resp.read())


def test_a_release_uploaded_through_one_coordinator_is_served_by_the_other(
    pair: tuple[Coordinator, Coordinator], tmp_path: Path
) -> None:
    a, b = pair
    assert a.artifact_objects.location == b.artifact_objects.location
    assert not (tmp_path / "a" / "artifacts").exists() and not (tmp_path / "b" / "artifacts").exists()
    v1, v2 = build_image("1.0.0", HW, size_hint=256 * 1024), build_image("2.0.0", HW, size_hint=256 * 1024)
    a.artifacts.add_image(v1)
    a.repositories.devices.register(DEVICE, Registration("f", {}, [], "x", "sim"), owner="", now=time.time())
    installed = Inventory(HW, "1.0.0", sha256_hex(v1), "a", 0)
    a.repositories.devices.update_inventory(DEVICE, installed, time.time())
    manifest = a.releases.upload(LOCAL, release(v2, "2.0.0"))
    delta = next(p for p in manifest.payloads if p.kind == "delta")
    # B never saw the upload: the release, its files and its metadata come from the bucket
    record, signature = b.artifacts.release("fw", HW, "2.0.0")
    assert b.jobs.publish_job(DEVICE, "job-1", "ro-1", record, signature) is False  # offline: directed
    server, port = start_http_server(b, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{port}"
        plan = device_client(b, tmp_path).decide(
            base, job_id="job-1", hardware_id=HW, installed_sha256=sha256_hex(v1)
        )
        assert plan.version == "2.0.0" and plan.target_sha256 == sha256_hex(v2)
        chosen = plan.payload_for(sha256_hex(v1))
        assert chosen.kind == "delta" and chosen.sha256 == delta.sha256
        # the delta and the image, whole and resumed with Range, from the bucket through B
        patch = fetch(f"{base}/{chosen.path}")
        assert sha256_hex(patch) == delta.sha256 and len(patch) == delta.size
        assert fetch(f"{base}/{chosen.path}", start=100) == patch[100:]
        assert fetch(f"{base}/files/{sha256_hex(v2)}") == v2
        targets = Metadata.from_bytes(fetch(f"{base}/tuf/image/targets.json")).signed
        assert "fw/gen1/2.0.0.img" in targets.targets
    finally:
        server.shutdown()


def test_two_coordinators_publishing_at_once_lose_no_release(pair: tuple[Coordinator, Coordinator]) -> None:
    a, b = pair
    before = a.tuf.image.version()
    errors: list[BaseException] = []

    def publish(c: Coordinator, name: str) -> None:
        try:
            for minor in range(4):
                version = f"1.{minor}.0"
                c.releases.upload(LOCAL, release(build_image(version, HW, size_hint=4096), version, name))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(c, n)) for c, n in ((a, "fw-a"), (b, "fw-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # every release is a target, each publish one version: no read-modify-write was lost
    targets = b.tuf.image.targets()
    assert {p for p in targets if p.startswith("fw-")} == {
        f"fw-{x}/{HW}/1.{m}.0.img" for x in "ab" for m in range(4)
    }
    assert a.tuf.image.version() == before + 8
    snapshot = Metadata.from_bytes(a.tuf.image.data("snapshot.json")).signed
    assert snapshot.meta["targets.json"].version == before + 8
    writers = [c.tuf._writers for c in (a, b)]
    assert all(isinstance(w, DatabaseWriters) for w in writers)


def test_a_writer_that_died_holding_the_lock_delays_the_next_only_until_it_expires(pg_url: str) -> None:
    from fleetloop_cloud.repositories import open_repositories

    repos = open_repositories(pg_url)
    try:
        dead = DatabaseWriters(repos.leases, "dead", ttl_s=0.5)
        assert repos.leases.take("tuf/image/roles", "dead", time.time(), 0.5)  # died holding it
        alive = DatabaseWriters(repos.leases, "alive", wait_s=10)
        started = time.monotonic()
        with alive.hold("tuf/image/roles"):
            waited = time.monotonic() - started
        assert 0.2 < waited < 5 and alive.waits > 0
        with dead.hold("tuf/image/roles"):  # and given up after use
            pass
    finally:
        repos.close()


def test_a_data_dir_made_by_todays_code_moves_into_the_bucket(tmp_path: Path, s3: Any) -> None:
    data_dir = tmp_path / "cloud"
    today = Coordinator(data_dir)  # the embedded default: artifacts in data_dir/artifacts
    v1, v2 = build_image("1.0.0", HW, size_hint=64 * 1024), build_image("2.0.0", HW, size_hint=64 * 1024)
    today.artifacts.add_image(v1)
    manifest = today.releases.upload(LOCAL, release(v2, "2.0.0"))
    targets_before, version_before = today.tuf.image.targets(), today.tuf.image.version()
    record = today.artifacts.release("fw", HW, "2.0.0")
    today.close()
    assert (data_dir / "artifacts" / "files" / sha256_hex(v2)).is_file()  # the layout it always had
    # started on the bucket before the move, it would make roots no device trusts: refused, with the fix
    with pytest.raises(ConfigError, match=r"no TUF repositories but .* does: move them .*cloud migrate"):
        Coordinator(data_dir, storage=settings(s3), tables=ICEBERG)

    report = migrate(data_dir, storage=settings(s3))
    assert report.artifacts >= 6  # images, manifest, signature, the TUF roots and roles
    assert migrate(data_dir, storage=settings(s3)).artifacts == 0  # run again: nothing to copy
    shutil.rmtree(data_dir / "artifacts")  # the bucket is all that is left

    moved = Coordinator(data_dir, storage=settings(s3), tables=ICEBERG)
    try:
        assert moved.artifacts.release("fw", HW, "2.0.0") == record
        assert moved.tuf.image.targets() == targets_before
        assert moved.artifacts.file(manifest.payloads[0].path).data() == v2
        v3 = build_image("3.0.0", HW, size_hint=64 * 1024)
        moved.releases.upload(LOCAL, release(v3, "3.0.0"))  # the repository goes on from its version
        assert moved.tuf.image.version() == version_before + 1
        assert not (data_dir / "artifacts").exists()
    finally:
        moved.close()


def test_a_missing_bucket_or_refused_credentials_is_a_clear_error_at_start(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = S3Settings(bucket="no-such-bucket", endpoint=s3.url, request_timeout_s=1.0, max_attempts=2)
    with pytest.raises(ConfigError, match=r"storage\.bucket 'no-such-bucket' does not exist at http"):
        Coordinator(tmp_path / "x", storage=missing, tables=ICEBERG)
    # moto checks no credentials: the front answers 403 as a real service does to refused ones
    s3.faults.refuse_next = 10
    with pytest.raises(ConfigError, match="refused the S3 credentials"):
        Coordinator(tmp_path / "y", storage=settings(s3, max_attempts=1), tables=ICEBERG)


def test_releases_survive_500s_slow_answers_and_a_restart_of_the_endpoint_once_each(
    pair: tuple[Coordinator, Coordinator], s3: Any, tmp_path: Path
) -> None:
    a, b = pair
    before = a.tuf.image.version()
    s3.faults.fail_next = 3  # three 500s on the first requests of the upload
    a.releases.upload(LOCAL, release(build_image("1.0.0", HW, size_hint=32 * 1024), "1.0.0"))
    s3.faults.slow_next, s3.faults.delay_s = 2, 2.5  # landed, answered after the time limit: retried
    a.releases.upload(LOCAL, release(build_image("1.1.0", HW, size_hint=32 * 1024), "1.1.0"))
    restarted = s3.front.restart(down_s=1.5)  # the endpoint goes away mid-upload and comes back
    b.releases.upload(LOCAL, release(build_image("1.2.0", HW, size_hint=32 * 1024), "1.2.0"))
    restarted.join()
    assert s3.faults.counts["failed"] >= 3 and s3.faults.counts["slowed"] >= 2
    # each release once: one targets version per publish, every file whole
    assert a.tuf.image.version() == before + 3
    assert b.artifacts.versions("fw", HW) == ["1.0.0", "1.1.0", "1.2.0"]
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        manifest = b.artifacts.release("fw", HW, version)[0]
        sha = json.loads(manifest)["target_sha256"]
        assert sha256_hex(b.artifacts.image(sha)) == sha


def test_the_same_release_uploaded_through_both_at_once_is_published_once(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    before = a.tuf.image.version()
    outcomes: list[str] = []

    def upload(c: Coordinator, size: int) -> None:
        try:
            c.releases.upload(LOCAL, release(build_image("3.0.0", HW, size_hint=size), "3.0.0"))
            outcomes.append("published")
        except StateError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=upload, args=(c, n)) for c, n in ((a, 4096), (b, 8192))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes.count("published") == 1 and len(outcomes) == 2
    assert "already" in next(o for o in outcomes if o != "published")
    assert a.tuf.image.version() == before + 1
    record = b.repositories.releases.get("3.0.0", "fw")
    assert record is not None
    published = a.tuf.image.targets()[f"fw/{HW}/3.0.0.img"].hashes["sha256"]
    assert json.loads(record.manifest)["target_sha256"] == published  # the record is the signed one
