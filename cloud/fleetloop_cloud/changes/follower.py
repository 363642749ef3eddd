"""What a coordinator does with the change feed: re-read what changed, on its own thread, and catch up.

The feed's listener only marks topics as pending (it runs on the feed's thread and must not block); this
follower's thread then runs each pending topic's handler once, however many notices arrived meanwhile —
a burst of a hundred campaign applies costs one re-read, not a hundred (the bound: one pending flag per
topic, overflow policy *coalesce*, counted). Notices this coordinator sent itself are skipped: it acted on
its own change already.

Every :data:`CATCH_UP_S` the follower runs every handler whether or not it heard anything: a notice lost
(a dropped connection, a feed that was down when the change was made) delays that change by at most this
long, and nothing else. Handlers are idempotent (a campaign push that finds the version already pushed
does nothing), so running one twice is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from fleetloop_cloud.changes.feed import ChangeFeed, Topic

log = logging.getLogger("fleetloop.cloud.changes")

#: The longest a change waits when its notice was lost.
CATCH_UP_S = 5.0


class ChangeFollower:
    """Runs ``handlers[topic]`` when another coordinator changed ``topic``, and all of them every
    ``catch_up_s``. ``origin`` is this coordinator's name (its own notices are skipped)."""

    def __init__(
        self,
        feed: ChangeFeed,
        origin: str,
        handlers: Mapping[Topic, Callable[[], None]],
        *,
        catch_up_s: float = CATCH_UP_S,
    ) -> None:
        self._feed = feed
        self.origin = origin
        self._handlers = dict(handlers)
        self._catch_up_s = catch_up_s
        self._lock = threading.Lock()
        self._pending: set[Topic] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-follower", daemon=True)
        #: Counters: notices heard from others by topic, notices folded into one already pending,
        #: handler runs by the timer.
        self.heard: dict[Topic, int] = dict.fromkeys(Topic, 0)
        self.coalesced = 0
        self.catch_ups = 0

    def feed_counters(self) -> dict[str, int]:
        """The feed's own counters (sent, lost, reconnects: whatever its adapter counts)."""
        return self._feed.counters()

    def start(self) -> None:
        self._feed.listen(self._on_notice)
        self._thread.start()

    def publish(self, topic: Topic) -> None:
        """Tell the other coordinators that ``topic`` changed here."""
        self._feed.publish(topic, self.origin)

    def _on_notice(self, topic: Topic, origin: str) -> None:
        if origin == self.origin:
            return
        with self._lock:
            self.heard[topic] += 1
            if topic in self._pending:
                self.coalesced += 1
            self._pending.add(topic)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self._catch_up_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                topics, self._pending = (self._pending, set()) if woken else (set(self._handlers), set())
            if not woken:
                self.catch_ups += 1
            for topic in sorted(topics):
                handler = self._handlers.get(topic)
                if handler is None:
                    continue
                try:
                    handler()
                except Exception:
                    log.exception("change follower: re-reading %s failed (the next catch-up retries)", topic)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._feed.close()
