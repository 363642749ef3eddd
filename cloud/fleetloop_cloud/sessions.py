"""Connected devices and their outboxes: how the cloud pushes to a device's control stream.

One session per device id; a new connection from the same device replaces the old one (the old stream
ends). Outboxes are bounded; overflow policy: drop-oldest, counted — a device that does not read its
stream loses stale pushes, and the rollout controller re-offers what matters.

Whoever serves a session (a gRPC stream's coroutine, the MQTT bridge's push loop) passes a ``wake``
callback to :meth:`DeviceSessions.open`: it is called, from the publishing thread, after every push and
when the session closes. So an idle device costs no thread and no polling — what holds 10,000 devices on
one coordinator.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetloop_shared.bounded import put_drop_oldest
from fleetloop_shared.wire import device_pb2

OUTBOX_LIMIT = 256


@dataclass
class Session:
    device_id: str
    outbox: queue.Queue[device_pb2.CloudMessage] = field(
        default_factory=lambda: queue.Queue(maxsize=OUTBOX_LIMIT)
    )
    closed: threading.Event = field(default_factory=threading.Event)
    #: Called after each push and on close, from the thread that did it; must not block.
    wake: Callable[[], None] = lambda: None
    #: The transport the device is connected over (grpc, mqtt): what the metrics count by.
    transport: str = ""

    def close(self) -> None:
        self.closed.set()
        self.wake()


class DeviceSessions:
    """Registry of open control streams, safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self.dropped_total = 0

    def open(self, device_id: str, wake: Callable[[], None] | None = None, *, transport: str = "") -> Session:
        """The device's new session (its previous one is closed); ``wake`` is told of pushes and close."""
        session = Session(device_id, transport=transport)
        if wake is not None:
            session.wake = wake
        with self._lock:
            old = self._sessions.get(device_id)
            self._sessions[device_id] = session
        if old is not None:
            old.close()
        return session

    def close(self, session: Session) -> bool:
        """Close ``session``; True if it was the device's current one (the device is now offline)."""
        session.close()
        with self._lock:
            if self._sessions.get(session.device_id) is session:
                del self._sessions[session.device_id]
                return True
        return False

    def online(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def by_transport(self) -> dict[str, int]:
        """How many devices are connected here, by transport."""
        with self._lock:
            return dict(Counter(s.transport for s in self._sessions.values()))

    def publish(self, device_id: str, msg: device_pb2.CloudMessage) -> bool:
        """Queue ``msg`` for the device; False when it is not connected."""
        with self._lock:
            session = self._sessions.get(device_id)
        if session is None:
            return False
        self.dropped_total += put_drop_oldest(session.outbox, msg)
        session.wake()
        return True
