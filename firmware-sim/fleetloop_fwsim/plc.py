"""A water pump's PLC, simulated: the SKAB pump test bed's recorded values served over Modbus TCP and
OPC UA, as a real gateway would serve its sensors.

The agent's PLC sources are tested against (and the demo's PLC gateway polls) these real protocol
servers — pymodbus's and asyncua's own server implementations — so only what is on the other side of the
wire is simulated. The SKAB rows (1 Hz in the recording) advance with wall time at ``rows_per_s``; without
the recordings, comparable signals are generated.

Modbus register map (device id 1; :data:`MODBUS_MAP` says the same as data):

* holding 0-15: the 8 SKAB columns as float32, high word first (ABCD)
* holding 100-115: the same as float32, low word first (CDAB)
* input 0-7: the same × 100 as int16 (scale 0.01)
* coil 0: motor running (current > 1 A); coil 1: pressure above 0 bar
* discrete input 0: flow above 100 l/min
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import struct
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fleetloop_fwsim.child_process import free_port
from fleetloop_fwsim.signals import SKAB_COLUMNS, generate_pump_csv
from fleetloop_shared.errors import ConfigError, UnavailableError

#: (register, first address, data type, word order, scale) of each served block.
MODBUS_MAP: Final = {
    "float_abcd": ("holding", 0, "float32", "big", 1.0),
    "float_cdab": ("holding", 100, "float32", "little", 1.0),
    "int16_x100": ("input", 0, "int16", "big", 0.01),
}
COIL_MOTOR: Final = 0
COIL_PRESSURE: Final = 1
DISCRETE_FLOW: Final = 0
OPCUA_NAMESPACE: Final = "urn:fleetloop:sim:pump"


def _read_skab(path: Path, limit: int) -> list[tuple[float, ...]]:
    """The first ``limit`` rows of a SKAB-layout CSV (``;``-separated, a ``datetime`` column first)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter=";")
        header = next(reader)
        idx = [header.index(c) for c in SKAB_COLUMNS]
        return [tuple(float(r[i]) for i in idx) for r, _ in zip(reader, range(limit), strict=False)]


class SkabTable:
    """The SKAB pump rows (or generated ones), indexed by wall time."""

    def __init__(self, rows: Sequence[tuple[float, ...]], *, rows_per_s: float = 1.0, origin: str) -> None:
        if not rows:
            raise ConfigError("SKAB table: no rows")
        self.rows = list(rows)
        self.rows_per_s = float(rows_per_s)
        self.origin = origin
        self._t0: float | None = None

    def start(self) -> None:
        """Start the table's clock now (else at the first read: the log starts when someone asks)."""
        self._t0 = time.monotonic()

    @classmethod
    def load(
        cls,
        recordings: Path | None,
        *,
        rows_per_s: float = 1.0,
        limit: int = 2000,
        generated: Path | None = None,
    ) -> SkabTable:
        """Rows of ``skab/anomaly-free.csv`` under ``recordings``; without recordings, those of the
        generated pump log at ``generated`` (written there once: its load surges fire the pump's
        campaign as the real log does), else ``limit`` rows of a smooth stand-in."""
        if recordings is not None:
            path = Path(recordings) / "skab" / "anomaly-free.csv"
            return cls(_read_skab(path, limit), rows_per_s=rows_per_s, origin="recordings")
        if generated is not None:
            if not generated.is_file():
                generate_pump_csv(generated)
            return cls(_read_skab(generated, limit), rows_per_s=rows_per_s, origin="simulated")
        gen = [
            (
                0.2 + 0.01 * math.sin(i / 7),
                0.27 + 0.01 * math.cos(i / 5),
                2.1 + 0.2 * math.sin(i / 30),
                0.3 * math.sin(i / 11),
                90.0 + math.sin(i / 60),
                26.9 + 0.1 * math.sin(i / 90),
                230.0 + 5 * math.sin(i / 13),
                122.0 + 2 * math.sin(i / 17),
            )
            for i in range(limit)
        ]
        return cls(gen, rows_per_s=rows_per_s, origin="simulated")

    def index(self) -> int:
        if self._t0 is None:
            self.start()
        return int((time.monotonic() - (self._t0 or 0.0)) * self.rows_per_s) % len(self.rows)

    def current(self) -> tuple[float, ...]:
        return self.rows[self.index()]


def _words(fmt: str, value: float | int, word_order: str) -> list[int]:
    raw = struct.pack(">" + fmt, value)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return words[::-1] if word_order == "little" else words


def registers_of(row: tuple[float, ...]) -> dict[str, list[int]]:
    """The register words each block of :data:`MODBUS_MAP` holds for one SKAB row, plus the bits."""
    abcd = [w for v in row for w in _words("f", v, "big")]
    cdab = [w for v in row for w in _words("f", v, "little")]
    x100 = [w for v in row for w in _words("h", max(-32768, min(32767, round(v * 100))), "big")]
    coils = (1 if row[2] > 1.0 else 0) | ((1 if row[3] > 0.0 else 0) << 1)
    discrete = 1 if row[7] > 100.0 else 0
    return {
        "float_abcd": abcd,
        "float_cdab": cdab,
        "int16_x100": x100,
        "coils": [coils],
        "discrete": [discrete],
    }


class _LoopThread:
    """An asyncio loop on a daemon thread, for a server that must run beside synchronous code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all(), timeout_s=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


@dataclass
class _Served:
    server: Any


class ModbusPump:
    """pymodbus's TCP server on 127.0.0.1 playing :class:`SkabTable` into :data:`MODBUS_MAP`;
    stoppable and restartable on the same port (a gateway that reboots)."""

    def __init__(self, table: SkabTable, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        try:
            import pymodbus  # noqa: F401
        except ImportError:
            raise ConfigError("the Modbus pump needs pymodbus: pip install 'fleetloop[plc]'") from None
        self.table = table
        self.host = host
        self.port = port or free_port()
        self.reads = 0
        self._loop: _LoopThread | None = None
        self._served: _Served | None = None

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: Any,
    ) -> None:
        """Called by the server on every access: write the current row into the block being read."""
        self.reads += 1
        regs = registers_of(self.table.current())
        if function_code == 3:
            registers[0:16] = regs["float_abcd"]
            registers[100:116] = regs["float_cdab"]
        elif function_code == 4:
            registers[0:8] = regs["int16_x100"]
        elif function_code == 1:
            registers[0] = regs["coils"][0]
        elif function_code == 2:
            registers[0] = regs["discrete"][0]

    async def _start(self) -> _Served:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        def block(count: int, datatype: Any = DataType.REGISTERS) -> list[SimData]:
            return [SimData(address=0, count=count, values=0, datatype=datatype)]

        device = SimDevice(
            id=1,
            simdata=(block(1, DataType.BITS), block(1, DataType.BITS), block(116), block(8)),
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.host, self.port))
        await server.serve_forever(background=True)
        return _Served(server)

    def start(self) -> None:
        if self._served is not None:
            return
        self._loop = self._loop or _LoopThread("modbus-pump")
        deadline = time.monotonic() + 10
        while True:
            try:
                self._served = self._loop.call(self._start())
                return
            except OSError as exc:  # the port may linger a moment after a stop
                if time.monotonic() > deadline:
                    raise UnavailableError(f"Modbus pump: cannot listen on {self.port}: {exc}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop serving (connected clients are cut); :meth:`start` serves again on the same port."""
        if self._served is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.call(self._served.server.shutdown())
        self._served = None

    def close(self) -> None:
        self.stop()
        if self._loop is not None:
            self._loop.close()
            self._loop = None


class OpcUaPump:
    """asyncua's server on 127.0.0.1 with one variable per SKAB column under ``Objects/Pump``
    (``ns=<idx>;s=Pump.<column>``), written from :class:`SkabTable` every ``period_s``."""

    def __init__(self, table: SkabTable, *, port: int | None = None, period_s: float = 0.05) -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError:
            raise ConfigError("the OPC UA pump needs asyncua: pip install 'fleetloop[plc]'") from None
        self.table = table
        self.port = port or free_port()
        self.url = f"opc.tcp://127.0.0.1:{self.port}/fleetloop/pump"
        self.period_s = period_s
        self.namespace_index = 0
        self.writes = 0
        self._loop = _LoopThread("opcua-pump")
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def node_id(self, column: str) -> str:
        return f"ns={self.namespace_index};s=Pump.{column}"

    async def _start(self) -> None:
        from asyncua import ua
        from asyncua.server.server import Server

        server = Server()
        await server.init()
        server.set_endpoint(self.url)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(OPCUA_NAMESPACE)
        self.namespace_index = idx
        pump = await server.nodes.objects.add_object(f"ns={idx};s=Pump", f"{idx}:Pump")
        row = self.table.current()
        variables = []
        for column, value in zip(SKAB_COLUMNS, row, strict=True):
            var = await pump.add_variable(f"ns={idx};s=Pump.{column}", f"{idx}:{column}", float(value))
            variables.append(var)
        running = await pump.add_variable(f"ns={idx};s=Pump.Running", f"{idx}:Running", True)
        await server.start()
        self._server = server

        async def play() -> None:
            last = -1
            while True:
                i = self.table.index()
                if i != last:
                    last = i
                    row = self.table.rows[i]
                    for var, value in zip(variables, row, strict=True):
                        await var.write_value(float(value))
                    await running.write_value(bool(row[2] > 1.0))
                    self.writes += 1
                await asyncio.sleep(self.period_s)

        self._task = asyncio.get_running_loop().create_task(play())

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            await self._server.stop()
            self._server = None

    def start(self) -> None:
        self._loop.call(self._start(), timeout_s=30)

    def stop(self) -> None:
        self._loop.call(self._stop(), timeout_s=30)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self._loop.close()
