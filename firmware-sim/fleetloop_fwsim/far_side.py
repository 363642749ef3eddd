"""The far side of each demo machine's bus: what a car's, a robot's, a PLC gateway's and a home hub's
agent would be wired to, simulated, so the agent runs exactly as it would on the machine.

* **car** — a CAN network across processes (python-can-remote's server, :mod:`~fleetloop_fwsim.can_network`)
  that the car's ECU drives with the comma2k19 drive's bus-0 frames (or the generated car's), and on the
  same bus an engine ECU answering OBD-II over ISO-TP (:mod:`~fleetloop_fwsim.obd_ecu`) whose speed and
  engine speed are those of the frames being played;
* **plc** — pymodbus's Modbus TCP server playing the SKAB pump (:mod:`~fleetloop_fwsim.plc`);
* **robot** — the robot's controller pushing its IMU into the agent's push API
  (:mod:`~fleetloop_fwsim.robot`);
* **hub** — the house's own mosquitto with zigbee2mqtt-shaped devices on it (:mod:`~fleetloop_fwsim.hub`).

:func:`start_far_side` starts one and returns the agent's ``sources:`` entries that reach it: what an
integrator writes from docs/sources.md, pointing at this machine's endpoints. :func:`serve` runs one as its
own process (``fleetloop sim far-side``), announces it in a ready file, and stops it on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import numpy as np

from fleetloop_fwsim import hub, plc, profiles, robot
from fleetloop_fwsim.can_network import CanPlayer, RemoteCanServer
from fleetloop_fwsim.gnss import GNSS_DBC, GNSS_MAPPING, gnss_frames
from fleetloop_fwsim.obd_ecu import IsoTpEcu, ObdEcu, drive_values
from fleetloop_fwsim.signals import SIM_VEHICLE_DBC, SKAB_COLUMNS, generate_vehicle_can
from fleetloop_shared.choices import check_choice
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError

log = logging.getLogger(__name__)

KINDS: Final = ("car", "robot", "plc", "hub")
#: OBD-II PIDs the car's agent polls (seconds): speed and engine speed follow the drive.
OBD_PIDS: Final = {"SPEED": 0.5, "RPM": 0.5, "COOLANT_TEMP": 5.0, "ENGINE_LOAD": 1.0}
#: The car's agent asks for the VIN this often (s), so every capture window holds it.
VIN_EVERY_S: Final = 2.0
#: The car's CAN sources decode at least this often (s): a demo shows its data within a second, at
#: more CPU per frame than the agent's default cadence (4,096 frames or 10 s; decision 0035).
DEMO_DECODE_WAIT_S: Final = 1.0
_OBD_SPEED, _OBD_RPM = 0x0D, 0x0C
_SPEED_PATH, _RPM_PATH = "Vehicle.Speed", "Vehicle.Powertrain.CombustionEngine.Speed"
#: A filter no frame matches: the player's connection only sends, so the server gives it nothing back.
_SEND_ONLY: Final = [{"can_id": 0x1FFFFFFF, "can_mask": 0x1FFFFFFF, "extended": True}]


@dataclass
class FarSide:
    """One machine's far side, running."""

    kind: str
    #: "recordings" or "simulated": what it plays.
    data: str
    #: The agent's ``sources:`` entries that reach it.
    sources: list[dict[str, Any]]
    #: One line for a person: what is on the other side of the bus.
    description: str
    _stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        """Stop every part, the last started first; a part that fails to stop does not keep the others
        running (it is logged)."""
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception as exc:  # a client whose server is gone already, and the like
                log.warning(
                    "%s far side: stopping %s: %s", self.kind, getattr(stop, "__qualname__", stop), exc
                )
        self._stops.clear()


def start_far_side(
    kind: str, workdir: Path, *, recordings: Path | None, speed: float = 1.0, socket: Path | None = None
) -> FarSide:
    """Start the far side of a machine of ``kind``; generated stand-ins (kept in ``workdir``) when
    ``recordings`` is None. ``socket``: the robot's push-API socket (default ``workdir/push.sock``)."""
    check_choice(kind, KINDS, "machine kind")
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "car":
        return _car(workdir, recordings, speed)
    if kind == "plc":
        return _plc(workdir, recordings, speed)
    if kind == "robot":
        return _robot(workdir, recordings, speed, socket or workdir / "push.sock")
    return _hub(workdir, speed)


def _drive(
    workdir: Path, recordings: Path | None
) -> tuple[list[tuple[int, int, bytes]], Path, dict[str, str]]:
    """Bus 0 of the drive — (t_ns, id, payload) — with its DBC and the catalog mapping."""
    from fleetloop_agent.recordings import read_can_frames

    if recordings is not None:
        raw = comma2k19_segment(recordings) / "processed_log" / "CAN" / "raw_can"
        dbc, mapping = recordings / "opendbc" / "toyota_rav4_2017_pt_generated.dbc", profiles.TOYOTA_MAPPING
    else:
        raw, dbc, mapping = workdir / "vehicle_can", SIM_VEHICLE_DBC, profiles.SIM_MAPPING
        if not profiles.frames_complete(raw):
            generate_vehicle_can(raw)
    frames = read_can_frames(raw)
    if frames is None:
        raise ConfigError(f"{raw}: not a CAN frames directory")
    rows = np.flatnonzero(frames.bus == 0).tolist()
    return [(int(frames.t_ns[i]), int(frames.frame_id[i]), frames.data[i]) for i in rows], dbc, dict(mapping)


def _obd_values(
    frames: list[tuple[int, int, bytes]], dbc: Path, mapping: dict[str, str]
) -> Callable[[float], dict[int, float]]:
    """What the engine ECU reports at a drive position (seconds): its speed (km/h) and engine speed
    (rpm) those of the frames, decoded through the car's DBC; the rest a steady warm engine."""
    wanted = {path: key.split(".", 1) for key, path in mapping.items() if path in (_SPEED_PATH, _RPM_PATH)}
    decoder = load_dbc(dbc).decoder({message for message, _ in wanted.values()})
    t0 = frames[0][0]
    series: dict[str, tuple[list[float], list[float]]] = {path: ([], []) for path in wanted}
    for t, frame_id, data in frames:
        decoded = decoder.decode(frame_id, data)
        if decoded is None:
            continue
        for path, (message, signal_name) in wanted.items():
            if decoded[0] == message:
                series[path][0].append((t - t0) / 1e9)
                series[path][1].append(float(decoded[1][signal_name]))
    arrays = {p: (np.asarray(ts), np.asarray(vs)) for p, (ts, vs) in series.items() if ts}

    def values(position_s: float) -> dict[int, float]:
        out = drive_values(position_s)
        for pid, path in ((_OBD_SPEED, _SPEED_PATH), (_OBD_RPM, _RPM_PATH)):
            if path in arrays:
                ts, vs = arrays[path]
                out[pid] = max(0.0, float(np.interp(position_s, ts, vs)))
        return out

    return values


def _car(workdir: Path, recordings: Path | None, speed: float) -> FarSide:
    import can

    frames, dbc, mapping = _drive(workdir, recordings)
    server = RemoteCanServer(channel="car", log=workdir / "can-server.log", own_session=True).start()
    side = FarSide("car", "recordings" if recordings is not None else "simulated", [], "", [server.stop])
    try:
        player_bus = can.Bus(interface="remote", channel=server.url, can_filters=_SEND_ONLY)
        side._stops.append(player_bus.shutdown)
        fixes = gnss_frames(recordings, frames[0][0], frames[-1][0])
        bus = sorted(frames + fixes, key=lambda f: f[0])
        player = CanPlayer(player_bus, bus, speed=speed, loops=0).start()
        side._stops.append(player.stop)
        requests = [{"can_id": i, "can_mask": 0x7FF, "extended": False} for i in (0x7DF, 0x7E0)]
        ecu_bus = can.Bus(interface="remote", channel=server.url, can_filters=requests)
        side._stops.append(ecu_bus.shutdown)
        values = _obd_values(frames, dbc, mapping)
        ecu = IsoTpEcu(ecu_bus, ObdEcu(values=lambda _t: values(player.position_s()))).start()
        side._stops.append(ecu.stop)
    except BaseException:
        side.stop()
        raise
    rate = len(frames) / max(1e-9, (frames[-1][0] - frames[0][0]) / 1e9) * speed
    drive = "the comma2k19 drive" if recordings is not None else "the generated drive"
    side.sources = [
        {
            "kind": "can",
            "name": "can0",
            "interface": "remote",
            "channel": server.url,
            "dbc": str(dbc),
            "mapping": mapping,
            "decode_wait": DEMO_DECODE_WAIT_S,
        },
        {
            "kind": "can",
            "name": "gnss",
            "interface": "remote",
            "channel": server.url,
            "dbc": str(GNSS_DBC),
            "mapping": dict(GNSS_MAPPING),
            "decode_wait": DEMO_DECODE_WAIT_S,
        },
        {
            "kind": "obd",
            "name": "obd",
            "transport": "isotp",
            "interface": "remote",
            "channel": server.url,
            "pids": dict(OBD_PIDS),
            "vin_every": VIN_EVERY_S,
            "timeout": 1.0,
        },
    ]
    side.description = (
        f"CAN bus {server.url} driven by the ECU playing {drive} (bus 0, {rate:,.0f} frames/s) "
        f"+ its GNSS fixes ({len(fixes) / max(1e-9, (frames[-1][0] - frames[0][0]) / 1e9):.0f} Hz) "
        "+ OBD-II over ISO-TP from the engine ECU (7E0/7E8, the VIN every few seconds)"
    )
    return side


def _plc(workdir: Path, recordings: Path | None, speed: float) -> FarSide:
    table = plc.SkabTable.load(recordings, rows_per_s=speed, generated=workdir / "pump.csv")
    pump = plc.ModbusPump(table)
    pump.start()
    register, first, data_type, order, _ = plc.MODBUS_MAP["float_abcd"]
    tags: dict[str, dict[str, Any]] = {}
    for column, (path, unit) in profiles.PUMP_COLUMNS.items():
        tags[path] = {
            "register": register,
            "address": first + 2 * SKAB_COLUMNS.index(column),
            "type": data_type,
            "word_order": order,
            "unit": unit,
        }
    tags["Plant.Pump.Running"] = {"register": "coil", "address": plc.COIL_MOTOR}
    source = {
        "kind": "modbus_tcp",
        "name": "pump",
        "host": pump.host,
        "port": pump.port,
        "device_id": 1,
        "poll_ms": 250,
        "tags": tags,
    }
    what = "SKAB pump" if recordings is not None else "generated pump"
    return FarSide(
        "plc",
        table.origin,
        [source],
        f"Modbus TCP {pump.host}:{pump.port} (pymodbus server playing the {what}, {speed:g} rows/s)",
        [pump.close],
    )


def _robot(workdir: Path, recordings: Path | None, speed: float, socket: Path) -> FarSide:
    t, columns, origin = robot.load_imu(recordings, workdir / "imu.csv")
    publisher = robot.ImuPublisher(socket, t, columns, speed=speed).start()
    what = "x-io IMU recording" if recordings is not None else "generated IMU"
    rate = len(t) / max(1e-9, float(t[-1])) * speed
    return FarSide(
        "robot",
        origin,
        [robot.push_source(socket)],
        f"push API {socket} (the robot's controller publishing the {what}, {rate:,.0f} rows/s)",
        [publisher.stop],
    )


def _hub(workdir: Path, speed: float) -> FarSide:
    broker = hub.HubBroker(workdir / "broker")
    broker.start()
    try:
        scene = hub.HomeScene(broker.host, broker.port, speed=speed).start()
    except BaseException:
        broker.stop()
        raise
    return FarSide(
        "hub",
        "simulated",
        [hub.hub_source(broker.host, broker.port)],
        f"mosquitto {broker.host}:{broker.port} (zigbee2mqtt: 4 devices, Home Assistant discovery)",
        [broker.stop, scene.stop],
    )


def serve(
    kind: str,
    workdir: Path,
    ready_file: Path,
    *,
    recordings: Path | None,
    speed: float = 1.0,
    socket: Path | None = None,
) -> int:
    """Run one far side until SIGTERM/SIGINT; once it listens, write ``ready_file`` (JSON: kind, data,
    sources, description)."""
    done = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    side = start_far_side(kind, workdir, recordings=recordings, speed=speed, socket=socket)
    try:
        tmp = ready_file.with_suffix(".tmp")
        document = {"kind": kind, "data": side.data, "sources": side.sources, "description": side.description}
        tmp.write_text(json.dumps(document))
        tmp.replace(ready_file)
        while not done.wait(0.5):
            pass
    finally:
        side.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0
