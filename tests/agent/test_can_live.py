"""The live CAN source on real python-can buses: the in-process virtual bus, a bus that crosses processes
over TCP (python-can-remote's server, started here), and SocketCAN when asked for
(``FLEETLOOP_VCAN``: the kernel's ``vcan`` module is not on every machine).

Frames sent are the real comma2k19 drive's; what the source delivers is compared with the batch
decode of the same frames. Failures are real too: the remote server is killed and restarted, frames
are malformed, the queue overflows."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import can
import numpy as np
import pytest

from fleetloop_agent.recordings import read_can_frames
from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.can_bus import CanBusSource
from fleetloop_agent.sources.can_signals import EVERY_READ, CanSignalMap
from fleetloop_agent.sources.live import Backoff, FrameQueue
from fleetloop_fwsim.can_network import CanPlayer, RemoteCanServer
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.samples import GroupBatch
from tests.fixtures.agent_config import agent_yaml

MAPPING = {"SPEED.SPEED": "Vehicle.Speed", "WHEEL_SPEEDS.WHEEL_SPEED_FL": "Vehicle.Wheel.FL"}


class StepClock:
    """A device clock the test reads too: real time, so frames are stamped as they arrive."""

    def now_ns(self) -> int:
        return time.time_ns()


@pytest.fixture(scope="module")
def drive(recordings: Path) -> dict[str, Any]:
    raw = next((recordings / "comma2k19").rglob("raw_can"))
    frames = read_can_frames(raw)
    assert frames is not None
    keep = np.flatnonzero(frames.bus == 0)[:3000]
    rows = [(int(frames.t_ns[i]), int(frames.frame_id[i]), frames.data[i]) for i in keep.tolist()]
    return {"frames": rows, "dbc": recordings / "opendbc" / "toyota_rav4_2017_pt_generated.dbc"}


def _source(dbc: Path, *, interface: str, channel: str, **kw: Any) -> tuple[CanBusSource, Catalog]:
    signals = CanSignalMap(load_dbc(dbc), MAPPING, include_unmapped=False, source="car")
    kw.setdefault("cadence", EVERY_READ)  # these tests check what is decoded, not when (test_can_cadence)
    src = CanBusSource(signals, interface=interface, channel=channel, name="car", clock=StepClock(), **kw)
    catalog = Catalog()
    src.declare(catalog)
    return src, catalog


def _collect(src: CanBusSource, want_samples: int, timeout: float = 10.0) -> list[GroupBatch]:
    got: list[GroupBatch] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += src.read(time.time_ns() + 10**9)
        if sum(b.sample_count for b in got) >= want_samples:
            break
        time.sleep(0.02)
    return got


def _expected(drive: dict[str, Any]) -> dict[str, list[float]]:
    db = load_dbc(drive["dbc"])
    dec = db.decoder(["SPEED", "WHEEL_SPEEDS"])
    out: dict[str, list[float]] = {"Vehicle.Speed": [], "Vehicle.Wheel.FL": []}
    for _, frame_id, data in drive["frames"]:
        decoded = dec.decode(frame_id, data)
        if decoded is None:
            continue
        name, values = decoded
        if name == "SPEED":
            out["Vehicle.Speed"].append(values["SPEED"])
        else:
            out["Vehicle.Wheel.FL"].append(values["WHEEL_SPEED_FL"])
    return out


def _values(batches: list[GroupBatch], catalog: Catalog, path: str) -> list[float]:
    sid = catalog.by_path(path).id
    return [v for b in batches if sid in b.values for v in b.values[sid].tolist()]


def test_virtual_bus_delivers_the_drive_decoded(drive: dict[str, Any]) -> None:
    src, catalog = _source(drive["dbc"], interface="virtual", channel="live-virtual")
    src.start()
    assert src.wait_connected(5)
    sender = can.Bus(interface="virtual", channel="live-virtual")
    try:
        CanPlayer(sender, drive["frames"], speed=50.0).start().join(20)
        want = _expected(drive)
        batches = _collect(src, len(want["Vehicle.Speed"]) + len(want["Vehicle.Wheel.FL"]))
    finally:
        sender.shutdown()
        src.close()
    for path, values in want.items():
        assert _values(batches, catalog, path) == values
    counters = src.counters()
    assert counters["samples"] == sum(len(v) for v in want.values())
    assert counters["errors"] == 0 and counters["dropped"] == 0 and counters["reconnects"] == 0
    # frames of other messages never reached the queue: the bus filters them
    assert {b.group for b in batches} == {"car/SPEED", "car/WHEEL_SPEEDS"}


def test_remote_bus_across_processes_survives_the_server_going_away(
    drive: dict[str, Any], tmp_path: Path
) -> None:
    server = RemoteCanServer(channel="live-remote", log=tmp_path / "server.log").start()
    src, catalog = _source(
        drive["dbc"], interface="remote", channel=server.url, backoff=Backoff(initial_s=0.05, max_s=0.2)
    )
    sender: Any = None
    try:
        src.start()
        assert src.wait_connected(10)
        sender = can.Bus(interface="remote", channel=server.url)
        half = drive["frames"][:1500]
        CanPlayer(sender, half, speed=100.0).start().join(20)
        want_first = sum(1 for _, i, _ in half if i in (0xB4, 0xAA))
        first = _collect(src, want_first)
        assert sum(b.sample_count for b in first) == want_first  # one mapped signal per frame
        # the bus goes away: the source counts it, says it is down, keeps what it had
        sender.shutdown()
        sender = None
        server.stop()
        deadline = time.monotonic() + 10
        while src.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not src.alive() and src.failure is not None
        assert src.counters()["errors"] >= 1
        # ... and comes back on the same port: the source reconnects by itself
        server.start()
        assert src.wait_connected(10)
        assert src.alive() and src.counters()["reconnects"] >= 1
        sender = can.Bus(interface="remote", channel=server.url)
        CanPlayer(sender, drive["frames"][1500:], speed=100.0).start().join(20)
        want = _expected(drive)
        rest = _collect(src, sum(len(v) for v in want.values()) - sum(b.sample_count for b in first))
    finally:
        if sender is not None:
            sender.shutdown()
        src.close()
        server.stop()
    batches = first + rest
    for path, values in want.items():
        assert _values(batches, catalog, path) == values


def _vcan_missing(name: str) -> str | None:
    """Why SocketCAN cannot be reached through ``name``, or None when it is up."""
    if not hasattr(socket, "AF_CAN"):
        return "this Python has no AF_CAN sockets"
    try:
        with socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW) as s:
            s.bind((name,))
    except OSError as exc:
        return f"no SocketCAN interface {name} ({exc.strerror}); `ip link add dev {name} type vcan` makes one"
    return None


@pytest.mark.socketcan
def test_socketcan_vcan(drive: dict[str, Any]) -> None:
    """Runs when ``FLEETLOOP_VCAN`` names an interface (``make test-socketcan``); a machine without the
    kernel's vcan module (containers, CI) leaves it out rather than skipping it every time."""
    channel = os.environ["FLEETLOOP_VCAN"]
    missing = _vcan_missing(channel)
    assert missing is None, missing
    src, catalog = _source(drive["dbc"], interface="socketcan", channel=channel)
    src.start()
    assert src.wait_connected(5)
    sender = can.Bus(interface="socketcan", channel=channel)
    try:
        CanPlayer(sender, drive["frames"], speed=20.0).start().join(20)
        want = _expected(drive)
        batches = _collect(src, sum(len(v) for v in want.values()))
    finally:
        sender.shutdown()
        src.close()
    for path, values in want.items():
        assert _values(batches, catalog, path) == values


def test_malformed_and_error_frames_are_counted_and_the_rest_decoded(drive: dict[str, Any]) -> None:
    src, catalog = _source(drive["dbc"], interface="virtual", channel="live-bad", filters=False)
    src.start()
    assert src.wait_connected(5)
    sender = can.Bus(interface="virtual", channel="live-bad")
    try:
        sender.send(can.Message(arbitration_id=0xB4, data=b"\x01\x02", is_extended_id=False))  # too short
        sender.send(can.Message(is_error_frame=True, arbitration_id=0, data=b""))
        good = next(d for _, i, d in drive["frames"] if i == 0xB4)
        sender.send(can.Message(arbitration_id=0xB4, data=good, is_extended_id=False))
        batches = _collect(src, 1, timeout=5)
        time.sleep(0.1)
        batches += src.read(time.time_ns() + 10**9)
    finally:
        sender.shutdown()
        src.close()
    assert len(_values(batches, catalog, "Vehicle.Speed")) == 1
    assert src.counters()["errors"] == 2


def test_an_absent_bus_is_retried_not_fatal(drive: dict[str, Any]) -> None:
    src, _ = _source(
        drive["dbc"],
        interface="remote",
        channel="ws://127.0.0.1:9/",
        backoff=Backoff(initial_s=0.01, max_s=0.05),
    )
    try:
        assert src.read(time.time_ns()) == []
        deadline = time.monotonic() + 5
        while src.counters()["errors"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not src.alive() and "cannot open remote" in (src.failure or "")
        assert src.counters()["errors"] >= 2
    finally:
        src.close()


def test_queue_drops_the_oldest_and_counts() -> None:
    q = FrameQueue(capacity=3)
    for k in range(5):
        q.put(k, 0x100 + k, bytes([k]))
    assert q.dropped_total == 2
    batch = q.drain(until_ns=3)
    assert batch.frame_id.tolist() == [0x102, 0x103] and batch.payload[:, 0].tolist() == [2, 3]
    assert q.drain().frame_id.tolist() == [0x104]


def test_config_is_checked_key_by_key(drive: dict[str, Any], tmp_path: Path) -> None:
    base = {"kind": "can", "name": "car", "channel": "can0", "dbc": str(drive["dbc"]), "mapping": MAPPING}
    src = build_source(base, base_dir=tmp_path, start_ns=0)
    assert isinstance(src, CanBusSource)
    cases = [
        ({"interface": "nonesuch"}, "key 'interface': python-can has no interface 'nonesuch'"),
        ({"channel": None}, "missing key 'channel'"),
        ({"timestamps": "sometimes"}, "key 'timestamps': must be one of receive, bus"),
        ({"queue_frames": 0}, "key 'queue_frames': expected at least 1"),
        ({"mapping": {"SPEED.NOPE": "x"}}, "message SPEED has no signal 'NOPE'"),
        ({"dbc": str(tmp_path / "none.dbc")}, "key 'dbc': file not found"),
        ({"bitrat": 500000}, "unknown key 'bitrat'"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
            build_source({**base, **change}, base_dir=tmp_path, start_ns=0)
        assert str(info.value).startswith("source 'car'")


def test_a_wrong_mapping_key_is_refused_where_it_is_written(tmp_path: Path) -> None:
    from fleetloop_agent.config import load_agent_config
    from fleetloop_fwsim.signals import SIM_VEHICLE_DBC

    path = tmp_path / "agent.yaml"
    path.write_text(
        agent_yaml(
            "  - kind: can\n"
            "    name: can0\n"
            "    interface: virtual\n"
            "    channel: car\n"
            f"    dbc: {SIM_VEHICLE_DBC}\n"
            "    mapping:\n"
            "      SIM_VEHICLE_SPEED.VEHICLE_SPEED: Vehicle.Speed\n"
            "      SIM_BRAKE.BRAKE_PRESURE: Vehicle.Chassis.Brake.PedalPressure\n"
        )
    )
    config = load_agent_config(path)
    with pytest.raises(ConfigError) as info:
        build_source(config.sources[0], base_dir=config.base_dir, start_ns=0)
    assert info.value.message == (
        f"{path}:12:7: source 'can0': mapping key 'SIM_BRAKE.BRAKE_PRESURE': "
        "message SIM_BRAKE has no signal 'BRAKE_PRESURE'"
    )


FD_DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU
BO_ 1024 WIDE: 64 ECU
 SG_ Head : 0|16@1+ (0.5,0) [0|0] "" Vector__XXX
 SG_ Tail : 496|16@1- (1,0) [0|0] "" Vector__XXX
BA_DEF_ BO_ "VFrameFormat" ENUM {formats};
BA_DEF_DEF_ "VFrameFormat" "StandardCAN";
BA_ "VFrameFormat" BO_ 1024 14;
""".format(
    formats=",".join(
        f'"{f}"'
        for f in ["StandardCAN", "ExtendedCAN", "reserved", "J1939PG", *["reserved"] * 10, "StandardCAN_FD"]
    )
)


def test_can_fd_frames_of_64_bytes(tmp_path: Path) -> None:
    dbc = tmp_path / "fd.dbc"
    dbc.write_text(FD_DBC)
    assert load_dbc(dbc).layout("WIDE").is_fd
    signals = CanSignalMap(load_dbc(dbc), {}, include_unmapped=True, source="fd")
    src = CanBusSource(
        signals, interface="virtual", channel="live-fd", name="fd", fd=True, cadence=EVERY_READ
    )
    catalog = Catalog()
    src.declare(catalog)
    src.start()
    assert src.wait_connected(5)
    sender = can.Bus(interface="virtual", channel="live-fd")
    payload = bytes([0x10, 0x27]) + bytes(60) + (-2).to_bytes(2, "little", signed=True)
    try:
        sender.send(can.Message(arbitration_id=1024, data=payload, is_fd=True, is_extended_id=False))
        batches = _collect(src, 2, timeout=5)
    finally:
        sender.shutdown()
        src.close()
    assert _values(batches, catalog, "CAN.WIDE.Head") == [0x2710 * 0.5]
    assert _values(batches, catalog, "CAN.WIDE.Tail") == [-2]
