"""Object storage: one contract for the in-memory fake, a local folder and a real S3 endpoint (moto's
server on loopback); against S3, the endpoint's failures — 500s, answers slower than the time limit, a
restart — are retried, and what was written is there exactly once, byte for byte."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetloop_cloud.storage import LocalObjectStore, MemoryObjectStore, ObjectStore, S3Settings
from fleetloop_cloud.storage.s3 import S3ObjectStore
from fleetloop_shared.errors import NotFoundError, UnavailableError, UserError


def s3_settings(s3: Any, **kw: Any) -> S3Settings:
    base: dict[str, Any] = {"bucket": s3.bucket, "prefix": "deploy", "endpoint": s3.url,
                            "request_timeout_s": 1.0, "connect_timeout_s": 1.0,
                            "max_attempts": 8}  # fmt: skip
    base.update(kw)
    return S3Settings(**base)


@pytest.fixture(params=["memory", "local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "memory":
        yield MemoryObjectStore()
    elif request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
    else:
        yield S3ObjectStore(s3_settings(request.getfixturevalue("s3")), area="fleet")


def test_the_contract_put_get_replace_list_delete(store: ObjectStore) -> None:
    assert store.list() == []
    store.put("a/b/one.bin", b"1")
    store.put("a/b/two.bin", b"22")
    store.put("a/c=1/three.bin", b"333")
    store.put("a/b/one.bin", b"one")  # replaced whole
    assert store.get("a/b/one.bin") == b"one"
    assert [(o.key, o.size) for o in store.list("a/b/")] == [("a/b/one.bin", 3), ("a/b/two.bin", 2)]
    assert [o.key for o in store.list("a/")] == ["a/b/one.bin", "a/b/two.bin", "a/c=1/three.bin"]
    assert [o.key for o in store.list("a/b/t")] == ["a/b/two.bin"]
    assert all(o.modified > 0 for o in store.list())
    assert store.stat("a/c=1/three.bin").size == 3
    assert store.read_range("a/c=1/three.bin", 1, 5) == b"33"  # fewer at the end
    assert store.read_range("a/c=1/three.bin", 7, 5) == b""
    store.delete("a/b/one.bin")
    store.delete("a/b/one.bin")  # a retried delete is no error
    for read in (store.get, store.stat, lambda k: store.read_range(k, 0, 1)):
        with pytest.raises(NotFoundError, match=r"one\.bin"):
            read("a/b/one.bin")
    assert [o.key for o in store.list()] == ["a/b/two.bin", "a/c=1/three.bin"]
    for bad in ("", "/abs", "a/../b", "a//b", ".hidden", "a/b/"):
        with pytest.raises(UserError, match="not a relative path"):
            store.put(bad, b"x")


def test_areas_and_prefixes_keep_deployments_apart(s3: Any) -> None:
    fleet = S3ObjectStore(s3_settings(s3), area="fleet")
    staging = S3ObjectStore(s3_settings(s3), area="staging")
    other = S3ObjectStore(s3_settings(s3, prefix="other"), area="fleet")
    fleet.put("k", b"f")
    staging.put("k", b"s")
    assert (fleet.get("k"), staging.get("k")) == (b"f", b"s")
    assert other.list() == [] and fleet.location == f"s3://{s3.bucket}/deploy/fleet"


def test_500s_and_slow_answers_are_retried_and_land_once(s3: Any) -> None:
    store = S3ObjectStore(s3_settings(s3), area="fleet")
    blobs = {f"seg/{i:03d}.bin": os.urandom(1000 + i) for i in range(12)}
    for i, (key, data) in enumerate(blobs.items()):
        if i % 3 == 0:
            s3.faults.fail_next = 3  # three 500s, then the answer
        elif i % 3 == 1:
            s3.faults.slow_next, s3.faults.delay_s = 1, 1.5  # landed, but answered after the time limit
        store.put(key, data)
    s3.faults.fail_next = 2
    got = {o.key: store.get(o.key) for o in store.list("seg/")}
    assert got == blobs  # every object once, exactly as written
    assert s3.faults.counts["failed"] >= 4 * 3 + 2 and s3.faults.counts["slowed"] >= 4


def test_a_restarted_endpoint_delays_writes_but_loses_none(s3: Any) -> None:
    store = S3ObjectStore(s3_settings(s3, request_timeout_s=2.0), area="fleet")
    blobs = {f"batch/{i:03d}.bin": os.urandom(500) for i in range(40)}
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for key, data in blobs.items():
                store.put(key, data)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    while len(store.list("batch/")) < 5:
        pass
    s3.front.restart(down_s=1.5).join()
    thread.join(timeout=60)
    assert not errors and not thread.is_alive()
    assert {o.key: store.get(o.key) for o in store.list("batch/")} == blobs


def test_an_endpoint_down_past_the_retries_is_unavailable_not_a_crash(s3: Any) -> None:
    store = S3ObjectStore(s3_settings(s3, max_attempts=2), area="fleet")
    s3.faults.fail_next = 5
    with pytest.raises(UnavailableError, match=r"s3://.*/deploy/fleet/x"):
        store.put("x", b"data")
    s3.faults.clear()
    store.put("x", b"data")
    assert store.get("x") == b"data"


def test_credentials_come_from_a_file_or_the_environment(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.write_text("[fleet]\naws_access_key_id = fromfile\naws_secret_access_key = secret\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3ObjectStore(s3_settings(s3, credentials_file=creds, profile="fleet"), area="fleet")
    store.put("k", b"v")
    assert store.get("k") == b"v"
    creds.write_text("[fleet]\naws_access_key_id = x\n")
    from fleetloop_shared.errors import ConfigError

    with pytest.raises(ConfigError, match="lacks aws_secret_access_key"):
        S3ObjectStore(s3_settings(s3, credentials_file=creds, profile="fleet"))
    with pytest.raises(UserError, match="not a valid S3 bucket name"):
        S3Settings(bucket="Bad_Bucket")
