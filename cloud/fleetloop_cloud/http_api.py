"""The coordinator's HTTP surface: REST API (JSON) and the artifact file server with Range.

Standard library only (``http.server``): the embedded default must run with nothing else installed, and
the API is small. Each request's :class:`~fleetloop_cloud.services.access.Caller` is built once, in
:meth:`_Handler._dispatch` (today the anonymous operator), and handed to the services, which check it.
Services answer with typed records; this module renders them as JSON, once. Domain errors map once, by
their class's ``http_status``; the body is always ``{"error": "...", "type": "..."}``. Artifact files
are served with ``Accept-Ranges: bytes`` so a device resumes a cut download where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fleetloop_cloud.fleet_store.query import QUERY_TIMEOUT_S, check_timeout
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.api import OperatorApi
from fleetloop_cloud.services.devices import DeviceStatus
from fleetloop_shared.errors import FleetloopError, NotFoundError, UserError
from fleetloop_shared.update.artifact import ReleaseManifest

log = logging.getLogger("fleetloop.cloud.http")

#: Largest request body accepted (an artifact upload); larger ones are refused before reading.
MAX_BODY_BYTES = 1024 * 1024 * 1024
FILE_CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    server_version = "fleetloop"
    protocol_version = "HTTP/1.1"
    api: OperatorApi  # set on the subclass made by start_http_server
    caller: Caller

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise UserError(f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise UserError(f"request body is not valid JSON: {exc}") from None

    def _send_json(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # Who is asking, built once per request: the next step puts a token's name and role here.
        self.caller = Caller.operator(transport="http")
        try:
            for pattern, meth, handler in ROUTES:
                m = re.fullmatch(pattern, url.path)
                if m and meth == method:
                    handler(self, query, *m.groups())
                    return
            raise NotFoundError(f"no route for {method} {url.path}")
        except FleetloopError as exc:
            self._send_json({"error": str(exc), "type": type(exc).__name__}, exc.http_status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            log.exception("%s %s failed", method, url.path)
            self._send_json({"error": f"internal error: {exc}", "type": "InternalError"}, 500)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- routes -----------------------------------------------------------------------------------
    def health(self, q: dict[str, str]) -> None:
        self._send_json({"ok": True})

    def summary(self, q: dict[str, str]) -> None:
        self._send_json(_plain(self.api.queries.summary(self.caller, self.api.clock())))

    def devices(self, q: dict[str, str]) -> None:
        self._send_json([_device_json(d) for d in self.api.devices.fleet(self.caller, self.api.clock())])

    def device(self, q: dict[str, str], device_id: str) -> None:
        self._send_json(_device_json(self.api.devices.describe(self.caller, device_id, self.api.clock())))

    def device_catalog(self, q: dict[str, str], device_id: str) -> None:
        catalog = self.api.devices.catalog(self.caller, device_id)
        self._send_json({"signals": catalog.to_records()})

    def campaigns(self, q: dict[str, str]) -> None:
        desired = self.api.campaigns.desired(self.caller)
        self._send_json(
            {
                "version": desired.version,
                "campaigns": [
                    {"name": c.name, "version": c.revision, "document": c.document} for c in desired.campaigns
                ],
            }
        )

    def apply_campaign(self, q: dict[str, str]) -> None:
        body = self._body()
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise UserError("campaign document is not UTF-8 text") from None
        applied = self.api.campaigns.apply(
            self.caller, text, source=q.get("source", "<campaign>"), now=self.api.clock()
        )
        self._send_json(_plain(applied), 201)

    def delete_campaign(self, q: dict[str, str], name: str) -> None:
        self._send_json(_plain(self.api.campaigns.delete(self.caller, name, self.api.clock())))

    def query(self, q: dict[str, str]) -> None:
        """``POST /v1/query`` with ``{"sql": "...", "max_rows": N, "timeout_s": S}`` (docs/query.md):
        at most 100,000 rows; the query is interrupted after ``timeout_s`` (default and most
        ``query.QUERY_TIMEOUT_S``), answered 400 with type ``QueryTimeoutError``."""
        body = self._json_body()
        sql = body.get("sql") if isinstance(body, dict) else None
        if not isinstance(sql, str) or not sql.strip():
            raise UserError('body must be {"sql": "..."}')
        try:
            max_rows = int(body.get("max_rows", 10000))
        except (TypeError, ValueError):
            raise UserError("max_rows must be an integer") from None
        timeout_s = check_timeout(body.get("timeout_s", QUERY_TIMEOUT_S))
        result = self.api.queries.sql(
            self.caller, sql, max_rows=max(1, min(max_rows, 100_000)), timeout_s=timeout_s
        )
        self._send_json({"columns": result.columns, "rows": result.rows, "truncated": result.truncated})

    def captures(self, q: dict[str, str]) -> None:
        self._send_json([_plain(c) for c in self.api.queries.captures(self.caller)])

    def releases(self, q: dict[str, str]) -> None:
        self._send_json([_plain(r) for r in self.api.releases.all(self.caller)])

    def upload_release(self, q: dict[str, str]) -> None:
        missing = [k for k in ("name", "version", "hardware") if not q.get(k)]
        if missing:
            raise UserError(f"missing query parameter(s): {', '.join(missing)}")
        image = self._body()
        manifest = self.api.releases.upload(
            self.caller, image, name=q["name"], version=q["version"], hardware_id=q["hardware"],
            now=self.api.clock(),
        )  # fmt: skip
        self._send_json(_release_json(manifest), 201)

    def rollouts(self, q: dict[str, str]) -> None:
        self._send_json([_plain(r) for r in self.api.rollouts.all(self.caller)])

    def create_rollout(self, q: dict[str, str]) -> None:
        body = self._json_body()
        if not isinstance(body, dict):
            raise UserError("body must be a JSON object (the rollout policy)")
        self._send_json(_plain(self.api.rollouts.create(self.caller, body, self.api.clock())), 201)

    def rollout(self, q: dict[str, str], rid: str) -> None:
        self._send_json(_plain(self.api.rollouts.status(self.caller, rid)))

    def rollout_action(self, q: dict[str, str], rid: str, action: str) -> None:
        rollouts = self.api.rollouts
        act = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}[action]
        self._send_json(_plain(act(self.caller, rid, self.api.clock())))

    def rotate_root(self, q: dict[str, str], repository: str) -> None:
        body = self._json_body() or {}
        if not isinstance(body, dict):
            raise UserError("body must be a JSON object: {root_keys, threshold, online}")
        unknown = sorted(set(body) - {"root_keys", "threshold", "online"})
        if unknown:
            raise UserError(f"rotate: unknown field {unknown[0]!r}")
        for key in ("root_keys", "threshold"):
            if body.get(key) is not None and (type(body[key]) is not int):
                raise UserError(f"rotate: {key} must be an integer, got {body[key]!r}")
        result = self.api.releases.rotate_root(
            self.caller,
            repository,
            root_keys=body.get("root_keys"),
            threshold=body.get("threshold"),
            online=bool(body.get("online", False)),
        )
        self._send_json(result)

    def tuf_metadata(self, q: dict[str, str], repository: str, name: str) -> None:
        """TUF metadata for the agent's ngclient: ``/tuf/image/<file>``, ``/tuf/director/<device_id>/<file>``;
        404 for an absent root version ends a rotation walk."""
        data = self.api.releases.metadata_file(repository, name)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def file(self, q: dict[str, str], relpath: str) -> None:
        path = self.api.releases.artifact_file(f"files/{relpath}")
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        header = self.headers.get("Range")
        if header:
            m = _RANGE.match(header.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise UserError(f"unsupported Range header {header!r}")
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with open(path, "rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = fh.read(min(FILE_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _plain(record: Any) -> Any:
    """A service's record as JSON-ready data: dataclasses as objects, bytes as hex."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, bytes):
        return record.hex()
    if isinstance(record, list | tuple):
        return [_plain(v) for v in record]
    if isinstance(record, dict):
        return {k: _plain(v) for k, v in record.items()}
    return record


def _device_json(status: DeviceStatus) -> dict[str, Any]:
    out: dict[str, Any] = _plain(status.record)
    out.pop("catalog", None)
    out.pop("session_owner", None)
    out["online"] = status.online
    return out


def _release_json(m: ReleaseManifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "hardware_id": m.hardware_id,
        "sha256": m.target_sha256,
        "size": m.target_size,
        "payloads": [
            {
                "kind": p.kind,
                "algorithm": p.algorithm,
                "size": p.size,
                "sha256": p.sha256,
                "path": p.path,
                "base_sha256": p.base_sha256,
            }
            for p in m.payloads
        ],
    }


ROUTES: list[tuple[str, str, Any]] = [
    (r"/healthz", "GET", _Handler.health),
    (r"/v1/summary", "GET", _Handler.summary),
    (r"/v1/devices", "GET", _Handler.devices),
    (r"/v1/devices/([^/]+)", "GET", _Handler.device),
    (r"/v1/devices/([^/]+)/catalog", "GET", _Handler.device_catalog),
    (r"/v1/campaigns", "GET", _Handler.campaigns),
    (r"/v1/campaigns", "POST", _Handler.apply_campaign),
    (r"/v1/campaigns/([^/]+)", "DELETE", _Handler.delete_campaign),
    (r"/v1/query", "POST", _Handler.query),
    (r"/v1/captures", "GET", _Handler.captures),
    (r"/v1/releases", "GET", _Handler.releases),
    (r"/v1/releases", "POST", _Handler.upload_release),
    (r"/v1/rollouts", "GET", _Handler.rollouts),
    (r"/v1/rollouts", "POST", _Handler.create_rollout),
    (r"/v1/rollouts/([^/]+)", "GET", _Handler.rollout),
    (r"/v1/rollouts/([^/]+)/(pause|resume|abort)", "POST", _Handler.rollout_action),
    (r"/v1/tuf/(image|director)/rotate", "POST", _Handler.rotate_root),
    (r"/files/([0-9a-f]{64})", "GET", _Handler.file),
    (
        r"/tuf/(image|director/[A-Za-z0-9_][A-Za-z0-9._-]{0,127})/([a-z0-9.]{1,32}\.json)",
        "GET",
        _Handler.tuf_metadata,
    ),
]


def start_http_server(api: OperatorApi, host: str, port: int) -> tuple[ThreadingHTTPServer, int]:
    """Serve in a background thread; returns the server and its bound port (0 picks a free one)."""
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, server.server_address[1]
