"""The coordinator's Prometheus metrics, scraped from a real ``cloud serve`` process (started from a
configuration file) before and after real traffic: a device's hello and uploads over gRPC (a stored
segment, a duplicate, a corrupt one), SQL queries, requests refused for their token or role, a path no
route serves, a release and a rollout. Every metric the traffic touched moved by exactly what was sent;
no label names a device, a rollout or a raw path; ``/metrics`` itself needs a token."""

from __future__ import annotations

import hashlib
import json
import queue
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetloop_cloud.fleet_store.parquet import FleetStore
from fleetloop_cloud.fleet_store.query import QueryEngine
from fleetloop_cloud.metrics.memory import MemoryMetrics
from fleetloop_cloud.metrics.prometheus import PrometheusMetrics
from fleetloop_cloud.repositories import memory_repositories
from fleetloop_cloud.rollout.planner import RolloutState
from fleetloop_cloud.services.access import Access, Caller, Refusals
from fleetloop_cloud.services.devices import registration
from fleetloop_cloud.services.ingest import IngestService
from fleetloop_cloud.services.query import QueryService
from fleetloop_cloud.uploads.staging import UploadStaging
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import CorruptSegmentError, NotFoundError, PermissionDeniedError, QueryError
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.update.release_keys import (
    generate_key_file,
    load_key_file,
    public_pem_path,
    publish_release,
)
from fleetloop_shared.wire import device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.fixtures.cloud_serve import cloud_serve

from .conftest import http_call

TOKEN = re.compile(r"flt_[A-Za-z0-9_-]{43}")
DEVICE = "car-metrics-7"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@dataclass
class Served:
    http: str
    grpc: str
    admin: str
    viewer: str
    ready: dict[str, Any]
    #: the release manager's key (the image repository's targets key)
    release_key: Path = Path()

    def call(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
             content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        return http_call(self.http, method, path, body, {"Content-Type": content_type}, token=token)

    def scrape(self) -> Samples:
        status, headers, body = self.call("GET", "/metrics", token=self.viewer)
        assert status == 200, body
        assert headers["Content-Type"].startswith("text/plain")
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    data = tmp_path / "cloud"
    release_key = tmp_path / "rm.pem"
    generate_key_file(release_key, None)
    init = cli("cloud", "init", "--dir", str(data), "--targets-key", str(public_pem_path(release_key)))
    assert init.returncode == 0, init.stderr
    admin = TOKEN.findall(init.stdout)[0]
    config = tmp_path / "cloud.yaml"
    config.write_text(
        f"data_dir: {data}\nready_file: ready.json\nlisten: {{grpc_port: 0, http_port: 0}}\n"
        "public_url: https://fleet.example.com:8443\n"
    )
    ready, log = tmp_path / "ready.json", tmp_path / "cloud.log"
    with cloud_serve(["--config", str(config)], ready, log) as info:
        s = Served(info["http"], info["grpc"], admin, "", info, release_key)
        status, _, body = s.call("POST", "/v1/tokens", b'{"name": "prometheus", "role": "viewer"}', admin)
        assert status == 201, body
        s.viewer = json.loads(body)["token"]
        yield s


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def hello() -> device_pb2.DeviceMessage:
    h = device_pb2.Hello(device_id=DEVICE, fleet="test", labels={"kind": "car"}, data_origin="recordings")
    h.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    return device_pb2.DeviceMessage(hello=h)


def segment_bytes() -> tuple[bytes, bytes]:
    t = np.arange(0, 5_000_000_000, 50_000_000, dtype=np.int64) + 1_700_000_000_000_000_000
    seg = Segment(new_segment_id(), "can0/SPEED", t, {1: np.linspace(0.0, 90.0, len(t))},
                  {1: DataType.FLOAT64})  # fmt: skip
    return seg.segment_id, encode_segment(seg)


def test_metrics_move_with_real_traffic(served: Served) -> None:
    s = served
    assert s.ready["artifacts"] == "https://fleet.example.com:8443"  # public_url, not the bound address
    status, _, body = s.call("GET", "/metrics")
    assert status == 401 and json.loads(body)["type"] == "UnauthenticatedError"
    before = s.scrape()

    # a device over gRPC: hello, a stored segment, the same again (duplicate), a corrupt one (refused)
    channel = grpc.insecure_channel(s.grpc)
    outbox: queue.Queue[device_pb2.DeviceMessage | None] = queue.Queue()
    outbox.put(hello())
    stream = device_pb2_grpc.DeviceServiceStub(channel).Connect(iter(outbox.get, None))
    assert next(stream).WhichOneof("kind") == "welcome"
    ingest = ingest_pb2_grpc.IngestServiceStub(channel)
    segment_id, encoded = segment_bytes()
    request = ingest_pb2.UploadSegmentRequest(device_id=DEVICE, segment_id=segment_id, capture_id="cap-1",
                                              campaign="c", priority=5, segment=encoded)  # fmt: skip
    stored = ingest.UploadSegment(request, timeout=30)
    assert not stored.duplicate and stored.samples > 0
    assert ingest.UploadSegment(request, timeout=30).duplicate
    corrupt = bytearray(encoded)
    corrupt[len(corrupt) // 2] ^= 0xFF
    bad = ingest_pb2.UploadSegmentRequest(device_id=DEVICE, segment_id=new_segment_id(), capture_id="cap-1",
                                          campaign="c", priority=5, segment=bytes(corrupt))  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        ingest.UploadSegment(bad, timeout=30)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS

    # operators over HTTP: two queries (one fails), a device by id, refusals, a path nobody serves
    q = b'{"sql": "SELECT count(*) FROM samples"}'
    status, _, body = s.call("POST", "/v1/query", q, s.viewer)
    assert status == 200 and json.loads(body)["rows"] == [[stored.samples]]
    assert s.call("POST", "/v1/query", b'{"sql": "SELECT nope FROM samples"}', s.viewer)[0] == 400
    assert s.call("GET", f"/v1/devices/{DEVICE}", token=s.viewer)[0] == 200
    assert s.call("GET", "/v1/devices")[0] == 401
    assert s.call("POST", "/v1/rollouts", b'{"release_version": "1.0.0"}', s.viewer)[0] == 403
    assert s.call("GET", f"/no/such/{DEVICE}", token=s.viewer)[0] == 404
    image = build_image("1.0.0", "gen1", size_hint=4096)

    def request(method: str, path: str, body: bytes | None, content_type: str) -> Any:
        status, _, data = s.call(method, path, body, s.admin, content_type)
        if status == 404:
            raise NotFoundError(path)
        assert status in (200, 201), data
        return json.loads(data)

    released = publish_release(request, image, name="firmware", version="1.0.0", hardware="gen1",
                               keys=[load_key_file(s.release_key, None)])  # fmt: skip
    assert released["version"] == "1.0.0"
    policy = {"release_version": "1.0.0", "selector": "kind=car", "phases": [{"name": "all", "percent": 100}]}
    status, _, body = s.call("POST", "/v1/rollouts", json.dumps(policy).encode(), s.admin)
    assert status == 201, body
    rollout_id = json.loads(body)["id"]

    after = s.scrape()
    outbox.put(None)
    channel.close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    grpc_ = {"transport": "grpc"}
    assert moved("fleetloop_ingest_segments_total", outcome="stored", **grpc_) == 1
    assert moved("fleetloop_ingest_segments_total", outcome="duplicate", **grpc_) == 1
    assert moved("fleetloop_ingest_segments_total", outcome="refused", **grpc_) == 1
    assert moved("fleetloop_ingest_samples_total", **grpc_) == stored.samples
    assert moved("fleetloop_ingest_bytes_total", **grpc_) == len(encoded)
    assert moved("fleetloop_ingest_duration_seconds_count", **grpc_) == 1
    assert moved("fleetloop_upload_request_duration_seconds_count", kind="segment", **grpc_) == 3
    assert value(after, "fleetloop_devices_connected", transport="grpc") == 1
    assert value(after, "fleetloop_devices_connected", transport="mqtt") == 0
    assert moved("fleetloop_query_duration_seconds_count", outcome="ok") == 1
    assert moved("fleetloop_query_duration_seconds_count", outcome="error") == 1
    assert moved("fleetloop_http_requests_total", route="query", status="200") == 1
    assert moved("fleetloop_http_requests_total", route="query", status="400") == 1
    assert moved("fleetloop_http_requests_total", route="getDevice", status="200") == 1
    assert moved("fleetloop_http_requests_total", route="listDevices", status="401") == 1
    assert moved("fleetloop_http_requests_total", route="createRollout", status="403") == 1
    assert moved("fleetloop_http_requests_total", route="createRollout", status="201") == 1
    assert moved("fleetloop_http_requests_total", route="unmatched", status="404") == 1
    assert moved("fleetloop_http_requests_total", route="getMetrics", status="200") == 1  # the first scrape
    assert moved("fleetloop_http_auth_failures_total", route="listDevices", status="401") == 1
    assert moved("fleetloop_http_auth_failures_total", route="createRollout", status="403") == 1
    assert value(before, "fleetloop_http_auth_failures_total", route="getMetrics", status="401") == 1
    assert moved("fleetloop_http_request_duration_seconds_count", route="query") == 2
    states = {dict(labels)["state"]: v for (name, labels), v in after.items() if name == "fleetloop_rollouts"}
    assert set(states) == {state.value for state in RolloutState} and sum(states.values()) == 1
    assert value(after, "process_resident_memory_bytes") > 0

    # names and labels as Prometheus expects them, and none from an unbounded set
    families = {name for name, _ in after if name.startswith("fleetloop_")}
    assert families and all(n.endswith(("_total", "_seconds_count", "_seconds_sum", "_seconds_bucket",
                                        "_seconds_created", "_total_created", "_created", "_bytes"))
                            or n in ("fleetloop_devices_connected", "fleetloop_rollouts",
                                     "fleetloop_upload_backlogs_tracked", "fleetloop_erasures_pending",
                                     "fleetloop_catalog_assignments_pending")
                            for n in families), sorted(families)  # fmt: skip
    label_values = {v for _, labels in after for _, v in labels}
    label_names = {k for _, labels in after for k, _ in labels}
    for unbounded in (DEVICE, rollout_id, f"/v1/devices/{DEVICE}", f"/no/such/{DEVICE}"):
        assert not any(unbounded in v for v in label_values), unbounded
    assert not label_names & {"device", "device_id", "path", "url"}


def test_ingest_and_query_observations_in_the_fake(tmp_path: Path) -> None:
    """The services' own observations, through the in-memory fake beside the Prometheus adapter: a
    resumable upload counts one request per piece and one stored segment; a forged device and a bad
    query are counted too."""
    repos = memory_repositories()
    metrics = MemoryMetrics()
    access = Access(Refusals(), repos.audit_log)
    store = FleetStore(tmp_path / "fleet")
    ingest = IngestService(repos.devices, repos.segments, store, UploadStaging(tmp_path / "staging",
                           max_upload_bytes=1 << 20), access, metrics=metrics)  # fmt: skip
    h = hello().hello
    repos.devices.register(DEVICE, registration(h), owner="here", now=1.0)
    caller = Caller.device(DEVICE, transport="mqtt", proven=True)
    segment_id, encoded = segment_bytes()
    whole = ingest_pb2.UploadSegmentRequest(
        device_id=DEVICE, segment_id=segment_id, capture_id="c", campaign="c", priority=1, segment=encoded
    ).SerializeToString()
    digest, piece = hashlib.sha256(whole).digest(), (len(whole) + 1) // 2
    for offset in (0, piece):
        ingest.chunk(caller, ingest_pb2.UploadChunkRequest(
            device_id=DEVICE, segment_id=segment_id, offset=offset, total_bytes=len(whole),
            total_sha256=digest, data=whole[offset:offset + piece]), now=2.0)  # fmt: skip
    assert metrics.segments == {("mqtt", "stored"): 1}
    assert metrics.observations[("upload", "mqtt", "chunk")] == 2
    assert metrics.observations[("ingest", "mqtt")] == 1 and metrics.bytes["mqtt"] == len(encoded)
    forged = ingest_pb2.UploadSegmentRequest(device_id="someone-else", segment_id=new_segment_id(),
                                             segment=encoded)  # fmt: skip
    with pytest.raises(PermissionDeniedError):
        ingest.segment(caller, forged, now=3.0)
    assert metrics.segments[("mqtt", "refused")] == 1
    assert metrics.observations[("upload", "mqtt", "segment")] == 1
    with pytest.raises(CorruptSegmentError):
        ingest.segment(caller, ingest_pb2.UploadSegmentRequest(
            device_id=DEVICE, segment_id=new_segment_id(), segment=b"\x00" * 64), now=3.0)  # fmt: skip
    assert metrics.segments[("mqtt", "refused")] == 2

    class Census:
        def census(self, now: float) -> Any:
            raise AssertionError("not asked")

    queries = QueryService(QueryEngine(tmp_path / "fleet"), repos.segments, repos.campaigns, Census(),
                           access, metrics=metrics)  # fmt: skip
    assert queries.sql(Caller.local(), "SELECT count(*) FROM samples").rows[0][0] > 0
    with pytest.raises(QueryError):
        queries.sql(Caller.local(), "SELEC 1")
    assert metrics.observations[("query", "ok")] == 1 and metrics.observations[("query", "error")] == 1


def test_a_reading_that_fails_leaves_the_rest_of_the_scrape() -> None:
    metrics = PrometheusMetrics()

    def broken() -> dict[tuple[str, ...], float]:
        raise OSError("the database went away")

    metrics.watch("fleetloop_broken", "fails", "gauge", [], broken)
    metrics.watch("fleetloop_fine", "answers", "counter", ["kind"], lambda: {("a",): 2.0})
    metrics.query("ok", 0.25)
    body, content_type = metrics.exposition()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert 'fleetloop_fine_total{kind="a"} 2.0' in text and "fleetloop_broken" not in text
    assert 'fleetloop_query_duration_seconds_count{outcome="ok"} 1.0' in text
