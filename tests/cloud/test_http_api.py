"""The REST API and the artifact file server (with Range), over real HTTP on loopback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetloop_cloud.services.access import Caller

RunningCoordinator = Any

CAMPAIGN = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: brake, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15", mode: rising, min_interval: 30s}
  collect: {signals: ["Vehicle.*"], pre: 10s, post: 5s}
  priority: 8
"""


def call(
    rc: RunningCoordinator, method: str, path: str, body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request with the admin token."""
    return rc.call(method, path, body, headers)


def test_campaign_is_validated_with_line_and_column(running_coordinator: RunningCoordinator) -> None:
    base = running_coordinator
    status, _, body = call(base, "POST", "/v1/campaigns?source=brake.yaml", CAMPAIGN.encode())
    assert status == 201 and json.loads(body)["name"] == "brake"
    bad = CAMPAIGN.replace("delta(Vehicle.Speed, 1s)", "delta(Vehicle.Speed)")
    status, _, body = call(base, "POST", "/v1/campaigns?source=brake.yaml", bad.encode())
    err = json.loads(body)
    assert status == 400
    assert err["error"].startswith("brake.yaml:5:")
    status, _, body = call(base, "GET", "/v1/campaigns")
    assert [c["name"] for c in json.loads(body)["campaigns"]] == ["brake"]


def test_query_errors_are_400_and_results_are_json(running_coordinator: RunningCoordinator) -> None:
    base = running_coordinator
    status, _, body = call(base, "POST", "/v1/query", json.dumps({"sql": "SELECT 41 + 1 AS answer"}).encode())
    assert status == 200 and json.loads(body)["rows"] == [[42]]
    status, _, body = call(base, "POST", "/v1/query", json.dumps({"sql": "SELEKT nothing"}).encode())
    assert status == 400 and json.loads(body)["type"] == "QueryError"
    status, _, body = call(base, "POST", "/v1/query", b"not json")
    assert status == 400
    status, _, _ = call(base, "GET", "/v1/nothing-here")
    assert status == 404


def upload_release(base: RunningCoordinator, image: bytes) -> tuple[int, dict[str, str], bytes]:
    """``image`` uploaded as firmware 1.0.0 for hardware ``hw1``: status, headers, body."""
    return call(
        base,
        "POST",
        "/v1/releases?name=fw&version=1.0.0&hardware=hw1",
        image,
        {"Content-Type": "application/octet-stream"},
    )


def test_release_upload_and_ranged_download(running_coordinator: RunningCoordinator) -> None:
    base = running_coordinator
    image = bytes(range(256)) * 4096
    status, _, body = upload_release(base, image)
    assert status == 201, body
    rel = json.loads(body)
    full = next(p for p in rel["payloads"] if p["kind"] == "full")
    status, headers, data = call(base, "GET", f"/{full['path']}")
    assert status == 200 and data == image and headers["Accept-Ranges"] == "bytes"
    status, headers, data = call(base, "GET", f"/{full['path']}", headers={"Range": "bytes=1000-"})
    assert status == 206 and data == image[1000:]
    assert headers["Content-Range"] == f"bytes 1000-{len(image) - 1}/{len(image)}"
    status, _, data = call(base, "GET", f"/{full['path']}", headers={"Range": "bytes=10-19"})
    assert status == 206 and data == image[10:20]
    status, headers, _ = call(base, "GET", f"/{full['path']}", headers={"Range": f"bytes={len(image)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(image)}"
    # the same version again is a conflict, an unknown file is 404
    status, _, body = upload_release(base, image)
    assert status == 409, body
    status, _, _ = call(base, "GET", "/files/" + "0" * 64)
    assert status == 404


@pytest.mark.parametrize("path", ["/files/../metadata.sqlite", "/files/%2e%2e%2fmetadata.sqlite"])
def test_no_path_traversal(running_coordinator: RunningCoordinator, path: str) -> None:
    status, _, _ = call(running_coordinator, "GET", path)
    assert status == 404


def test_a_devices_catalog_is_a_file_rules_validate_takes(
    running_coordinator: RunningCoordinator, tmp_path: Any
) -> None:
    from fleetloop_cli.main import main
    from fleetloop_shared.wire import device_pb2

    hello = device_pb2.Hello(device_id="car-7", fleet="f", labels={"kind": "car"}, data_origin="sim")
    hello.catalog.add(id=3, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    hello.catalog.add(id=4, path="Vehicle.Gear", data_type=device_pb2.DATA_TYPE_STRING)
    c = running_coordinator.coordinator
    c.devices.connect(Caller.device("car-7", transport="test", proven=True), hello, c.clock())
    base = running_coordinator
    status, _, body = call(base, "GET", "/v1/devices/car-7/catalog")
    assert status == 200
    hello.catalog.add(id=5, path="Vehicle.VehicleIdentification.VIN", data_type=device_pb2.DATA_TYPE_STRING)
    c.devices.connect(Caller.device("car-7", transport="test", proven=True), hello, c.clock())
    status, _, body = call(base, "GET", "/v1/devices/car-7/catalog")
    # each signal with the class the cloud assigns it (the device sends none)
    assert json.loads(body)["signals"] == [
        {"id": 3, "path": "Vehicle.Speed", "data_type": "FLOAT64", "unit": "km/h", "class": "internal"},
        {"id": 4, "path": "Vehicle.Gear", "data_type": "STRING", "unit": "", "class": "internal"},
        {"id": 5, "path": "Vehicle.VehicleIdentification.VIN", "data_type": "STRING", "unit": "",
         "class": "personal"},
    ]  # fmt: skip
    assert call(base, "GET", "/v1/devices/nope/catalog")[0] == 404
    (tmp_path / "catalog.json").write_bytes(body)
    (tmp_path / "c.yaml").write_text(CAMPAIGN.replace("Vehicle.Speed > 50", "Vehicle.Gear > 'D'"))
    validate = ["rules", "validate", str(tmp_path / "c.yaml"), "--catalog", str(tmp_path / "catalog.json")]
    assert main(validate) == 0
    (tmp_path / "c.yaml").write_text(CAMPAIGN.replace("Vehicle.Speed > 50", "Vehicle.Gear > 5"))
    assert main(validate) == 2
    # a catalog file whose class is none of the five is refused, naming the signal
    (tmp_path / "c.yaml").write_text(CAMPAIGN)
    (tmp_path / "catalog.json").write_bytes(body.replace(b'"personal"', b'"secret"'))
    assert main(validate) == 2
