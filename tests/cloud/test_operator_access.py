"""Who may do what over the REST API, and the record of what was done.

Every operator route × {no token, expired, revoked, wrong role, right role} against a real
coordinator on loopback: 401 naming what is wrong with the token, 403 naming the role the route needs,
the route's own success with a token of exactly the role it declares. Every write made with the right
role leaves one audit entry naming the token, its role, the request id and the address. Devices fetch
their files without any token, and hold none: operator routes are closed to them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tuf.api.metadata import Metadata, Root, Targets

from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.http_api.routes import ROUTES
from fleetloop_cloud.identity.roles import ACTIONS, Role, is_write
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.repositories.records import AuditFilter, Inventory
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

from .conftest import http_call

LOCAL = Caller.local()
CAMPAIGN = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: brake, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > 50"}
  collect: {signals: ["Vehicle.*"], pre: 1s, post: 1s}
"""
T0 = 1_800_000_000 * 10**9
CAPTURE = f"brake-{T0 + 10**8}"
CASES = ("no token", "expired", "revoked", "wrong role", "right role")
#: A role that may not take an action of each role (none for reads: every role may read).
WRONG = {
    Role.OPERATOR: Role.RELEASE_MANAGER,
    Role.RELEASE_MANAGER: Role.OPERATOR,
    Role.ADMIN: Role.RELEASE_MANAGER,
}


@dataclass
class World:
    coordinator: Coordinator
    base: str
    tokens: dict[str, str]
    rollout_id: str
    now: list[float]
    #: rollouts ready for approve, roll back (then undo) and retry
    waiting: str = ""
    succeeded: str = ""
    failed: str = ""


def _device(c: Coordinator, device_id: str, version: str, now: float, **labels: str) -> None:
    labels = {"hw": "gen1", **labels}
    hello = device_pb2.Hello(device_id=device_id, fleet="taxi", labels=labels, data_origin="sim")
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    c.devices.connect(Caller.device(device_id, transport="test", proven=True), hello, now)
    c.repositories.devices.update_inventory(device_id, Inventory("gen1", version, "", "a", 0), now)


def _rollout(c: Coordinator, now: float, role: str, final: str, **spec: Any) -> str:
    """A rollout of 1.0.0 to the devices of ``role``, stepped until the offered ones report ``final``."""
    policy = {"release": {"version": "1.0.0"}, "target": {"selector": f"role={role}"}, **spec}
    rollout_id = c.rollouts.create(LOCAL, policy, now).id
    c.controller.tick(now)
    for e in c.rollouts.executions(LOCAL, rollout_id):
        if e.state == "OFFERED":
            c.controller.on_device_status(e.device_id, f"{rollout_id}:{e.device_id}", final, "", now)
    c.controller.tick(now)
    return rollout_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    now = [1_800_000_000.0]
    c = Coordinator(Path(tmp_path_factory.mktemp("access")) / "cloud", clock=lambda: now[0])
    tokens = {"admin-boot": c.tokens.bootstrap(now[0]).secret}
    for role in Role:
        tokens[role.value] = c.tokens.create(LOCAL, f"the-{role.value}", role.value, now[0]).secret
    expiring = c.tokens.create(LOCAL, "short-lived", "admin", now[0], expires_at=now[0] + 60)
    tokens["expired"] = expiring.secret
    tokens["revoked"] = c.tokens.create(LOCAL, "gone", "admin", now[0]).secret
    c.tokens.revoke(LOCAL, "gone", now[0])
    c.tokens.create(LOCAL, "to-revoke", "viewer", now[0])
    now[0] += 120  # "short-lived" is past its expiry now
    for version in ("0.8.0", "1.0.0"):
        c.releases.upload(LOCAL, ReleaseInput(build_image(version, "gen1", size_hint=4096), name="firmware",
                          version=version, hardware_id="gen1", now=now[0]))  # fmt: skip
    _device(c, "car-1", "0.9.0", now[0])
    c.campaigns.apply(LOCAL, CAMPAIGN, now=now[0])
    speed = Segment(new_segment_id(), "speed", np.arange(3, dtype=np.int64) * 10**8 + T0,
                    {1: np.array([1.0, 2.0, 3.0])}, {1: DataType.FLOAT64})  # fmt: skip
    c.ingest.segment(Caller.device("car-1", transport="test", proven=True), ingest_pb2.UploadSegmentRequest(
        device_id="car-1", segment_id=speed.segment_id, capture_id=CAPTURE, campaign="brake", priority=5,
        segment=encode_segment(speed)), now[0])  # fmt: skip
    policy = {"release_version": "1.0.0", "selector": "hw=gen1", "phases": [{"name": "all", "percent": 100}]}
    rollout_id = c.rollouts.create(LOCAL, policy, now[0]).id
    for device in ("car-a", "car-b", "car-r", "car-f"):
        _device(c, device, "0.8.0", now[0], role=device.replace("car-b", "car-a"))
    two_phases = [{"name": "canary", "count": 1}, {"name": "rest"}]
    waiting = _rollout(c, now[0], "car-a", "COMMITTED", phases=two_phases, success={"action": "pause"})
    succeeded = _rollout(c, now[0], "car-r", "COMMITTED", phases=[{"name": "all"}])
    failed = _rollout(c, now[0], "car-f", "FAILED", phases=[{"name": "all"}])
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        yield World(c, f"http://127.0.0.1:{port}", tokens, rollout_id, now, waiting, succeeded, failed)
    finally:
        server.shutdown()
        c.stop()
        c.close()


def request_for(name: str, w: World) -> tuple[str, bytes | None, str]:
    """A request each route answers with success when the token's role allows it: path, body, type."""
    json_type, rid = "application/json", w.rollout_id
    requests: dict[str, tuple[str, bytes | None, str]] = {
        "whoami": ("/v1/whoami", None, json_type),
        "summary": ("/v1/summary", None, json_type),
        "listDevices": ("/v1/devices", None, json_type),
        "getDevice": ("/v1/devices/car-1", None, json_type),
        "getDeviceCatalog": ("/v1/devices/car-1/catalog", None, json_type),
        "getDeviceCampaigns": ("/v1/devices/car-1/campaigns", None, json_type),
        "getDeviceOta": ("/v1/devices/car-1/ota", None, json_type),
        "validateCampaign": ("/v1/campaigns/validate?source=x.yaml", CAMPAIGN.encode(), "text/yaml"),
        "getCapture": (f"/v1/captures/{CAPTURE}", None, json_type),
        "getCaptureSeries": (f"/v1/captures/{CAPTURE}/series?signals=Vehicle.Speed", None, json_type),
        "exportCapture": (f"/v1/captures/{CAPTURE}/export?format=csv", None, json_type),
        "listCampaigns": ("/v1/campaigns", None, json_type),
        "getFleetCatalog": ("/v1/fleets/taxi/catalog", None, json_type),
        "pushFleetCatalog": ("/v1/fleets/taxi/catalog",
                             b'{"signals": [{"path": "Vehicle.Speed", "data_type": "float64"}]}', json_type),
        "applyCampaign": ("/v1/campaigns?source=x.yaml", CAMPAIGN.replace("brake", "fast").encode(),
                          "text/yaml"),
        "deleteCampaign": ("/v1/campaigns/brake", None, json_type),
        "query": ("/v1/query", b'{"sql": "SELECT 1"}', json_type),
        "listCaptures": ("/v1/captures", None, json_type),
        "listReleases": ("/v1/releases", None, json_type),
        "uploadRelease": ("/v1/releases?name=firmware&version=2.0.0&hardware=gen1",
                          build_image("2.0.0", "gen1", size_hint=4096), "application/octet-stream"),
        "stageRelease": ("/v1/releases/staged?name=firmware&version=2.1.0&hardware=gen1",
                         build_image("2.1.0", "gen1", size_hint=4096), "application/octet-stream"),
        "publishRelease": _staged_and_signed(w) if name == "publishRelease" else ("", None, ""),
        "listRollouts": ("/v1/rollouts", None, json_type),
        "createRollout": ("/v1/rollouts", json.dumps({"release_version": "2.0.0", "selector": "hw=gen1",
                                                      "phases": [{"name": "all", "percent": 100}]}).encode(),
                          json_type),
        "getRollout": (f"/v1/rollouts/{rid}", None, json_type),
        "pauseRollout": (f"/v1/rollouts/{rid}/pause", None, json_type),
        "resumeRollout": (f"/v1/rollouts/{rid}/resume", None, json_type),
        "abortRollout": (f"/v1/rollouts/{rid}/abort", None, json_type),
        "approveRollout": (f"/v1/rollouts/{w.waiting}/approve", None, json_type),
        "rollbackRollout": (f"/v1/rollouts/{w.succeeded}/rollback", None, json_type),
        "undoRollout": (f"/v1/rollouts/{w.succeeded}/undo",
                        json.dumps({"to_revision": _revision_of(w, "0.8.0")}).encode(), json_type),
        "retryRollout": (f"/v1/rollouts/{w.failed}/retry", b'{"devices": ["car-f"]}', json_type),
        "removeRolloutDevice": (f"/v1/rollouts/{w.waiting}/devices/car-b/remove", b'{"reason": "sold"}',
                                json_type),
        "listRolloutExecutions": (f"/v1/rollouts/{rid}/executions", None, json_type),
        "getRolloutHistory": (f"/v1/rollouts/{rid}/history", None, json_type),
        "listRolloutRevisions": ("/v1/rollout-revisions?name=firmware", None, json_type),
        "rotateRoot": ("/v1/tuf/director/rotate", b"{}", json_type),
        "installImageRoot": ("/v1/tuf/image/root", _next_image_root(w) if name == "installImageRoot" else b"",
                             json_type),
        "listTokens": ("/v1/tokens", None, json_type),
        "createToken": ("/v1/tokens", b'{"name": "made-by-the-table", "role": "viewer"}', json_type),
        "revokeToken": ("/v1/tokens/to-revoke", None, json_type),
        "listAudit": ("/v1/audit", None, json_type),
        "verifyAudit": ("/v1/audit/verify", None, json_type),
        "getMetrics": ("/metrics", None, json_type),
        "getRetention": ("/v1/fleets/taxi/retention", None, json_type),
        "setRetention": ("/v1/fleets/taxi/retention", b'{"days": 30}', json_type),
        "clearRetention": ("/v1/fleets/taxi/retention", None, json_type),
        "eraseDevice": ("/v1/devices/car-1/erase", None, json_type),
        "getErasure": ("/v1/devices/car-1/erasure", None, json_type),
    }  # fmt: skip
    return requests[name]


def _staged_and_signed(w: World) -> tuple[str, bytes, str]:
    """A release staged now and signed with the targets key this lab coordinator holds itself."""
    c = w.coordinator
    image = build_image("2.2.0", "gen1", size_hint=4096)
    staged = c.artifacts.stage_release(ReleaseInput(
        image, name="firmware", version="2.2.0", hardware_id="gen1", bases=[],
                                       now=w.now[0]))  # fmt: skip
    md = Metadata(Targets.from_dict(staged.proposal))
    for keyid in c.tuf.image_authority.root.signed.roles["targets"].keyids:
        signer = c.tuf.image_authority.keys.signer(keyid)
        assert signer is not None
        md.sign(signer, append=True)
    return f"/v1/releases/staged/{staged.staging_id}", md.to_bytes(), "application/json"


def _next_image_root(w: World) -> bytes:
    """The next image root, signed with the root keys this lab coordinator holds itself."""
    authority = w.coordinator.tuf.image_authority
    new = Metadata[Root].from_bytes(authority.root_bytes())
    new.signed.version += 1
    new.signatures.clear()
    for keyid in new.signed.roles["root"].keyids:
        signer = authority.keys.signer(keyid)
        assert signer is not None
        new.sign(signer, append=True)
    return bytes(new.to_bytes())


def _revision_of(w: World, version: str) -> int:
    """The revision of a rollout of ``version`` (0 before there is one: refused, like an unknown one)."""
    found = [r.revision for r in w.coordinator.rollouts.revisions(LOCAL) if r.release_version == version]
    return found[0] if found else 1


def token_for(case: str, role: Role, w: World) -> str | None:
    if case == "no token":
        return None
    if case in ("expired", "revoked"):
        return w.tokens[case]
    if case == "wrong role":
        return w.tokens[WRONG[role].value]
    return w.tokens[role.value]


def test_every_route_by_token_state_and_role(world: World) -> None:
    w = world
    table: dict[str, dict[str, str]] = {}
    mismatches: list[str] = []
    writes: list[tuple[str, str, dict[str, str]]] = []
    for route in ROUTES:
        assert route.action is not None
        role = ACTIONS[route.action]
        path, body, content_type = request_for(route.name, w)
        row = table.setdefault(f"{route.method} {route.path} ({role.value})", {})
        for case in CASES:
            if case == "wrong role" and role is Role.VIEWER:
                row[case] = "n/a"  # every role may read
                continue
            token = token_for(case, role, w)
            status, headers, data = http_call(
                w.base, route.method, path, body, {"Content-Type": content_type}, token=token
            )
            row[case] = str(status)
            is_json = headers.get("Content-Type", "").startswith("application/json")
            doc: Any = json.loads(data) if data and is_json else None
            want = {"right role": route.status, "wrong role": 403}.get(case, 401)
            if status != want:
                mismatches.append(f"{route.name} / {case}: {status} (wanted {want}): {data[:300]!r}")
                continue
            if case == "no token":
                assert "no API token" in doc["error"] and headers["WWW-Authenticate"].startswith("Bearer")
            elif case in ("expired", "revoked"):
                assert f"is {case}" in doc["error"], doc
            elif case == "wrong role":
                assert f"needs role {role.value}" in doc["error"], doc
                assert doc["type"] == "PermissionDeniedError" and doc["request_id"] == headers["X-Request-Id"]
            elif is_write(route.action):
                writes.append((route.action, headers["X-Request-Id"], {"actor": f"the-{role.value}"}))
    print("\n".join(f"{k:60} " + " ".join(f"{c}={v}" for c, v in row.items()) for k, row in table.items()))
    assert not mismatches, "\n".join(mismatches)
    # every write that succeeded left exactly one audit entry, with who, what, where and the request id
    entries = w.coordinator.audit.entries(LOCAL, AuditFilter(limit=10_000))
    by_request = {e.request_id: e for e in entries if e.request_id}
    for action, request_id, who in writes:
        entry = by_request.get(request_id)
        assert entry is not None, f"no audit entry for {action} (request {request_id})"
        assert (entry.action, entry.actor, entry.address) == (action, who["actor"], "127.0.0.1")
        assert entry.role == ACTIONS[action].value and entry.transport == "http"
    assert {a for a, _, _ in writes} == {a for a in ACTIONS if is_write(a)}
    assert w.coordinator.audit.verify(LOCAL).ok


def test_devices_download_without_a_token_and_hold_none(world: World) -> None:
    w = world
    release = w.coordinator.releases.all(LOCAL)[0]
    from fleetloop_shared.update.artifact import manifest_from_bytes

    full = next(p for p in manifest_from_bytes(release.manifest).payloads if p.kind == "full")
    status, _, data = http_call(w.base, "GET", f"/{full.path}", headers={"Range": "bytes=10-"})
    assert status == 206 and len(data) == full.size - 10
    assert http_call(w.base, "GET", "/tuf/image/timestamp.json")[0] == 200
    assert http_call(w.base, "GET", "/healthz")[0] == 200
    # what a device has (its id, its certificate's name) is no operator credential
    status, _, data = http_call(w.base, "GET", "/v1/devices", token="car-1")
    assert status == 401 and "unknown" in json.loads(data)["error"]


def test_a_token_revoked_over_the_api_stops_working_at_once(world: World) -> None:
    w = world
    status, _, data = http_call(w.base, "POST", "/v1/tokens", b'{"name": "brief", "role": "viewer"}',
                                token=w.tokens["admin"])  # fmt: skip
    secret = json.loads(data)["token"]
    assert http_call(w.base, "GET", "/v1/summary", token=secret)[0] == 200
    assert http_call(w.base, "DELETE", "/v1/tokens/brief", token=w.tokens["admin"])[0] == 200
    status, _, data = http_call(w.base, "GET", "/v1/summary", token=secret)
    assert status == 401 and "'brief' is revoked" in json.loads(data)["error"]
    listed = json.loads(http_call(w.base, "GET", "/v1/tokens", token=w.tokens["admin"])[2])
    assert {t["name"]: t["state"] for t in listed}["brief"] == "revoked"
    assert all("token" not in t and "token_hash" not in t for t in listed)  # no secret, not even hashed


def test_body_limits_are_per_route(world: World) -> None:
    w = world
    big = b'{"sql": "SELECT 1", "pad": "' + b"x" * (70 * 1024) + b'"}'
    status, _, data = http_call(w.base, "POST", "/v1/query", big, token=w.tokens["viewer"])
    assert status == 413 and json.loads(data)["type"] == "PayloadTooLargeError"
    # a viewer is refused before a large upload is read
    status, _, data = http_call(w.base, "POST", "/v1/releases?name=a&version=9&hardware=gen1", b"x" * 4096,
                                token=w.tokens["viewer"])  # fmt: skip
    assert status == 403 and "needs role release-manager" in json.loads(data)["error"]


def test_rollout_transitions_name_the_controller(tmp_path: Path) -> None:
    c = Coordinator(tmp_path / "cloud")
    try:
        now = time.time()
        hello = device_pb2.Hello(device_id="car-1", fleet="taxi", labels={"hw": "gen1"}, data_origin="sim")
        c.devices.connect(Caller.device("car-1", transport="test", proven=True), hello, now)
        c.releases.upload(LOCAL, ReleaseInput(build_image("1.0.0", "gen1", size_hint=4096), name="firmware",
                          version="1.0.0", hardware_id="gen1", now=now))  # fmt: skip
        phases = [{"name": "all", "percent": 100}]
        policy = {"release_version": "1.0.0", "selector": "hw=gen1", "phases": phases}
        rollout_id = c.rollouts.create(LOCAL, policy, now).id
        c.controller.tick(now + 1)  # offers the job to car-1
        c.controller.on_device_status("car-1", f"{rollout_id}:car-1", "COMMITTED", "", now + 2)
        c.controller.tick(now + 3)  # everyone committed: the controller ends the rollout
        trail = c.audit.entries(LOCAL, AuditFilter(kind="rollouts"))
        assert [(e.actor, e.action) for e in trail] == [
            ("local", "rollouts.create"), ("rollout-controller", "rollouts.transition")
        ]
        assert (trail[1].target, trail[1].before, trail[1].after) == (
            rollout_id, "RUNNING phase 1", "SUCCEEDED phase 1"
        )
        assert trail[1].role == "coordinator" and trail[1].address == c.devices.coordinator_id
        joined = c.audit.entries(LOCAL, AuditFilter(kind="devices"))
        assert [(e.actor, e.action, e.target) for e in joined] == [("car-1", "devices.register", "car-1")]
    finally:
        c.stop()
        c.close()
