"""OPC UA: data-change subscriptions on a PLC's (or gateway's) variables.

The source owns an asyncio loop on its own thread, holding one session with one subscription. Every
notification carries the server's timestamp; samples keep the server's spacing but land on the device's
timeline: :class:`ServerClock` translates server time into device time with the smallest offset seen
over recent notifications (arrival by the device clock minus server time), so a PLC whose clock is off by
minutes neither reorders nor misplaces samples, and jitter in delivery does not move them. A node that
does not exist (or that the server refuses to monitor) is reported by name and counted; the other nodes
keep running. A lost session is re-established with exponential backoff and counted.

:class:`AsyncuaSession` is the only code that imports asyncua; it maps its faults into the one error tree.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from fleetloop_agent.sources.base import check_choice, first_repeat
from fleetloop_agent.sources.live import Backoff, DeviceClock, LiveSource
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, FleetloopError, UnavailableError

log = logging.getLogger("fleetloop.agent.sources")

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Notifications over which the smallest server-to-device offset is kept.
OFFSET_WINDOW: Final = 64
TIMESTAMPS: Final = ("server", "source", "device")


@dataclass(frozen=True)
class UaNode:
    """One monitored variable: its node id (``ns=2;s=Pump.Pressure``) and the signal it feeds."""

    node_id: str
    signal: str
    data_type: DataType = DataType.FLOAT64
    unit: str = ""


def datetime_ns(value: dt.datetime) -> int:
    """ns since the epoch of an OPC UA timestamp (naive values are UTC), exact to the microsecond."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // dt.timedelta(microseconds=1) * 1000


class ServerClock:
    """Server time → device time, with the smallest ``arrival - server`` offset of the last ``window``
    notifications (pure: both times passed in). The smallest is the one least delayed on the way, so
    it best estimates the clocks' difference; a window lets a drifting server clock be followed."""

    def __init__(self, window: int = OFFSET_WINDOW) -> None:
        self._offsets: deque[int] = deque(maxlen=window)
        self.offset_ns: int | None = None

    def observe(self, arrival_ns: int, server_ns: int) -> None:
        self._offsets.append(arrival_ns - server_ns)
        self.offset_ns = min(self._offsets)

    def to_device(self, server_ns: int) -> int:
        return server_ns + (self.offset_ns or 0)


def _converter(data_type: DataType) -> Callable[[Any], Any]:
    if data_type is DataType.FLOAT64:
        return float
    if data_type is DataType.INT64:
        return int
    if data_type is DataType.BOOL:
        return bool
    return str


#: ``on_value(node_id, value, server_ns or None, source_ns or None, status_good)``
OnValue = Callable[[str, Any, int | None, int | None, bool], None]


class AsyncuaSession:
    """One OPC UA session and subscription through asyncua (the only code importing it)."""

    def __init__(self, url: str, *, timeout_s: float, publishing_ms: float, sampling_ms: float) -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError:
            raise ConfigError("OPC UA needs asyncua: pip install 'fleetloop[plc]'") from None
        # asyncua logs every lost connection with a traceback; the source reports and counts these itself.
        logging.getLogger("asyncua").setLevel(logging.CRITICAL)
        self.url = url
        self.timeout_s = timeout_s
        self.publishing_ms = publishing_ms
        self.sampling_ms = sampling_ms
        self._client: Any = None
        self.lost = asyncio.Event()

    async def connect(self) -> None:
        from asyncua.client.client import Client

        client = Client(self.url, timeout=self.timeout_s, watchdog_intervall=max(0.2, self.timeout_s / 2))

        async def lost(exc: Exception) -> None:
            self.lost.set()

        client.connection_lost_callback = lost
        try:
            await client.connect()
        except (TimeoutError, OSError) as exc:
            raise UnavailableError(f"OPC UA server {self.url}: {exc or type(exc).__name__}") from None
        except Exception as exc:  # asyncua's protocol errors (UaError and friends)
            raise UnavailableError(f"OPC UA server {self.url}: {type(exc).__name__}: {exc}") from None
        self._client = client
        self.lost.clear()

    async def subscribe(self, node_ids: Sequence[str], on_value: OnValue) -> dict[str, str]:
        """Monitor ``node_ids``; {node id: why not} for each node the server refused (others run)."""
        from asyncua import ua

        refused: dict[str, str] = {}
        parsed = {}
        for nid in node_ids:
            try:
                parsed[nid] = ua.NodeId.from_string(nid)
            except Exception as exc:
                refused[nid] = f"not a node id: {exc}"
        by_node = {node_id: nid for nid, node_id in parsed.items()}

        class Handler:
            def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                value = data.monitored_item.Value
                server = value.ServerTimestamp
                source = value.SourceTimestamp
                good = value.StatusCode is None or value.StatusCode.is_good()
                on_value(
                    by_node.get(node.nodeid, str(node.nodeid)),
                    val,
                    datetime_ns(server) if server is not None else None,
                    datetime_ns(source) if source is not None else None,
                    good,
                )

            def status_change_notification(self, status: Any) -> None:
                pass

        try:
            subscription = await self._client.create_subscription(self.publishing_ms, Handler())
            nodes = [self._client.get_node(parsed[nid]) for nid in parsed]
            results = await subscription.subscribe_data_change(nodes, sampling_interval=self.sampling_ms)
        except (TimeoutError, OSError, ConnectionError) as exc:
            raise UnavailableError(f"OPC UA server {self.url}: {exc or type(exc).__name__}") from None
        for nid, result in zip(parsed, results, strict=True):
            if isinstance(result, ua.StatusCode):
                refused[nid] = f"{result.name}: {result.doc}" if result.doc else str(result.name)
        return refused

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), self.timeout_s)
            except Exception as exc:  # a session already gone cannot be closed politely
                log.debug("OPC UA disconnect from %s: %s", self.url, exc)


class OpcUaSource(LiveSource):
    """Variables of one OPC UA server, each its own group, stamped through :class:`ServerClock`."""

    def __init__(
        self,
        name: str,
        url: str,
        nodes: Sequence[UaNode],
        *,
        clock: DeviceClock | None = None,
        timestamps: str = "server",
        publishing_ms: float = 100.0,
        sampling_ms: float = 50.0,
        timeout_s: float = 4.0,
        backoff: Backoff | None = None,
        queue_samples: int = 1_000_000,
        origin: str = "live",
    ) -> None:
        super().__init__(name, clock=clock, queue_samples=queue_samples, origin=origin)
        if not nodes:
            raise ConfigError(f"source {name!r}: no nodes to subscribe to")
        check_choice(name, "timestamps", timestamps, TIMESTAMPS)
        twice = first_repeat([n.node_id for n in nodes])
        if twice is not None:
            raise ConfigError(f"source {name!r}: node {twice!r} is mapped twice")
        self.url = url
        self.nodes = list(nodes)
        self.timestamps = timestamps
        self._session_args = {
            "timeout_s": timeout_s,
            "publishing_ms": publishing_ms,
            "sampling_ms": sampling_ms,
        }
        self._backoff = backoff or Backoff(0.2, 30.0)
        self.server_clock = ServerClock()
        self._slots: dict[str, tuple[str, tuple[int, ...], Callable[[Any], Any]]] = {}
        #: node id → why the server would not monitor it (from the latest subscription)
        self.node_errors: dict[str, str] = {}
        self.connected = False
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._astop: asyncio.Event | None = None

    def _declare(self, catalog: Catalog) -> None:
        for n in self.nodes:
            spec = catalog.add(n.signal, n.data_type, n.unit)
            self.queue.dtypes[spec.id] = n.data_type.numpy_dtype
            self._slots[n.node_id] = (f"{self.name}/{n.signal}", (spec.id,), _converter(n.data_type))

    # -- notifications (on the source's loop) -----------------------------------------------------------
    def _on_value(
        self, node_id: str, value: Any, server_ns: int | None, source_ns: int | None, good: bool
    ) -> None:
        slot = self._slots.get(node_id)
        if slot is None:
            return
        group, ids, convert = slot
        if not good:
            self._error(f"status:{node_id}", f"node {node_id}: value with a bad status, dropped")
            return
        try:
            converted = convert(value)
        except (TypeError, ValueError) as exc:
            self._error(
                f"value:{node_id}", f"node {node_id}: value {value!r} is not a {convert.__name__}: {exc}"
            )
            return
        arrival = self.clock.now_ns()
        stamp = (
            server_ns if self.timestamps == "server" else source_ns if self.timestamps == "source" else None
        )
        if stamp is None:
            t_ns = arrival
        else:
            self.server_clock.observe(arrival, stamp)
            t_ns = self.server_clock.to_device(stamp)
        self.queue.put(group, ids, [t_ns], [[converted]])

    # -- the session loop --------------------------------------------------------------------------------
    def _wake(self) -> None:
        loop, stop = self._aloop, self._astop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._aloop = asyncio.get_running_loop()
        self._astop = asyncio.Event()
        if self._stop.is_set():
            return
        ever = False
        while not self._astop.is_set():
            session = AsyncuaSession(self.url, **self._session_args)
            try:
                await session.connect()
                self.node_errors = await session.subscribe([n.node_id for n in self.nodes], self._on_value)
                for node_id, why in self.node_errors.items():
                    signal = next(n.signal for n in self.nodes if n.node_id == node_id)
                    self._error(f"node:{node_id}", f"node {node_id} ({signal}) not monitored: {why}")
                self.connected = True
                self._backoff.reset()
                if ever:
                    self.counters.reconnects += 1
                    log.info("source %s: reconnected to %s", self.name, self.url)
                ever = True
                await _first(self._astop.wait(), session.lost.wait())
                if not self._astop.is_set():
                    self._error("connection", f"connection to {self.url} lost")
            except FleetloopError as exc:
                self._error("connect", f"cannot subscribe: {exc}")
            finally:
                self.connected = False
                await session.close()
            if not self._astop.is_set():
                await _first(self._astop.wait(), asyncio.sleep(self._backoff.next_delay()))


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
