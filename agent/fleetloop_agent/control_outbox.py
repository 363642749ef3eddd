"""The outgoing side of a device's control channel, the same for every transport (gRPC, MQTT).

A bounded outbox (drop-oldest, counted in ``outbox_dropped``) that the runtime fills from any thread
and the transport drains while connected; ``flush`` gives it a moment to empty before a reboot.
"""

from __future__ import annotations

import queue
import threading
import time

from fleetloop_agent.metrics import AgentMetrics
from fleetloop_shared.bounded import put_drop_oldest
from fleetloop_shared.wire import device_pb2

#: Bounded outbox; overflow policy: drop the oldest message (counted in outbox_dropped).
OUTBOX_LIMIT = 1000


class ControlOutbox:
    """Base of the cloud links: ``send`` and ``flush`` over ``_outbox``, ``connected`` and metrics."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics
        self._outbox: queue.Queue[device_pb2.DeviceMessage] = queue.Queue(maxsize=OUTBOX_LIMIT)
        self.connected = threading.Event()

    def send(self, msg: device_pb2.DeviceMessage) -> None:
        """Queue ``msg`` for the control channel; drop-oldest when the outbox is full."""
        dropped = put_drop_oldest(self._outbox, msg)
        if dropped:
            self._metrics.outbox_dropped.inc(dropped)

    def flush(self, timeout_s: float) -> None:
        """Give queued control messages up to ``timeout_s`` to leave (used before a reboot)."""
        deadline = time.monotonic() + timeout_s
        while self.connected.is_set() and not self._outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
