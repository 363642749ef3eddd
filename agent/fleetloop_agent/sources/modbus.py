"""Modbus TCP: a PLC gateway's tags polled on their intervals, stamped with the device clock.

The poller runs on the source's own thread. Each poll group (see :mod:`.modbus_map`) is polled when due
with its planned requests; a poll is all or nothing (one timestamp for the group), so a poll with any
failed request is a *missed poll*, as is every due time that passes while the server is away or a slow
poll is still running. A lost connection is re-established with exponential backoff and counted.

The poller talks to the device through :class:`ModbusClient`, one narrow interface: the pymodbus adapter
(:class:`PymodbusClient`, the only code here that imports pymodbus, mapping its errors into the one error
tree) and an in-memory fake (:class:`MemoryModbusClient`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from fleetloop_agent.sources.live import Backoff, DeviceClock, LiveSource, PollSchedule
from fleetloop_agent.sources.modbus_map import BIT_TYPES, PollGroup, ReadRequest, Tag, poll_groups
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError, FleetloopError, StateError, UnavailableError

log = logging.getLogger("fleetloop.agent.sources")

#: Modbus exception codes (application protocol 1.1b3, section 7) and what they say.
EXCEPTION_CODES: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusClient(Protocol):
    """What the poller needs of a Modbus connection."""

    def connect(self) -> None:
        """Open the connection; UnavailableError when the server cannot be reached."""

    def read(self, request: ReadRequest) -> Sequence[int] | Sequence[bool]:
        """The registers or bits of one request. UnavailableError: the connection is gone (reconnect);
        StateError: the device answered with an exception (the connection stays)."""

    def close(self) -> None: ...


def _refused(request: ReadRequest, code: int) -> StateError:
    what = EXCEPTION_CODES.get(code, "unknown exception")
    hint = " (a hole in the device's map? set max_gap)" if code == 2 else ""
    return StateError(f"{request.describe()}: the device refused the read: {what} (exception {code}){hint}")


class PymodbusClient:
    """:class:`ModbusClient` over pymodbus's synchronous TCP client (its own retries and reconnects off:
    the poller counts and paces those)."""

    def __init__(self, host: str, port: int, *, timeout_s: float) -> None:
        try:
            from pymodbus.client import ModbusTcpClient
        except ImportError:
            raise ConfigError("Modbus TCP needs pymodbus: pip install 'fleetloop[plc]'") from None
        # pymodbus logs every connection fault with a packet dump at ERROR; the poller reports (rate-limited)
        # and counts these itself, so the library's own log is kept to what would be a bug.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.target = f"{host}:{port}"
        self._client = ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0)

    def connect(self) -> None:
        try:
            ok = self._client.connect()  # type: ignore[no-untyped-call]
        except Exception as exc:  # pymodbus raises several kinds; all mean "not reachable now"
            raise UnavailableError(f"Modbus server {self.target}: {exc}") from None
        if not ok:
            raise UnavailableError(f"Modbus server {self.target}: connection refused or timed out")

    def read(self, request: ReadRequest) -> Sequence[int] | Sequence[bool]:
        from pymodbus.exceptions import ModbusException

        c = self._client
        fn = {
            "holding": c.read_holding_registers,
            "input": c.read_input_registers,
            "coil": c.read_coils,
            "discrete": c.read_discrete_inputs,
        }[request.register]
        try:
            response = fn(request.address, count=request.count, device_id=request.device_id)
        except (ModbusException, OSError) as exc:
            raise UnavailableError(f"Modbus server {self.target}: {request.describe()}: {exc}") from None
        if response.isError():
            raise _refused(request, int(getattr(response, "exception_code", 0)))
        return list(response.bits) if request.register in BIT_TYPES else list(response.registers)

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


class MemoryModbusClient:
    """An in-memory Modbus device: ``values[(register, device_id, address)]`` → register word or bit;
    addresses not set are refused (exception 2); ``reachable = False`` takes the server away."""

    def __init__(self, values: Mapping[tuple[str, int, int], int | bool] | None = None) -> None:
        self.values: dict[tuple[str, int, int], int | bool] = dict(values or {})
        self.reachable = True
        self.connected = False
        self.requests = 0
        self._lock = threading.Lock()

    def connect(self) -> None:
        if not self.reachable:
            raise UnavailableError("memory Modbus device: unreachable")
        self.connected = True

    def read(self, request: ReadRequest) -> Sequence[int] | Sequence[bool]:
        with self._lock:
            if not (self.reachable and self.connected):
                self.connected = False
                raise UnavailableError("memory Modbus device: connection lost")
            self.requests += 1
            out = []
            for a in range(request.address, request.address + request.count):
                key = (request.register, request.device_id, a)
                if key not in self.values:
                    raise _refused(request, 2)
                out.append(self.values[key])
            return out

    def close(self) -> None:
        self.connected = False


class ModbusSource(LiveSource):
    """Tags of one Modbus TCP server (or gateway: ``device_id`` per tag), polled on their intervals."""

    def __init__(
        self,
        name: str,
        client: ModbusClient,
        tags: Sequence[Tag],
        *,
        clock: DeviceClock | None = None,
        max_registers: int = 125,
        max_bits: int = 2000,
        max_gap: int | None = None,
        backoff: Backoff | None = None,
        queue_samples: int = 1_000_000,
        origin: str = "live",
    ) -> None:
        super().__init__(name, clock=clock, queue_samples=queue_samples, origin=origin)
        if not tags:
            raise ConfigError(f"source {name!r}: no tags to poll")
        self.client = client
        self.groups: list[PollGroup] = poll_groups(
            tags, source=name, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap
        )
        self._backoff = backoff or Backoff(0.2, 30.0)
        self._ids: dict[str, tuple[int, ...]] = {}
        self.connected = False
        #: requests per poll, over all groups (what the planner achieved)
        self.requests_per_cycle = sum(len(g.requests) for g in self.groups)

    def _declare(self, catalog: Catalog) -> None:
        for g in self.groups:
            ids = []
            for t in g.tags:
                spec = catalog.add(t.signal, t.catalog_type, t.unit)
                ids.append(spec.id)
                self.queue.dtypes[spec.id] = t.catalog_type.numpy_dtype
            self._ids[g.key] = tuple(ids)

    def poll(self, group: PollGroup) -> bool:
        """Poll one group now; False when the connection was lost on the way."""
        t_ns = self.clock.now_ns()
        values: list[Any] = [None] * len(group.tags)
        try:
            for request in group.requests:
                for pos, value in zip(request.tags, request.decode(self.client.read(request)), strict=True):
                    values[pos] = value
        except UnavailableError as exc:
            self.counters.missed_polls += 1
            self._error("connection", f"connection lost: {exc}")
            return False
        except FleetloopError as exc:
            self.counters.missed_polls += 1
            self._error(f"refused:{group.key}", str(exc))
            return True
        self.queue.put(group.key, self._ids[group.key], [t_ns], [[v] for v in values])
        return True

    def _connect(self, ever: bool) -> bool:
        try:
            self.client.connect()
        except UnavailableError as exc:
            self._error("connect", f"cannot connect: {exc}")
            return False
        self._backoff.reset()
        if ever:
            self.counters.reconnects += 1
            log.info("source %s: reconnected", self.name)
        return True

    def _run(self) -> None:
        mono = time.monotonic_ns
        schedules = [PollSchedule(g.poll_ns, mono()) for g in self.groups]
        ever_connected = False
        retry_at = 0
        try:
            while not self._stop.is_set():
                now = mono()
                if not self.connected and now >= retry_at:
                    self.connected = self._connect(ever_connected)
                    ever_connected = ever_connected or self.connected
                    if not self.connected:
                        retry_at = mono() + int(self._backoff.next_delay() * 1e9)
                for group, schedule in zip(self.groups, schedules, strict=True):
                    if not schedule.is_due(mono()):
                        continue
                    if self.connected:
                        if not self.poll(group):
                            self.connected = False
                            self.client.close()
                            retry_at = mono() + int(self._backoff.next_delay() * 1e9)
                    else:
                        self.counters.missed_polls += 1
                    self.counters.missed_polls += schedule.advance(mono())
                wake = min(s.due_ns for s in schedules)
                if not self.connected:
                    wake = min(wake, retry_at)
                delay = (wake - mono()) / 1e9
                if delay > 0:
                    self._stop.wait(delay)
        finally:
            self.client.close()
            self.connected = False
