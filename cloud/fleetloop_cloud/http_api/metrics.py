"""The HTTP surface's own metrics: one middleware that counts every request by route and status, times
it, and counts refusals for credentials — handed to :func:`~fleetloop_cloud.http_api.start_http_server`
through its ``middlewares`` seam, where it sees each request's route name and final status.

The route label is the route's name (its OpenAPI operationId, ``request.match_info.route.name``), never
the raw path: paths carry device ids, rollout ids and file hashes, and a label per distinct path would
grow without bound. A request no route matched is ``unmatched``; one whose client went away before the
answer is counted with status 499 (nginx's "client closed request").
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from fleetloop_cloud.http_api.app import AUTH_FAILURE, CLIENT_CLOSED, Handler, Middleware, observed

__all__ = ["CLIENT_CLOSED", "HttpMetrics", "metrics_middleware"]


class HttpMetrics(Protocol):
    """Where the HTTP surface's observations go (the coordinator's metrics)."""

    def http_request(self, route: str, status: int, seconds: float, *, auth_failure: bool) -> None: ...


def metrics_middleware(metrics: HttpMetrics) -> Middleware:
    """A middleware observing every request into ``metrics``."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        def count(status: int, seconds: float) -> None:
            metrics.http_request(
                request.match_info.route.name or "unmatched", status, seconds,
                auth_failure=request.get(AUTH_FAILURE) is not None,
            )  # fmt: skip

        return await observed(request, handler, count)

    return observe
