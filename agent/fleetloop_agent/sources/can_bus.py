"""A live CAN bus through python-can: SocketCAN on a vehicle computer, or any other python-can interface
(a USB adapter, python-can's virtual bus, a remote bus over TCP).

python-can is imported here when a bus is opened (and, for ISO-TP and BLF files, in :mod:`.obd_link`
and :mod:`fleetloop_agent.recordings.blf`). A receive thread takes frames off the bus and stamps each
with the device clock as it arrives; ``read()`` drains them through the bounded
:class:`~fleetloop_agent.sources.live.FrameQueue` (drop-oldest, counted) and decodes them all at once
(:class:`~fleetloop_agent.sources.can_signals.CanSignalMap`) when its
:class:`~fleetloop_agent.sources.can_signals.DecodeCadence` says enough frames are pending or the
oldest has waited long enough (a batch costs a fixed ~25 µs: decoding every 0.1 s tick wastes most).
When the bus fails — the interface goes down, the adapter is unplugged, the remote end closes — the
thread closes it, counts the error, and opens it again after a growing backoff, counting the reconnect;
frames already queued are still delivered, so nothing captured before the failure is lost. Error
frames and undecodable frames are counted, never raised.

The kernel (or the adapter) is told which ids to deliver — the DBC's chosen messages, J1939 messages by
PGN, and the transport protocol's frames when reassembly is on — so a busy bus costs little for the
frames nobody asked for.
"""

from __future__ import annotations

import json
import logging
import select
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from fleetloop_agent.sources import can_remote
from fleetloop_agent.sources.base import LIVE, GroupAccumulator, check_choice
from fleetloop_agent.sources.can_signals import DEFAULT_CADENCE, CanSignalMap, DecodeCadence
from fleetloop_agent.sources.j1939 import TP_CM, TP_DT, J1939Reassembler
from fleetloop_agent.sources.live import (
    DEFAULT_QUEUE_FRAMES,
    Backoff,
    ConnectionSource,
    DeviceClock,
    FrameQueue,
    SourceCounters,
    SystemClock,
)
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.dbc import j1939_pgn
from fleetloop_shared.errors import StateError
from fleetloop_shared.samples import GroupBatch

log = logging.getLogger("fleetloop.agent.sources")

#: How long one ``recv`` waits before the thread looks at its stop flag again.
RECV_TIMEOUT_S: Final = 0.2
#: Bytes one read of a remote bus's socket takes at most (~2,000 classic frames).
RECV_BYTES: Final = 64 * 1024
#: Pause after each read of a remote bus, so that the next takes what arrived meanwhile at once: at 3,500
#: frames/s a dozen frames per wakeup instead of one. Receive stamps are late by at most this much
#: (frames keep their spacing on the bus), which ``timestamps: bus`` avoids.
REMOTE_PAUSE_S: Final = 0.005
TIMESTAMPS: Final = ("receive", "bus")
FD_WIDTH: Final = 64

#: Opens the bus: ``(interface, channel, options) -> python-can bus``.
BusFactory = Callable[[str, str, Mapping[str, Any]], Any]


def interfaces() -> frozenset[str]:
    """The python-can interfaces installed here (its own and plugins such as ``remote``)."""
    import can

    return frozenset(can.interfaces.VALID_INTERFACES)


def open_bus(interface: str, channel: str, options: Mapping[str, Any]) -> Any:
    import can

    return can.Bus(interface=interface, channel=channel, **dict(options))


def kernel_filters(signals: CanSignalMap, j1939: bool) -> list[dict[str, Any]]:
    """python-can ``can_filters`` delivering exactly the frames the source decodes."""
    filters: list[dict[str, Any]] = []
    for layout in (signals.dbc.layout(m) for m in signals.messages):
        if layout.is_j1939:
            pgn = j1939_pgn(layout.frame_id)
            mask = 0x3FFFF00 if (pgn >> 8) & 0xFF >= 240 else 0x3FF0000
            filters.append({"can_id": pgn << 8, "can_mask": mask, "extended": True})
        elif layout.is_extended:
            filters.append({"can_id": layout.frame_id, "can_mask": 0x1FFFFFFF, "extended": True})
        else:
            filters.append({"can_id": layout.frame_id, "can_mask": 0x7FF, "extended": False})
    if j1939:
        for pgn in (TP_CM, TP_DT):
            filters.append({"can_id": pgn << 8, "can_mask": 0x3FF0000, "extended": True})
    return filters


class CanBusSource(ConnectionSource):
    """Signals of a DBC, decoded from a live bus."""

    def __init__(
        self,
        signals: CanSignalMap,
        *,
        interface: str,
        channel: str,
        name: str = "can0",
        options: Mapping[str, Any] | None = None,
        fd: bool = False,
        j1939: bool = False,
        timestamps: str = "receive",
        queue_frames: int = DEFAULT_QUEUE_FRAMES,
        filters: bool = True,
        cadence: DecodeCadence = DEFAULT_CADENCE,
        clock: DeviceClock | None = None,
        backoff: Backoff | None = None,
        bus_factory: BusFactory = open_bus,
    ) -> None:
        check_choice(name, "timestamps", timestamps, TIMESTAMPS)
        self.name = name
        self.origin = LIVE
        self._signals = signals
        self._interface = interface
        self._channel = channel
        self._options = dict(options or {})
        if fd:
            self._options.setdefault("fd", True)
        if filters:
            self._options.setdefault("can_filters", kernel_filters(signals, j1939))
        self._stamp_bus = timestamps == "bus"
        self._queue = FrameQueue(queue_frames, FD_WIDTH if fd else 8)
        self._cadence = cadence
        self._reassembler = J1939Reassembler() if j1939 else None
        self._clock = clock or SystemClock()
        self._backoff = backoff or Backoff()
        self._factory = bus_factory
        self._counters = SourceCounters()
        super().__init__(f"can-{name}", self._receive, join_s=2.0)
        self._bus: Any = None
        self._declared = False
        #: Why the bus last failed (None while it works).
        self.failure: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def declare(self, catalog: Catalog) -> None:
        self._signals.declare(catalog)
        self._declared = True

    def close(self) -> None:
        """Stop receiving and shut the bus down (frames still queued stay readable)."""
        super().close()
        self._close_bus()

    # -- the receive thread -------------------------------------------------------------------------------

    def _close_bus(self) -> None:
        bus, self._bus = self._bus, None
        self._connected.clear()
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as exc:  # a bus that died may fail to close too; nothing more to do
                log.debug("source %s: closing the bus: %s", self.name, exc)
                import can

                can.BusABC.shutdown(bus)  # mark it closed, or python-can retries (and fails) at exit

    def _fail(self, what: str, exc: BaseException) -> None:
        self._counters.errors += 1
        reason = f"{what}: {type(exc).__name__}: {exc}"
        if self.failure != reason:
            log.warning("source %s: %s", self.name, reason)
        self.failure = reason
        self._down = True
        self._close_bus()

    def _receive(self) -> None:
        ever_connected = False
        while not self._stop.is_set():
            if self._bus is None:
                try:
                    self._bus = self._factory(self._interface, self._channel, self._options)
                except Exception as exc:  # python-can raises many types for an absent interface
                    self._fail(f"cannot open {self._interface} channel {self._channel!r}", exc)
                    self._stop.wait(self._backoff.next_delay())
                    continue
                if ever_connected:
                    self._counters.reconnects += 1
                ever_connected = True
                self._down = False
                self.failure = None
                self._backoff.reset()
                self._connected.set()
            try:
                self._pump(self._bus)
            except Exception as exc:  # the bus went away under us
                self._fail("bus failed", exc)
                self._stop.wait(self._backoff.next_delay())

    def _pump(self, bus: Any) -> None:
        """Receive until stopped (or until the bus raises)."""
        if self._interface == "remote" and hasattr(bus, "socket") and hasattr(bus, "remote_protocol"):
            self._pump_remote(bus)
            return
        put, now, stop = self._queue.put, self._clock.now_ns, self._stop
        stamp_bus = self._stamp_bus
        while not stop.is_set():
            msg = bus.recv(RECV_TIMEOUT_S)
            if msg is None:
                continue
            if msg.is_error_frame:
                self._counters.errors += 1
                continue
            if msg.is_remote_frame:
                continue
            put(int(msg.timestamp * 1e9) if stamp_bus else now(), msg.arbitration_id, bytes(msg.data))

    def _pump_remote(self, bus: Any) -> None:
        """A python-can-remote bus, opened by python-can, read in bulk off its socket (:mod:`.can_remote`):
        one ``recv`` per burst of frames instead of a ``recv`` and a ``can.Message`` per frame."""
        sock, stop, now = bus.socket, self._stop, self._clock.now_ns
        chunk = bytearray(RECV_BYTES)
        view = memoryview(chunk)
        pending = bytearray()
        last = 0  # the last stamp given: receive stamps never go backwards
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], RECV_TIMEOUT_S)
            if not ready:
                continue
            got = sock.recv_into(view)
            if got == 0:
                raise ConnectionError("the remote CAN server closed the connection")
            received = now()
            pending += view[:got]
            frames = can_remote.Frames()
            del pending[: can_remote.parse(pending, frames)]
            self._counters.errors += frames.error_frames
            for opcode, body in frames.control:
                self._remote_control(bus, opcode, body)
            if frames.ids:
                stamps = (
                    [int(t * 1e9) for t in frames.bus_s]
                    if self._stamp_bus
                    else can_remote.receive_stamps(frames.bus_s, received, last)
                )
                last = stamps[-1]
                self._queue.put_many(stamps, frames.ids, frames.payloads)
            time.sleep(REMOTE_PAUSE_S)  # let a burst gather: one wakeup and one read per burst

    @staticmethod
    def _remote_control(bus: Any, opcode: int, body: bytes) -> None:
        """What python-can-remote sends besides frames: answer pings; a close or an error ends the bus."""
        if opcode == can_remote.PING:
            bus.remote_protocol._ws.send_frame(can_remote.PONG, body)
        elif opcode == can_remote.CLOSE:
            raise ConnectionError("the remote CAN server closed the connection")
        elif opcode == can_remote.TEXT:
            try:
                event = json.loads(body)
            except ValueError:
                raise can_remote.RemoteStreamError("the remote CAN server sent text, not JSON") from None
            if isinstance(event, dict) and event.get("type") == "error":
                raise can_remote.RemoteStreamError(f"the remote CAN server says: {event.get('payload')}")

    # -- reading ------------------------------------------------------------------------------------------

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        self.start()
        if not self._stop.is_set() and not self._cadence.due(
            len(self._queue), self._queue.oldest_ns(), int(until_ns)
        ):
            return []  # not yet: frames pile up until the cadence says (a closed source gives all)
        batch = self._queue.drain(int(until_ns))
        out = GroupAccumulator()
        if len(batch):
            self._signals.emit(batch, 0, out)
            if self._reassembler is not None:
                whole = self._reassembler.feed(batch)
                if len(whole):
                    self._signals.emit(whole, 0, out)
        batches = out.build()
        self._counters.samples += sum(b.sample_count for b in batches)
        return batches

    @property
    def decode_lag_ns(self) -> int:
        """How much later than its frame a sample may be read (see :class:`DecodeCadence`)."""
        return self._cadence.lag_ns

    def counters(self) -> dict[str, int]:
        """Running totals: samples, errors (bus, error frames, undecodable frames), dropped, reconnects."""
        totals = self._counters.totals()
        totals["errors"] += self._signals.decode_errors_total
        totals["dropped"] = self._queue.dropped_total
        if self._reassembler is not None:
            s = self._reassembler.stats
            totals["errors"] += s.malformed + s.timed_out + s.aborted + s.overflowed
        return totals
