"""Privacy at the edge, played by the adversary with real parts: a CSV-replayed drive through the agent's
runtime, its local store, real gRPC on loopback (through a recording TCP relay) and a real coordinator.

What must hold: the VIN the policy hashes is never in the device's store or upload queue, never in an
upload on the wire and never in the fleet store, only its hash, stable per fleet and period and different
across fleets; a capture taken inside a geofence is never stored, so never leaves the device; the cloud
records the policy each capture was taken under; a hand-made segment carrying a dropped signal is
refused by ingest, counted, and the device gets the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fleetloop_agent.config import load_agent_config
from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.privacy_state import keys_to_json
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.transport import Refused
from fleetloop_agent.uplink.uploader import Settle, Uploader
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.provisioning import provision_sim_device
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.privacy import hash_identifier, is_hashed
from fleetloop_shared.samples import GroupBatch
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, segment_from_batch
from fleetloop_shared.wire import device_pb2, ingest_pb2
from tests.fixtures.agent_runtime import AgentRuns, free_port, wait_for

VIN = "WVWZZZ1JZXW000001"
VIN_PATH = "Vehicle.VehicleIdentification.VIN"
LAT, LON = "Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude"
FENCE_LAT = (48.0, 48.1)
CAMPAIGN = f"""apiVersion: fleetloop/v1
kind: Campaign
metadata: {{name: trips, version: 1}}
spec:
  trigger: {{when: "Vehicle.Speed > 40", mode: rising}}
  collect:
    signals: [Vehicle.Speed, Vehicle.CurrentLocation.*, {VIN_PATH}, Vehicle.Cabin.*]
    pre: 2s
    post: 1s
  upload: {{network: [wifi, cellular]}}
  privacy:
    name: eu-cars
    version: 2
    drop: [Vehicle.Cabin.*]
    hash: [{VIN_PATH}]
    coarsen: {{position: {{grid: 0.01}}, time: 100ms}}
    suppress:
      geofences:
        - type: Polygon
          coordinates: [[[11.0, 48.0], [11.1, 48.0], [11.1, 48.1], [11.0, 48.1], [11.0, 48.0]]]
"""


def write_drive(path: Path) -> None:
    """80 s at 10 Hz: speed crosses 40 km/h every 20 s (at 10, 30, 50, 70 s); the first 40 s inside the
    geofence, the rest outside it; the VIN on every row; a cabin microphone level the policy drops."""
    lines = ["t,speed,lat,lon,vin,mic"]
    for i in range(800):
        t = i / 10
        speed = 30 + (t % 20)
        lat = 48.05 + 0.0001 * (i % 50) if t < 40 else 47.5 + 0.0001 * (i % 50)
        lines.append(f"{t:.1f},{speed:.2f},{lat:.6f},{11.05:.6f},{VIN},{(i % 7) / 7:.3f}")
    path.write_text("\n".join(lines) + "\n")


def provision(root: Path, device_id: str, fleet: str, grpc_target: str, keys: Path) -> Path:
    drive = root / "drive.csv"
    root.mkdir(parents=True, exist_ok=True)
    write_drive(drive)
    source = {
        "kind": "csv_replay", "name": "drive", "path": str(drive), "time_column": "t",
        "time_format": "seconds", "group": "drive",
        "columns": {"speed": ["Vehicle.Speed", "km/h"], "lat": [LAT, "deg"], "lon": [LON, "deg"],
                    "vin": [VIN_PATH, ""], "mic": ["Vehicle.Cabin.Microphone.Level", ""]},
    }  # fmt: skip
    device = provision_sim_device(
        root, device_id=device_id, kind="car", hardware_id="hw", cloud={"grpc": grpc_target},
        trust_files=[keys / "image-root.json", keys / "director-root.json"], recordings=None, fleet=fleet,
        replay_speed=8.0, heartbeat_s=0.5, health_check=False, live=([source], "recordings"),
    )  # fmt: skip
    return device.config_path


class Relay:
    """A TCP relay on loopback that keeps every byte the device sends, to read what crossed the wire."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server = socket.create_server(("127.0.0.1", self.port))
        self.sent: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:  # the cloud is not there yet: the device sees a refused connection
                client.close()
                continue
            record = bytearray()
            with self._lock:
                self.sent.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()

    def wire(self) -> bytes:
        with self._lock:
            return b"".join(bytes(r) for r in self.sent)

    def uploads(self) -> list[ingest_pb2.UploadSegmentRequest]:
        """Every UploadSegment request in the device's HTTP/2 streams (DATA frames, gRPC messages)."""
        out = []
        with self._lock:
            connections = [bytes(r) for r in self.sent]
        for raw in connections:
            for body in _grpc_messages(raw):
                try:
                    req = ingest_pb2.UploadSegmentRequest.FromString(body)
                except Exception:  # a control-stream message: not an upload
                    continue
                if len(req.segment_id) == 16 and req.segment and req.device_id:
                    out.append(req)
        return out


def _grpc_messages(raw: bytes) -> Iterator[bytes]:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    if not raw.startswith(preface):
        return
    pos, streams = len(preface), {}
    while pos + 9 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 3], "big")
        kind, flags = raw[pos + 3], raw[pos + 4]
        stream = int.from_bytes(raw[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        payload = raw[pos + 9 : pos + 9 + length]
        pos += 9 + length
        if kind == 0:  # DATA
            if flags & 0x8:
                payload = payload[1 : len(payload) - payload[0]]
            streams.setdefault(stream, bytearray()).extend(payload)
    for data in streams.values():
        at = 0
        while at + 5 <= len(data):
            (size,) = struct.unpack(">I", data[at + 1 : at + 5])
            yield bytes(data[at + 5 : at + 5 + size])
            at += 5 + size


def text_values(segments: list[Segment], catalog: Catalog, path: str) -> list[str]:
    spec = catalog.get(path)
    assert spec is not None
    return [str(v) for s in segments for g in s.groups() for v in g.columns.get(spec.id, [])]


def store_segments(store_dir: Path) -> list[Segment]:
    store = LocalStore(store_dir, quota_bytes=64 << 20)
    try:
        return [decode_segment(store.read(s.segment_id)) for s in store.pending(10_000)]
    finally:
        store.close()


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_what_the_policy_forbids_never_leaves_the_device(tmp_path: Path, agent_runs: AgentRuns) -> None:
    port = free_port()
    coordinator = Coordinator(tmp_path / "cloud")
    keys = tmp_path / "cloud" / "keys"
    coordinator.campaigns.apply(Caller.local(), CAMPAIGN, now=time.time())
    relay = Relay(port)
    path_a = provision(tmp_path / "a", "car-a1", "fleet-a", f"127.0.0.1:{relay.port}", keys)
    # the device shadow of an earlier connection: the campaign and the fleet's keys, so it captures offline
    state = tmp_path / "a" / "data" / "state"
    state.mkdir(parents=True, exist_ok=True)
    fleet_keys = keys_to_json(coordinator.privacy_keys.keys("fleet-a", time.time()))
    shadow = {"version": 1, "campaigns": [["trips", 1, CAMPAIGN]], "privacy_keys": fleet_keys}
    (state / "campaigns.json").write_text(json.dumps(shadow))
    config_a = load_agent_config(path_a)
    a = AgentRuntime(config_a)
    assert a.specs["trips"].privacy is not None and len(a.privacy_keys) == 2
    b = AgentRuntime(
        load_agent_config(provision(tmp_path / "b", "car-b1", "fleet-b", f"127.0.0.1:{relay.port}", keys))
    )
    try:
        agent_runs.start(a)
        # offline: the upload queue fills; two fires inside the fence (suppressed), two outside
        assert wait_for(
            lambda: a.privacy.suppressed_captures >= 2 and a.store.stats().segments_pending >= 2, 60
        )
        queued = store_segments(config_a.store_dir)
        vins = text_values(queued, a.catalog, VIN_PATH)
        assert vins and all(is_hashed(v) for v in vins) and VIN not in vins
        lat_id = a.catalog.by_path(LAT).id
        lats = [float(x) for s in queued for g in s.groups() for x in g.columns.get(lat_id, [])]
        assert lats and all(not FENCE_LAT[0] <= x <= FENCE_LAT[1] for x in lats)  # nothing from the fence
        assert all(abs(x * 100 - round(x * 100 - 0.5) - 0.5) < 1e-6 for x in lats)  # cell centres only
        mic = a.catalog.by_path("Vehicle.Cabin.Microphone.Level").id
        assert not any(mic in g.columns for s in queued for g in s.groups())
        assert VIN.encode() not in all_bytes(config_a.store_dir)
        # the cloud appears; the second device (another fleet) gets campaign and keys over the control channel
        agent_runs.serve(coordinator, port)
        agent_runs.start(b)
        assert wait_for(lambda: a.link.connected.is_set() and b.link.connected.is_set(), 30)
        assert wait_for(lambda: len(b.privacy_keys) == 2 and b.store.stats().segments_uploaded_total >= 1, 60)
        assert wait_for(lambda: a.store.stats().segments_pending == 0, 30)
    finally:
        agent_runs.stop()
        relay.close()
    # keys from the control channel are kept for a restart without a link
    kept = json.loads((tmp_path / "b" / "data" / "state" / "campaigns.json").read_text())["privacy_keys"]
    assert [k["id"] for k in kept] == [
        k.key_id for k in coordinator.privacy_keys.keys("fleet-b", time.time())
    ]
    # the wire: uploads carry the hash and the policy, never the VIN
    uploads = relay.uploads()
    assert uploads and VIN.encode() not in relay.wire()
    wire_vins: list[str] = []
    for req in uploads:
        assert (req.privacy_policy, req.privacy_policy_version) == ("eu-cars", 2) and req.privacy_key_id
        catalog = a.catalog if req.device_id == "car-a1" else b.catalog
        wire_vins += text_values([decode_segment(req.segment)], catalog, VIN_PATH)
    assert wire_vins and all(is_hashed(v) for v in wire_vins)
    # the fleet store: hashed per fleet with the fleet's key of the period, one value per fleet
    rows = coordinator.queries.sql(
        Caller.local(),
        f"SELECT device_id, value_str FROM samples WHERE signal = '{VIN_PATH}' GROUP BY device_id, value_str",
    ).rows
    by_device = {str(d): str(v) for d, v in rows}
    assert len(rows) == 2, rows  # one hashed value per device: stable within the fleet and period
    now = time.time()
    assert by_device["car-a1"] == hash_identifier(coordinator.privacy_keys.keys("fleet-a", now)[0], VIN)
    assert by_device["car-b1"] == hash_identifier(coordinator.privacy_keys.keys("fleet-b", now)[0], VIN)
    assert by_device["car-a1"].rsplit(":", 1)[1] != by_device["car-b1"].rsplit(":", 1)[1]
    assert VIN.encode() not in all_bytes(tmp_path / "cloud" / "fleet")
    inside = coordinator.queries.sql(
        Caller.local(), f"SELECT count(*) FROM samples WHERE signal = '{LAT}' AND value BETWEEN 48.0 AND 48.1"
    ).rows
    assert inside[0][0] == 0
    captures = coordinator.repositories.segments.captures()
    assert captures and all(c.privacy.startswith("eu-cars@2#p") for c in captures)
    stamps = coordinator.queries.sql(Caller.local(), "SELECT DISTINCT device_id, privacy FROM captures").rows
    assert {str(d) for d, _ in stamps} == {"car-a1", "car-b1"} and all(
        str(p).startswith("eu-cars@2#p") for _, p in stamps
    )


def test_a_segment_with_a_dropped_signal_is_refused_with_a_reason(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path / "cloud")
    coordinator.campaigns.apply(Caller.local(), CAMPAIGN, now=time.time())
    server, port = start_grpc_server(coordinator, "127.0.0.1", 0)
    catalog = Catalog()
    speed = catalog.add("Vehicle.Speed", DataType.FLOAT64)
    mic = catalog.add("Vehicle.Cabin.Microphone.Level", DataType.FLOAT64)
    vin = catalog.add(VIN_PATH, DataType.STRING)
    hello = device_pb2.Hello(device_id="car-x", fleet="fleet-a")
    hello.catalog.extend(
        device_pb2.CatalogSignal(id=s.id, path=s.path, data_type=int(s.data_type)) for s in catalog
    )
    t = np.arange(10, dtype=np.int64) * 100_000_000
    cases = {
        "dropped": {speed.id: np.ones(10), mic.id: np.ones(10)},
        "clear": {speed.id: np.ones(10), vin.id: np.array([VIN] * 10, dtype=object)},
    }

    async def upload_all() -> dict[str, object]:
        transport = GrpcTransport(f"127.0.0.1:{port}")
        session = await transport.connect([device_pb2.DeviceMessage(hello=hello)])
        await session.receive()  # welcome: the device is known
        answers: dict[str, object] = {}
        for name, values in cases.items():
            seg = segment_from_batch(GroupBatch("g", t, values), catalog)
            req = ingest_pb2.UploadSegmentRequest(
                device_id="car-x", segment_id=seg.segment_id, capture_id=name, campaign="trips",
                priority=5, segment=encode_segment(seg),
            )  # fmt: skip
            answers[name] = await transport.upload(req, 10)
        await session.close()
        await transport.close()
        return answers

    try:
        answers = asyncio.run(upload_all())
    finally:
        server.stop(grace=0).wait(2)
    dropped, clear = answers["dropped"], answers["clear"]
    assert isinstance(dropped, Refused) and dropped.status == "INVALID_ARGUMENT"
    assert "Vehicle.Cabin.Microphone.Level is dropped by privacy policy eu-cars@2" in dropped.detail
    assert isinstance(clear, Refused) and f"{VIN_PATH} carries a clear identifier" in clear.detail
    # what the device's upload policy makes of it: settled for good, with the reason
    uploader = Uploader("car-x", takes_pieces=False)
    stored = LocalStore(tmp_path / "store", quota_bytes=1 << 20)
    try:
        seg = segment_from_batch(GroupBatch("g", t, cases["dropped"]), catalog)
        entry = stored.append(seg, capture_id="c", campaign="trips", priority=5, now_ns=1)
        transfer = uploader.begin(entry, stored.read(entry.segment_id))
        verdict = uploader.answer(transfer, dropped, 0.0)
    finally:
        stored.close()
    assert isinstance(verdict, Settle) and not verdict.acknowledged and "dropped by privacy" in verdict.reason
    assert coordinator.repositories.segments.totals().segments == 0
    counted = coordinator.metrics.registry.get_sample_value(
        "fleetloop_ingest_segments_total", {"transport": "grpc", "outcome": "refused_privacy"}
    )
    assert counted == 2
