"""The change feed between coordinators: the in-memory one, LISTEN/NOTIFY on a private PostgreSQL (a lost
connection, noise on the channel, a database that is down), and the follower that acts on notices and
catches up on a timer when one is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from fleetloop_cloud.changes import ChangeFollower, MemoryChangeBus, MemoryChangeFeed, Topic
from fleetloop_cloud.changes.postgres import CHANNEL, PostgresChangeFeed, parse_notice
from fleetloop_shared.errors import ConfigError

DEADLINE_S = 20.0


def wait_for(what: str, done: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)


class Heard:
    """A listener that keeps what it hears, safe from the feed's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.notices: list[tuple[Topic, str]] = []

    def __call__(self, topic: Topic, origin: str) -> None:
        with self._lock:
            self.notices.append((topic, origin))

    def has(self, topic: Topic, origin: str) -> bool:
        with self._lock:
            return (topic, origin) in self.notices


def test_notices_are_topic_and_origin_and_nothing_else_is_taken() -> None:
    assert parse_notice("campaigns:coord-a:1234") == (Topic.CAMPAIGNS, "coord-a:1234")
    assert parse_notice("rollouts:") == (Topic.ROLLOUTS, "")
    assert parse_notice("campaigns") is None
    assert parse_notice("firmware:coord-a") is None
    assert parse_notice("") is None
    with pytest.raises(ConfigError, match="SQL name"):
        PostgresChangeFeed("postgresql://nowhere/db", channel="x; DROP TABLE devices")


def test_the_memory_feed_reaches_every_feed_on_its_bus_until_closed() -> None:
    bus = MemoryChangeBus()
    a, b = MemoryChangeFeed(bus), MemoryChangeFeed(bus)
    heard_a, heard_b = Heard(), Heard()
    a.listen(heard_a)
    b.listen(heard_b)
    a.publish(Topic.CAMPAIGNS, "a")
    assert heard_a.notices == heard_b.notices == [(Topic.CAMPAIGNS, "a")]
    b.close()
    a.publish(Topic.ROLLOUTS, "a")
    assert heard_b.notices == [(Topic.CAMPAIGNS, "a")]
    assert heard_a.notices[-1] == (Topic.ROLLOUTS, "a")
    assert bus.published == {Topic.CAMPAIGNS: 1, Topic.ROLLOUTS: 1}


def test_the_follower_acts_on_others_notices_once_per_burst_and_skips_its_own() -> None:
    bus = MemoryChangeBus()
    release = threading.Event()
    runs: list[Topic] = []

    def campaigns() -> None:
        runs.append(Topic.CAMPAIGNS)
        release.wait(DEADLINE_S)  # holds the follower while the burst arrives

    handlers = {Topic.CAMPAIGNS: campaigns, Topic.ROLLOUTS: lambda: runs.append(Topic.ROLLOUTS)}
    follower = ChangeFollower(MemoryChangeFeed(bus), "b", handlers, catch_up_s=3600)
    other = MemoryChangeFeed(bus)
    follower.start()
    try:
        follower.publish(Topic.CAMPAIGNS)  # its own: nothing to do
        other.publish(Topic.CAMPAIGNS, "a")
        wait_for("the first re-read", lambda: runs == [Topic.CAMPAIGNS])
        for _ in range(50):  # a burst while it works: one more re-read, not fifty
            other.publish(Topic.CAMPAIGNS, "a")
        release.set()
        wait_for("the burst's re-read", lambda: len(runs) == 2)
        other.publish(Topic.ROLLOUTS, "a")
        wait_for("the rollouts' handler", lambda: runs[-1] is Topic.ROLLOUTS)
        assert runs == [Topic.CAMPAIGNS, Topic.CAMPAIGNS, Topic.ROLLOUTS]
        assert follower.heard == {Topic.CAMPAIGNS: 51, Topic.ROLLOUTS: 1}
        assert follower.coalesced == 49
        assert follower.catch_ups == 0
    finally:
        release.set()
        follower.stop()


def test_a_lost_notice_only_delays_the_change_until_the_catch_up() -> None:
    class Deaf(MemoryChangeFeed):
        """A feed whose notices never arrive (a dropped connection, a feed that is down)."""

        def publish(self, topic: Topic, origin: str) -> None:
            return None

    runs: list[Topic] = []
    follower = ChangeFollower(
        Deaf(), "b", {Topic.CAMPAIGNS: lambda: runs.append(Topic.CAMPAIGNS)}, catch_up_s=0.2
    )
    follower.start()
    try:
        wait_for("a catch-up", lambda: Topic.CAMPAIGNS in runs)
        assert follower.catch_ups >= 1
    finally:
        follower.stop()


def test_a_failing_handler_is_logged_and_the_follower_goes_on() -> None:
    bus = MemoryChangeBus()
    runs: list[int] = []

    def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("database gone for a moment")

    follower = ChangeFollower(MemoryChangeFeed(bus), "b", {Topic.ROLLOUTS: flaky}, catch_up_s=3600)
    follower.start()
    try:
        MemoryChangeFeed(bus).publish(Topic.ROLLOUTS, "a")
        wait_for("the failing run", lambda: len(runs) == 1)
        MemoryChangeFeed(bus).publish(Topic.ROLLOUTS, "a")
        wait_for("the next run", lambda: len(runs) == 2)
    finally:
        follower.stop()


def test_postgres_notify_reaches_the_other_listener_in_well_under_a_second(pg_url: str) -> None:
    a, b = PostgresChangeFeed(pg_url), PostgresChangeFeed(pg_url)
    heard = Heard()
    b.listen(heard)
    try:
        assert b.listening.wait(DEADLINE_S)
        started = time.monotonic()
        a.publish(Topic.CAMPAIGNS, "coord-a")
        wait_for("the notice on b", lambda: heard.has(Topic.CAMPAIGNS, "coord-a"), timeout_s=5)
        assert time.monotonic() - started < 1.0
        with psycopg.connect(pg_url, autocommit=True) as conn:  # noise on the channel: counted, ignored
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, "reboot-everything"))
        a.publish(Topic.ROLLOUTS, "coord-a")
        wait_for("the next notice", lambda: heard.has(Topic.ROLLOUTS, "coord-a"))
        assert b.ignored == 1 and b.received == 2
        assert a.publish_failures == 0
    finally:
        a.close()
        b.close()


def test_a_dropped_listening_connection_reconnects_and_announces_everything(pg_url: str) -> None:
    feed, sender = PostgresChangeFeed(pg_url), PostgresChangeFeed(pg_url)
    heard = Heard()
    feed.listen(heard)
    try:
        assert feed.listening.wait(DEADLINE_S)
        with psycopg.connect(pg_url, autocommit=True) as conn:  # an administrator, a failover, a proxy
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed is not None and killed[0] == 1
        # notices sent meanwhile may be lost: after the reconnect every topic counts as changed
        wait_for("the reconnect", lambda: feed.reconnects == 1)
        wait_for("everything announced", lambda: all(heard.has(t, "") for t in Topic))
        assert feed.listening.wait(DEADLINE_S)
        sender.publish(Topic.CAMPAIGNS, "coord-a")
        wait_for("a notice after the reconnect", lambda: heard.has(Topic.CAMPAIGNS, "coord-a"))
    finally:
        feed.close()
        sender.close()


def test_publishing_to_a_database_that_is_down_never_raises() -> None:
    feed = PostgresChangeFeed("postgresql://fleetloop@127.0.0.1:9/none", connect_timeout_s=1)
    try:
        feed.publish(Topic.CAMPAIGNS, "coord-a")
        feed.publish(Topic.ROLLOUTS, "coord-a")
        assert feed.publish_failures == 2
    finally:
        feed.close()
