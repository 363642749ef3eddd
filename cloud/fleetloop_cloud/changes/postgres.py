"""The change feed over PostgreSQL's LISTEN/NOTIFY: the coordinators sharing a database tell each other.

Why NOTIFY and not a broker of our own: the coordinators already share this database, a notice sent
after a commit is delivered to every listening session within milliseconds, and there is nothing else to
run. Its limits suit a feed of hints: a notice is lost when the listening connection drops (so after a
reconnect every topic is announced as changed, and :class:`~.follower.ChangeFollower` catches up on a
timer anyway), and a payload is small (ours is ``topic:origin``).

Two connections, both in autocommit: one blocks in ``LISTEN`` on this feed's thread, one sends (psycopg
serializes a connection's users, and a sender must not wait behind a listener's poll). This module and
``repositories.database`` are the only importers of psycopg; its errors never leave here — a feed that is
down logs, counts and retries, and ``publish`` never raises.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any

import psycopg

from fleetloop_cloud.changes.feed import Listener, Topic
from fleetloop_cloud.repositories.database import first_line
from fleetloop_shared.errors import ConfigError

log = logging.getLogger("fleetloop.cloud.changes")

#: The NOTIFY channel every coordinator of one database listens on.
CHANNEL = "fleetloop_changes"
#: How long the listener waits for a notice before it looks at its stop flag again.
POLL_S = 0.5
#: Waits between attempts to reconnect the listener: doubling from the first to the last.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
#: Longest origin sent (NOTIFY payloads must stay under 8,000 bytes; ours are names).
MAX_ORIGIN_CHARS = 200


def parse_notice(payload: str) -> tuple[Topic, str] | None:
    """``topic:origin`` → (topic, origin); None for anything else (another version's notice, or noise
    someone sent on our channel), which is ignored and counted."""
    name, sep, origin = payload.partition(":")
    if not sep:
        return None
    try:
        return Topic(name), origin
    except ValueError:
        return None


class PostgresChangeFeed:
    """LISTEN/NOTIFY on :data:`CHANNEL` of the database at ``url`` (a ``postgresql://`` URL)."""

    def __init__(self, url: str, *, channel: str = CHANNEL, connect_timeout_s: int = 5) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", channel):
            raise ConfigError(f"change feed channel {channel!r}: expected a lower-case SQL name")
        self._url = url
        self._channel = channel
        self._connect_timeout_s = connect_timeout_s
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._sender: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Counters (the coordinator's metrics read them): notices received and ignored, notices that
        #: could not be sent, listener reconnects.
        self.received = 0
        self.ignored = 0
        self.publish_failures = 0
        self.reconnects = 0
        #: Set once the listener is listening (tests wait for it; a notice sent before is not heard).
        self.listening = threading.Event()

    def _connect(self) -> Any:
        return psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout_s)

    # -- sending ------------------------------------------------------------------------------
    def publish(self, topic: Topic, origin: str) -> None:
        payload = f"{topic.value}:{origin[:MAX_ORIGIN_CHARS]}"
        with self._lock:
            try:
                if self._sender is None or self._sender.closed:
                    self._sender = self._connect()
                self._sender.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))
            except psycopg.Error as exc:
                self.publish_failures += 1
                log.warning("change feed: cannot send %s (the others catch up later): %s", topic.value,
                            first_line(exc))  # fmt: skip
                self._close_sender()

    def _close_sender(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(psycopg.Error):
                self._sender.close()
            self._sender = None

    # -- listening ----------------------------------------------------------------------------
    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="change-feed", daemon=True)
            self._thread.start()

    def _dispatch(self, topic: Topic, origin: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(topic, origin)
            except Exception:
                log.exception("change feed: a listener failed on %s", topic.value)

    def _run(self) -> None:
        wait_s = RECONNECT_FIRST_S
        first = True
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                log.warning("change feed: cannot listen (retrying in %.1f s): %s", wait_s, first_line(exc))
                self._stop.wait(wait_s)
                wait_s = min(wait_s * 2, RECONNECT_MAX_S)
                continue
            try:
                conn.execute(f"LISTEN {self._channel}")
                self.listening.set()
                if not first:
                    # notices sent while this connection was down are gone: everything may have changed
                    self.reconnects += 1
                    for topic in Topic:
                        self._dispatch(topic, "")
                first = False
                wait_s = RECONNECT_FIRST_S
                while not self._stop.is_set():
                    for notice in conn.notifies(timeout=POLL_S):
                        self._heard(notice.payload)
                        if self._stop.is_set():
                            break
            except psycopg.Error as exc:
                self.listening.clear()
                if not self._stop.is_set():
                    log.warning("change feed: listening connection lost (reconnecting): %s", first_line(exc))
                    self._stop.wait(wait_s)
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    def _heard(self, payload: str) -> None:
        notice = parse_notice(payload)
        if notice is None:
            self.ignored += 1
            return
        self.received += 1
        self._dispatch(*notice)

    def counters(self) -> dict[str, int]:
        return {"received": self.received, "ignored": self.ignored,
                "publish_failures": self.publish_failures, "reconnects": self.reconnects}  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S * 4 + 1)
        with self._lock:
            self._close_sender()
