"""The console's event feed: what changed between two snapshots (pure), and ``/v1/events`` on a real
coordinator — the token first, ``ready``, a device that connects arriving as an event, a refused or
revoked token ending the socket with the reason, a listener too slow to keep up told to resync."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest

from fleetloop_cloud.console.feed import MAX_EVENTS, Snapshot, changes
from fleetloop_cloud.http_api import console as console_http
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.wire import device_pb2
from tests.cloud.conftest import RunningCoordinator


def snapshot(**over: Any) -> Snapshot:
    base: dict[str, Any] = {
        "devices": {"car-1": {"device_id": "car-1", "online": True, "last_seen": 1.0}},
        "summary": {"devices": 1, "online": 1},
        "rollouts": {"r1": {"id": "r1", "state": "RUNNING"}},
        "campaigns_version": 3,
        "captures": 10,
    }
    return Snapshot(**(base | over))


def test_the_first_snapshot_says_nothing_and_an_unchanged_one_neither() -> None:
    assert changes(None, snapshot()) == []
    # a heartbeat only moves last_seen, which the page ages by itself
    moved = snapshot(devices={"car-1": {"device_id": "car-1", "online": True, "last_seen": 9.0}})
    assert changes(snapshot(), moved) == []


def test_each_kind_of_change_is_one_event() -> None:
    after = snapshot(
        devices={"car-1": {"device_id": "car-1", "online": False, "last_seen": 2.0},
                 "car-2": {"device_id": "car-2", "online": True, "last_seen": 2.0}},
        summary={"devices": 2, "online": 1}, rollouts={"r1": {"id": "r1", "state": "PAUSED"}},
        campaigns_version=4, captures=11, audit=({"seq": 7, "action": "rollouts.pause"},),
    )  # fmt: skip
    events = changes(snapshot(), after)
    assert [e["type"] for e in events] == ["device", "device", "summary", "rollout", "campaigns", "captures",
                                           "audit"]  # fmt: skip
    assert {e["device"]["device_id"] for e in events if e["type"] == "device"} == {"car-1", "car-2"}
    gone = changes(after, snapshot(devices={}, summary=after.summary, rollouts=after.rollouts,
                                   campaigns_version=4, captures=11))  # fmt: skip
    assert gone == [{"type": "device_removed", "device_id": "car-1"},
                    {"type": "device_removed", "device_id": "car-2"}]  # fmt: skip


def test_a_storm_of_changes_is_one_resync() -> None:
    many = {f"d{i}": {"device_id": f"d{i}", "last_seen": 0} for i in range(MAX_EVENTS + 1)}
    assert [e["type"] for e in changes(snapshot(), snapshot(devices=many))] == ["resync"]


def _ws_url(rc: RunningCoordinator) -> str:
    return rc.http_base.replace("http://", "ws://") + "/v1/events"


async def _next(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 20.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            event: dict[str, Any] = json.loads(msg.data)
            if event["type"] == kind:
                return event


def test_a_device_that_connects_arrives_as_an_event(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator

    async def run() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(_ws_url(rc)) as ws:
            await ws.send_str(json.dumps({"token": rc.token}))
            ready = await _next(ws, "ready")
            assert ready["role"] == "admin"
            hello = device_pb2.Hello(device_id="car-9", fleet="f", labels={"kind": "car"})
            caller = Caller.device("car-9", transport="test", proven=True)
            await asyncio.to_thread(rc.coordinator.devices.connect, caller, hello, rc.coordinator.clock())
            event = await _next(ws, "device")
            assert event["device"]["device_id"] == "car-9" and event["device"]["online"] is True

    asyncio.run(run())


def test_a_refused_or_revoked_token_ends_the_socket_with_the_reason(
    running_coordinator: RunningCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc = running_coordinator
    monkeypatch.setattr(console_http, "RECHECK_S", 0.2)
    c = rc.coordinator
    secret = c.tokens.create(Caller.local(), "short", "viewer", c.clock()).secret

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws_url(rc)) as ws:
                await ws.send_str(json.dumps({"token": "flt_nothing"}))
                assert "unknown" in (await _next(ws, "expired"))["error"]
                await ws.receive()
                assert ws.close_code == 4401
            async with http.ws_connect(_ws_url(rc)) as ws:
                await ws.send_str(json.dumps({"token": secret}))
                assert (await _next(ws, "ready"))["name"] == "short"
                await asyncio.to_thread(c.tokens.revoke, Caller.local(), "short", c.clock())
                assert "revoked" in (await _next(ws, "expired"))["error"]

    asyncio.run(run())


def test_a_listener_that_falls_behind_is_told_to_resync(
    running_coordinator: RunningCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_http, "QUEUE_EVENTS", 4)

    async def run() -> None:
        with ThreadPoolExecutor(1) as pool:
            events = console_http.Events(running_coordinator.coordinator, pool)
            slow = events.subscribe()
            events.publish([{"type": "captures", "count": n} for n in range(10)])
            assert [slow.get_nowait()["type"] for _ in range(slow.qsize())] == ["resync"]
            assert events.resyncs_total == 1
            events.unsubscribe(slow)

    asyncio.run(run())
