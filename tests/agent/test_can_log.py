"""CAN log replay as an agent source (candump, ASC, BLF, GVRET, MF4, numpy; paced; once or looping) and
J1939: PGN matching on the real truck log, transport-protocol sessions (BAM and RTS/CTS) made by a
real J1939 stack (can-j1939) on a bus and reassembled by the agent listening on it."""

from __future__ import annotations

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
from fleetloop_agent.sources.j1939 import J1939Reassembler, frame_id_of
from fleetloop_shared.can_batch import BatchDecoder, FrameBatch
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000
START = 1_700_000_000 * S


def _samples(batches: list[GroupBatch]) -> int:
    return sum(b.sample_count for b in batches)


def _log_source(tmp_path: Path, path: Path, dbc: Path, **extra: Any) -> tuple[Any, Catalog]:
    spec = {
        "kind": "can_log",
        "name": "log",
        "path": str(path),
        "dbc": str(dbc),
        "include_unmapped": True,
        **extra,
    }
    src = build_source(spec, base_dir=tmp_path, start_ns=START)
    catalog = Catalog()
    src.declare(catalog)
    return src, catalog


def _reference_samples(path: Path, dbc: Path, bus: int | None = None) -> int:
    """Samples the whole log decodes to, through the batch decoder directly (one pass)."""
    frames = read_can_frames(path)
    assert frames is not None
    keep = np.ones(len(frames.t_ns), bool) if bus is None else frames.bus == bus
    rows = np.flatnonzero(keep).tolist()
    batch = FrameBatch.from_payloads(frames.t_ns[keep], frames.frame_id[keep], [frames.data[i] for i in rows])
    db = load_dbc(dbc)
    return sum(
        len(m.rows) * len(m.values)
        for m in BatchDecoder([db.layout(n) for n in db.message_names()]).decode(batch)
    )


def test_every_log_format_replays_once_completely(recordings: Path, tmp_path: Path) -> None:
    kona, css = recordings / "kona-ev", recordings / "css-electronics"
    asc = kona / "bms_idle_30sec.asc"
    # BLF and candump files made here from the real frames, through python-can's writer and our own text
    frames = read_can_frames(asc)
    assert frames is not None
    blf = tmp_path / "bms.blf"
    with can.BLFWriter(str(blf)) as writer:
        for t, b, i, d in zip(
            frames.t_ns.tolist(), frames.bus.tolist(), frames.frame_id.tolist(), frames.data, strict=True
        ):
            writer.on_message_received(
                can.Message(timestamp=t / S, channel=b, arbitration_id=i, data=d, is_extended_id=i > 0x7FF)
            )
    back = read_can_frames(blf)
    assert (
        back is not None and back.frame_id.tolist() == frames.frame_id.tolist() and back.data == frames.data
    )
    # BLF counts time from its first frame, in 10 µs or 1 ns ticks
    assert np.abs((back.t_ns - back.t_ns[0]) - (frames.t_ns - frames.t_ns[0])).max() < 1000
    candump = tmp_path / "bms.log"
    candump.write_text(
        "".join(
            f"({t / S:.6f}) can{b} {i:03X}#{d.hex().upper()}\n"
            for t, b, i, d in zip(
                frames.t_ns.tolist(), frames.bus.tolist(), frames.frame_id.tolist(), frames.data, strict=True
            )
        )
    )
    cases = [
        (asc, kona / "dbc" / "pcan.dbc"),
        (blf, kona / "dbc" / "pcan.dbc"),
        (candump, kona / "dbc" / "pcan.dbc"),
        (sorted(kona.glob("*.csv"))[0], kona / "dbc" / "pcan.dbc"),
        (css / "canmod_gps_obd2_545s" / "00000001-60FE3F04.MF4", css / "dbc" / "canmod-gps.dbc"),
    ]
    for path, dbc in cases:
        src, _ = _log_source(tmp_path, path, dbc, loop=False)
        got, t = 0, START
        while not src.finished and t < START + 2000 * S:  # in steps: older data than 300 s is dropped
            t += 100 * S
            got += _samples(src.read(t))
        assert got == _reference_samples(path, dbc) > 0, path.name
        assert src.finished and src.read(t + 1000 * S) == []


def test_pacing_real_time_and_accelerated(recordings: Path, tmp_path: Path) -> None:
    asc = recordings / "kona-ev" / "bms_idle_30sec.asc"
    dbc = recordings / "kona-ev" / "dbc" / "pcan.dbc"
    real, _ = _log_source(tmp_path, asc, dbc, decode_wait=0)  # pacing, not the decode cadence
    fast, _ = _log_source(tmp_path, asc, dbc, speed=4, decode_wait=0)
    halfway_real = _samples(real.read(START + 15 * S))
    quarter_fast = _samples(fast.read(START + int(3.75 * S)))  # 15 s of the log at 4x
    total = _reference_samples(asc, dbc)
    assert 0.4 * total < halfway_real < 0.6 * total
    assert abs(quarter_fast - halfway_real) <= 0.02 * total
    # looping: the next minute of data time replays the log again
    assert _samples(real.read(START + 75 * S)) > total


def test_log_config_errors_name_the_key(recordings: Path, tmp_path: Path) -> None:
    dbc = recordings / "kona-ev" / "dbc" / "pcan.dbc"
    asc = recordings / "kona-ev" / "bms_idle_30sec.asc"
    base = {"kind": "can_log", "name": "log", "path": str(asc), "dbc": str(dbc), "include_unmapped": True}
    for change, message in [
        ({"speed": 0}, "key 'speed': expected a number > 0"),
        ({"bus": 7}, "no frames on bus 7"),
        ({"path": str(tmp_path / "nope.asc")}, "key 'path': not found"),
        ({"path": str(recordings / "skab" / "anomaly-free.csv")}, "a CSV of signals, not a CAN bus log"),
        ({"loop": "yes"}, "key 'loop': expected true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_source({**base, **change}, base_dir=tmp_path, start_ns=START)
    bad = tmp_path / "bad.blf"
    bad.write_bytes(b"LOGG" + b"\x00" * 40)
    with pytest.raises(ConfigError, match="not a readable BLF file"):
        build_source({**base, "path": str(bad)}, base_dir=tmp_path, start_ns=START)
    wrong = tmp_path / "wrong.dbc"
    wrong.write_text('BO_ 1 X: 8 Y\n SG_ A : 0|8@1+ (1,0) [0|1] "" Y\n garbage here\n')
    with pytest.raises(ConfigError, match="not a valid DBC"):
        build_source({**base, "dbc": str(wrong)}, base_dir=tmp_path, start_ns=START)


# -- J1939 -------------------------------------------------------------------------------------------------


def test_real_truck_log_decodes_by_pgn(recordings: Path, tmp_path: Path) -> None:
    css = recordings / "css-electronics"
    src, catalog = _log_source(
        tmp_path,
        css / "j1939_truck_400s" / "00000001.MF4",
        css / "dbc" / "CSS-Electronics-SAE-J1939-DEMO.dbc",
        loop=False,
        j1939=True,
    )
    batches = {b.group: b for b in src.read(START + 250 * S)}
    assert set(batches) == {"log/EEC1", "log/CCVS1"}
    rpm = batches["log/EEC1"].values[catalog.by_path("CAN.EEC1.EngineSpeed").id]
    assert rpm.size > 2000 and float(rpm.min()) >= 0
    assert src.counters()["errors"] == 0


J1939_DBC = """VERSION ""
NS_ :
BS_:
BU_: ENGINE
BO_ {vi} VI: 18 ENGINE
 SG_ VinHead : 0|56@1+ (1,0) [0|0] "" Vector__XXX
 SG_ VinMid : 56|56@1+ (1,0) [0|0] "" Vector__XXX
 SG_ VinTail : 112|32@1+ (1,0) [0|0] "" Vector__XXX
BO_ {pa} PROPA: 20 ENGINE
 SG_ First : 0|32@1+ (1,0) [0|0] "" Vector__XXX
 SG_ Last : 128|32@1+ (0.5,0) [0|0] "" Vector__XXX
BA_DEF_ "ProtocolType" STRING ;
BA_DEF_ BO_ "VFrameFormat" ENUM "StandardCAN","ExtendedCAN","reserved","J1939PG";
BA_DEF_DEF_ "ProtocolType" "";
BA_DEF_DEF_ "VFrameFormat" "J1939PG";
BA_ "ProtocolType" "J1939";
"""


def _j1939_dbc(tmp_path: Path) -> Path:
    path = tmp_path / "j1939.dbc"
    # DBC ids of extended frames carry bit 31; source address FE and destination FE in the file
    path.write_text(
        J1939_DBC.format(
            vi=0x80000000 | frame_id_of(0xFEEC, 0xFE), pa=0x80000000 | frame_id_of(0xEF00, 0xFE, 0xFE)
        )
    )
    return path


def _ecu(channel: str, address: int, identity: int) -> Any:
    import j1939

    ecu = j1939.ElectronicControlUnit()
    ecu.connect(interface="virtual", channel=channel)
    name = j1939.Name(
        arbitrary_address_capable=0,
        industry_group=j1939.Name.IndustryGroup.Industrial,
        vehicle_system_instance=1,
        vehicle_system=1,
        function=identity % 200,
        function_instance=1,
        ecu_instance=1,
        manufacturer_code=666,
        identity_number=identity,
    )
    ca = j1939.ControllerApplication(name, address, bypass_address_claim=True)
    ecu.add_ca(controller_application=ca)
    ca.start()
    return ecu, ca


def test_transport_sessions_of_a_real_j1939_stack_are_reassembled(tmp_path: Path) -> None:
    channel = "j1939-tp"
    signals = CanSignalMap(load_dbc(_j1939_dbc(tmp_path)), {}, include_unmapped=True, source="truck")
    src = CanBusSource(
        signals, interface="virtual", channel=channel, name="truck", j1939=True, cadence=EVERY_READ
    )
    catalog = Catalog()
    src.declare(catalog)
    src.start()
    assert src.wait_connected(5)
    sender, ca_a = _ecu(channel, 0x20, 1234567)
    receiver, ca_b = _ecu(channel, 0x30, 1234568)
    vin = b"WP0ZZZ99ZTS390000*"
    block = bytes(range(20))
    got: dict[str, GroupBatch] = {}
    try:
        sender.send_pgn(0, 0xFE, 0xEC, 6, 0x20, list(vin))  # BAM: broadcast
        time.sleep(0.5)
        sender.send_pgn(0, 0xEF, 0x30, 6, 0x20, list(block))  # RTS/CTS: 0x20 -> 0x30
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            for b in src.read(time.time_ns() + S):
                got[b.group] = b
            time.sleep(0.05)
    finally:
        for ca in (ca_a, ca_b):
            ca.stop()
        for ecu in (sender, receiver):
            ecu.disconnect()
            ecu.stop()  # its job thread
        src.close()
    vi, pa = got["truck/VI"], got["truck/PROPA"]
    head = int(vi.values[catalog.by_path("CAN.VI.VinHead").id][0])
    assert head.to_bytes(7, "little") == vin[:7]
    assert int(vi.values[catalog.by_path("CAN.VI.VinTail").id][0]).to_bytes(4, "little") == vin[14:18]
    assert int(pa.values[catalog.by_path("CAN.PROPA.First").id][0]) == int.from_bytes(block[:4], "little")
    assert (
        float(pa.values[catalog.by_path("CAN.PROPA.Last").id][0])
        == int.from_bytes(block[16:20], "little") * 0.5
    )


def _tp(t: int, frame_id: int, data: bytes) -> tuple[int, int, bytes]:
    return (t, frame_id, data)


def test_reassembler_is_bounded_and_counts_what_it_gives_up() -> None:
    bam = 0x18ECFF20
    dt = 0x1CEBFF20
    cm = bytes([32, 18, 0, 3, 0xFF, 0xEC, 0xFE, 0x00])
    frames = [
        _tp(0, bam, cm),
        _tp(10, dt, bytes([1]) + b"ABCDEFG"),
        _tp(20, dt, bytes([3]) + b"OPQR\xff\xff\xff"),  # out of order is fine
        _tp(30, dt, bytes([2]) + b"HIJKLMN"),
        _tp(40, bam, cm),  # a session that never completes: timed out
        _tp(50, dt, bytes([9]) + b"1234567"),  # sequence beyond the announced packets
        _tp(60, 0x18EC3020, bytes([16, 5, 0, 1, 1, 0, 0xEF, 0])),  # RTS with a size below 9: malformed
    ]
    r = J1939Reassembler()
    out = r.feed(FrameBatch.from_payloads(*zip(*frames, strict=True)))
    assert out.payload[0, :18].tobytes() == b"ABCDEFGHIJKLMNOPQR" and out.length.tolist() == [18]
    assert out.frame_id.tolist() == [frame_id_of(0xFEEC, 0x20)]
    r.feed(FrameBatch.from_payloads([2 * S], [0x123], [b"\x00"]))  # time passes beyond T1
    assert (r.stats.completed, r.stats.timed_out, r.stats.malformed) == (1, 1, 2)
    small = J1939Reassembler(max_sessions=2)
    small.feed(FrameBatch.from_payloads([0, 1, 2], [0x18ECFF20, 0x18ECFF21, 0x18ECFF22], [cm, cm, cm]))
    assert small.open_sessions == 2 and small.stats.overflowed == 1
