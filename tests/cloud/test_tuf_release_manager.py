"""A release manager's mistakes are refused by the coordinator over HTTP, before anything is signed;
the TUF metadata a device fetches is served under /tuf/ and the director signs per device."""

from __future__ import annotations

import json
import time
from typing import Any

from tuf.api.metadata import Metadata

from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.repositories.records import Inventory, Registration
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.update.artifact import manifest_from_bytes, sha256_hex
from fleetloop_shared.wire import device_pb2
from tests.fixtures.tar_bundle import ustar

from .conftest import RunningCoordinator

HW = "gen1"


def call(rc: RunningCoordinator, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    status, _, data = rc.call(method, path, body or None)
    return status, data


def upload(base: RunningCoordinator, image: bytes, version: str, hardware: str = HW) -> tuple[int, Any]:
    return call(base, "POST", f"/v1/releases?name=fw&version={version}&hardware={hardware}", image)


def test_release_manager_mistakes_get_one_clear_refusal(running_coordinator: RunningCoordinator) -> None:
    base = running_coordinator
    c = running_coordinator.coordinator
    status, body = upload(base, build_image("2.0.0", HW, size_hint=8192), "2.0.0", hardware="gen9")
    assert status == 400 and "firmware image for hardware 'gen1', not 'gen9'" in json.loads(body)["error"]
    status, body = upload(base, build_image("2.0.0", HW, size_hint=8192), "2.1.0")
    assert status == 400 and "is firmware version 2.0.0, not 2.1.0" in json.loads(body)["error"]
    devices = c.repositories.devices
    devices.register("d1", Registration("f", {}, [], "x", "sim"), owner="", now=time.time())
    devices.update_inventory("d1", Inventory(HW, "3.0.0", "", "a", 0), time.time())
    status, body = upload(base, build_image("2.0.0", HW, size_hint=8192), "2.0.0")
    assert status == 400
    assert "older than 3.0.0, which devices with hardware gen1 already run" in json.loads(body)["error"]
    assert c.tuf.image.targets() == {}  # nothing was signed
    # A model pack has its own version line: "1.0.0" is not a downgrade of firmware 3.0.0 ...
    pack = ustar({"model.yaml": b"name: score\n"})
    path = f"/v1/releases?name=detector&version=1.0.0&hardware={HW}"
    status, body = call(base, "POST", path, pack)
    assert status == 201, body
    # ... but the pack itself only moves forward.
    status, body = call(base, "POST", f"/v1/releases?name=detector&version=0.9.0&hardware={HW}", pack)
    assert status == 409 and "not newer than the existing 1.0.0" in json.loads(body)["error"]


def test_metadata_is_served_and_the_director_signs_per_device(
    running_coordinator: RunningCoordinator,
) -> None:
    base = running_coordinator
    c = running_coordinator.coordinator
    v1, v2 = build_image("1.0.0", HW, size_hint=65536), build_image("2.0.0", HW, size_hint=65536)
    c.artifacts.add_image(v1)
    status, body = upload(base, v2, "2.0.0")
    assert status == 201, body
    status, root = call(base, "GET", "/tuf/image/1.root.json")
    assert status == 200 and Metadata.from_bytes(root).signed.roles["root"].threshold == 2
    status, targets = call(base, "GET", "/tuf/image/targets.json")
    assert status == 200 and "fw/gen1/2.0.0.img" in Metadata.from_bytes(targets).signed.targets
    assert call(base, "GET", "/tuf/image/2.root.json")[0] == 404  # end of the rotation walk
    assert call(base, "GET", "/tuf/director/d7/targets.json")[0] == 404  # no job for this device yet
    manifest, signature = c.artifacts.release("fw", HW, "2.0.0")
    assert not c.jobs.publish_job("d7", "job-1", "ro-1", manifest, signature)  # offline: still directed
    status, d_targets = call(base, "GET", "/tuf/director/d7/targets.json")
    signed = Metadata.from_bytes(d_targets).signed.targets
    assert status == 200 and set(signed) == {"fw/gen1/2.0.0.img"}  # the device reported no base: full
    assert signed["fw/gen1/2.0.0.img"].custom["fleetloop"]["job_id"] == "job-1"
    assert signed["fw/gen1/2.0.0.img"].hashes["sha256"] == sha256_hex(v2)
    assert call(base, "GET", "/tuf/director/d7/1.root.json")[0] == 200


def test_re_offering_the_same_job_does_not_re_sign(running_coordinator: RunningCoordinator) -> None:
    c = running_coordinator.coordinator
    image = build_image("2.0.0", HW, size_hint=8192)
    c.artifacts.add_release(
        ReleaseInput(image, name="fw", version="2.0.0", hardware_id=HW, bases=[], now=time.time())
    )
    plan = manifest_from_bytes(c.artifacts.release("fw", HW, "2.0.0")[0])

    def assign(job_id: str) -> int:
        return c.director.assign("d1", job_id=job_id, rollout_id="r", release=plan, installed_sha256="")

    first = assign("j1")
    assert {assign("j1") for _ in range(3)} == {first}  # the controller re-offers every tick
    assert assign("j2") == first + 1


def test_each_device_is_directed_to_the_delta_format_it_reads(
    running_coordinator: RunningCoordinator,
) -> None:
    """Devices on the same base report different formats (one reports none: an agent from before the
    report); the release carries a delta in each preferred format, and the director signs each device
    the one it reads."""
    base = running_coordinator
    c = running_coordinator.coordinator
    v1, v2 = build_image("1.0.0", HW, size_hint=65536), build_image("2.0.0", HW, size_hint=65536)
    c.artifacts.add_image(v1)
    reads = {"new": ["fldelta2", "fldelta1"], "legacy": ["fldelta1"], "old-agent": []}
    for device, formats in reads.items():
        caller = Caller.device(device, transport="test", proven=True)
        c.devices.connect(caller, device_pb2.Hello(device_id=device, fleet="f"), time.time())
        inventory = device_pb2.Inventory(
            hardware_id=HW, firmware_version="1.0.0", firmware_sha256=sha256_hex(v1), delta_formats=formats
        )
        c.devices.receive(caller, device_pb2.DeviceMessage(inventory=inventory), time.time())
    devices = c.repositories.devices
    assert devices.get("new").delta_formats == ("fldelta2", "fldelta1")  # type: ignore[union-attr]
    assert devices.get("legacy").delta_formats == ("fldelta1",)  # type: ignore[union-attr]
    assert devices.get("old-agent").delta_formats == ()  # type: ignore[union-attr]
    status, body = upload(base, v2, "2.0.0")
    assert status == 201, body
    payloads = json.loads(body)["payloads"]
    assert sorted(p["algorithm"] for p in payloads if p["kind"] == "delta") == ["fldelta1", "fldelta2"]
    manifest, signature = c.artifacts.release("fw", HW, "2.0.0")
    for device, expected in (("new", "fldelta2"), ("legacy", "fldelta1"), ("old-agent", "fldelta1")):
        c.jobs.publish_job(device, f"job-{device}", "ro-1", manifest, signature)
        status, d_targets = call(base, "GET", f"/tuf/director/{device}/targets.json")
        signed = Metadata.from_bytes(d_targets).signed.targets
        deltas = [t.custom["fleetloop"] for t in signed.values() if t.custom["fleetloop"]["kind"] == "delta"]
        assert [d["algorithm"] for d in deltas] == [expected], (device, deltas)
