"""The coordinator's HTTP surface on aiohttp: the REST API for operators, the files devices fetch, and
the OpenAPI document — one application, one middleware chain, one JSON error body.

The chain, outermost first: request id (taken from ``X-Request-Id`` when sane, else made; echoed on
every response and in every error body and log line) → any extra middlewares the caller adds (a
metrics middleware slots in here and sees every request's route name and final status) → access log
→ errors (``fleetloop_shared.errors`` and aiohttp's own 404/405/413 become ``{"error", "type",
"request_id"}``; anything else is a 500 whose details stay in the log) → the route. An operator route
authenticates its bearer token (:class:`~fleetloop_cloud.services.tokens.TokenService`), checks the
role its action needs *before* reading the body (a viewer cannot make the coordinator buffer a 1 GiB
upload), reads the body within the route's limit (413 past it), then runs its handler on a worker
thread — the services block — behind a gate of ``max_inflight`` requests (503 past it).

Settings come as one :class:`HttpSettings` object, so a configuration file can fill them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from fleetloop_cloud.http_api.console import add_console_routes
from fleetloop_cloud.http_api.files import add_file_routes
from fleetloop_cloud.http_api.openapi import openapi_document
from fleetloop_cloud.http_api.routes import ROUTES, Call, Route
from fleetloop_cloud.identity.roles import Role
from fleetloop_cloud.identity.tokens import redact
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.api import OperatorApi
from fleetloop_shared.errors import (
    ConfigError,
    FleetloopError,
    PayloadTooLargeError,
    UnavailableError,
    UserError,
)

log = logging.getLogger("fleetloop.cloud.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
#: Status of a request whose client went away before the answer (nginx's "client closed request").
CLIENT_CLOSED = 499
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: What aiohttp's own HTTP errors are called in the error body (the CLI maps ``type`` to its errors).
_HTTP_TYPES = {404: "NotFoundError", 405: "MethodNotAllowed", 413: "PayloadTooLargeError"}
BODY_CHUNK = 256 * 1024
#: What the chain stores on a request, for the middlewares after it (a metrics middleware reads the
#: route name from ``request.match_info.route.name``, and these).
REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", Caller)
#: 401 or 403 when the request was refused for its credentials.
AUTH_FAILURE = web.RequestKey("auth_failure", int)
#: Routes devices, probes and scrapers call all the time: logged at debug level only.
_QUIET_ROUTES = frozenset(
    {"getArtifactFile", "getImageMetadata", "getDirectorMetadata", "health", "getMetrics"}
)


@dataclass(frozen=True)
class HttpTls:
    """TLS for the HTTP port: the server's certificate chain and key (PEM), e.g. issued by the same
    private CA as the gRPC port's."""

    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"HTTP TLS: cannot load {self.cert} / {self.key}: {exc}") from None
        return ctx


@dataclass(frozen=True)
class HttpSettings:
    """Everything the HTTP surface takes besides the services, in one object."""

    tls: HttpTls | None = None
    #: Lab mode: no tokens; every request acts as an anonymous admin (``cloud serve --insecure``).
    insecure: bool = False
    #: Body limits in bytes by route name (operationId), over each route's own default.
    body_limits: Mapping[str, int] = field(default_factory=dict)
    #: Worker threads running the services' blocking calls.
    workers: int = 8
    #: Operator requests handled at once; more are answered 503 at once (the client retries).
    max_inflight: int = 32


# -- middlewares -----------------------------------------------------------------------------------
def request_id_of(request: web.Request) -> str:
    return str(request.get(REQUEST_ID, ""))


def error_response(request: web.Request, status: int, kind: str, message: str) -> web.Response:
    body = {"error": redact(message), "type": kind, "request_id": request_id_of(request)}
    headers = {"WWW-Authenticate": 'Bearer realm="fleetloop"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["X-Request-Id"] = request[REQUEST_ID]
        raise
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    return response


async def observed(
    request: web.Request, handler: Handler, done: Callable[[int, float], None]
) -> web.StreamResponse:
    """Run ``handler`` and then tell ``done`` the request's final status and the seconds it took,
    however it ended: an exception the error middleware let through counts with its own status, a
    client that went away with :data:`CLIENT_CLOSED`, anything else as 500. The access log and the
    metrics middleware both see a request through this, so they cannot disagree on its status."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # what the error middleware lets through (< 400)
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    finally:
        done(status, time.perf_counter() - started)


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    def line(status: int, seconds: float) -> None:
        caller = request.get(CALLER)
        route = request.match_info.route.name or "-"
        log.log(
            logging.DEBUG if route in _QUIET_ROUTES else logging.INFO,
            "%s %s %d %.1f ms %s",
            request.method,
            redact(request.path),
            status,
            seconds * 1000,
            caller.name if isinstance(caller, Caller) else "-",
            extra={"request_id": request_id_of(request)},
        )

    return await observed(request, handler, line)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FleetloopError as exc:
        if exc.http_status in (401, 403):  # what a metrics middleware counts as an auth failure
            request[AUTH_FAILURE] = exc.http_status
        return error_response(request, exc.http_status, type(exc).__name__, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        response = error_response(request, exc.status, _HTTP_TYPES.get(exc.status, "HttpError"), message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, redact(request.path),
                      extra={"request_id": request_id_of(request)})  # fmt: skip
        return error_response(
            request, 500, "InternalError", f"internal error (request id {request_id_of(request)})"
        )


# -- operator routes -------------------------------------------------------------------------------
def bearer(request: web.Request) -> str | None:
    """The secret of ``Authorization: Bearer <secret>``, or None."""
    scheme, _, secret = request.headers.get("Authorization", "").strip().partition(" ")
    return secret.strip() or None if scheme.lower() == "bearer" else None


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes: at once when Content-Length says so, else as
    soon as more than ``limit`` bytes have arrived."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(
            f"request body of {request.content_length} bytes exceeds this route's limit of {limit}"
        )
    parts, size = [], 0
    async for chunk in request.content.iter_chunked(BODY_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds this route's limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


class _Operations:
    """What every operator route shares: the services, the settings, the workers and the gate."""

    def __init__(self, api: OperatorApi, settings: HttpSettings, executor: Executor) -> None:
        self.api = api
        self.settings = settings
        self.executor = executor
        self.gate = asyncio.Semaphore(settings.max_inflight)

    async def caller(self, request: web.Request) -> Caller:
        return await self.authenticate(bearer(request), request.remote or "", request_id_of(request))

    async def authenticate(self, secret: str | None, address: str, rid: str) -> Caller:
        """The caller a token secret stands for (UnauthenticatedError for a bad one)."""
        if self.settings.insecure:
            return Caller.operator("anonymous", Role.ADMIN, proven=False, address=address, request_id=rid)
        now = self.api.clock()
        return await asyncio.get_running_loop().run_in_executor(
            self.executor,
            lambda: self.api.tokens.authenticate(secret, now, transport="http", address=address,
                                                 request_id=rid),
        )

    def handler(self, route: Route) -> Handler:
        limit = int(self.settings.body_limits.get(route.name, route.max_body))
        action = route.action

        async def handle(request: web.Request) -> web.StreamResponse:
            caller = await self.caller(request)
            request[CALLER] = caller
            if action is not None:
                self.api.access.operator(caller, action)  # the role, before the body is read
            if any("\x00" in v for v in (*request.match_info.values(), *request.query.values())):
                raise UserError("a path or query parameter holds a NUL character")
            body = await read_body(request, limit) if route.max_body else b""
            call = Call(self.api, caller, dict(request.match_info), dict(request.query), body,
                        self.api.clock())  # fmt: skip
            if self.gate.locked():
                raise UnavailableError(
                    f"the coordinator is handling {self.settings.max_inflight} requests; retry shortly"
                )
            async with self.gate:
                reply = await asyncio.get_running_loop().run_in_executor(self.executor, route.handler, call)
            if isinstance(reply.body, bytes):
                headers = {"Content-Type": reply.media_type}  # (as given: a charset or version stays)
                if reply.filename:
                    headers["Content-Disposition"] = f'attachment; filename="{reply.filename}"'
                return web.Response(body=reply.body, status=reply.status, headers=headers)
            return web.json_response(reply.body, status=reply.status, dumps=_dumps)

        return handle


def build_app(
    api: OperatorApi,
    settings: HttpSettings,
    executor: Executor,
    *,
    middlewares: Sequence[Middleware] = (),
    routes: Sequence[Route] = ROUTES,
) -> web.Application:
    """The application: middlewares (request ids, ``middlewares``, access log, errors), the operator
    ``routes``, the device file routes, the console (``/``, its files and ``/v1/events``), ``/healthz``
    and ``/v1/openapi.json``."""
    chain: list[Middleware] = [request_ids, *middlewares, access_log, errors]
    app = web.Application(middlewares=chain)  # type: ignore[arg-type]
    ops = _Operations(api, settings, executor)
    for route in routes:
        app.router.add_route(route.method, route.path, ops.handler(route), name=route.name)
    add_file_routes(app, api, executor)
    add_console_routes(app, api, executor, ops.authenticate)
    document = openapi_document(routes)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/healthz", health, name="health")
    app.router.add_get("/v1/openapi.json", openapi, name="openapi")
    return app


# -- serving in a thread ---------------------------------------------------------------------------
class HttpServer:
    """The HTTP surface running on its own event loop thread; :meth:`shutdown` stops it."""

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def shutdown(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)

    def server_close(self) -> None:
        """Nothing left to close after :meth:`shutdown` (kept for callers of the earlier server)."""


def start_http_server(
    api: OperatorApi,
    host: str,
    port: int,
    settings: HttpSettings | None = None,
    *,
    middlewares: Sequence[Middleware] = (),
) -> tuple[HttpServer, int]:
    """Serve in a background thread; returns the server and its bound port (0 picks a free one).
    UnavailableError when the address cannot be bound, ConfigError for unusable TLS files."""
    settings = settings or HttpSettings()
    ssl_context = settings.tls.context() if settings.tls is not None else None
    server = HttpServer()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="http-worker")
        app = build_app(api, settings, executor, middlewares=middlewares)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
            loop.run_until_complete(site.start())
            server.port = int(runner.addresses[0][1])
        except OSError as exc:
            failure.append(UnavailableError(f"HTTP: cannot listen on {host}:{port}: {exc.strerror or exc}"))
            loop.run_until_complete(runner.cleanup())
            ready.set()
            return
        server._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    thread = threading.Thread(target=run, name="http", daemon=True)
    server._thread = thread
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    return server, server.port
