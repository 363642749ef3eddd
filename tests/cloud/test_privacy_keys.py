"""The cloud's side of privacy: each fleet's keys from one secret, delivered with the desired campaigns,
pushed again when a key period begins; the policies ingest checks with; the capture's policy recorded
(also in a metadata database from before the column existed)."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import pytest

from fleetloop_cloud.ota.online_keys import KeyFiles, SecretKeys
from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.repositories.records import SegmentReceipt
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.privacy import SECRET_FILE, CampaignPolicies, FleetKeys
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.privacy import hash_identifier
from fleetloop_shared.wire import device_pb2

DAY = 86_400.0
CAMPAIGN = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: trips, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > 40"}
  privacy: {name: eu-cars, version: 7, hash: [Vehicle.VehicleIdentification.VIN]}
"""


def test_one_secret_per_deployment_gives_unlinkable_fleet_keys(tmp_path: Path) -> None:
    keys = FleetKeys.from_source(KeyFiles(tmp_path / "keys"), period_s=86_400)
    secret = tmp_path / "keys" / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # a restart, or a second coordinator sharing the directory
    again = FleetKeys.from_source(KeyFiles(tmp_path / "keys"), period_s=86_400)
    now = 1_000 * DAY + 5
    a, a2, b = keys.keys("fleet-a", now), again.keys("fleet-a", now), keys.keys("fleet-b", now)
    assert a == a2 and [k.not_before_ns for k in a] == [1_000 * 86_400 * 10**9, 1_001 * 86_400 * 10**9]
    assert hash_identifier(a[0], "VIN1") == hash_identifier(a2[0], "VIN1")
    assert hash_identifier(a[0], "VIN1").split(":")[2] != hash_identifier(b[0], "VIN1").split(":")[2]
    assert hash_identifier(a[0], "VIN1").split(":")[2] != hash_identifier(a[1], "VIN1").split(":")[2]
    secret.write_bytes(b"short")
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        FleetKeys.from_source(KeyFiles(tmp_path / "keys"))


def test_coordinators_sharing_a_mounted_secret_hash_alike_and_make_no_secret_there(tmp_path: Path) -> None:
    made = KeyFiles(tmp_path / "made")
    first = FleetKeys.from_source(made, period_s=86_400)
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / SECRET_FILE).write_bytes((tmp_path / "made" / SECRET_FILE).read_bytes())
    now = 1_000 * DAY
    from_file = FleetKeys.from_source(SecretKeys(mount, environ={}), period_s=86_400)
    assert from_file.keys("fleet-a", now) == first.keys("fleet-a", now)
    # the same secret as hex text in an environment variable (which wins over the file)
    hex_secret = (tmp_path / "made" / SECRET_FILE).read_bytes().hex()
    from_env = FleetKeys.from_source(
        SecretKeys(tmp_path, environ={"FLEETLOOP_KEY_PRIVACY_KEY": hex_secret}), period_s=86_400
    )
    assert from_env.keys("fleet-a", now) == first.keys("fleet-a", now)
    # a mount without it: a clear refusal, and nothing written into the mount
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"privacy\.key"):
        FleetKeys.from_source(SecretKeys(empty, environ={}))
    assert list(empty.iterdir()) == []


def test_keys_travel_with_the_desired_campaigns_and_are_pushed_when_a_period_begins(tmp_path: Path) -> None:
    clock = [100 * 30 * DAY + 10.0]
    c = Coordinator(tmp_path / "cloud", clock=lambda: clock[0])
    caller = Caller.device("car-1", transport="grpc", proven=False)
    hello = device_pb2.Hello(device_id="car-1", fleet="fleet-a")
    session = c.devices.connect(caller, hello, clock[0])
    welcome = c.devices.welcome(caller)[1].desired_campaigns
    ids = [k.key_id for k in welcome.privacy_keys]
    assert len(ids) == 2 and ids[0].startswith("p100-") and ids[1].startswith("p101-")
    assert not c.campaigns.rotate(clock[0])  # the first call only learns the period
    clock[0] += DAY
    assert not c.campaigns.rotate(clock[0]) and session.outbox.empty()
    clock[0] = 101 * 30 * DAY + 1  # the next period: every connected device gets the new pair
    assert c.campaigns.rotate(clock[0])
    pushed = session.outbox.get_nowait().desired_campaigns
    assert pushed.privacy_keys[0].key_id == ids[1]


def test_ingest_reads_policies_from_the_desired_campaigns(tmp_path: Path) -> None:
    c = Coordinator(tmp_path / "cloud")
    policies = CampaignPolicies(c.repositories.campaigns, refresh_s=5.0)
    assert policies.policy_for("trips", 0.0) is None
    c.campaigns.apply(Caller.local(), CAMPAIGN, now=time.time())
    assert policies.policy_for("trips", 1.0) is None  # read at most every refresh_s
    policy = policies.policy_for("trips", 5.0)
    assert policy is not None and (policy.name, policy.version) == ("eu-cars", 7)
    c.campaigns.delete(Caller.local(), "trips", now=time.time())
    assert policies.policy_for("trips", 10.0) is None


def test_a_metadata_database_from_before_gets_the_capture_privacy_column(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    repos = open_repositories(path)
    repos.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE captures DROP COLUMN privacy")
    db.commit()
    db.close()
    repos = open_repositories(path)  # upgrades in place
    try:
        receipt = SegmentReceipt("cap-1", "trips", 5, 10, 1, 2, "eu-cars@7#p1-abcd")
        assert repos.segments.record("car-1", b"\x01" * 16, receipt, 1.0)
        (capture,) = repos.segments.captures()
        assert capture.privacy == "eu-cars@7#p1-abcd"
    finally:
        repos.close()
