"""``fleetloop keys export-offline --config cloud.yaml`` when the coordinator keeps its TUF repositories
in a bucket (``storage.*``; moto's S3 server on loopback): the keys to move are read from the image root
in the bucket, not from a data directory's ``artifacts/``, and leave the data directory's ``keys/`` — or,
from a mounted secret, are copied and named for the operator to remove there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.server import Coordinator, migrate
from fleetloop_cloud.storage import S3Settings

ICEBERG = TableSettings(format="iceberg", batch_wait_s=0)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=180, env=dict(os.environ), stdin=subprocess.DEVNULL)  # fmt: skip


def bucket_lab(tmp_path: Path, s3: Any) -> tuple[Path, Path, S3Settings]:
    """A lab coordinator (it holds the image repository's root and targets keys) moved to a bucket as
    docs/deploy.md says (``cloud migrate``), its local ``artifacts/`` then deleted: the TUF metadata is in
    the bucket only. Returns its data directory, its cloud.yaml and the storage settings."""
    lab = tmp_path / "lab"
    Coordinator(lab).close()
    storage = S3Settings(bucket=s3.bucket, prefix="deploy", endpoint=s3.url, region=s3.region)
    assert migrate(lab, storage=storage).artifacts >= 2
    shutil.rmtree(lab / "artifacts")
    cloud_yaml = tmp_path / "cloud.yaml"
    cloud_yaml.write_text(yaml.safe_dump({
        "data_dir": str(lab), "fleet_store": {"format": "iceberg"},
        "storage": {"bucket": s3.bucket, "prefix": "deploy", "endpoint": s3.url, "region": s3.region},
    }))  # fmt: skip
    return lab, cloud_yaml, storage


def image_keys(key_dir: Path) -> set[str]:
    return {p.name for p in (key_dir / "tuf" / "image").glob("*.pem")}


def test_the_keys_named_by_the_root_in_the_bucket_leave_the_data_directory(tmp_path: Path, s3: Any) -> None:
    lab, cloud_yaml, storage = bucket_lab(tmp_path, s3)
    before = image_keys(lab / "keys")
    inside = cli("keys", "export-offline", "--config", str(cloud_yaml), "--out", str(lab / "offline"))
    assert inside.returncode == 2 and "inside the data directory" in inside.stderr
    out = tmp_path / "release-managers"
    done = cli("keys", "export-offline", "--config", str(cloud_yaml), "--out", str(out), "-o", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["metadata"] == f"s3://{s3.bucket}/deploy/artifacts" and report["left"] == []
    moved = [Path(p) for p in report["moved"]]
    assert len(moved) == 3 and all(p.parent == out for p in moved)  # two root keys and the targets key
    assert sum("-targets-" in p.name for p in moved) == 1
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in moved)
    assert len(image_keys(lab / "keys")) == len(before) - 3  # only the online roles' keys stay
    # the coordinator on the bucket no longer signs releases itself
    coordinator = Coordinator(lab, storage=storage, tables=ICEBERG)
    try:
        assert not coordinator.releases.coordinator_signs()
    finally:
        coordinator.close()
    again = cli("keys", "export-offline", "--config", str(cloud_yaml), "--out", str(out))
    assert again.returncode == 2 and "nothing to move" in again.stderr


def test_keys_from_a_mounted_secret_are_copied_and_named_for_removal(tmp_path: Path, s3: Any) -> None:
    lab, cloud_yaml, _ = bucket_lab(tmp_path, s3)
    config = yaml.safe_load(cloud_yaml.read_text())
    config.update(data_dir=str(tmp_path / "scratch"), keys={"dir": str(lab / "keys")})
    cloud_yaml.write_text(yaml.safe_dump(config))
    before = image_keys(lab / "keys")
    out = tmp_path / "release-managers"
    done = cli("keys", "export-offline", "--config", str(cloud_yaml), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "is a mounted secret: remove these from it" in done.stdout
    assert len(list(out.glob("*.pem"))) == 3
    assert image_keys(lab / "keys") == before  # a secret is the platform's to change, not ours
    for line in done.stdout.splitlines()[-3:]:
        assert Path(line.strip()).parent == lab / "keys" / "tuf" / "image"


def test_a_bucket_without_the_repositories_or_no_coordinator_named_is_a_clear_error(
    tmp_path: Path, s3: Any
) -> None:
    cloud_yaml = tmp_path / "cloud.yaml"
    cloud_yaml.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "empty"), "fleet_store": {"format": "iceberg"},
        "storage": {"bucket": s3.bucket, "prefix": "nothing-here", "endpoint": s3.url, "region": s3.region},
    }))  # fmt: skip
    done = cli("keys", "export-offline", "--config", str(cloud_yaml), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and f"no image repository in s3://{s3.bucket}/nothing-here" in done.stderr
    assert "Traceback" not in done.stderr
    neither = cli("keys", "export-offline", "--out", str(tmp_path / "out"))
    assert neither.returncode == 2 and "--config cloud.yaml or its --dir" in neither.stderr
