"""The coordinator's HTTP surface (aiohttp): the REST API, the artifact and TUF file server, the
OpenAPI document. :func:`start_http_server` is what ``cloud serve`` and the tests start."""

from fleetloop_cloud.http_api.app import HttpServer, HttpSettings, HttpTls, build_app, start_http_server

__all__ = ["HttpServer", "HttpSettings", "HttpTls", "build_app", "start_http_server"]
