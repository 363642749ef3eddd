"""The outgoing side of a device's control channel, the same for every transport.

A bounded queue that the runtime fills from any thread and the link drains into its session while the
cloud is there. Overflow policy: drop the oldest message (the newest state matters more than a stale
one, and a producer must never block on an absent cloud), counted in ``outbox_dropped``.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from fleetloop_agent.metrics import AgentMetrics
from fleetloop_shared.bounded import put_drop_oldest
from fleetloop_shared.wire import device_pb2

#: Control messages waiting for the cloud at most; overflow policy: drop-oldest, counted.
OUTBOX_LIMIT = 1000


class ControlOutbox:
    """Messages waiting to go up; ``on_put`` is called (from the putting thread) after each put."""

    def __init__(
        self, metrics: AgentMetrics, *, on_put: Callable[[], None] = lambda: None, limit: int = OUTBOX_LIMIT
    ) -> None:
        self._metrics = metrics
        self._queue: queue.Queue[device_pb2.DeviceMessage] = queue.Queue(maxsize=limit)
        self._on_put = on_put

    def put(self, msg: device_pb2.DeviceMessage) -> None:
        dropped = put_drop_oldest(self._queue, msg)
        if dropped:
            self._metrics.outbox_dropped.inc(dropped)
        self._on_put()

    def take(self) -> device_pb2.DeviceMessage | None:
        """The oldest waiting message, or None."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def empty(self) -> bool:
        return self._queue.empty()
