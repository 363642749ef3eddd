"""OBD-II (SAE J1979) service 01 parameters as plain data: how many bytes each PID's answer has and the
linear formula from those bytes to a value, plus the "supported PIDs" bitmaps and service 09's VIN.

The agent decodes with this table; firmware-sim's ECU encodes with it, so both sides of a test read the
same standard. Only PIDs whose value is one linear function of an unsigned big-endian integer are here
(speed, engine speed, temperatures, pressures, trims, ...): enough to watch a vehicle, and each exact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

#: Service 01 (current data) request and its positive response.
SERVICE_CURRENT: Final = 0x01
#: Service 09 (vehicle information) request; PID 02 is the VIN.
SERVICE_VEHICLE_INFO: Final = 0x09
PID_VIN: Final = 0x02
POSITIVE: Final = 0x40
NEGATIVE: Final = 0x7F
#: PIDs answering which of the next 32 PIDs are supported.
SUPPORT_PIDS: Final = (0x00, 0x20, 0x40, 0x60, 0x80, 0xA0, 0xC0)
#: At most this many PIDs in one service 01 request (SAE J1979).
MAX_PIDS_PER_REQUEST: Final = 6


@dataclass(frozen=True)
class Pid:
    """``value = int.from_bytes(data[:size], "big") * scale + offset`` in ``unit``."""

    pid: int
    name: str
    size: int
    scale: float
    offset: float
    unit: str
    path: str

    def decode(self, data: bytes) -> float:
        return int.from_bytes(data[: self.size], "big") * self.scale + self.offset

    def encode(self, value: float) -> bytes:
        raw = round((value - self.offset) / self.scale)
        raw = min(max(raw, 0), (1 << (8 * self.size)) - 1)
        return raw.to_bytes(self.size, "big")


_TRIM = 100 / 128
PIDS: Final[Mapping[int, Pid]] = {
    p.pid: p
    for p in (
        Pid(0x04, "ENGINE_LOAD", 1, 100 / 255, 0, "%", "Vehicle.OBD.EngineLoad"),
        Pid(0x05, "COOLANT_TEMP", 1, 1, -40, "celsius", "Vehicle.OBD.CoolantTemperature"),
        Pid(0x06, "SHORT_FUEL_TRIM_1", 1, _TRIM, -100, "%", "Vehicle.OBD.ShortTermFuelTrim1"),
        Pid(0x07, "LONG_FUEL_TRIM_1", 1, _TRIM, -100, "%", "Vehicle.OBD.LongTermFuelTrim1"),
        Pid(0x08, "SHORT_FUEL_TRIM_2", 1, _TRIM, -100, "%", "Vehicle.OBD.ShortTermFuelTrim2"),
        Pid(0x09, "LONG_FUEL_TRIM_2", 1, _TRIM, -100, "%", "Vehicle.OBD.LongTermFuelTrim2"),
        Pid(0x0A, "FUEL_PRESSURE", 1, 3, 0, "kPa", "Vehicle.OBD.FuelPressure"),
        Pid(0x0B, "INTAKE_PRESSURE", 1, 1, 0, "kPa", "Vehicle.OBD.MAP"),
        Pid(0x0C, "RPM", 2, 0.25, 0, "rpm", "Vehicle.OBD.EngineSpeed"),
        Pid(0x0D, "SPEED", 1, 1, 0, "km/h", "Vehicle.OBD.Speed"),
        Pid(0x0E, "TIMING_ADVANCE", 1, 0.5, -64, "degrees", "Vehicle.OBD.TimingAdvance"),
        Pid(0x0F, "INTAKE_TEMP", 1, 1, -40, "celsius", "Vehicle.OBD.IntakeTemp"),
        Pid(0x10, "MAF", 2, 0.01, 0, "g/s", "Vehicle.OBD.MAF"),
        Pid(0x11, "THROTTLE_POS", 1, 100 / 255, 0, "%", "Vehicle.OBD.ThrottlePosition"),
        Pid(0x1F, "RUN_TIME", 2, 1, 0, "s", "Vehicle.OBD.RunTime"),
        Pid(0x21, "DISTANCE_W_MIL", 2, 1, 0, "km", "Vehicle.OBD.DistanceWithMIL"),
        Pid(0x2C, "COMMANDED_EGR", 1, 100 / 255, 0, "%", "Vehicle.OBD.CommandedEGR"),
        Pid(0x2F, "FUEL_LEVEL", 1, 100 / 255, 0, "%", "Vehicle.OBD.FuelLevel"),
        Pid(0x31, "DISTANCE_SINCE_DTC_CLEAR", 2, 1, 0, "km", "Vehicle.OBD.DistanceSinceDTCClear"),
        Pid(0x33, "BAROMETRIC_PRESSURE", 1, 1, 0, "kPa", "Vehicle.OBD.BarometricPressure"),
        Pid(0x42, "CONTROL_MODULE_VOLTAGE", 2, 0.001, 0, "V", "Vehicle.OBD.ControlModuleVoltage"),
        Pid(0x45, "RELATIVE_THROTTLE_POS", 1, 100 / 255, 0, "%", "Vehicle.OBD.RelativeThrottlePosition"),
        Pid(0x46, "AMBIENT_AIR_TEMP", 1, 1, -40, "celsius", "Vehicle.OBD.AmbientAirTemperature"),
        Pid(0x49, "ACCELERATOR_POS_D", 1, 100 / 255, 0, "%", "Vehicle.OBD.AcceleratorPositionD"),
        Pid(0x5C, "OIL_TEMP", 1, 1, -40, "celsius", "Vehicle.OBD.OilTemperature"),
        Pid(0x5E, "FUEL_RATE", 2, 0.05, 0, "l/h", "Vehicle.OBD.FuelRate"),
    )
}
BY_NAME: Final[Mapping[str, Pid]] = {p.name: p for p in PIDS.values()}
VIN_PATH: Final = "Vehicle.VehicleIdentification.VIN"


def support_bitmap(base: int, supported: Collection[int]) -> bytes:
    """The 4-byte answer to support PID ``base``: bit 31 is PID ``base + 1``, bit 0 is ``base + 0x20``."""
    bits = 0
    for pid in supported:
        if base < pid <= base + 0x20:
            bits |= 1 << (0x20 - (pid - base))
    return bits.to_bytes(4, "big")


def supported_from(base: int, bitmap: bytes) -> set[int]:
    """The PIDs a support answer declares (including ``base + 0x20``, the next bitmap, when set)."""
    bits = int.from_bytes(bitmap[:4], "big")
    return {base + k for k in range(1, 0x21) if bits & (1 << (0x20 - k))}


def parse_current_data(payload: bytes) -> dict[int, bytes]:
    """``{pid: data}`` of a service 01 positive response (``41 PID data [PID data ...]``).

    Parsing stops at a PID of unknown size (nothing after it can be placed); support-bitmap PIDs are 4
    bytes."""
    out: dict[int, bytes] = {}
    if not payload or payload[0] != SERVICE_CURRENT + POSITIVE:
        return out
    k = 1
    while k < len(payload):
        pid = payload[k]
        size = 4 if pid in SUPPORT_PIDS else PIDS[pid].size if pid in PIDS else None
        if size is None or k + 1 + size > len(payload):
            break
        out[pid] = payload[k + 1 : k + 1 + size]
        k += 1 + size
    return out


def parse_vin(payload: bytes) -> str | None:
    """The VIN of a service 09 PID 02 answer (``49 02 NN`` + 17 characters), or None."""
    if len(payload) < 3 + 17 or payload[0] != SERVICE_VEHICLE_INFO + POSITIVE or payload[1] != PID_VIN:
        return None
    text = payload[3 : 3 + 17].decode("ascii", errors="replace")
    return text.strip("\x00 ")
