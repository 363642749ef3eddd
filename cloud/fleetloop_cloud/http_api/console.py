"""The console on the HTTP port: its static files at ``/`` and ``/console/...``, and the websocket
``/v1/events`` its pages update from.

The files are public — they hold no data; everything the page shows comes from the REST API with the
operator's token. They are served with a strict Content-Security-Policy (scripts only from this origin,
no inline script), so a value shown on the page can never run as code.

``/v1/events``: the page opens the socket and sends ``{"token": "..."}`` first (a browser cannot set an
``Authorization`` header on a websocket, and a token in the URL would land in logs). The token is
checked like a REST request's; then, once the watcher holds a snapshot to compare against, the page
gets ``{"type": "ready", "name", "role"}`` (and reloads what it shows) and, from then on, the events of
:mod:`fleetloop_cloud.console.feed`. The token is checked again every
:data:`RECHECK_S`: an expired or revoked token gets ``{"type": "expired", "error"}`` and the socket is
closed (4401), and the page goes back to its login saying why. Each listener has a queue of
:data:`QUEUE_EVENTS`; a listener too slow to keep up has its queue replaced by one ``resync`` event
(counted in :attr:`Events.resyncs_total`), after which it reloads what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from fleetloop_cloud.console.feed import FEED_TICK_S, Json, Watcher
from fleetloop_cloud.http_api.render import device_json, plain
from fleetloop_cloud.identity.roles import Role
from fleetloop_cloud.repositories.records import AuditFilter
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.api import OperatorApi
from fleetloop_shared.errors import FleetloopError

log = logging.getLogger("fleetloop.cloud.console")

#: Seconds between two checks of a listener's token.
RECHECK_S = 15.0
#: Seconds a new socket has to send its token.
HELLO_TIMEOUT_S = 10.0
#: Events queued per listener before it is told to resync.
QUEUE_EVENTS = 256
#: Listeners at once; more are refused (close code 4503), the page retries later.
MAX_LISTENERS = 256
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
Authenticate = Callable[[str | None, str, str], Awaitable[Caller]]


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the console's static folder by its path under it, with its media type."""
    root = resources.files("fleetloop_cloud.console") / "static"
    out: dict[str, tuple[bytes, str]] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            else:
                suffix = Path(child.name).suffix
                media = _TYPES.get(suffix, "text/plain" if child.name in ("LICENSE", "VERSION") else "")
                if media:
                    out[name] = (child.read_bytes(), media)

    walk(root, "")
    return out


class _Reads:
    """The feed's reads through the operator services, rendered as the REST routes render them."""

    def __init__(self, api: OperatorApi) -> None:
        self._api = api

    def devices(self, caller: Caller, now: float) -> list[Json]:
        return [device_json(d) for d in self._api.devices.fleet(caller, now)]

    def summary(self, caller: Caller, now: float) -> Json:
        out: Json = plain(self._api.queries.summary(caller, now))
        return out

    def rollouts(self, caller: Caller) -> list[Json]:
        return [plain(r) for r in self._api.rollouts.all(caller)]

    def audit(self, caller: Caller, where: AuditFilter) -> list[Json]:
        return [plain(e) for e in self._api.audit.entries(caller, where)]


class Events:
    """The listeners of ``/v1/events`` and the one watcher feeding them (running while any listens)."""

    def __init__(self, api: OperatorApi, executor: Executor) -> None:
        self._api = api
        self._executor = executor
        reader = Caller.operator("console-feed", Role.VIEWER, transport="internal")
        self._watcher = Watcher(_Reads(api), reader)
        self._queues: set[asyncio.Queue[Json]] = set()
        self._task: asyncio.Task[None] | None = None
        self._baseline = asyncio.Event()
        #: Listeners told to resync because their queue was full.
        self.resyncs_total = 0
        #: Ticks whose reads failed (the next tick tries again).
        self.failed_ticks_total = 0

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def subscribe(self) -> asyncio.Queue[Json]:
        queue: asyncio.Queue[Json] = asyncio.Queue(maxsize=QUEUE_EVENTS)
        self._queues.add(queue)
        if self._task is None or self._task.done():
            self._watcher.reset()
            self._baseline.clear()
            self._task = asyncio.get_running_loop().create_task(self._run())
        return queue

    async def baseline(self, timeout_s: float) -> bool:
        """Wait until the watcher holds a snapshot to compare against, so that every change after this
        returns becomes an event (a page reloads what it shows on ``ready``: a change between that reload
        and a later first snapshot would be lost); False if none came within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._baseline.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def unsubscribe(self, queue: asyncio.Queue[Json]) -> None:
        self._queues.discard(queue)

    def publish(self, events: list[Json]) -> None:
        for queue in list(self._queues):
            for event in events:
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    while not queue.empty():
                        queue.get_nowait()
                    queue.put_nowait({"type": "resync", "reason": "this page fell behind"})
                    self.resyncs_total += 1
                    break

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queues:
            try:
                events = await loop.run_in_executor(self._executor, self._watcher.step, self._api.clock())
            except FleetloopError as exc:
                self.failed_ticks_total += 1
                log.warning("console feed: a snapshot failed: %s", exc)
                events = []
            else:
                self._baseline.set()
            self.publish(events)
            await asyncio.sleep(FEED_TICK_S)


async def _send(ws: web.WebSocketResponse, event: Json) -> None:
    await ws.send_str(json.dumps(event, default=str))


async def _first_token(ws: web.WebSocketResponse) -> str | None:
    msg = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT_S)
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        doc = json.loads(msg.data)
    except ValueError:
        return None
    token = doc.get("token") if isinstance(doc, dict) else None
    return token if isinstance(token, str) else None


def add_console_routes(
    app: web.Application, api: OperatorApi, executor: Executor, authenticate: Authenticate
) -> Events:
    """Serve the console and its event socket on ``app``; the listeners' registry."""
    files = static_files()
    events = Events(api, executor)

    def respond(name: str) -> web.Response:
        found = files.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, media = found
        return web.Response(body=body, content_type=media, headers=_HEADERS)

    async def index(request: web.Request) -> web.Response:
        return respond("index.html")

    async def asset(request: web.Request) -> web.Response:
        return respond(request.match_info["name"])

    async def feed(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        if events.listeners >= MAX_LISTENERS:
            await ws.close(code=4503, message=b"too many listeners; retry later")
            return ws
        rid = secrets.token_hex(8)
        address = request.remote or ""
        try:
            token = await _first_token(ws)
            caller = await authenticate(token, address, rid)
        except (TimeoutError, FleetloopError) as exc:
            error = str(exc) if isinstance(exc, FleetloopError) else "no token was sent"
            await _send(ws, {"type": "expired", "error": error})
            await ws.close(code=4401, message=b"unauthenticated")
            return ws
        queue = events.subscribe()
        loop = asyncio.get_running_loop()
        next_check = loop.time() + RECHECK_S
        reader = loop.create_task(_drain(ws))
        try:
            if not await events.baseline(HELLO_TIMEOUT_S):
                log.warning("console feed: no snapshot in %.0f s; a page may miss a change", HELLO_TIMEOUT_S)
            role = caller.role.value if caller.role is not None else ""
            await _send(ws, {"type": "ready", "name": caller.name, "role": role})
            while not ws.closed and not reader.done():
                with contextlib.suppress(TimeoutError):
                    event = await asyncio.wait_for(queue.get(), max(0.1, next_check - loop.time()))
                    await _send(ws, event)
                if loop.time() >= next_check:
                    next_check = loop.time() + RECHECK_S
                    try:
                        await authenticate(token, address, rid)
                    except FleetloopError as exc:
                        await _send(ws, {"type": "expired", "error": str(exc)})
                        await ws.close(code=4401, message=b"token no longer valid")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            events.unsubscribe(queue)
            reader.cancel()
            await ws.close()
        return ws

    app.router.add_get("/", index, name="console")
    app.router.add_get("/console/{name:[A-Za-z0-9._/-]+}", asset, name="consoleAsset")
    app.router.add_get("/v1/events", feed, name="events")
    return events


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the page sends after its token, until it closes."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
