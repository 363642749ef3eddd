"""The change feed: how a change made through one coordinator reaches the devices connected to the others.

State lives in the database; what a coordinator must learn quickly is only *that* something changed, and
which kind of thing (:class:`Topic`), so it re-reads that part and pushes to its own devices. The feed
carries nothing else: a notice is a topic and the name of the coordinator that sent it, never the
change itself, so a lost, doubled or reordered notice changes no outcome — only when it is seen.

:class:`ChangeFeed` is the one interface the coordinator uses. Its adapters: PostgreSQL's LISTEN/NOTIFY
(:mod:`.postgres`, several coordinators on one database) and :class:`MemoryChangeFeed` here (the
embedded default, one process; in tests several coordinators in one process share a
:class:`MemoryChangeBus`). Neither is trusted to deliver everything: :class:`~.follower.ChangeFollower`
also catches up on a timer, so a notice lost with a dropped connection only delays.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol


class Topic(StrEnum):
    """What changed. A coordinator that hears one re-reads that part of the state."""

    #: The desired campaigns (apply, delete): push each device here its desired set.
    CAMPAIGNS = "campaigns"
    #: A rollout (created, paused, resumed, aborted, approved, retried, or stepped by the controller):
    #: step it now if this coordinator leads, deliver offered jobs to the devices here, and tell them to
    #: drop the jobs of aborted rollouts.
    ROLLOUTS = "rollouts"


#: Called with the topic and the sending coordinator's name, from the feed's own thread; must not block.
Listener = Callable[[Topic, str], None]


class ChangeFeed(Protocol):
    """Notices between the coordinators sharing one database."""

    def publish(self, topic: Topic, origin: str) -> None:
        """Tell every coordinator (this one too) that ``topic`` changed; ``origin`` names the sender.
        Best effort: never raises for a feed that is down (the catch-up covers it)."""
        ...

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` for every notice from now on (until :meth:`close`)."""
        ...

    def close(self) -> None:
        """Stop listening and release the feed's connections."""
        ...

    def counters(self) -> dict[str, int]:
        """What went wrong or was ignored, by event (exported as metrics)."""
        ...


class MemoryChangeBus:
    """The notices of the coordinators in one process: what a :class:`MemoryChangeFeed` publishes to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        #: Notices published, by topic (what tests read).
        self.published: dict[Topic, int] = dict.fromkeys(Topic, 0)

    def add(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def send(self, topic: Topic, origin: str) -> None:
        with self._lock:
            self.published[topic] += 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener(topic, origin)


class MemoryChangeFeed:
    """The embedded default (one coordinator) and the fake beside the PostgreSQL feed: notices are
    delivered at once, in the publishing thread, to every feed on the same bus."""

    def __init__(self, bus: MemoryChangeBus | None = None) -> None:
        self.bus = bus or MemoryChangeBus()
        self._mine: list[Listener] = []

    def publish(self, topic: Topic, origin: str) -> None:
        self.bus.send(topic, origin)

    def listen(self, listener: Listener) -> None:
        self._mine.append(listener)
        self.bus.add(listener)

    def close(self) -> None:
        for listener in self._mine:
            self.bus.remove(listener)
        self._mine.clear()

    def counters(self) -> dict[str, int]:
        return {}  # in one process nothing is lost
